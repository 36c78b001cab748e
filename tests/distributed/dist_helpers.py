"""Shared pieces of the multi-device tests: the 8-device mesh, shard_map from the installed
jax, the layers with batch statistics (Linen and NNX builders) and a scale-relative check.

tests/conftest.py sets ``XLA_FLAGS=--xla_force_host_platform_device_count=8`` before jax is
imported, so every pytest process sees 8 simulated CPU devices.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import normzoo
import normzoo.nnx as znnx

NDEV = 8
#: float32 rounding: a sharded reduction adds the same numbers in another order.
RTOL = 2e-5
# Collectives of compiled HLO are counted by benchmarks.devices.collectives.


def mesh(n: int = NDEV) -> jax.sharding.Mesh:
    """A 1-d mesh ``('data',)`` of the first ``n`` devices (skips where there are fewer)."""
    if len(jax.devices()) < n:
        pytest.skip(f"needs {n} devices (XLA_FLAGS=--xla_force_host_platform_device_count)")
    devices = np.array(jax.devices()[:n])
    try:
        return jax.sharding.Mesh(devices, ("data",), axis_types=(jax.sharding.AxisType.Auto,))
    except (AttributeError, TypeError):  # older jax: no axis_types; Auto is implied
        return jax.sharding.Mesh(devices, ("data",))


def shard_map(f: Callable, mesh: jax.sharding.Mesh, in_specs: Any, out_specs: Any,
              **kw: Any) -> Callable:
    """``jax.jit(shard_map(f, ...))`` with the installed jax's shard_map."""
    sm = getattr(jax, "shard_map", None)
    if sm is None:  # jax < 0.7
        from jax.experimental.shard_map import shard_map as sm
    return jax.jit(sm(f, mesh=mesh, in_specs=in_specs, out_specs=out_specs, **kw))


def close(actual: Any, desired: Any, rtol: float = RTOL, what: str = "") -> None:
    """``|a - d| <= rtol (|d| + max|d|)`` leaf by leaf: relative to each leaf's scale, so a
    value near zero is held to the leaf's rounding, not to its own."""
    a_leaves, a_tree = jax.tree_util.tree_flatten(actual)
    d_leaves, d_tree = jax.tree_util.tree_flatten(desired)
    assert a_tree == d_tree, (what, a_tree, d_tree)
    for a, d in zip(a_leaves, d_leaves):
        a, d = np.asarray(a, np.float64), np.asarray(d, np.float64)
        assert a.shape == d.shape, (what, a.shape, d.shape)
        scale = float(np.max(np.abs(d))) if d.size else 0.0
        np.testing.assert_allclose(a, d, rtol=rtol, atol=rtol * max(scale, 1e-30), err_msg=what)


# ---------------------------------------------------------------- the layers
#: Every layer with batch statistics: name -> (linen / nnx class name, fields). Channels 8.
LAYERS: dict[str, tuple[str, dict[str, Any]]] = {
    "BatchNorm": ("BatchNorm", dict(momentum=0.9)),
    "BatchRenorm": ("BatchRenorm", dict(momentum=0.9, r_max=1.2, d_max=0.3)),
    "ghost BN": ("BatchNorm", dict(momentum=0.9, virtual_batch_size=4)),
    "Centering": ("Centering", dict(area="batch", momentum=0.9)),
    "ZCAWhitening": ("ZCAWhitening", dict(momentum=0.9)),
    "PCAWhitening": ("PCAWhitening", dict(momentum=0.9)),
    "CholeskyWhitening": ("CholeskyWhitening", dict(momentum=0.9)),
    "IterNorm": ("IterNorm", dict(momentum=0.9, group_size=4)),
    "DecorrelatedBatchNorm": ("DecorrelatedBatchNorm", dict(momentum=0.9, group_size=4)),
    "GroupWhitening": ("GroupWhitening", dict(num_groups=4)),
    "SwitchableNorm": ("SwitchableNorm", dict(momentum=0.9)),
    "EvoNormB0": ("EvoNormB0", dict(momentum=0.9)),
}
#: Layers without running statistics (no ``use_running_average`` field).
STATELESS = {"GroupWhitening"}


def linen_layer(name: str, **extra: Any) -> Any:
    """The Linen layer ``name`` of :data:`LAYERS` in training mode."""
    cls, kw = LAYERS[name]
    mode = {} if name in STATELESS else {"use_running_average": False}
    return getattr(normzoo, cls)(**kw, **mode, **extra)


def nnx_layer(name: str, features: int, **extra: Any) -> Any:
    """The NNX twin of :func:`linen_layer` with ``features`` channels."""
    cls, kw = LAYERS[name]
    mode = {} if name in STATELESS else {"use_running_average": False}
    return getattr(znnx, cls)(features, rngs=nnx.Rngs(0), **kw, **mode, **extra)


def perturbed_params(params: Any, seed: int = 1) -> Any:
    """``params`` moved off their initial values (scale ones, bias zeros) by a fixed draw,
    so gradients through every param are exercised."""
    rng = np.random.default_rng(seed)
    return jax.tree_util.tree_map(
        lambda p: jnp.asarray(np.asarray(p) + 0.1 * rng.standard_normal(p.shape), p.dtype),
        params)


def data(shape: tuple[int, ...], seed: int = 0, loc: float = 0.5) -> np.ndarray:
    """float32 ``loc + 1.5 N(0, 1)`` of ``shape`` with correlated channels (whitening has
    something to undo)."""
    rng = np.random.default_rng(seed)
    x = loc + 1.5 * rng.standard_normal(shape)
    mix = np.eye(shape[-1]) + 0.3 * rng.standard_normal((shape[-1], shape[-1]))
    return (x @ mix).astype(np.float32)
