"""Tools for trained models: BatchNorm folding, precise-BN recalibration, PyTorch interop.

* :mod:`normzoo.tools.fold`: fold an inference-mode BatchNorm into the Dense / Conv before it
  (``W' = W g / sqrt(var + eps)``, ``c' = (c - mu) g / sqrt(var + eps) + b``);
* :mod:`normzoo.tools.recalibrate`: precise BN (Wu & Johnson 2021): population statistics
  re-estimated as the equal-weight average of per-batch statistics, weights frozen;
* :mod:`normzoo.tools.torch_interop`: PyTorch's BatchNorm momentum and state dict.

Each works for normzoo's layers and flax's own BatchNorm, in Linen and NNX.
"""

from normzoo.tools.fold import fold_batch_norm_linen, fold_batch_norm_nnx
from normzoo.tools.recalibrate import recalibrate_linen, recalibrate_nnx
from normzoo.tools.torch_interop import (
    flax_momentum_to_torch,
    from_torch_batch_norm,
    to_torch_batch_norm,
    torch_momentum_to_flax,
)

__all__ = [
    "flax_momentum_to_torch",
    "fold_batch_norm_linen",
    "fold_batch_norm_nnx",
    "from_torch_batch_norm",
    "recalibrate_linen",
    "recalibrate_nnx",
    "to_torch_batch_norm",
    "torch_momentum_to_flax",
]
