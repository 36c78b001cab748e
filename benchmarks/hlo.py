"""Reading compiled HLO: the top-level kernels of a step and the memory they move.

After XLA's fusion passes every top-level instruction of the entry computation (a fusion,
a copy, a custom call, a dot...) is one kernel that reads its operands from memory and
writes its result, so the sum of operand and result bytes over those instructions is the
step's memory traffic *between kernels*, a noise-free count of passes over the data. It
differs from ``cost_analysis()['bytes accessed']``, which also counts the inside of
fusions (XLA:CPU's ``__ynn_fusion`` kernels run a whole normalization in one kernel).

Use: ``kernels(compiled)`` lists the kernels, ``traffic(compiled)`` sums their bytes, and
``summary(fn, *args)`` compiles ``fn`` and returns both with the passes over ``args``' largest
array. While loops are counted once (their body's kernels are listed after the loop).
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, Callable

import jax
import numpy as np

_SKIP = {"parameter", "constant", "tuple", "get-tuple-element", "bitcast", "after-all",
         "partition-id", "replica-id", "iota", "while"}
_DTYPE_BYTES = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2,
                "s32": 4, "u32": 4, "f32": 4, "s64": 8, "u64": 8, "f64": 8, "c64": 8,
                "c128": 16}
_SHAPE = re.compile(r"\b(pred|[subfc]\d+|bf16)\[([0-9,]*)\]")
_INSTR = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*(.*?)\s+([\w\-]+)\((.*?)\)(.*)$")


@dataclasses.dataclass
class Kernel:
    """One top-level instruction: its name, opcode (fusion kind for fusions) and bytes."""

    name: str
    op: str
    out_bytes: int
    in_bytes: int
    out_shape: str

    @property
    def bytes(self) -> int:
        return self.out_bytes + self.in_bytes


def _bytes(text: str) -> int:
    total = 0
    for dtype, dims in _SHAPE.findall(text):
        n = int(np.prod([int(d) for d in dims.split(",") if d])) if dims else 1
        total += n * _DTYPE_BYTES.get(dtype, 4)
    return total


def _elements(text: str) -> int:
    """Elements of the first array shape in ``text`` (0 if none)."""
    match = _SHAPE.search(text)
    if not match:
        return 0
    dims = match.group(2)
    return int(np.prod([int(d) for d in dims.split(",") if d])) if dims else 1


def _computations(text: str) -> dict[str, list[str]]:
    comps: dict[str, list[str]] = {}
    current = None
    for line in text.splitlines():
        header = re.match(r"^(ENTRY\s+)?%?([\w.\-]+)\s.*\{\s*$", line)
        if header and not line.startswith(" "):
            current = "ENTRY" if header.group(1) else header.group(2)
            comps[current] = []
        elif line.startswith("}"):
            current = None
        elif current is not None:
            comps[current].append(line)
    return comps


def kernels(compiled: Any) -> list[Kernel]:
    """Top-level kernels of the entry computation and of the bodies of its while loops."""
    text = compiled.as_text()
    comps = _computations(text)
    shapes: dict[str, tuple[int, int]] = {}
    out: list[Kernel] = []

    def walk(name: str) -> None:
        for line in comps.get(name, []):
            match = _INSTR.match(line)
            if not match:
                continue
            iname, out_type, opcode, operands, rest = match.groups()
            shapes[iname] = (_bytes(out_type), _elements(out_type))
            if opcode == "while":
                body = re.search(r"body=%?([\w.\-]+)", rest)
                if body:
                    walk(body.group(1))
                continue
            if opcode in _SKIP:
                continue
            kind = re.search(r"kind=(\w+)", rest)
            # An elementwise kernel (loop fusion, slice, copy...) reads at most one operand
            # element per output element: a slice of a big array reads only the slice.
            loop_fusion = opcode == "fusion" and kind is not None and kind.group(1) == "kLoop"
            elementwise = loop_fusion or opcode in (
                "slice", "dynamic-slice", "broadcast", "copy", "convert")
            out_elements = _elements(out_type)
            in_bytes = 0
            for operand in operands.split(","):
                operand = operand.strip()
                if not operand:
                    continue
                if _SHAPE.search(operand):  # typed operand: "f32[4,5]{1,0} %x"
                    size, count = _bytes(operand), _elements(operand)
                else:
                    size, count = shapes.get(operand.lstrip("%"), (0, 0))
                if elementwise and count > out_elements > 0:
                    size = size * out_elements // count
                in_bytes += size
            op = opcode
            if opcode == "fusion":
                custom = re.search(r'"kind":"(\w+)"', rest)
                op = f"fusion:{custom.group(1) if custom else kind.group(1) if kind else '?'}"
            out.append(Kernel(iname, op, shapes[iname][0], in_bytes, out_type.split("{")[0]))

    walk("ENTRY")
    return out


def traffic(compiled: Any) -> int:
    """Bytes read and written by the top-level kernels (see module docstring)."""
    return sum(k.bytes for k in kernels(compiled))


def summary(fn: Callable[..., Any], *args: Any) -> dict[str, Any]:
    """Compiles ``fn(*args)``; its kernels, traffic and passes over the largest argument."""
    compiled = jax.jit(fn).lower(*args).compile()
    ks = kernels(compiled)
    largest = max((np.asarray(a).nbytes for a in jax.tree_util.tree_leaves(args)), default=1)
    total = sum(k.bytes for k in ks)
    return {"kernels": ks, "traffic": total, "passes": total / largest,
            "n_kernels": len(ks), "compiled": compiled}
