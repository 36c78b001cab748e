"""normzoo.linen: Flax linen layers, each its fields and a Normalizer (:mod:`normzoo.linen.base`)."""

from normzoo.linen.base import Normalization, Stateless, WithRunningAverage
from normzoo.linen.standard import (
    BatchNorm,
    BatchRenorm,
    GroupNorm,
    InstanceNorm,
    LayerNorm,
    RMSNorm,
)
from normzoo.linen.taxonomy import Centering, Scaling, Standardization
from normzoo.linen.whitening import (
    CholeskyWhitening,
    DecorrelatedBatchNorm,
    IterNorm,
    PCAWhitening,
    Whitening,
    ZCAWhitening,
)

__all__ = [
    "BatchNorm",
    "BatchRenorm",
    "Centering",
    "CholeskyWhitening",
    "DecorrelatedBatchNorm",
    "GroupNorm",
    "InstanceNorm",
    "IterNorm",
    "LayerNorm",
    "Normalization",
    "PCAWhitening",
    "RMSNorm",
    "Scaling",
    "Standardization",
    "Stateless",
    "Whitening",
    "WithRunningAverage",
    "ZCAWhitening",
]
