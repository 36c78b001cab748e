"""``lr-robustness``: final accuracy vs learning rate for none / BN / LN.

Claims (seeds 002/004; BN paper section 3.3): normalization allows higher learning rates without
divergence and makes training less sensitive to the learning rate. All learning rates x seeds of
one normalizer train in a single vmapped job; a diverged run (non-finite loss) is recorded as
diverged and counts as failed.
"""
from __future__ import annotations

import time

import numpy as np

from experiments import plots
from experiments.common import (
    INCONCLUSIVE, NOT_SUPPORTED, SUPPORTED, Claim, Context, Job, SuiteReport, by_meta, compare, fmt, mean_final,
    seed_list,
)
from experiments.models import norm_overrides_for
from experiments.train import Run, TrainSpec

NAME = "lr-robustness"
GOOD = 0.8
DEFAULTS = dict(
    dataset="digits", train_size=None, model="mlp", width=100, depth=5, activation="relu", optimizer="sgd",
    batch_size=100, epochs=20, seeds=3, lrs=[float(x) for x in np.logspace(-3, 1, 9)], norms=["none", "bn", "ln"],
    bn_momentum=0.9,
)
QUICK = dict(epochs=8, seeds=2)


def run(ctx: Context) -> SuiteReport:
    t0 = time.perf_counter()
    s = ctx.settings(DEFAULTS, QUICK)
    if ctx.options.lr is not None:
        ctx.notes.append("--lr is ignored: this suite sweeps the learning rate")
    ctx.write_config(s)
    data = ctx.data(s["dataset"], train_size=s["train_size"])
    norms = ctx.available(s["norms"], s["width"], 2)
    spec = TrainSpec(optimizer=s["optimizer"], batch_size=s["batch_size"], epochs=s["epochs"], init="he")
    runs = [Run(seed=x, lr=lr) for lr in s["lrs"] for x in seed_list(s)]
    meta = [{"lr": lr} for lr in s["lrs"] for _ in seed_list(s)]
    jobs = []
    for n in norms:
        model = dict(kind=s["model"], width=s["width"], depth=s["depth"], activation=s["activation"], norm=n,
                     norm_overrides=norm_overrides_for(n, ctx.norm_overrides(n), stateful={"momentum": s["bn_momentum"]}))
        jobs.append(Job(name=n, model=model, spec=spec, runs=runs, meta={"norm": n}, run_meta=meta))
    results = ctx.run_jobs(jobs, data)

    lrs = s["lrs"]
    acc = {n: np.array([mean_final(by_meta(results, norm=n, lr=lr), "test_acc") for lr in lrs]) for n in norms}
    div = {n: np.array([np.mean([r["diverged"] for r in by_meta(results, norm=n, lr=lr)]) for lr in lrs]) for n in norms}
    ok = {n: (acc[n] >= GOOD) & (div[n] == 0) for n in norms}
    max_ok = {n: (max(lr for lr, g in zip(lrs, ok[n]) if g) if ok[n].any() else float("nan")) for n in norms}

    fig, axes = plots.new_figure()
    ax = axes[0][0]
    for n in norms:
        ax.semilogx(lrs, acc[n], "o-", label=n, color=plots.color(n))
        bad = div[n] > 0
        ax.semilogx(np.asarray(lrs)[bad], acc[n][bad], "x", color="k", ms=9)
    ax.axhline(GOOD, ls=":", color="k", lw=0.8)
    ax.set(xlabel="learning rate", ylabel="final test accuracy", title="x = diverged (NaN loss)")
    ax.legend()
    png = plots.save(fig, ctx.out / "lr_robustness.png")

    claims = []
    if "none" in norms:
        for n in [m for m in norms if m != "none"]:
            a, b = max_ok[n], max_ok["none"]
            if not np.isfinite(a):
                v = NOT_SUPPORTED
            elif not np.isfinite(b) or a > b:
                v = SUPPORTED
            elif a == b:
                v = INCONCLUSIVE if a == max(lrs) else NOT_SUPPORTED
            else:
                v = NOT_SUPPORTED
            claims.append(Claim(
                claim=f"{n.upper()} allows higher learning rates",
                source="seeds 002/004; BN paper 3.3",
                measured=f"largest lr with test acc >= {GOOD} and no divergence: {n} {a:g} vs none {b:g}",
                verdict=v,
                rule="supported if larger; inconclusive if both reach the top of the grid; otherwise not supported",
            ))
            claims.append(Claim(
                claim=f"{n.upper()} makes training less sensitive to the learning rate",
                source="seeds 001/004",
                measured=f"learning rates (of {len(lrs)}) reaching {GOOD}: {n} {int(ok[n].sum())} vs none {int(ok['none'].sum())}",
                verdict=compare(int(ok[n].sum()) - int(ok["none"].sum()), 2),
                rule="supported if >= 2 more learning rates succeed; not supported if not more",
            ))
    rows = [[f"{lr:g}"] + [fmt(acc[n][i]) + (" (diverged)" if div[n][i] > 0 else "") for n in norms]
            for i, lr in enumerate(lrs)]
    return SuiteReport(
        name=NAME, title="Learning-rate robustness",
        summary=f"{s['depth']}x{s['width']} {s['activation']} MLP, {s['optimizer']}, batch {s['batch_size']}, "
                f"{s['epochs']} epochs; final test accuracy per learning rate, mean over seeds.",
        claims=claims, settings=s,
        tables=[("Final test accuracy by learning rate", ["lr"] + norms, rows)],
        figures=[("Final test accuracy vs learning rate", png)], notes=list(ctx.notes),
        seconds=time.perf_counter() - t0,
    )
