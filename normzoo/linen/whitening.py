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
from normzoo.functional.estimators import EMA
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
            self.recovery, EMA(self.momentum),
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
