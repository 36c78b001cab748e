"""``train-vs-eval``: which statistics to use at inference, after training with small batches.

Claims (seeds 000/003/004; BN paper section 3.1; Wu & Johnson 2021, "Rethinking 'Batch' in
BatchNorm"): BatchNorm normalizes with mini-batch statistics while training, but at inference the
statistics of a test mini-batch would distort the output, so a moving average of the training
batch statistics (momentum ~0.9) is used; population statistics re-estimated after training
with the final weights are more accurate still, and remove the dependence on the EMA momentum;
and they beat a cumulative average kept during training (whose early batches come from stale
weights). This suite also holds the ``population-stats`` comparison (EMA vs recalibration vs
cumulative average).

Compared on the test set after training (the weights are the same for every estimator of a seed:
running statistics never enter a training step, so the EMA momentum and the estimator change
only what inference uses):

* ``running``: the EMA kept in ``batch_stats`` (the standard inference mode), per momentum;
* ``batch-B``: statistics of each test mini-batch of the training batch size B;
* ``batch-full``: statistics of the whole test set as one batch;
* ``precise``: Precise BN, ``normzoo.tools.recalibrate_linen``: the equal-weight average of the
  statistics of every training batch of size B, the weights frozen (Wu & Johnson; PyTorch's
  ``update_bn``);
* ``population``: the same recalibration with the whole training set as one batch (the exact
  training-set statistics under the final weights);
* ``cumulative``: ``BatchNorm(estimator="cumulative")`` trained alongside: the plain average of
  every training batch's statistics, each taken with the weights of its step.

Every verdict is a paired difference over seeds (:mod:`experiments.stats`). Budget: quick (3 seeds,
6 epochs, momenta 0.9 / 0.999 and the cumulative job) about 30 s on 2 CPU cores; full (5 seeds,
15 epochs, momenta 0.9 / 0.99 / 0.999) about a minute and a half on 2 CPU cores.
"""
from __future__ import annotations

import time
from typing import Any

import jax
import numpy as np

from experiments import plots, stats
from experiments.common import Claim, Context, Job, ProtocolRow, SuiteReport, by_meta, cached_model, seed_list
from experiments.data import Dataset
from experiments.models import norm_overrides_for
from experiments.train import Run, TrainSpec, TrainState, evaluate, make_eval_fn, batch_order
from normzoo.tools.recalibrate import recalibrate_linen

NAME = "train-vs-eval"
ESTIMATORS = ("running", "batch-B", "batch-full", "precise", "population")
HEADLINE_MOMENTUM = 0.9
DEFAULTS = dict(
    dataset="digits", train_size=None, model="mlp", width=100, depth=4, activation="relu", optimizer="sgd",
    lr=0.05, batch_size=8, epochs=15, seeds=5, momenta=[0.9, 0.99, 0.999], cumulative=True, norms=["bn"],
)
QUICK = dict(epochs=6, seeds=3, momenta=[0.9, 0.999])

PROTOCOL = [
    ("inference statistics", "BN paper Alg. 2: population mean and m/(m-1)-corrected variance averaged over "
     "training batches after training; seeds / frameworks: EMA (momentum ~0.9)",
     "EMA at momenta {momenta}; precise (average over training batches of {batch_size}); population (one "
     "batch of the whole training set); cumulative", "all of them, to compare; precise uses the biased "
     "per-batch variance (Wu & Johnson, PyTorch), not the paper's m/(m-1)"),
    ("training batch size", "small batches make the estimators differ (Wu & Johnson)", "{batch_size}", ""),
    ("model / data", "not stated by the seeds", "{depth}x{width} {activation} MLP on {dataset}", "CPU budget"),
    ("optimizer", "not stated", "SGD lr {lr}", ""),
    ("training length", "not stated", "{epochs} epochs", "CPU budget (quick)"),
    ("seeds", "not stated", "{seeds}", "paired verdicts need a spread"),
]


def _run_slice(states: TrainState, i: int) -> dict[str, Any]:
    """Variables ``{'params', 'batch_stats'}`` of run ``i`` of a stacked (vmapped) state."""
    take = lambda a: np.asarray(a)[i]  # noqa: E731
    return {"params": jax.tree.map(take, states.params), "batch_stats": jax.tree.map(take, states.batch_stats)}


def make_after(model_kw: dict[str, Any], data: Dataset, batch: int, num_classes: int, seeds: list[int]):
    """The post-training hook: test accuracy of every run under each inference estimator.

    Recalibration runs on the Linen twin of the model (the NNX models hold the same variable tree
    and compute the same numbers), so it serves both ``--api`` values."""
    linen = cached_model(num_classes=num_classes, api="linen", **model_kw)

    def after(states: TrainState) -> list[dict[str, Any]]:
        xt, yt = data.x_test, data.y_test
        chunk = min(512, len(yt))
        _, running = evaluate(make_eval_fn(False), states, xt, yt, chunk)
        _, batch_b = evaluate(make_eval_fn(True), states, xt, yt, batch, drop_remainder=True)
        _, batch_full = evaluate(make_eval_fn(True), states, xt, yt, len(yt), drop_remainder=True)
        out = {"running": running, "batch-B": batch_b, "batch-full": batch_full}
        k = len(running)
        recal: dict[str, list[Any]] = {"precise": [], "population": []}
        for i in range(k):
            v = _run_slice(states, i)
            order = batch_order(seeds[i], 0, len(data.y_train), batch)
            kw = dict(train=True, dropout_rate=0.0)
            recal["precise"].append(recalibrate_linen(linen.apply, v, (data.x_train[idx] for idx in order), **kw))
            recal["population"].append(recalibrate_linen(linen.apply, v, [data.x_train], **kw))
        for name, per_run in recal.items():
            bs = jax.tree.map(lambda *xs: np.stack([np.asarray(x) for x in xs]), *[r["batch_stats"] for r in per_run])
            _, out[name] = evaluate(make_eval_fn(False), states.replace(batch_stats=bs), xt, yt, chunk)
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
    seeds = seed_list(s)
    momenta = list(s["momenta"])
    head_m = HEADLINE_MOMENTUM if HEADLINE_MOMENTUM in momenta else momenta[0]
    jobs = []
    cumulative: dict[str, bool] = {}
    for n in norms:
        variants: list[tuple[Any, dict[str, Any]]] = [(m, {"momentum": m}) for m in momenta]
        cum = norm_overrides_for(n, ctx.norm_overrides(n), stateful={"estimator": "cumulative"})
        cumulative[n] = bool(s["cumulative"]) and dict(cum).get("estimator") == "cumulative"
        if s["cumulative"] and not cumulative[n]:
            ctx.notes.append(f"'{n}' has no estimator='cumulative': cumulative average not measured")
        if cumulative[n]:
            variants.append(("cumulative", {"estimator": "cumulative"}))
        for m, over in variants:
            ov = norm_overrides_for(n, ctx.norm_overrides(n), stateful=over)
            model = dict(kind=s["model"], width=s["width"], depth=s["depth"], activation=s["activation"], norm=n,
                         norm_overrides=ov)
            jobs.append(Job(name=f"{n} {m if m == 'cumulative' else f'momentum={m}'}", model=model, spec=spec,
                            runs=[Run(seed=x, lr=s["lr"]) for x in seeds], meta={"norm": n, "momentum": m},
                            after=make_after(model, data, s["batch_size"], data.num_classes, seeds),
                            hook_id="estimators-v2"))
    results = ctx.run_jobs(jobs, data)

    def est(n: str, m: Any, e: str) -> dict[int, float]:
        return {int(r["run"]["seed"]): float(r["extra"].get(f"test_acc_{e}", np.nan))
                for r in by_meta(results, norm=n, momentum=m)}

    E = lambda d: stats.estimate(d.values())  # noqa: E731

    def claim(text: str, source: str, a: dict[int, float], b: dict[int, float], what: str, measured: str) -> Claim:
        d = stats.paired(a, b)
        return Claim(claim=text, source=source, measured=f"{measured}; d = {d.fmt(3)} (n={d.n})",
                     verdict=stats.verdict(d, "better", 0.0), rule=stats.rule("better", 0.0, what))

    claims, rows, figures, accuracy = [], [], [], {}
    for n in norms:
        table = {m: {e: est(n, m, e) for e in ESTIMATORS} for m in momenta}
        rows += [[n, f"{m:g}"] + [E(table[m][e]).pct() for e in ESTIMATORS] for m in momenta]
        run_h, pre_h = table[head_m]["running"], table[head_m]["precise"]
        accuracy[n] = E(run_h)
        claims.append(claim(
            f"[{n}] inference with test mini-batch statistics is worse than with running averages",
            "seeds 000/003/004", run_h, table[head_m]["batch-B"],
            f"test acc(EMA {head_m:g}) - test acc(test batches of {s['batch_size']})",
            f"test acc: running (momentum {head_m:g}) {E(run_h).pct()} vs test batches of {s['batch_size']} "
            f"{E(table[head_m]['batch-B']).pct()}"))
        claims.append(claim(
            f"[{n}] population statistics re-estimated after training (Precise BN) are more accurate than the EMA",
            "seed 000; BN paper Alg. 2; Wu & Johnson 2021", pre_h, run_h,
            f"test acc(precise) - test acc(EMA {head_m:g})",
            f"test acc: precise {E(pre_h).pct()} vs running (momentum {head_m:g}) {E(run_h).pct()}"))
        if len(momenta) >= 2:
            seeds_ = sorted(set.intersection(*[set(table[m]["running"]) for m in momenta]))
            spread_r = {x: float(np.ptp([table[m]["running"][x] for m in momenta])) for x in seeds_}
            spread_p = {x: float(np.ptp([table[m]["precise"][x] for m in momenta])) for x in seeds_}
            claims.append(claim(
                f"[{n}] the EMA momentum changes inference accuracy; recalibrated statistics remove that dependence",
                "seeds 000/004 (momentum ~0.9)", spread_r, spread_p,
                "range over momenta of test acc(EMA) - the same range for precise",
                f"accuracy range over momenta {momenta}: running {E(spread_r).fmt(3)}, precise {E(spread_p).fmt(3)}"))
        if cumulative[n]:
            cum = est(n, "cumulative", "running")
            rows.append([n, "cumulative", E(cum).pct()] + [""] * (len(ESTIMATORS) - 1))
            claims.append(claim(
                f"[{n}] recalibration with the final weights beats the cumulative average kept during training",
                "Wu & Johnson 2021 (section 3: training-time averages lag the weights)", pre_h, cum,
                "test acc(precise) - test acc(cumulative)",
                f"test acc: precise {E(pre_h).pct()} vs cumulative {E(cum).pct()}"))
        fig, axes = plots.new_figure(1, 1, size=(6.4, 3.8))
        ax = axes[0][0]
        xs = np.arange(len(momenta))
        w = 0.8 / len(ESTIMATORS)
        for j, e in enumerate(ESTIMATORS):
            ests = [E(table[m][e]) for m in momenta]
            ax.bar(xs + (j - (len(ESTIMATORS) - 1) / 2) * w, [v.mean for v in ests], w, label=e,
                   yerr=[2 * v.se if np.isfinite(v.se) else 0.0 for v in ests], capsize=2)
        if cumulative[n]:
            c = E(est(n, "cumulative", "running"))
            ax.axhline(c.mean, color="k", ls="--", lw=1, label="cumulative (training-time average)")
        ax.set_xticks(xs, [f"EMA momentum {m:g}" for m in momenta])
        ax.set(ylabel="test accuracy (fraction)", ylim=(0, 1), title=f"{n}: inference statistics (train batch {s['batch_size']})")
        ax.legend(fontsize=7, loc="lower right")
        figures.append((f"[{n}] test accuracy per inference estimator and EMA momentum; error bars: mean ± 2 "
                        "standard errors over seeds", plots.save(fig, ctx.out / f"train_vs_eval_{n}.png")))
    protocol = ProtocolRow.table(PROTOCOL, **s)
    return SuiteReport(
        name=NAME, title="Training vs inference statistics (population statistics)",
        summary=f"{s['depth']}x{s['width']} MLP trained with batch {s['batch_size']} for {s['epochs']} epochs, "
                f"{len(seeds)} seeds; test accuracy under each inference estimator, mean ± standard error over seeds. "
                "The weights of a seed are the same under every estimator and momentum.",
        claims=claims, settings=s,
        tables=[("Test accuracy by estimator", ["norm", "momentum", *ESTIMATORS], rows)],
        figures=figures, notes=list(ctx.notes), seconds=time.perf_counter() - t0, protocol=protocol,
        accuracy=accuracy, accuracy_setting=f"batch {s['batch_size']}, EMA {head_m:g}",
    )
