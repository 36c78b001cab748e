"""The timing core: compile ahead of time, calibrate, interleave repeats, take medians.

A :class:`Group` is one comparison (one layer, pass, shape and dtype): a few *loops*, each a
function ``loop(n, *args)`` that runs ``n`` iterations of one implementation inside one
``lax.fori_loop`` (``n`` is a runtime argument, so one compilation serves every trip count),
plus the shared ``args``. :func:`time_group` compiles every loop, picks a trip count for
each implementation, times the loops interleaved (rotating the order each repeat) at ``n``
and ``2 n`` iterations and returns medians of the per-iteration slope, compile times, temporary memory of an optional single step, and a
one-iteration numerical check of each implementation against a reference one.

Nothing here knows about normalization; :mod:`benchmarks.layers` and
:mod:`benchmarks.whitening` build the groups.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import os
import statistics
import time
import warnings
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

Loop = Callable[..., Any]


@dataclasses.dataclass
class Group:
    """One comparison, timed in one interleaved run.

    Attributes:
      meta: what the row is (layer, pass, shape, dtype, ...); copied into the result.
      loops: implementation name -> ``loop(n, *args)``; ``n`` an int32 trip count.
      args: the arguments after ``n`` (arrays or pytrees), shared by every loop.
      reference: the implementation ratios are taken against (``time(other) / time(reference)``).
      roofline: the implementation whose time is the bandwidth roofline (a copy).
      cache_keys: optional implementation name -> key under which its compiled loop is
        shared between groups (the copy of one shape and dtype is compiled once).
      steps / step_args: optional implementation name -> one un-looped step, compiled only
        to read its ``memory_analysis()`` (temporary bytes), XLA's ``cost_analysis()``
        bytes accessed, and the kernels of its HLO with the bytes they move between them
        (:mod:`benchmarks.hlo`: a noise-free count of passes over memory).
      check_args: arguments for the one-iteration check run (default ``args``).
      check_fn: ``check_fn(output_of_one_iteration, check_args) -> pytree`` compared across
        implementations: the largest over leaves of ``max|leaf - ref| / max|ref|`` against
        ``check_reference``.
      check_reference: the implementation the check compares against.
      min_iters, max_repeats: per-group overrides of :func:`time_group`'s bounds (slow
        groups such as a 512 x 512 eigh use one iteration and fewer repeats).
      carried: implementation name -> positions in ``args`` that its loop's output carries
        (the output is a tuple in that order, or one array for one position). Those
        arguments are donated and every run starts from the previous run's output, so a
        run neither copies its input into the loop buffer nor allocates (and page-faults)
        a fresh output: without this a short run of a copy costs several times a copy.
    """

    meta: dict[str, Any]
    loops: dict[str, Loop]
    args: tuple
    reference: str | None = None
    roofline: str | None = None
    cache_keys: dict[str, Any] = dataclasses.field(default_factory=dict)
    steps: dict[str, Callable[..., Any]] = dataclasses.field(default_factory=dict)
    #: timing controls (a second, identical copy loop): timed like the others, never checked;
    #: their ratio to the roofline is the run's spread between identical programs.
    controls: tuple[str, ...] = ()
    step_args: tuple = ()
    check_args: tuple | None = None
    check_fn: Callable[[Any, tuple], Any] | None = None
    check_reference: str | None = None
    min_iters: int | None = None
    max_repeats: int | None = None
    carried: dict[str, tuple[int, ...]] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass
class ImplResult:
    """Timings of one implementation in one group (seconds per loop iteration)."""

    name: str
    compile_s: float
    iters: int
    times_s: list[float]
    temp_bytes: int | None = None
    bytes_accessed: float | None = None
    kernel_bytes: int | None = None
    kernels: int | None = None
    check_rel: float | None = None
    finite: bool = True

    @property
    def median_s(self) -> float:
        return statistics.median(self.times_s)

    @property
    def spread(self) -> float:
        """Interquartile range over the median: how noisy the repeats were."""
        if len(self.times_s) < 4:
            return (max(self.times_s) - min(self.times_s)) / self.median_s
        q1, _, q3 = statistics.quantiles(self.times_s, n=4)
        return (q3 - q1) / self.median_s

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "median_s": self.median_s,
            "min_s": min(self.times_s),
            "spread": self.spread,
            "times_s": list(self.times_s),
            "iters": self.iters,
            "compile_s": self.compile_s,
            "temp_bytes": self.temp_bytes,
            "bytes_accessed": self.bytes_accessed,
            "kernel_bytes": self.kernel_bytes,
            "kernels": self.kernels,
            "check_rel": self.check_rel,
            "finite": self.finite,
        }


@dataclasses.dataclass
class GroupResult:
    """Result of :func:`time_group`: per-implementation results and the derived ratios."""

    meta: dict[str, Any]
    impls: dict[str, ImplResult]
    reference: str | None
    roofline: str | None
    notes: list[str] = dataclasses.field(default_factory=list)
    wall_s: dict[str, float] = dataclasses.field(default_factory=dict)
    controls: tuple[str, ...] = ()

    def control_ratio(self) -> float | None:
        """``time(roofline) / time(its identical twin)``: 1 up to this run's noise."""
        twins = [c for c in self.controls if c in self.impls]
        if not twins or self.roofline not in self.impls:
            return None
        return self.impls[self.roofline].median_s / self.impls[twins[0]].median_s

    def ratio(self, other: str, reference: str | None = None) -> float | None:
        """``time(other) / time(reference)``; > 1 means the reference is faster."""
        reference = reference or self.reference
        if other not in self.impls or reference not in self.impls:
            return None
        return self.impls[other].median_s / self.impls[reference].median_s

    def copy_fraction(self, name: str) -> float | None:
        """``time(copy) / time(name)``: the fraction of copy bandwidth reached."""
        if self.roofline not in self.impls or name not in self.impls:
            return None
        return self.impls[self.roofline].median_s / self.impls[name].median_s

    def to_dict(self) -> dict[str, Any]:
        names = [n for n in self.impls if n != self.roofline and n not in self.controls]
        return {
            "meta": dict(self.meta),
            "reference": self.reference,
            "roofline": self.roofline,
            "impls": {n: r.to_dict() for n, r in self.impls.items()},
            "ratios_vs_reference": {
                n: self.ratio(n) for n in names if n != self.reference and self.reference
            },
            "copy_fraction": {n: self.copy_fraction(n) for n in names if self.roofline},
            "notes": list(self.notes),
            "wall_s": dict(self.wall_s),
            "controls": list(self.controls),
            "control_ratio": self.control_ratio(),
        }


def _abstract(tree: Any) -> Any:
    return jax.tree_util.tree_map(
        lambda a: jax.ShapeDtypeStruct(jnp.shape(a), jnp.result_type(a)), tree)


def _signature(tree: Any) -> tuple:
    leaves, treedef = jax.tree_util.tree_flatten(_abstract(tree))
    return (treedef, tuple((leaf.shape, str(leaf.dtype)) for leaf in leaves))


def compile_loop(loop: Loop, args: tuple) -> tuple[Any, float]:
    """Lowers and compiles ``loop(n, *args)`` ahead of time; returns (compiled, seconds)."""
    start = time.perf_counter()
    compiled = jax.jit(loop).lower(np.int32(1), *_abstract(args)).compile()
    return compiled, time.perf_counter() - start


def temp_bytes(step: Callable[..., Any], args: tuple) -> int | None:
    """``temp_size_in_bytes`` of the compiled ``step(*args)``, or None if not reported."""
    return _temp(jax.jit(step).lower(*_abstract(args)).compile())


def compile_group(
    group: Group,
    *,
    cache: dict[Any, tuple[Any, float]] | None = None,
    memory: bool = True,
    workers: int | None = None,
) -> tuple[dict[str, Any], dict[str, float], dict[str, int | None]]:
    """Compiles every loop (and step, for ``memory``) of ``group``, several at a time.

    Lowering (tracing, Python) is serial; XLA compilation runs in ``workers`` threads. The
    reported compile time of a loop is its lower time plus the wall time of its own
    ``compile()``, which is inflated when more compilations than cores overlap: use
    ``workers=1`` (the default of full runs) for compile times worth comparing.

    Returns:
      ``(compiled loops, compile seconds, (temp bytes, bytes accessed) of the steps)``, each
      keyed by implementation.
    """
    cache = {} if cache is None else cache
    workers = max(1, workers or os.cpu_count() or 1)
    compiled: dict[str, Any] = {}
    compile_s: dict[str, float] = {}
    keys: dict[str, Any] = {}
    loop_jobs: dict[str, Any] = {}
    step_jobs: dict[str, Any] = {}

    def timed_compile(lowered, lower_s):
        started = time.perf_counter()
        result = lowered.compile()
        return result, lower_s + time.perf_counter() - started

    with concurrent.futures.ThreadPoolExecutor(max_workers=workers) as pool:
        for name, loop in group.loops.items():
            donate = tuple(i + 1 for i in group.carried.get(name, ()))
            key = group.cache_keys.get(name)
            if key is not None:  # the compiled signature depends on every argument's type
                key = keys[name] = (key, donate, _signature(group.args))
                if key in cache:
                    compiled[name], compile_s[name] = cache[key]
                    continue
            started = time.perf_counter()
            lowered = jax.jit(loop, donate_argnums=donate).lower(
                np.int32(1), *_abstract(group.args))
            loop_jobs[name] = pool.submit(timed_compile, lowered, time.perf_counter() - started)
        if memory:
            for name, step in group.steps.items():
                lowered = jax.jit(step).lower(*_abstract(group.step_args))
                step_jobs[name] = pool.submit(lowered.compile)
        for name, job in loop_jobs.items():
            compiled[name], compile_s[name] = job.result()
            if name in keys:
                cache[keys[name]] = (compiled[name], compile_s[name])
        temps = {name: _analyse(job.result()) for name, job in step_jobs.items()}
    return compiled, compile_s, temps


def _temp(compiled: Any) -> int | None:
    analysis = compiled.memory_analysis()
    return None if analysis is None else int(analysis.temp_size_in_bytes)


def bytes_accessed(compiled: Any) -> float | None:
    """XLA's estimate of the bytes a compiled computation reads and writes, or None."""
    try:
        cost = compiled.cost_analysis()
    except Exception:  # noqa: BLE001 - not every backend reports it
        return None
    if isinstance(cost, (list, tuple)):
        cost = cost[0] if cost else None
    return None if not cost or "bytes accessed" not in cost else float(cost["bytes accessed"])


def _analyse(compiled: Any) -> tuple[int | None, float | None, int | None, int | None]:
    from benchmarks.hlo import kernels

    try:
        ks = kernels(compiled)
        kernel_bytes, count = sum(k.bytes for k in ks), len(ks)
    except Exception:  # noqa: BLE001 - the HLO text format is not a stable API
        kernel_bytes, count = None, None
    return _temp(compiled), bytes_accessed(compiled), kernel_bytes, count


def per_iteration(short: float, long: float, n: int) -> float:
    """Seconds per iteration from runs of ``n`` and ``2 n`` iterations: the slope.

    Every call also pays costs that do not scale with ``n``: dispatch, the loop-invariant
    work XLA hoists out of the loop, first touch of the temporary buffers it allocates per
    call. On XLA:CPU they can exceed the time of several iterations, so ``total / n`` at a
    few iterations would measure the runtime more than the layer. A slope that noise made non-positive falls back to ``long / 2n``.
    """
    slope = (long - short) / n
    return slope if slope > 0 else long / (2 * n)


def _run(compiled: Any, n: int, args: tuple) -> tuple[float, Any]:
    start = time.perf_counter()
    out = compiled(np.int32(n), *args)
    jax.block_until_ready(out)
    return time.perf_counter() - start, out


def _fresh(args: tuple, positions: Sequence[int]) -> tuple:
    """``args`` with private copies of the donated positions (the originals stay valid)."""
    return tuple(jax.tree_util.tree_map(jnp.copy, a) if i in positions else a
                 for i, a in enumerate(args))


def _feed(args: tuple, out: Any, positions: Sequence[int]) -> tuple:
    """The next run's arguments: the loop's output in the carried positions."""
    if not positions:
        return args
    outs = out if len(positions) > 1 else (out,)
    new = list(args)
    for i, value in zip(positions, outs):
        new[i] = value
    return tuple(new)


def _all_finite(tree: Any) -> bool:
    leaves = jax.tree_util.tree_leaves(tree)
    return all(bool(np.all(np.isfinite(np.asarray(leaf, np.float32)))) for leaf in leaves)


def time_group(
    group: Group,
    *,
    repeats: int = 15,
    target_s: float = 0.05,
    min_iters: int = 2,
    max_iters: int = 100_000,
    cache: dict[Any, tuple[Any, float]] | None = None,
    memory: bool = True,
    workers: int | None = None,
) -> GroupResult:
    """Compiles, calibrates and times every loop of ``group`` interleaved.

    Args:
      repeats: timed runs per implementation (the median is reported).
      target_s: wall time aimed at for the ``n`` iterations of one timed run; ``n`` is
        chosen per implementation from a one-iteration run. Each repeat runs ``n`` then
        ``2 n`` iterations and keeps the slope (:func:`per_iteration`).
      min_iters, max_iters: bounds on ``n``.
      cache: shared compiled loops, keyed by ``group.cache_keys`` (filled here).
      memory: also compile ``group.steps`` and read their temporary bytes.
      workers: threads compiling in parallel (XLA releases the GIL); default: CPU count.

    Returns:
      a :class:`GroupResult` with per-iteration times (seconds).
    """
    cache = {} if cache is None else cache
    args = group.args
    started = time.perf_counter()
    compiled, compile_s, temps = compile_group(group, cache=cache, memory=memory, workers=workers)
    compiled_at = time.perf_counter()

    # One-iteration runs: warm-up, numerical check, and the per-iteration estimate.
    check_args = group.check_args if group.check_args is not None else args
    carried = {name: tuple(group.carried.get(name, ())) for name in compiled}
    state = {name: _fresh(args, carried[name]) for name in compiled}
    checked: dict[str, Any] = {}
    per_iter: dict[str, float] = {}
    finite: dict[str, bool] = {}
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*donated buffers were not usable.*")
        for name, fn in compiled.items():
            run_args = _fresh(check_args, carried[name])
            _, out = _run(fn, 1, run_args)
            finite[name] = _all_finite(out)
            if (group.check_fn is not None and name != group.roofline
                    and name not in group.controls):
                leaves = jax.tree_util.tree_leaves(group.check_fn(out, check_args))
                checked[name] = [np.asarray(leaf, np.float64) for leaf in leaves]
            for _ in range(2):  # the first run after compiling can be slower
                one, out = _run(fn, 1, state[name])
                state[name] = _feed(state[name], out, carried[name])
            # One call's fixed cost can exceed an iteration: estimate the slope from a run
            # aimed at target_s, so that n iterations take ~target_s beyond that cost.
            k = int(min(max_iters, max(2, round(target_s / max(one, 1e-9)))))
            seconds, out = _run(fn, k, state[name])
            state[name] = _feed(state[name], out, carried[name])
            per_iter[name] = (seconds - one) / (k - 1) if seconds > one else seconds / k
        if group.min_iters is not None:
            min_iters = group.min_iters
        if group.max_repeats is not None:
            repeats = min(repeats, group.max_repeats)
        # Per implementation: the slope needs ``n`` iterations to take well over the noise
        # of one call, for the copy as for the slowest layer.
        iters = {name: int(min(max_iters, max(min_iters, round(target_s / max(t, 1e-9)))))
                 for name, t in per_iter.items()}

        names = list(compiled)
        times: dict[str, list[float]] = {name: [] for name in names}
        order = np.random.default_rng(0)
        for rep in range(repeats):
            # A new order each round (no implementation always follows the same one) and
            # fresh copies of the carried buffers (made before the clock starts): the
            # placement of a buffer in memory (huge pages or not, cache-set aliasing) moves
            # identical programs apart on CPU; resampling it makes that noise, not bias.
            for name in order.permutation(names):
                n = iters[name]
                state[name] = _fresh(state[name], carried[name])
                jax.block_until_ready(state[name])
                seconds = {}
                # Both runs on the same buffers, in a random order (no bias from which
                # one follows the fresh copy).
                for count in order.permutation([n, 2 * n]):
                    seconds[count], out = _run(compiled[name], int(count), state[name])
                    state[name] = _feed(state[name], out, carried[name])
                times[name].append(per_iteration(seconds[n], seconds[2 * n], n))
        for name in names:  # values stay bounded over the whole run
            finite[name] = finite[name] and _all_finite(
                [state[name][i] for i in carried[name]])

    results = {
        name: ImplResult(name, compile_s[name], iters[name], times[name], finite=finite[name])
        for name in names
    }
    notes = []
    if group.check_fn is not None and group.check_reference in checked:
        ref = checked[group.check_reference]
        for name, leaves in checked.items():
            if name == group.roofline or name in group.controls or len(leaves) != len(ref):
                continue
            results[name].check_rel = max(
                (float(np.max(np.abs(v - r))) / max(float(np.max(np.abs(r))), 1e-30)
                 for v, r in zip(leaves, ref) if r.size),
                default=0.0,
            )
    for name, ok in finite.items():
        if not ok:
            notes.append(f"{name}: non-finite values (after one iteration or at the end)")
    for name, (temp, accessed, kernel_bytes, count) in temps.items():
        if name in results:
            impl = results[name]
            impl.temp_bytes, impl.bytes_accessed = temp, accessed
            impl.kernel_bytes, impl.kernels = kernel_bytes, count
    wall = {"compile": compiled_at - started, "run": time.perf_counter() - compiled_at}
    return GroupResult(dict(group.meta), results, group.reference, group.roofline, notes, wall,
                       tuple(group.controls))
