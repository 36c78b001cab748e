"""normzoo.linen: Flax linen layers, each its fields and a Normalizer (:mod:`normzoo.linen.base`)."""

from normzoo.linen.activation import (
    TLU,
    DyT,
    EvoNormB0,
    EvoNormS0,
    FilterResponseNorm,
    LocalResponseNorm,
)
from normzoo.linen.base import Layer, Normalization, Stateless, WithRunningAverage
from normzoo.linen.standard import (
    BatchNorm,
    BatchRenorm,
    GroupNorm,
    InstanceNorm,
    LayerNorm,
    RMSNorm,
)
from normzoo.linen.taxonomy import Centering, Scaling, Standardization
from normzoo.linen.switchable import SwitchableNorm
from normzoo.linen.whitening import (
    CholeskyWhitening,
    DecorrelatedBatchNorm,
    GroupWhitening,
    InstanceWhitening,
    IterNorm,
    PCAWhitening,
    Whitening,
    ZCAWhitening,
)
from normzoo.linen.weights import (
    CenteredWeightNorm,
    ScaledWSConv,
    SpectralNorm,
    WeightNorm,
    WSConv,
    WSDense,
)

__all__ = [
    "GroupWhitening",
    "InstanceWhitening",
    "SwitchableNorm",
    "CenteredWeightNorm",
    "DyT",
    "EvoNormB0",
    "EvoNormS0",
    "FilterResponseNorm",
    "Layer",
    "LocalResponseNorm",
    "ScaledWSConv",
    "SpectralNorm",
    "TLU",
    "WSConv",
    "WSDense",
    "WeightNorm",
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
