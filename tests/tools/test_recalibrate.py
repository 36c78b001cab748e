"""Precise BN (normzoo.tools.recalibrate): the running statistics become the equal-weight
average of each batch's statistics, computed by hand here, with the weights unchanged."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import normzoo
import normzoo.nnx as znnx
from normzoo.tools import recalibrate_linen, recalibrate_nnx

TOL = dict(rtol=1e-5, atol=1e-6)
EPS = 1e-5


def _batches(n=3, size=8, seed=0):
    rng = np.random.default_rng(seed)
    return [jnp.asarray(rng.normal(1.0, 2.0, (size, 3)), jnp.float32) for _ in range(n)]


def _population(batches, w1, b1, g1, c1, w2, b2, combined=False):
    """Per-batch statistics of dense -> BN (batch stats) -> relu -> dense, averaged by hand;
    ``combined``: the variance of all batches' activations together instead."""
    first, second = [], []
    for x in batches:
        h = np.asarray(x, np.float64) @ w1 + b1
        m, v = h.mean(0), h.var(0)
        z = np.maximum((h - m) / np.sqrt(v + EPS) * g1 + c1, 0) @ w2 + b2
        first.append(h)
        second.append(z)
    if combined:
        return [(np.concatenate(a).mean(0), np.concatenate(a).var(0)) for a in (first, second)]
    return [(np.mean([a.mean(0) for a in acts], 0), np.mean([a.var(0) for a in acts], 0))
            for acts in (first, second)]


class LinenMLP(nn.Module):
    @nn.compact
    def __call__(self, x, train: bool):
        x = nn.Dense(4, name="dense1")(x)
        x = normzoo.BatchNorm(use_running_average=not train, momentum=0.9, name="bn1")(x)
        x = nn.Dense(5, name="dense2")(nn.relu(x))
        x = nn.BatchNorm(use_running_average=not train, momentum=0.9, name="bn2")(x)
        x = normzoo.Standardization(area="batch", estimator="cumulative",
                                    use_running_average=not train, name="cum")(x)
        return x


def _np(tree):
    return jax.tree.map(lambda v: np.asarray(v, np.float64), tree)


def test_recalibrate_linen_mlp():
    batches = _batches()
    model = LinenMLP()
    variables = model.init(jax.random.key(0), batches[0], train=False)
    # trained-looking statistics, which recalibration must replace entirely
    variables["batch_stats"] = jax.tree.map(lambda v: v + 3, variables["batch_stats"])
    new = recalibrate_linen(model.apply, variables, iter(batches), train=True)
    p = _np(variables["params"])
    (m1, v1), (m2, v2) = _population(
        batches, p["dense1"]["kernel"], p["dense1"]["bias"], p["bn1"]["scale"],
        p["bn1"]["bias"], p["dense2"]["kernel"], p["dense2"]["bias"])
    s = new["batch_stats"]
    np.testing.assert_allclose(s["bn1"]["mean"], m1, **TOL)
    np.testing.assert_allclose(s["bn1"]["var"], v1, **TOL)
    np.testing.assert_allclose(s["bn2"]["mean"], m2, **TOL)
    np.testing.assert_allclose(s["bn2"]["var"], v2, **TOL)
    assert int(s["cum"]["count"]) == len(batches)
    assert s["bn1"]["mean"].dtype == jnp.float32
    assert new["params"] is variables["params"]  # the weights are not touched
    combined = recalibrate_linen(model.apply, variables, batches, train=True,
                                 variance="combined")["batch_stats"]
    (m1, v1), (m2, v2) = _population(
        batches, p["dense1"]["kernel"], p["dense1"]["bias"], p["bn1"]["scale"],
        p["bn1"]["bias"], p["dense2"]["kernel"], p["dense2"]["bias"], combined=True)
    np.testing.assert_allclose(combined["bn1"]["mean"], m1, **TOL)
    np.testing.assert_allclose(combined["bn1"]["var"], v1, **TOL)
    np.testing.assert_allclose(combined["bn2"]["var"], v2, **TOL)
    assert not np.allclose(v2, s["bn2"]["var"], rtol=1e-3)  # the two estimates differ
    with pytest.raises(ValueError, match="variance='pooled'"):
        recalibrate_linen(model.apply, variables, batches, train=True, variance="pooled")
    with pytest.raises(ValueError, match=r"\['bn1', 'bn2', 'cum'\].*use_running_average"):
        recalibrate_linen(model.apply, variables, batches, train=False)
    with pytest.raises(ValueError, match="batches is empty"):
        recalibrate_linen(model.apply, variables, [], train=True)


def test_recalibrate_linen_whitening_and_tuple_batches():
    batches = _batches(n=2, size=16, seed=1)
    layer = normzoo.ZCAWhitening(use_running_average=False, momentum=0.5)
    variables = layer.init(jax.random.key(0), batches[0])
    labels = jnp.zeros((16,))
    new = recalibrate_linen(layer.apply, variables, [(x, labels) for x in batches])
    xs = [np.asarray(x, np.float64) for x in batches]
    mean = np.mean([x.mean(0) for x in xs], 0)
    cov = np.mean([np.cov(x, rowvar=False, bias=True) for x in xs], 0)
    stats = new["batch_stats"]
    np.testing.assert_allclose(stats["mean"], mean, **TOL)
    np.testing.assert_allclose(np.reshape(stats["covariance"], cov.shape), cov, **TOL)


class NNXMLP(nnx.Module):
    def __init__(self, rngs):
        self.dense1 = nnx.Linear(3, 4, rngs=rngs)
        self.bn1 = nnx.BatchNorm(4, momentum=0.9, rngs=rngs)
        self.dense2 = nnx.Linear(4, 5, rngs=rngs)
        self.bn2 = znnx.BatchNorm(5, momentum=0.9, rngs=rngs)
        self.center = znnx.Centering(5, rngs=rngs)
        self.cum = znnx.Standardization(5, area="batch", estimator="cumulative", rngs=rngs)
        self.unused = znnx.BatchNorm(5, rngs=rngs)

    def __call__(self, x):
        x = self.bn2(self.dense2(nnx.relu(self.bn1(self.dense1(x)))))
        return self.cum(self.center(x))


def test_recalibrate_nnx_mlp():
    batches = _batches()
    model = NNXMLP(nnx.Rngs(0))
    model.eval()
    for bn in (model.bn1, model.bn2, model.center):
        bn.mean[...] += 3.0
    with pytest.raises(ValueError, match=r"\['unused'\]"):
        recalibrate_nnx(model, batches, jit=False)
    assert model.bn1.use_running_average and model.bn1.momentum == 0.9  # restored on error
    del model.unused
    params = jax.tree.map(np.asarray, nnx.state(model, nnx.Param))
    out = recalibrate_nnx(model, batches)
    assert out is model
    (m1, v1), (m2, v2) = _population(
        batches, np.asarray(model.dense1.kernel[...], np.float64), model.dense1.bias[...],
        model.bn1.scale[...], model.bn1.bias[...], model.dense2.kernel[...],
        model.dense2.bias[...])
    np.testing.assert_allclose(model.bn1.mean[...], m1, **TOL)
    np.testing.assert_allclose(model.bn1.var[...], v1, **TOL)
    np.testing.assert_allclose(model.bn2.mean[...], m2, **TOL)
    np.testing.assert_allclose(model.bn2.var[...], v2, **TOL)
    # Centering sees bn2's output, normalized with each batch's own statistics: mean ~ bias
    np.testing.assert_allclose(model.center.mean[...], model.bn2.bias[...], atol=1e-5)
    assert int(model.cum.count[...]) == len(batches)
    # modes, momenta and weights as they were
    assert model.bn1.use_running_average and model.bn2.use_running_average
    assert model.bn1.momentum == 0.9 and "normalizer" not in vars(model.bn2)
    jax.tree.map(np.testing.assert_array_equal, nnx.state(model, nnx.Param), params)
    with pytest.raises(ValueError, match="batches is empty"):
        recalibrate_nnx(model, [])


def test_recalibrate_nnx_refuses_layers_outside_the_estimators():
    model = nnx.Sequential(nnx.Linear(3, 4, rngs=nnx.Rngs(0)),
                           znnx.SwitchableNorm(4, rngs=nnx.Rngs(0)))
    with pytest.raises(ValueError, match="SwitchableNorm.*cannot be recalibrated"):
        recalibrate_nnx(model, [np.ones((4, 2, 3), np.float32)])
