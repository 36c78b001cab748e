"""Hand-written CPU kernels for the forward pass, called from XLA through its FFI.

XLA:CPU emits a reduction along the contiguous axis of an array as a slow serial loop
(a row sum of a 4096 x 1024 float32 matrix: ~10 copies of it on this project's 2-core
machines), so LayerNorm's and RMSNorm's forward pass cost 4-6 copies in flax and in the
pure-XLA path, and the channel reductions of BatchNorm, InstanceNorm and GroupNorm are
slow too. ``normzoo_cpu.cc`` holds two kernels that reduce with vector instructions on
XLA's own intra-op thread pool and write the output in the same call (and a third,
:func:`channel_affine`, for statistics given: BatchNorm at inference):

* :func:`row_normalize`: ``x (R, F)``, statistics of each row over its ``F`` features
  (LayerNorm, RMSNorm);
* :func:`grouped_normalize`: ``x (B, M, C)``, statistics per ``(b, group of k channels)``
  over ``M * k`` elements (BatchNorm ``B = 1, k = 1``; InstanceNorm ``k = 1``; GroupNorm).

Both return ``(y, mean, var)`` with ``y = (x - mean) * (r * scale) + bias``,
``r = rsqrt(var + eps)`` (flax.linen's order of operations), statistics in float32 and
exact to rounding when ``|mean| >> std`` (a row's sums shifted by its first element, an exact
two-pass recomputation from L1 cache where that element is far out; blocks of
channel moments merged with Chan, Golub & LeVeque's formula).

Build. The source is compiled on first use with the system's C++ compiler (``$CXX``, else
``g++``, ``c++`` or ``clang++``) for this machine (``-march=native``, plus
``$NORMZOO_NATIVE_CFLAGS``) into
``$NORMZOO_CACHE_DIR`` (default ``~/.cache/normzoo``), under a name hashed from the source,
the flags, the compiler, jaxlib's version and the CPU, then loaded and registered as XLA
FFI targets. Where that fails (no compiler, no headers) :func:`available` is False and
normzoo uses its pure-XLA path, which gives the same numbers. ``NORMZOO_NATIVE=0`` (or
:func:`disabled`) turns the kernels off. They run on CPU only (callers select them with
``lax.platform_dependent``); under ``vmap`` they run once per batch member.
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import logging
import math
import os
import platform
import shutil
import subprocess
import tempfile
import threading
import warnings
from pathlib import Path
from typing import Any, Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array

_SOURCE = Path(__file__).with_name("normzoo_cpu.cc")
#: FFI target name -> the handler symbol in the compiled library.
_TARGETS = {
    "normzoo_row_norm": "NormzooRowNorm",
    "normzoo_grouped_norm": "NormzooGroupedNorm",
    "normzoo_channel_affine": "NormzooChannelAffine",
    "normzoo_row_norm_backward": "NormzooRowNormBackward",
    "normzoo_grouped_norm_backward": "NormzooGroupedNormBackward",
}
#: dtypes the kernels read and write (statistics are always float32).
SUPPORTED_DTYPES = (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16))

#: Smallest x, in elements, whose forward pass / training step use the kernels. Measured on
#: the 2-core CPU (µs, kernels vs XLA): forward LN 8192 elements 3.3 vs 2.5, GN 16384 6.4
#: vs 5.0, LN 65536 7.9 vs 22.3, GN 65536 16.0 vs 26.3; training steps GN 262144 134 vs
#: 115, LN 1048576 float32 473 vs 389 but bfloat16 537 vs 941, GN 1048576 377 vs 624, and
#: at 3-4M elements (benchmarks/RESULTS.md) 1.2-3.4x: XLA's fused code wins on small arrays.
MIN_SIZE = {"forward": 1 << 16, "backward": 1 << 21}

_log = logging.getLogger("normzoo.native")
_lock = threading.Lock()
_loaded: bool | None = None  # None: not tried yet
_failure: str | None = None
_switched_off = False


def _compiler() -> str | None:
    return os.environ.get("CXX") or next(
        (c for c in ("g++", "c++", "clang++") if shutil.which(c)), None
    )


def _flags() -> list[str]:
    """Compiler flags; ``$NORMZOO_NATIVE_CFLAGS`` is appended (e.g. ``-march=x86-64-v3`` for
    a cache shared by different machines, ``-mno-avx512bf16`` to test the generic code)."""
    extra = os.environ.get("NORMZOO_NATIVE_CFLAGS", "").split()
    return [
        "-O3", "-march=native", "-std=c++17", "-shared", "-fPIC", "-DNZ_LANES=16",
        f"-I{jax.ffi.include_dir()}", *extra,
    ]


def _cpu_signature() -> str:
    """What ``-march=native`` depends on: the CPU's model and feature flags."""
    try:
        with open("/proc/cpuinfo") as f:
            lines = [ln for ln in f if ln.startswith(("model name", "flags", "Features"))]
        return "".join(sorted(set(lines)))
    except OSError:
        return platform.processor() + platform.machine()


def _cache_dir() -> Path:
    root = os.environ.get("NORMZOO_CACHE_DIR")
    if root:
        return Path(root)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "normzoo"


def cached_path(source: Path, flags: Sequence[str], stem: str, suffix: str) -> Path:
    """Where :func:`cached_build` puts ``source`` compiled with ``flags``: a name keyed by
    the source, the flags, the compiler's version, jaxlib's version and the CPU."""
    import jaxlib

    compiler = _compiler() or "none"
    try:
        version = subprocess.run([compiler, "--version"], capture_output=True, text=True,
                                 timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        version = ""
    key = hashlib.sha256()
    for part in (source.read_bytes(), " ".join(flags).encode(), version.encode(),
                 jaxlib.__version__.encode(), _cpu_signature().encode()):
        key.update(part)
    return _cache_dir() / f"{stem}-{key.hexdigest()[:16]}{suffix}"


def cached_build(source: Path, flags: Sequence[str], stem: str, suffix: str) -> Path:
    """Compiles ``source`` with this machine's C++ compiler and ``flags`` into normzoo's
    cache (once: a cached output is reused) and returns the output's path."""
    target = cached_path(source, flags, stem, suffix)
    if target.exists():
        return target
    compiler = _compiler()
    if compiler is None:
        raise RuntimeError("no C++ compiler found (set CXX, or install g++ or clang++)")
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=suffix, dir=target.parent)
    os.close(fd)
    try:
        cmd = [compiler, *flags, str(source), "-o", tmp]
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
        if done.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed:\n{done.stderr[-4000:]}")
        os.chmod(tmp, 0o755)
        os.replace(tmp, target)  # atomic: concurrent builders end with one whole file
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return target


def library_path() -> Path:
    """Where the compiled kernels for this source, compiler, jaxlib and CPU live."""
    return cached_path(_SOURCE, _flags(), "normzoo_cpu", ".so")


def build() -> Path:
    """Compiles the kernels (if not cached yet) and returns the shared library's path."""
    return cached_build(_SOURCE, _flags(), "normzoo_cpu", ".so")


def _load() -> bool:
    global _loaded, _failure
    with _lock:
        if _loaded is None:
            try:
                library = ctypes.cdll.LoadLibrary(str(build()))
                for name, symbol in _TARGETS.items():
                    jax.ffi.register_ffi_target(
                        name, jax.ffi.pycapsule(getattr(library, symbol)), platform="cpu"
                    )
                _loaded = True
            except Exception as error:  # no compiler, headers or loader: the XLA path serves
                _loaded, _failure = False, f"{type(error).__name__}: {error}"
                if _compiler() is None:
                    _log.info("normzoo native CPU kernels unavailable: %s", _failure)
                else:
                    warnings.warn(f"normzoo: native CPU kernels unavailable, using the XLA "
                                  f"path ({_failure})", RuntimeWarning, stacklevel=3)
    return _loaded


def available() -> bool:
    """Whether the kernels are switched on and built (compiles them on the first call)."""
    if _switched_off or os.environ.get("NORMZOO_NATIVE", "1").lower() in ("0", "false", "off"):
        return False
    return _load()


def policy() -> tuple[int, int] | None:
    """What normzoo ops traced now use: None (no kernels) or the minimum sizes
    ``(forward, backward)`` of :data:`MIN_SIZE`. A static argument of the ops, so that
    traces made under different policies are cached apart."""
    if not available():
        return None
    return MIN_SIZE["forward"], MIN_SIZE["backward"]


@contextlib.contextmanager
def min_size(forward: int, backward: int) -> Iterator[None]:
    """Within this block, newly traced ops use the kernels from these sizes on (tests)."""
    before = dict(MIN_SIZE)
    MIN_SIZE.update(forward=int(forward), backward=int(backward))
    try:
        yield
    finally:
        MIN_SIZE.update(before)


def failure() -> str | None:
    """Why the kernels could not be built or loaded, if they could not."""
    return _failure


@contextlib.contextmanager
def disabled() -> Iterator[None]:
    """Within this block, newly traced normzoo ops use the pure-XLA path (tests, comparisons)."""
    global _switched_off
    before, _switched_off = _switched_off, True
    try:
        yield
    finally:
        _switched_off = before


def manual_axes(v: Array) -> Any:
    """The mesh axes ``v`` varies along inside ``shard_map`` (None outside, or on old jax)."""
    aval = jax.typeof(v) if hasattr(jax, "typeof") else None
    return getattr(aval, "mat", getattr(aval, "vma", None))


def varying_axes(v: Array) -> frozenset:
    """The names of the ``shard_map`` mesh axes ``v`` varies along (empty outside)."""
    axes = manual_axes(v)
    return frozenset(getattr(axes, "varying", axes) or ())


def _result_like(x: Array, shape, dtype) -> jax.ShapeDtypeStruct:
    """A result aval that varies along the same ``shard_map`` axes as ``x``."""
    if not varying_axes(x):
        return jax.ShapeDtypeStruct(shape, dtype)
    aval = jax.typeof(x)
    sharding = jax.sharding.NamedSharding(aval.sharding.mesh, jax.sharding.PartitionSpec())
    for keyword in ("manual_axis_type", "vma"):  # its name in jax >= 0.9, and before
        try:
            return jax.ShapeDtypeStruct(shape, dtype, sharding=sharding,
                                        **{keyword: manual_axes(x)})
        except TypeError:
            continue
    raise NotImplementedError(f"cannot type a result inside shard_map on jax {jax.__version__}")


def _call(target: str, x: Array, scale: Array, bias: Array, stat_shape: tuple[int, ...],
          out_dtype, in_place: bool, **attributes) -> tuple[Array, Array, Array]:
    if not _load():
        raise RuntimeError(f"normzoo native CPU kernels unavailable: {_failure}")
    results = (_result_like(x, x.shape, out_dtype), _result_like(x, stat_shape, jnp.float32),
               _result_like(x, stat_shape, jnp.float32))
    # in_place: y over x when they match. XLA then writes in place where x is dead (the
    # common case in inference: the output of the layer before), and copies x first where it
    # is still needed (so a training step, which keeps x for the backward pass, asks for a
    # fresh y). x keeps its shape (the kernels read flat buffers): XLA copies a reshaped
    # operand that aliases an output.
    aliases = {0: 0} if in_place and jnp.dtype(out_dtype) == x.dtype else None
    call = jax.ffi.ffi_call(target, results, vmap_method="sequential",
                            input_output_aliases=aliases)
    return call(x, scale.astype(jnp.float32), bias.astype(jnp.float32), **attributes)


def channel_affine(x: Array, shift: Array, mul: Array, bias: Array, *, out_dtype,
                   channels: int | None = None, in_place: bool = True) -> Array:
    """``y = (x - shift) * mul + bias`` with ``shift, mul, bias (C,)`` per channel over ``x``
    read as ``(M, C)`` rows (``C = channels``, default x's last axis); ``y`` x's shape in
    ``out_dtype``. Normalization by given statistics (BatchNorm at inference: ``shift`` the
    running mean, ``mul = rsqrt(var + eps) * scale``). ``in_place`` as :func:`row_normalize`.
    """
    if not _load():
        raise RuntimeError(f"normzoo native CPU kernels unavailable: {_failure}")
    channels = x.shape[-1] if channels is None else int(channels)
    if channels < 1 or x.size % channels:
        raise ValueError(f"channels={channels} must divide x's size {x.size} (shape {x.shape})")
    for name, v in (("shift", shift), ("mul", mul), ("bias", bias)):
        if v.shape != (channels,):
            raise ValueError(f"{name} has shape {v.shape}; expected ({channels},)")
    aliases = {0: 0} if in_place and jnp.dtype(out_dtype) == x.dtype else None
    call = jax.ffi.ffi_call("normzoo_channel_affine", _result_like(x, x.shape, out_dtype),
                            vmap_method="sequential", input_output_aliases=aliases)
    vectors = (v.astype(jnp.float32) for v in (shift, mul, bias))
    return call(x, *vectors, channels=np.int64(channels))


def _check_view(x: Array, stat_shape, count: int, what: str) -> None:
    if math.prod(stat_shape) != count:
        raise ValueError(f"stat_shape {tuple(stat_shape)} must hold {count} values ({what}) "
                         f"for x of shape {x.shape}")


def row_normalize(x: Array, scale: Array, bias: Array, *, epsilon: float, centered: bool,
                  out_dtype, features: int | None = None,
                  stat_shape: tuple[int, ...] | None = None,
                  in_place: bool = True) -> tuple[Array, Array, Array]:
    """Rows of ``F = features`` contiguous elements (default: x's last axis): ``x`` (any shape
    of ``R * F`` elements) -> ``y`` (x's shape, ``out_dtype``), ``mean``, ``var`` (float32,
    ``stat_shape`` of ``R`` elements; default ``(R,)``).

    Per row: ``mean = E[x]`` (0 when not ``centered``), ``var = E[(x - mean)^2]`` and
    ``y = (x - mean) * (rsqrt(var + epsilon) * scale) + bias``; ``scale, bias (F,)``.
    ``in_place``: let XLA write y over x (where x is not needed afterwards).
    """
    features = x.shape[-1] if features is None else int(features)
    if features < 1 or x.size % features:
        raise ValueError(f"features={features} must divide x's size {x.size} (shape {x.shape})")
    rows = x.size // features
    stat_shape = (rows,) if stat_shape is None else tuple(stat_shape)
    _check_view(x, stat_shape, rows, "one per row")
    return _call("normzoo_row_norm", x, scale, bias, stat_shape, out_dtype, in_place,
                 epsilon=np.float32(epsilon), centered=bool(centered),
                 features=np.int64(features))


def grouped_normalize(x: Array, scale: Array, bias: Array, *, group_size: int, epsilon: float,
                      centered: bool, out_dtype, batch: int | None = None,
                      channels: int | None = None,
                      stat_shape: tuple[int, ...] | None = None,
                      in_place: bool = True) -> tuple[Array, Array, Array]:
    """``x`` read as ``(B, M, C)`` (default: x's own three axes) -> ``y`` (x's shape),
    ``mean, var`` (float32, ``stat_shape`` of ``B * C / group_size`` elements; default
    ``(B, C / group_size)``).

    Statistics per ``b`` and group of ``group_size`` consecutive channels over the ``M``
    rows; ``y = (x - mean) * (rsqrt(var + epsilon) * scale) + bias``; ``scale, bias (C,)``.
    """
    if batch is None or channels is None:
        if x.ndim != 3:
            raise ValueError(f"x of shape {x.shape}: give batch and channels, or a (B, M, C) x")
        batch, _, channels = x.shape
    batch, channels, group_size = int(batch), int(channels), int(group_size)
    if batch < 1 or channels < 1 or x.size == 0 or x.size % (batch * channels):
        raise ValueError(f"batch={batch} and channels={channels} must divide x's size "
                         f"{x.size} (shape {x.shape})")
    if group_size < 1 or channels % group_size:
        raise ValueError(f"group_size={group_size} must divide channels={channels}")
    groups = batch * (channels // group_size)
    stat_shape = (batch, channels // group_size) if stat_shape is None else tuple(stat_shape)
    _check_view(x, stat_shape, groups, "one per batch entry and group")
    return _call("normzoo_grouped_norm", x, scale, bias, stat_shape, out_dtype, in_place,
                 epsilon=np.float32(epsilon), centered=bool(centered),
                 group_size=np.int64(group_size), batch=np.int64(batch),
                 channels=np.int64(channels))
