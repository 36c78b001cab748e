"""BatchNorm folding (normzoo.tools.fold): the folded Dense / Conv computes the eval-mode
BatchNorm of the original one, in Linen and NNX, for flax's and normzoo's layers."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import normzoo
import normzoo.nnx as znnx
from normzoo.tools import fold_batch_norm_linen, fold_batch_norm_nnx

TOL = dict(rtol=2e-5, atol=2e-5)


class Net(nn.Module):
    conv: bool
    norm: type
    use_bias: bool = True
    norm_kwargs: tuple = ()
    fold: bool = False

    @nn.compact
    def __call__(self, x):
        bias = self.use_bias or self.fold
        if self.conv:
            x = nn.Conv(6, (3, 3), use_bias=bias, name="layer")(x)
        else:
            x = nn.Dense(6, use_bias=bias, name="layer")(x)
        if not self.fold:
            x = self.norm(use_running_average=True, name="bn", **dict(self.norm_kwargs))(x)
        return nn.Dense(3, name="head")(x)


def _randomize(tree, seed):
    """Every leaf of a batch-norm subtree replaced by random values (var > 0)."""
    rng = np.random.default_rng(seed)
    def leaf(path, value):
        name = path[-1].key
        if name in ("var", "mean_square"):
            return jnp.asarray(rng.uniform(0.3, 2.0, value.shape), value.dtype)
        return jnp.asarray(rng.normal(size=value.shape), value.dtype)
    return jax.tree_util.tree_map_with_path(leaf, tree)


LINEN_CASES = {
    "dense-flax_bn": (False, nn.BatchNorm, True, ()),
    "dense-normzoo_bn": (False, normzoo.BatchNorm, True, ()),
    "conv-flax_bn": (True, nn.BatchNorm, True, ()),
    "conv_nobias-normzoo_bn": (True, normzoo.BatchNorm, False, ()),
    "dense_nobias-bn_noscale": (False, normzoo.BatchNorm, False, (("use_scale", False),)),
    "dense-bn_noaffine": (False, nn.BatchNorm, True, (("use_scale", False), ("use_bias", False))),
    "dense-centering": (False, normzoo.Centering, True, ()),
    "dense-cumulative": (False, normzoo.Standardization, True, (("estimator", "cumulative"),)),
    "conv-batch_renorm": (True, normzoo.BatchRenorm, True, ()),
}


@pytest.mark.parametrize("case", LINEN_CASES, ids=list(LINEN_CASES))
def test_linen_fold_equals_eval(case):
    conv, norm, use_bias, kwargs = LINEN_CASES[case]
    x = jax.random.normal(jax.random.key(0), (2, 5, 5, 3) if conv else (4, 3))
    model = Net(conv, norm, use_bias, kwargs)
    variables = model.init(jax.random.key(1), x)
    variables = {"params": {**variables["params"],
                            **_randomize({"bn": variables["params"].get("bn", {})}, 2)},
                 "batch_stats": _randomize(variables["batch_stats"], 3)}
    if not variables["params"]["bn"]:
        del variables["params"]["bn"]
    folded = fold_batch_norm_linen(variables, {("layer",): ("bn",)}, epsilon=1e-5)
    assert "bn" not in folded["params"] and "batch_stats" not in folded
    assert "bias" in folded["params"]["layer"]
    assert "bn" in variables["batch_stats"]  # the input is not changed
    y = model.apply(variables, x)
    y_folded = Net(conv, norm, use_bias, kwargs, fold=True).apply(folded, x)
    np.testing.assert_allclose(y_folded, y, **TOL)


def test_linen_fold_errors():
    x = jnp.ones((2, 3))
    model = Net(False, nn.BatchNorm)
    variables = model.init(jax.random.key(0), x)
    with pytest.raises(ValueError, match=r"head <- bn.*6 channels.*3 output"):
        fold_batch_norm_linen(variables, {("head",): ("bn",)})
    with pytest.raises(KeyError, match="batch_stats/nope"):
        fold_batch_norm_linen(variables, {("layer",): ("nope",)})
    no_kernel = {**variables, "params": {**variables["params"], "foo": {"w": jnp.ones(6)}}}
    with pytest.raises(KeyError, match="no 'kernel'"):
        fold_batch_norm_linen(no_kernel, {("foo",): ("bn",)})
    with pytest.raises(TypeError, match="tuple of submodule names"):
        fold_batch_norm_linen(variables, [(("layer",), 3)])
    with pytest.raises(ValueError, match="epsilon"):
        fold_batch_norm_linen(variables, {"layer": "bn"}, epsilon=-1.0)
    # a whitening layer's statistics (normzoo.ZCAWhitening's keys) mix channels
    tree = {"params": {"layer": variables["params"]["layer"]},
            "batch_stats": {"bn": {"mean": jnp.zeros(6), "covariance": jnp.ones((1, 6, 6))}}}
    with pytest.raises(ValueError, match="whitening"):
        fold_batch_norm_linen(tree, {"layer": "bn"})


def _nnx_pair(kind, norm, layer_bias=True, **norm_kwargs):
    rngs = nnx.Rngs(0)
    if kind == "conv":
        layer = nnx.Conv(3, 6, (3, 3), use_bias=layer_bias, rngs=rngs)
    else:
        layer = nnx.Linear(3, 6, use_bias=layer_bias, rngs=rngs)
    bn = norm(6, rngs=rngs, **norm_kwargs)
    rng = np.random.default_rng(4)
    for name in ("mean", "var", "scale", "bias"):
        variable = getattr(bn, name, None)
        if isinstance(variable, nnx.Variable):
            low = 0.3 if name == "var" else -1.0
            variable[...] = jnp.asarray(rng.uniform(low, 2.0, variable.shape), jnp.float32)
    return layer, bn


NNX_CASES = {
    "linear-flax_bn": ("linear", nnx.BatchNorm, True, {}),
    "linear-normzoo_bn": ("linear", znnx.BatchNorm, True, {"epsilon": 1e-3}),
    "conv-flax_bn": ("conv", nnx.BatchNorm, True, {"use_scale": False}),
    "conv_nobias-normzoo_bn": ("conv", znnx.BatchNorm, False, {"use_bias": False}),
    "linear-batch_renorm": ("linear", znnx.BatchRenorm, True, {}),
}


@pytest.mark.parametrize("case", NNX_CASES, ids=list(NNX_CASES))
def test_nnx_fold_equals_eval(case):
    kind, norm, use_bias, kwargs = NNX_CASES[case]
    layer, bn = _nnx_pair(kind, norm, use_bias, **kwargs)
    x = jax.random.normal(jax.random.key(0), (2, 5, 5, 3) if kind == "conv" else (4, 3))
    kernel = layer.kernel[...]
    y = bn(layer(x), use_running_average=True)
    folded = fold_batch_norm_nnx(layer, bn)
    assert type(folded) is type(layer) and folded is not layer
    np.testing.assert_array_equal(layer.kernel[...], kernel)  # the original is unchanged
    np.testing.assert_allclose(folded(x), y, **TOL)
    assert folded.use_bias


def test_nnx_fold_in_place_and_training_mode():
    layer, bn = _nnx_pair("linear", znnx.BatchNorm)
    bn.use_running_average = False  # training mode: the running statistics are folded
    x = jax.random.normal(jax.random.key(0), (4, 3))
    y = bn(layer(x), use_running_average=True)
    out = fold_batch_norm_nnx(layer, bn, inplace=True)
    assert out is layer
    np.testing.assert_allclose(layer(x), y, **TOL)


def test_nnx_fold_errors():
    layer, bn = _nnx_pair("linear", nnx.BatchNorm)
    with pytest.raises(ValueError, match=r"6 channels.*4 output"):
        fold_batch_norm_nnx(nnx.Linear(3, 4, rngs=nnx.Rngs(0)), bn)
    with pytest.raises(TypeError, match="nnx.Linear or nnx.Conv"):
        fold_batch_norm_nnx(bn, bn)
    with pytest.raises(TypeError, match="running"):
        fold_batch_norm_nnx(layer, znnx.LayerNorm(6, rngs=nnx.Rngs(0)))
    with pytest.raises(ValueError, match="axis"):
        fold_batch_norm_nnx(layer, nnx.BatchNorm(6, axis=0, rngs=nnx.Rngs(0)))
