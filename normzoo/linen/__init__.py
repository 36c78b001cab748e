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
