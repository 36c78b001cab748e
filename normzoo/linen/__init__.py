"""normzoo.linen: Flax linen layers over :mod:`normzoo.functional`."""

from normzoo.linen.standard import BatchNorm, GroupNorm, InstanceNorm, LayerNorm, RMSNorm
from normzoo.linen.taxonomy import Centering, Scaling, Standardization

__all__ = [
    "BatchNorm",
    "Centering",
    "GroupNorm",
    "InstanceNorm",
    "LayerNorm",
    "RMSNorm",
    "Scaling",
    "Standardization",
]

from normzoo.linen.whitening import (  # noqa: E402
    CholeskyWhitening,
    DecorrelatedBatchNorm,
    IterNorm,
    PCAWhitening,
    Whitening,
    ZCAWhitening,
)

__all__ += [
    "CholeskyWhitening",
    "DecorrelatedBatchNorm",
    "IterNorm",
    "PCAWhitening",
    "Whitening",
    "ZCAWhitening",
]
