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
and keeps running statistics (EMA) in ``batch_stats`` for inference; ``layer`` every axis but N;
``instance`` every axis but N and C; ``group`` like ``layer`` within groups of channels.
"""

from __future__ import annotations

from typing import Any, ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax.linen.module import merge_param
from jax.nn import initializers

from normzoo import functional as F
from normzoo.functional.axes import (
    Axes,
    canonicalize_axes,
    check_area,
    check_floating,
    feature_shape,
)
from normzoo.linen.common import affine_params, running_statistics, stats_dtype

Array = jax.Array
Initializer = Any


class _AreaNormalization(nn.Module):
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

    @nn.compact
    def __call__(
        self, x: Array, use_running_average: bool | None = None, *, mask: Array | None = None
    ) -> Array:
        """Normalizes ``x`` (N, ..., C). ``use_running_average`` matters for ``area="batch"`` only."""
        check_area(self.area)
        check_floating(x)
        features = canonicalize_axes(x.ndim, self.feature_axes, name="feature_axes")
        shape = feature_shape(x.shape, features)
        batch_area = self.area == "batch"
        running = {}
        train = True
        if batch_area:
            train = not merge_param(
                "use_running_average", self.use_running_average, use_running_average
            )
            running = running_statistics(
                self,
                shape,
                self.operation,
                stats_dtype(self.force_float32_reductions, self.param_dtype),
            )
        scale, bias = affine_params(
            self,
            shape,
            use_scale=self.use_scale,
            use_bias=self.use_bias,
            scale_init=self.scale_init,
            bias_init=self.bias_init,
            param_dtype=self.param_dtype,
            force_float32_reductions=self.force_float32_reductions,
        )
        initializing = self.is_initializing()
        y, new_stats = F.normalize(
            x,
            {key: var.value for key, var in running.items()} if batch_area else None,
            scale,
            bias,
            area=self.area,
            operation=self.operation,
            train=train,
            feature_axes=features,
            num_groups=self.num_groups,
            group_size=self.group_size,
            momentum=self.momentum,
            epsilon=self.epsilon,
            mask=mask,
            axis_name=None if (initializing and batch_area) else self.axis_name,
            axis_index_groups=self.axis_index_groups,
            use_fast_variance=self.use_fast_variance,
            dtype=self.dtype,
            force_float32_reductions=self.force_float32_reductions,
        )
        if batch_area and train and not initializing:
            for key, var in running.items():
                var.value = new_stats[key]
        return y


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
