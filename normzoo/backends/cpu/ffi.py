"""The kernels as JAX functions: XLA FFI calls of the compiled library.

* :func:`row_normalize`: ``x (R, F)``, statistics of each row over its ``F`` features
  (LayerNorm, RMSNorm);
* :func:`grouped_normalize`: ``x (B, M, C)``, statistics per ``(b, group of k channels)``
  over ``M * k`` elements (BatchNorm ``B = 1, k = 1``; InstanceNorm ``k = 1``; GroupNorm);
* :func:`channel_affine`: ``y = (x - shift) * mul + bias`` per channel (statistics given:
  BatchNorm at inference).

The first two return ``(y, mean, var)`` with ``y = (x - mean) * (r * scale) + bias``,
``r = rsqrt(var + eps)`` (flax.linen's order of operations), statistics in float32 and
exact to rounding when ``|mean| >> std`` (a row's sums shifted by its first element, an
exact two-pass recomputation from L1 cache where that element is far out; blocks of channel
moments merged with Chan, Golub & LeVeque's formula). They run on CPU only; under ``vmap``
they run once per batch member. Calling one builds and loads the library if this process
has not yet (:func:`normzoo.backends.cpu.library.load`).
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from normzoo.backends.cpu import library

Array = jax.Array

#: dtypes the kernels read and write (statistics are always float32).
SUPPORTED_DTYPES = (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16))


def _require() -> None:
    if not library.load():
        raise RuntimeError(f"normzoo CPU kernels unavailable: {library.failure()}")


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
    _require()
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
    _require()
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
