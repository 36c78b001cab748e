"""``no-norm``: Dynamic Tanh vs LayerNorm vs RMSNorm vs no normalization in a pre-LN transformer.

Claims: DyT, ``g * tanh(alpha x) + b`` with a learned scalar alpha, matches LayerNorm in
transformers (Zhu, Chen, He, LeCun & Liu, CVPR 2025, "Transformers without Normalization");
RMSNorm, LayerNorm without centering, matches LayerNorm (Zhang & Sennrich 2019); and
normalization (LayerNorm) beats none in a pre-norm transformer.

Protocol (:data:`PROTOCOL`): the small pre-LN transformer of :class:`experiments.models.Transformer`
over mnist1d's 40-step sequences (patches of 4 -> 10 tokens, width 32, 2 blocks), AdamW (the
DyT paper's optimizer) at one fixed learning rate for every normalizer, DyT's alpha initialised
at 0.5 (the paper's value outside LLMs). Every verdict is a paired difference over seeds (same
seed: same initial draws and batch order; :mod:`experiments.stats`). A layer missing from
``normzoo.registry`` is skipped with a note.

Budget: quick (3 seeds, 15 epochs) about 45 s on 2 CPU cores; full (5 seeds, 60 epochs) about
3 minutes on 2 CPU cores, 1 on one GPU.
"""
from __future__ import annotations

import time

import numpy as np

from experiments import plots, stats
from experiments.common import Claim, Context, Job, ProtocolRow, SuiteReport, by_meta, seed_list
from experiments.models import norm_overrides_for
from experiments.train import Run, TrainSpec

NAME = "no-norm"
#: Non-inferiority margin of "matches": one percentage point of test accuracy (fixed before any
#: run; the claims name no size).
MARGIN = 0.01
DEFAULTS = dict(
    dataset="mnist1d", train_size=None, model="transformer", width=32, depth=2, optimizer="adamw", lr=3e-3,
    weight_decay=0.01, batch_size=64, epochs=60, seeds=5, norms=["ln", "rms", "dyt", "none"],
)
QUICK = dict(epochs=15, seeds=3)

PROTOCOL = [
    ("model", "ViT / DiT / LLaMA (DyT paper); pre-LN transformers", "pre-LN transformer, {depth} blocks, width "
     "{width}, 4 heads, 10 tokens of 4 steps", "CPU budget"),
    ("data", "ImageNet, language corpora", "{dataset} (offline; 40-step sequences)", "offline, CPU budget"),
    ("optimizer", "AdamW", "AdamW lr {lr}, weight decay {weight_decay}, batch {batch_size}", "no schedule"),
    ("learning rate", "the baseline's (LayerNorm) recipe, unchanged for DyT", "one value for every normalizer", ""),
    ("DyT alpha init", "0.5 (outside LLMs)", "0.5", ""),
    ("training length", "hundreds of epochs", "{epochs} epochs", "CPU budget"),
    ("initialization", "truncated normal / Xavier", "Xavier (sqrt(1 / fan_in))", ""),
    ("seeds", "1", "{seeds}", "paired verdicts need a spread"),
]


def run(ctx: Context) -> SuiteReport:
    t0 = time.perf_counter()
    s = ctx.settings(DEFAULTS, QUICK)
    ctx.write_config(s)
    data = ctx.data(s["dataset"], train_size=s["train_size"])
    norms = ctx.available(s["norms"], s["width"], 2)
    spec = TrainSpec(optimizer=s["optimizer"], batch_size=s["batch_size"], epochs=s["epochs"], init="xavier")
    seeds = seed_list(s)
    jobs = []
    for n in norms:
        model = dict(kind=s["model"], width=s["width"], depth=s["depth"], norm=n,
                     norm_overrides=norm_overrides_for(n, ctx.norm_overrides(n)))
        jobs.append(Job(name=n, model=model, spec=spec,
                        runs=[Run(seed=x, lr=s["lr"], weight_decay=s["weight_decay"]) for x in seeds],
                        meta={"norm": n}))
    results = ctx.run_jobs(jobs, data)

    recs = {n: by_meta(results, norm=n) for n in norms}
    acc = {n: stats.per_seed_final(recs[n], "test_acc") for n in norms}
    loss = {n: stats.per_seed_final(recs[n], "train_loss") for n in norms}
    E = lambda d: stats.estimate(d.values())  # noqa: E731

    def claim(text: str, source: str, a: str, b: str, kind: str, margin: float) -> Claim:
        d = stats.paired(acc[a], acc[b])
        return Claim(claim=text, source=source,
                     measured=f"test acc {a} {E(acc[a]).pct()} vs {b} {E(acc[b]).pct()}; d = {d.fmt(3)} (n={d.n})",
                     verdict=stats.verdict(d, kind, margin), rule=stats.rule(kind, margin, f"test acc({a}) - test acc({b})"))

    claims = []
    if "ln" in norms:
        if "dyt" in norms:
            claims.append(claim(f"DyT matches LayerNorm (within {MARGIN:.0%})", "Zhu et al. CVPR 2025", "dyt", "ln",
                                "not_worse", MARGIN))
        if "rms" in norms:
            claims.append(claim(f"RMSNorm matches LayerNorm (within {MARGIN:.0%})", "Zhang & Sennrich 2019", "rms",
                                "ln", "not_worse", MARGIN))
        if "none" in norms:
            claims.append(claim("LayerNorm beats no normalization in a pre-LN transformer",
                                "Zhu et al. CVPR 2025 (the baseline they replace)", "ln", "none", "better", 0.0))

    fig, axes = plots.new_figure(1, 2, size=(5.0, 3.8))
    for n in norms:
        for ax, key in ((axes[0][0], "train_loss"), (axes[0][1], "test_acc")):
            mean, se = stats.curve_band(recs[n], key)
            start = 1 if key == "train_loss" else 0
            plots.band(ax, np.arange(len(mean))[start:], mean[start:], se[start:], n, plots.color(n))
    axes[0][0].set(xlabel="epoch", ylabel="training loss (cross entropy, mean over the epoch)", yscale="log")
    axes[0][1].set(xlabel="epoch", ylabel="test accuracy (fraction)")
    for ax in axes[0]:
        ax.legend(fontsize=8)
    png = plots.save(fig, ctx.out / "no_norm.png")
    rows = [[n, E(loss[n]).fmt(), E(acc[n]).pct(), f"{sum(r['diverged'] for r in recs[n])}/{len(recs[n])}"]
            for n in norms]
    protocol = ProtocolRow.table(PROTOCOL, **s)
    failed = [c.claim for c in claims if c.verdict != stats.SUPPORTED]
    reproduce = ""
    if failed:
        reproduce = ("Not reproduced here: " + "; ".join(failed) + ". The DyT paper measures ViT / ConvNeXt on "
                     "ImageNet and LLaMA pretraining; this suite trains a 2-block transformer on mnist1d. The full "
                     "profile (`python -m experiments no-norm`: 60 epochs, 5 seeds) takes about 3 minutes on 2 CPU "
                     "cores and about 1 on one GPU.")
    return SuiteReport(
        name=NAME, title="Normalization-free transformers (DyT vs LayerNorm vs RMSNorm vs none)",
        summary=f"pre-LN transformer ({s['depth']} blocks, width {s['width']}) on {s['dataset']}, AdamW lr {s['lr']}, "
                f"batch {s['batch_size']}, {s['epochs']} epochs, {len(seeds)} seeds; mean ± standard error over seeds.",
        claims=claims, settings=s,
        tables=[("Per normalizer", ["norm", "final train loss", "final test acc", "diverged"], rows)],
        figures=[("Training loss and test accuracy per epoch; " + plots.BAND_NOTE, png)],
        notes=list(ctx.notes), seconds=time.perf_counter() - t0, protocol=protocol,
        accuracy={n: E(acc[n]) for n in norms}, accuracy_setting="transformer, mnist1d", reproduce=reproduce,
    )
