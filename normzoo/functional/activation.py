"""Normalization-activation layers and their neighbours: FRN + TLU, EvoNorm, LRN, DyT.

Each is a pure function taking its params explicitly; the statistics come from the engine
(:mod:`~normzoo.functional.area`, :class:`~normzoo.functional.operations.Moments`), so they are
float32 at least for bfloat16 / float16 input and share the engine's accuracy and errors. For
an input ``(N, *spatial, C)`` with the batch axis first:

* ``filter_response_norm`` (Singh & Krishnan, CVPR 2020): ``max(g x / sqrt(nu2 + |eps|) + b,
  tau)``, ``nu2 = E_spatial[x^2]`` per sample and channel; ``tlu``: ``max(x, tau)`` alone;
* ``evonorm_b0`` (Liu et al., NeurIPS 2020):
  ``x / max(sqrt(var_B + eps), v x + sqrt(var_I + eps)) g + b``;
* ``evonorm_s0`` (same paper): ``x sigmoid(v x) / sqrt(var_G + eps) g + b``;
* ``local_response_norm`` (Krizhevsky et al. 2012, PyTorch's formula):
  ``x_c / (k + alpha / n sum_{c' near c} x_{c'}^2)^beta``;
* ``dyt`` (Zhu et al., CVPR 2025): ``g tanh(alpha x) + b``.

``var_B``: biased variance over the batch area (every axis but the channels; a running
average at inference), ``var_I`` over the instance area (the spatial axes of each sample and
channel), ``var_G`` over the group area (spatial axes and the channels of a group, per
sample). FRN's ``nu2`` is RMSNorm's statistic over the instance area: FRN is
``Normalizer(area.instance(), SCALE)`` followed by a TLU.

Output dtype as flax.linen: ``dtype`` if given, else the promotion of x and the params;
the arithmetic runs in float32 at least. Every configuration error is raised at trace time
as a ValueError / TypeError naming the argument, its value and what was expected.
"""

from __future__ import annotations

import dataclasses
import numbers
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from normzoo.functional import area as areas
from normzoo.functional.axes import (
    Axes,
    broadcast_shape,
    canonicalize_axes,
    check_floating,
)
from normzoo.functional.engine import Normalizer
from normzoo.functional.estimators import EMA
from normzoo.functional.moments import abs_square, statistics_dtype
from normzoo.functional.operations import SCALE, STANDARDIZE, check_param_shape
from normzoo.functional.reduction import Reduction

Array = jax.Array
Stats = dict[str, Array]


# ------------------------------------------------------------------ helpers
def _output_dtype(dtype: Any, x: Array, *params: Array | None):
    """flax.linen's rule: ``dtype`` if given, else the promotion of x and the params."""
    if dtype is not None:
        return jnp.dtype(dtype)
    result = jnp.result_type(x, *(p for p in params if p is not None))
    return result if jnp.issubdtype(result, jnp.inexact) else jnp.dtype(jnp.float32)


def _compute_dtype(out_dtype: Any, x: Array):
    """The arithmetic's dtype: the output's and x's, float32 at least."""
    return jnp.promote_types(jnp.promote_types(out_dtype, jnp.result_type(x)), jnp.float32)


def _broadcast(param: Array | None, shape, feature_axes, dtype) -> Array | None:
    """A per-feature param reshaped to broadcast against an input of ``shape``."""
    if param is None:
        return None
    return jnp.reshape(jnp.asarray(param, dtype), broadcast_shape(shape, feature_axes))


def _check_params(shape, feature_axes, **params: Array | None) -> None:
    for name, value in params.items():
        check_param_shape(name, value, shape, feature_axes)


def _check_scalar(name: str, value: Any, meaning: str) -> None:
    if value is not None and tuple(jnp.shape(value)) != ():
        raise ValueError(f"{name} has shape {tuple(jnp.shape(value))}; expected () ({meaning})")


def _check_real(name: str, value: Any) -> None:
    if isinstance(value, bool) or (
        isinstance(value, numbers.Number) and not isinstance(value, numbers.Real)
    ):
        raise TypeError(f"{name}={value!r} must be a real number")


def _affine(y: Array, scale: Array | None, bias: Array | None) -> Array:
    if scale is not None:
        y = y * scale
    if bias is not None:
        y = y + bias
    return y


# ------------------------------------------------------------------ FRN and TLU
def tlu(x: Array, tau: Array, *, feature_axes: Axes = -1, dtype: Any = None) -> Array:
    """Thresholded linear unit ``z = max(x, tau)`` (Singh & Krishnan, CVPR 2020, arXiv 1911.09737).

    Args:
      x: (N, ..., C) input.
      tau: the learned threshold, shaped like ``feature_axes`` of x (per channel).
      dtype: output dtype (default: promotion of x and tau).
    """
    check_floating(x)
    features = canonicalize_axes(x.ndim, feature_axes, name="feature_axes")
    if tau is None:
        raise ValueError("tau is None; tlu needs the threshold (per feature, shaped like "
                         f"feature_axes={feature_axes!r})")
    check_param_shape("tau", tau, x.shape, features)
    out = _output_dtype(dtype, x, tau)
    return jnp.maximum(x, _broadcast(tau, x.shape, features, tau.dtype)).astype(out)


def filter_response_norm(
    x: Array, scale: Array | None = None, bias: Array | None = None,
    tau: Array | None = None, *, epsilon: float = 1e-6, learned_epsilon: Array | None = None,
    feature_axes: Axes = -1, dtype: Any = None, force_float32_reductions: bool = True,
) -> Array:
    """Filter response normalization with TLU (Singh & Krishnan, CVPR 2020, arXiv 1911.09737).

    ``nu2 = mean(x^2)`` over the spatial axes (every axis but the batch axis 0 and
    ``feature_axes``) of each sample and channel; ``y = scale * x / sqrt(nu2 + eps) + bias``;
    ``z = max(y, tau)`` (the TLU; skipped when ``tau`` is None). ``eps = epsilon`` or, with a
    ``learned_epsilon`` (the paper's choice for 1x1 activation maps), ``epsilon +
    |learned_epsilon|``. The normalization is the engine's ``Normalizer(area.instance(),
    SCALE)``: RMSNorm's operation over the instance area.

    Args:
      x: (N, ..., C) input; with no spatial axes (N, C) ``nu2 = x^2``.
      scale, bias, tau: optional params shaped like ``feature_axes`` (per channel).
      epsilon: the fixed part of eps, >= 0 (paper: 1e-6).
      learned_epsilon: optional learned scalar, shape (); its absolute value is added.
      dtype: output dtype (default: promotion of x and the params).

    Returns:
      ``z`` (or ``y`` without tau), shaped like x.
    """
    check_floating(x)
    norm = Normalizer(areas.instance(feature_axes), SCALE, "affine",
                      reduction=Reduction(epsilon, dtype=dtype,
                                          force_float32_reductions=force_float32_reductions))
    resolved = norm.resolve(x.shape)
    _check_params(x.shape, resolved.feature_axes, scale=scale, bias=bias, tau=tau)
    _check_scalar("learned_epsilon", learned_epsilon, "one learned scalar added to epsilon")
    if learned_epsilon is None:
        y, _ = norm.apply(x, None, scale, bias)
    else:  # |eps_l| folded into the statistic, so the engine's epsilon stays a constant
        stats = SCALE.statistics(x, resolved, norm.reduction)
        nu2 = stats["mean_square"] + jnp.abs(learned_epsilon).astype(stats["mean_square"].dtype)
        out = _output_dtype(dtype, x, scale, bias, learned_epsilon)
        y = SCALE.normalize_given(x, {"mean_square": nu2}, resolved,
                                  dataclasses.replace(norm.reduction, dtype=out), scale, bias)
    if tau is None:
        return y
    return tlu(y, tau, feature_axes=resolved.feature_axes,
               dtype=_output_dtype(dtype, x, scale, bias, tau, learned_epsilon))


# ------------------------------------------------------------------ EvoNorm
def init_evonorm_b0_stats(feature_shape: Any, dtype: Any = jnp.float32) -> Stats:
    """``{"var": ones(feature_shape)}``: EvoNorm-B0's running batch variance (float32)."""
    shape = (feature_shape,) if isinstance(feature_shape, int) else tuple(feature_shape)
    return {"var": jnp.ones(shape, dtype)}


def _check_b0_stats(stats: Any, feature_shape: tuple[int, ...], x_shape) -> None:
    if not isinstance(stats, dict) or set(stats) != {"var"}:
        got = sorted(stats) if isinstance(stats, dict) else type(stats).__name__
        raise ValueError(f"stats has keys {got}; expected a dict with keys ['var'] "
                         "(see init_evonorm_b0_stats)")
    if tuple(jnp.shape(stats["var"])) != feature_shape:
        raise ValueError(f"stats['var'] has shape {tuple(jnp.shape(stats['var']))}; expected "
                         f"{feature_shape} for an input of shape {tuple(x_shape)}")


def evonorm_b0(
    x: Array, stats: Stats, scale: Array | None = None, bias: Array | None = None,
    v: Array | None = None, *, train: bool = True, axis: Axes = -1, momentum: float = 0.99,
    epsilon: float = 1e-5, axis_name: Any = None, axis_index_groups: Any = None,
    use_fast_variance: bool = True, dtype: Any = None, force_float32_reductions: bool = True,
) -> tuple[Array, Stats]:
    """EvoNorm-B0 (Liu, Brock, Simonyan & Le, NeurIPS 2020, arXiv 2004.02967).

    ``y = x / max(sqrt(var_B + eps), v * x + sqrt(var_I + eps)) * scale + bias``, with ``var_B``
    the biased variance over every axis but ``axis`` (BatchNorm's area; the running average
    ``stats['var']`` at inference, updated as ``momentum * var + (1 - momentum) * var_B`` in
    training, Flax's convention) and ``var_I`` over the spatial axes of each sample and
    channel (InstanceNorm's area).

    Args:
      x: (N, ..., C) input, rank >= 2; ``axis`` the feature axis or axes.
      stats: ``{"var": (C...)}`` (:func:`init_evonorm_b0_stats`).
      scale, bias, v: optional per-feature params (C...); ``v=None`` is ``v = 1`` (its initial
        value).
      train: batch variance and updated ``stats``; False: the running variance.
      axis_name, axis_index_groups: the batch variance also spans this named axis (exactly,
        count-weighted); the instance variance is per sample.

    Returns:
      ``(y, new_stats)``; ``new_stats`` is ``stats`` at inference.
    """
    check_floating(x)
    reduction = Reduction(epsilon, axis_name, axis_index_groups, use_fast_variance, dtype,
                          force_float32_reductions)
    estimator = EMA(momentum)
    batch = areas.batch(axis).resolve(x.shape)
    instance = areas.Area("instance", axis, feature_name="axis").resolve(x.shape)
    features = batch.feature_axes
    _check_params(x.shape, features, scale=scale, bias=bias, v=v)
    _check_b0_stats(stats, batch.param_shape, x.shape)
    per_sample = dataclasses.replace(reduction, axis_name=None, axis_index_groups=None)
    var_i = STANDARDIZE.statistics(x, instance, per_sample)["var"]
    if train:
        var_b = STANDARDIZE.statistics(x, batch, reduction)["var"]
        new_stats = estimator.update(stats, {"var": var_b})
    else:
        var_b, new_stats = estimator.inference(stats)["var"], stats
    out = _output_dtype(dtype, x, scale, bias, v)
    ct = _compute_dtype(out, x)
    xc = x.astype(ct)
    sigma_b = _broadcast(jnp.sqrt(var_b.astype(ct) + epsilon), x.shape, features, ct)
    sigma_i = jnp.sqrt(jnp.expand_dims(var_i.astype(ct), instance.reduction_axes) + epsilon)
    v_b = 1.0 if v is None else _broadcast(v, x.shape, features, ct)
    y = xc / jnp.maximum(sigma_b, v_b * xc + sigma_i)
    y = _affine(y, _broadcast(scale, x.shape, features, ct),
                _broadcast(bias, x.shape, features, ct))
    return y.astype(out), new_stats


def evonorm_s0(
    x: Array, scale: Array | None = None, bias: Array | None = None, v: Array | None = None,
    *, num_groups: int | None = 32, group_size: int | None = None,
    reduction_axes: Axes | None = None, epsilon: float = 1e-5, use_fast_variance: bool = True,
    dtype: Any = None, force_float32_reductions: bool = True,
) -> Array:
    """EvoNorm-S0 (Liu, Brock, Simonyan & Le, NeurIPS 2020, arXiv 2004.02967).

    ``y = x * sigmoid(v * x) / sqrt(var_G + eps) * scale + bias``: the C channels (last axis)
    form groups (exactly one of ``num_groups`` / ``group_size``) and ``var_G`` is the biased
    variance of x over ``reduction_axes`` (default every axis but the batch axis 0) within each
    group, per sample: GroupNorm's area and variance.

    Args:
      x: (N, ..., C) input, rank >= 2.
      scale, bias, v: optional (C,) params; ``v=None`` is ``v = 1`` (its initial value).

    Returns:
      ``y`` shaped like x.
    """
    check_floating(x)
    norm = Normalizer(areas.group(num_groups, group_size, reduction_axes=reduction_axes), SCALE,
                      reduction=Reduction(epsilon, use_fast_variance=use_fast_variance,
                                          dtype=dtype,
                                          force_float32_reductions=force_float32_reductions))
    resolved = norm.resolve(x.shape)
    features = resolved.feature_axes
    _check_params(x.shape, features, scale=scale, bias=bias, v=v)
    var_g = STANDARDIZE.statistics(x, resolved, norm.reduction)["var"]
    out = _output_dtype(dtype, x, scale, bias, v)
    xc = x.astype(_compute_dtype(out, x))
    v_b = 1.0 if v is None else _broadcast(v, x.shape, features, xc.dtype)
    numerator = xc * jax.nn.sigmoid(v_b * xc)
    # numerator / sqrt(var_G + eps) * scale + bias: the engine's given-statistics scaling
    # (var_G in the place of the mean square), in the group layout.
    return SCALE.normalize_given(numerator, {"mean_square": var_g}, resolved,
                                 dataclasses.replace(norm.reduction, dtype=out), scale, bias)


# ------------------------------------------------------------------ LRN
def local_response_norm(
    x: Array, *, size: int, alpha: float = 1e-4, beta: float = 0.75, k: float = 1.0,
    axis: int = -1, dtype: Any = None, force_float32_reductions: bool = True,
) -> Array:
    """Local response normalization across channels (Krizhevsky et al. 2012; PyTorch's formula).

    ``y_c = x_c / (k + alpha / size * sum_{c'} x_{c'}^2)^beta``, the sum over the ``size``
    channels of ``axis`` centred on ``c``: ``size // 2`` before and ``(size - 1) // 2`` after,
    zero padded at the edges (``torch.nn.LocalResponseNorm``, whose defaults these are; the
    AlexNet paper and TensorFlow do not divide ``alpha`` by ``size``).

    Args:
      x: (N, ..., C) input (any rank >= 1); ``axis`` the channel axis.
      size: number of neighbouring channels summed over, a positive int.
      dtype: output dtype (default x's); the window sums are float32 at least.
    """
    check_floating(x)
    if isinstance(size, bool) or not isinstance(size, numbers.Integral) or size <= 0:
        raise ValueError(f"size={size!r} must be a positive int (the number of neighbouring "
                         "channels summed over)")
    for name, value in (("alpha", alpha), ("beta", beta), ("k", k)):
        _check_real(name, value)
    if not isinstance(axis, numbers.Integral) or isinstance(axis, bool):
        raise TypeError(f"axis={axis!r} must be one int (the channel axis)")
    (channel,) = canonicalize_axes(x.ndim, axis, name="axis")
    out = _output_dtype(dtype, x)
    ct = jnp.promote_types(_compute_dtype(out, x),
                           statistics_dtype(x, None, force_float32_reductions))
    squares = abs_square(x.astype(ct))
    window = [1] * x.ndim
    window[channel] = int(size)
    padding = [(0, 0)] * x.ndim
    padding[channel] = (size // 2, (size - 1) // 2)
    # A concrete zero (not a tracer) makes this the differentiable windowed sum.
    sums = lax.reduce_window(squares, np.zeros((), squares.dtype), lax.add, tuple(window),
                             (1,) * x.ndim, tuple(padding))
    return (x.astype(ct) / (k + alpha / size * sums) ** beta).astype(out)


# ------------------------------------------------------------------ DyT
def dyt(
    x: Array, alpha: Array | float, scale: Array | None = None, bias: Array | None = None, *,
    feature_axes: Axes = -1, dtype: Any = None,
) -> Array:
    """Dynamic Tanh (Zhu, Chen, He, LeCun & Liu, "Transformers without Normalization",
    CVPR 2025, arXiv 2503.10622): ``y = scale * tanh(alpha * x) + bias``.

    Args:
      x: (N, ..., C) input.
      alpha: the learned scalar, shape () (paper: init 0.5).
      scale, bias: optional params shaped like ``feature_axes`` (per channel).
      dtype: output dtype (default: promotion of x and the params).
    """
    check_floating(x)
    features = canonicalize_axes(x.ndim, feature_axes, name="feature_axes")
    _check_scalar("alpha", alpha, "one learned scalar")
    _check_params(x.shape, features, scale=scale, bias=bias)
    alpha = jnp.asarray(alpha)
    if not jnp.issubdtype(alpha.dtype, jnp.inexact):
        alpha = alpha.astype(jnp.float32)
    out = _output_dtype(dtype, x, alpha, scale, bias)
    ct = _compute_dtype(out, x)
    y = jnp.tanh(alpha.astype(ct) * x.astype(ct))
    y = _affine(y, _broadcast(scale, x.shape, features, ct),
                _broadcast(bias, x.shape, features, ct))
    return y.astype(out)
