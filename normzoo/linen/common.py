"""What every linen layer of normzoo declares: affine params and running statistics.

No normalization math lives in the modules: they declare variables here and call
:mod:`normzoo.functional`.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from normzoo.functional import STATISTICS, init_batch_stats

Array = jax.Array


def affine_params(
    module: nn.Module,
    shape: Sequence[int],
    *,
    use_scale: bool,
    use_bias: bool,
    scale_init: Callable,
    bias_init: Callable,
    param_dtype: Any,
    force_float32_reductions: bool = True,
) -> tuple[Array | None, Array | None]:
    """Declares ``scale`` then ``bias`` of ``shape`` in ``params`` (flax.linen's names and order)."""
    params = []
    for name, used, init in (("scale", use_scale, scale_init), ("bias", use_bias, bias_init)):
        value = module.param(name, init, list(shape), param_dtype) if used else None
        if value is not None and not force_float32_reductions:
            value = jnp.asarray(value, param_dtype)
        params.append(value)
    return params[0], params[1]


def running_statistics(
    module: nn.Module,
    shape: Sequence[int],
    operation: str,
    dtype: Any,
) -> dict[str, Any]:
    """Declares the running statistics of ``operation`` in ``batch_stats``; returns the variables."""
    shape = tuple(shape)
    return {
        key: module.variable(
            "batch_stats", key, lambda k=key: init_batch_stats(shape, operation, dtype)[k]
        )
        for key in STATISTICS[operation]
    }


def stats_dtype(force_float32_reductions: bool, param_dtype: Any) -> Any:
    """Dtype of running statistics: float32, or ``param_dtype`` if float32 is not forced."""
    return jnp.float32 if force_float32_reductions else param_dtype
