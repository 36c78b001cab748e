"""``init-scale``: training accuracy vs the std of the initial weights, with and without BN.

Claims (seeds 000/001, "Deep Learning from Scratch" ch. 6, fig. 6-19): batch normalization makes
training far less dependent on the initial weights, and speeds it up.

Source protocol (DLFS ``ch06/batch_norm_test.py``): 1000 MNIST training samples, 5 hidden x 100
ReLU, Affine -> BN -> ReLU with BN momentum 0.9 and eps 1e-6, SGD lr 0.01, batch 100, 20 epochs,
weight std in logspace(0, -4, 16); training accuracy (inference mode) per epoch; one run per std.
Used here: the same, on 1000 samples of the 8x8 digits (all of them for training, no validation
split, as in the source), with 3 seeds (``--quick``) or 5 (full). Same seed = same initial draws
(up to the std) and batch order for both normalizers, so the verdicts pair runs by seed.

All 16 stds x seeds of one normalizer train in a single vmapped job. Budget: quick and full both
train 20 epochs (the source's); full differs only in seeds, about 1.5x the quick time.
"""
from __future__ import annotations

import time
from typing import Any, Callable, Sequence

import numpy as np

from experiments import plots, stats
from experiments.common import Claim, Context, Job, ProtocolRow, SuiteReport, by_meta, seed_list
from experiments.models import freeze_overrides, norm_overrides_for
from experiments.train import Run, TrainSpec

NAME = "init-scale"
GOOD_ACC = 0.8  # a std "trains" when the final train accuracy reaches this (DLFS fig. 6-19 reading)

DEFAULTS = dict(
    dataset="digits", train_size=1000, model="mlp", width=100, depth=5, activation="relu",
    optimizer="sgd", lr=0.01, batch_size=100, epochs=20, seeds=5, norms=["none", "bn"],
    stds=[float(s) for s in np.logspace(0, -4, 16)], bn_momentum=0.9, bn_epsilon=1e-6,
)
QUICK = dict(seeds=3)


def _per_seed(records: Sequence[dict[str, Any]], stds: Sequence[float],
              fn: Callable[[dict[str, Any]], float], reduce: Callable[[np.ndarray], float]) -> dict[int, float]:
    """``{seed: reduce([fn(run) for each std])}`` over the runs of one normalizer."""
    out: dict[int, float] = {}
    for seed in sorted({int(r["run"]["seed"]) for r in records}):
        vals = []
        for sd in stds:
            rec = [r for r in records if int(r["run"]["seed"]) == seed and r["meta"]["init_std"] == sd]
            vals.append(fn(rec[0]) if rec else float("nan"))
        out[seed] = float(reduce(np.asarray(vals, float)))
    return out


def _final(key: str) -> Callable[[dict[str, Any]], float]:
    return lambda r: float(r["history"][-1].get(key) or np.nan)


def _auc(r: dict[str, Any]) -> float:
    """Mean training accuracy over epochs 1..E: the area under the learning curve."""
    return float(np.mean([h["train_acc"] for h in r["history"][1:]]))


def protocol(s: dict[str, Any], quick_seeds: int, full_seeds: int) -> list[ProtocolRow]:
    return [
        ProtocolRow("data", "1000 MNIST training samples (28x28)",
                    f"{s['train_size']} digits samples (8x8), all for training", "offline data; MNIST needs a download "
                    "(--dataset mnist --data-dir DIR follows the source)"),
        ProtocolRow("model", "5 hidden x 100 ReLU, Affine -> BN -> ReLU",
                    f"{s['depth']} hidden x {s['width']} {s['activation']}, Dense -> BN -> act", ""),
        ProtocolRow("optimizer", "SGD lr 0.01, batch 100", f"{s['optimizer']} lr {s['lr']}, batch {s['batch_size']}", ""),
        ProtocolRow("epochs", "20", f"{s['epochs']} (quick and full)", ""),
        ProtocolRow("initial weight std", "logspace(0, -4, 16), biases 0", f"{len(s['stds'])} stds "
                    f"{max(s['stds']):g}..{min(s['stds']):.0e}", ""),
        ProtocolRow("BN momentum / eps", "0.9 / 1e-6", f"{s['bn_momentum']} / {s['bn_epsilon']:g}", ""),
        ProtocolRow("metric", "train accuracy, inference mode (running statistics)", "the same", ""),
        ProtocolRow("runs per std", "1", f"{quick_seeds} seeds (quick), {full_seeds} (full)",
                    "a seed spread for the paired verdicts"),
    ]


def run(ctx: Context) -> SuiteReport:
    t0 = time.perf_counter()
    s = ctx.settings(DEFAULTS, QUICK)
    ctx.write_config(s)
    # no selection happens here, so the whole pool trains (val_fraction=0), as in DLFS
    data = ctx.data(s["dataset"], train_size=s["train_size"], val_fraction=0.0)
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
    recs = {n: by_meta(results, norm=n) for n in norms}
    cell = {(n, sd): stats.estimate(stats.per_seed_final(by_meta(results, norm=n, init_std=sd), "train_acc").values())
            for n in norms for sd in stds}
    good = {n: _per_seed(recs[n], stds, _final("train_acc"), lambda v: float(np.sum(v >= GOOD_ACC))) for n in norms}
    auc = {n: _per_seed(recs[n], stds, _auc, np.nanmean) for n in norms}

    # figure 1: DLFS-style 4x4 grid of train-accuracy curves, each with its seed band
    cols = 4
    rows_n = int(np.ceil(len(stds) / cols))
    fig, axes = plots.new_figure(rows_n, cols, size=(2.6, 2.1), sharey=True)
    for i, sd in enumerate(stds):
        ax = axes[i // cols][i % cols]
        for n in norms:
            mean, se = stats.curve_band(by_meta(results, norm=n, init_std=sd), "train_acc")
            plots.band(ax, np.arange(len(mean)), mean, se, label=n, color_=plots.color(n))
        ax.set_title(f"init std = {sd:.2g}", fontsize=9)
        ax.set_ylim(0, 1.02)
        if i // cols == rows_n - 1:
            ax.set_xlabel("epoch")
        if i % cols == 0:
            ax.set_ylabel("train accuracy")
    for j in range(len(stds), rows_n * cols):
        axes[j // cols][j % cols].axis("off")
    axes[0][0].legend(fontsize=8)
    fig.suptitle("train accuracy (inference mode) vs epoch, per initial weight std")
    grid = plots.save(fig, ctx.out / "init_scale_grid.png")
    fig, axes = plots.new_figure()
    ax = axes[0][0]
    for n in norms:
        plots.band(ax, stds, [cell[n, sd].mean for sd in stds], [np.nan_to_num(cell[n, sd].se) for sd in stds],
                   label=n, color_=plots.color(n), marker="o")
    ax.set_xscale("log")
    ax.axhline(GOOD_ACC, ls=":", color="k", lw=0.8, label=f"threshold {GOOD_ACC}")
    ax.set(xlabel="initial weight std (log scale)", ylabel=f"final train accuracy (epoch {s['epochs']})",
           title="final train accuracy vs initial weight std")
    ax.legend()
    summary_png = plots.save(fig, ctx.out / "init_scale_final.png")

    claims = []
    base = "none" if "none" in norms else None
    for n in norms:
        if n == "none" or base is None:
            continue
        d = stats.paired(good[n], good[base])
        claims.append(Claim(
            claim=f"{n.upper()} reduces the dependence on the initial weights",
            source="seed 001 / DLFS fig. 6-19",
            measured=f"stds (of {len(stds)}) reaching final train acc >= {GOOD_ACC}: "
                     f"{n} {stats.estimate(good[n].values()).fmt(1)}, none {stats.estimate(good[base].values()).fmt(1)}; "
                     f"difference {d.fmt(1)} (n = {d.n} seeds)",
            verdict=stats.verdict(d, "better"),
            rule=stats.rule("better", 0.0, what=f"(stds reaching {GOOD_ACC}: {n}) - (none), per seed"),
        ))
        d = stats.paired(auc[n], auc[base])
        claims.append(Claim(
            claim=f"{n.upper()} speeds up training",
            source="seeds 000/001/002",
            measured=f"mean train accuracy over epochs 1..{s['epochs']}, averaged over the {len(stds)} stds: "
                     f"{n} {stats.estimate(auc[n].values()).fmt()} vs none {stats.estimate(auc[base].values()).fmt()}; "
                     f"difference {d.fmt()}",
            verdict=stats.verdict(d, "better"),
            rule=stats.rule("better", 0.0, what=f"(area under the train-accuracy curve: {n}) - (none), per seed"),
        ))
    table_rows = [[f"{sd:.2g}"] + [cell[n, sd].fmt() for n in norms] for sd in stds]
    # headline: final test accuracy at the grid's std nearest He's sqrt(2 / fan_in)
    he = float(np.sqrt(2.0 / s["width"]))
    sd_he = min(stds, key=lambda v: abs(np.log(v / he)))
    accuracy = {n: stats.estimate(stats.per_seed_final(by_meta(results, norm=n, init_std=sd_he), "test_acc").values())
                for n in norms}
    quick_seeds, full_seeds = QUICK["seeds"], DEFAULTS["seeds"]
    return SuiteReport(
        name=NAME,
        title="Initial weight scale",
        summary="Final training accuracy (inference mode, running statistics) after training an MLP from "
                f"initial weights of fixed std, from 1 down to 1e-4; mean ± standard error over {len(seed_list(s))} "
                "seeds, verdicts from differences paired by seed.",
        claims=claims,
        settings=s,
        tables=[("Final train accuracy by init std (mean ± SE over seeds)", ["std"] + norms, table_rows)],
        figures=[(f"Train accuracy per epoch for each init std (DLFS fig. 6-19 layout); {plots.BAND_NOTE}", grid),
                 (f"Final train accuracy vs init std; {plots.BAND_NOTE}", summary_png)],
        notes=list(ctx.notes),
        seconds=time.perf_counter() - t0,
        protocol=protocol(s, quick_seeds, full_seeds),
        accuracy=accuracy,
        accuracy_setting=f"init std {sd_he:.2g} ≈ He",
        reproduce=f"DLFS fig. 6-19 shows, for one run per std on MNIST, BN training at nearly every std and the "
                  f"plain net only near std 0.1. The full profile (`python -m experiments {NAME}`, {full_seeds} "
                  "seeds, same epochs) takes about 1.5x the quick time: under a minute on 2 CPU cores, seconds on "
                  "one GPU; `--dataset mnist --data-dir DIR` runs it on the source's data.",
    )
