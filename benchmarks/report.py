"""Reporting: machine description, markdown tables, target checks, JSON, RESULTS.md."""

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
ORDER = ("normzoo", "normzoo_cpu", "flax_fast", "flax_2pass", "jnp")


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
    from benchmarks import backend

    return backend.status()


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
    """The layer rows' CPU targets checked on this run; a speed target holds when it holds
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
    return _table(["target", "row", "value", "threshold", "met"], rows)



# ------------------------------------------------- rows that look like training


def _gap(a: float | None, b: float | None) -> float | None:
    """How far apart two times are, as a fraction: ``exp(|log(a / b)|) - 1``."""
    if not a or not b:
        return None
    return math.exp(abs(math.log(a / b))) - 1.0


def _median(values: Sequence[float]) -> float | None:
    values = sorted(values)
    return values[len(values) // 2] if values else None


def row_noise(r: GroupResult) -> float | None:
    """The gap between the row's two identical programs: the copy and its twin for a loss
    row, the flax train loop and its separately compiled twin for a train row."""
    if r.meta.get("kind") == "train":
        twin = next(iter(r.controls), None)
        if "flax" not in r.impls or twin not in r.impls:
            return None
        return _gap(r.impls["flax"].median_s, r.impls[twin].median_s)
    c = r.control_ratio()
    return None if c is None else _gap(c, 1.0)


def run_noise(results: Sequence[GroupResult], kind: str) -> float | None:
    """The median of :func:`row_noise` over this run's rows of ``kind``."""
    return _median([g for r in results if r.meta.get("kind") == kind
                    and (g := row_noise(r)) is not None])


def verdict(ratio: float | None, noise: float | None) -> str:
    """``time(flax) / time(normzoo)`` judged against the noise: >= 1 is "yes"; closer to 1
    than the noise (``ratio >= 1 / (1 + noise)``) is a tie; anything else is "no"."""
    if ratio is None:
        return "-"
    if ratio >= 1.0:
        return "yes"
    if noise is not None and ratio >= 1.0 / (1.0 + noise):
        return "tie"
    return "**no**"


def _tie_noise(r: GroupResult, results: Sequence[GroupResult]) -> float | None:
    """The noise a row's ratio is judged against: the larger of its own twin gap and the
    run's median twin gap for rows of its kind (one quiet row does not make a small gap
    significant when identical programs land further apart elsewhere in the run)."""
    gaps = [g for g in (row_noise(r), run_noise(results, r.meta.get("kind"))) if g is not None]
    return max(gaps) if gaps else None


def _row_name(r: GroupResult) -> str:
    m = r.meta
    if m.get("kind") == "loss":
        return f"{m['label']} loss ({m['mode']}) {m['dtype']}"
    return f"{m['label']} train step {m['dtype']}"


def training_verdicts(results: Sequence[GroupResult]) -> list[dict[str, Any]]:
    """Per loss or train row: is the default path (and the CPU kernels) at least as fast as
    flax.linen, ties within the noise counting as ties."""
    out = []
    for r in results:
        if r.meta.get("kind") not in ("loss", "train") or "flax" not in r.impls:
            continue
        noise = _tie_noise(r, results)
        default = r.ratio("flax", "normzoo")
        kernels = r.ratio("flax", "normzoo_cpu")
        out.append({"row": _row_name(r), "kind": r.meta["kind"], "flax_over_normzoo": default,
                    "flax_over_normzoo_cpu": kernels, "row_noise": row_noise(r),
                    "noise": noise, "default": verdict(default, noise),
                    "cpu_kernels": verdict(kernels, noise) if kernels is not None else "n/a"})
    return out


def _ms(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds * 1e3:,.2f}"


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.0f}%"


def _impl_ratio(r: GroupResult, other: str, ref: str) -> str:
    value = r.ratio(other, ref)
    return "n/a" if value is None else _x(value)


def loss_table(results: Sequence[GroupResult]) -> str:
    rows_ = [r for r in results if r.meta.get("kind") == "loss"]
    if not rows_:
        return ""
    header = ["layer", "mode", "dtype", "shape", "copy µs", "normzoo µs", "flax / normzoo",
              "flax / normzoo+cpu", "copy / twin", "spread", "default vs flax",
              "cpu kernels vs flax"]
    rows = []
    for r in rows_:
        noise = _tie_noise(r, results)
        spread = max(i.spread for i in r.impls.values())
        kernels = r.ratio("flax", "normzoo_cpu")
        rows.append([
            r.meta["label"], r.meta["mode"], r.meta["dtype"], _shape(r.meta),
            _us(r.impls[r.roofline].median_s) if r.roofline in r.impls else "-",
            _us(r.impls["normzoo"].median_s) if "normzoo" in r.impls else "-",
            _impl_ratio(r, "flax", "normzoo"), _impl_ratio(r, "flax", "normzoo_cpu"),
            _x(r.control_ratio()), _pct(spread),
            verdict(r.ratio("flax", "normzoo"), noise),
            verdict(kernels, noise) if kernels is not None else "n/a",
        ])
    return _table(header, rows)


def train_table(results: Sequence[GroupResult]) -> str:
    rows_ = [r for r in results if r.meta.get("kind") == "train"]
    if not rows_:
        return ""
    header = ["model", "dtype", "setup", "flax ms", "normzoo ms", "flax / normzoo",
              "flax / normzoo+cpu", "flax / flax twin", "spread", "compile s flax / normzoo",
              "first-step loss vs flax", "default vs flax", "cpu kernels vs flax"]
    rows = []
    for r in rows_:
        noise = _tie_noise(r, results)
        twin = next(iter(r.controls), None)
        spread = max(i.spread for i in r.impls.values())
        kernels = r.ratio("flax", "normzoo_cpu")
        checks = [i.check_rel for n, i in r.impls.items()
                  if n != "flax" and i.check_rel is not None]
        compile_s = " / ".join(f"{r.impls[n].compile_s:.1f}" for n in ("flax", "normzoo")
                               if n in r.impls)
        rows.append([
            r.meta["label"], r.meta["dtype"], r.meta.get("describe", _shape(r.meta)),
            _ms(r.impls["flax"].median_s) if "flax" in r.impls else "-",
            _ms(r.impls["normzoo"].median_s) if "normzoo" in r.impls else "-",
            _impl_ratio(r, "flax", "normzoo"), _impl_ratio(r, "flax", "normzoo_cpu"),
            _impl_ratio(r, "flax", twin) if twin else "-", _pct(spread), compile_s,
            f"{max(checks):.0e}" if checks else "-",
            verdict(r.ratio("flax", "normzoo"), noise),
            verdict(kernels, noise) if kernels is not None else "n/a",
        ])
    return _table(header, rows)


def training_sections(results: Sequence[GroupResult]) -> list[str]:
    """The loss and train-step tables with their reading instructions."""
    parts: list[str] = []
    loss, train = loss_table(results), train_table(results)
    if not loss and not train:
        return parts
    noise = {k: run_noise(results, k) for k in ("loss", "train")}
    rule = ("Ratios are time(flax.linen) / time(normzoo), medians of interleaved repeats "
            "(> 1: normzoo faster). A row is judged against the larger of its own twin gap and "
            "this run's median twin gap for its kind (loss rows: "
            f"{_pct(noise['loss'])}; train rows: {_pct(noise['train'])}): a ratio >= 1 is "
            "\"yes\", a ratio below 1 but within that noise is a \"tie\", anything slower is "
            "**no**. `spread`: the largest interquartile range / median over the row's columns.")
    if any("normzoo_cpu" not in r.impls for r in results if _is_training(r)):
        rule += (" `n/a`: the CPU kernels (`normzoo.backends.cpu`) were not available in this "
                 "run.")
    if loss:
        parts += ["### Layer loops whose loss depends on y", "",
                  "`loss = 0.5 sum(y^2) + sum(y c)`, c fixed and random, inside one "
                  "`lax.fori_loop`: `x+params` updates x and the params with their gradients; "
                  "`x only` freezes the params (not differentiated; BatchNorm eval = "
                  "`use_running_average=True` under `grad`). flax: flax.linen with its "
                  "defaults.", "", rule, "", loss, ""]
    if train:
        parts += ["### Whole train steps (jitted optax step in a `lax.fori_loop`)", "",
                  "Each model is written once with the norm class as a field; flax.linen's "
                  "and normzoo's are given the same variables, and their first-step losses "
                  "are asserted equal before timing (1e-4 relative in float32, 2e-2 in "
                  "bfloat16; the largest difference is shown). `flax / flax twin`: a second, "
                  "separately compiled copy of the flax loop, the noise control. bfloat16: "
                  "the layers' and model's `dtype`, float32 params and loss.", "", rule, "",
                  train, ""]
    return parts

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
    parts += training_sections(results)
    table = whitening_table(results)
    if table:
        parts += ["### Whitening (float32): time per call and multiple of one G x G matmul",
                  "", table, ""]
    table = targets_table(targets(results))
    if table:
        floor = noise_floor(results)
        parts += ["### Layer-row targets in this run (against both flax variants)", ""]
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
        "training_verdicts": training_verdicts(results),
        "floors": dataclasses.asdict(floors) if floors is not None else None,
        "notes": list(notes),
    }


def write_json(path: str, payload: dict) -> None:
    with open(path, "w") as f:
        json.dump(payload, f, indent=1)
        f.write("\n")


def _header(meta: dict[str, Any], settings: dict[str, Any]) -> list[str]:
    load = meta.get("load_average")
    load_end = meta.get("load_average_end")
    return [
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
        f"- normzoo's CPU kernels: {meta.get('native_kernels', 'unknown')}",
    ]


def results_markdown(results: Sequence[GroupResult], meta: dict[str, Any], notes: Sequence[str],
                     settings: dict[str, Any], floors: Any = None) -> str:
    """The layer rows' part of RESULTS.md: command, machine, settings, tables."""
    lines = [
        "# normzoo benchmark results",
        "",
        "Generated by `python -m benchmarks --write-results`; see `benchmarks/__init__.py` for the",
        "protocol (one jitted `lax.fori_loop` per implementation, output fed back, the time per",
        "iteration the slope between runs of n and 2n iterations, interleaved repeats, medians,",
        "a copy `x + 1` of the same array as the roofline).",
        "",
        *_header(meta, settings),
        "",
        "Implementations: `normzoo` (the default path, CPU kernels off), `normzoo_cpu` (the same "
        "layers with the opt-in CPU kernels of `normzoo.backends.cpu` on, when available), "
        "flax.linen with `use_fast_variance` True and False, a textbook `jax.numpy` version, "
        "and the copy. Step temp memory is XLA's count of its own buffers: scratch memory "
        "inside a custom call is not in it.",
        "",
        markdown(results, notes, floors),
    ]
    return "\n".join(lines)


#: Markers around the training rows' part of RESULTS.md, so that a run of only those rows
#: (or only the layer rows) replaces its own part and keeps the other.
BEGIN_TRAINING = "<!-- BEGIN training rows (python -m benchmarks --rows loss,training) -->"
END_TRAINING = "<!-- END training rows -->"


def training_markdown(results: Sequence[GroupResult], meta: dict[str, Any],
                      notes: Sequence[str], settings: dict[str, Any]) -> str:
    """The loss and train-step rows' part of RESULTS.md, between its markers."""
    lines = [
        BEGIN_TRAINING,
        "",
        "## Rows that look like training: loss depending on y, whole train steps",
        "",
        "See `benchmarks/training.py` for what each row runs.",
        "",
        *_header(meta, settings),
        "",
        markdown(results, notes),
        END_TRAINING,
    ]
    return "\n".join(lines)


def _is_training(r: GroupResult) -> bool:
    return r.meta.get("kind") in ("loss", "train")


def write_results(path: str, results: Sequence[GroupResult], meta: dict[str, Any],
                  notes: Sequence[str], settings: dict[str, Any], floors: Any = None) -> None:
    """Writes RESULTS.md: the parts this run measured replace their old text, the other
    part (layer rows, or loss and train rows) is kept as it was, with its own command."""
    old = ""
    if os.path.exists(path):
        with open(path) as f:
            old = f.read()
    old_top, old_training = old, ""
    if BEGIN_TRAINING in old and END_TRAINING in old:
        start, end = old.index(BEGIN_TRAINING), old.index(END_TRAINING) + len(END_TRAINING)
        old_top, old_training = old[:start] + old[end:], old[start:end]
    layer_rows = [r for r in results if not _is_training(r)]
    training_rows = [r for r in results if _is_training(r)]
    top = (results_markdown(layer_rows, meta, notes, settings, floors) if layer_rows
           else old_top.rstrip() or "# normzoo benchmark results")
    training = (training_markdown(training_rows, meta, notes, settings) if training_rows
                else old_training)
    with open(path, "w") as f:
        f.write(top.rstrip() + "\n")
        if training:
            f.write("\n" + training + "\n")
