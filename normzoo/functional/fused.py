"""Batch statistics, normalization and affine in one op with an analytic backward pass.

Autodiff of ``(x - mean(x)) * rsqrt(var(x) + eps) * scale + bias`` keeps many intermediates
and walks the data several times; the closed form needs only ``x``, the per-statistic
``mean`` and ``r = rsqrt(var + eps)``. The op is a ``jax.custom_jvp`` with a hand-written
linearization whose transpose JAX derives as exactly the closed form below, so forward mode
(``jvp``, ``jacfwd``, ``hessian``) works as well as reverse mode. With ``xhat = (x - mean) * r``, ``g = dy * scale`` and
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


@functools.partial(jax.custom_jvp, nondiff_argnums=(3, 4, 5, 6, 7, 8))
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


@normalize_affine.defjvp
def _normalize_affine_jvp(
    axes, centered, epsilon, use_fast_variance, stat_dtype, out_dtype, primals, tangents
):
    """The linearization, written so that its transpose is the closed-form backward pass."""
    x, scale_b, bias_b = primals
    dx, dscale, dbias = tangents
    y, mean, var, r = _forward(
        x, scale_b, bias_b, axes, centered, epsilon, use_fast_variance, stat_dtype, out_dtype
    )
    r_e = _expand(r, axes)
    xf = x.astype(stat_dtype)
    xhat = (xf - _expand(mean, axes)) * r_e if centered else xf * r_e
    dx = dx.astype(stat_dtype)
    # d var = 2 E[(x - mean) dx] (the E[x - mean] dmean term vanishes); d r = -r^3 dvar / 2.
    dvar = 2.0 * jnp.mean(xhat * dx, axes) / r
    dxhat = dx * r_e - xhat * _expand(0.5 * r * r * dvar, axes)
    if centered:
        dmean = jnp.mean(dx, axes)
        dxhat = dxhat - _expand(dmean, axes) * r_e
    else:
        dmean = jnp.zeros_like(mean)
    dy = dxhat if scale_b is None else dxhat * scale_b
    if scale_b is not None:
        dy = dy + xhat * dscale
    if bias_b is not None:
        dy = dy + dbias
    return (y, mean, var), (dy.astype(out_dtype), dmean, dvar)
