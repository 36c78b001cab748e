"""normzoo.linen.activation: the variables each layer declares, the same numbers as the
functional core (normzoo.functional.activation, itself checked against the papers in
tests/functional/test_f_activation.py), EvoNormB0's running variance and modes, dtypes."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import normzoo.functional.activation as FA
import normzoo.linen.activation as LA

C = 4
SHAPE = (3, 2, 2, C)
TOL = dict(rtol=1e-6, atol=1e-6)


def _x(seed=0, shape=SHAPE):
    return (0.3 + 1.5 * np.random.default_rng(seed).standard_normal(shape)).astype(np.float32)


def _init(layer, x):
    return jax.jit(layer.init)(jax.random.key(0), x)


def _leaves(variables):
    flat = jax.tree_util.tree_flatten_with_path(variables)[0]
    return {"/".join(k.key for k in path): leaf for path, leaf in flat}


# ------------------------------------------------------------------ variables
ONES, ZEROS = np.ones(C), np.zeros(C)
VARIABLE_CASES = [
    (LA.FilterResponseNorm(), {"params/scale": ONES, "params/bias": ZEROS, "params/tau": ZEROS}),
    (LA.FilterResponseNorm(use_tlu=False, use_bias=False, learned_epsilon=True),
     {"params/scale": ONES, "params/eps": np.float32(1e-4)}),
    (LA.TLU(tau_init=nn.initializers.constant(-1.0)), {"params/tau": -ONES}),
    (LA.EvoNormB0(use_running_average=False),
     {"params/scale": ONES, "params/bias": ZEROS, "params/v": ONES, "batch_stats/var": ONES}),
    (LA.EvoNormS0(num_groups=2, use_scale=False),
     {"params/bias": ZEROS, "params/v": ONES}),
    (LA.LocalResponseNorm(5), {}),
    (LA.DyT(alpha_init=0.8), {"params/alpha": np.float32(0.8), "params/scale": ONES,
                              "params/bias": ZEROS}),
]


@pytest.mark.parametrize("layer,expected", VARIABLE_CASES,
                         ids=[f"{type(c[0]).__name__}-{i}" for i, c in enumerate(VARIABLE_CASES)])
def test_declared_variables(layer, expected):
    got = _leaves(_init(layer, _x()))
    assert set(got) == set(expected)
    for key, value in expected.items():
        assert got[key].shape == np.shape(value) and got[key].dtype == jnp.float32, key
        np.testing.assert_allclose(got[key], value, rtol=1e-7)


def test_param_dtype_and_float32_running_variance():
    got = _leaves(_init(LA.EvoNormB0(use_running_average=False, param_dtype=jnp.bfloat16), _x()))
    assert {k: v.dtype for k, v in got.items()} == {
        "params/scale": jnp.bfloat16, "params/bias": jnp.bfloat16, "params/v": jnp.bfloat16,
        "batch_stats/var": jnp.float32}
    got = _leaves(_init(LA.FilterResponseNorm(feature_axes=(2, 3)), _x()))
    assert got["params/tau"].shape == (2, C)


# ------------------------------------------------------------------ against the functional core
def _random(variables, seed=1):
    r = np.random.default_rng(seed)
    return jax.tree.map(lambda a: jnp.asarray(0.4 + r.random(np.shape(a)), a.dtype), variables)


def _functional(layer, v, x):
    p = v.get("params", {})
    g, b = p.get("scale"), p.get("bias")
    if isinstance(layer, LA.FilterResponseNorm):
        return FA.filter_response_norm(x, g, b, p.get("tau"), epsilon=layer.epsilon,
                                       learned_epsilon=p.get("eps"))
    if isinstance(layer, LA.TLU):
        return FA.tlu(x, p["tau"])
    if isinstance(layer, LA.EvoNormB0):
        return FA.evonorm_b0(x, v["batch_stats"], g, b, p["v"], train=False)[0]
    if isinstance(layer, LA.EvoNormS0):
        return FA.evonorm_s0(x, g, b, p["v"], num_groups=layer.num_groups)
    if isinstance(layer, LA.LocalResponseNorm):
        return FA.local_response_norm(x, size=layer.size)
    return FA.dyt(x, p["alpha"], g, b)


@pytest.mark.parametrize("layer,expected", VARIABLE_CASES,
                         ids=[f"{type(c[0]).__name__}-{i}" for i, c in enumerate(VARIABLE_CASES)])
def test_linen_equals_functional_and_dtype_rule(layer, expected):
    x = _x()
    if isinstance(layer, LA.EvoNormB0):
        layer = layer.clone(use_running_average=True)
    variables = _random(jax.eval_shape(layer.init, jax.random.key(0), x))
    forced = layer.clone(dtype=jnp.bfloat16)

    @jax.jit
    def run(v, x):
        x16 = x.astype(jnp.bfloat16)
        return layer.apply(v, x), _functional(layer, v, x), layer.apply(v, x16), forced.apply(v, x)

    y, y_ref, y_from16, y16 = run(variables, x)
    np.testing.assert_allclose(y, y_ref, **TOL)
    assert y.dtype == jnp.float32
    # flax's rule: bfloat16 input and float32 params promote; ``dtype`` forces the output
    assert y_from16.dtype == (jnp.float32 if expected else jnp.bfloat16)
    np.testing.assert_allclose(y_from16, y_ref, rtol=3e-2, atol=3e-2)
    assert y16.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(y16, np.float32), y_ref, rtol=1e-2, atol=1e-2)


# ------------------------------------------------------------------ EvoNormB0's running variance
def test_evonorm_b0_training_updates_var_and_inference_uses_it():
    x = _x()
    layer = LA.EvoNormB0(momentum=0.8)
    variables = _random(jax.jit(lambda x: layer.init(jax.random.key(0), x,
                                                     use_running_average=False))(x))
    p = variables["params"]

    @jax.jit
    def run(variables, x):
        y, upd = layer.apply(variables, x, use_running_average=False, mutable=["batch_stats"])
        y_eval, upd_eval = layer.apply({**variables, **upd}, x, use_running_average=True,
                                       mutable=["batch_stats"])
        ref, ref_stats = FA.evonorm_b0(x, variables["batch_stats"], p["scale"], p["bias"],
                                       p["v"], momentum=0.8)
        ref_eval = FA.evonorm_b0(x, ref_stats, p["scale"], p["bias"], p["v"], train=False)[0]
        return y, upd, y_eval, upd_eval, ref, ref_stats, ref_eval

    y, upd, y_eval, upd_eval, ref, ref_stats, ref_eval = run(variables, x)
    np.testing.assert_allclose(y, ref, **TOL)
    np.testing.assert_allclose(upd["batch_stats"]["var"], ref_stats["var"], **TOL)
    assert upd["batch_stats"]["var"].dtype == jnp.float32
    np.testing.assert_allclose(y_eval, ref_eval, **TOL)
    np.testing.assert_array_equal(upd_eval["batch_stats"]["var"], upd["batch_stats"]["var"])
    # init leaves the running variance at its initial value
    np.testing.assert_array_equal(_init(LA.EvoNormB0(use_running_average=False), x)
                                  ["batch_stats"]["var"], np.ones(C))


def test_evonorm_b0_needs_use_running_average_and_init_drops_axis_name():
    with pytest.raises(ValueError, match="use_running_average"):
        LA.EvoNormB0().init(jax.random.key(0), _x())
    # statistics of the init call stay on this device (no unbound axis name), as flax's BN
    layer = LA.EvoNormB0(use_running_average=False, axis_name="batch")
    variables = jax.eval_shape(layer.init, jax.random.key(0), _x())
    assert variables["batch_stats"]["var"].shape == (C,)
