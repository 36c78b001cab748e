"""Batch statistics, normalization and affine in one op with an analytic backward pass.

Autodiff of ``(x - mean(x)) * rsqrt(var(x) + eps) * scale + bias`` keeps many intermediates
and walks the data several times; the closed form needs only ``x``, the per-statistic
``mean`` and ``r = rsqrt(var + eps)``. With ``xhat = (x - mean) * r``, ``g = dy * scale`` and
``E`` the mean over the reduction axes (Ioffe & Szegedy 2015, section 3):

    dx     = r * (g - E[g] - xhat * E[g * xhat])          (standardize)
    dx     = r * (g - xhat * E[g * xhat])                  (scale: mean = 0, r = rsqrt(E[x^2] + eps))
    dscale = sum(dy * xhat),   dbias = sum(dy)             (over the axes the params broadcast along)

plus the terms of the returned statistics' own cotangents (``dmean / n`` and
``dvar * 2 (x - mean) / n``), so gradients through the running-statistics update are exact too.

Used for the common case (no mask, no ``axis_name``); the general path in
:mod:`normzoo.functional.operations` covers the rest with plain autodiff.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

from normzoo.functional.moments import _local_moments

Array = jax.Array


def _expand(stat: Array, axes: tuple[int, ...]) -> Array:
    return jnp.expand_dims(stat, axes)


def _count(shape: tuple[int, ...], axes: tuple[int, ...]) -> int:
    n = 1
    for ax in axes:
        n *= shape[ax]
    return n


def _param_axes(x_ndim: int, param: Array) -> tuple[int, ...]:
    """Axes along which a broadcast-shaped param of rank ``x_ndim`` is broadcast (size 1)."""
    return tuple(i for i in range(x_ndim) if param.shape[i] == 1)


def _forward(x, scale_b, bias_b, axes, centered, epsilon, use_fast_variance, stat_dtype, out_dtype):
    xf = x.astype(stat_dtype)
    mean, var = _local_moments(xf, axes, None, centered, use_fast_variance)
    r = lax.rsqrt(var + epsilon)
    xhat = (xf - _expand(mean, axes)) * _expand(r, axes) if centered else xf * _expand(r, axes)
    y = xhat
    if scale_b is not None:
        y = y * scale_b
    if bias_b is not None:
        y = y + bias_b
    return y.astype(out_dtype), mean, var, r


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5, 6, 7, 8))
def normalize_affine(
    x: Array,
    scale_b: Array | None,
    bias_b: Array | None,
    axes: tuple[int, ...],
    centered: bool,
    epsilon: float,
    use_fast_variance: bool,
    stat_dtype: Any,
    out_dtype: Any,
) -> tuple[Array, Array, Array]:
    """``(y, mean, var)``: x normalized by its own statistics over ``axes``, then the affine.

    Args:
      x: (S...) input; ``axes`` canonical reduction axes.
      scale_b, bias_b: optional params already shaped to broadcast against x (rank of x).
      centered: standardize (True) or scale by the root mean square (False; mean is 0).
      stat_dtype / out_dtype: dtype of the statistics / of y.

    Returns:
      y (S...) in ``out_dtype``; mean and var (or mean square) with ``axes`` removed.
    """
    y, mean, var, _ = _forward(
        x, scale_b, bias_b, axes, centered, epsilon, use_fast_variance, stat_dtype, out_dtype
    )
    return y, mean, var


def _normalize_affine_fwd(
    x, scale_b, bias_b, axes, centered, epsilon, use_fast_variance, stat_dtype, out_dtype
):
    y, mean, var, r = _forward(
        x, scale_b, bias_b, axes, centered, epsilon, use_fast_variance, stat_dtype, out_dtype
    )
    return (y, mean, var), (x, scale_b, bias_b, mean, r)


def _normalize_affine_bwd(
    axes, centered, epsilon, use_fast_variance, stat_dtype, out_dtype, residuals, cotangents
):
    del epsilon, use_fast_variance, out_dtype
    x, scale_b, bias_b, mean, r = residuals
    dy, dmean, dvar = cotangents
    n = _count(x.shape, axes)
    xf = x.astype(stat_dtype)
    centered_x = xf - _expand(mean, axes) if centered else xf
    r_e = _expand(r, axes)
    xhat = centered_x * r_e
    dy = dy.astype(stat_dtype)
    g = dy if scale_b is None else dy * scale_b
    proj = jnp.mean(g * xhat, axes, keepdims=True)
    inner = g - xhat * proj
    if centered:
        inner = inner - jnp.mean(g, axes, keepdims=True)
    # Cotangents of the returned statistics: d mean / dx = 1/n, d var / dx = 2 (x - mean) / n.
    stats_term = _expand(dvar, axes) * (2.0 / n) * centered_x
    if centered:
        stats_term = stats_term + _expand(dmean, axes) / n
    dx = (r_e * inner + stats_term).astype(x.dtype)
    dscale = None
    if scale_b is not None:
        dscale = jnp.sum(dy * xhat, _param_axes(x.ndim, scale_b), keepdims=True)
        dscale = dscale.astype(scale_b.dtype)
    dbias = None
    if bias_b is not None:
        dbias = jnp.sum(dy, _param_axes(x.ndim, bias_b), keepdims=True).astype(bias_b.dtype)
    return dx, dscale, dbias


normalize_affine.defvjp(_normalize_affine_fwd, _normalize_affine_bwd)
