"""Whitening layers: batch whitening in groups (DBN, IterNorm) as a flax.linen module.

:class:`Whitening` declares ``params`` and ``batch_stats`` and calls
:func:`normzoo.functional.whiten`; the named layers are presets over it:

========================  ========  ==============  ======================  ====================
layer                     method    group size      running average of      paper
========================  ========  ==============  ======================  ====================
``ZCAWhitening``          zca       all features    covariance              Bell & Sejnowski 1997
``PCAWhitening``          pca       all features    covariance              DBN paper (baseline)
``CholeskyWhitening``     cholesky  all features    covariance              Siarohin et al. 2019
``IterNorm``              newton    64 (or C)       whitening matrix        Huang et al. CVPR 2019
``DecorrelatedBatchNorm`` zca       16 (or C)       whitening matrix        Huang et al. CVPR 2018
========================  ========  ==============  ======================  ====================

``IterNorm`` and ``DecorrelatedBatchNorm`` use their papers' group sizes, one group of all
features when there are fewer, and the group size halved until it divides the features
otherwise (as the IterNorm reference code). Like their reference code they keep the EMA of
the whitening matrix (see :mod:`normzoo.functional.whitening` for the two schools).
"""

from __future__ import annotations

from typing import Any, ClassVar, Sequence

import jax.numpy as jnp
from jax.nn import initializers

from normzoo.functional import area
from normzoo.functional.axes import Axes
from normzoo.functional.covariance import HIGHEST
from normzoo.functional.engine import Normalizer
from normzoo.functional.estimators import make_estimator
from normzoo.functional.reduction import Reduction
from normzoo.functional.whitening import Whiten
from normzoo.linen.base import WithRunningAverage, identity_init

Initializer = Any


def adapt_group_size(features: int, group_size: int | None) -> int | None:
    """The presets' group size: one group when ``features <= group_size``, else ``group_size``
    halved until it divides ``features`` (as the IterNorm reference code does: 96 features in
    groups of 64 become 3 groups of 32)."""
    if group_size is None or group_size >= features:
        return None
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size <= 0:
        return group_size  # let check_group_size raise its message
    while features % group_size:
        group_size //= 2
    return group_size


class Whitening(WithRunningAverage):
    """Batch whitening in groups: ``y = recovery(Phi (x - mu))``, ``Cov[Phi (x - mu)] = I``.

    ``mu`` and the covariance ``Sigma`` span every axis but ``axis`` (the batch area), per group
    of ``group_size`` features; ``Phi`` is ZCA ``D Lambda^-1/2 D^T``, PCA ``Lambda^-1/2 D^T``,
    Cholesky ``L^-1`` or ``iterations`` Newton-Schulz steps (IterNorm) of ``Sigma + eps I``.

    Attributes:
      method: ``"zca"``, ``"pca"``, ``"cholesky"`` or ``"newton"``.
      group_size: features per group (must divide them); ``None`` = all features in one group.
      iterations: Newton-Schulz steps (``method="newton"``).
      use_running_average: use ``batch_stats`` instead of the batch statistics.
      axis: the feature axis or axes.
      momentum: EMA decay (Flax convention: ``new = momentum * old + (1 - momentum) * batch``).
      epsilon: added to the covariance's diagonal.
      use_bias, use_scale: the recovery's bias and scale (or coloring matrix).
      dtype: output dtype (default: promotion of input and params).
      param_dtype: dtype of the params.
      axis_name, axis_index_groups: statistics also over this named axis (count-weighted, exact).
      recovery: ``"affine"`` (per-feature ``scale``, ``bias``) or ``"coloring"`` (a full
        ``coloring`` matrix per group, initialized to the identity, and ``bias``).
      running_average_of: ``"covariance"`` (Phi recomputed from the running covariance at
        inference) or ``"whitening_matrix"`` (EMA of Phi, as the DBN / IterNorm code).
      bias_init, scale_init: initializers of ``bias`` and the affine ``scale``.
      coloring_init: initializer of the coloring matrices (identity).
      precision: of the matrix products (default ``HIGHEST``: float32 accuracy on TPU / GPU).
      estimator: how the running statistics follow the batches: ``"ema"`` (default),
        ``"debiased_ema"``, ``"cumulative"`` or ``"population"`` (as BatchNorm's).

    Variables: ``params``: ``scale`` (C...) or ``coloring`` (C/g, g, g), and ``bias`` (C...);
    ``batch_stats``: ``mean`` (C...) and ``covariance`` or ``whitening_matrix`` (C/g, g, g),
    float32.
    """

    #: Presets adapt ``group_size`` to the features (see :func:`adapt_group_size`); the generic
    #: layer raises instead when ``group_size`` does not divide them.
    adapt_group_size: ClassVar[bool] = False

    method: str = "zca"
    group_size: int | None = None
    iterations: int = 5
    use_running_average: bool | None = None
    axis: Axes = -1
    momentum: float = 0.99
    epsilon: float = 1e-5
    use_bias: bool = True
    use_scale: bool = True
    dtype: Any = None
    param_dtype: Any = jnp.float32
    axis_name: str | None = None
    axis_index_groups: Any = None
    recovery: str = "affine"
    running_average_of: str = "covariance"
    bias_init: Initializer = initializers.zeros
    scale_init: Initializer = initializers.ones
    coloring_init: Initializer = identity_init
    precision: Any = HIGHEST
    estimator: str = "ema"

    def normalizer(self, shape: Sequence[int]) -> Normalizer:
        group_size = self.group_size
        if self.adapt_group_size:
            features = 1
            for n in area.batch(self.axis).resolve(shape).param_shape:
                features *= n
            group_size = adapt_group_size(features, group_size)
        return Normalizer(
            area.batch(self.axis),
            Whiten(self.method, group_size, self.iterations, self.running_average_of,
                   self.precision),
            self.recovery, make_estimator(self.estimator, momentum=self.momentum),
            Reduction(self.epsilon, self.axis_name, self.axis_index_groups, dtype=self.dtype),
        )


class ZCAWhitening(Whitening):
    """ZCA whitening ``Phi = D Lambda^-1/2 D^T`` of all features (one group by default)."""

    method: str = "zca"


class PCAWhitening(Whitening):
    """PCA whitening ``Phi = Lambda^-1/2 D^T``: a baseline; it suffers stochastic axis swapping."""

    method: str = "pca"


class CholeskyWhitening(Whitening):
    """Cholesky whitening ``Phi = L^-1`` (``L L^T = Sigma + eps I``): cheapest exact method."""

    method: str = "cholesky"


class IterNorm(Whitening):
    """Iterative normalization (Huang et al., CVPR 2019, arXiv 1904.03441).

    Newton-Schulz whitening with 5 iterations in groups of 64 features (all features when
    fewer; halved until it divides them); EMA of the whitening matrix, as the reference code.
    """

    adapt_group_size: ClassVar[bool] = True

    method: str = "newton"
    group_size: int | None = 64
    iterations: int = 5
    running_average_of: str = "whitening_matrix"


class DecorrelatedBatchNorm(Whitening):
    """Decorrelated batch normalization (Huang et al., CVPR 2018, arXiv 1804.08450).

    ZCA whitening in groups of 16 features (all features when fewer; halved until it divides
    them); EMA of the whitening
    matrix, as the reference code.
    """

    adapt_group_size: ClassVar[bool] = True

    method: str = "zca"
    group_size: int | None = 16
    running_average_of: str = "whitening_matrix"


# ---------------------------------------------------------------- per-sample whitening
from normzoo.linen.base import Stateless  # noqa: E402


class GroupWhitening(Stateless):
    """Group whitening (Huang, Zhou, Liu, Zhu & Shao, "Group Whitening: Balancing Learning
    Efficiency and Representational Capacity", CVPR 2021, arXiv 2009.13333).

    Per sample, the C channels are reshaped into ``num_groups`` groups of C/G consecutive
    channels; the G group rows (each of ``m = C/G x spatial`` elements) are centered and
    whitened with their own G x G covariance ``Sigma_n + eps I``: ``Y_n = Phi(Sigma_n) X_n``,
    then the per-channel affine. No running statistics: inference computes the same as
    training. ``Normalizer(area.group(G), Whiten(method))`` (docs/design.md).

    ``num_groups`` defaults to 64, the paper's ImageNet setting (official code
    ``huangleiBuaa/GroupWhitening``, ``--norm-cfg=T=5,num_groups=64``); as that code, it is
    reduced to C when there are fewer channels (each group one channel), and must divide C
    otherwise. The paper's experiments whiten with ``method="newton"`` (5 iterations, its
    ``IGWItN``); ``"zca"`` (the default here, the paper's eq. and its SVD variant) is exact.
    Unlike the official code (no epsilon), ``epsilon`` is added to the covariance's diagonal.

    Attributes:
      num_groups: G, the number of whitened group rows per sample (default 64, at most C).
      method: ``"zca"``, ``"pca"``, ``"cholesky"`` or ``"newton"``.
      iterations: Newton-Schulz steps (``method="newton"``).
      epsilon: added to the covariance's diagonal.
      use_scale, use_bias, scale_init, bias_init: the per-channel affine recovery.
      dtype: output dtype (default: promotion of input and params).
      param_dtype: dtype of the params.
      precision: of the matrix products (default ``HIGHEST``).

    Variables: ``params``: ``scale``, ``bias`` (C,).
    """

    num_groups: int = 64
    method: str = "zca"
    iterations: int = 5
    epsilon: float = 1e-5
    use_scale: bool = True
    use_bias: bool = True
    dtype: Any = None
    param_dtype: Any = jnp.float32
    scale_init: Initializer = initializers.ones
    bias_init: Initializer = initializers.zeros
    precision: Any = HIGHEST

    def normalizer(self, shape: Sequence[int]) -> Normalizer:
        groups = self.num_groups
        channels = shape[-1] if len(shape) else 0
        if (isinstance(groups, int) and not isinstance(groups, bool)
                and channels > 0 and groups > channels):
            groups = channels  # as the official code: at most one group per channel
        return Normalizer(area.group(groups),
                          Whiten(self.method, None, self.iterations, precision=self.precision),
                          "affine", reduction=Reduction(self.epsilon, dtype=self.dtype))


class InstanceWhitening(Stateless):
    """Instance whitening: per sample, the channels whitened over the spatial positions.

    ``mu_n`` and ``Sigma_n`` (C x C, or one block per group of ``group_size`` channels) over
    every axis but 0 and ``feature_axes`` of sample n; ``y = Phi(Sigma_n + eps I) (x - mu_n)``,
    then the per-channel affine. No running statistics. The IW of Switchable Whitening (Pan,
    Zhan, Shi, Tang & Luo, ICCV 2019; its code whitens groups of 16 channels with 5 Newton-Schulz
    steps) and the whitening of WCT style transfer (Li et al., NeurIPS 2017, ZCA of all
    channels: ``group_size=None`` with more channels than 16). ``group_size`` is adapted as the
    batch presets' (one group when there are fewer channels, halved until it divides them).
    Needs spatial axes: an input ``(N, C)`` has one position per sample.

    Attributes:
      method: ``"zca"``, ``"pca"``, ``"cholesky"`` or ``"newton"``.
      group_size: channels per whitened block (default 16; None: all channels).
      iterations: Newton-Schulz steps (``method="newton"``).
      epsilon: added to the covariance's diagonal.
      use_scale, use_bias, scale_init, bias_init: the per-channel affine recovery.
      dtype, param_dtype: output and params dtypes.
      feature_axes: the channel axis or axes (the others but 0 are spatial).
      precision: of the matrix products.

    Variables: ``params``: ``scale``, ``bias`` (C...).
    """

    method: str = "zca"
    group_size: int | None = 16
    iterations: int = 5
    epsilon: float = 1e-5
    use_scale: bool = True
    use_bias: bool = True
    dtype: Any = None
    param_dtype: Any = jnp.float32
    scale_init: Initializer = initializers.ones
    bias_init: Initializer = initializers.zeros
    feature_axes: Axes = -1
    precision: Any = HIGHEST

    def normalizer(self, shape: Sequence[int]) -> Normalizer:
        where = area.instance(self.feature_axes)
        features = 1
        for n in where.resolve(shape).param_shape:
            features *= n
        return Normalizer(where,
                          Whiten(self.method, adapt_group_size(features, self.group_size),
                                 self.iterations, precision=self.precision),
                          "affine", reduction=Reduction(self.epsilon, dtype=self.dtype))
