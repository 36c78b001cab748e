"""``python -m benchmarks --devices 1,2,4,8``: a whole train step per device count, data parallel.

For each device count ``d`` a fresh process (the device count is fixed when jax is first
imported) builds a mesh ``('data',)`` of ``d`` devices and times the train-step rows of
:mod:`benchmarks.training` (normzoo's model, the same ``train_step`` and ``train_loop``,
timed by :func:`benchmarks.harness.time_group`) with the batch sharded ``P('data')`` and the
params, running statistics and optimizer state replicated: plain ``jit``, no ``axis_name``,
so XLA's SPMD partitioner inserts the collectives. On CPU the ``d`` devices are simulated
(``XLA_FLAGS=--xla_force_host_platform_device_count=d``): they share the same cores, so the
rows measure the overhead of partitioning and collectives, not a speed-up. On a GPU machine
the first ``d`` real devices are used (counts above the machine's are skipped).

Every row also records the collectives of the compiled (un-looped) step, read from its HLO
text (``jax.jit(step).lower(...).compile().as_text()``): the count of all-reduce, all-gather,
reduce-scatter, all-to-all and collective-permute, and the largest element count one of
them moves. A data-parallel BatchNorm step all-reduces per-feature moments (and the param
gradients); it gathers no activations.

The worker protocol (``python -m benchmarks.devices --worker ...``) prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import subprocess
import sys
from typing import Any, Sequence

COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "collective-permute")
_SHAPE = re.compile(r"\b(?:pred|[subfc]\d+|bf16)\[([0-9,]*)\]")
#: ``%name = <result type> <opcode>(`` of one HLO instruction (the opcode ends the prefix).
_INSTR = re.compile(r"^\s*(?:ROOT\s+)?%?[\w.\-]+\s*=\s*(.*?)\s+([\w\-]+)\(")
_FLAG = "--xla_force_host_platform_device_count"


def collectives(hlo_text: str) -> dict[str, dict[str, int]]:
    """The collectives of compiled HLO text: ``{op: {"count": n, "max_elements": m}}`` for each
    op of :data:`COLLECTIVES` (``m``: the most elements one instruction's result holds; a tuple
    result, as a combined all-reduce, sums its arrays). An asynchronous pair
    (``all-reduce-start`` / ``-done``) counts once; ops inside loop bodies and called
    computations count where they are written (once per computation, not per trip)."""
    found = {op: {"count": 0, "max_elements": 0} for op in COLLECTIVES}
    for line in hlo_text.splitlines():
        match = _INSTR.match(line)
        if not match:
            continue
        result_type, opcode = match.groups()
        op = opcode[:-len("-start")] if opcode.endswith("-start") else opcode
        if op not in found:
            continue
        elements = sum(math.prod(int(d) for d in dims.split(",") if d) if dims else 1
                       for dims in _SHAPE.findall(result_type))
        found[op]["count"] += 1
        found[op]["max_elements"] = max(found[op]["max_elements"], elements)
    return found


def child_env(count: int, platform: str) -> dict[str, str]:
    """The environment of the worker for ``count`` devices: on CPU ``XLA_FLAGS`` asks for
    ``count`` simulated host devices (replacing any such flag already there)."""
    env = dict(os.environ)
    if platform == "cpu":
        flags = [f for f in env.get("XLA_FLAGS", "").split() if not f.startswith(_FLAG)]
        env["XLA_FLAGS"] = " ".join(flags + [f"{_FLAG}={count}"])
        env["JAX_PLATFORMS"] = "cpu"
    return env


# ------------------------------------------------------------------ worker (one device count)
def _sharded_rows(count: int, models: Sequence[str], quick: bool, repeats: int,
                  target_s: float, multiple: int) -> list[dict[str, Any]]:
    """Times normzoo's train step of each model's first norm variant on ``count`` devices;
    each model's batch (:data:`benchmarks.training.FULL` / ``QUICK``) is rounded up to a
    multiple of ``multiple``, so every device count of one run splits the same batch."""
    import jax
    import jax.numpy as jnp
    import flax.linen as nn
    import numpy as np
    from jax.sharding import NamedSharding, PartitionSpec as P

    import normzoo
    from benchmarks import training
    from benchmarks.harness import Group, time_group

    devices = jax.devices()
    if len(devices) < count:
        raise SystemExit(f"--devices {count}: this process has {len(devices)} devices")
    mesh = jax.sharding.Mesh(np.array(devices[:count]), ("data",))
    data, replicated = NamedSharding(mesh, P("data")), NamedSharding(mesh, P())
    table = training.QUICK if quick else training.FULL
    rows = []
    for model in models:
        global_batch = -(-table[model]["batch"] // multiple) * multiple
        (spec,) = training.model_specs([model], quick=quick, sizes={model: {"batch": global_batch}},
                                       norms={model: training.NORMS[model][:1]})
        rng = np.random.default_rng(0)
        x = jnp.asarray(rng.normal(0.0, 1.0, spec.input_shape), jnp.float32)
        labels = jnp.asarray(rng.integers(0, spec.num_classes, spec.label_shape), jnp.int32)
        flax_model = spec.build(training.norm_class(nn, spec.norm), jnp.float32)
        zoo_model = spec.build(training.norm_class(normzoo, spec.norm), jnp.float32)
        variables = training.init_variables(flax_model, zoo_model, x, row=spec.label)
        tx = spec.optimizer()
        params, batch_stats = variables["params"], variables.get("batch_stats", {})
        step = training.train_step(zoo_model, tx, spec.norm == "bn")

        def sharded_step(params, batch_stats, opt_state, x, labels, step=step):
            # The data-parallel layout, stated inside the program: batch split over 'data',
            # every other value replicated. jit + NamedSharding, no axis_name.
            constrain = jax.lax.with_sharding_constraint
            params, batch_stats, opt_state = constrain((params, batch_stats, opt_state),
                                                       replicated)
            return step(params, batch_stats, opt_state, constrain(x, data),
                        constrain(labels, data))

        opt_state = tx.init(params)
        args = (params, batch_stats, opt_state, x, labels)
        hlo = jax.jit(sharded_step).lower(*args).compile().as_text()

        def forward(params, batch_stats, x, model=zoo_model, stateful=spec.norm == "bn"):
            # The training-mode forward pass alone: its all-reduces are the norms' statistics.
            x = jax.lax.with_sharding_constraint(x, data)
            if not stateful:
                return model.apply({"params": params}, x, train=True)
            return model.apply({"params": params, "batch_stats": batch_stats}, x, train=True,
                               mutable=["batch_stats"])

        forward_hlo = jax.jit(forward).lower(params, batch_stats, x).compile().as_text()
        norms = sum(1 for path in jax.tree_util.tree_leaves(
            jax.tree_util.tree_map_with_path(lambda p, _: jax.tree_util.keystr(p), batch_stats))
            if path.endswith("['mean']"))
        group = Group(
            meta={"kind": "devices", "model": spec.name, "norm": spec.norm, "label": spec.label,
                  "devices": count},
            loops={"normzoo": training.train_loop(sharded_step)},
            args=(params, batch_stats, opt_state, jnp.float32(0.0), x, labels),
            carried={"normzoo": (0, 1, 2, 3)},
        )
        result = time_group(group, repeats=repeats, target_s=target_s, memory=False, workers=1)
        impl = result.impls["normzoo"]
        rows.append({"model": spec.label, "describe": spec.describe, "devices": count,
                     "platform": jax.default_backend(), "global_batch": global_batch,
                     "per_device_batch": global_batch // count, "norm_layers": norms,
                     "median_s": impl.median_s, "spread": impl.spread,
                     "compile_s": impl.compile_s, "collectives": collectives(hlo),
                     "forward_collectives": collectives(forward_hlo),
                     "x_elements": int(x.size)})
    return rows


# ------------------------------------------------------------------ driver
def parse_counts(text: str) -> list[int]:
    try:
        counts = [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        counts = []
    if not counts or any(c < 1 for c in counts):
        raise argparse.ArgumentTypeError(f"--devices={text!r}: expected a comma list of "
                                         "positive ints, e.g. 1,2,4,8")
    return counts


def _platform() -> str:
    """The platform the workers use: the GPU when this machine has one, else CPU (asked of
    a throwaway process, so this one never imports jax with the wrong device count)."""
    if os.environ.get("JAX_PLATFORMS", "").startswith("cpu"):
        return "cpu"
    probe = subprocess.run([sys.executable, "-c", "import jax; print(jax.default_backend())"],
                           capture_output=True, text=True)
    return (probe.stdout.strip().splitlines() or ["cpu"])[-1]


def run_counts(counts: Sequence[int], models: Sequence[str], *, quick: bool, repeats: int,
               target_s: float, log=None) -> list[dict[str, Any]]:
    """One worker process per device count; their rows, in order. Every count splits the
    same global batch: each model's, rounded up to a multiple of every count."""
    log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
    platform = _platform()
    multiple = math.lcm(*counts)
    rows = []
    for count in counts:
        command = [sys.executable, "-m", "benchmarks.devices", "--worker", "--count", str(count),
                   "--models", ",".join(models), "--repeats", str(repeats),
                   "--target-s", str(target_s), "--multiple", str(multiple)] + (
                   ["--quick"] if quick else [])
        log(f"devices {count} ({platform}): {' '.join(command[1:])}")
        done = subprocess.run(command, env=child_env(count, platform), capture_output=True,
                              text=True, cwd=os.path.dirname(os.path.dirname(
                                  os.path.abspath(__file__))))
        if done.returncode != 0:
            if platform != "cpu" and "this process has" in done.stderr:
                log(f"devices {count}: skipped, {done.stderr.strip().splitlines()[-1]}")
                continue
            raise RuntimeError(f"devices {count} worker failed:\n{done.stderr[-4000:]}")
        rows += json.loads(done.stdout.strip().splitlines()[-1])
    return rows


def _cell(found: dict[str, int]) -> str:
    """``count (largest elements)`` of one collective, ``0`` when absent."""
    return f"{found['count']} ({found['max_elements']:,})" if found["count"] else "0"


def markdown(rows: Sequence[dict[str, Any]], load: Sequence[float] | None = None) -> str:
    """The device-count table: step time, its ratio to one device, the collectives."""
    if not rows:
        return "no rows"
    platform = rows[0]["platform"]
    lines = [
        "### Train step per device count (data parallel: jit, batch sharded P('data'))",
        "",
        ("Simulated CPU devices share the machine's cores: the ratios measure the overhead "
         "of partitioning and collectives, not a speed-up." if platform == "cpu" else
         f"Real {platform} devices."),
        "Collectives: their count in the compiled train step (the largest number of elements "
        "one of them moves); forward all-reduces: those of the training-mode forward pass "
        "alone (the norms' statistics, no gradients).",
    ]
    if load:
        lines.append(f"Load average during the run: {', '.join(f'{v:.1f}' for v in load)} "
                     f"on {os.cpu_count()} cores (above the core count, times are noisy).")
    lines += [
        "",
        "| model | devices | batch (per device) | step ms | vs 1 device | BN layers | "
        "forward all-reduces | all-reduce | all-gather | reduce-scatter | all-to-all | "
        "collective-permute |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    one = {r["model"]: r["median_s"] for r in rows if r["devices"] == 1}
    for r in rows:
        c = r["collectives"]
        cells = [_cell(c[op]) for op in COLLECTIVES]
        base = one.get(r["model"])
        ratio = f"{r['median_s'] / base:.2f}x" if base else "-"
        lines.append(f"| {r['model']} | {r['devices']} | {r['global_batch']} "
                     f"({r['per_device_batch']}) | {r['median_s'] * 1e3:,.2f} | {ratio} | "
                     f"{r['norm_layers']} | {_cell(r['forward_collectives']['all-reduce'])} | "
                     + " | ".join(cells) + " |")
    return "\n".join(lines)


def cli_main(args: argparse.Namespace, command: str) -> int:
    """``python -m benchmarks --devices ...`` (:mod:`benchmarks.cli`): runs the workers, prints
    the markdown table to stdout (progress to stderr), ``--json`` writes the rows."""
    from benchmarks import cli

    quick = bool(args.quick)
    repeats = args.repeats or (cli.QUICK_REPEATS if quick else cli.REPEATS["train"])
    target_s = args.target_ms / 1e3 if args.target_ms else (1e-3 if quick else
                                                             cli.TARGET_S["train"])
    models = args.models or ["mlp"]
    rows = run_counts(args.devices, models, quick=quick, repeats=repeats, target_s=target_s)
    load = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
    print(f"`{command}`\n\n" + markdown(rows, load))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"command": command, "load_average": load, "rows": rows}, f, indent=1)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """The worker entry point (``--worker``): one device count, rows as one JSON line."""
    p = argparse.ArgumentParser(prog="python -m benchmarks.devices")
    p.add_argument("--worker", action="store_true", required=True)
    p.add_argument("--count", type=int, required=True)
    p.add_argument("--models", default="mlp")
    p.add_argument("--quick", action="store_true")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--target-s", type=float, default=0.25)
    p.add_argument("--multiple", type=int, default=1)
    args = p.parse_args(argv)
    rows = _sharded_rows(args.count, args.models.split(","), args.quick, args.repeats,
                         args.target_s, args.multiple)
    print(json.dumps(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
