"""normzoo.nnx.activation against its normzoo.linen.activation twins: the same variables
(names, shapes, dtypes, initial values, NNX types), the same outputs given the same variables,
EvoNormB0's running variance and its train / eval / nnx.view modes, and the errors."""

import inspect

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import normzoo.linen.activation as LA
import normzoo.nnx.activation as NA
from normzoo.nnx import linen_to_nnx, nnx_to_linen

C = 4
SHAPE = (3, 2, 2, C)
TOL = dict(rtol=1e-6, atol=1e-6)

CASES = [
    (NA.FilterResponseNorm, {}),
    (NA.FilterResponseNorm, {"learned_epsilon": True, "use_bias": False}),
    (NA.TLU, {}),
    (NA.EvoNormB0, {"momentum": 0.8}),
    (NA.EvoNormS0, {"num_groups": 2}),
    (NA.LocalResponseNorm, {"size": 3}),
    (NA.DyT, {"alpha_init": 0.7}),
]
IDS = [f"{cls.__name__}-{i}" for i, (cls, _) in enumerate(CASES)]


def _x(seed=0, shape=SHAPE):
    return (0.3 + 1.5 * np.random.default_rng(seed).standard_normal(shape)).astype(np.float32)


def _linen(cls, kwargs):
    extra = {"use_running_average": False} if cls is NA.EvoNormB0 else {}
    return cls.linen(**kwargs, **extra)


def _random(variables, seed=1):
    r = np.random.default_rng(seed)
    return jax.tree.map(lambda a: jnp.asarray(0.4 + r.random(np.shape(a)), a.dtype), variables)


@nnx.jit
def _call(model, x):
    return model(x)


def test_twins_cover_every_layer():
    assert set(NA.TWINS) == {LA.FilterResponseNorm, LA.TLU, LA.EvoNormB0, LA.EvoNormS0,
                             LA.LocalResponseNorm, LA.DyT}
    assert all(NA.TWINS[cls].linen is cls for cls in NA.TWINS)


@pytest.mark.parametrize("cls,kwargs", CASES, ids=IDS)
def test_same_variables_as_linen(cls, kwargs):
    x = _x()
    expected = jax.jit(_linen(cls, kwargs).init)(jax.random.key(0), x)
    model = cls(C, **kwargs, rngs=nnx.Rngs(0))
    got = nnx_to_linen(model)
    assert jax.tree.map(lambda a: (a.shape, a.dtype), got) == jax.tree.map(
        lambda a: (a.shape, a.dtype), dict(expected))
    jax.tree.map(np.testing.assert_array_equal, got, dict(expected))
    for name in expected.get("params", {}):
        assert isinstance(getattr(model, name), nnx.Param), name
    for name in expected.get("batch_stats", {}):
        assert isinstance(getattr(model, name), nnx.BatchStat), name
    if kwargs.get("use_bias") is False:
        assert model.bias is None


@pytest.mark.parametrize("cls,kwargs", CASES, ids=IDS)
def test_same_output_as_linen_given_the_same_variables(cls, kwargs):
    x = _x()
    layer = _linen(cls, kwargs)
    variables = _random(jax.eval_shape(layer.init, jax.random.key(0), x))
    model = linen_to_nnx(variables, cls(C, **kwargs, rngs=nnx.Rngs(0)))
    y_ref, updates = jax.jit(lambda v, x: layer.apply(v, x, mutable=["batch_stats"]))(variables, x)
    np.testing.assert_allclose(_call(model, x), y_ref, **TOL)
    if "batch_stats" in variables:  # training mode: the same updated running variance
        np.testing.assert_allclose(model.var[...], updates["batch_stats"]["var"], **TOL)


def test_evonorm_b0_train_eval_and_view():
    x, x2 = _x(), _x(seed=2)
    model = NA.EvoNormB0(C, momentum=0.5, rngs=nnx.Rngs(0))
    assert model.use_running_average is False
    layer = LA.EvoNormB0(momentum=0.5)
    variables = {"params": nnx_to_linen(model)["params"], "batch_stats": {"var": jnp.ones(C)}}
    apply = jax.jit(layer.apply, static_argnames=("use_running_average", "mutable"))

    _call(model, x)  # training: the running variance moves
    _, upd = apply(variables, x, use_running_average=False, mutable=("batch_stats",))
    np.testing.assert_allclose(model.var[...], upd["batch_stats"]["var"], **TOL)
    variables = {**variables, **upd}
    model.eval()
    assert model.use_running_average is True
    before = np.asarray(model.var[...])
    np.testing.assert_allclose(_call(model, x2), apply(variables, x2, use_running_average=True),
                               **TOL)
    np.testing.assert_array_equal(model.var[...], before)  # inference leaves it
    model.train()
    assert model.use_running_average is False
    view = nnx.view(model, use_running_average=True)
    assert view.use_running_average is True and model.use_running_average is False
    np.testing.assert_allclose(_call(view, x2), apply(variables, x2, use_running_average=True),
                               **TOL)
    # the call argument overrides the attribute; None everywhere is an error
    evaluate = nnx.jit(lambda m, x: m(x, use_running_average=True))
    np.testing.assert_allclose(evaluate(model, x2),
                               apply(variables, x2, use_running_average=True), **TOL)
    model.use_running_average = None
    with pytest.raises(ValueError, match="No use_running_average was given to EvoNormB0"):
        model(x2)


def test_constructor_signature_and_errors():
    params = list(inspect.signature(NA.EvoNormB0).parameters)
    assert params[0] == "num_features" and "rngs" in params and "use_running_average" in params
    lrn = inspect.signature(NA.LocalResponseNorm).parameters["size"]
    assert lrn.default is inspect.Parameter.empty and lrn.kind is inspect.Parameter.KEYWORD_ONLY
    rngs = nnx.Rngs(0)
    with pytest.raises(ValueError, match=r"num_features=0 must be a positive int"):
        NA.DyT(0, rngs=rngs)
    with pytest.raises(TypeError, match=r"unexpected keyword argument\(s\) \['alpha'\]"):
        NA.DyT(C, alpha=0.5, rngs=rngs)
    with pytest.raises(TypeError, match=r"missing required keyword argument\(s\) \['size'\]"):
        NA.LocalResponseNorm(C, rngs=rngs)
    with pytest.raises(ValueError, match=r"num_groups=3 must be a positive divisor of the 4"):
        NA.EvoNormS0(C, num_groups=3, rngs=rngs)
    with pytest.raises(ValueError, match=r"num_features=4, but the input of shape \(2, 6\) has 6"):
        NA.FilterResponseNorm(C, rngs=rngs)(jnp.ones((2, 6)))
