"""Floors of the float32 forward pass on this CPU: C++ kernels that do less than a layer.

:mod:`benchmarks.bounds` runs this after its XLA rows. ``benchmarks/floors.cc`` (built once
with the compiler and ``-march=native`` of normzoo's native kernels, into the same cache)
times, each beside a copy ``x + 1`` of the same array, in place, on all cores:

* ``read``: one read of x (its sums): what the statistics pass alone costs;
* ``row_two_pass``: per row, its sum, then ``row + c(sum)`` from L1 cache: the least work
  of any kernel whose outputs wait for their row's statistic (LayerNorm, RMSNorm);
* ``row_interleaved``: the same with the next row's sum taken in the loop that writes this
  row;
* ``row_layernorm``: LayerNorm's arithmetic as normzoo's row kernel does it;
* ``row_layernorm_l1``: that arithmetic on rows that stay in L1: its cost with no memory
  traffic at all;
* ``batch_two_pass``: every row's per-channel sums, all threads joined, then ``x + c``:
  BatchNorm in training (every output needs every row's statistics) minus its arithmetic.

A kernel's "of copy" is ``time(copy) / time(kernel)``, the layer tables' "normzoo of copy":
what a layer doing more than that kernel cannot beat on this machine.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
from pathlib import Path
from typing import Any

SOURCE = Path(__file__).with_name("floors.cc")
#: (rows, features) of the row probes and (rows, channels) of the batch probe: the layer
#: tables' LayerNorm (4096, 1024) and BatchNorm NHWC (64 * 28 * 28, 128) shapes.
FULL = {"row": (4096, 1024), "batch": (64 * 28 * 28, 128)}
QUICK = {"row": (64, 256), "batch": (512, 128)}
PROBES = ("copy", "read", "row_two_pass", "row_interleaved", "row_layernorm",
          "row_layernorm_l1", "batch_copy", "batch_two_pass")
WHAT = {
    "read": "one read of x (the statistics pass alone)",
    "row_two_pass": "per row: its sum, then row + c(sum) from L1 (a row kernel's least work)",
    "row_interleaved": "the same, the next row's sum in the loop writing this row",
    "row_layernorm": "LayerNorm's arithmetic as normzoo's row kernel does it",
    "row_layernorm_l1": "that arithmetic on rows kept in L1 (no memory traffic)",
    "batch_two_pass": "all rows' channel sums, then x + c (BatchNorm training's least work)",
}


@dataclasses.dataclass
class Floors:
    """One run of the probe: median µs per kernel, and the LayerNorm replica's check."""

    threads: int
    repeats: int
    layernorm_max_error: float
    probes: dict[str, dict[str, Any]]  # name -> {"rows", "cols", "us"}

    def copy_us(self, name: str) -> float:
        return self.probes["batch_copy" if name.startswith("batch") else "copy"]["us"]

    def fraction(self, name: str) -> float:
        """time(copy of the same array) / time(name)."""
        return self.copy_us(name) / self.probes[name]["us"]


def flags() -> list[str]:
    extra = os.environ.get("NORMZOO_NATIVE_CFLAGS", "").split()
    return ["-O3", "-march=native", "-std=c++17", "-pthread", *extra]


def build() -> Path:
    """The probe's executable (compiled on first use; RuntimeError without a compiler)."""
    from normzoo.backends.cpu import library as native

    return native.cached_build(SOURCE, flags(), "floors", ".bin")


def threads() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def measure(quick: bool = False, repeats: int | None = None,
            workers: int | None = None) -> Floors:
    """Builds and runs the probe: the full shapes (~5 s on 2 cores, 21 repeats) or tiny ones."""
    shapes = QUICK if quick else FULL
    repeats = repeats or (1 if quick else 21)
    workers = workers or threads()
    (rows, features), (batch_rows, channels) = shapes["row"], shapes["batch"]
    argv = [str(build()), str(rows), str(features), str(batch_rows), str(channels),
            str(workers), str(repeats)]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=600)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed ({done.returncode}): {done.stderr.strip()}")
    return Floors(**json.loads(done.stdout))


def table(floors: Floors) -> str:
    """Markdown: each probe's time, its copy's time and the fraction of copy."""
    lines = ["| probe | shape | µs | copy µs | of copy | what it does |", "|---|---|---|---|---|---|"]
    for name in PROBES:
        if name in ("copy", "batch_copy") or name not in floors.probes:
            continue
        p = floors.probes[name]
        lines.append(f"| {name} | {p['rows']}x{p['cols']} | {p['us']:.1f} "
                     f"| {floors.copy_us(name):.1f} | {floors.fraction(name):.2f} "
                     f"| {WHAT[name]} |")
    return "\n".join(lines)
