"""Running statistics: initial values and the exponential moving average (EMA).

Convention (Flax's): ``running = momentum * running + (1 - momentum) * batch``, so Flax's
default 0.99 keeps 99% of the old value; PyTorch's ``momentum=0.1`` is Flax's 0.9.
Running statistics are float32 whatever the input dtype; the variance is the biased one
(PyTorch stores the unbiased ``var * m / (m - 1)``).
"""

from __future__ import annotations

from typing import Any, Sequence

import jax
import jax.numpy as jnp

from normzoo.functional.operations import INITIAL, STATISTICS, check_operation


def init_batch_stats(
    feature_shape: Sequence[int] | int,
    operation: str = "standardize",
    dtype: Any = jnp.float32,
) -> dict[str, jax.Array]:
    """Initial running statistics for ``operation`` over features of ``feature_shape``.

    ``init_batch_stats((C,))`` is ``{"mean": zeros(C), "var": ones(C)}`` as flax.linen's BatchNorm.
    """
    check_operation(operation)
    shape = (feature_shape,) if isinstance(feature_shape, int) else tuple(feature_shape)
    return {key: jnp.full(shape, INITIAL[key], dtype) for key in STATISTICS[operation]}


def ema(running: Any, batch: Any, momentum: float | jax.Array) -> Any:
    """``momentum * running + (1 - momentum) * batch`` leaf by leaf (dtypes promote as in flax)."""
    return jax.tree_util.tree_map(lambda r, b: momentum * r + (1 - momentum) * b, running, batch)
