"""Drop-in replacements for flax.linen's BatchNorm, LayerNorm, GroupNorm, InstanceNorm, RMSNorm.

Same fields with the same defaults, the same ``__call__`` signature, the same variables
(names, shapes, dtypes, initial values) and the same numbers as flax.linen 0.12: swap the
import and checkpoints still load. Where flax is wrong normzoo differs on purpose:

* the default one-pass variance is shifted, so it stays accurate when ``|mean| >> std``
  (flax.linen: BatchNorm output std ~300 on ``1e4 + N(0, 1)`` in float32);
* statistics over ``axis_name`` are combined weighted by element counts, exact for masked
  or uneven shards (flax averages per-device means);
* bad axes, groups, masks or dtypes raise a ValueError / TypeError naming the argument.

Each ``__call__`` declares variables and calls :mod:`normzoo.functional`.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax.linen.module import merge_param
from jax.nn import initializers

from normzoo import functional as F
from normzoo.functional.axes import Axes, canonicalize_axes, check_floating, feature_shape
from normzoo.linen.common import affine_params, running_statistics, stats_dtype

Array = jax.Array
Initializer = Any


class BatchNorm(nn.Module):
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

    @nn.compact
    def __call__(
        self, x: Array, use_running_average: bool | None = None, *, mask: Array | None = None
    ) -> Array:
        """Normalizes ``x`` (N, ..., C); ``mask`` (broadcastable to x) selects what counts."""
        use_running_average = merge_param(
            "use_running_average", self.use_running_average, use_running_average
        )
        check_floating(x)
        features = canonicalize_axes(x.ndim, self.axis, name="axis")
        shape = feature_shape(x.shape, features)
        running = running_statistics(
            self, shape, "standardize", stats_dtype(self.force_float32_reductions, self.param_dtype)
        )
        scale, bias = _affine(self, shape)
        initializing = self.is_initializing()
        y, new_stats = F.batch_norm(
            x,
            {key: var.value for key, var in running.items()},
            scale,
            bias,
            axis=features,
            train=not use_running_average,
            momentum=self.momentum,
            epsilon=self.epsilon,
            mask=mask,
            axis_name=None if initializing else self.axis_name,
            axis_index_groups=self.axis_index_groups,
            use_fast_variance=self.use_fast_variance,
            dtype=self.dtype,
            force_float32_reductions=self.force_float32_reductions,
        )
        if not use_running_average and not initializing:
            for key, var in running.items():
                var.value = new_stats[key]
        return y


def _affine(module: nn.Module, shape) -> tuple[Array | None, Array | None]:
    return affine_params(
        module,
        shape,
        use_scale=module.use_scale,
        use_bias=getattr(module, "use_bias", False),
        scale_init=module.scale_init,
        bias_init=getattr(module, "bias_init", initializers.zeros),
        param_dtype=module.param_dtype,
        force_float32_reductions=module.force_float32_reductions,
    )


def _common(module: nn.Module) -> dict[str, Any]:
    return dict(
        epsilon=module.epsilon,
        axis_name=module.axis_name,
        axis_index_groups=module.axis_index_groups,
        use_fast_variance=module.use_fast_variance,
        dtype=module.dtype,
        force_float32_reductions=module.force_float32_reductions,
    )


class LayerNorm(nn.Module):
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

    @nn.compact
    def __call__(self, x: Array, *, mask: Array | None = None) -> Array:
        check_floating(x)
        features = canonicalize_axes(x.ndim, self.feature_axes, name="feature_axes")
        canonicalize_axes(x.ndim, self.reduction_axes, name="reduction_axes")
        scale, bias = _affine(self, feature_shape(x.shape, features))
        return F.layer_norm(
            x,
            scale,
            bias,
            reduction_axes=self.reduction_axes,
            feature_axes=features,
            mask=mask,
            **_common(self),
        )


class RMSNorm(nn.Module):
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

    @nn.compact
    def __call__(self, x: Array, *, mask: Array | None = None) -> Array:
        check_floating(x)
        features = canonicalize_axes(x.ndim, self.feature_axes, name="feature_axes")
        canonicalize_axes(x.ndim, self.reduction_axes, name="reduction_axes")
        scale, _ = _affine(self, feature_shape(x.shape, features))
        return F.rms_norm(
            x,
            scale,
            reduction_axes=self.reduction_axes,
            feature_axes=features,
            mask=mask,
            **_common(self),
        )


class GroupNorm(nn.Module):
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

    @nn.compact
    def __call__(self, x: Array, *, mask: Array | None = None) -> Array:
        check_floating(x)
        F.resolve_num_groups(x.shape[-1], self.num_groups, self.group_size)
        scale, bias = _affine(self, (x.shape[-1],))
        return F.group_norm(
            x,
            scale,
            bias,
            num_groups=self.num_groups,
            group_size=self.group_size,
            reduction_axes=self.reduction_axes,
            mask=mask,
            **_common(self),
        )


class InstanceNorm(nn.Module):
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

    @nn.compact
    def __call__(self, x: Array, *, mask: Array | None = None) -> Array:
        check_floating(x)
        features = canonicalize_axes(x.ndim, self.feature_axes, name="feature_axes")
        if 0 in features:
            raise ValueError(
                f"feature_axes={self.feature_axes!r} contains the batch axis 0: InstanceNorm keeps "
                "axis 0 as the batch"
            )
        scale, bias = _affine(self, feature_shape(x.shape, features))
        return F.instance_norm(x, scale, bias, feature_axes=features, mask=mask, **_common(self))
