"""``python -m benchmarks``: normzoo vs flax.linen vs jax.numpy vs a copy, side by side.

Examples::

    python -m benchmarks --quick                      # CI smoke test: every kind of row, tiny
    python -m benchmarks --rows layers --layers ln,rms --dtype float32 --repeats 21
    python -m benchmarks --rows loss,training --write-results   # the training-like rows only
    python -m benchmarks --json out.json --write-results   # full run, updates RESULTS.md
    python -m benchmarks --rows layers --layers ln --prototypes   # also benchmarks/prototypes.py
    python -m benchmarks --devices 1,2,4,8 --models mlp,resnet   # data-parallel train steps

Three kinds of rows (``--rows``): ``layers`` (one layer with a fixed upstream gradient, and
the whitening rows), ``loss`` (one layer whose loss depends on y) and ``training`` (whole
train steps of ``--models``), see :mod:`benchmarks.layers` and :mod:`benchmarks.training`.
``--devices`` replaces them with the train steps per device count (:mod:`benchmarks.devices`).

Progress goes to stderr, the markdown tables to stdout.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from typing import Any, Sequence

from benchmarks import devices
from benchmarks import floors as cpu_floors
from benchmarks import layers as layer_groups
from benchmarks import report
from benchmarks import training as training_groups
from benchmarks import whitening as whitening_groups
from benchmarks.harness import GroupResult, time_group

ALL_LAYERS = layer_groups.LAYERS + ("whitening",)
DTYPES = ("float32", "bfloat16")
ROWS = ("layers", "loss", "training")
#: Default repeats per kind of row (``--repeats`` sets all): a train step costs many
#: layer iterations, so its rows take fewer repeats of longer runs.
REPEATS = {"layer": 15, "whitening": 15, "loss": 9, "train": 7}
QUICK_REPEATS = 3
#: Default aimed duration of one timed run per kind (``--target-ms`` sets all), seconds.
TARGET_S = {"layer": 0.05, "whitening": 0.05, "loss": 0.05, "train": 0.25}
RESULTS_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "RESULTS.md")


def _csv(choices: Sequence[str], what: str):
    def parse(text: str) -> list[str]:
        items = [t.strip() for t in text.split(",") if t.strip()]
        bad = [t for t in items if t not in choices]
        if bad or not items:
            raise argparse.ArgumentTypeError(
                f"{what}={text!r}: expected a comma list of {', '.join(choices)}")
        return items

    return parse


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks",
        description="Time normzoo against flax.linen (fast and two-pass variance), plain "
        "jax.numpy and a copy roofline, forward and forward+backward, in one run.")
    p.add_argument("--quick", action="store_true",
                   help="tiny shapes and few repeats: a smoke test (< 60 s on 2 cores)")
    p.add_argument("--rows", type=_csv(ROWS, "--rows"), default=list(ROWS),
                   help="comma list of layers (fixed upstream gradient; whitening), loss (loss "
                   "depending on y), training (whole train steps) (default: all)")
    p.add_argument("--layers", type=_csv(ALL_LAYERS, "--layers"), default=list(ALL_LAYERS),
                   help=f"comma list of {','.join(ALL_LAYERS)} for the layers and loss rows "
                   "(default: all)")
    p.add_argument("--models", type=_csv(training_groups.MODELS, "--models"),
                   default=None,
                   help=f"comma list of {','.join(training_groups.MODELS)} for the training "
                   "rows (default: all; mlp with --devices)")
    p.add_argument("--modes", type=_csv(training_groups.MODES, "--modes"),
                   default=list(training_groups.MODES),
                   help="loss rows: comma list of 'x+params' (grads of x and params) and "
                   "'x only' (frozen params) (default: both)")
    p.add_argument("--dtype", type=_csv(DTYPES, "--dtype"), default=None,
                   help="comma list of float32,bfloat16 (default: both; float32 only with "
                   "--quick, to stay under a minute; whitening is always float32)")
    p.add_argument("--passes", type=_csv(layer_groups.PASSES, "--passes"),
                   default=list(layer_groups.PASSES), help="comma list of fwd,fwd+bwd")
    p.add_argument("--repeats", type=int, default=None,
                   help="timed repeats per implementation (default 15 for layer rows, 9 for "
                   "loss rows, 7 for train steps; 3 with --quick)")
    p.add_argument("--target-ms", type=float, default=None,
                   help="aimed duration of one timed run of each implementation "
                   "(default 50, 250 for train steps; 1 with --quick)")
    p.add_argument("--json", metavar="PATH", help="also write every number as JSON")
    p.add_argument("--write-results", nargs="?", const=RESULTS_PATH, metavar="PATH",
                   help=f"write the markdown report (default path {RESULTS_PATH})")
    p.add_argument("--no-memory", action="store_true",
                   help="skip compiling one un-looped step per implementation (its "
                   "temporary memory, kernels and passes over memory)")
    p.add_argument("--compile-workers", type=int, default=None,
                   help="parallel XLA compilations (default 1, so compile times are "
                   "comparable; all cores with --quick)")
    p.add_argument("--prototypes", action="store_true",
                   help="also time the candidate implementations of benchmarks/prototypes.py")
    p.add_argument("--no-floors", action="store_true",
                   help="skip the C++ floors of the float32 forward pass (benchmarks/floors.py; "
                   "run on CPU when LayerNorm, RMSNorm or BatchNorm forward rows in float32 "
                   "are timed)")
    p.add_argument("--devices", type=devices.parse_counts, default=None, metavar="COUNTS",
                   help="comma list of device counts, e.g. 1,2,4,8: instead of the other rows, "
                   "time the first norm variant of each of --models (default mlp) data "
                   "parallel on that many devices, one fresh process each (simulated CPU "
                   "devices, or the GPUs), and list the collectives of the compiled step")
    return p


def wants_floors(args: argparse.Namespace, dtypes: Sequence[str]) -> bool:
    """The floors explain the float32 forward rows' copy fractions on a CPU backend."""
    import jax

    return (not args.no_floors and jax.default_backend() == "cpu" and "float32" in dtypes
            and "layers" in args.rows and "fwd" in args.passes
            and bool({"ln", "rms", "bn"} & set(args.layers)))


def run(args: argparse.Namespace, log=None
        ) -> tuple[list[GroupResult], list[str], dict[str, Any], cpu_floors.Floors | None]:
    """Builds and times every requested group, then the C++ floors where they apply;
    returns (results, notes, settings, floors or None)."""
    log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
    def repeats_for(kind: str) -> int:
        return args.repeats or (QUICK_REPEATS if args.quick else REPEATS[kind])

    def target_for(kind: str) -> float:
        if args.target_ms:
            return args.target_ms / 1e3
        return 1e-3 if args.quick else TARGET_S[kind]

    workers = args.compile_workers or ((os.cpu_count() or 1) if args.quick else 1)
    dtypes = args.dtype or (["float32"] if args.quick else list(DTYPES))
    rows = list(args.rows)
    settings = {"quick": args.quick, "rows": ",".join(rows), "dtypes": ",".join(dtypes),
                "repeats": args.repeats or (QUICK_REPEATS if args.quick else "/".join(
                    f"{k} {REPEATS[k]}" for k in ("layer", "loss", "train"))),
                "target_ms": args.target_ms or (1.0 if args.quick else "/".join(
                    f"{k} {TARGET_S[k] * 1e3:g}" for k in ("layer", "loss", "train"))),
                "compile_workers": workers, "memory": not args.no_memory,
                "prototypes": args.prototypes}
    models = args.models or list(training_groups.MODELS)
    if "training" in rows:
        settings["models"] = ",".join(models)
    notes: list[str] = []
    groups = []
    names = [n for n in args.layers if n != "whitening"]
    if "layers" in rows and names:
        extra = None
        if args.prototypes:
            from benchmarks import prototypes

            extra = prototypes.extra_impls()
        groups += layer_groups.build_groups(names, dtypes, args.passes, quick=args.quick,
                                            extra_impls=extra)
    if "layers" in rows and "whitening" in args.layers:
        white, white_notes = whitening_groups.build_groups(quick=args.quick)
        groups += white
        notes += white_notes
        if "float32" not in dtypes:
            notes.append("whitening rows are float32 only (eigh / cholesky need float32)")
    if "loss" in rows and names:
        groups += training_groups.loss_groups(names, dtypes, args.modes, quick=args.quick)
    if "training" in rows:
        log("building the train-step models")
        # --quick: one norm per model and no flax twin (each column is one compilation).
        groups += training_groups.train_groups(models, dtypes, quick=args.quick,
                                               twin=not args.quick)
        if args.quick:
            notes.append("--quick train rows: the first norm of each model, no flax twin "
                         "(no noise control of their own: no ties)")
    cache: dict = {}
    results = []
    for index, group in enumerate(groups, 1):
        start = time.perf_counter()
        kind = group.meta.get("kind", "layer")
        result = time_group(group, repeats=repeats_for(kind), target_s=target_for(kind),
                            cache=cache, memory=not args.no_memory, workers=workers)
        results.append(result)
        log(f"[{index}/{len(groups)}] {_describe(result)} ({time.perf_counter() - start:.1f} s)")
    floors = None
    if wants_floors(args, dtypes):
        start = time.perf_counter()
        try:
            floors = cpu_floors.measure(quick=args.quick)
            log(f"C++ floors ({time.perf_counter() - start:.1f} s)")
        except RuntimeError as error:  # no compiler: the tables stand alone
            notes.append(f"C++ floors not measured: {error}")
    settings["floors"] = floors is not None
    return results, notes, settings, floors


def _describe(result: GroupResult) -> str:
    m = result.meta
    if m.get("kind") == "whitening":
        return f"whitening G={m['G']} groups={m['groups']}"
    if m.get("kind") in ("loss", "train"):
        what = f"loss ({m['mode']})" if m["kind"] == "loss" else "train step"
        bits = [f"{n}: flax/{n} {result.ratio('flax', n):.2f}" for n in ("normzoo", "normzoo_cpu")
                if n in result.impls and "flax" in result.impls]
        return f"{m['label']} {what} {m['dtype']}" + (": " + ", ".join(bits) if bits else "")
    text = f"{m['label']} {m['pass']} {m['dtype']}"
    if "normzoo" in result.impls:
        bits = [f"{n}/normzoo {result.ratio(n):.2f}" for n in ("flax_fast", "flax_2pass")
                if n in result.impls]
        text += ": " + ", ".join(bits)
    return text


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if args.devices:
        return devices.cli_main(args, report.command_line(argv))
    meta = report.machine_info()
    meta["command"] = report.command_line(argv)
    started = time.perf_counter()
    results, notes, settings, floors = run(args)
    meta["load_average_end"] = report.machine_info()["load_average"]
    meta["total_s"] = round(time.perf_counter() - started, 1)
    # Only the load at the start tells whether other work shared the machine: the load at
    # the end counts this run's own threads.
    load = meta["load_average"]
    if load and meta["cpu_count"] and load[0] > 0.5 * meta["cpu_count"]:
        notes.append(f"the machine was busy (load average {load} at start, "
                     f"{meta['cpu_count']} cores): "
                     "timings are noisy; rerun on a quiet machine before quoting them")
    print(report.markdown(results, notes, floors))
    print(f"total {meta['total_s']} s", file=sys.stderr)
    if args.json:
        report.write_json(args.json, report.to_json(results, {**meta, "settings": settings}, notes,
                                                    floors))
    if args.write_results:
        report.write_results(args.write_results, results, meta, notes, settings, floors)
    return 0
