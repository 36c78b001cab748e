"""Command line: ``python -m experiments SUITE [options]`` (``--help`` lists suites and options)."""
from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path
from typing import Sequence

from experiments.common import Context, Options, SuiteReport
from experiments.data import DATASETS, DataNotFoundError
from experiments.report import write_reports
from experiments.suites import SUITES
from normzoo.registry import APIS


def _seeds(text: str) -> list[int]:
    """``"3"`` -> seeds 0, 1, 2; ``"0,5,7"`` -> those seeds."""
    if "," in text:
        return [int(t) for t in text.split(",") if t.strip()]
    n = int(text)
    if n < 1:
        raise argparse.ArgumentTypeError(f"--seeds {text}: expected a count >= 1 or a comma-separated list")
    return list(range(n))


def _norms(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def build_parser() -> argparse.ArgumentParser:
    doc = "\n".join(f"  {name:16s} {((mod.__doc__ or '').strip().splitlines() or [''])[0]}" for name, mod in SUITES.items())
    p = argparse.ArgumentParser(
        prog="python -m experiments",
        description="normzoo comparison experiments: each suite checks a claim of the seed articles "
        "and writes config.json, metrics.csv/.jsonl, PNG plots, report.md and report.html.",
        epilog=f"suites:\n{doc}\n  {'all':16s} every suite above; combined report in --out\n\n"
        "Example: python -m experiments all --quick   (a few minutes on 2 CPU cores)",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("suite", choices=[*SUITES, "all"], help="suite to run")
    p.add_argument("--quick", action="store_true", help="reduced settings (about a minute per suite or less)")
    p.add_argument("--out", type=Path, default=None, help="output folder (default results/SUITE, or results/ for all)")
    p.add_argument("--dataset", choices=DATASETS, default=None, help="dataset (default: the suite's, digits)")
    p.add_argument("--data-dir", type=Path, default=None, help="folder with mnist/fashion_mnist/cifar10 files")
    p.add_argument("--norms", type=_norms, default=None, help="comma-separated registry names, e.g. none,bn,ln")
    p.add_argument("--seeds", type=_seeds, default=None, help="number of seeds, or a comma-separated list")
    p.add_argument("--epochs", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--lr", type=float, default=None, help="learning rate (suites that sweep it ignore this)")
    p.add_argument("--optimizer", choices=["sgd", "momentum", "adam", "adamw"], default=None)
    p.add_argument("--model", choices=["mlp", "cnn", "resnet"], default=None)
    p.add_argument("--api", choices=list(APIS), default="linen",
                   help="Flax API the models are built in: linen (default) or nnx (normzoo.nnx layers; "
                        "same numbers for the same seed)")
    p.add_argument("--width", type=int, default=None, help="hidden width (MLP) or base channels (CNN/ResNet)")
    p.add_argument("--depth", type=int, default=None, help="hidden layers (MLP) or blocks (CNN/ResNet)")
    p.add_argument("--train-size", type=int, default=None, help="training pool size (train + validation)")
    p.add_argument(
        "--norm-overrides",
        type=json.loads,
        default={},
        help='JSON of constructor overrides per normalizer, e.g. \'{"gn": {"num_groups": 4}}\'',
    )
    p.add_argument("--force", action="store_true", help="retrain even runs that are already finished in --out")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--checkpoint-every", type=float, default=30.0, help="seconds between in-job checkpoints")
    p.add_argument("--workers", type=int, default=None,
                   help="suites run in parallel processes by 'all' (default: min(2, CPU count)); compilation "
                        "is single-threaded, so 2 workers nearly halve the wall time on 2 cores")
    p.add_argument("--compile-cache", type=Path, default=None,
                   help="JAX persistent compilation cache (default OUT/.jax_cache; 'none' to disable)")
    return p


# Longest first, so two workers finish at about the same time.
_SCHEDULE = ["whitening", "batch-size", "init-scale", "hparam-search", "overfitting", "placement",
             "covariate-shift", "train-vs-eval", "lr-robustness"]


def enable_compile_cache(path: Path | None) -> None:
    """Point JAX's persistent compilation cache at ``path`` (re-runs and resumes skip compiling)."""
    if path is None or str(path).lower() == "none":
        return
    import jax

    path.mkdir(parents=True, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", str(path))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)


def _worker(name: str, options: Options, cache: Path | None) -> SuiteReport:
    enable_compile_cache(cache)
    return run_suite(name, options)


def run_suite(name: str, options: Options) -> SuiteReport:
    """Run one suite and write its report into ``options.out``."""
    ctx = Context(name, options)
    report = SUITES[name].run(ctx)
    write_reports([report], Path(options.out), title=f"normzoo experiment: {name}")
    return report


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    names = list(SUITES) if args.suite == "all" else [args.suite]
    root = args.out or (Path("results") if args.suite == "all" else Path("results") / args.suite)
    cache = args.compile_cache if args.compile_cache is not None else root / ".jax_cache"
    workers = args.workers or min(2, os.cpu_count() or 1)
    parallel = args.suite == "all" and workers > 1

    def options(name: str) -> Options:
        return Options(
            out=root / name if args.suite == "all" else root, quick=args.quick, dataset=args.dataset,
            data_dir=args.data_dir, norms=args.norms, seeds=args.seeds, epochs=args.epochs,
            batch_size=args.batch_size, lr=args.lr, optimizer=args.optimizer, model=args.model, api=args.api,
            width=args.width, depth=args.depth, train_size=args.train_size, norm_overrides=args.norm_overrides,
            progress=not args.no_progress and not parallel, force=args.force, checkpoint_every=args.checkpoint_every,
        )

    def done(name: str, rep: SuiteReport) -> None:
        verdicts = ", ".join(c.verdict for c in rep.claims)
        print(f"[{name}] {rep.seconds:.0f} s: {verdicts} -> {options(name).out / 'report.md'}", flush=True)

    t0 = time.perf_counter()
    reports: dict[str, SuiteReport] = {}
    try:
        if parallel:
            order = [n for n in _SCHEDULE if n in names] + [n for n in names if n not in _SCHEDULE]
            bar = None
            if not args.no_progress:
                from tqdm.auto import tqdm

                bar = tqdm(total=len(order), desc="suites", unit="suite")
            ctx = multiprocessing.get_context("spawn")
            with ProcessPoolExecutor(max_workers=workers, mp_context=ctx) as pool:
                futures = {pool.submit(_worker, n, options(n), cache): n for n in order}
                for fut in as_completed(futures):
                    name = futures[fut]
                    reports[name] = fut.result()
                    if bar is not None:
                        bar.update(1)
                        bar.write(f"[{name}] done in {reports[name].seconds:.0f} s")
                    else:
                        done(name, reports[name])
            if bar is not None:
                bar.close()
                for name in names:
                    done(name, reports[name])
        else:
            enable_compile_cache(cache)
            for name in names:
                reports[name] = run_suite(name, options(name))
                done(name, reports[name])
    except DataNotFoundError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.suite == "all":
        write_reports([reports[n] for n in names], root)
        print(f"all suites in {time.perf_counter() - t0:.0f} s -> {root / 'report.md'}, {root / 'report.html'}")
    return 0
