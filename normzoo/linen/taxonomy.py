"""Layers named by the taxonomy (Huang et al., TPAMI 2023, arXiv 2009.12836): area x operation.

* :class:`Centering`: ``y = x - mu (+ bias)``: mean-only normalization (Salimans & Kingma,
  "Weight Normalization", 2016, section 3 "mean-only batch normalization").
* :class:`Scaling`: ``y = x / sqrt(E[x^2] + eps) * scale``: RMSNorm's operation over any area
  (Zhang & Sennrich 2019; over the batch area a mean-square BatchNorm, cf. PowerNorm,
  Shen et al. 2020).
* :class:`Standardization`: ``y = (x - mu) / sqrt(var + eps) * scale + bias`` over any area:
  ``area="batch"`` is BatchNorm, ``"layer"`` LayerNorm over all non-batch axes, ``"group"``
  GroupNorm, ``"instance"`` InstanceNorm.

Areas for ``x`` of shape (N, ..., C) with ``feature_axes`` C: ``batch`` reduces every axis but C
and keeps running statistics in ``batch_stats`` for inference (``estimator``: ``"ema"``, as
Flax, ``"debiased_ema"``, ``"cumulative"`` or ``"population"``); ``layer`` every axis but N;
``instance`` every axis but N and C; ``group`` like ``layer`` within groups of channels;
``position`` the channels at each position.
"""

from __future__ import annotations

from typing import Any, ClassVar, Sequence

import jax.numpy as jnp
from jax.nn import initializers

from normzoo.functional.area import Area
from normzoo.functional.axes import Axes
from normzoo.functional.engine import Normalizer
from normzoo.functional.estimators import BatchOnly, make_estimator
from normzoo.functional.operations import Moments
from normzoo.linen.base import WithRunningAverage

Initializer = Any


class _AreaNormalization(WithRunningAverage):
    """Shared body of the taxonomy layers; subclasses fix ``operation`` and the defaults."""

    operation: ClassVar[str] = "standardize"

    area: str = "batch"
    use_running_average: bool | None = None
    feature_axes: Axes = -1
    num_groups: int | None = None
    group_size: int | None = None
    momentum: float = 0.99
    epsilon: float = 1e-5
    dtype: Any = None
    param_dtype: Any = jnp.float32
    use_bias: bool = True
    use_scale: bool = True
    bias_init: Initializer = initializers.zeros
    scale_init: Initializer = initializers.ones
    axis_name: str | None = None
    axis_index_groups: Any = None
    use_fast_variance: bool = True
    force_float32_reductions: bool = True
    estimator: str = "ema"
    skip_nonfinite: bool = False
    unbiased_running_var: bool = False

    def normalizer(self, shape: Sequence[int]) -> Normalizer:
        """``use_running_average`` and the estimator matter for ``area="batch"`` only."""
        estimator = BatchOnly()
        if self.area == "batch":
            estimator = make_estimator(
                self.estimator, momentum=self.momentum, skip_nonfinite=self.skip_nonfinite,
                unbiased=self.unbiased_running_var)
        where = Area(self.area, self.feature_axes, None, self.num_groups, self.group_size)
        return Normalizer(where, Moments(self.operation), "affine", estimator, self.reduction())


class Centering(_AreaNormalization):
    """Mean-only normalization ``y = x - mu + bias`` (Salimans & Kingma 2016).

    ``area="batch"`` (default) keeps the running ``mean`` in ``batch_stats`` for inference;
    ``area="layer"`` centers each sample. Params: ``bias`` (and ``scale`` if ``use_scale``).
    """

    operation: ClassVar[str] = "center"
    use_scale: bool = False


class Scaling(_AreaNormalization):
    """Scaling without centering ``y = x / sqrt(E[x^2] + eps) * scale`` (RMSNorm's operation).

    ``area="layer"`` (default) is RMSNorm over all non-batch axes; ``area="batch"`` keeps the
    running ``mean_square`` in ``batch_stats``. Params: ``scale`` (and ``bias`` if ``use_bias``).
    """

    operation: ClassVar[str] = "scale"
    area: str = "layer"
    epsilon: float = 1e-6
    use_bias: bool = False


class Standardization(_AreaNormalization):
    """Standardization ``y = (x - mu) / sqrt(var + eps) * scale + bias`` over ``area``.

    ``area``: ``"batch"`` (BatchNorm, running ``mean``/``var``), ``"layer"``, ``"group"``
    (``num_groups`` or ``group_size``), ``"instance"``.
    """

    operation: ClassVar[str] = "standardize"
