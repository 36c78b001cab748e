"""The named normalizers as short presets over the taxonomy: area x operation x affine.

=================  ========  ===========  =============================  =======================
function           area      operation    statistics over (N, ..., C)    paper
=================  ========  ===========  =============================  =======================
``batch_norm``     batch     standardize  N, H, W per channel; EMA       Ioffe & Szegedy 2015
``layer_norm``     layer     standardize  H, W, C per sample             Ba et al. 2016
``group_norm``     group     standardize  H, W, C/G per sample, group    Wu & He 2018
``instance_norm``  instance  standardize  H, W per sample and channel    Ulyanov et al. 2016
``rms_norm``       layer     scale        C per sample, no centering     Zhang & Sennrich 2019
``normalize``      any       any          by name                        Huang et al. 2023
=================  ========  ===========  =============================  =======================

Stateless functions return ``y``; those over the batch area take running statistics and
return ``(y, new_stats)``. Axis arguments follow flax.linen's layers of the same name.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from normzoo.functional.axes import (
    Axes,
    area_reduction_axes,
    canonicalize_axes,
    check_floating,
    check_momentum,
    complement_axes,
    resolve_num_groups,
)
from normzoo.functional.operations import (
    STATISTICS,
    apply_statistics,
    check_operation,
    normalize_with_statistics,
)
from normzoo.functional.running import ema

Array = jax.Array
Stats = dict[str, Array]


def _check_stats(stats: Any, operation: str, feature_shape: tuple[int, ...]) -> None:
    keys = STATISTICS[operation]
    if not isinstance(stats, dict) or set(stats) != set(keys):
        got = sorted(stats) if isinstance(stats, dict) else type(stats).__name__
        raise ValueError(
            f"stats has keys {got}; expected a dict with keys {list(keys)} "
            f"(see normzoo.functional.init_batch_stats)"
        )
    for key in keys:
        if tuple(jnp.shape(stats[key])) != feature_shape:
            raise ValueError(
                f"stats[{key!r}] has shape {tuple(jnp.shape(stats[key]))}; expected {feature_shape}, "
                "the sizes of the feature axes"
            )


def _batch_area(
    x: Array,
    stats: Stats,
    scale: Array | None,
    bias: Array | None,
    *,
    feature_axes: tuple[int, ...],
    operation: str,
    train: bool,
    momentum: float,
    epsilon: float,
    mask: Array | None,
    axis_name: Any,
    axis_index_groups: Any,
    use_fast_variance: bool,
    dtype: Any,
    force_float32_reductions: bool,
) -> tuple[Array, Stats]:
    """Batch area: statistics over every non-feature axis; EMA running statistics."""
    if isinstance(momentum, (int, float)):
        check_momentum(momentum)
    reduction_axes = complement_axes(x.ndim, feature_axes)
    _check_stats(stats, operation, tuple(x.shape[a] for a in feature_axes))
    if not train:
        y = apply_statistics(
            x,
            stats,
            reduction_axes,
            operation,
            epsilon=epsilon,
            scale=scale,
            bias=bias,
            feature_axes=feature_axes,
            dtype=dtype,
        )
        return y, stats
    y, batch_stats = normalize_with_statistics(
        x,
        reduction_axes,
        operation,
        epsilon=epsilon,
        scale=scale,
        bias=bias,
        feature_axes=feature_axes,
        mask=mask,
        axis_name=axis_name,
        axis_index_groups=axis_index_groups,
        use_fast_variance=use_fast_variance,
        dtype=dtype,
        force_float32_reductions=force_float32_reductions,
    )
    return y, ema(stats, batch_stats, momentum)


def batch_norm(
    x: Array,
    stats: Stats,
    scale: Array | None = None,
    bias: Array | None = None,
    *,
    axis: Axes = -1,
    train: bool = True,
    momentum: float = 0.99,
    epsilon: float = 1e-5,
    mask: Array | None = None,
    axis_name: Any = None,
    axis_index_groups: Any = None,
    use_fast_variance: bool = True,
    dtype: Any = None,
    force_float32_reductions: bool = True,
) -> tuple[Array, Stats]:
    """Batch normalization (Ioffe & Szegedy, ICML 2015, arXiv 1502.03167).

    ``y = (x - mu_B) / sqrt(var_B + eps) * scale + bias`` with ``mu_B, var_B`` (biased) over every
    axis but ``axis`` in training; the running averages ``stats`` at inference (``train=False``).

    Args:
      x: (N, ..., C) input; ``axis`` the feature axis or axes (default -1).
      stats: running statistics ``{"mean": (C,), "var": (C,)}`` (``init_batch_stats((C,))``).
      scale, bias: optional (C,) affine params.
      train: use batch statistics and return updated running ones; else use ``stats``.
      momentum: EMA decay, ``new = momentum * stats + (1 - momentum) * batch``.
      mask: optional bool, broadcastable to x: which elements count in the statistics.
      axis_name / axis_index_groups: also reduce over this named axis (count-weighted).

    Returns:
      ``(y, new_stats)``: y like x (dtype: ``dtype`` or the promotion of x and params);
      ``new_stats`` is ``stats`` when ``train`` is False.
    """
    check_floating(x)
    return _batch_area(
        x,
        stats,
        scale,
        bias,
        feature_axes=canonicalize_axes(x.ndim, axis, name="axis"),
        operation="standardize",
        train=train,
        momentum=momentum,
        epsilon=epsilon,
        mask=mask,
        axis_name=axis_name,
        axis_index_groups=axis_index_groups,
        use_fast_variance=use_fast_variance,
        dtype=dtype,
        force_float32_reductions=force_float32_reductions,
    )


def _per_sample(x: Array, reduction_axes: tuple[int, ...], operation: str, **options: Any) -> Array:
    """Stateless normalization: statistics over ``reduction_axes`` of this very input.

    ``options`` are :func:`normalize_with_statistics`'s keyword arguments.
    """
    return normalize_with_statistics(x, reduction_axes, operation, **options)[0]


def layer_norm(
    x: Array,
    scale: Array | None = None,
    bias: Array | None = None,
    *,
    reduction_axes: Axes = -1,
    feature_axes: Axes = -1,
    epsilon: float = 1e-6,
    mask: Array | None = None,
    axis_name: Any = None,
    axis_index_groups: Any = None,
    use_fast_variance: bool = True,
    dtype: Any = None,
    force_float32_reductions: bool = True,
) -> Array:
    """Layer normalization (Ba, Kiros & Hinton 2016, arXiv 1607.06450).

    ``y = (x - mu) / sqrt(var + eps) * scale + bias``, ``mu, var`` over ``reduction_axes`` of
    each sample; ``scale, bias`` shaped like ``feature_axes`` (flax.linen.LayerNorm's axes).
    """
    check_floating(x)
    return _per_sample(
        x,
        canonicalize_axes(x.ndim, reduction_axes, name="reduction_axes"),
        "standardize",
        scale=scale,
        bias=bias,
        feature_axes=canonicalize_axes(x.ndim, feature_axes, name="feature_axes"),
        epsilon=epsilon,
        mask=mask,
        axis_name=axis_name,
        axis_index_groups=axis_index_groups,
        use_fast_variance=use_fast_variance,
        dtype=dtype,
        force_float32_reductions=force_float32_reductions,
    )


def rms_norm(
    x: Array,
    scale: Array | None = None,
    *,
    reduction_axes: Axes = -1,
    feature_axes: Axes = -1,
    epsilon: float = 1e-6,
    mask: Array | None = None,
    axis_name: Any = None,
    axis_index_groups: Any = None,
    use_fast_variance: bool = True,
    dtype: Any = None,
    force_float32_reductions: bool = True,
) -> Array:
    """RMS normalization (Zhang & Sennrich, NeurIPS 2019, arXiv 1910.07467).

    ``y = x / sqrt(E[x^2] + eps) * scale`` over ``reduction_axes``; no centering, no bias.
    ``use_fast_variance`` is accepted for flax compatibility (E[x^2] needs no shift).
    """
    del use_fast_variance
    check_floating(x)
    return _per_sample(
        x,
        canonicalize_axes(x.ndim, reduction_axes, name="reduction_axes"),
        "scale",
        scale=scale,
        feature_axes=canonicalize_axes(x.ndim, feature_axes, name="feature_axes"),
        epsilon=epsilon,
        mask=mask,
        axis_name=axis_name,
        axis_index_groups=axis_index_groups,
        use_fast_variance=True,
        dtype=dtype,
        force_float32_reductions=force_float32_reductions,
    )


def group_norm(
    x: Array,
    scale: Array | None = None,
    bias: Array | None = None,
    *,
    num_groups: int | None = 32,
    group_size: int | None = None,
    reduction_axes: Axes | None = None,
    epsilon: float = 1e-6,
    mask: Array | None = None,
    axis_name: Any = None,
    axis_index_groups: Any = None,
    use_fast_variance: bool = True,
    dtype: Any = None,
    force_float32_reductions: bool = True,
) -> Array:
    """Group normalization (Wu & He, ECCV 2018, arXiv 1803.08494).

    The C channels (last axis) form G groups of C/G; ``mu, var`` span ``reduction_axes``
    (default: every axis but the leading batch axis; must include the last) within each
    group. Exactly one of ``num_groups`` / ``group_size``. LN is G = 1, IN is G = C.
    """
    check_floating(x)
    if reduction_axes is None:
        reduction_axes = tuple(range(1, x.ndim - 1)) + (-1,)
    axes = canonicalize_axes(x.ndim, reduction_axes, name="reduction_axes")
    channel_axis = x.ndim - 1
    if channel_axis not in axes:
        raise ValueError(
            f"reduction_axes={reduction_axes!r} must include the last axis ({channel_axis}), "
            "the channel axis that GroupNorm splits into groups"
        )
    groups = resolve_num_groups(x.shape[-1], num_groups, group_size)
    return _per_sample(
        x,
        axes,
        "standardize",
        scale=scale,
        bias=bias,
        feature_axes=(channel_axis,),
        num_groups=groups,
        group_axis=channel_axis,
        epsilon=epsilon,
        mask=mask,
        axis_name=axis_name,
        axis_index_groups=axis_index_groups,
        use_fast_variance=use_fast_variance,
        dtype=dtype,
        force_float32_reductions=force_float32_reductions,
    )


def instance_norm(
    x: Array,
    scale: Array | None = None,
    bias: Array | None = None,
    *,
    feature_axes: Axes = -1,
    epsilon: float = 1e-6,
    mask: Array | None = None,
    axis_name: Any = None,
    axis_index_groups: Any = None,
    use_fast_variance: bool = True,
    dtype: Any = None,
    force_float32_reductions: bool = True,
) -> Array:
    """Instance normalization (Ulyanov, Vedaldi & Lempitsky 2016, arXiv 1607.08022).

    ``mu, var`` over every axis except the batch axis 0 and ``feature_axes``: per sample
    and channel (the spatial axes of an image).
    """
    check_floating(x)
    features = canonicalize_axes(x.ndim, feature_axes, name="feature_axes")
    return _per_sample(
        x,
        area_reduction_axes(x.ndim, "instance", features),
        "standardize",
        scale=scale,
        bias=bias,
        feature_axes=features,
        epsilon=epsilon,
        mask=mask,
        axis_name=axis_name,
        axis_index_groups=axis_index_groups,
        use_fast_variance=use_fast_variance,
        dtype=dtype,
        force_float32_reductions=force_float32_reductions,
    )


def normalize(
    x: Array,
    stats: Stats | None = None,
    scale: Array | None = None,
    bias: Array | None = None,
    *,
    area: str,
    operation: str = "standardize",
    train: bool = True,
    feature_axes: Axes = -1,
    num_groups: int | None = None,
    group_size: int | None = None,
    momentum: float = 0.99,
    epsilon: float = 1e-5,
    mask: Array | None = None,
    axis_name: Any = None,
    axis_index_groups: Any = None,
    use_fast_variance: bool = True,
    dtype: Any = None,
    force_float32_reductions: bool = True,
) -> tuple[Array, Stats | None]:
    """Any point of the taxonomy: ``area`` x ``operation`` x affine (Huang et al. 2023).

    Args:
      x: (N, ..., C) input, batch axis first.
      stats: running statistics for ``area="batch"`` (``init_batch_stats(C, operation)``;
        keys ``mean`` / ``mean_square`` / ``mean, var`` for center / scale / standardize);
        must be None for the per-sample areas.
      area: ``"batch"`` (every axis but the features), ``"layer"`` (every axis but 0),
        ``"instance"`` (every axis but 0 and the features) or ``"group"`` (layer area within
        groups of the single feature axis: ``num_groups`` or ``group_size``).
      operation: ``"center"``, ``"scale"`` or ``"standardize"``.
      scale, bias: optional params shaped like the feature axes.

    Returns:
      ``(y, new_stats)``; ``new_stats`` is None for per-sample areas.
    """
    check_floating(x)
    check_operation(operation)
    features = canonicalize_axes(x.ndim, feature_axes, name="feature_axes")
    reduction_axes = area_reduction_axes(x.ndim, area, features)
    common = dict(
        mask=mask,
        axis_name=axis_name,
        axis_index_groups=axis_index_groups,
        use_fast_variance=use_fast_variance,
        dtype=dtype,
        force_float32_reductions=force_float32_reductions,
    )
    if area == "batch":
        if stats is None:
            raise ValueError(
                "stats=None: area='batch' needs running statistics; pass "
                f"init_batch_stats(feature_shape, {operation!r})"
            )
        return _batch_area(
            x,
            stats,
            scale,
            bias,
            feature_axes=features,
            operation=operation,
            train=train,
            momentum=momentum,
            epsilon=epsilon,
            **common,
        )
    if stats is not None:
        raise ValueError(f"stats must be None for area={area!r}: it keeps no running statistics")
    groups = None
    if area == "group":
        if len(features) != 1:
            raise ValueError(
                f"feature_axes={feature_axes!r}: area='group' splits exactly one channel axis"
            )
        groups = resolve_num_groups(x.shape[features[0]], num_groups, group_size)
        reduction_axes = tuple(sorted(reduction_axes + features))
    y = _per_sample(
        x,
        reduction_axes,
        operation,
        scale=scale,
        bias=bias,
        feature_axes=features,
        num_groups=groups,
        group_axis=features[0],
        epsilon=epsilon,
        **common,
    )
    return y, None
