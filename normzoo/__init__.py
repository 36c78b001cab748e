"""normzoo: a JAX/Flax normalization zoo.

* :mod:`normzoo.functional`: pure functions with explicit running statistics, and the
  engine they are points of (area x operation x recovery x estimator);
* the layers below: Flax linen modules (:mod:`normzoo.linen`), drop-in for flax.linen's where
  flax has the layer; their Flax NNX twins are in :mod:`normzoo.nnx` (``import normzoo.nnx``);
* :mod:`normzoo.registry`: pick a layer by name (``"bn"``, ``"ln"``, ...);
* :mod:`normzoo.diagnostics`: per-layer activation statistics (``activation_stats``,
  ``covariance_condition_number``), sown from Linen or NNX models and collected by path;
* :mod:`normzoo.tools`: for trained models, BatchNorm folding, precise-BN recalibration and
  PyTorch BatchNorm interop (``import normzoo.tools``);
* :mod:`normzoo.backends.cpu`: opt-in hand-written CPU kernels (off unless enabled).
"""

import os as _os

from normzoo import functional
from normzoo.linen import (
    BatchNorm,
    BatchRenorm,
    CenteredWeightNorm,
    Centering,
    CholeskyWhitening,
    DecorrelatedBatchNorm,
    DyT,
    EvoNormB0,
    EvoNormS0,
    FilterResponseNorm,
    GroupNorm,
    GroupWhitening,
    InstanceNorm,
    InstanceWhitening,
    IterNorm,
    LayerNorm,
    LocalResponseNorm,
    PCAWhitening,
    RMSNorm,
    ScaledWSConv,
    Scaling,
    SpectralNorm,
    Standardization,
    SwitchableNorm,
    TLU,
    WSConv,
    WSDense,
    WeightNorm,
    Whitening,
    ZCAWhitening,
)

__version__ = "0.1.0"

__all__ = [
    "BatchNorm",
    "BatchRenorm",
    "CenteredWeightNorm",
    "Centering",
    "CholeskyWhitening",
    "DecorrelatedBatchNorm",
    "DyT",
    "EvoNormB0",
    "EvoNormS0",
    "FilterResponseNorm",
    "GroupNorm",
    "GroupWhitening",
    "InstanceNorm",
    "InstanceWhitening",
    "IterNorm",
    "LayerNorm",
    "LocalResponseNorm",
    "PCAWhitening",
    "RMSNorm",
    "ScaledWSConv",
    "Scaling",
    "SpectralNorm",
    "Standardization",
    "SwitchableNorm",
    "TLU",
    "WSConv",
    "WSDense",
    "WeightNorm",
    "Whitening",
    "ZCAWhitening",
    "functional",
]

if _os.environ.get("NORMZOO_CPU_KERNELS") == "1":  # the opt-in CPU kernels, for this process
    from normzoo.backends import cpu as _cpu_kernels

    _cpu_kernels.enable()
