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
    InstanceNorm,
    IterNorm,
    LayerNorm,
    PCAWhitening,
    RMSNorm,
    Scaling,
    Standardization,
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
    "TWINS",
    "Whitening",
    "WithRunningAverage",
    "ZCAWhitening",
]

from normzoo.nnx.convert import linen_path, linen_to_nnx, nnx_to_linen  # noqa: E402

__all__ += ["linen_path", "linen_to_nnx", "nnx_to_linen"]
