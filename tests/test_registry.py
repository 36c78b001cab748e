"""normzoo.registry: names map to working layers; stateful ones keep batch_stats."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import normzoo
from normzoo import registry

X = jax.random.normal(jax.random.key(0), (8, 12)) * 3 + 2


def _make(name, **kw):
    extra = {"num_groups": 4} if name == "gn" else {}
    return registry.make(name, **extra, **kw)


def test_core_names_registered():
    assert {"none", "bn", "ln", "gn", "in", "rms", "center", "scale"} <= set(registry.names())


@pytest.mark.parametrize("name", ["none", "bn", "ln", "gn", "in", "rms", "center", "scale"])
def test_every_name_builds_and_runs(name):
    layer = _make(name, use_running_average=False)
    variables = layer.init(jax.random.key(1), X)
    y, updates = layer.apply(variables, X, mutable=["batch_stats"])
    assert y.shape == X.shape and bool(jnp.all(jnp.isfinite(y)))
    assert ("batch_stats" in variables) == registry.is_stateful(name)
    if registry.is_stateful(name):
        # training mode moved the running statistics away from their initial values
        before, after = variables["batch_stats"], updates["batch_stats"]
        assert any(not np.allclose(before[k], after[k]) for k in before)


def test_none_is_identity():
    layer = registry.make("none")
    np.testing.assert_array_equal(layer.apply({}, X), X)


def test_use_running_average_reaches_stateful_layers_only():
    bn = registry.make("bn", use_running_average=True, momentum=0.9)
    assert isinstance(bn, normzoo.BatchNorm) and bn.use_running_average and bn.momentum == 0.9
    ln = registry.make("ln", use_running_average=True)
    assert isinstance(ln, normzoo.LayerNorm)


def test_bn_equals_batch_norm_layer():
    a, b = registry.make("bn", use_running_average=False), normzoo.BatchNorm(use_running_average=False)
    v = b.init(jax.random.key(0), X)
    np.testing.assert_allclose(
        a.apply(v, X, mutable=["batch_stats"])[0], b.apply(v, X, mutable=["batch_stats"])[0]
    )


def test_unknown_name_error_names_it():
    with pytest.raises(ValueError, match=r"name='batchnorm'"):
        registry.make("batchnorm")
