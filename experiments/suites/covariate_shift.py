"""``covariate-shift``: the BN paper's sigmoid MLP, watching one sigmoid's input distribution.

Claims (BN paper, Ioffe & Szegedy 2015, fig. 1; seeds 000/004): without BN the distribution of a
sigmoid's input (its 15th/50th/85th percentiles) drifts during training ("internal covariate
shift"); with BN it stays put; and the BN network converges faster and to a higher test accuracy.
Published setting: MNIST, 3 hidden x 100 sigmoid, batch 60, 50k steps. Scaled for CPU: digits,
a few hundred steps, SGD lr 1.0 with sqrt(2/fan_in) init, which trains the sigmoid net without BN
reasonably in that budget (lr 0.1-0.5 or Xavier init leave it near chance), so the comparison is
not against a stalled baseline (:data:`PROTOCOL`). Every verdict is a paired difference over
seeds (same seed: same initial draws and batch order with and without BN; :mod:`experiments.stats`).

Budget: quick (3 seeds, 25 epochs = 475 steps) about 25 s on 2 CPU cores; full (5 seeds, 100
epochs = 1900 steps) about a minute on 2 CPU cores, well under one on a GPU.

The percentiles are taken over a fixed probe set (the validation split) in training mode, for the
first units of the last hidden layer, after every epoch (``normzoo.diagnostics.activation_stats``
of each unit's column).
"""
from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np

from experiments import plots, stats
from experiments.common import Claim, Context, Job, ProtocolRow, SuiteReport, by_meta, seed_list
from experiments.models import norm_overrides_for
from experiments.train import Run, TrainSpec, TrainState, forward
from normzoo.diagnostics import activation_stats

NAME = "covariate-shift"
UNITS = 8
PERCENTILES = (15, 50, 85)
DEFAULTS = dict(
    dataset="digits", train_size=None, model="mlp", width=100, depth=3, activation="sigmoid", optimizer="sgd",
    lr=1.0, init="he", batch_size=60, epochs=100, seeds=5, norms=["none", "bn"], bn_momentum=0.9,
)
QUICK = dict(epochs=25, seeds=3)

PROTOCOL = [
    ("data", "MNIST (60k train)", "{dataset}", "offline; MNIST needs a download (--dataset mnist --data-dir)"),
    ("model", "3 hidden x 100 sigmoid", "{depth} hidden x {width} {activation}", ""),
    ("batch size", "60", "{batch_size}", ""),
    ("training length", "50k steps", "{epochs} epochs = {steps} steps", "CPU budget"),
    ("optimizer", "SGD (learning rate not stated)", "SGD lr {lr}", "lr 0.1-0.5 leaves the net without BN near "
     "chance in this budget"),
    ("initialization", "small random Gaussian", "{init} (sqrt(2 / fan_in))", "trains the baseline in the budget"),
    ("BN momentum", "running averages (value not stated)", "{bn_momentum}", "seeds' ~0.9"),
    ("percentiles", "15/50/85th of one sigmoid input over training", f"15/50/85th of {UNITS} units of the last "
     "hidden layer on the validation split, training mode", ""),
    ("seeds", "1 (curves)", "{seeds}", "paired verdicts need a spread"),
]


def percentile_probe(state: TrainState, x: jax.Array) -> dict[str, jax.Array]:
    """15/50/85th percentiles ``(UNITS, 3)`` of the sigmoid inputs of the last hidden layer."""
    _, inter = forward(state, x, batch_stats_mode=True, collect=True)
    last = max((k for k in inter if k.startswith("norm_out")), key=lambda k: int(k.rsplit("_", 1)[1]))
    h = inter[last][:, :UNITS]
    # each unit's own distribution over the probe samples: activation_stats of its (n, 1) column
    stats = jax.vmap(lambda u: activation_stats(u[:, None], percentiles=PERCENTILES))(h.T)
    return {"pct": jnp.stack([stats[f"p{q:g}"] for q in PERCENTILES], axis=1)}


def relative_drift(p: np.ndarray) -> float:
    """Drift of percentile tracks ``p`` ``(epochs, units, 3)``: per unit and percentile the range
    over training, divided by the unit's mean 15-85 spread, then averaged (scale-free)."""
    spread = np.maximum(np.mean(p[:, :, 2] - p[:, :, 0], axis=0), 1e-6)  # (units,)
    rng = p.max(axis=0) - p.min(axis=0)  # (units, 3)
    return float(np.mean(rng / spread[:, None]))


def run(ctx: Context) -> SuiteReport:
    t0 = time.perf_counter()
    s = ctx.settings(DEFAULTS, QUICK)
    ctx.write_config(s)
    data = ctx.data(s["dataset"], train_size=s["train_size"])
    norms = ctx.available(s["norms"], s["width"], 2)
    spec = TrainSpec(optimizer=s["optimizer"], batch_size=s["batch_size"], epochs=s["epochs"], init=s["init"])
    jobs = []
    for n in norms:
        model = dict(kind=s["model"], width=s["width"], depth=s["depth"], activation=s["activation"], norm=n,
                     norm_overrides=norm_overrides_for(n, ctx.norm_overrides(n), stateful={"momentum": s["bn_momentum"]}))
        jobs.append(Job(name=n, model=model, spec=spec, runs=[Run(seed=x, lr=s["lr"]) for x in seed_list(s)],
                        meta={"norm": n}, probe=percentile_probe, probe_x=data.x_val, hook_id="percentile_probe"))
    results = ctx.run_jobs(jobs, data)

    recs = {n: by_meta(results, norm=n) for n in norms}
    seed_of = lambda r: int(r["run"]["seed"])  # noqa: E731
    drift = {n: {seed_of(r): relative_drift(np.asarray(r["probes"]["pct"])) for r in recs[n]} for n in norms}
    auc = {n: {seed_of(r): float(np.mean([h["test_acc"] for h in r["history"][1:]])) for r in recs[n]} for n in norms}
    final = {n: stats.per_seed_final(recs[n], "test_acc") for n in norms}
    E = lambda d: stats.estimate(d.values())  # noqa: E731

    fig, axes = plots.new_figure(1, len(norms) + 1, size=(3.9, 3.3))
    for n in norms:
        mean, se = stats.curve_band(recs[n], "test_acc")
        plots.band(axes[0][0], np.arange(len(mean)), mean, se, n, plots.color(n))
    axes[0][0].set(xlabel="epoch", ylabel="test accuracy (fraction)", title="(a) test accuracy", ylim=(0, 1))
    axes[0][0].legend()
    for ax, n in zip(axes[0][1:], norms):
        p = np.asarray([np.asarray(r["probes"]["pct"])[:, 0, :] for r in recs[n]])  # unit 0, every seed
        for j, q in enumerate(PERCENTILES):
            se = p[:, :, j].std(axis=0, ddof=1) / np.sqrt(len(p)) if len(p) > 1 else np.zeros(p.shape[1])
            plots.band(ax, np.arange(p.shape[1]), p[:, :, j].mean(axis=0), se, f"{q}th percentile",
                       plots.color(n) or "k", alpha=0.5 + 0.25 * (j == 1))
        ax.set(xlabel="epoch", ylabel="sigmoid input (pre-activation)",
               title=f"{n}: one unit (drift {E(drift[n]).fmt(2)})")
        ax.legend(fontsize=8)
    png = plots.save(fig, ctx.out / "covariate_shift.png")

    claims = []
    if "none" in norms:
        for n in [m for m in norms if m != "none"]:
            for claim, source, a, b, what, measured in (
                (f"With {n.upper()} the sigmoid inputs' distribution stays put; without it, it drifts",
                 "seeds 000/004; BN paper fig. 1(b,c)", drift["none"], drift[n], f"drift(none) - drift({n})",
                 f"relative drift of the 15/50/85th percentiles: {n} {E(drift[n]).fmt(2)} vs none "
                 f"{E(drift['none']).fmt(2)}"),
                (f"{n.upper()} converges faster", "seeds 000/002/004; BN paper fig. 1(a)", auc[n], auc["none"],
                 f"mean test acc over epochs({n}) - (none)",
                 f"mean test accuracy over epochs: {n} {E(auc[n]).pct()} vs none {E(auc['none']).pct()}"),
                (f"{n.upper()} reaches a higher test accuracy", "BN paper fig. 1(a)", final[n], final["none"],
                 f"final test acc({n}) - (none)",
                 f"final test accuracy: {n} {E(final[n]).pct()} vs none {E(final['none']).pct()}"),
            ):
                d = stats.paired(a, b)
                claims.append(Claim(claim=claim, source=source, measured=f"{measured}; d = {d.fmt(3)} (n={d.n})",
                                    verdict=stats.verdict(d, "better", 0.0), rule=stats.rule("better", 0.0, what)))
    rows = [[n, E(drift[n]).fmt(2), E(auc[n]).pct(), E(final[n]).pct()] for n in norms]
    steps = s["epochs"] * (len(data.y_train) // s["batch_size"])
    protocol = ProtocolRow.table(PROTOCOL, steps=steps, **s)
    return SuiteReport(
        name=NAME, title="Internal covariate shift (BN paper figure 1)",
        summary=f"{s['depth']}x{s['width']} sigmoid MLP, batch {s['batch_size']}, SGD lr {s['lr']}, "
                f"{s['epochs']} epochs ({steps} steps), {len(seed_list(s))} seeds; mean ± standard error over seeds.",
        claims=claims, settings=s,
        tables=[("Summary", ["norm", "relative drift", "mean test acc over epochs", "final test acc"], rows)],
        figures=[("Test accuracy, and the 15/50/85th percentiles of one sigmoid input over training; "
                  + plots.BAND_NOTE, png)],
        notes=list(ctx.notes), seconds=time.perf_counter() - t0, protocol=protocol,
        accuracy={n: E(final[n]) for n in norms}, accuracy_setting=f"sigmoid MLP, batch {s['batch_size']}",
        reproduce="The BN paper trains 50k steps on MNIST; the full profile (`python -m experiments covariate-shift "
                  "--dataset mnist --data-dir DIR --epochs 50`, 50k steps) takes about 15 minutes on 2 CPU cores "
                  "and 2 on one GPU; the default full profile (digits, 1900 steps) about a minute.",
    )
