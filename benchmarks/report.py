"""Reporting: machine description, markdown tables, issue-5 target checks, JSON, RESULTS.md."""

from __future__ import annotations

import dataclasses
import datetime
import json
import math
import os
import platform
import sys
from typing import Any, Iterable, Sequence

from benchmarks.harness import GroupResult

FLAX = ("flax_fast", "flax_2pass")
#: Implementations shown first, in this order; any others (prototypes) follow.
ORDER = ("normzoo", "normzoo_xla", "flax_fast", "flax_2pass", "jnp")


# -------------------------------------------------------------------------- machine


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _load() -> list[float] | None:
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except OSError:  # pragma: no cover - not on every platform
        return None


def machine_info() -> dict[str, Any]:
    """Where and with what the numbers were taken."""
    import flax
    import jax
    import jaxlib
    import numpy

    devices = jax.devices()
    return {
        "platform": platform.platform(),
        "cpu": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "backend": jax.default_backend(),
        "devices": [str(d) for d in devices],
        "device_kind": devices[0].device_kind if devices else None,
        "python": platform.python_version(),
        "jax": jax.__version__,
        "jaxlib": jaxlib.__version__,
        "flax": flax.__version__,
        "numpy": numpy.__version__,
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
        "load_average": _load(),
        "native_kernels": _native_kernels(),
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
    }


def _native_kernels() -> str:
    from normzoo.functional import native

    if native.available():
        return "on"
    return f"off ({native.failure() or 'switched off'})"


def command_line(argv: Sequence[str] | None = None) -> str:
    argv = sys.argv[1:] if argv is None else list(argv)
    return " ".join(["python -m benchmarks", *argv])


# --------------------------------------------------------------------------- format


def _us(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds * 1e6:,.1f}"


def _x(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def _kib(value: int | None) -> str:
    return "-" if value is None else f"{value / 1024:,.1f}"


def _names(result: GroupResult) -> list[str]:
    names = [n for n in ORDER if n in result.impls]
    return names + [n for n in result.impls if n not in names and n != result.roofline]


def _table(header: list[str], rows: Iterable[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def _shape(meta: dict[str, Any]) -> str:
    return "x".join(str(s) for s in meta["shape"])


def layer_table(results: Sequence[GroupResult]) -> str:
    """Times per iteration (µs), ratios ``time(other) / time(reference)`` and copy fractions."""
    layer = [r for r in results if r.meta.get("kind") == "layer"]
    if not layer:
        return ""
    others: list[str] = []
    for r in layer:
        others += [n for n in _names(r)
                   if n != r.reference and n not in others and n not in r.controls]
    ref = layer[0].reference or "normzoo"
    short = {"flax_fast": "flax fast", "flax_2pass": "flax 2-pass"}
    header = (["layer", "pass", "dtype", "shape", "copy µs", f"{ref} µs"]
              + [f"{short.get(n, n)} / {ref}" for n in others]
              + [f"{ref} of copy", "flax fast of copy", "copy / twin", "noise"])
    rows = []
    for r in layer:
        spread = max(i.spread for i in r.impls.values())
        rows.append([
            r.meta["label"], r.meta["pass"], r.meta["dtype"], _shape(r.meta),
            _us(r.impls[r.roofline].median_s) if r.roofline in r.impls else "-",
            _us(r.impls[r.reference].median_s) if r.reference in r.impls else "-",
            *[_x(r.ratio(n)) for n in others],
            _x(r.copy_fraction(r.reference)), _x(r.copy_fraction("flax_fast")),
            _x(r.control_ratio()), f"{100 * spread:.0f}%",
        ])
    return _table(header, rows)


def cost_table(results: Sequence[GroupResult]) -> str:
    """Per implementation: compile seconds, one step's temporary bytes and memory passes."""
    layer = [r for r in results if r.meta.get("kind") == "layer"]
    if not layer:
        return ""
    header = ["layer", "pass", "dtype", "impl", "compile s", "step temp KiB", "step kernels",
              "step passes", "check"]
    rows = []
    for r in layer:
        names = _names(r) + ([r.roofline] if r.roofline in r.impls else [])
        for n in (n for n in names if n not in r.controls):
            impl = r.impls[n]
            passes = (None if impl.kernel_bytes is None or not r.meta.get("x_bytes")
                      else impl.kernel_bytes / r.meta["x_bytes"])
            rows.append([
                r.meta["label"], r.meta["pass"], r.meta["dtype"], n, f"{impl.compile_s:.2f}",
                _kib(impl.temp_bytes), "-" if impl.kernels is None else str(impl.kernels),
                _x(passes),
                "-" if impl.check_rel is None else f"{impl.check_rel:.0e}",
            ])
    return _table(header, rows)


def whitening_table(results: Sequence[GroupResult]) -> str:
    """Per (G, groups): time per call of each op and its multiple of one G x G matmul."""
    white = [r for r in results if r.meta.get("kind") == "whitening"]
    if not white:
        return ""
    header = ["G", "groups", "samples", "op", "jnp µs", "jnp x matmul", "normzoo µs",
              "normzoo x matmul", "compile s jnp", "compile s normzoo"]
    rows = []
    for r in white:
        for name, impl in r.impls.items():
            if name.startswith("nz_"):
                continue
            zoo = r.impls.get(f"nz_{name}")
            rows.append([
                str(r.meta["G"]), str(r.meta["groups"]), str(r.meta["samples"]), name,
                _us(impl.median_s), _x(r.ratio(name)),
                _us(zoo.median_s) if zoo else "-", _x(r.ratio(f"nz_{name}")) if zoo else "-",
                f"{impl.compile_s:.2f}", f"{zoo.compile_s:.2f}" if zoo else "-",
            ])
    return _table(header, rows)


# -------------------------------------------------------------------------- targets


def targets(results: Sequence[GroupResult]) -> list[dict[str, Any]]:
    """The CPU targets of issue 5 checked on this run; a speed target holds when it holds
    against both flax variants (fast and two-pass variance), i.e. on the smaller ratio."""
    checks = []
    spread = noise_floor(results)

    def add(target, row, value, threshold, ok, tie=False):
        checks.append({"target": target, "row": row, "value": value, "threshold": threshold,
                       "ok": bool(ok) if value is not None else None,
                       "tie": bool(tie) and not ok and value is not None})

    for r in results:
        m = r.meta
        if m.get("kind") != "layer" or "normzoo" not in r.impls:
            continue
        row = f"{m['label']} {m['pass']} {m['dtype']}"
        ratios = [r.ratio(n) for n in FLAX if n in r.impls]
        worst = min(ratios) if ratios else None
        add("never slower than flax", row, worst, 1.0, worst is not None and worst >= 1.0,
            tie=spread is not None and worst is not None and worst >= 1.0 / (1.0 + spread))
        if m["layer"] == "gn" and m["pass"] == "fwd":
            add("GroupNorm fwd >= 2x flax", row, worst, 2.0, worst is not None and worst >= 2.0)
        if m["pass"] == "fwd+bwd" and m["variant"] in ("ln", "rms", "bn-train", "gn"):
            add("fwd+bwd >= 1.5x flax", row, worst, 1.5, worst is not None and worst >= 1.5)
        if m["pass"] == "fwd" and m["layer"] in ("ln", "rms", "bn"):
            frac = r.copy_fraction("normzoo")
            add("fwd >= 0.8 of copy bandwidth", row, frac, 0.8, frac is not None and frac >= 0.8)
        if m["pass"] == "fwd+bwd":
            zoo = r.impls["normzoo"].temp_bytes
            flax = [r.impls[n].temp_bytes for n in FLAX if n in r.impls]
            flax = [b for b in flax if b is not None]
            if zoo is not None and flax:
                add("step temp memory <= flax", row, zoo / max(min(flax), 1), 1.0,
                    zoo <= min(flax))
    for r in results:
        m = r.meta
        if m.get("kind") != "whitening":
            continue
        prefix = "nz_" if "nz_newton5" in r.impls else ""
        who = "normzoo" if prefix else "jnp"
        row = f"G={m['G']} groups={m['groups']} ({who})"
        t = {k: r.impls[prefix + k].median_s for k in ("zca_eigh", "cholesky", "newton5")
             if prefix + k in r.impls}
        if m["G"] == 64 and {"zca_eigh", "newton5"} <= set(t):
            ratio = t["zca_eigh"] / t["newton5"]
            add("IterNorm T=5 faster than eigh-ZCA (G=64)", row, ratio, 1.0, ratio > 1.0)
        if len(t) == 3:
            ratio = min(t["zca_eigh"], t["newton5"]) / t["cholesky"]
            add("Cholesky faster than eigh-ZCA and IterNorm", row, ratio, 1.0, ratio > 1.0)
    return checks


def control_gaps(results: Sequence[GroupResult]) -> list[float]:
    """Per layer group, how far apart the copy loop and its identical twin landed."""
    return sorted(math.exp(abs(math.log(c))) - 1.0 for r in results
                  if r.meta.get("kind") == "layer" and (c := r.control_ratio()))


def noise_floor(results: Sequence[GroupResult]) -> float | None:
    """The median gap between two identical programs timed in this run (copy vs twin).

    Identical programs land apart by buffer placement in memory and by other tenants of
    the machine; a ratio closer to 1 than this typical gap is a tie. (The median, not the
    largest gap: one disturbed group would otherwise make every comparison a tie.)
    """
    gaps = control_gaps(results)
    return gaps[len(gaps) // 2] if gaps else None


def targets_table(checks: Sequence[dict[str, Any]]) -> str:
    if not checks:
        return ""

    def verdict(c):
        if c["ok"] is None:
            return "-"
        return "yes" if c["ok"] else "tie (within noise)" if c.get("tie") else "**no**"

    rows = [[c["target"], c["row"], _x(c["value"]), _x(c["threshold"]), verdict(c)]
            for c in checks]
    return _table(["target (issue 5)", "row", "value", "threshold", "met"], rows)


# --------------------------------------------------------------------------- output


def floors_section(floors: Any) -> list[str]:
    """The C++ floors (:class:`benchmarks.floors.Floors`) as markdown lines."""
    from benchmarks import floors as cpu_floors

    return [
        "### Float32 forward floors on this CPU (C++, `benchmarks/floors.py`)", "",
        f"Kernels that do less than a layer, in place on {floors.threads} threads, each timed "
        "beside a copy of the same array, back to back as the loops above (median of "
        f"{floors.repeats} repeat{'s' if floors.repeats != 1 else ''}; `of copy` = time(copy) / "
        "time(kernel), as the layer table's \"normzoo of copy\"). A layer that does all of a "
        "kernel's work and more should not beat that kernel's fraction on this machine: "
        "LayerNorm and RMSNorm do more than `row_two_pass` or "
        "`row_interleaved` (each output waits for its row's statistic), BatchNorm in training "
        "more than `batch_two_pass` (each output waits for every row's). The LayerNorm "
        f"replica's largest error against float64: {floors.layernorm_max_error:.1e}.", "",
        cpu_floors.table(floors), ""]


def markdown(results: Sequence[GroupResult], notes: Sequence[str] = (), floors: Any = None
             ) -> str:
    parts = []
    table = layer_table(results)
    if table:
        parts += ["### Layers: time per iteration, ratios (> 1: normzoo faster), copy fractions",
                  "", table, ""]
    table = cost_table(results)
    if table:
        parts += ["### Per implementation: compile time, one step's memory, check",
                  "", "compile s: lower + compile of the timed loop. Of one un-looped step: temp = "
                  "`memory_analysis().temp_size_in_bytes`; kernels = top-level kernels of the "
                  "compiled HLO; passes = bytes those kernels read and write / bytes of x "
                  "(benchmarks/hlo.py: noise-free; a copy is 2; XLA's cost_analysis bytes are "
                  "in the JSON). check: max |difference| / max "
                  "|value| against flax two-pass after one iteration (y for fwd; dx and "
                  "dparams for fwd+bwd).", "", table, ""]
    table = whitening_table(results)
    if table:
        parts += ["### Whitening (float32): time per call and multiple of one G x G matmul",
                  "", table, ""]
    table = targets_table(targets(results))
    if table:
        floor = noise_floor(results)
        parts += ["### Issue 5 targets in this run (against both flax variants)", ""]
        if floor is not None:
            gaps = control_gaps(results)
            parts += [f"Noise floor of this run: two identical copy loops (copy / twin) landed "
                      f"{100 * floor:.0f}% apart in the median group (largest gap "
                      f"{100 * gaps[-1]:.0f}%); a ratio within the median gap of 1 is "
                      "reported as a tie.", ""]
        parts += [table, ""]
    if floors is not None:
        parts += floors_section(floors)
    all_notes = list(notes) + [f"{_row(r)}: {n}" for r in results for n in r.notes]
    if all_notes:
        parts += ["### Notes", ""] + [f"- {n}" for n in all_notes] + [""]
    return "\n".join(parts)


def _row(r: GroupResult) -> str:
    m = r.meta
    if m.get("kind") == "whitening":
        return f"whitening G={m['G']} groups={m['groups']}"
    return f"{m['label']} {m['pass']} {m['dtype']}"


def to_json(
    results: Sequence[GroupResult], meta: dict[str, Any], notes: Sequence[str] = (),
    floors: Any = None,
) -> dict:
    return {
        "meta": meta,
        "groups": [r.to_dict() for r in results],
        "targets": targets(results),
        "floors": dataclasses.asdict(floors) if floors is not None else None,
        "notes": list(notes),
    }


def write_json(path: str, payload: dict) -> None:
    with open(path, "w") as f:
        json.dump(payload, f, indent=1)
        f.write("\n")


def results_markdown(results: Sequence[GroupResult], meta: dict[str, Any], notes: Sequence[str],
                     settings: dict[str, Any], floors: Any = None) -> str:
    """The whole RESULTS.md: command, machine, settings, tables."""
    load = meta.get("load_average")
    load_end = meta.get("load_average_end")
    lines = [
        "# normzoo benchmark results",
        "",
        "Generated by `python -m benchmarks --write-results`; see `benchmarks/__init__.py` for the",
        "protocol (one jitted `lax.fori_loop` per implementation, output fed back, the time per",
        "iteration the slope between runs of n and 2n iterations, interleaved repeats, medians,",
        "a copy `x + 1` of the same array as the roofline).",
        "",
        f"- command: `{meta['command']}`",
        f"- date: {meta['date']}",
        f"- machine: {meta['cpu']} ({meta['cpu_count']} cores), {meta['platform']}",
        f"- devices: {', '.join(meta['devices'][:4])}"
        + (f" (+{len(meta['devices']) - 4} more)" if len(meta["devices"]) > 4 else ""),
        f"- versions: python {meta['python']}, jax {meta['jax']}, jaxlib {meta['jaxlib']}, "
        f"flax {meta['flax']}, numpy {meta['numpy']}",
        f"- XLA_FLAGS: `{meta['xla_flags'] or '(none)'}`",
        f"- load average (1, 5, 15 min) at start: {load}, at end: {load_end}",
        f"- settings: {', '.join(f'{k}={v}' for k, v in settings.items())}",
        f"- normzoo's native CPU kernels: {meta.get('native_kernels', 'unknown')}",
        "",
        "Implementations: `normzoo` (on CPU its native kernels where "
        "`normzoo.functional.fused.NATIVE_PLAN` and `NATIVE_BACKWARD_PLAN` pick them), "
        "`normzoo_xla` (the same layers with the kernels off: the pure-XLA path), flax.linen "
        "with `use_fast_variance` True and False, a textbook `jax.numpy` version, and the copy. "
        "Step temp memory is XLA's count of its own buffers: the native kernels' scratch "
        "(per-thread partial sums, at most a few hundred KiB here) is not in it.",
        "",
        markdown(results, notes, floors),
    ]
    return "\n".join(lines)
