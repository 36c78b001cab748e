"""``overfitting``: a deep MLP on a small training set; none vs weight decay vs dropout vs BN.

Claims (seed 001, DLFS ch. 6.4; seeds 000/002/004 on BN): with 300 training samples a 7-layer net
overfits (train accuracy far above test); L2 weight decay (lambda = 0.1) and dropout (ratio 0.2;
0.15 in the seminar slides) narrow the train-test gap; BN regularizes, but only a little.
Published setting: 300 MNIST samples, 6 hidden x 100 ReLU, He init, SGD lr 0.01, batch 100,
~200 epochs. Baseline, weight decay and dropout runs share one vmapped job.
"""
from __future__ import annotations

import time

from experiments import plots
from experiments.common import (
    Claim, Context, Job, SuiteReport, by_meta, compare, fmt, mean_curve, mean_final, seed_list,
)
from experiments.models import norm_overrides_for
from experiments.train import Run, TrainSpec

NAME = "overfitting"
DEFAULTS = dict(
    dataset="digits", train_size=300, model="mlp", width=100, depth=6, activation="relu", optimizer="sgd",
    lr=0.01, batch_size=100, epochs=200, seeds=3, weight_decay=0.1, dropout=0.2, norms=["bn"],
)
QUICK = dict(epochs=100, seeds=2)


def run(ctx: Context) -> SuiteReport:
    t0 = time.perf_counter()
    s = ctx.settings(DEFAULTS, QUICK)
    ctx.write_config(s)
    # no selection happens here, so the whole pool trains (val_fraction=0), as in DLFS
    data = ctx.data(s["dataset"], train_size=s["train_size"], val_fraction=0.0)
    spec = TrainSpec(optimizer=s["optimizer"], batch_size=s["batch_size"], epochs=s["epochs"], init="he")
    model = dict(kind=s["model"], width=s["width"], depth=s["depth"], activation=s["activation"], dropout=True)
    seeds = seed_list(s)
    variants = {
        "none": dict(weight_decay=0.0, dropout=0.0),
        f"weight decay {s['weight_decay']}": dict(weight_decay=s["weight_decay"], dropout=0.0),
        f"dropout {s['dropout']}": dict(weight_decay=0.0, dropout=s["dropout"]),
    }
    runs, meta = [], []
    for label, kw in variants.items():
        for seed in seeds:
            runs.append(Run(seed=seed, lr=s["lr"], **kw))
            meta.append({"config": label})
    jobs = [Job(name="none/wd/dropout", model={**model, "norm": "none"}, spec=spec, runs=runs, meta={"norm": "none"},
                run_meta=meta)]
    norms = [n for n in ctx.available(s["norms"], s["width"], 2) if n != "none"]
    for n in norms:
        ov = norm_overrides_for(n, ctx.norm_overrides(n))
        jobs.append(Job(name=n, model={**model, "norm": n, "norm_overrides": ov}, spec=spec,
                        runs=[Run(seed=seed, lr=s["lr"]) for seed in seeds], meta={"norm": n, "config": n}))
    results = ctx.run_jobs(jobs, data)

    labels = list(variants) + norms
    recs = {lab: by_meta(results, config=lab) for lab in labels}
    tr = {lab: mean_final(r, "train_acc") for lab, r in recs.items()}
    te = {lab: mean_final(r, "test_acc") for lab, r in recs.items()}
    gap = {lab: tr[lab] - te[lab] for lab in labels}

    fig, axes = plots.new_figure(1, len(labels), size=(3.2, 3.0), sharey=True)
    for ax, lab in zip(axes[0], labels):
        ax.plot(mean_curve(recs[lab], "train_acc"), label="train")
        ax.plot(mean_curve(recs[lab], "test_acc"), label="test")
        ax.set_title(lab, fontsize=10)
        ax.set_xlabel("epoch")
    axes[0][0].set_ylabel("accuracy")
    axes[0][0].legend()
    png = plots.save(fig, ctx.out / "overfitting_curves.png")

    base = "none"
    claims = [Claim(
        claim="A deep MLP trained on a few hundred samples overfits (train accuracy well above test)",
        source="seed 001 (DLFS 6.4.1)",
        measured=f"none: train {fmt(tr[base])}, test {fmt(te[base])}, gap {fmt(gap[base])}",
        verdict=compare(gap[base], 0.05),
        rule="supported if the gap >= 0.05; not supported if <= 0",
    )]
    for lab, what, src in ((list(variants)[1], "Weight decay", "seed 001 (DLFS 6.4.2)"),
                           (list(variants)[2], "Dropout", "seed 001 (DLFS 6.4.3)")):
        claims.append(Claim(
            claim=f"{what} narrows the train-test gap",
            source=src,
            measured=f"gap {fmt(gap[lab])} vs none {fmt(gap[base])} (test acc {fmt(te[lab])} vs {fmt(te[base])})",
            verdict=compare(gap[base] - gap[lab], 0.02),
            rule="supported if the gap shrinks by >= 0.02; not supported if it does not shrink",
        ))
    for n in norms:
        d = gap[base] - gap[n]
        claims.append(Claim(
            claim=f"{n.upper()} regularizes a little (a smaller train-test gap, less than dropout's effect)",
            source="seeds 000/002/004",
            measured=f"gap {fmt(gap[n])} vs none {fmt(gap[base])} (test acc {fmt(te[n])} vs {fmt(te[base])})",
            verdict=compare(d, 0.005),
            rule="supported if the gap shrinks by >= 0.005; not supported if it does not shrink",
        ))
    rows = [[lab, fmt(tr[lab]), fmt(te[lab]), fmt(gap[lab])] for lab in labels]
    return SuiteReport(
        name=NAME, title="Overfitting and regularization",
        summary=f"{s['depth']}x{s['width']} ReLU MLP trained on {len(data.y_train)} samples for {s['epochs']} epochs; "
                "final train and test accuracy (inference mode), mean over seeds.",
        claims=claims, settings=s,
        tables=[("Final accuracies", ["config", "train acc", "test acc", "gap"], rows)],
        figures=[("Train vs test accuracy per epoch", png)], notes=list(ctx.notes),
        seconds=time.perf_counter() - t0,
    )


