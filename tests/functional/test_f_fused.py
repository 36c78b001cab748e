"""The fused op (normzoo.functional.fused): channels-last GroupNorm / InstanceNorm / BatchNorm
statistics and the transposed linearization, against flax.linen and in forward mode."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from f_helpers import x64
from jax.test_util import check_grads

import normzoo.functional as F
from normzoo.functional.operations import normalize_with_statistics

SHAPE = (3, 5, 4, 12)  # NHWC


def _data(seed=0, loc=0.3):
    rng = np.random.default_rng(seed)
    x = jnp.asarray(loc + rng.standard_normal(SHAPE), jnp.float32)
    dy = jnp.asarray(rng.standard_normal(SHAPE), jnp.float32)
    scale = jnp.asarray(rng.uniform(0.5, 1.5, SHAPE[-1]), jnp.float32)
    bias = jnp.asarray(0.1 * rng.standard_normal(SHAPE[-1]), jnp.float32)
    return x, dy, scale, bias


LAYERS = {
    "gn": (lambda x, s, b: F.group_norm(x, s, b, num_groups=4),
           nn.GroupNorm(num_groups=4, use_fast_variance=False)),
    "gn_size1": (lambda x, s, b: F.group_norm(x, s, b, num_groups=12),
                 nn.GroupNorm(num_groups=12, use_fast_variance=False)),
    "in": (lambda x, s, b: F.instance_norm(x, s, b),
           nn.InstanceNorm(use_fast_variance=False)),
    "bn": (lambda x, s, b: F.batch_norm(x, F.init_batch_stats((SHAPE[-1],)), s, b,
                                        epsilon=1e-5)[0],
           nn.BatchNorm(use_running_average=False, use_fast_variance=False)),
    "ln": (lambda x, s, b: F.layer_norm(x, s, b),
           nn.LayerNorm(use_fast_variance=False)),
}


def _flax(module, x, s, b):
    variables = {"params": {"scale": s, "bias": b}}
    if isinstance(module, nn.BatchNorm):
        variables["batch_stats"] = {"mean": jnp.zeros_like(s), "var": jnp.ones_like(s)}
        return module.apply(variables, x, mutable=["batch_stats"])[0]
    return module.apply(variables, x)


@pytest.mark.parametrize("name", sorted(LAYERS))
def test_matches_flax_values_and_gradients(name):
    ours, module = LAYERS[name]
    x, dy, s, b = _data()
    theirs = lambda x, s, b: _flax(module, x, s, b)  # noqa: E731
    np.testing.assert_allclose(ours(x, s, b), theirs(x, s, b), rtol=2e-5, atol=2e-5)
    loss = lambda f: lambda x, s, b: jnp.sum(f(x, s, b) * dy)  # noqa: E731
    g_ours = jax.grad(loss(ours), argnums=(0, 1, 2))(x, s, b)
    g_theirs = jax.grad(loss(theirs), argnums=(0, 1, 2))(x, s, b)
    for a, e in zip(g_ours, g_theirs):
        np.testing.assert_allclose(a, e, rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("name", sorted(LAYERS))
def test_check_grads_forward_and_reverse(name):
    ours, _ = LAYERS[name]
    with x64():
        x, _, s, b = (jnp.asarray(a, jnp.float64) for a in _data(1))
        check_grads(jax.jit(ours), (x, s, b), order=1, modes=("rev", "fwd"), atol=1e-5, rtol=1e-5)


def test_group_norm_large_mean_and_statistics():
    x, _, s, b = _data(2, loc=1e4)
    y = F.group_norm(x, s, b, num_groups=4)
    xhat = np.asarray((y - b) / s, np.float64).reshape(SHAPE[0], -1, 4, 3)
    np.testing.assert_allclose(xhat.std(axis=(1, 3)), 1.0, rtol=2e-2)
    stats = F.statistics(x, (1, 2, 3), num_groups=4)
    x64 = np.asarray(x, np.float64).reshape(SHAPE[:-1] + (4, 3))
    np.testing.assert_allclose(stats["var"], x64.var(axis=(1, 2, 4)), rtol=2e-2)


def test_group_norm_gradient_through_statistics():
    """Cotangents of the returned statistics flow back through the per-channel sums."""
    x, _, s, b = _data(3)

    def fused(x):
        y, stats = normalize_with_statistics(x, (1, 2, 3), num_groups=4, scale=s, bias=b,
                                               feature_axes=(3,))
        return jnp.sum(y) + jnp.sum(stats["mean"] ** 2) + jnp.sum(jnp.sqrt(stats["var"]))

    def general(x):  # the mask path is plain autodiff over the split view
        y, stats = normalize_with_statistics(x, (1, 2, 3), num_groups=4, scale=s, bias=b,
                                               feature_axes=(3,), mask=jnp.ones(SHAPE, bool))
        return jnp.sum(y) + jnp.sum(stats["mean"] ** 2) + jnp.sum(jnp.sqrt(stats["var"]))

    np.testing.assert_allclose(jax.grad(fused)(x), jax.grad(general)(x), rtol=1e-4, atol=1e-5)
