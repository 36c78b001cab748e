"""``placement``: normalization before vs after the activation, with and without scale and shift.

Claims (seeds 000/002/004): the BN paper put BN before the nonlinearity; more recent practice
puts it after the activation and reports better accuracy; the learned scale gamma and shift beta
are needed when normalizing right before a sigmoid (whose normalized input would sit in its
near-linear region), while after the activation BN can be used with gamma = 1, beta = 0.

"Without scale and shift" freezes the normalizer's own parameters at their initial values
(gamma = 1, beta = 0) through a per-run flag, so both variants train in one vmapped job and the
suite works for any registry normalizer, whatever its constructor fields.
"""
from __future__ import annotations

import time

import numpy as np

from experiments import plots
from experiments.common import Claim, Context, Job, SuiteReport, by_meta, compare, fmt, mean_final, seed_list
from experiments.models import norm_overrides_for
from experiments.train import Run, TrainSpec

NAME = "placement"
DEFAULTS = dict(
    dataset="digits", train_size=None, model="mlp", width=100, depth=4, optimizer="sgd", lr=0.1,
    batch_size=64, epochs=20, seeds=3, norms=["bn"], activations=["relu", "sigmoid"], bn_momentum=0.9,
)
QUICK = dict(epochs=8, seeds=2)


def run(ctx: Context) -> SuiteReport:
    t0 = time.perf_counter()
    s = ctx.settings(DEFAULTS, QUICK)
    ctx.write_config(s)
    data = ctx.data(s["dataset"], train_size=s["train_size"])
    norms = [n for n in ctx.available(s["norms"], s["width"], 2) if n != "none"]
    spec = TrainSpec(optimizer=s["optimizer"], batch_size=s["batch_size"], epochs=s["epochs"], init="he")
    seeds = seed_list(s)
    runs = [Run(seed=x, lr=s["lr"], affine=a) for a in (1.0, 0.0) for x in seeds]
    meta = [{"affine": bool(a)} for a in (1.0, 0.0) for _ in seeds]
    jobs = []
    for n in norms:
        ov = norm_overrides_for(n, ctx.norm_overrides(n), stateful={"momentum": s["bn_momentum"]})
        for act in s["activations"]:
            for pos in ("before", "after"):
                model = dict(kind=s["model"], width=s["width"], depth=s["depth"], activation=act, norm=n,
                             norm_overrides=ov, norm_position=pos)
                jobs.append(Job(name=f"{n} {pos} {act}", model=model, spec=spec, runs=runs,
                                meta={"norm": n, "activation": act, "position": pos}, run_meta=meta))
    results = ctx.run_jobs(jobs, data)

    def acc(n: str, act: str, pos: str, affine: bool) -> float:
        return mean_final(by_meta(results, norm=n, activation=act, position=pos, affine=affine), "test_acc")

    claims, rows = [], []
    for n in norms:
        for act in s["activations"]:
            for pos in ("before", "after"):
                rows.append([n, act, pos, fmt(acc(n, act, pos, True)), fmt(acc(n, act, pos, False))])
        if "relu" in s["activations"]:
            a, b = acc(n, "relu", "after", True), acc(n, "relu", "before", True)
            claims.append(Claim(
                claim=f"{n.upper()} after the activation beats {n.upper()} before it (ReLU)",
                source="seeds 000/002",
                measured=f"test acc after {fmt(a)} vs before {fmt(b)}",
                verdict=compare(a - b, 0.01),
                rule="supported if higher by >= 0.01; not supported if not higher",
            ))
            w, wo = acc(n, "relu", "after", True), acc(n, "relu", "after", False)
            claims.append(Claim(
                claim=f"After the activation, {n.upper()} works without scale and shift (gamma=1, beta=0)",
                source="seed 000",
                measured=f"test acc without {fmt(wo)} vs with {fmt(w)}",
                verdict=compare(wo - w + 0.01, 0.01),
                rule="supported if the frozen version is no worse (within 0.01 counts as no worse); "
                     "not supported if worse by >= 0.01",
            ))
        if "sigmoid" in s["activations"]:
            w, wo = acc(n, "sigmoid", "before", True), acc(n, "sigmoid", "before", False)
            claims.append(Claim(
                claim=f"Before a sigmoid, {n.upper()} needs its scale and shift",
                source="seeds 000/004 (normalized sigmoid inputs stay in the linear region)",
                measured=f"test acc with gamma/beta {fmt(w)} vs frozen {fmt(wo)}",
                verdict=compare(w - wo, 0.01),
                rule="supported if higher by >= 0.01 with them; not supported if not higher",
            ))
    fig, axes = plots.new_figure(1, 1, size=(7.0, 3.6))
    ax = axes[0][0]
    labels = [f"{r[0]} {r[2]}\n{r[1]}" for r in rows]
    xs = np.arange(len(rows))
    ax.bar(xs - 0.2, [float(r[3]) for r in rows], 0.4, label="with scale & shift")
    ax.bar(xs + 0.2, [float(r[4]) for r in rows], 0.4, label="gamma=1, beta=0 frozen")
    ax.set_xticks(xs, labels, fontsize=8)
    ax.set(ylabel="final test accuracy", ylim=(0, 1))
    ax.legend(fontsize=8)
    png = plots.save(fig, ctx.out / "placement.png")
    return SuiteReport(
        name=NAME, title="Placement and scale/shift",
        summary=f"{s['depth']}x{s['width']} MLP, SGD lr {s['lr']}, batch {s['batch_size']}, {s['epochs']} epochs; "
                "final test accuracy (running statistics), mean over seeds.",
        claims=claims, settings=s,
        tables=[("Test accuracy", ["norm", "activation", "position", "with scale & shift", "frozen"], rows)],
        figures=[("Final test accuracy per placement", png)], notes=list(ctx.notes),
        seconds=time.perf_counter() - t0,
    )
