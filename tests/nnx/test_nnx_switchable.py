"""The NNX twins of SwitchableNorm (normzoo.nnx) and of the per-sample whitening
presets (GroupWhitening, InstanceWhitening in normzoo.nnx.layers) against their linen twins:
the same variables (names, shapes, dtypes, initial values, NNX variable types), and with the
linen variables copied in, the same outputs, running statistics, inference outputs, masked
outputs and gradients; modes (train / eval / nnx.view), bfloat16 and the errors.
"""

import inspect

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from normzoo.linen import switchable as linen_sn
from normzoo.linen import whitening as linen_whitening
from normzoo.nnx import linen_to_nnx, nnx_to_linen
from normzoo.nnx.layers import GroupWhitening, InstanceWhitening
from normzoo.nnx import TWINS, SwitchableNorm

TOL = dict(rtol=1e-6, atol=1e-6)
SHAPE = (4, 2, 3, 4)  # (N, H, W, C)
KEY = jax.random.key(0)


def _x(seed=0, shape=SHAPE, loc=0.5, scale=1.5):
    r = np.random.default_rng(seed)
    return (loc + scale * r.standard_normal(shape)).astype(np.float32)


def _perturbed(variables, seed=1):
    r = np.random.default_rng(seed)
    out = dict(variables)
    out["params"] = jax.tree.map(
        lambda v: (np.asarray(v) + 0.4 * r.standard_normal(np.shape(v))).astype(v.dtype),
        variables["params"])
    return out


def _tree_close(a, b, **tol):
    chex.assert_trees_all_equal_structs(a, b)
    chex.assert_trees_all_equal_shapes_and_dtypes(a, b)
    chex.assert_trees_all_close(a, b, **(tol or TOL))


def _init(layer, x, **kwargs):
    """``layer.init`` compiled as one program (eager, each small op compiles on its own)."""
    return jax.jit(lambda x: layer.init(KEY, x, **kwargs))(x)


@nnx.jit(static_argnames=("use_running_average",))
def _call(model, x, mask=None, use_running_average=None):
    return model(x, use_running_average=use_running_average, mask=mask)


# ---------------------------------------------------------------- SwitchableNorm
def test_twins_table_and_signature():
    assert TWINS[linen_sn.SwitchableNorm] is SwitchableNorm
    params = list(inspect.signature(SwitchableNorm).parameters)
    assert params[0] == "num_features" and "rngs" in params and "momentum" in params
    assert "mean_weight_init" in params and "axis_name" in params


def test_variables_equal_linen_init():
    model = SwitchableNorm(4, momentum=0.8, rngs=nnx.Rngs(0))
    ref = _init(linen_sn.SwitchableNorm(momentum=0.8), _x(), use_running_average=False)
    _tree_close(nnx_to_linen(model), dict(ref))
    for name in ("scale", "bias", "mean_weight", "var_weight"):
        assert isinstance(getattr(model, name), nnx.Param), name
    for name in ("mean", "var"):
        assert isinstance(getattr(model, name), nnx.BatchStat), name
        assert getattr(model, name)[...].dtype == jnp.float32
    assert model.mean_weight.shape == (3,) and model.scale.shape == (4,)
    assert model.use_running_average is False  # flax.nnx.BatchNorm's default: training
    bare = SwitchableNorm(4, use_scale=False, use_bias=False, rngs=nnx.Rngs(0))
    assert bare.scale is None and bare.bias is None
    # several feature axes: per-feature variables stored flat as flax.nnx, the weights (3,)
    several = SwitchableNorm(8, axis=(-2, -1), rngs=nnx.Rngs(0))
    shapes = jax.tree.map(np.shape, nnx.to_pure_dict(nnx.state(several)))
    assert shapes == {"scale": (8,), "bias": (8,), "mean": (8,), "var": (8,),
                      "mean_weight": (3,), "var_weight": (3,)}
    linen_shapes = jax.eval_shape(lambda: linen_sn.SwitchableNorm(axis=(-2, -1)).init(
        KEY, jnp.zeros((5, 3, 2, 4)), use_running_average=False))
    assert linen_shapes["params"]["scale"].shape == linen_shapes["batch_stats"]["var"].shape
    assert linen_shapes["params"]["scale"].shape == (2, 4)


def test_train_eval_mask_and_grads_equal_linen():
    layer = linen_sn.SwitchableNorm(momentum=0.5)
    x = _x()
    model = SwitchableNorm(4, momentum=0.5, rngs=nnx.Rngs(0))
    variables = _perturbed(nnx_to_linen(model))  # == the linen init (test above)
    linen_to_nnx(variables, model)
    chex.assert_trees_all_equal(nnx_to_linen(model), dict(variables))
    mask = np.ones(SHAPE[:-1] + (1,), bool)
    mask[1, 0] = False
    c = _x(9, loc=0.0, scale=1.0)

    @jax.jit
    def linen_steps(variables, x, x2, mask):
        y1, upd = layer.apply(variables, x, use_running_average=False, mutable=["batch_stats"])
        v1 = {**variables, **upd}
        y2, upd = layer.apply(v1, x2, use_running_average=False, mutable=["batch_stats"],
                              mask=mask)
        v2 = {**variables, **upd}
        y_eval = layer.apply(v2, x, use_running_average=True)

        def loss(params):
            y, _ = layer.apply({**v2, "params": params}, x, use_running_average=False,
                               mutable=["batch_stats"])
            return jnp.sum(c * y) + 0.1 * jnp.sum(y**2)

        return y1, y2, v2, y_eval, jax.grad(loss)(v2["params"])

    @nnx.jit
    def nnx_steps(model, x, x2, mask):
        return (model(x, use_running_average=False),
                model(x2, use_running_average=False, mask=mask),
                model(x, use_running_average=True))

    x2 = _x(2, loc=-1.0)
    y1, y2, v2, y_eval, g_ref = linen_steps(variables, x, x2, mask)
    z1, z2, z_eval = nnx_steps(model, x, x2, mask)
    np.testing.assert_allclose(z1, y1, **TOL)
    np.testing.assert_allclose(z2, y2, **TOL)
    np.testing.assert_allclose(z_eval, y_eval, **TOL)
    _tree_close(nnx_to_linen(model), dict(v2))
    before = nnx_to_linen(model)
    model.eval()
    assert model.use_running_average is True
    np.testing.assert_allclose(_call(model, x), y_eval, **TOL)
    chex.assert_trees_all_equal(nnx_to_linen(model), before)  # inference updates nothing
    training = nnx.view(model, use_running_average=False)
    assert training.use_running_average is False and model.use_running_average is True
    model.train()

    @nnx.jit
    def nnx_grads(model):
        def loss(m):
            y = m(x)
            return jnp.sum(c * y) + 0.1 * jnp.sum(y**2)

        return nnx.grad(loss, argnums=nnx.DiffState(0, nnx.Param))(model)

    grads = nnx_grads(model)
    for name, value in g_ref.items():
        np.testing.assert_allclose(grads[name][...], value, rtol=1e-5, atol=1e-5, err_msg=name)
    assert np.abs(grads["mean_weight"][...]).max() > 1e-3


def test_bfloat16_input_float32_statistics():
    model = SwitchableNorm(4, rngs=nnx.Rngs(0))
    layer = linen_sn.SwitchableNorm()
    x = jnp.asarray(_x(3), jnp.bfloat16)
    variables = nnx_to_linen(model)
    y_ref, upd = jax.jit(lambda v, x: layer.apply(v, x, use_running_average=False,
                                                  mutable=["batch_stats"]))(variables, x)
    y = _call(model, x)
    assert y.dtype == y_ref.dtype
    np.testing.assert_allclose(np.asarray(y, np.float32), np.asarray(y_ref, np.float32),
                               rtol=2e-2, atol=2e-2)
    assert model.var[...].dtype == model.mean[...].dtype == jnp.float32
    _tree_close(nnx_to_linen(model)["batch_stats"], upd["batch_stats"], rtol=1e-5, atol=1e-5)


def test_errors():
    with pytest.raises(TypeError, match="momentun"):
        SwitchableNorm(4, momentun=0.9, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="epsilon"):
        SwitchableNorm(4, epsilon=-1e-3, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="momentum"):
        SwitchableNorm(4, momentum=1.5, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="num_features"):
        SwitchableNorm(0, rngs=nnx.Rngs(0))
    model = SwitchableNorm(4, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="num_features"):
        model(_x(shape=(2, 3, 8)))
    with pytest.raises(ValueError, match="use_running_average"):
        SwitchableNorm(4, use_running_average=None, rngs=nnx.Rngs(0))(_x())


# ---------------------------------------------------------------- per-sample whitening
@pytest.mark.parametrize("nnx_cls, linen_cls, kwargs", [
    (GroupWhitening, linen_whitening.GroupWhitening, {"num_groups": 2}),
    (InstanceWhitening, linen_whitening.InstanceWhitening, {"group_size": 2,
                                                            "method": "cholesky"}),
], ids=["GroupWhitening", "InstanceWhitening"])
def test_whitening_twins_equal_linen(nnx_cls, linen_cls, kwargs):
    """Variables as the linen init (ones, zeros); outputs as linen's with the same variables.
    (Masks: tests/linen/test_linen_switchable.py.)"""
    shape = (2, 4, 3, 4)
    x = _x(4, shape)
    layer = linen_cls(**kwargs)
    ref = jax.eval_shape(lambda: layer.init(KEY, x))
    model = nnx_cls(4, rngs=nnx.Rngs(0), **kwargs)
    fresh = nnx_to_linen(model)
    chex.assert_trees_all_equal_shapes_and_dtypes(fresh, dict(ref))
    np.testing.assert_array_equal(fresh["params"]["scale"], np.ones(4))
    np.testing.assert_array_equal(fresh["params"]["bias"], np.zeros(4))
    assert isinstance(model.scale, nnx.Param) and isinstance(model.bias, nnx.Param)
    variables = _perturbed(fresh)
    linen_to_nnx(variables, model)
    y_ref = jax.jit(layer.apply)(variables, x)
    y = nnx.jit(lambda m, x: m(x))(model, x)
    np.testing.assert_allclose(y, y_ref, rtol=1e-5, atol=1e-5)
    with pytest.raises(TypeError, match="num_group"):
        nnx_cls(4, num_group=2, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="epsilon"):
        nnx_cls(4, epsilon=-1.0, rngs=nnx.Rngs(0), **kwargs)
