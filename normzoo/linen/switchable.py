"""Switchable Normalization (Luo et al., ICLR 2019) as a flax.linen module, called as BatchNorm.

A layer of the protocol of :class:`normzoo.linen.base.Layer` (``feature_shape``,
``param_specs``, ``init_stats``, ``compute``) over the pure function
:func:`normzoo.functional.switchable.switchable_norm`; its NNX twin
(:mod:`normzoo.nnx.switchable`) runs the same methods, so both APIs declare the same variables
and compute the same numbers.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.nn import initializers

from normzoo.functional import switchable as F
from normzoo.functional.axes import Axes, check_momentum
from normzoo.functional.reduction import check_epsilon
from normzoo.linen.base import Layer, Spec, stats_dtype

Array = jax.Array
Initializer = Callable[..., Any]


class SwitchableNorm(Layer):
    """Switchable Normalization (Luo, Ren, Peng, Zhang & Li, ICLR 2019, arXiv 1806.10779).

    ``y = (x - mu) / sqrt(var + epsilon) * scale + bias`` with ``mu = sum_k w_k mu_k``,
    ``var = sum_k w'_k var_k`` over k in (IN, LN, BN), ``w = softmax(mean_weight)``,
    ``w' = softmax(var_weight)``. IN: the spatial axes (every axis but 0 and ``axis``) of each
    sample and channel; LN: every axis but 0; BN: every axis but ``axis`` (batch statistics in
    training, the running averages in ``batch_stats`` at inference, updated as
    ``running = momentum * running + (1 - momentum) * batch``). The LN and BN moments are
    pooled from the IN moments (the official code's convention), all variances biased (the
    paper's); see :mod:`normzoo.functional.switchable`.

    Attributes:
      use_running_average: BN's statistics from ``batch_stats`` instead of the batch.
      axis: the feature (channel) axis or axes.
      momentum: EMA decay of the running statistics (Flax convention; 0.99 as
        flax.linen.BatchNorm; the official code uses 0.997, or 0.9 for SwitchNorm2d).
      epsilon: added to the mixed variance.
      dtype: output dtype (default: promotion of input and params).
      param_dtype: dtype of the params.
      use_bias, use_scale, bias_init, scale_init: the affine recovery.
      mean_weight_init, var_weight_init: inits of the (3,) logits (zeros: equal weights).
      axis_name, axis_index_groups: BN's statistics also span this named axis (exact).
      use_fast_variance: IN's variance in one shifted pass (accurate); False: two passes.
      force_float32_reductions: statistics and ``batch_stats`` in float32 at least.

    Variables: ``params``: ``scale``, ``bias`` (C...), ``mean_weight``, ``var_weight`` (3,);
    ``batch_stats``: ``mean``, ``var`` (C...), float32.
    """

    use_running_average: bool | None = None
    axis: Axes = -1
    momentum: float = 0.99
    epsilon: float = 1e-5
    dtype: Any = None
    param_dtype: Any = jnp.float32
    use_bias: bool = True
    use_scale: bool = True
    bias_init: Initializer = initializers.zeros
    scale_init: Initializer = initializers.ones
    mean_weight_init: Initializer = initializers.zeros
    var_weight_init: Initializer = initializers.zeros
    axis_name: str | None = None
    axis_index_groups: Any = None
    use_fast_variance: bool = True
    force_float32_reductions: bool = True

    def feature_shape(self, shape: Sequence[int]) -> tuple[int, ...]:
        return F.resolve(shape, self.axis).param_shape

    def param_specs(self, shape: Sequence[int]) -> list[Spec]:
        features = self.feature_shape(shape)
        specs = []
        if self.use_scale:
            specs.append(("scale", self.scale_init, features))
        if self.use_bias:
            specs.append(("bias", self.bias_init, features))
        n = len(F.SOURCES)
        return specs + [("mean_weight", self.mean_weight_init, (n,)),
                        ("var_weight", self.var_weight_init, (n,))]

    def init_stats(self, shape: Sequence[int]) -> dict[str, Array]:
        # Checked here, where both APIs start (NNX builds its variables from this call).
        check_epsilon(self.epsilon)
        if isinstance(self.momentum, (int, float)):
            check_momentum(self.momentum)
        return F.init_switchable_norm_stats(self.feature_shape(shape), stats_dtype(self))

    def compute(self, x, params, stats, *, train, mask=None):
        return F.switchable_norm(
            x, stats, params.get("scale"), params.get("bias"), params["mean_weight"],
            params["var_weight"], train=train, axis=self.axis, momentum=self.momentum,
            epsilon=self.epsilon, mask=mask, axis_name=self.axis_name,
            axis_index_groups=self.axis_index_groups, use_fast_variance=self.use_fast_variance,
            dtype=self.dtype, force_float32_reductions=self.force_float32_reductions)

    @nn.compact
    def __call__(
        self, x: Array, use_running_average: bool | None = None, *, mask: Array | None = None
    ) -> Array:
        """Normalizes ``x`` (N, ..., C); ``use_running_average`` as BatchNorm's; ``mask``
        (broadcastable to x) selects what counts in the statistics."""
        return self._apply(x, use_running_average, mask)
