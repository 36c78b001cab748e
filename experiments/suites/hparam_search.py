"""``hparam-search``: random search of learning rate and weight decay on a log scale.

Claims (seed 001, DLFS 6.5): hyper-parameters are chosen on a validation split (20% of the
training data), never on the test set; sampling on a log scale and keeping the best trials
narrows the range; the good region reported is lr 1e-3..1e-2 and weight decay 1e-8..1e-6.

Source protocol (DLFS ``ch06/hyperparameter_optimization.py``): 500 MNIST samples, 20%
validation, 6 hidden x 100 ReLU, SGD, batch 100, 100 trials of lr = 10^U(-6, -2) and weight decay
= 10^U(-8, -4), 50 epochs each; the best 20 (by validation accuracy) plotted; one search.
Used here: 500 digits samples, the same split, network, ranges and selection; the search is
repeated with independent draws (search seeds: 3 with ``--quick``, 5 in full), so "the top
trials are enriched in the range" is judged across searches, paired within each search against
the fraction of all its trials that fall in the range. Quick: 50 trials x 30 epochs per search;
full: the source's 100 x 50. All trials of all searches of one normalizer train in one vmapped
job; full takes about 6x the quick time.
"""
from __future__ import annotations

import time
from typing import Any

import numpy as np

from experiments import plots, stats
from experiments.common import Claim, Context, Job, ProtocolRow, SuiteReport, by_meta, fmt
from experiments.models import norm_overrides_for
from experiments.train import Run, TrainSpec

NAME = "hparam-search"
LR_GOOD, WD_GOOD = (1e-3, 1e-2), (1e-8, 1e-6)  # DLFS's reported good region
DEFAULTS = dict(
    dataset="digits", train_size=500, model="mlp", width=100, depth=6, activation="relu", optimizer="sgd",
    batch_size=100, epochs=50, trials=100, searches=5, lr_range=[-6.0, -2.0], wd_range=[-8.0, -4.0], search_seed=0,
    top_fraction=0.2, norms=["none"],
)
QUICK = dict(epochs=30, trials=50, searches=3)


def protocol(s: dict[str, Any]) -> list[ProtocolRow]:
    return [
        ProtocolRow("data", "500 MNIST samples, 20% validation; test never used to select",
                    f"{s['train_size']} digits samples, 20% validation; test reported, never used to select",
                    "offline data (--dataset mnist --data-dir DIR follows the source)"),
        ProtocolRow("model / optimizer", "6 hidden x 100 ReLU, SGD, batch 100",
                    f"{s['depth']} hidden x {s['width']} {s['activation']}, {s['optimizer']}, batch {s['batch_size']}", ""),
        ProtocolRow("search space", "lr = 10^U(-6, -2), wd = 10^U(-8, -4)",
                    f"lr = 10^U{tuple(s['lr_range'])}, wd = 10^U{tuple(s['wd_range'])}", ""),
        ProtocolRow("trials x epochs", "100 x 50", f"{QUICK['trials']} x {QUICK['epochs']} (quick), "
                    f"{DEFAULTS['trials']} x {DEFAULTS['epochs']} (full)", "quick budget"),
        ProtocolRow("top trials", "best 20 of 100 (20%)", f"best {s['top_fraction']:.0%}", ""),
        ProtocolRow("searches", "1", f"{QUICK['searches']} independent searches (quick), {DEFAULTS['searches']} (full)",
                    "a spread across searches for the verdicts"),
    ]


def run(ctx: Context) -> SuiteReport:
    t0 = time.perf_counter()
    s = ctx.settings(DEFAULTS, QUICK)
    ctx.write_config(s)
    data = ctx.data(s["dataset"], train_size=s["train_size"], val_fraction=0.2)
    trials, searches = s["trials"], list(range(s["searches"]))
    lrs, wds = {}, {}
    for q in searches:
        rng = np.random.default_rng(s["search_seed"] + q)
        lrs[q] = 10.0 ** rng.uniform(*s["lr_range"], size=trials)
        wds[q] = 10.0 ** rng.uniform(*s["wd_range"], size=trials)
    spec = TrainSpec(optimizer=s["optimizer"], batch_size=s["batch_size"], epochs=s["epochs"], init="he")
    runs = [Run(seed=q * trials + i, lr=float(lrs[q][i]), weight_decay=float(wds[q][i]))
            for q in searches for i in range(trials)]
    meta = [{"search": q, "trial": i} for q in searches for i in range(trials)]
    jobs = []
    norms = ctx.available(s["norms"], s["width"], 2)
    for n in norms:
        model = dict(kind=s["model"], width=s["width"], depth=s["depth"], activation=s["activation"], norm=n,
                     norm_overrides=norm_overrides_for(n, ctx.norm_overrides(n)))
        jobs.append(Job(name=n, model=model, spec=spec, runs=runs, meta={"norm": n}, run_meta=meta))
    results = ctx.run_jobs(jobs, data)

    claims, tables, figures = [], [], []
    k = max(1, int(round(s["top_fraction"] * trials)))
    accuracy = {}
    for n in norms:
        enrich_lr, enrich_wd, frac_lr, frac_wd, prior_lr, prior_wd, chosen = {}, {}, {}, {}, {}, {}, {}
        orders, vals, tests = {}, {}, {}
        for q in searches:
            recs = sorted(by_meta(results, norm=n, search=q), key=lambda r: r["meta"]["trial"])
            val = np.array([r["history"][-1].get("val_acc") or np.nan for r in recs], float)
            test = np.array([r["history"][-1].get("test_acc") or np.nan for r in recs], float)
            order = np.argsort(-np.nan_to_num(val, nan=-1.0), kind="stable")  # selection on validation only
            top = order[:k]
            in_lr = (lrs[q] >= LR_GOOD[0]) & (lrs[q] <= LR_GOOD[1])
            in_wd = (wds[q] >= WD_GOOD[0]) & (wds[q] <= WD_GOOD[1])
            frac_lr[q], prior_lr[q] = float(in_lr[top].mean()), float(in_lr.mean())
            frac_wd[q], prior_wd[q] = float(in_wd[top].mean()), float(in_wd.mean())
            chosen[q] = float(test[order[0]])
            orders[q], vals[q], tests[q] = order, val, test
            if q == searches[0]:
                curves = [recs[j] for j in order[: min(20, k)]]
        for label, frac, prior, rng_, what in (
                ("learning rates", frac_lr, prior_lr, LR_GOOD, "lr"), ("weight decays", frac_wd, prior_wd, WD_GOOD, "wd")):
            d = stats.paired(frac, prior)
            claims.append(Claim(
                claim=f"[{n}] good {label} lie in {rng_[0]:g}..{rng_[1]:g}",
                source="seed 001 (DLFS 6.5.3)",
                measured=f"share of the best {k} trials (by validation accuracy) with {what} in the range: "
                         f"{stats.estimate(frac.values()).pct()} vs {stats.estimate(prior.values()).pct()} of all "
                         f"trials; enrichment {d.pct()} over {d.n} searches",
                verdict=stats.verdict(d, "better"),
                rule=stats.rule("better", 0.0, what=f"(share of the top {k} trials with {what} in range) - (share of "
                                                    "all the search's trials), per search"),
            ))
        accuracy[n] = stats.estimate(chosen.values())
        q0 = searches[0]
        order, val, test = orders[q0], vals[q0], tests[q0]
        tables.append((f"[{n}] search 0: best {min(k, 10)} trials, selected on validation accuracy (test shown, "
                       "never used)",
                       ["rank", "lr", "weight decay", "val acc", "test acc"],
                       [[str(i + 1), f"{lrs[q0][j]:.2e}", f"{wds[q0][j]:.2e}", fmt(val[j]), fmt(test[j])]
                        for i, j in enumerate(order[: min(k, 10)])]))
        tables.append((f"[{n}] selected trial of each search (best validation accuracy)",
                       ["search", "lr", "weight decay", "val acc", "test acc (reported once)"],
                       [[str(q), f"{lrs[q][orders[q][0]]:.2e}", f"{wds[q][orders[q][0]]:.2e}",
                         fmt(vals[q][orders[q][0]]), fmt(tests[q][orders[q][0]])] for q in searches]
                       + [["mean ± SE", "", "", stats.estimate(vals[q][orders[q][0]] for q in searches).fmt(),
                           accuracy[n].fmt()]]))
        fig, axes = plots.new_figure()
        ax = axes[0][0]
        all_lr = np.concatenate([lrs[q] for q in searches])
        all_wd = np.concatenate([wds[q] for q in searches])
        all_val = np.concatenate([vals[q] for q in searches])
        top_mask = np.concatenate([np.isin(np.arange(trials), orders[q][:k]) for q in searches])
        sc = ax.scatter(all_lr, all_wd, c=all_val, cmap="viridis", s=18, vmin=0, vmax=1)
        ax.scatter(all_lr[top_mask], all_wd[top_mask], facecolors="none", edgecolors="r", s=60,
                   label=f"best {k} of each search")
        ax.axvspan(*LR_GOOD, color="r", alpha=0.06, label="lr 1e-3..1e-2")
        ax.axhspan(*WD_GOOD, color="b", alpha=0.05, label="wd 1e-8..1e-6")
        ax.set(xscale="log", yscale="log", xlabel="learning rate (log scale)", ylabel="weight decay (log scale)",
               title=f"{n}: final validation accuracy per trial ({len(searches)} searches)")
        fig.colorbar(sc, ax=ax, label="validation accuracy")
        ax.legend(fontsize=8)
        figures.append((f"[{n}] random search: validation accuracy over (lr, wd), every trial of every search; "
                        "shaded: DLFS's good region", plots.save(fig, ctx.out / f"hparam_scatter_{n}.png")))
        cols = 5
        fig, axes = plots.new_figure(int(np.ceil(len(curves) / cols)), cols, size=(2.4, 1.9), sharey=True)
        for i, rec in enumerate(curves):
            ax = axes[i // cols][i % cols]
            ep = np.arange(len(rec["history"]))
            ax.plot(ep, [h.get("val_acc") for h in rec["history"]], label="val")
            ax.plot(ep, [h.get("train_acc") for h in rec["history"]], "--", label="train")
            ax.set_title(f"Best-{i + 1} lr={rec['run']['lr']:.1e}", fontsize=8)
            ax.set_ylim(0, 1.02)
            if i % cols == 0:
                ax.set_ylabel("accuracy")
            ax.set_xlabel("epoch", fontsize=8)
        for j in range(len(curves), axes.shape[0] * cols):
            axes[j // cols][j % cols].axis("off")
        axes[0][0].legend(fontsize=7)
        figures.append((f"[{n}] search 0: learning curves of the best trials (DLFS fig. 6-24 layout); each curve is "
                        "one trial, so there is no seed band", plots.save(fig, ctx.out / f"hparam_best_{n}.png")))
    return SuiteReport(
        name=NAME, title="Hyper-parameter search",
        summary=f"{len(searches)} independent searches of {trials} random trials, lr = 10^U{tuple(s['lr_range'])}, "
                f"wd = 10^U{tuple(s['wd_range'])}, {s['epochs']} epochs; trials ranked by validation accuracy at the "
                "last epoch; shares are mean ± standard error over searches.",
        claims=claims, settings=s, tables=tables, figures=figures, notes=list(ctx.notes),
        seconds=time.perf_counter() - t0,
        protocol=protocol(s),
        accuracy=accuracy,
        accuracy_setting="selected trial (best validation accuracy)",
        reproduce="DLFS reports from one search of 100 trials on MNIST that the best trials have lr 1e-3..1e-2 and "
                  "weight decay 1e-8..1e-6. At those weight decays the L2 term is negligible beside the loss, so its "
                  "range carries little signal: the best trials' weight decays are expected to spread like the "
                  "prior. Full profile: `python -m experiments hparam-search` (5 searches of 100 trials x 50 "
                  "epochs), about 6x the quick time on 2 CPU cores (a few minutes), well under a minute on one GPU.",
    )
