"""Drop-in replacements for flax.linen's BatchNorm, LayerNorm, GroupNorm, InstanceNorm, RMSNorm.

Same fields with the same defaults, the same ``__call__`` signature, the same variables
(names, shapes, dtypes, initial values) and the same numbers as flax.linen 0.12: swap the
import and checkpoints still load. Where flax is wrong normzoo differs on purpose:

* the default one-pass variance is shifted, so it stays accurate when ``|mean| >> std``
  (flax.linen: BatchNorm output std ~300 on ``1e4 + N(0, 1)`` in float32);
* statistics over ``axis_name`` are combined weighted by element counts, exact for masked
  or uneven shards (flax averages per-device means);
* bad axes, groups, masks or dtypes raise a ValueError / TypeError naming the argument.

Each layer is its fields and a ``normalizer`` of a few lines (:mod:`normzoo.linen.base`).
"""

from __future__ import annotations

from typing import Any, Sequence

import jax.numpy as jnp
from jax.nn import initializers

from normzoo.functional import area
from normzoo.functional.axes import Axes
from normzoo.functional.engine import Normalizer
from normzoo.functional.estimators import Renorm, make_estimator
from normzoo.functional.operations import SCALE, STANDARDIZE
from normzoo.linen.base import Stateless, WithRunningAverage

Initializer = Any


class BatchNorm(WithRunningAverage):
    """Batch normalization (Ioffe & Szegedy 2015), drop-in for ``flax.linen.BatchNorm``.

    ``y = (x - mu) / sqrt(var + epsilon) * scale + bias``; ``mu, var`` over every axis but
    ``axis`` (batch statistics in training, running averages in ``batch_stats`` at inference,
    updated as ``running = momentum * running + (1 - momentum) * batch``).

    Attributes:
      use_running_average: use ``batch_stats`` instead of the batch statistics.
      axis: feature axis or axes (params and statistics are per feature).
      momentum: EMA decay of the running statistics (Flax convention; PyTorch 0.1 = 0.9).
      epsilon: added to the variance.
      dtype: output dtype (default: promotion of input and params).
      param_dtype: dtype of ``scale`` and ``bias``.
      use_bias, use_scale, bias_init, scale_init: the affine recovery.
      axis_name, axis_index_groups: also reduce over this named (vmap/shard_map/pmap) axis.
      use_fast_variance: one pass over x (shifted, accurate) instead of two.
      force_float32_reductions: statistics and ``batch_stats`` in float32 at least.
      virtual_batch_size: ghost batches (Hoffer et al. 2017): in training, statistics per
        chunk of this many samples (it must divide the batch), the running ones from the
        chunks' average; with ``axis_name`` chunks stay per device and only the running
        statistics are averaged over devices. None (default): the whole batch, as flax.
      unbiased_running_var: store the unbiased ``n / (n - 1)`` batch variance in ``var``, as
        PyTorch does (normalization in training still uses the biased one); False: flax's.
      estimator: how the running statistics follow the batches: ``"ema"`` (flax's, the
        default), ``"debiased_ema"`` (exact from the first step), ``"cumulative"`` (the plain
        average of every batch, PyTorch's ``momentum=None``) or ``"population"`` (given
        statistics, never updated, used in training too); adds ``count`` where it needs one.

    Variables: ``params``: ``scale``, ``bias`` (C...); ``batch_stats``: ``mean``, ``var`` (C...),
    float32.
    """

    use_running_average: bool | None = None
    axis: int = -1
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
    virtual_batch_size: int | None = None
    unbiased_running_var: bool = False
    estimator: str = "ema"

    def normalizer(self, shape: Sequence[int]) -> Normalizer:
        estimator = make_estimator(self.estimator, momentum=self.momentum,
                                   unbiased=self.unbiased_running_var)
        return Normalizer(area.batch(self.axis, self.virtual_batch_size), STANDARDIZE, "affine",
                          estimator, self.reduction())


class BatchRenorm(BatchNorm):
    """Batch renormalization (Ioffe 2017, arXiv 1702.03275): BatchNorm whose training step
    corrects the batch statistics towards the running ones (flax has no such layer).

    Training: ``y = ((x - mu_B) / sigma_B * r + d) * scale + bias``,
    ``r = sg(clip(sigma_B / sigma, 1/r_max, r_max))``, ``d = sg(clip((mu_B - mu) / sigma,
    -d_max, d_max))``, ``sigma = sqrt(var + epsilon)`` of the running statistics; inference
    and running statistics as :class:`BatchNorm` (all of whose fields it has).
    ``r_max = 1, d_max = 0`` is BatchNorm.

    Attributes:
      r_max, d_max: clipping bounds, numbers or schedules ``f(step)``; the paper's warm-up is
        ``normzoo.functional.renorm_warmup(1, 3, 5000, 40000)`` and
        ``renorm_warmup(0, 5, 5000, 25000)``.

    Variables: as BatchNorm, plus ``batch_stats`` ``count`` (int32: the training steps, the
    schedules' argument). ``estimator`` is ``"ema"`` only (the paper's running averages).
    """

    r_max: Any = 3.0
    d_max: Any = 5.0

    def normalizer(self, shape: Sequence[int]) -> Normalizer:
        if self.estimator != "ema":
            raise ValueError(f"BatchRenorm: estimator={self.estimator!r}; Batch Renorm corrects "
                             "towards an EMA of the batch statistics: estimator='ema' only")
        return Normalizer(area.batch(self.axis, self.virtual_batch_size), STANDARDIZE, "affine",
                          Renorm(self.momentum, r_max=self.r_max, d_max=self.d_max,
                                 unbiased=self.unbiased_running_var),
                          self.reduction())


class LayerNorm(Stateless):
    """Layer normalization (Ba et al. 2016), drop-in for ``flax.linen.LayerNorm``.

    ``y = (x - mu) / sqrt(var + epsilon) * scale + bias``, ``mu, var`` over ``reduction_axes``
    of each sample, params over ``feature_axes``. Variables: ``params``: ``scale``, ``bias``.
    """

    epsilon: float = 1e-6
    dtype: Any = None
    param_dtype: Any = jnp.float32
    use_bias: bool = True
    use_scale: bool = True
    bias_init: Initializer = initializers.zeros
    scale_init: Initializer = initializers.ones
    reduction_axes: Axes = -1
    feature_axes: Axes = -1
    axis_name: str | None = None
    axis_index_groups: Any = None
    use_fast_variance: bool = True
    force_float32_reductions: bool = True

    def normalizer(self, shape: Sequence[int]) -> Normalizer:
        return Normalizer(area.layer(self.reduction_axes, self.feature_axes), STANDARDIZE,
                          reduction=self.reduction())


class RMSNorm(Stateless):
    """RMS normalization (Zhang & Sennrich 2019), drop-in for ``flax.linen.RMSNorm``.

    ``y = x / sqrt(E[x^2] + epsilon) * scale`` over ``reduction_axes``. Variables: ``scale``.
    """

    epsilon: float = 1e-6
    dtype: Any = None
    param_dtype: Any = jnp.float32
    use_scale: bool = True
    scale_init: Initializer = initializers.ones
    reduction_axes: Axes = -1
    feature_axes: Axes = -1
    axis_name: str | None = None
    axis_index_groups: Any = None
    use_fast_variance: bool = True
    force_float32_reductions: bool = True

    def normalizer(self, shape: Sequence[int]) -> Normalizer:
        return Normalizer(area.layer(self.reduction_axes, self.feature_axes), SCALE,
                          reduction=self.reduction())


class GroupNorm(Stateless):
    """Group normalization (Wu & He 2018), drop-in for ``flax.linen.GroupNorm``.

    The last axis (C channels) is split into groups (``num_groups`` or ``group_size``, exactly
    one); ``mu, var`` over ``reduction_axes`` (default all but the leading batch axis) within
    each group. Variables: ``params``: ``scale``, ``bias`` (C,).
    """

    num_groups: int | None = 32
    group_size: int | None = None
    epsilon: float = 1e-6
    dtype: Any = None
    param_dtype: Any = jnp.float32
    use_bias: bool = True
    use_scale: bool = True
    bias_init: Initializer = initializers.zeros
    scale_init: Initializer = initializers.ones
    reduction_axes: Axes | None = None
    axis_name: str | None = None
    axis_index_groups: Any = None
    use_fast_variance: bool = True
    force_float32_reductions: bool = True

    def normalizer(self, shape: Sequence[int]) -> Normalizer:
        return Normalizer(
            area.group(self.num_groups, self.group_size, reduction_axes=self.reduction_axes),
            STANDARDIZE, reduction=self.reduction())


class InstanceNorm(Stateless):
    """Instance normalization (Ulyanov et al. 2016), drop-in for ``flax.linen.InstanceNorm``.

    ``mu, var`` over every axis except the batch axis 0 and ``feature_axes`` (per sample and
    channel). Variables: ``params``: ``scale``, ``bias`` shaped like ``feature_axes``.
    """

    epsilon: float = 1e-6
    dtype: Any = None
    param_dtype: Any = jnp.float32
    use_bias: bool = True
    use_scale: bool = True
    bias_init: Initializer = initializers.zeros
    scale_init: Initializer = initializers.ones
    feature_axes: Axes = -1
    axis_name: str | None = None
    axis_index_groups: Any = None
    use_fast_variance: bool = True
    force_float32_reductions: bool = True

    def normalizer(self, shape: Sequence[int]) -> Normalizer:
        return Normalizer(area.instance(self.feature_axes), STANDARDIZE,
                          reduction=self.reduction())
