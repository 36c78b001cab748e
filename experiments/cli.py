"""Command line: ``python -m experiments SUITE [options]`` (``--help`` lists suites and options)."""
from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import math
import multiprocessing
import os
import signal
import sys
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path
from typing import Any, Callable, NoReturn, Sequence

from experiments.common import Context, Options, SuiteReport
from experiments.data import DATASETS, DataNotFoundError
from experiments.distributed import DeviceError, initialize as initialize_processes
from experiments.report import write_reports
from experiments.store import writes_enabled
from experiments.suites import SUITES
from normzoo import registry
from normzoo.registry import APIS


def _seeds(text: str) -> list[int]:
    """``"3"`` -> seeds 0, 1, 2; ``"0,5,7"`` -> those seeds (distinct, each >= 0)."""
    allowed = "a count >= 1 or a comma-separated list of distinct seeds >= 0"
    try:
        seeds = [int(t) for t in text.split(",") if t.strip()] if "," in text else list(range(int(text)))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number; expected {allowed}") from None
    if not seeds or min(seeds) < 0 or len(set(seeds)) != len(seeds):
        raise argparse.ArgumentTypeError(f"{text!r} is not allowed; expected {allowed}")
    return seeds


def _norms(text: str) -> list[str]:
    """Comma-separated registry names; an unknown name is an error (no silently empty tables)."""
    known = registry.names()
    norms = [t.strip() for t in text.split(",") if t.strip()]
    if not norms:
        raise argparse.ArgumentTypeError(f"{text!r} names no normalizer; expected comma-separated names from "
                                         f"normzoo.registry: {', '.join(known)}")
    unknown = [n for n in norms if n not in known]
    if unknown:
        raise argparse.ArgumentTypeError(f"{', '.join(map(repr, unknown))} not in normzoo.registry; expected "
                                         f"comma-separated names from: {', '.join(known)}")
    return norms


def _number(kind: type, lowest: float, strict: bool) -> Callable[[str], float]:
    """An argparse type: a finite ``kind`` (int or float) above ``lowest`` (``strict``) or at least it."""
    bound = f"> {lowest:g}" if strict else f">= {lowest:g}"
    allowed = f"{'an integer' if kind is int else 'a number'} {bound}"

    def parse(text: str) -> float:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {allowed}") from None
        if not math.isfinite(value) or value < lowest or (strict and value == lowest):
            raise argparse.ArgumentTypeError(f"{text} is not allowed; expected {allowed}")
        return value

    parse.__name__ = kind.__name__
    return parse


_positive_int = _number(int, 0, strict=True)
_positive_float = _number(float, 0.0, strict=True)
_non_negative_float = _number(float, 0.0, strict=False)


def layer_fields(name: str) -> list[str]:
    """Constructor fields a ``--norm-overrides`` entry may set for registry name ``name``: the
    dataclass fields of the Linen class the registry builds, less those the models set themselves
    (``use_running_average``) and Flax's own (``parent``, ``name``)."""
    factory = registry._get(name).factory
    while isinstance(factory, functools.partial):
        factory = factory.func
    fields = [f.name for f in dataclasses.fields(factory)] if dataclasses.is_dataclass(factory) else []
    return [f for f in fields if f not in ("parent", "name", "use_running_average")]


def _overrides(text: str) -> dict[str, dict[str, Any]]:
    """``--norm-overrides``: a JSON object ``{normalizer: {field: value}}``, every normalizer a
    registry name and every field one of :func:`layer_fields`."""
    example = '\'{"gn": {"num_groups": 4}}\''
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise argparse.ArgumentTypeError(f"{text!r} is not valid JSON ({e}); expected e.g. {example}") from None
    if not isinstance(value, dict) or not all(isinstance(v, dict) for v in value.values()):
        raise argparse.ArgumentTypeError(f"{text!r} is not allowed; expected a JSON object of objects, e.g. {example}")
    for norm, fields in value.items():
        if norm not in registry.names():
            raise argparse.ArgumentTypeError(f"normalizer {norm!r} is not in normzoo.registry; expected one of: "
                                             f"{', '.join(registry.names())}")
        allowed = layer_fields(norm)
        unknown = [k for k in fields if k not in allowed]
        if unknown:
            raise argparse.ArgumentTypeError(
                f"{norm!r} has no field {', '.join(map(repr, unknown))}; "
                f"its fields are: {', '.join(allowed) if allowed else '(none)'}")
    return value


class _Parser(argparse.ArgumentParser):
    """``parser.error`` as one line on stderr (what was wrong and what is allowed), exit status 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def build_parser() -> argparse.ArgumentParser:
    doc = "\n".join(f"  {name:16s} {((mod.__doc__ or '').strip().splitlines() or [''])[0]}" for name, mod in SUITES.items())
    p = _Parser(
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
    p.add_argument("--epochs", type=_positive_int, default=None, help="training epochs (>= 1)")
    p.add_argument("--batch-size", type=_positive_int, default=None, help="examples per step (>= 1)")
    p.add_argument("--lr", type=_positive_float, default=None,
                   help="learning rate, > 0 (suites that sweep it ignore this)")
    p.add_argument("--optimizer", choices=["sgd", "momentum", "adam", "adamw"], default=None)
    p.add_argument("--model", choices=["mlp", "cnn", "resnet"], default=None)
    p.add_argument("--api", choices=list(APIS), default="linen",
                   help="Flax API the models are built in: linen (default) or nnx (normzoo.nnx layers; "
                        "same numbers for the same seed)")
    p.add_argument("--width", type=_positive_int, default=None, help="hidden width (MLP) or base channels (CNN/ResNet)")
    p.add_argument("--depth", type=_positive_int, default=None, help="hidden layers (MLP) or blocks (CNN/ResNet)")
    p.add_argument("--train-size", type=_positive_int, default=None, help="training pool size (train + validation)")
    p.add_argument(
        "--norm-overrides",
        type=_overrides,
        default={},
        help='JSON of constructor overrides per normalizer, e.g. \'{"gn": {"num_groups": 4}}\' (registry names, '
             'layer fields)',
    )
    p.add_argument("--force", action="store_true", help="retrain even runs that are already finished in --out")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--checkpoint-every", type=_non_negative_float, default=30.0,
                   help="seconds between in-job checkpoints (0: every epoch)")
    p.add_argument("--workers", type=_positive_int, default=None,
                   help="suites run in parallel processes by 'all' (default: min(2, CPU count)); compilation "
                        "is single-threaded, so 2 workers nearly halve the wall time on 2 cores")
    p.add_argument("--compile-cache", type=Path, default=None,
                   help="JAX persistent compilation cache (default OUT/.jax_cache; 'none' to disable)")
    p.add_argument("--devices", type=int, default=None,
                   help="train data-parallel over this many devices (default: all; 1 = the single-device engine)")
    p.add_argument("--bn-sync", action=argparse.BooleanOptionalAction, default=True,
                   help="over several devices, normalize with the global batch's statistics (default) or, with "
                        "--no-bn-sync, each device's own (the batch size must then divide by the device count)")
    p.add_argument("--coordinator", default=None,
                   help="several hosts: coordinator HOST:PORT for jax.distributed (else $JAX_COORDINATOR_ADDRESS)")
    p.add_argument("--num-processes", type=int, default=None,
                   help="several hosts: number of processes (else $JAX_NUM_PROCESSES or cluster auto-detection)")
    p.add_argument("--process-id", type=int, default=None,
                   help="several hosts: this process's id, 0 writes the outputs (else $JAX_PROCESS_ID or auto-detection)")
    return p


# Longest first, so two workers finish at about the same time.
_SCHEDULE = ["whitening", "small-batch", "batch-size", "no-norm", "init-scale", "hparam-search", "overfitting",
             "placement", "covariate-shift", "train-vs-eval", "lr-robustness"]


def enable_compile_cache(path: Path | None) -> None:
    """Point JAX's persistent compilation cache at ``path`` (re-runs and resumes skip compiling)."""
    if path is None or str(path).lower() == "none":
        return
    import jax

    path.mkdir(parents=True, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", str(path))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)


def _ignore_sigint() -> None:
    """Worker initializer: Ctrl-C reaches the whole process group; the parent alone handles it
    (it stops the workers), so no worker prints a traceback."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def _stop_workers(pool: ProcessPoolExecutor) -> None:
    """Stop ``pool`` at once: pending suites are cancelled, running ones terminated. Results and
    checkpoints are written atomically, so a terminated suite resumes from what it saved."""
    for proc in multiprocessing.active_children():
        proc.terminate()
    pool.shutdown(wait=False, cancel_futures=True)


def _interrupted(root: Path, checkpoint_every: float) -> int:
    """Ctrl-C: one line on stderr saying what is saved and how to resume; exit status 130."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C must not interrupt the exit
    print(f"interrupted: finished jobs are saved under {root} (runs/), a running job at its last checkpoint "
          f"(checkpoints/, written every {checkpoint_every:g} s); rerun the same command to resume",
          file=sys.stderr, flush=True)
    return 130


def _worker(name: str, options: Options, cache: Path | None) -> SuiteReport:
    enable_compile_cache(cache)
    return run_suite(name, options)


def run_suite(name: str, options: Options) -> SuiteReport:
    """Run one suite and write its report into ``options.out``."""
    ctx = Context(name, options)
    report = SUITES[name].run(ctx)
    if writes_enabled():  # process 0 of a multi-process run (the reports read its plots back)
        write_reports([report], Path(options.out), title=f"normzoo experiment: {name}")
    return report


def main(argv: Sequence[str] | None = None) -> int:
    """Parse and check every argument (status 2 and one line on stderr if one is not allowed), then
    run; Ctrl-C stops with status 130 and one line saying how to resume."""
    args = build_parser().parse_args(argv)
    root = args.out or (Path("results") if args.suite == "all" else Path("results") / args.suite)
    try:
        return _main(args, root)
    except KeyboardInterrupt:
        return _interrupted(root, args.checkpoint_every)


def _main(args: argparse.Namespace, root: Path) -> int:
    try:
        distributed = initialize_processes(args.coordinator, args.num_processes, args.process_id)
    except DeviceError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    names = list(SUITES) if args.suite == "all" else [args.suite]
    cache = args.compile_cache if args.compile_cache is not None else root / ".jax_cache"
    workers = args.workers or min(2, os.cpu_count() or 1)
    parallel = args.suite == "all" and workers > 1 and not distributed  # one suite at a time across hosts

    def options(name: str) -> Options:
        return Options(
            out=root / name if args.suite == "all" else root, quick=args.quick, dataset=args.dataset,
            data_dir=args.data_dir, norms=args.norms, seeds=args.seeds, epochs=args.epochs,
            batch_size=args.batch_size, lr=args.lr, optimizer=args.optimizer, model=args.model, api=args.api,
            width=args.width, depth=args.depth, train_size=args.train_size, norm_overrides=args.norm_overrides,
            progress=not args.no_progress and not parallel, force=args.force, checkpoint_every=args.checkpoint_every,
            devices=args.devices, bn_sync=args.bn_sync,
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
            with ProcessPoolExecutor(max_workers=workers, mp_context=ctx, initializer=_ignore_sigint) as pool:
                try:
                    futures = {pool.submit(_worker, n, options(n), cache): n for n in order}
                    for fut in as_completed(futures):
                        name = futures[fut]
                        reports[name] = fut.result()
                        if bar is not None:
                            bar.update(1)
                            bar.write(f"[{name}] done in {reports[name].seconds:.0f} s")
                        else:
                            done(name, reports[name])
                except KeyboardInterrupt:
                    _stop_workers(pool)
                    if bar is not None:
                        bar.close()
                    raise
            if bar is not None:
                bar.close()
                for name in names:
                    done(name, reports[name])
        else:
            enable_compile_cache(cache)
            for name in names:
                reports[name] = run_suite(name, options(name))
                done(name, reports[name])
    except (DataNotFoundError, DeviceError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.suite == "all" and writes_enabled():
        write_reports([reports[n] for n in names], root)
        print(f"all suites in {time.perf_counter() - t0:.0f} s -> {root / 'report.md'}, {root / 'report.html'}")
    return 0
