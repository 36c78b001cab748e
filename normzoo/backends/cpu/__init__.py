"""Opt-in hand-written CPU kernels for normzoo's normalization ops (XLA FFI).

Off by default: with defaults nothing here is imported, compiled, loaded or placed into a
program. Switch them on for a process with ``NORMZOO_CPU_KERNELS=1`` (read when ``normzoo``
is imported) or in code::

    import normzoo.backends.cpu as cpu_kernels

    cpu_kernels.enable()              # builds the library on first use, then registers it
    with cpu_kernels.enabled(False):  # a block traced with the pure-JAX path
        ...
    cpu_kernels.disable()

The switch is read while a function is traced. :func:`enable` and :func:`disable` call
``jax.clear_caches()``, so functions jitted before the switch are traced again on their next
call and follow it; a function lowered or exported (``jax.jit(f).lower``, ``jax.export``)
keeps what it was traced with, so lower it after switching.

Where the kernels are used, and where they step aside (the pure-JAX path runs instead):
:mod:`normzoo.backends.cpu.plan` and docs/performance.md. They give the same numbers as the
pure-JAX path to rounding.

The first :func:`enable` on a machine compiles ``normzoo_cpu.cc`` with the system's C++
compiler (one line on stderr says so) into ``$NORMZOO_CACHE_DIR`` (default
``~/.cache/normzoo``); later processes load the cached library after checking its size and
sha256 (:mod:`normzoo.backends.cpu.library`). Where no compiler or library is available,
:func:`enable` warns and the pure-JAX path stays.
"""

from __future__ import annotations

import contextlib
import warnings
from typing import Iterator

import jax

from normzoo.backends.cpu import library
from normzoo.backends.cpu.library import cached_build, failure, library_path
from normzoo.backends.cpu.plan import MIN_SIZE, NATIVE_BACKWARD_PLAN, NATIVE_PLAN, CpuKernels
from normzoo.functional import backend as _backend

__all__ = [
    "MIN_SIZE",
    "NATIVE_BACKWARD_PLAN",
    "NATIVE_PLAN",
    "available",
    "cached_build",
    "disable",
    "enable",
    "enabled",
    "failure",
    "is_enabled",
    "library_path",
    "min_size",
]

_KERNELS = CpuKernels()


def available() -> bool:
    """Whether the kernels can run here: a compiler built the library (or an intact build is
    cached) and it loads. Builds it on the first call; :func:`failure` says why not."""
    return library.load()


def is_enabled() -> bool:
    """Whether ops traced now may use the kernels."""
    return _backend.active() is _KERNELS


def enable(*, multi_device: bool = False) -> bool:
    """Ops traced from now on use the kernels where they apply; returns :func:`is_enabled`.

    ``multi_device``: also outside ``shard_map`` in a process with several devices (by
    default the kernels step aside there: under ``jit`` a custom call gathers a sharded
    batch onto one device). Where the kernels are not :func:`available`, warns and leaves
    the pure-JAX path on.
    """
    from normzoo.backends.cpu import plan

    if not available():
        warnings.warn(f"normzoo: CPU kernels unavailable, using the pure-JAX path "
                      f"({failure()})", RuntimeWarning, stacklevel=2)
        return False
    plan.SETTINGS["multi_device"] = bool(multi_device)
    if not is_enabled():
        _backend.register(_KERNELS)
    jax.clear_caches()  # functions jitted before the switch retrace on their next call
    return True


def disable() -> None:
    """Ops traced from now on are pure JAX (functions jitted before retrace)."""
    from normzoo.backends.cpu import plan

    if is_enabled():
        _backend.unregister()
    plan.SETTINGS["multi_device"] = False
    jax.clear_caches()


@contextlib.contextmanager
def enabled(flag: bool = True, *, multi_device: bool = False) -> Iterator[bool]:
    """Within this block the kernels are on (``flag``) or off; the previous state (and its
    settings) comes back afterwards. Yields whether they are on."""
    from normzoo.backends.cpu import plan

    before, settings = is_enabled(), dict(plan.SETTINGS)
    try:
        if flag:
            yield enable(multi_device=multi_device)
        else:
            disable()
            yield False
    finally:
        if before:
            enable(multi_device=settings["multi_device"])
        else:
            disable()


@contextlib.contextmanager
def min_size(forward: int, backward: int) -> Iterator[None]:
    """Within this block, newly traced ops use the kernels from these sizes of x on (tests)."""
    before = dict(MIN_SIZE)
    MIN_SIZE.update(forward=int(forward), backward=int(backward))
    jax.clear_caches()
    try:
        yield
    finally:
        MIN_SIZE.update(before)
        jax.clear_caches()
