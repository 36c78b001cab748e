"""How close the forward pass can come to a copy on this machine: its output half alone.

``python -m benchmarks.bounds [--quick] [--repeats N]``

A normalization's forward pass is two halves: the statistics (a read of ``x``) and the
output ``y = (x - mean) * (r * scale) + bias`` (a read of ``x`` and a write of ``y``). This
times, in one interleaved run per row with the harness of :mod:`benchmarks.harness`:

* ``copy``: ``x + 1`` (the roofline of the layer tables);
* ``output_given_stats``: the output half alone, the statistics given as constants, in
  plain jax.numpy (XLA fuses it into one elementwise loop: the fastest it writes ``y``);
* ``normzoo``: the layer's whole forward pass (on CPU its native kernel).

``time(copy) / time(output_given_stats)`` is what the issue's "0.8 of copy bandwidth" target
leaves for the statistics: where the output half alone already costs about one copy, a
forward pass at 0.8 must hide its whole statistics pass under the output's, and BatchNorm
in training, whose output needs the statistics of every row first, reads x twice.

Then, in float32 and in C++ (:mod:`benchmarks.floors`), kernels that do less than a layer,
each beside a copy: one read of x, a row kernel's least work (a sum, then one add per
element), LayerNorm's arithmetic with and without memory traffic, and BatchNorm training's
least work (all rows' sums, then one add per element). ``--floors-only`` skips the XLA rows.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

import jax.numpy as jnp

from benchmarks import floors, layers
from benchmarks.harness import time_group

LAYERS = ("ln", "rms", "bn")


def output_given_stats(variant: layers.Variant, shape: tuple[int, ...]):
    """A factory ``dtype -> apply(params, stats, x)``: the output half with fixed statistics
    (one per row for LN/RMS, one per channel for BN), as flax orders the arithmetic."""
    stat_shape = shape[:-1] + (1,) if variant.layer in ("ln", "rms") else shape[-1:]

    def factory(dtype: Any):
        mean = jnp.full(stat_shape, 0.01 if variant.layer != "rms" else 0.0, jnp.float32)
        r = jnp.full(stat_shape, 0.999, jnp.float32)

        def apply(params, stats, x):
            mul = r * params["scale"]
            y = (x.astype(jnp.float32) - mean) * mul
            if "bias" in params:
                y = y + params["bias"]
            return y.astype(dtype), stats

        return apply

    return factory


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.bounds", description=__doc__.split(
        "\n\n")[0])
    p.add_argument("--quick", action="store_true", help="tiny shapes, 3 repeats (smoke test)")
    p.add_argument("--repeats", type=int, default=None, help="timed repeats (default 11)")
    p.add_argument("--floors-only", action="store_true",
                   help="only the C++ floors (benchmarks/floors.cc), not the XLA rows")
    args = p.parse_args(argv)
    repeats = args.repeats or (3 if args.quick else 11)
    if not args.floors_only:
        xla_rows(args.quick, repeats)
        print()
    try:
        found = floors.measure(quick=args.quick, repeats=args.repeats)
    except RuntimeError as error:  # no compiler: the XLA rows stand alone
        print(f"C++ floors not measured: {error}")
        return 0
    print(f"C++ floors, float32, in place, {found.threads} threads, medians of "
          f"{found.repeats} repeats (LayerNorm replica's max error vs float64: "
          f"{found.layernorm_max_error:.1e}):")
    print()
    print(floors.table(found))
    return 0


def xla_rows(quick: bool, repeats: int) -> None:
    """The output half alone beside the copy and the whole layer, per layer and dtype."""
    table = layers.QUICK_SHAPES if quick else layers.FULL_SHAPES
    extra = {}
    for variant in layers.variants(LAYERS):
        if variant.train is False:
            continue
        extra[variant.key] = {"output_given_stats": output_given_stats(
            variant, tuple(table[variant.layer]))}
    groups = [g for g in layers.build_groups(LAYERS, ("float32", "bfloat16"), ("fwd",),
                                             quick=quick, impls=("normzoo",),
                                             extra_impls=extra)
              if g.meta["variant"] != "bn-eval"]
    print("| layer | dtype | shape | copy µs | output_given_stats µs | normzoo µs "
          "| output half of copy | normzoo of copy |")
    print("|---|---|---|---|---|---|---|---|")
    for group in groups:
        result = time_group(group, repeats=repeats, target_s=0.001 if quick else 0.05,
                            memory=False)
        m, impls = result.meta, result.impls
        times = {n: impls[n].median_s * 1e6 for n in ("copy", "output_given_stats", "normzoo")}
        print(f"| {m['label']} | {m['dtype']} | {'x'.join(map(str, m['shape']))} "
              f"| {times['copy']:.1f} | {times['output_given_stats']:.1f} "
              f"| {times['normzoo']:.1f} | {result.copy_fraction('output_given_stats'):.2f} "
              f"| {result.copy_fraction('normzoo'):.2f} |", flush=True)


if __name__ == "__main__":
    sys.exit(main())
