"""``hparam-search``: random search of learning rate and weight decay on a log scale.

Claims (seed 001, DLFS 6.5): hyper-parameters are chosen on a validation split (20% of the
training data), never on the test set; sampling on a log scale and keeping the best trials
narrows the range; the good region reported is lr 1e-3..1e-2 and weight decay 1e-8..1e-6.
Published setting: 500 MNIST samples, 20% validation, 100 trials, lr = 10^U(-6, -2),
weight decay = 10^U(-8, -4), 50 epochs, 6 hidden x 100 ReLU, SGD, batch 100; best 20 plotted.
All trials of one normalizer train in one vmapped job.
"""
from __future__ import annotations

import time

import numpy as np

from experiments import plots
from experiments.common import (
    INCONCLUSIVE, NOT_SUPPORTED, SUPPORTED, Claim, Context, Job, SuiteReport, by_meta, fmt, mean_curve, mean_final,
)
from experiments.models import norm_overrides_for
from experiments.train import Run, TrainSpec

NAME = "hparam-search"
DEFAULTS = dict(
    dataset="digits", train_size=500, model="mlp", width=100, depth=6, activation="relu", optimizer="sgd",
    batch_size=100, epochs=50, trials=100, lr_range=[-6.0, -2.0], wd_range=[-8.0, -4.0], search_seed=0,
    top_fraction=0.2, norms=["none"],
)
QUICK = dict(epochs=30, trials=60)


def _verdict_fraction(frac: float, prior: float, strong: float = 0.75) -> str:
    if frac >= strong:
        return SUPPORTED
    if frac <= prior:
        return NOT_SUPPORTED
    return INCONCLUSIVE


def run(ctx: Context) -> SuiteReport:
    t0 = time.perf_counter()
    s = ctx.settings(DEFAULTS, QUICK)
    ctx.write_config(s)
    data = ctx.data(s["dataset"], train_size=s["train_size"], val_fraction=0.2)
    rng = np.random.default_rng(s["search_seed"])
    lrs = 10.0 ** rng.uniform(*s["lr_range"], size=s["trials"])
    wds = 10.0 ** rng.uniform(*s["wd_range"], size=s["trials"])
    spec = TrainSpec(optimizer=s["optimizer"], batch_size=s["batch_size"], epochs=s["epochs"], init="he")
    runs = [Run(seed=i, lr=float(lr), weight_decay=float(wd)) for i, (lr, wd) in enumerate(zip(lrs, wds))]
    meta = [{"trial": i} for i in range(len(runs))]
    jobs = []
    norms = ctx.available(s["norms"], s["width"], 2)
    for n in norms:
        model = dict(kind=s["model"], width=s["width"], depth=s["depth"], activation=s["activation"], norm=n,
                     norm_overrides=norm_overrides_for(n, ctx.norm_overrides(n)))
        jobs.append(Job(name=n, model=model, spec=spec, runs=runs, meta={"norm": n}, run_meta=meta))
    results = ctx.run_jobs(jobs, data)

    claims, tables, figures = [], [], []
    k = max(1, int(round(s["top_fraction"] * s["trials"])))
    prior_lr = (s["lr_range"][1] - max(-3.0, s["lr_range"][0])) / (s["lr_range"][1] - s["lr_range"][0])
    prior_wd = (min(-6.0, s["wd_range"][1]) - s["wd_range"][0]) / (s["wd_range"][1] - s["wd_range"][0])
    for n in norms:
        recs = by_meta(results, norm=n)
        val = np.array([mean_final([r], "val_acc") for r in recs])
        order = np.argsort(-np.nan_to_num(val, nan=-1.0), kind="stable")  # selection on validation only
        top = order[:k]
        best = recs[order[0]]
        frac_lr = float(np.mean((lrs[top] >= 1e-3) & (lrs[top] <= 1e-2)))
        frac_wd = float(np.mean((wds[top] >= 1e-8) & (wds[top] <= 1e-6)))
        claims.append(Claim(
            claim=f"[{n}] good learning rates lie in 1e-3..1e-2",
            source="seed 001 (DLFS 6.5.3)",
            measured=f"{pct(frac_lr)} of the best {k} trials (by validation accuracy) have lr in 1e-3..1e-2 "
                     f"(a random trial: {pct(prior_lr)}); top lr range {lrs[top].min():.1e}..{lrs[top].max():.1e}",
            verdict=_verdict_fraction(frac_lr, prior_lr),
            rule="supported if >= 75% of the top trials fall in the range; not supported if no more than a random "
                 "trial would",
        ))
        claims.append(Claim(
            claim=f"[{n}] good weight decays lie in 1e-8..1e-6",
            source="seed 001 (DLFS 6.5.3)",
            measured=f"{pct(frac_wd)} of the best {k} trials have wd in 1e-8..1e-6 (a random trial: {pct(prior_wd)})",
            verdict=_verdict_fraction(frac_wd, prior_wd),
            rule="supported if >= 75% of the top trials fall in the range; not supported if no more than a random "
                 "trial would",
        ))
        tables.append((f"[{n}] best {min(k, 10)} trials, selected on validation accuracy (test shown, never used)",
                       ["rank", "lr", "weight decay", "val acc", "test acc"],
                       [[str(i + 1), f"{lrs[j]:.2e}", f"{wds[j]:.2e}", fmt(val[j]), fmt(mean_final([recs[j]], "test_acc"))]
                        for i, j in enumerate(order[: min(k, 10)])]))
        fig, axes = plots.new_figure()
        ax = axes[0][0]
        sc = ax.scatter(lrs, wds, c=val, cmap="viridis", s=25, vmin=0, vmax=1)
        ax.scatter(lrs[top], wds[top], facecolors="none", edgecolors="r", s=70, label=f"best {k}")
        ax.axvspan(1e-3, 1e-2, color="r", alpha=0.06)
        ax.set(xscale="log", yscale="log", xlabel="learning rate", ylabel="weight decay",
               title=f"{n}: validation accuracy per trial")
        fig.colorbar(sc, ax=ax, label="val acc")
        ax.legend()
        figures.append((f"[{n}] random search: validation accuracy over (lr, wd); the shaded band is lr 1e-3..1e-2",
                        plots.save(fig, ctx.out / f"hparam_scatter_{n}.png")))
        cols = 5
        show = order[: min(20, k)]
        fig, axes = plots.new_figure(int(np.ceil(len(show) / cols)), cols, size=(2.4, 1.9), sharey=True)
        for i, j in enumerate(show):
            ax = axes[i // cols][i % cols]
            ax.plot(mean_curve([recs[j]], "val_acc"), label="val")
            ax.plot(mean_curve([recs[j]], "train_acc"), "--", label="train")
            ax.set_title(f"Best-{i + 1} lr={lrs[j]:.1e}", fontsize=8)
            ax.set_ylim(0, 1.02)
        axes[0][0].legend(fontsize=7)
        figures.append((f"[{n}] learning curves of the best trials (DLFS fig. 6-24 layout)",
                        plots.save(fig, ctx.out / f"hparam_best_{n}.png")))
        tables.append((f"[{n}] selected trial", ["lr", "weight decay", "val acc", "test acc (reported once)"],
                       [[f"{lrs[order[0]]:.2e}", f"{wds[order[0]]:.2e}", fmt(val[order[0]]), fmt(mean_final([best], "test_acc"))]]))
    return SuiteReport(
        name=NAME, title="Hyper-parameter search",
        summary=f"{s['trials']} random trials, lr = 10^U{tuple(s['lr_range'])}, wd = 10^U{tuple(s['wd_range'])}, "
                f"{s['epochs']} epochs; trials ranked by validation accuracy at the last epoch.",
        claims=claims, settings=s, tables=tables, figures=figures, notes=list(ctx.notes),
        seconds=time.perf_counter() - t0,
    )


def pct(x: float) -> str:
    return f"{100 * x:.0f}%"
