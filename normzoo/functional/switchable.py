"""Switchable Normalization (Luo, Ren, Peng, Zhang & Li, ICLR 2019, arXiv 1806.10779).

"Differentiable Learning-to-Normalize via Switchable Normalization": for x of shape
``(N, *spatial, C)`` the statistics of three areas,

========  =============================================  ==========================
source    statistics over                                 at inference
========  =============================================  ==========================
IN        the spatial axes of each sample and channel    this sample's
LN        the spatial axes and channels of each sample   this sample's
BN        the batch and spatial axes of each channel     the running averages
========  =============================================  ==========================

are mixed with learned importance weights and x is standardized with the mixture:

    mu  = sum_k w_k mu_k,    w  = softmax(mean_weight),
    var = sum_k w'_k var_k,  w' = softmax(var_weight),      k in (IN, LN, BN)
    y   = (x - mu) / sqrt(var + eps) * scale + bias.

``mean_weight`` and ``var_weight`` are learned 3-vectors in the order (IN, LN, BN) (the
official code's ``mean_weight[0] * mean_in + mean_weight[1] * mean_ln + mean_weight[2] *
mean_bn``); zeros (or any constant, the official code's ones) give equal weights 1/3.

How the statistics are computed (the official code's convention,
``switchablenorms/Switchable-Normalization``, ``devkit/ops/switchable_norm.py``): the IN
moments are computed once (:func:`~normzoo.functional.operations.statistics` over the
instance area: float32 at least, masks, the accurate shifted one-pass variance), and the LN
and BN moments are derived from them instead of reducing x again. The official code writes
``var_ln = mean_c(var_in + mean_in^2) - mean_ln^2``; normzoo computes the same quantity as
``mean_c(var_in + (mean_in - mean_ln)^2)`` (the law of total variance, equal in exact
arithmetic and free of the cancellation of the one-pass form when ``|mean| >> std``), and
the same for BN over the batch. With a mask, each IN statistic is weighted by its number of
unmasked elements (the exact pooled moments). Two deliberate differences from the official
code, both to follow the paper's equations (and normzoo's BatchNorm):

* every variance is the biased one (the paper's eq. 2). The official code uses PyTorch's
  unbiased ``x.var`` for IN and derives LN and BN from it, so its LN / BN variances are
  neither biased nor unbiased. Here a weight vector that selects one source gives exactly
  InstanceNorm, LayerNorm (over every non-batch axis) or BatchNorm;
* the running statistics follow Flax's BatchNorm: ``running = momentum * running + (1 -
  momentum) * batch``, default momentum 0.99 (the official code: 0.997 for SwitchNorm1d /
  3d, 0.9 for SwitchNorm2d), running variance initialized to ones (the official code:
  zeros), float32.

Cross-device (``axis_name``): the BN moments also span the named axis, combined exactly
(count-weighted, :func:`~normzoo.functional.moments.combine_across_devices`); IN and LN are
per sample. For an input without spatial axes (``(N, C)``) IN's statistics are the elements
themselves (mean x, variance 0), as normzoo's InstanceNorm; the official SwitchNorm1d drops
IN there (use ``mean_weight`` / ``var_weight`` with a large negative IN entry for that).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from normzoo.functional.area import Area, Resolved
from normzoo.functional.axes import Axes, check_floating, check_mask, check_momentum
from normzoo.functional.estimators import EMA
from normzoo.functional.moments import combine_across_devices
from normzoo.functional.operations import (
    STANDARDIZE,
    apply_statistics,
    check_param_shape,
    output_dtype,
)
from normzoo.functional.reduction import Reduction
from normzoo.functional.running import init_batch_stats

Array = jax.Array
Stats = dict[str, Array]

#: The sources of the statistics, in the order of ``mean_weight`` / ``var_weight``.
SOURCES = ("instance", "layer", "batch")


def init_switchable_norm_stats(feature_shape: Any, dtype: Any = jnp.float32) -> Stats:
    """``{"mean": zeros, "var": ones}`` of ``feature_shape``: the BN source's running
    statistics (as :func:`~normzoo.functional.running.init_batch_stats`), float32."""
    return init_batch_stats(feature_shape, "standardize", dtype)


def resolve(shape: Any, axis: Axes = -1) -> Resolved:
    """The instance area of an input of ``shape`` (reduction axes: the spatial axes; feature
    axes: ``axis``); ValueError naming ``axis`` when it does not fit."""
    return Area("instance", axis, feature_name="axis").resolve(tuple(shape))


def _check_weight(name: str, value: Any) -> None:
    if value is not None and tuple(jnp.shape(value)) != (len(SOURCES),):
        raise ValueError(
            f"{name} has shape {tuple(jnp.shape(value))}; expected (3,): one logit per source "
            f"{SOURCES} (softmax-normalized)"
        )


def _check_stats(stats: Any, feature_shape: tuple[int, ...], x_shape) -> None:
    if not isinstance(stats, dict) or set(stats) != {"mean", "var"}:
        got = sorted(stats) if isinstance(stats, dict) else type(stats).__name__
        raise ValueError(f"stats has keys {got}; expected a dict with keys ['mean', 'var'] "
                         "(see init_switchable_norm_stats)")
    for key in ("mean", "var"):
        if tuple(jnp.shape(stats[key])) != feature_shape:
            raise ValueError(
                f"stats[{key!r}] has shape {tuple(jnp.shape(stats[key]))}; expected "
                f"{feature_shape} (the sizes of the feature axes) for an input of shape "
                f"{tuple(x_shape)}"
            )


def _pool(count: Array, mean: Array, var: Array, axes: tuple[int, ...]):
    """Count-weighted moments of the union of groups along ``axes``: ``(count, mean, var)``
    with ``var = E_k[var_k + (mean_k - mean)^2]`` (no cancellation). Groups without elements
    (count 0: NaN statistics) are left out."""
    has = count > 0
    total = jnp.sum(count, axes)
    mean_p = jnp.sum(jnp.where(has, count * mean, 0), axes) / total
    spread = var + jnp.square(mean - jnp.expand_dims(mean_p, axes))
    var_p = jnp.sum(jnp.where(has, count * spread, 0), axes) / total
    return total, mean_p, var_p


def switchable_norm(
    x: Array,
    stats: Stats,
    scale: Array | None = None,
    bias: Array | None = None,
    mean_weight: Array | None = None,
    var_weight: Array | None = None,
    *,
    train: bool = True,
    axis: Axes = -1,
    momentum: float = 0.99,
    epsilon: float = 1e-5,
    mask: Array | None = None,
    axis_name: Any = None,
    axis_index_groups: Any = None,
    use_fast_variance: bool = True,
    dtype: Any = None,
    force_float32_reductions: bool = True,
) -> tuple[Array, Stats]:
    """Switchable Normalization (Luo et al., ICLR 2019); equations in the module docstring.

    Args:
      x: (N, ..., C) input, rank >= 2, batch axis first; ``axis`` the feature (channel) axis or
        axes, the other non-batch axes are spatial.
      stats: the BN source's running statistics ``{"mean": (C...), "var": (C...)}``
        (:func:`init_switchable_norm_stats`).
      scale, bias: optional per-feature params (C...).
      mean_weight, var_weight: optional (3,) logits of the importance weights of (IN, LN, BN);
        None is equal weights (their initial value, zeros).
      train: BN statistics of this batch, and ``stats`` updated with them (EMA, Flax's
        convention); False: the running ``stats`` as BN's statistics (IN and LN are always
        the sample's own).
      momentum: EMA decay of the running statistics.
      epsilon: added to the mixed variance.
      mask: optional bool, broadcastable to x: which elements count in the statistics. Each
        (sample, channel) needs an unmasked element (IN's statistics), as for InstanceNorm.
      axis_name, axis_index_groups: BN's statistics also span this named axis (exactly,
        count-weighted); IN and LN are per sample.
      use_fast_variance: IN's variance in one shifted pass (accurate); False: two passes.
      dtype: output dtype (default: promotion of x and the params); the statistics are
        computed in it, float32 at least unless ``force_float32_reductions`` is False.

    Returns:
      ``(y, new_stats)``: ``y`` like x, ``new_stats`` the updated running statistics
      (``stats`` itself at inference or for an empty batch).

    Raises:
      TypeError: x not real floating. ValueError: bad ``axis``, params, weights, ``stats``,
      mask, ``momentum`` or ``epsilon``, or spatial axes that hold no elements.
    """
    check_floating(x)
    if jnp.iscomplexobj(x):
        raise TypeError(f"x has dtype {jnp.result_type(x)}; switchable_norm supports real "
                        "inputs only")
    reduction = Reduction(epsilon, None, None, use_fast_variance, dtype, force_float32_reductions)
    check_momentum(momentum)
    resolved = resolve(x.shape, axis)
    features, spatial = resolved.feature_axes, resolved.reduction_axes
    for name, value in (("scale", scale), ("bias", bias)):
        check_param_shape(name, value, x.shape, features)
    _check_weight("mean_weight", mean_weight)
    _check_weight("var_weight", var_weight)
    _check_stats(stats, resolved.param_shape, x.shape)
    mask = check_mask(mask, x.shape)
    if x.shape[0] == 0:  # no samples: an empty output, the running statistics unchanged
        return jnp.zeros(x.shape, output_dtype(x, scale, bias, dtype)), stats

    # IN: the engine's statistics over the instance area, (N, C...).
    moments = STANDARDIZE.statistics(x, resolved, reduction, mask)
    mean_in, var_in = moments["mean"], moments["var"]
    if mask is None:
        count = jnp.full(mean_in.shape, resolved.count, mean_in.dtype)
    else:
        count = jnp.sum(mask, spatial).astype(mean_in.dtype)
    # LN: the IN moments pooled over the features of each sample, (N,) -> (N, 1...).
    stat_features = tuple(range(1, mean_in.ndim))
    _, mean_ln, var_ln = _pool(count, mean_in, var_in, stat_features)
    mean_ln = jnp.expand_dims(mean_ln, stat_features)
    var_ln = jnp.expand_dims(var_ln, stat_features)
    # BN: pooled over the batch (and the devices of axis_name), or the running averages.
    estimator = EMA(momentum)
    if train:
        n_bn, mean_bn, var_bn = _pool(count, mean_in, var_in, (0,))
        if axis_name is not None:
            _, mean_bn, var_bn = combine_across_devices(n_bn, mean_bn, var_bn, axis_name,
                                                        axis_index_groups)
        new_stats = estimator.update(stats, {"mean": mean_bn, "var": var_bn})
    else:
        running = estimator.inference(stats)
        mean_bn = jnp.asarray(running["mean"]).astype(mean_in.dtype)
        var_bn = jnp.asarray(running["var"]).astype(mean_in.dtype)
        new_stats = stats
    w = _softmax(mean_weight, mean_in.dtype)
    w_var = _softmax(var_weight, mean_in.dtype)
    mean = w[0] * mean_in + w[1] * mean_ln + w[2] * mean_bn[None]
    var = w_var[0] * var_in + w_var[1] * var_ln + w_var[2] * var_bn[None]
    y = apply_statistics(x, {"mean": mean, "var": var}, spatial, "standardize",
                         epsilon=epsilon, scale=scale, bias=bias, feature_axes=features,
                         dtype=dtype)
    return y, new_stats


def _softmax(logits: Array | None, dtype: Any) -> Array:
    if logits is None:
        return jnp.full((len(SOURCES),), 1.0 / len(SOURCES), dtype)
    return jax.nn.softmax(jnp.asarray(logits).astype(dtype))


__all__ = ["SOURCES", "init_switchable_norm_stats", "switchable_norm"]
