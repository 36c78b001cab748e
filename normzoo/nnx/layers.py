"""normzoo's layers as ``flax.nnx`` modules; each is its linen twin's configuration (base).

Drop-in for flax.nnx where flax has the layer (``BatchNorm``, ``LayerNorm``, ``RMSNorm``,
``GroupNorm``, ``InstanceNorm``): flax.nnx's constructor (``num_features`` first, GroupNorm's
``num_groups, group_size`` next, then keywords and ``rngs``), attributes, variable types and
call signature, with flax.linen's numbers and normzoo's deliberate differences (accurate
variance when ``|mean| >> std``, count-weighted statistics over ``axis_name``, errors that
name the argument). Every other layer takes its :mod:`normzoo.linen` fields by keyword.

    >>> from flax import nnx
    >>> import normzoo.nnx as znnx
    >>> bn = znnx.BatchNorm(64, momentum=0.9, rngs=nnx.Rngs(0))
    >>> y = bn(x)           # training: batch statistics, bn.mean / bn.var updated
    >>> bn.eval(); y = bn(x)  # inference: the running statistics
"""

from __future__ import annotations

import jax

from normzoo import linen
from normzoo.nnx.base import Stateless, WithRunningAverage

Array = jax.Array


class BatchNorm(WithRunningAverage, linen=linen.BatchNorm):
    """Batch normalization (Ioffe & Szegedy 2015), drop-in for ``flax.nnx.BatchNorm``.

    Fields as :class:`normzoo.linen.BatchNorm`. Variables: ``scale``, ``bias`` (``nnx.Param``,
    (num_features,)); ``mean``, ``var`` (``nnx.BatchStat``, (num_features,), float32).
    """


class BatchRenorm(WithRunningAverage, linen=linen.BatchRenorm):
    """Batch renormalization (Ioffe 2017); fields as :class:`normzoo.linen.BatchRenorm`.

    Variables: as :class:`BatchNorm`, plus ``count`` (``nnx.BatchStat``, int32).
    """


class LayerNorm(Stateless, linen=linen.LayerNorm):
    """Layer normalization (Ba et al. 2016), drop-in for ``flax.nnx.LayerNorm``.

    Fields as :class:`normzoo.linen.LayerNorm`. Variables: ``scale``, ``bias`` (``nnx.Param``).
    """


class RMSNorm(Stateless, linen=linen.RMSNorm):
    """Root-mean-square normalization (Zhang & Sennrich 2019), drop-in for ``flax.nnx.RMSNorm``.

    Fields as :class:`normzoo.linen.RMSNorm`. Variables: ``scale`` (``nnx.Param``).
    """

    def __call__(self, x: Array, mask: Array | None = None) -> Array:
        """Normalizes ``x``; ``mask`` may be given by position, as in flax.nnx.RMSNorm."""
        return self._apply(x, None, mask)


class GroupNorm(Stateless, linen=linen.GroupNorm, positional=("num_groups", "group_size")):
    """Group normalization (Wu & He 2018), drop-in for ``flax.nnx.GroupNorm``.

    ``GroupNorm(num_features, num_groups=32, group_size=None, *, ...)``: exactly one of
    ``num_groups`` / ``group_size``. Fields as :class:`normzoo.linen.GroupNorm`.
    """


class InstanceNorm(Stateless, linen=linen.InstanceNorm):
    """Instance normalization (Ulyanov et al. 2016), drop-in for ``flax.nnx.InstanceNorm``."""


class Centering(WithRunningAverage, linen=linen.Centering):
    """Mean-only normalization ``y = x - mu + bias``; fields as :class:`normzoo.linen.Centering`."""


class Scaling(WithRunningAverage, linen=linen.Scaling):
    """``y = x / sqrt(E[x^2] + eps) * scale``; fields as :class:`normzoo.linen.Scaling`."""


class Standardization(WithRunningAverage, linen=linen.Standardization):
    """``(x - mu) / sqrt(var + eps) * scale + bias`` over ``area``; as
    :class:`normzoo.linen.Standardization`."""


class Whitening(WithRunningAverage, linen=linen.Whitening):
    """Batch whitening in groups; fields as :class:`normzoo.linen.Whitening`.

    Variables: ``scale`` (num_features,) or ``coloring`` (C/g, g, g), and ``bias``
    (``nnx.Param``); ``mean`` (num_features,) and ``covariance`` or ``whitening_matrix``
    (C/g, g, g) (``nnx.BatchStat``, float32).
    """


class ZCAWhitening(WithRunningAverage, linen=linen.ZCAWhitening):
    """ZCA whitening; fields as :class:`normzoo.linen.ZCAWhitening`."""


class PCAWhitening(WithRunningAverage, linen=linen.PCAWhitening):
    """PCA whitening; fields as :class:`normzoo.linen.PCAWhitening`."""


class CholeskyWhitening(WithRunningAverage, linen=linen.CholeskyWhitening):
    """Cholesky whitening; fields as :class:`normzoo.linen.CholeskyWhitening`."""


class IterNorm(WithRunningAverage, linen=linen.IterNorm):
    """Iterative normalization (Huang et al., CVPR 2019); as :class:`normzoo.linen.IterNorm`."""


class DecorrelatedBatchNorm(WithRunningAverage, linen=linen.DecorrelatedBatchNorm):
    """Decorrelated BatchNorm (Huang et al., CVPR 2018); as
    :class:`normzoo.linen.DecorrelatedBatchNorm`."""


class GroupWhitening(Stateless, linen=linen.GroupWhitening):
    """Group whitening (Huang et al., CVPR 2021); fields as
    :class:`normzoo.linen.GroupWhitening`. Variables: ``scale``, ``bias``."""


class InstanceWhitening(Stateless, linen=linen.InstanceWhitening):
    """Instance whitening (Switchable Whitening's IW); fields as
    :class:`normzoo.linen.InstanceWhitening`. Variables: ``scale``, ``bias``."""


class SwitchableNorm(WithRunningAverage, linen=linen.SwitchableNorm):
    """Switchable Normalization (Luo et al., ICLR 2019); fields as
    :class:`normzoo.linen.SwitchableNorm`. Variables: ``scale``, ``bias`` (num_features,),
    ``mean_weight``, ``var_weight`` (3,) (``nnx.Param``); ``mean``, ``var``
    (``nnx.BatchStat``, (num_features,), float32)."""


#: Each linen layer class and its NNX twin.
TWINS: dict[type, type] = {
    cls.linen: cls
    for cls in (BatchNorm, BatchRenorm, LayerNorm, RMSNorm, GroupNorm, InstanceNorm, Centering,
                Scaling, Standardization, Whitening, ZCAWhitening, PCAWhitening,
                CholeskyWhitening, IterNorm, DecorrelatedBatchNorm, GroupWhitening,
                InstanceWhitening, SwitchableNorm)
}

