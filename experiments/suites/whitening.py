"""``whitening``: BN vs ZCA / Cholesky / PCA / IterNorm / DBN / group whitening on an MLP.

Claims (REFERENCES sections 2 and 4; seed 002's survey): whitening decorrelates the activations
(their covariance becomes the identity, condition number 1), where BN only standardizes each
feature; DBN (ZCA) and IterNorm train faster than BN; PCA whitening fails to train (stochastic
axis swapping); full whitening needs a batch larger than the group size.

Protocol (the papers' settings where the budget allows, :data:`PROTOCOL`): SGD with momentum 0.9,
each normalizer at its own best learning rate from one grid (the papers tune the learning rate
per method; here the rule is fixed: the grid value with the lowest mean training loss over the
epochs, averaged over seeds, the same rule for every normalizer), batch 128 larger than every
group (ZCA / Cholesky / PCA whiten all 64 features, DBN groups of 16, IterNorm T = 5 in groups of
64), running statistics with the PyTorch-style momentum 0.1 of the reference code (Flax 0.9).
Group whitening (per sample, G x G over channel groups) is given G = 4 groups of 16 features, so
each group row has more elements than there are groups, and the paper's Newton iteration (T = 5).

Measured per seed: the training-loss curve (its mean over the epochs is the "training speed"),
final accuracies and, after training, the condition number of the covariance of each
normalizer's output on a fixed probe batch of the training batch size, in training mode (the
eigenvalues in float64 NumPy, so condition numbers up to the cap are resolved, not float32
rounding). Every verdict is a paired difference over seeds (:mod:`experiments.stats`). Whitening layers missing from
``normzoo.registry`` are skipped with a note.

Budget: quick (3 seeds, 3 learning rates, 12 epochs) about a minute on 2 CPU cores; full
(5 seeds, 4 learning rates, 40 epochs) about 8 minutes on 2 CPU cores, 2 on one GPU.
"""
from __future__ import annotations

import math
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from experiments import plots, stats
from experiments.common import Claim, Context, Job, ProtocolRow, SuiteReport, by_meta, seed_list
from experiments.models import norm_overrides_for
from experiments.train import Run, TrainSpec, TrainState, forward

NAME = "whitening"
WHITENING = ("zca", "cholesky", "pca", "iternorm", "dbn", "gw")
# group whitening whitens each sample over its channel groups, not the features over the batch:
# the batch covariance of its output is not what it claims to condition, so it is not tested here
DECORRELATING = ("zca", "cholesky", "dbn", "iternorm")
FASTER = ("zca", "cholesky", "dbn", "iternorm", "gw")
COND_CAP = 1e8
DEFAULTS = dict(
    dataset="digits", train_size=None, model="mlp", width=64, depth=4, activation="relu", optimizer="momentum",
    lrs=[0.01, 0.03, 0.1, 0.3], batch_size=128, epochs=40, seeds=5, probe_size=128, bn_momentum=0.9,
    gw_groups=4, norms=["none", "bn", "zca", "cholesky", "pca", "iternorm", "dbn", "gw"],
)
QUICK = dict(epochs=12, seeds=3, lrs=[0.01, 0.03, 0.1], norms=["bn", "zca", "cholesky", "pca", "iternorm", "dbn", "gw"])

PROTOCOL = [
    ("optimizer", "SGD, momentum 0.9 (DBN / IterNorm reference code)", "SGD momentum 0.9", ""),
    ("learning rate", "tuned per method", "{lrs}; per normalizer the value with the lowest mean training loss "
     "over epochs (mean over seeds)", "grid kept small for the CPU budget"),
    ("batch vs group size", "batch > group size for full whitening", "batch {batch_size} > 64 features "
     "(ZCA/Cholesky/PCA one group), DBN 16, IterNorm 64", ""),
    ("IterNorm", "T = 5 Newton-Schulz steps, groups of 64", "T = 5, groups of 64 (= the layer)", ""),
    ("DBN", "ZCA in groups of 16", "groups of 16", ""),
    ("group whitening", "G = 64 groups, Newton T = 5 (ResNet, rows of C/G x H x W elements)",
     "G = {gw_groups}, Newton T = 5", "an MLP row has only C/G elements: G = 4 keeps C/G = 16 > G"),
    ("running statistics", "EMA, PyTorch momentum 0.1 (Flax 0.9)", "momentum {bn_momentum}", ""),
    ("data / model", "MLPs and CNNs on MNIST, CIFAR, ImageNet", "{depth}x{width} ReLU MLP on {dataset}",
     "CPU budget"),
    ("training length", "tens of epochs (thousands of iterations)", "{epochs} epochs", "CPU budget (quick)"),
    ("seeds", "1 (curves)", "{seeds}", "paired verdicts need a spread"),
]


def log10_cond(h: np.ndarray) -> float:
    """log10 of the condition number of the covariance of ``h`` ``(n, ...)`` (features flattened
    over all non-batch axes), in float64 NumPy with the floor of
    :func:`normzoo.diagnostics.covariance_condition_number`: the smallest eigenvalue is clipped at
    ``lambda_max / COND_CAP``, so dead units give a finite, large value (at most 8); a run whose
    activations are not finite (it diverged) gives NaN."""
    h = np.asarray(h, np.float64).reshape(h.shape[0], -1)
    if not np.all(np.isfinite(h)):
        return float("nan")
    hc = h - h.mean(axis=0)
    ev = np.linalg.eigvalsh(hc.T @ hc / h.shape[0])
    top = ev[-1]
    if not top > 0:
        return float(np.log10(COND_CAP)) if np.isfinite(top) else float("nan")
    return float(np.log10(top / max(ev[0], top / COND_CAP)))


def make_cond_after(probe_x: np.ndarray):
    """The post-training hook: per run and layer, ``log10 cond`` of the covariance of the
    normalizer outputs (``cond_norm_out``) and of the inputs of the layers after the first
    (``cond_layer_in``) on ``probe_x``, in training mode (batch statistics of the probe batch;
    running statistics not updated). The forward pass is jitted; the eigenvalues are NumPy's."""
    fn = jax.jit(jax.vmap(lambda st, x: forward(st, x, batch_stats_mode=True, collect=True)[1], in_axes=(0, None)))

    def after(states: TrainState) -> list[dict[str, Any]]:
        inter = jax.device_get(fn(states, jnp.asarray(probe_x)))
        k = len(next(iter(inter.values())))
        out: list[dict[str, Any]] = [{} for _ in range(k)]
        for kind in ("norm_out", "layer_in"):
            names = sorted((n for n in inter if n.startswith(kind)), key=lambda n: int(n.rsplit("_", 1)[1]))
            if kind == "layer_in":
                names = names[1:]  # layer_in_0 is the raw input
            for i in range(k):
                out[i][f"cond_{kind}"] = [log10_cond(inter[n][i]) for n in names]
        return out

    return after


def loss_auc(rec: dict[str, Any]) -> float:
    """Mean training loss over epochs 1..E of one run (inf if it diverged)."""
    v = np.asarray([h["train_loss"] for h in rec["history"][1:]], float)
    return float(np.mean(v)) if v.size and np.all(np.isfinite(v)) else math.inf


def final_cond(rec: dict[str, Any], kind: str) -> float:
    """Mean over layers of the final log10 condition number of one run."""
    p = rec["extra"].get(f"cond_{kind}")
    return float(np.mean(p)) if p else float("nan")


def per_seed(recs: list[dict[str, Any]], fn: Any) -> dict[int, float]:
    return {int(r["run"]["seed"]): float(fn(r)) for r in recs}


def paired_claim(claim: str, source: str, a: dict[int, float], b: dict[int, float], what: str, measured: str,
                 kind: str = "better", margin: float = 0.0, digits: int = 3) -> Claim:
    """A claim decided by the paired difference ``a - b`` over seeds."""
    d = stats.paired(a, b)
    return Claim(claim=claim, source=source, measured=f"{measured}; d = {d.fmt(digits)} (mean ± SE, n={d.n})",
                 verdict=stats.verdict(d, kind, margin), rule=stats.rule(kind, margin, what))


def run(ctx: Context) -> SuiteReport:
    t0 = time.perf_counter()
    s = ctx.settings(DEFAULTS, QUICK)
    ctx.write_config(s)
    data = ctx.data(s["dataset"], train_size=s["train_size"])
    norms = ctx.available(s["norms"], s["width"], 2)
    if s["batch_size"] <= s["width"]:
        ctx.notes.append(f"batch_size {s['batch_size']} <= width {s['width']}: full whitening is rank deficient")
    spec = TrainSpec(optimizer=s["optimizer"], batch_size=s["batch_size"], epochs=s["epochs"], init="he")
    probe_x = data.x_train[: s["probe_size"]]
    seeds, lrs = seed_list(s), list(s["lrs"])
    runs = [Run(seed=x, lr=lr) for lr in lrs for x in seeds]
    run_meta = [{"lr": lr} for lr in lrs for _ in seeds]
    jobs = []
    for n in norms:
        base = {"num_groups": s["gw_groups"], "method": "newton", "iterations": 5} if n == "gw" else {}
        base.update(ctx.norm_overrides(n))
        model = dict(kind=s["model"], width=s["width"], depth=s["depth"], activation=s["activation"], norm=n,
                     norm_overrides=norm_overrides_for(n, base, stateful={"momentum": s["bn_momentum"]}))
        jobs.append(Job(name=n, model=model, spec=spec, runs=runs, run_meta=run_meta, meta={"norm": n},
                        after=make_cond_after(probe_x), hook_id="cond_after"))
    results = ctx.run_jobs(jobs, data)

    # per normalizer: the grid value with the lowest mean (over seeds) training-loss AUC
    best_lr: dict[str, float] = {}
    for n in norms:
        scores = {lr: float(np.mean([loss_auc(r) for r in by_meta(results, norm=n, lr=lr)])) for lr in lrs}
        best_lr[n] = min(lrs, key=lambda lr: (scores[lr], lr))
    recs = {n: by_meta(results, norm=n, lr=best_lr[n]) for n in norms}
    auc = {n: per_seed(recs[n], loss_auc) for n in norms}
    tr_acc = {n: stats.per_seed_final(recs[n], "train_acc") for n in norms}
    te_acc = {n: stats.per_seed_final(recs[n], "test_acc") for n in norms}
    cond = {n: per_seed(recs[n], lambda r: final_cond(r, "norm_out")) for n in norms}
    cond_in = {n: per_seed(recs[n], lambda r: final_cond(r, "layer_in")) for n in norms}
    diverged = {n: sum(r["diverged"] for r in recs[n]) for n in norms}
    E = lambda d: stats.estimate(d.values())  # noqa: E731

    fig, axes = plots.new_figure(1, 2, size=(5.2, 3.9))
    for n in norms:
        mean, se = stats.curve_band(recs[n], "train_loss")
        ep = np.arange(len(mean))[1:]
        plots.band(axes[0][0], ep, mean[1:], se[1:], f"{n} (lr {best_lr[n]:g})", plots.color(n))
    axes[0][0].set(xlabel="epoch", ylabel="training loss (cross entropy, mean over the epoch)", yscale="log",
                   title="training loss at each normalizer's best lr")
    xs = np.arange(len(norms))
    ce = [E(cond[n]) for n in norms]
    axes[0][1].bar(xs, [e.mean for e in ce], 0.6, yerr=[2 * e.se if np.isfinite(e.se) else 0.0 for e in ce],
                   color=[plots.color(n) or "tab:gray" for n in norms], capsize=3)
    axes[0][1].set_xticks(xs, norms)
    axes[0][1].set(xlabel="normalizer", ylabel="log10 condition number (0 = whitened)",
                   title="covariance of normalizer outputs after training\n(mean over layers; bars ± 2 SE)")
    axes[0][0].legend(fontsize=8)
    png = plots.save(fig, ctx.out / "whitening_curves.png")

    claims: list[Claim] = []
    present = [n for n in norms if n in WHITENING]
    missing = [n for n in WHITENING if n not in norms]
    note = f"whitening layers not available or not requested: {', '.join(missing)}" if missing else ""
    if "bn" in norms:
        for n in [m for m in DECORRELATING if m in present]:
            claims.append(paired_claim(
                f"{n.upper()} decorrelates: its output covariance is better conditioned than BN's",
                "seed 002 (survey); DBN / IterNorm / GW papers", cond["bn"], cond[n],
                f"log10 cond(BN out) - log10 cond({n} out)",
                f"log10 cond of normalizer outputs: {n} {E(cond[n]).fmt(2)} vs bn {E(cond['bn']).fmt(2)}", digits=2))
        for n in [m for m in FASTER if m in present]:
            claims.append(paired_claim(
                f"{n.upper()} trains faster than BN", "DBN (CVPR 2018), IterNorm (CVPR 2019), GW (CVPR 2021)",
                auc["bn"], auc[n], f"mean train loss(BN) - mean train loss({n}), each at its best lr",
                f"mean training loss over epochs: {n} {E(auc[n]).fmt()} (lr {best_lr[n]:g}) vs bn "
                f"{E(auc['bn']).fmt()} (lr {best_lr['bn']:g})"))
        if "pca" in present:
            claims.append(paired_claim(
                "PCA whitening fails to train (stochastic axis swapping): far below BN", "DBN paper (CVPR 2018)",
                tr_acc["bn"], tr_acc["pca"], "train acc(BN) - train acc(PCA), each at its best lr",
                f"final train acc pca {E(tr_acc['pca']).pct()} vs bn {E(tr_acc['bn']).pct()}; "
                f"diverged seeds: {diverged['pca']}/{len(recs['pca'])}"))
        d = stats.estimate(v - 1.0 for v in cond["bn"].values())
        claims.append(Claim(
            claim="BN standardizes each feature but does not decorrelate them (ill-conditioned covariance remains)",
            source="seed 002 (survey: standardization vs whitening)",
            measured=f"log10 cond of BN outputs {E(cond['bn']).fmt(2)}",
            verdict=stats.verdict(d, "better", 0.0),
            rule=stats.rule("better", 0.0, "log10 cond(BN out) - 1 per seed (above 1: condition number over 10, "
                                           "not whitened; one-sample, not paired)"),
        ))
    if not present:
        claims.append(Claim(
            claim="Whitening (ZCA/Cholesky/IterNorm/GW) decorrelates and trains faster than BN; PCA fails",
            source="DBN/IterNorm papers", measured=note or "no whitening layer requested",
            verdict=stats.INCONCLUSIVE, rule="needs at least one whitening layer in normzoo.registry "
                                             "(paired over seeds, mean(d) ± 2 SE)"))

    rows = [[n, f"{best_lr[n]:g}", E(auc[n]).fmt(), E(tr_acc[n]).pct(), E(te_acc[n]).pct(), E(cond[n]).fmt(2),
             E(cond_in[n]).fmt(2), f"{diverged[n]}/{len(recs[n])}"] for n in norms]
    lr_rows = [[n] + [stats.estimate(loss_auc(r) for r in by_meta(results, norm=n, lr=lr)).fmt() for lr in lrs]
               for n in norms]
    protocol = ProtocolRow.table(PROTOCOL, **s)
    slower = [c.claim for c in claims if "trains faster" in c.claim and c.verdict != stats.SUPPORTED]
    reproduce = ""
    if slower:
        reproduce = (
            "The DBN and IterNorm papers report faster training than BN (training loss per iteration on MLPs / "
            "CNNs over thousands of iterations, learning rate tuned per method). Here, "
            f"{s['epochs']} epochs of {len(data.y_train) // s['batch_size']} steps, not supported: "
            + "; ".join(slower) + " (see the table: mean training loss ± SE). The full profile "
            "(`python -m experiments whitening`: 40 epochs, 4 learning rates, 5 seeds, none and DBN added) "
            "takes about 8 minutes on 2 CPU cores and about 2 on one GPU; the papers' scale (CIFAR / ImageNet "
            "CNNs) is beyond this suite.")
    notes = list(ctx.notes) + ([note] if note else [])
    return SuiteReport(
        name=NAME, title="Whitening vs standardization",
        summary=f"{s['depth']}x{s['width']} {s['activation']} MLP on {s['dataset']}, batch {s['batch_size']}, "
                f"SGD momentum 0.9, each normalizer at its best lr of {lrs}, {s['epochs']} epochs, "
                f"{len(seeds)} seeds. Condition numbers on {len(probe_x)} training samples in training mode "
                "after the last epoch (mean over layers). Numbers: mean ± standard error over seeds.",
        claims=claims, settings=s,
        tables=[("Per normalizer (at its best learning rate)",
                 ["norm", "best lr", "mean train loss", "train acc", "test acc", "log10 cond(norm out)",
                  "log10 cond(layer in)", "diverged"], rows),
                ("Mean training loss over epochs per learning rate (the selection)", ["norm"] + [f"lr {lr:g}" for lr in lrs],
                 lr_rows)],
        figures=[("Training loss per epoch and conditioning of the normalized activations after training; "
                  + plots.BAND_NOTE, png)],
        notes=notes, seconds=time.perf_counter() - t0, protocol=protocol,
        accuracy={n: E(te_acc[n]) for n in norms}, accuracy_setting=f"batch {s['batch_size']}, best lr",
        reproduce=reproduce,
    )
