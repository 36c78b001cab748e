"""``small-batch``: remedies for BatchNorm's small-batch problem, across batch sizes.

Claims: BN's accuracy falls as the batch shrinks while GroupNorm's stays put, so GN beats BN at
batch 2 and BN is slightly ahead at batch 32 (Wu & He 2018, ResNet-50 ImageNet top-1 error at
batch 32/16/8/4/2: BN 23.6/23.7/24.8/27.3/34.7, GN 24.1/24.2/24.0/24.2/24.1); Batch Renorm
reduces BN's small-batch loss (Ioffe 2017); weight standardization improves GN (Qiao et al.
2019); Filter Response Normalization, which uses no batch statistics, beats BN at small batches
(Singh & Krishnan 2020); ghost batches (statistics per chunk of 8 samples, Hoffer et al. 2017)
generalize at least as well as BN over the whole large batch.

Protocol (:data:`PROTOCOL`): a small CNN, SGD with momentum 0.9, the learning rate scaled
linearly with the batch size (the GN paper's rule, ``lr = base_lr * B / 32``) and the same number
of epochs at every batch size (so every run sees the same samples), BN momentum 0.9 (PyTorch's
0.1), Batch Renorm's r_max 1 -> 3 and d_max 0 -> 5 warm-up with the paper's 5k / 25k / 40k step
proportions mapped onto this run's length (40k -> half the steps). Every verdict is a paired
difference over seeds (same seed: same initial draws and batch order for every normalizer;
:mod:`experiments.stats`). A layer missing from ``normzoo.registry`` is skipped with a note.

Budget: quick (batch 2 and 32, 3 seeds, 4 epochs, 6 normalizers) about a minute on 2 CPU cores;
full (batch 2..64, 5 seeds, 15 epochs) about 15 minutes on 2 CPU cores, 4 on one GPU.
"""
from __future__ import annotations

import time
from typing import Any

import numpy as np

from experiments import plots, stats
from experiments.common import Claim, Context, Job, ProtocolRow, SuiteReport, by_meta, seed_list
from experiments.models import norm_overrides_for
from experiments.train import Run, TrainSpec

NAME = "small-batch"
GHOST = 8
#: label -> (registry name, weight-standardized convolutions)
VARIANTS: dict[str, tuple[str, bool]] = {
    "bn": ("bn", False), "brn": ("brn", False), "ghost-bn": ("bn", False), "gn": ("gn", False),
    "gn+ws": ("gn", True), "frn": ("frn", False),
}
#: Non-inferiority margin of "insensitive" / "at least as well": one percentage point of test
#: accuracy (fixed before any run; the claims name no size).
MARGIN = 0.01
DEFAULTS = dict(
    dataset="digits", train_size=None, model="cnn", width=16, depth=3, activation="relu", optimizer="momentum",
    base_lr=0.05, base_batch=32, batch_sizes=[2, 4, 8, 16, 32, 64], epochs=15, seeds=5, bn_momentum=0.9,
    norms=list(VARIANTS),
)
QUICK = dict(epochs=4, seeds=3, batch_sizes=[2, 32])

PROTOCOL = [
    ("model / data", "ResNet-50 on ImageNet (GN, BRN, WS, FRN papers)", "{depth}-block CNN, width {width}, on {dataset}",
     "CPU budget"),
    ("batch sizes", "32/16/8/4/2 per device (GN paper)", "{batch_sizes}", "quick: the two ends only"),
    ("optimizer", "SGD momentum 0.9 (GN paper)", "SGD momentum 0.9", ""),
    ("learning rate", "0.1 x B / 32: linear scaling with the batch (GN paper)", "{base_lr} x B / {base_batch}", ""),
    ("epochs", "same at every batch size (100 on ImageNet in the GN paper)", "{epochs} at every batch size",
     "CPU budget"),
    ("BN momentum", "0.9 (Caffe2 / PyTorch 0.1)", "{bn_momentum}", ""),
    ("GN groups", "32", "the largest divisor of the channels <= 32 and <= channels / 2", "16-32 channels"),
    ("Batch Renorm", "r_max 1 -> 3, d_max 0 -> 5; warm-up from 5k steps, d_max at 25k, r_max at 40k",
     "same bounds; the steps scaled so 40k = half of the run", "run length"),
    ("ghost BN", "ghost batches of 128 inside large batches (Hoffer et al.)", f"chunks of {GHOST} when B > {GHOST} "
     "(plain BN otherwise)", "small batches"),
    ("weight standardization", "with GN (Qiao et al.)", "WSConv + GN", ""),
    ("FRN", "FRN + TLU replacing BN + ReLU", "FRN + TLU, then the model's ReLU", "one model for every layer"),
    ("seeds", "1", "{seeds}", "paired verdicts need a spread"),
]


def norm_config(label: str, batch: int, steps: int, ctx: Context, bn_momentum: float) -> tuple[str, Any, bool]:
    """``(registry name, overrides, weight_std)`` of variant ``label`` at batch size ``batch``
    for a run of ``steps`` training steps."""
    from normzoo.functional import renorm_warmup

    name, ws = VARIANTS[label]
    base: dict[str, Any] = {}
    if label == "ghost-bn" and batch > GHOST and batch % GHOST == 0:
        base["virtual_batch_size"] = GHOST
    if label == "brn":
        s = max(steps, 16)
        base["r_max"] = renorm_warmup(1.0, 3.0, s // 16, s // 2)
        base["d_max"] = renorm_warmup(0.0, 5.0, s // 16, (5 * s) // 16)
    base.update(ctx.norm_overrides(label))
    return name, norm_overrides_for(name, base, stateful={"momentum": bn_momentum}), ws


def run(ctx: Context) -> SuiteReport:
    t0 = time.perf_counter()
    s = ctx.settings(DEFAULTS, QUICK)
    ctx.write_config(s)
    data = ctx.data(s["dataset"], train_size=s["train_size"])
    ndim = len(data.x_train.shape)
    labels = []
    for label in s["norms"]:
        if label not in VARIANTS:
            ctx.notes.append(f"skipped '{label}': not a variant of this suite ({', '.join(VARIANTS)})")
        elif ctx.available([VARIANTS[label][0]], s["width"], ndim):
            labels.append(label)
    seeds = seed_list(s)
    bss = sorted(s["batch_sizes"])
    jobs = []
    for b in bss:
        steps = s["epochs"] * (len(data.y_train) // b)
        spec = TrainSpec(optimizer=s["optimizer"], batch_size=b, epochs=s["epochs"], init="he")
        lr = s["base_lr"] * b / s["base_batch"]
        for label in labels:
            name, ov, ws = norm_config(label, b, steps, ctx, s["bn_momentum"])
            model = dict(kind=s["model"], width=s["width"], depth=s["depth"], activation=s["activation"], norm=name,
                         norm_overrides=ov)
            if ws:
                model["weight_std"] = True
            jobs.append(Job(name=f"{label} batch {b}", model=model, spec=spec, runs=[Run(seed=x, lr=lr) for x in seeds],
                            meta={"variant": label, "batch_size": b}))
    results = ctx.run_jobs(jobs, data)

    acc = {(v, b): stats.per_seed_final(by_meta(results, variant=v, batch_size=b), "test_acc") for v in labels for b in bss}
    E = lambda d: stats.estimate(d.values())  # noqa: E731
    lo, hi = bss[0], bss[-1]

    def claim(text: str, source: str, a: tuple[str, int], b: tuple[str, int], kind: str = "better",
              margin: float = 0.0) -> Claim:
        d = stats.paired(acc[a], acc[b])
        what = f"test acc({a[0]}, batch {a[1]}) - test acc({b[0]}, batch {b[1]})"
        return Claim(claim=text, source=source,
                     measured=f"{a[0]} @ {a[1]}: {E(acc[a]).pct()} vs {b[0]} @ {b[1]}: {E(acc[b]).pct()}; "
                              f"d = {d.fmt(3)} (n={d.n})",
                     verdict=stats.verdict(d, kind, margin), rule=stats.rule(kind, margin, what))

    claims = []
    have = set(labels)
    if lo < hi:
        if "bn" in have:
            claims.append(claim(f"BN's accuracy drops at small batches (batch {lo} below batch {hi})",
                                "GN paper (Wu & He 2018), table 1", ("bn", hi), ("bn", lo)))
        if "gn" in have:
            claims.append(claim(f"GN is insensitive to the batch size (batch {lo} within {MARGIN:.0%} of batch {hi})",
                                "GN paper, table 1", ("gn", lo), ("gn", hi), "not_worse", MARGIN))
        if {"gn", "bn"} <= have:
            claims.append(claim(f"GN beats BN at batch {lo}", "GN paper (34.7% vs 24.1% error at batch 2)",
                                ("gn", lo), ("bn", lo)))
            claims.append(claim(f"BN is ahead of GN at batch {hi}", "GN paper (23.6% vs 24.1% error at batch 32)",
                                ("bn", hi), ("gn", hi)))
    if {"brn", "bn"} <= have:
        claims.append(claim(f"Batch Renorm beats BN at batch {lo}", "Ioffe 2017 (small / non-i.i.d. minibatches)",
                            ("brn", lo), ("bn", lo)))
    if {"gn+ws", "gn"} <= have:
        claims.append(claim(f"Weight standardization improves GN (batch {lo})", "Qiao et al. 2019",
                            ("gn+ws", lo), ("gn", lo)))
    if {"frn", "bn"} <= have:
        claims.append(claim(f"FRN beats BN at batch {lo}", "Singh & Krishnan 2020", ("frn", lo), ("bn", lo)))
    if {"ghost-bn", "bn"} <= have and hi > GHOST:
        claims.append(claim(f"Ghost BN (chunks of {GHOST}) at batch {hi} generalizes at least as well as BN",
                            "Hoffer et al. 2017", ("ghost-bn", hi), ("bn", hi), "not_worse", MARGIN))

    fig, axes = plots.new_figure(1, 1, size=(6.4, 4.0))
    ax = axes[0][0]
    for v in labels:
        ests = [E(acc[(v, b)]) for b in bss]
        plots.band(ax, bss, [e.mean for e in ests], [e.se if np.isfinite(e.se) else 0.0 for e in ests], v,
                   plots.color(v), marker="o", ms=3)
    ax.set_xscale("log", base=2)
    ax.set_xticks(bss, [str(b) for b in bss])
    ax.set(xlabel="batch size (samples per step; lr scaled linearly)", ylabel="final test accuracy (fraction)",
           title="small-batch remedies")
    ax.legend(fontsize=8)
    png = plots.save(fig, ctx.out / "small_batch.png")
    rows = [[v] + [E(acc[(v, b)]).pct() for b in bss] for v in labels]
    protocol = ProtocolRow.table(PROTOCOL, **s)
    failed = [c.claim for c in claims if c.verdict != stats.SUPPORTED]
    reproduce = ""
    if failed:
        reproduce = ("Not reproduced here: " + "; ".join(failed) + ". The papers measure ResNet-50 on ImageNet "
                     "(100 epochs, 8 devices); this suite trains a small CNN on 8x8 digits. The full profile "
                     "(`python -m experiments small-batch`: batch 2..64, 15 epochs, 5 seeds) takes about 15 minutes "
                     "on 2 CPU cores and about 4 on one GPU; ImageNet scale is beyond it.")
    return SuiteReport(
        name=NAME, title="Small-batch remedies (BN, Batch Renorm, ghost BN, GN, GN + WS, FRN)",
        summary=f"{s['depth']}-block CNN (width {s['width']}) on {s['dataset']}, batch sizes {bss}, SGD momentum 0.9 "
                f"with lr {s['base_lr']} x B / {s['base_batch']}, {s['epochs']} epochs, {len(seeds)} seeds; final "
                "test accuracy (running statistics where the layer keeps them), mean ± standard error over seeds.",
        claims=claims, settings=s,
        tables=[("Final test accuracy by batch size", ["variant"] + [f"batch {b}" for b in bss], rows)],
        figures=[("Final test accuracy against the batch size; " + plots.BAND_NOTE, png)],
        notes=list(ctx.notes), seconds=time.perf_counter() - t0, protocol=protocol,
        accuracy={v: E(acc[(v, lo)]) for v in labels}, accuracy_setting=f"CNN, batch {lo}", reproduce=reproduce,
    )
