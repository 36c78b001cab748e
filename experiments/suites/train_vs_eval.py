"""``train-vs-eval``: which statistics to use at inference, after training with small batches.

Claims (seeds 000/003/004; BN paper 3.1): BatchNorm computes mini-batch statistics while training,
but at inference the statistics of a test mini-batch would distort the output, so an exponential
moving average of the training batch statistics (momentum ~0.9) is used; statistics re-estimated
over the whole training set after training ("population" statistics) are more accurate still.

Compared on the test set after training, for several EMA momenta:

* ``running``: the EMA kept in ``batch_stats`` (the standard inference mode);
* ``batch-B``: statistics of each test mini-batch of the training batch size B;
* ``batch-full``: statistics of the whole test set as one batch;
* ``population``: statistics re-estimated over the training set with the trained weights (the
  model is rebuilt with momentum 0, so one pass in training mode stores the exact batch moments).
"""
from __future__ import annotations

import time
from typing import Any

import jax
import numpy as np

from experiments import plots
from experiments.common import (
    INCONCLUSIVE, NOT_SUPPORTED, SUPPORTED, Claim, Context, Job, SuiteReport, by_meta, compare, fmt, cached_model,
    seed_list,
)
from experiments.data import Dataset
from experiments.models import norm_overrides_for
from experiments.train import Run, TrainSpec, TrainState, evaluate, make_eval_fn

NAME = "train-vs-eval"
ESTIMATORS = ("running", "batch-B", "batch-full", "population")
POP_CHUNK = 4096
DEFAULTS = dict(
    dataset="digits", train_size=None, model="mlp", width=100, depth=4, activation="relu", optimizer="sgd",
    lr=0.05, batch_size=8, epochs=15, seeds=3, momenta=[0.9, 0.99, 0.999], norms=["bn"],
)
QUICK = dict(epochs=4, seeds=2, momenta=[0.9, 0.999])


def make_after(model_kw: dict[str, Any], pop_overrides: Any, data: Dataset, batch: int, num_classes: int,
               api: str = "linen"):
    """The post-training hook: test accuracy of every run under each inference estimator."""

    def after(states: TrainState) -> list[dict[str, Any]]:
        xt, yt = data.x_test, data.y_test
        _, running = evaluate(make_eval_fn(False), states, xt, yt, min(512, len(yt)))
        _, batch_b = evaluate(make_eval_fn(True), states, xt, yt, batch, drop_remainder=True)
        _, batch_full = evaluate(make_eval_fn(True), states, xt, yt, len(yt), drop_remainder=True)
        out = {"running": running, "batch-B": batch_b, "batch-full": batch_full}
        if pop_overrides is not None:
            pop_model = cached_model(num_classes=num_classes, api=api, **{**model_kw, "norm_overrides": pop_overrides})

            def estimate(state: TrainState, x: jax.Array) -> Any:
                _, upd = pop_model.apply({"params": state.params, "batch_stats": state.batch_stats}, x, train=True,
                                         dropout_rate=0.0, rngs={"dropout": state.dropout_key}, mutable=["batch_stats"])
                return upd["batch_stats"]

            n = len(data.y_train)
            size = n if n <= POP_CHUNK else POP_CHUNK  # equal chunks; the remainder is left out
            fn = jax.jit(jax.vmap(estimate, in_axes=(0, None)))
            parts = [fn(states, data.x_train[i : i + size]) for i in range(0, n - size + 1, size)]
            stats = jax.tree_util.tree_map(lambda *xs: sum(xs) / len(xs), *parts)
            _, out["population"] = evaluate(make_eval_fn(False), states.replace(batch_stats=stats), xt, yt,
                                            min(512, len(yt)))
        k = len(running)
        return [{f"test_acc_{e}": float(v[i]) for e, v in out.items()} for i in range(k)]

    return after


def run(ctx: Context) -> SuiteReport:
    t0 = time.perf_counter()
    s = ctx.settings(DEFAULTS, QUICK)
    ctx.write_config(s)
    data = ctx.data(s["dataset"], train_size=s["train_size"])
    norms = ctx.available(s["norms"], s["width"], 2)
    from normzoo import registry

    stateless = [n for n in norms if not registry.is_stateful(n)]
    for n in stateless:
        ctx.notes.append(f"'{n}' keeps no running statistics: all estimators coincide; skipped")
    norms = [n for n in norms if n not in stateless]
    spec = TrainSpec(optimizer=s["optimizer"], batch_size=s["batch_size"], epochs=s["epochs"], init="he")
    jobs = []
    for n in norms:
        pop = norm_overrides_for(n, ctx.norm_overrides(n), stateful={"momentum": 0.0})
        if "momentum" not in dict(pop):
            ctx.notes.append(f"'{n}' has no momentum field: population statistics not estimated")
            pop = None
        for m in s["momenta"]:
            ov = norm_overrides_for(n, ctx.norm_overrides(n), stateful={"momentum": m})
            model = dict(kind=s["model"], width=s["width"], depth=s["depth"], activation=s["activation"], norm=n,
                         norm_overrides=ov)
            jobs.append(Job(name=f"{n} momentum={m}", model=model, spec=spec,
                            runs=[Run(seed=x, lr=s["lr"]) for x in seed_list(s)], meta={"norm": n, "momentum": m},
                            after=make_after(model, pop, data, s["batch_size"], data.num_classes, ctx.options.api),
                            hook_id="estimators-v1"))
    results = ctx.run_jobs(jobs, data)

    def est(n: str, m: float, e: str) -> float:
        vals = [r["extra"].get(f"test_acc_{e}", np.nan) for r in by_meta(results, norm=n, momentum=m)]
        return float(np.mean(vals)) if vals else float("nan")

    claims, rows, figures = [], [], []
    for n in norms:
        table = {m: {e: est(n, m, e) for e in ESTIMATORS} for m in s["momenta"]}
        rows += [[n, f"{m:g}"] + [fmt(table[m][e]) for e in ESTIMATORS] for m in s["momenta"]]
        mean = {e: float(np.nanmean([table[m][e] for m in s["momenta"]])) for e in ESTIMATORS}
        claims.append(Claim(
            claim=f"[{n}] inference with test mini-batch statistics is worse than with running averages",
            source="seeds 000/003/004",
            measured=f"test acc (mean over momenta): running {fmt(mean['running'])} vs test batches of "
                     f"{s['batch_size']} {fmt(mean['batch-B'])}",
            verdict=compare(mean["running"] - mean["batch-B"], 0.01),
            rule="supported if running is higher by >= 0.01; not supported if not higher",
        ))
        if np.isfinite(mean["population"]):
            d = mean["population"] - mean["running"]
            v = SUPPORTED if d >= 0.005 else (NOT_SUPPORTED if d <= -0.005 else INCONCLUSIVE)
            claims.append(Claim(
                claim=f"[{n}] population statistics re-estimated after training are more accurate than the EMA",
                source="seed 000",
                measured=f"test acc (mean over momenta): population {fmt(mean['population'])} vs running "
                         f"{fmt(mean['running'])}",
                verdict=v,
                rule="supported if higher by >= 0.005; not supported if lower by >= 0.005; inconclusive in between",
            ))
            if len(s["momenta"]) >= 2:
                spread_r = np.ptp([table[m]["running"] for m in s["momenta"]])
                spread_p = np.ptp([table[m]["population"] for m in s["momenta"]])
                claims.append(Claim(
                    claim=f"[{n}] the EMA momentum changes inference accuracy; population statistics remove "
                          "that dependence",
                    source="seeds 000/004 (momentum ~0.9)",
                    measured=f"accuracy spread over momenta {s['momenta']}: running {fmt(spread_r)}, "
                             f"population {fmt(spread_p)}",
                    verdict=compare(float(spread_r - spread_p), 0.01),
                    rule="supported if the running spread exceeds the population spread by >= 0.01; not supported "
                         "if it does not exceed it",
                ))
        fig, axes = plots.new_figure(1, 1, size=(6.0, 3.6))
        ax = axes[0][0]
        xs = np.arange(len(s["momenta"]))
        for j, e in enumerate(ESTIMATORS):
            ax.bar(xs + (j - 1.5) * 0.2, [table[m][e] for m in s["momenta"]], 0.2, label=e)
        ax.set_xticks(xs, [f"momentum {m:g}" for m in s["momenta"]])
        ax.set(ylabel="test accuracy", ylim=(0, 1), title=f"{n}: inference statistics (train batch {s['batch_size']})")
        ax.legend(fontsize=8, loc="lower right")
        figures.append((f"[{n}] test accuracy per inference estimator and EMA momentum",
                        plots.save(fig, ctx.out / f"train_vs_eval_{n}.png")))
    return SuiteReport(
        name=NAME, title="Training vs inference statistics",
        summary=f"{s['depth']}x{s['width']} MLP trained with batch {s['batch_size']} for {s['epochs']} epochs; "
                "test accuracy under each inference estimator, mean over seeds.",
        claims=claims, settings=s,
        tables=[("Test accuracy by estimator", ["norm", "momentum", *ESTIMATORS], rows)],
        figures=figures, notes=list(ctx.notes), seconds=time.perf_counter() - t0,
    )
