"""normzoo: a JAX/Flax normalization zoo.

* :mod:`normzoo.functional`: pure functions with explicit running statistics;
* the layers below: Flax linen modules, drop-in for flax.linen's where flax has the layer;
* :mod:`normzoo.registry`: pick a layer by name (``"bn"``, ``"ln"``, ...).
"""

from normzoo import functional
from normzoo.linen import (
    BatchNorm,
    Centering,
    GroupNorm,
    InstanceNorm,
    LayerNorm,
    RMSNorm,
    Scaling,
    Standardization,
)

__version__ = "0.1.0"

__all__ = [
    "BatchNorm",
    "Centering",
    "GroupNorm",
    "InstanceNorm",
    "LayerNorm",
    "RMSNorm",
    "Scaling",
    "Standardization",
    "functional",
]

from normzoo.linen import (  # noqa: E402
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
