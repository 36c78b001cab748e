"""normzoo.nnx: Flax NNX layers, each its linen twin's configuration (:mod:`normzoo.nnx.base`)."""

from normzoo.nnx.base import Normalization, Stateless, WithRunningAverage
from normzoo.nnx.layers import (
    TWINS,
    BatchNorm,
    BatchRenorm,
    Centering,
    CholeskyWhitening,
    DecorrelatedBatchNorm,
    GroupNorm,
    GroupWhitening,
    InstanceNorm,
    InstanceWhitening,
    IterNorm,
    LayerNorm,
    PCAWhitening,
    RMSNorm,
    Scaling,
    Standardization,
    SwitchableNorm,
    Whitening,
    ZCAWhitening,
)

__all__ = [
    "GroupWhitening",
    "InstanceWhitening",
    "SwitchableNorm",
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
    "TWINS",
    "Whitening",
    "WithRunningAverage",
    "ZCAWhitening",
]

from normzoo.nnx.convert import linen_path, linen_to_nnx, nnx_to_linen  # noqa: E402

__all__ += ["linen_path", "linen_to_nnx", "nnx_to_linen"]

from normzoo.nnx.activation import (  # noqa: E402
    TLU,
    DyT,
    EvoNormB0,
    EvoNormS0,
    FilterResponseNorm,
    LocalResponseNorm,
)
from normzoo.nnx.activation import TWINS as ACTIVATION_TWINS  # noqa: E402
from normzoo.nnx.weights import (  # noqa: E402
    CenteredWeightNorm,
    ScaledWSConv,
    SpectralNorm,
    WeightNorm,
    WSConv,
    WSDense,
    WSLinear,
)

__all__ += [
    "ACTIVATION_TWINS",
    "CenteredWeightNorm",
    "DyT",
    "EvoNormB0",
    "EvoNormS0",
    "FilterResponseNorm",
    "LocalResponseNorm",
    "ScaledWSConv",
    "SpectralNorm",
    "TLU",
    "WSConv",
    "WSDense",
    "WSLinear",
    "WeightNorm",
]
