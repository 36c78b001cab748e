"""``covariate-shift``: the BN paper's sigmoid MLP, watching one sigmoid's input distribution.

Claims (BN paper, Ioffe & Szegedy 2015, fig. 1; seeds 000/004): without BN the distribution of a
sigmoid's input (its 15th/50th/85th percentiles) drifts during training ("internal covariate
shift"); with BN it stays put; and the BN network converges faster and to a higher test accuracy.
Published setting: MNIST, 3 hidden x 100 sigmoid, batch 60, 50k steps. Scaled for CPU: digits,
a few hundred steps, SGD lr 1.0 with sqrt(2/fan_in) init, which trains the sigmoid net without BN
reasonably in that budget (lr 0.1-0.5 or Xavier init leave it near chance), so the comparison is
not against a stalled baseline.

The percentiles are taken over a fixed probe set (the validation split) in training mode, for the
first units of the last hidden layer, after every epoch (``normzoo.diagnostics.activation_stats``
of each unit's column).
"""
from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np

from experiments import plots
from experiments.common import Claim, Context, Job, SuiteReport, by_meta, compare, fmt, mean_curve, mean_final, seed_list
from experiments.models import norm_overrides_for
from experiments.train import Run, TrainSpec, TrainState, forward
from normzoo.diagnostics import activation_stats

NAME = "covariate-shift"
UNITS = 8
PERCENTILES = (15, 50, 85)
DEFAULTS = dict(
    dataset="digits", train_size=None, model="mlp", width=100, depth=3, activation="sigmoid", optimizer="sgd",
    lr=1.0, init="he", batch_size=60, epochs=40, seeds=3, norms=["none", "bn"], bn_momentum=0.9,
)
QUICK = dict(epochs=15, seeds=2)


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
    drift = {n: float(np.mean([relative_drift(np.asarray(r["probes"]["pct"])) for r in recs[n]])) for n in norms}
    acc_curve = {n: mean_curve(recs[n], "test_acc") for n in norms}
    auc = {n: float(np.nanmean(acc_curve[n][1:])) for n in norms}
    final = {n: mean_final(recs[n], "test_acc") for n in norms}

    fig, axes = plots.new_figure(1, len(norms) + 1, size=(3.8, 3.2))
    for n in norms:
        axes[0][0].plot(acc_curve[n], label=n, color=plots.color(n))
    axes[0][0].set(xlabel="epoch", ylabel="test accuracy", title="(a) test accuracy")
    axes[0][0].legend()
    for ax, n in zip(axes[0][1:], norms):
        p = np.asarray(recs[n][0]["probes"]["pct"])[:, 0, :]  # unit 0 of the first seed
        for j, q in enumerate(PERCENTILES):
            ax.plot(p[:, j], color=plots.color(n) or "k", alpha=0.5 + 0.25 * (j == 1), label=f"{q}th")
        ax.set(xlabel="epoch", title=f"sigmoid input, {n} (drift {fmt(drift[n], 2)})")
        ax.legend(fontsize=8)
    png = plots.save(fig, ctx.out / "covariate_shift.png")

    claims = []
    if "none" in norms:
        for n in [m for m in norms if m != "none"]:
            claims.append(Claim(
                claim=f"With {n.upper()} the sigmoid inputs' distribution stays put; without it, it drifts",
                source="seeds 000/004; BN paper fig. 1(b,c)",
                measured=f"relative drift of the 15/50/85th percentiles: {n} {fmt(drift[n], 2)} vs none "
                         f"{fmt(drift['none'], 2)}",
                verdict=compare(drift["none"] / max(drift[n], 1e-9), 2.0) if drift[n] > 0 else "inconclusive",
                rule="supported if none's drift is >= 2x; not supported if it is not larger",
            ))
            claims.append(Claim(
                claim=f"{n.upper()} converges faster",
                source="seeds 000/002/004; BN paper fig. 1(a)",
                measured=f"mean test accuracy over epochs: {n} {fmt(auc[n])} vs none {fmt(auc['none'])}",
                verdict=compare(auc[n] - auc["none"], 0.02),
                rule="supported if higher by >= 0.02; not supported if not higher",
            ))
            claims.append(Claim(
                claim=f"{n.upper()} reaches a higher test accuracy",
                source="BN paper fig. 1(a)",
                measured=f"final test accuracy: {n} {fmt(final[n])} vs none {fmt(final['none'])}",
                verdict=compare(final[n] - final["none"], 0.01),
                rule="supported if higher by >= 0.01; not supported if not higher",
            ))
    rows = [[n, fmt(drift[n], 2), fmt(auc[n]), fmt(final[n])] for n in norms]
    return SuiteReport(
        name=NAME, title="Internal covariate shift (BN paper figure 1)",
        summary=f"{s['depth']}x{s['width']} sigmoid MLP, batch {s['batch_size']}, SGD lr {s['lr']}, "
                f"{s['epochs']} epochs ({s['epochs'] * (len(data.y_train) // s['batch_size'])} steps).",
        claims=claims, settings=s,
        tables=[("Summary", ["norm", "relative drift", "mean test acc over epochs", "final test acc"], rows)],
        figures=[("Test accuracy, and the 15/50/85th percentiles of one sigmoid input over training", png)],
        notes=list(ctx.notes), seconds=time.perf_counter() - t0,
    )
