"""Normalization-activation layers as flax.linen modules: FRN, TLU, EvoNorm-B0/S0, LRN, DyT.

Each layer is its flax-style fields and three small methods over the pure functions of
:mod:`normzoo.functional.activation`:

* ``feature_shape(shape)``: the shape of its per-feature variables for an input ``shape``;
* ``param_specs(shape)``: ``[(name, init, shape)]``, the params it declares, in order;
* ``compute(x, params, stats, *, train)``: ``(y, new_stats)`` from the functional core;

and ``init_stats(shape)`` for one with running statistics (EvoNorm-B0's ``var``). The base,
:class:`Activation`, declares the variables and calls ``compute``; the NNX twins
(:mod:`normzoo.nnx.activation`) run the same methods of an unbound twin, so both APIs declare
the same variables and compute the same numbers.

* ``FilterResponseNorm`` (Singh & Krishnan, CVPR 2020): ``scale``, ``bias``, ``tau`` (C...),
  and ``eps`` () with ``learned_epsilon``; ``TLU``: ``tau`` alone;
* ``EvoNormB0`` (Liu et al., NeurIPS 2020): ``scale``, ``bias``, ``v`` (C...) and
  ``batch_stats`` ``var`` (C...), float32;
* ``EvoNormS0`` (same paper): ``scale``, ``bias``, ``v`` (C,);
* ``LocalResponseNorm`` (Krizhevsky et al. 2012, PyTorch's formula): no variables;
* ``DyT`` (Zhu et al., CVPR 2025): ``alpha`` (), ``scale``, ``bias`` (C...).
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.nn import initializers

from normzoo.functional import activation as F
from normzoo.functional import area
from normzoo.functional.axes import Axes, canonicalize_axes
from normzoo.linen.base import Layer, Spec, stats_dtype

Array = jax.Array
Initializer = Callable[..., Any]
Stats = dict[str, Array]


def affine_specs(layer: Any, feature_shape: tuple[int, ...]) -> list[Spec]:
    """``scale`` then ``bias`` per feature, as the layer's ``use_scale`` / ``use_bias`` say."""
    specs = []
    if getattr(layer, "use_scale", False):
        specs.append(("scale", layer.scale_init, feature_shape))
    if getattr(layer, "use_bias", False):
        specs.append(("bias", layer.bias_init, feature_shape))
    return specs


class Activation(Layer):
    """Base of these layers: the protocol of :class:`~normzoo.linen.base.Layer`, with the
    affine params along ``feature_axes`` by default."""

    def feature_shape(self, shape: Sequence[int]) -> tuple[int, ...]:
        """Sizes of the feature axes (``feature_axes`` field) of an input of ``shape``."""
        axes = canonicalize_axes(len(shape), self.feature_axes, name="feature_axes")
        return tuple(shape[a] for a in axes)

    def param_specs(self, shape: Sequence[int]) -> list[Spec]:
        return affine_specs(self, self.feature_shape(shape))


class StatelessActivation(Activation):
    """A layer called as ``layer(x)``."""

    @nn.compact
    def __call__(self, x: Array) -> Array:
        """Applies the layer to ``x`` (N, ..., C)."""
        return self._apply(x)


# ------------------------------------------------------------------ FRN and TLU
class FilterResponseNorm(StatelessActivation):
    """Filter response normalization + TLU (Singh & Krishnan, CVPR 2020, arXiv 1911.09737).

    ``nu2 = mean(x^2)`` over the spatial axes of each sample and channel,
    ``y = scale * x / sqrt(nu2 + eps) + bias``, ``z = max(y, tau)`` (with ``use_tlu``);
    ``eps = epsilon``, or ``epsilon + |eps|`` with a learned scalar ``eps`` when
    ``learned_epsilon`` (the paper's choice for 1x1 activation maps).

    Attributes:
      epsilon: the fixed eps (paper: 1e-6), >= 0.
      dtype: output dtype (default: promotion of input and params).
      param_dtype: dtype of the params.
      use_bias, use_scale, bias_init, scale_init: the affine recovery.
      use_tlu, tau_init: the thresholded linear unit and its threshold's init (zeros).
      learned_epsilon, eps_init: a learned scalar ``eps`` added (as ``|eps|``) to epsilon.
      feature_axes: the channel axis or axes (the others but 0 are spatial).
      force_float32_reductions: ``nu2`` in float32 at least.

    Variables: ``params``: ``scale``, ``bias``, ``tau`` (C...), ``eps`` ().
    """

    epsilon: float = 1e-6
    dtype: Any = None
    param_dtype: Any = jnp.float32
    use_bias: bool = True
    use_scale: bool = True
    bias_init: Initializer = initializers.zeros
    scale_init: Initializer = initializers.ones
    use_tlu: bool = True
    tau_init: Initializer = initializers.zeros
    learned_epsilon: bool = False
    eps_init: Initializer = initializers.constant(1e-4)
    feature_axes: Axes = -1
    force_float32_reductions: bool = True

    def feature_shape(self, shape):
        return area.instance(self.feature_axes).resolve(shape).param_shape

    def param_specs(self, shape):
        features = self.feature_shape(shape)
        specs = affine_specs(self, features)
        if self.use_tlu:
            specs.append(("tau", self.tau_init, features))
        if self.learned_epsilon:
            specs.append(("eps", self.eps_init, ()))
        return specs

    def compute(self, x, params, stats, *, train):
        y = F.filter_response_norm(
            x, params.get("scale"), params.get("bias"), params.get("tau"),
            epsilon=self.epsilon, learned_epsilon=params.get("eps"),
            feature_axes=self.feature_axes, dtype=self.dtype,
            force_float32_reductions=self.force_float32_reductions)
        return y, None


class TLU(StatelessActivation):
    """Thresholded linear unit ``z = max(x, tau)``, tau learned per channel (Singh & Krishnan 2020).

    Attributes: ``tau_init`` (zeros), ``feature_axes``, ``dtype``, ``param_dtype``.
    Variables: ``params``: ``tau`` (C...).
    """

    tau_init: Initializer = initializers.zeros
    feature_axes: Axes = -1
    dtype: Any = None
    param_dtype: Any = jnp.float32

    def param_specs(self, shape):
        return [("tau", self.tau_init, self.feature_shape(shape))]

    def compute(self, x, params, stats, *, train):
        return F.tlu(x, params["tau"], feature_axes=self.feature_axes, dtype=self.dtype), None


# ------------------------------------------------------------------ EvoNorm
class EvoNormB0(Activation):
    """EvoNorm-B0 (Liu et al., NeurIPS 2020, arXiv 2004.02967), called as flax's BatchNorm.

    ``y = x / max(sqrt(var_B + eps), v * x + sqrt(var_I + eps)) * scale + bias``: ``var_B`` over
    every axis but ``axis`` (batch statistics in training, the running average in
    ``batch_stats`` at inference, ``var = momentum * var + (1 - momentum) * var_B``),
    ``var_I`` over the spatial axes of each sample and channel.

    Attributes:
      use_running_average: use ``batch_stats['var']`` instead of the batch variance.
      axis: feature axis or axes.
      momentum: EMA decay of the running variance (Flax convention).
      epsilon: added to both variances (paper: 1e-5).
      dtype, param_dtype, use_bias, use_scale, bias_init, scale_init: as flax.linen.BatchNorm.
      v_init: init of ``v`` (ones).
      axis_name, axis_index_groups: the batch variance also spans this named axis.
      use_fast_variance, force_float32_reductions: as flax.linen.BatchNorm.

    Variables: ``params``: ``scale``, ``bias``, ``v`` (C...); ``batch_stats``: ``var`` (C...),
    float32.
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
    v_init: Initializer = initializers.ones
    axis_name: str | None = None
    axis_index_groups: Any = None
    use_fast_variance: bool = True
    force_float32_reductions: bool = True

    def feature_shape(self, shape):
        return area.batch(self.axis).resolve(shape).param_shape

    def param_specs(self, shape):
        features = self.feature_shape(shape)
        return affine_specs(self, features) + [("v", self.v_init, features)]

    def init_stats(self, shape):
        return F.init_evonorm_b0_stats(self.feature_shape(shape), stats_dtype(self))

    def compute(self, x, params, stats, *, train):
        return F.evonorm_b0(
            x, stats, params.get("scale"), params.get("bias"), params["v"], train=train,
            axis=self.axis, momentum=self.momentum, epsilon=self.epsilon,
            axis_name=self.axis_name, axis_index_groups=self.axis_index_groups,
            use_fast_variance=self.use_fast_variance, dtype=self.dtype,
            force_float32_reductions=self.force_float32_reductions)

    @nn.compact
    def __call__(self, x: Array, use_running_average: bool | None = None) -> Array:
        """Applies EvoNorm-B0 to ``x`` (N, ..., C); ``use_running_average`` as BatchNorm's."""
        return self._apply(x, use_running_average)


class EvoNormS0(StatelessActivation):
    """EvoNorm-S0 (Liu et al., NeurIPS 2020, arXiv 2004.02967), configured as flax's GroupNorm.

    ``y = x * sigmoid(v * x) / sqrt(var_G + eps) * scale + bias``, ``var_G`` the variance over
    ``reduction_axes`` (default all but the batch axis) within each group of channels (last
    axis), per sample.

    Attributes:
      num_groups, group_size: exactly one (default 32 groups, the paper's).
      epsilon: added to the variance (paper: 1e-5).
      dtype, param_dtype, use_bias, use_scale, bias_init, scale_init, reduction_axes,
      use_fast_variance, force_float32_reductions: as flax.linen.GroupNorm.
      v_init: init of ``v`` (ones).

    Variables: ``params``: ``scale``, ``bias``, ``v`` (C,).
    """

    num_groups: int | None = 32
    group_size: int | None = None
    epsilon: float = 1e-5
    dtype: Any = None
    param_dtype: Any = jnp.float32
    use_bias: bool = True
    use_scale: bool = True
    bias_init: Initializer = initializers.zeros
    scale_init: Initializer = initializers.ones
    v_init: Initializer = initializers.ones
    reduction_axes: Axes | None = None
    use_fast_variance: bool = True
    force_float32_reductions: bool = True

    def feature_shape(self, shape):
        where = area.group(self.num_groups, self.group_size, reduction_axes=self.reduction_axes)
        return where.resolve(shape).param_shape

    def param_specs(self, shape):
        features = self.feature_shape(shape)
        return affine_specs(self, features) + [("v", self.v_init, features)]

    def compute(self, x, params, stats, *, train):
        y = F.evonorm_s0(
            x, params.get("scale"), params.get("bias"), params["v"], num_groups=self.num_groups,
            group_size=self.group_size, reduction_axes=self.reduction_axes,
            epsilon=self.epsilon, use_fast_variance=self.use_fast_variance, dtype=self.dtype,
            force_float32_reductions=self.force_float32_reductions)
        return y, None


# ------------------------------------------------------------------ LRN and DyT
class LocalResponseNorm(StatelessActivation):
    """Local response normalization across channels, ``torch.nn.LocalResponseNorm``'s formula.

    ``y_c = x_c / (k + alpha / size * sum_{c'} x_{c'}^2)^beta`` over the ``size`` channels
    of ``axis`` centred on ``c`` (zero padded). No variables.

    Attributes: ``size`` (required, as PyTorch), ``alpha`` (1e-4), ``beta`` (0.75), ``k``
    (1.0), ``axis`` (the channel axis, -1), ``dtype`` (output dtype), ``force_float32_reductions``.
    """

    size: int
    alpha: float = 1e-4
    beta: float = 0.75
    k: float = 1.0
    axis: int = -1
    dtype: Any = None
    force_float32_reductions: bool = True

    def feature_shape(self, shape):
        return (shape[canonicalize_axes(len(shape), self.axis, name="axis")[-1]],)

    def param_specs(self, shape):
        return []

    def compute(self, x, params, stats, *, train):
        y = F.local_response_norm(x, size=self.size, alpha=self.alpha, beta=self.beta, k=self.k,
                                  axis=self.axis, dtype=self.dtype,
                                  force_float32_reductions=self.force_float32_reductions)
        return y, None


class DyT(StatelessActivation):
    """Dynamic Tanh (Zhu, Chen, He, LeCun & Liu, CVPR 2025, arXiv 2503.10622).

    ``y = scale * tanh(alpha * x) + bias``, ``alpha`` one learned scalar.

    Attributes:
      alpha_init: initial ``alpha`` (0.5, the paper's outside LLMs).
      dtype, param_dtype, use_bias, use_scale, bias_init, scale_init, feature_axes: as
      flax.linen.LayerNorm.

    Variables: ``params``: ``alpha`` (), ``scale``, ``bias`` (C...).
    """

    alpha_init: float = 0.5
    dtype: Any = None
    param_dtype: Any = jnp.float32
    use_bias: bool = True
    use_scale: bool = True
    bias_init: Initializer = initializers.zeros
    scale_init: Initializer = initializers.ones
    feature_axes: Axes = -1

    def param_specs(self, shape):
        alpha = ("alpha", initializers.constant(self.alpha_init), ())
        return [alpha] + affine_specs(self, self.feature_shape(shape))

    def compute(self, x, params, stats, *, train):
        y = F.dyt(x, params["alpha"], params.get("scale"), params.get("bias"),
                  feature_axes=self.feature_axes, dtype=self.dtype)
        return y, None
