"""The named normalizers: each a point of the taxonomy, a few lines over the engine.

=================  ========  ===========  ==============================  =======================
function           area      operation    statistics over (N, ..., C)     paper
=================  ========  ===========  ==============================  =======================
``batch_norm``     batch     standardize  N, H, W per channel; EMA        Ioffe & Szegedy 2015
``layer_norm``     layer     standardize  ``reduction_axes`` per sample   Ba et al. 2016
``group_norm``     group     standardize  H, W, C/G per sample, group     Wu & He 2018
``instance_norm``  instance  standardize  H, W per sample and channel     Ulyanov et al. 2016
``rms_norm``       layer     scale        C per sample, no centering      Zhang & Sennrich 2019
``whiten``         batch     whiten       N, H, W per group of features   Huang et al. 2018, 2019
``normalize``      any       any          by name                         Huang et al. 2023
=================  ========  ===========  ==============================  =======================

Stateless functions return ``y``; those with running statistics take them and return
``(y, new_stats)``. Axis arguments follow flax.linen's layers of the same name. ``**options``
are the reduction options (:class:`~normzoo.functional.reduction.Reduction`: ``axis_name``,
``axis_index_groups``, ``use_fast_variance``, ``dtype``, ``force_float32_reductions``).
"""

from __future__ import annotations

from typing import Any, Sequence

import jax

from normzoo.functional import area as areas
from normzoo.functional.axes import Axes
from normzoo.functional.covariance import HIGHEST
from normzoo.functional.engine import Normalizer
from normzoo.functional.estimators import EMA, BatchOnly, Estimator, Renorm, make_estimator
from normzoo.functional.operations import SCALE, STANDARDIZE, Moments
from normzoo.functional.reduction import Reduction
from normzoo.functional.running import init_batch_stats
from normzoo.functional.whitening import Whiten

Array = jax.Array
Stats = dict[str, Array]


def _stateless(operation: str, x: Array, axes: Axes, epsilon: float, mask: Array | None,
               **options: Any) -> Array:
    """``operation`` over exactly ``axes``, no params, no running statistics."""
    norm = Normalizer(areas.axes(axes, ()), Moments(operation), "none",
                      reduction=Reduction(epsilon, **options))
    return norm.apply(x, mask=mask)[0]


def center(x: Array, axes: Axes = -1, *, mask: Array | None = None, **options: Any) -> Array:
    """Centering ``y = x - E[x]`` over ``axes`` (same shape as x)."""
    return _stateless("center", x, axes, 0.0, mask, **options)


def scale(
    x: Array, axes: Axes = -1, *, epsilon: float = 1e-6, mask: Array | None = None,
    **options: Any,
) -> Array:
    """Scaling ``y = x / sqrt(E[x^2] + eps)`` over ``axes`` (RMSNorm without gain)."""
    return _stateless("scale", x, axes, epsilon, mask, **options)


def standardize(
    x: Array, axes: Axes = -1, *, epsilon: float = 1e-5, mask: Array | None = None,
    **options: Any,
) -> Array:
    """Standardization ``y = (x - E[x]) / sqrt(Var[x] + eps)`` over ``axes`` (biased variance)."""
    return _stateless("standardize", x, axes, epsilon, mask, **options)


def batch_norm(
    x: Array, stats: Stats, scale: Array | None = None, bias: Array | None = None, *,
    axis: Axes = -1, train: bool = True, momentum: float = 0.99, epsilon: float = 1e-5,
    mask: Array | None = None, skip_nonfinite: bool = False,
    virtual_batch_size: int | None = None, **options: Any,
) -> tuple[Array, Stats]:
    """Batch normalization (Ioffe & Szegedy, ICML 2015, arXiv 1502.03167).

    ``y = (x - mu_B) / sqrt(var_B + eps) * scale + bias`` with ``mu_B, var_B`` (biased) over every
    axis but ``axis`` in training; the running averages ``stats`` at inference (``train=False``),
    updated as ``momentum * stats + (1 - momentum) * batch``.

    Args:
      x: (N, ..., C) input; ``axis`` the feature axis or axes.
      stats: ``{"mean": (C,), "var": (C,)}`` (``init_batch_stats((C,))``).
      scale, bias: optional (C,) params.
      mask: optional bool, broadcastable to x: which elements count in the statistics.
      skip_nonfinite: keep ``stats`` when the batch's statistics are not finite.
      virtual_batch_size: ghost batches (Hoffer et al. 2017): statistics per chunk of this
        many samples, the running ones from the chunks' average (must divide N).

    Returns:
      ``(y, new_stats)``; ``new_stats`` is ``stats`` at inference or for an empty batch.
    """
    norm = Normalizer(areas.batch(axis, virtual_batch_size), STANDARDIZE, "affine",
                      EMA(momentum, skip_nonfinite=skip_nonfinite), Reduction(epsilon, **options))
    return norm.apply(x, stats, scale, bias, train=train, mask=mask)


def batch_renorm(
    x: Array, stats: Stats, scale: Array | None = None, bias: Array | None = None, *,
    axis: Axes = -1, train: bool = True, momentum: float = 0.99, epsilon: float = 1e-5,
    r_max: Any = 3.0, d_max: Any = 5.0, mask: Array | None = None,
    skip_nonfinite: bool = False, virtual_batch_size: int | None = None, **options: Any,
) -> tuple[Array, Stats]:
    """Batch renormalization (Ioffe, NeurIPS 2017, arXiv 1702.03275).

    Training: ``y = ((x - mu_B) / sigma_B * r + d) * scale + bias`` with
    ``r = sg(clip(sigma_B / sigma, 1/r_max, r_max))``, ``d = sg(clip((mu_B - mu) / sigma,
    -d_max, d_max))`` from the running ``mu``, ``sigma = sqrt(var + eps)``; inference and the
    running statistics as :func:`batch_norm`. ``r_max``, ``d_max``: numbers or schedules of
    the step ``count`` (:func:`~normzoo.functional.estimators.renorm_warmup`).

    Args:
      stats: ``{"mean": (C,), "var": (C,), "count": ()}`` (``Normalizer.init_stats`` or
        :func:`init_batch_renorm_stats`).

    Returns:
      ``(y, new_stats)``.
    """
    norm = Normalizer(
        areas.batch(axis, virtual_batch_size), STANDARDIZE, "affine",
        Renorm(momentum, r_max=r_max, d_max=d_max, skip_nonfinite=skip_nonfinite),
        Reduction(epsilon, **options))
    return norm.apply(x, stats, scale, bias, train=train, mask=mask)


def init_batch_renorm_stats(feature_shape: Sequence[int] | int) -> Stats:
    """``{"mean": zeros, "var": ones, "count": 0}``: Batch Renorm's initial running statistics
    (``init_batch_stats(feature_shape)`` and the step count)."""
    return Renorm().init(init_batch_stats(feature_shape))


def layer_norm(
    x: Array, scale: Array | None = None, bias: Array | None = None, *,
    reduction_axes: Axes = -1, feature_axes: Axes = -1, epsilon: float = 1e-6,
    mask: Array | None = None, **options: Any,
) -> Array:
    """Layer normalization (Ba, Kiros & Hinton 2016, arXiv 1607.06450).

    ``y = (x - mu) / sqrt(var + eps) * scale + bias``, ``mu, var`` over ``reduction_axes`` of
    each sample; ``scale, bias`` shaped like ``feature_axes`` (flax.linen.LayerNorm's axes).
    """
    norm = Normalizer(areas.layer(reduction_axes, feature_axes), STANDARDIZE,
                      reduction=Reduction(epsilon, **options))
    return norm.apply(x, None, scale, bias, mask=mask)[0]


def rms_norm(
    x: Array, scale: Array | None = None, *, reduction_axes: Axes = -1,
    feature_axes: Axes = -1, epsilon: float = 1e-6, mask: Array | None = None, **options: Any,
) -> Array:
    """RMS normalization (Zhang & Sennrich, NeurIPS 2019, arXiv 1910.07467).

    ``y = x / sqrt(E[x^2] + eps) * scale`` over ``reduction_axes``; no centering, no bias.
    """
    norm = Normalizer(areas.layer(reduction_axes, feature_axes), SCALE,
                      reduction=Reduction(epsilon, **options))
    return norm.apply(x, None, scale, None, mask=mask)[0]


def group_norm(
    x: Array, scale: Array | None = None, bias: Array | None = None, *,
    num_groups: int | None = 32, group_size: int | None = None,
    reduction_axes: Axes | None = None, epsilon: float = 1e-6, mask: Array | None = None,
    **options: Any,
) -> Array:
    """Group normalization (Wu & He, ECCV 2018, arXiv 1803.08494).

    The C channels (last axis) form G groups of C/G; ``mu, var`` span ``reduction_axes``
    (default: every axis but the leading batch axis; must include the last) within each
    group. Exactly one of ``num_groups`` / ``group_size``. LN is G = 1, IN is G = C.
    """
    norm = Normalizer(areas.group(num_groups, group_size, reduction_axes=reduction_axes),
                      STANDARDIZE, reduction=Reduction(epsilon, **options))
    return norm.apply(x, None, scale, bias, mask=mask)[0]


def instance_norm(
    x: Array, scale: Array | None = None, bias: Array | None = None, *,
    feature_axes: Axes = -1, epsilon: float = 1e-6, mask: Array | None = None, **options: Any,
) -> Array:
    """Instance normalization (Ulyanov, Vedaldi & Lempitsky 2016, arXiv 1607.08022).

    ``mu, var`` over every axis except the batch axis 0 and ``feature_axes``: per sample and
    channel (the spatial axes of an image).
    """
    norm = Normalizer(areas.instance(feature_axes), STANDARDIZE,
                      reduction=Reduction(epsilon, **options))
    return norm.apply(x, None, scale, bias, mask=mask)[0]


def whiten(
    x: Array, stats: Stats, scale: Array | None = None, bias: Array | None = None, *,
    method: str = "zca", axis: Axes = -1, group_size: int | None = None, iterations: int = 5,
    train: bool = True, momentum: float = 0.99, epsilon: float = 1e-5,
    running_average_of: str = "covariance", recovery: str = "affine", mask: Array | None = None,
    axis_name: Any = None, axis_index_groups: Any = None, dtype: Any = None,
    precision: Any = HIGHEST,
) -> tuple[Array, Stats]:
    """Batch whitening in groups (DBN, Huang et al. CVPR 2018; IterNorm, Huang et al. CVPR 2019).

    ``y = recovery(Phi (x - mu))`` per group of ``group_size`` features, with ``mu`` and the
    covariance ``Sigma`` over every axis but ``axis`` in training, the running statistics at
    inference; ``Phi = whitening_matrix(Sigma, method)`` (:mod:`~normzoo.functional.whitening`).

    Args:
      x: (N, ..., C) input (``axis`` the feature axis or axes; all others are samples).
      stats: ``init_whitening_stats(C, group_size, running_average_of)``.
      scale: ``recovery="affine"``: per-feature (C...); ``"coloring"``: (C/g, g, g) matrices.
      bias: optional per-feature bias (C...).
      running_average_of: ``"covariance"`` (Phi recomputed at inference) or
        ``"whitening_matrix"`` (EMA of Phi, as the DBN / IterNorm reference code).
      mask: optional bool: which samples count (a sample counts if all its features do).

    Returns:
      ``(y, new_stats)``; ``new_stats`` is ``stats`` at inference.
    """
    norm = Normalizer(
        areas.batch(axis), Whiten(method, group_size, iterations, running_average_of, precision),
        recovery, EMA(momentum),
        Reduction(epsilon, axis_name, axis_index_groups, dtype=dtype),
    )
    return norm.apply(x, stats, scale, bias, train=train, mask=mask)


def normalize(
    x: Array, stats: Stats | None = None, scale: Array | None = None, bias: Array | None = None,
    *, area: str, operation: str | Any = "standardize", train: bool = True,
    feature_axes: Axes = -1, reduction_axes: Axes | None = None, num_groups: int | None = None,
    group_size: int | None = None, momentum: float = 0.99, epsilon: float = 1e-5,
    estimator: str | Estimator | None = None, mask: Array | None = None, **options: Any,
) -> tuple[Array, Stats | None]:
    """Any point of the taxonomy (Huang et al. 2023): ``area`` x ``operation`` x affine x estimator.

    Args:
      x: (N, ..., C) input, batch axis first.
      stats: running statistics when the estimator keeps them (the batch area's default,
        EMA: ``init_batch_stats(C, operation)``), else None.
      area: ``"batch"``, ``"layer"``, ``"group"`` (``num_groups`` or ``group_size``),
        ``"instance"``, ``"position"`` or ``"axes"`` (``reduction_axes``).
      operation: ``"center"``, ``"scale"``, ``"standardize"``, or an operation object
        (e.g. :class:`~normzoo.functional.whitening.Whiten`).
      estimator: a name of :data:`~normzoo.functional.estimators.ESTIMATORS` or an
        estimator; default EMA(momentum) for the batch area, batch statistics otherwise.

    Returns:
      ``(y, new_stats)``; ``new_stats`` is None without running statistics.
    """
    op = Moments(operation) if isinstance(operation, str) else operation
    if estimator is None:
        estimator = EMA(momentum) if area == "batch" else BatchOnly()
    elif isinstance(estimator, str):
        estimator = make_estimator(estimator, momentum=momentum)
    where = areas.Area(area, feature_axes, reduction_axes, num_groups, group_size)
    norm = Normalizer(where, op, "affine", estimator, Reduction(epsilon, **options))
    return norm.apply(x, stats, scale, bias, train=train, mask=mask)
