"""The opt-in CPU kernels as the benchmarks see them: a column that exists only when they do.

normzoo's hand-written CPU kernels live in ``normzoo.backends.cpu`` and are off by default;
``cpu_kernels.enabled(flag)`` switches them for what is traced inside it (the switch is read
at trace time, so a function must be traced inside the context to be affected). Every
normzoo implementation in the benchmarks is traced inside an explicit ``enabled(False)`` or
``enabled(True)``, so a column means the same whatever ``NORMZOO_CPU_KERNELS`` says.

When the module is missing (an older or newer tree) or reports itself unavailable (no
compiler, not a CPU backend), :func:`kernels_available` is False and the "normzoo + cpu
kernels" column is left out of every row and reported as n/a with :func:`status`'s reason.
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable

#: Column names shared by the layer, loss and training rows.
DEFAULT = "normzoo"
KERNELS = "normzoo_cpu"


#: The switch's API; a module without all of it (a tree half-way through adding the
#: backend) is treated as absent.
API = ("enabled", "enable", "disable", "is_enabled", "available")


def module() -> Any | None:
    """``normzoo.backends.cpu``, or None when this tree has no such backend."""
    try:
        import normzoo.backends.cpu as cpu_kernels
    except ImportError:
        return None
    if not all(callable(getattr(cpu_kernels, name, None)) for name in API):
        return None
    return cpu_kernels


def kernels_available() -> bool:
    cpu_kernels = module()
    if cpu_kernels is None:
        return False
    try:
        return bool(cpu_kernels.available())
    except Exception:  # noqa: BLE001 - a broken backend is an absent column, not a crash
        return False


def status() -> str:
    """One line for the report: whether the kernels column was timed, and if not why."""
    cpu_kernels = module()
    if cpu_kernels is None:
        legacy = _legacy_status()
        return ("n/a (normzoo.backends.cpu not in this tree"
                + (f"; the legacy normzoo.functional.native kernels are {legacy} on the "
                   "default path" if legacy else "") + ")")
    if not kernels_available():
        reason = ""
        for name in ("failure", "reason"):
            fn = getattr(cpu_kernels, name, None)
            if callable(fn):
                try:
                    reason = fn() or ""
                except Exception:  # noqa: BLE001
                    reason = ""
                break
        return "n/a (normzoo.backends.cpu unavailable" + (f": {reason}" if reason else "") + ")"
    default = "on" if _is_enabled(cpu_kernels) else "off"
    return f"timed as a separate column (process default: {default}; columns set it explicitly)"


def _is_enabled(cpu_kernels: Any) -> bool:
    try:
        return bool(cpu_kernels.is_enabled())
    except Exception:  # noqa: BLE001
        return False


def _legacy_status() -> str | None:
    """Whether the pre-backend kernels (``normzoo.functional.native``) are still on the
    default path: then the "normzoo" column includes them, and the report says so."""
    try:
        from normzoo.functional import native
    except ImportError:
        return None
    try:
        return "on" if native.available() else "off"
    except Exception:  # noqa: BLE001
        return None


def switched(flag: bool) -> contextlib.AbstractContextManager:
    """``cpu_kernels.enabled(flag)`` when the backend exists, else a no-op context."""
    cpu_kernels = module()
    if cpu_kernels is None:
        return contextlib.nullcontext()
    return cpu_kernels.enabled(flag)


def traced(fn: Callable[..., Any], flag: bool) -> Callable[..., Any]:
    """``fn`` whose tracing runs with the CPU kernels switched to ``flag``.

    The benchmarks trace every loop once, inside ``jax.jit(...).lower``, so the switch
    held during that call decides the program; nothing is cached across the switch.
    """

    def with_switch(*args, **kwargs):
        with switched(flag):
            return fn(*args, **kwargs)

    with_switch.__name__ = getattr(fn, "__name__", "fn")
    return with_switch


def columns() -> dict[str, bool]:
    """The normzoo columns this tree can time: name -> kernels flag."""
    out = {DEFAULT: False}
    if kernels_available():
        out[KERNELS] = True
    return out
