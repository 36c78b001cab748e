"""``init-scale``: training accuracy vs the std of the initial weights, with and without BN.

Claim (seeds 000/001, "Deep Learning from Scratch" ch. 6): batch normalization makes training far
less dependent on the initial weights, and speeds it up. Published setting: 1000 MNIST samples,
5 hidden x 100 ReLU, SGD lr 0.01, batch 100, 20 epochs, weight std in logspace(0, -4, 16),
Affine -> BN -> ReLU with BN momentum 0.9, eps 1e-6; train accuracy (inference mode) per epoch.

All 16 stds x seeds of one normalizer train in a single vmapped job.
"""
from __future__ import annotations

import time

import numpy as np

from experiments import plots
from experiments.common import Claim, Context, Job, SuiteReport, by_meta, compare, fmt, mean_curve, mean_final, seed_list
from experiments.models import freeze_overrides, norm_overrides_for
from experiments.train import Run, TrainSpec

NAME = "init-scale"
GOOD_ACC = 0.8

DEFAULTS = dict(
    dataset="digits", train_size=1000, model="mlp", width=100, depth=5, activation="relu",
    optimizer="sgd", lr=0.01, batch_size=100, epochs=20, seeds=3, norms=["none", "bn"],
    stds=[float(s) for s in np.logspace(0, -4, 16)], bn_momentum=0.9, bn_epsilon=1e-6,
)
QUICK = dict(seeds=1)


def run(ctx: Context) -> SuiteReport:
    t0 = time.perf_counter()
    s = ctx.settings(DEFAULTS, QUICK)
    ctx.write_config(s)
    data = ctx.data(s["dataset"], train_size=s["train_size"])
    norms = ctx.available(s["norms"], s["width"], 2)
    spec = TrainSpec(optimizer=s["optimizer"], batch_size=s["batch_size"], epochs=s["epochs"], init="std")
    runs, run_meta = [], []
    for std in s["stds"]:
        for seed in seed_list(s):
            runs.append(Run(seed=seed, lr=s["lr"], init_std=std))
            run_meta.append({"init_std": std})
    jobs = []
    for n in norms:
        ov = norm_overrides_for(n, ctx.norm_overrides(n), stateful={"momentum": s["bn_momentum"], "epsilon": s["bn_epsilon"]})
        model = dict(kind=s["model"], width=s["width"], depth=s["depth"], norm=n, norm_overrides=freeze_overrides(dict(ov)),
                     activation=s["activation"])
        jobs.append(Job(name=n, model=model, spec=spec, runs=runs, meta={"norm": n}, run_meta=run_meta))
    results = ctx.run_jobs(jobs, data)

    stds = s["stds"]
    acc = {n: np.array([mean_final(by_meta(results, norm=n, init_std=sd), "train_acc") for sd in stds]) for n in norms}
    auc = {n: np.array([np.nanmean(mean_curve(by_meta(results, norm=n, init_std=sd), "train_acc")[1:]) for sd in stds])
           for n in norms}

    # figure 1: DLFS-style 4x4 grid of train-accuracy curves
    cols = 4
    rows_n = int(np.ceil(len(stds) / cols))
    fig, axes = plots.new_figure(rows_n, cols, size=(2.6, 2.0), sharey=True)
    for i, sd in enumerate(stds):
        ax = axes[i // cols][i % cols]
        for n in norms:
            ax.plot(mean_curve(by_meta(results, norm=n, init_std=sd), "train_acc"), label=n, color=plots.color(n))
        ax.set_title(f"std={sd:.2g}", fontsize=9)
        ax.set_ylim(0, 1.02)
    axes[0][0].legend(fontsize=8)
    fig.suptitle("train accuracy (inference mode) vs epoch, per initial weight std")
    grid = plots.save(fig, ctx.out / "init_scale_grid.png")
    fig, axes = plots.new_figure()
    for n in norms:
        axes[0][0].semilogx(stds, acc[n], "o-", label=n, color=plots.color(n))
    axes[0][0].axhline(GOOD_ACC, ls=":", color="k", lw=0.8)
    axes[0][0].set(xlabel="initial weight std", ylabel=f"final train accuracy (epoch {s['epochs']})")
    axes[0][0].legend()
    summary_png = plots.save(fig, ctx.out / "init_scale_final.png")

    claims = []
    base = "none" if "none" in norms else None
    for n in norms:
        if n == "none" or base is None:
            continue
        good_n, good_b = int((acc[n] >= GOOD_ACC).sum()), int((acc[base] >= GOOD_ACC).sum())
        claims.append(Claim(
            claim=f"{n.upper()} reduces the dependence on the initial weights",
            source="seed 001 / DLFS fig. 6-19",
            measured=f"stds reaching train acc >= {GOOD_ACC}: {n} {good_n}/{len(stds)}, none {good_b}/{len(stds)}; "
                     f"worst-case acc {n} {fmt(acc[n].min(), 2)} vs none {fmt(acc[base].min(), 2)}",
            verdict=compare(good_n - good_b, 3),
            rule="supported if >= 3 more stds reach the threshold; not supported if none has as many or more",
        ))
        d = float(np.mean(auc[n] - auc[base]))
        claims.append(Claim(
            claim=f"{n.upper()} speeds up training",
            source="seeds 000/001/002",
            measured=f"mean train accuracy over epochs, averaged over the {len(stds)} stds: "
                     f"{n} {fmt(auc[n].mean())} vs none {fmt(auc[base].mean())} (diff {fmt(d)})",
            verdict=compare(d, 0.05),
            rule="supported if the difference >= 0.05; not supported if <= 0",
        ))
    table_rows = [[f"{sd:.2g}"] + [fmt(acc[n][i], 3) for n in norms] for i, sd in enumerate(stds)]
    return SuiteReport(
        name=NAME,
        title="Initial weight scale",
        summary="Final training accuracy (inference mode, running statistics) after training an MLP from "
                "initial weights of fixed std, from 1 down to 1e-4.",
        claims=claims,
        settings=s,
        tables=[("Final train accuracy by init std (mean over seeds)", ["std"] + norms, table_rows)],
        figures=[("Train accuracy per epoch for each init std (DLFS fig. 6-19 layout)", grid),
                 ("Final train accuracy vs init std", summary_png)],
        notes=list(ctx.notes),
        seconds=time.perf_counter() - t0,
    )
