"""normzoo.nnx.weights: the NNX twins of normzoo.linen.weights.

The WS layers are flax.nnx's Linear / Conv on the standardized kernel; the wrappers have
flax.nnx's layout and first-call numbers, but keep the wrapped param as it is (flax.nnx
overwrites it, google/flax#5576) and train their scales (flax.nnx does not, #5577), so that a
training step equals the linen layer's; the same variables give the linen twin's numbers.
"""

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import normzoo.linen.weights as L
import normzoo.nnx.weights as Z
from normzoo.functional import weights as W


@pytest.fixture
def x(rng):
    return rng.standard_normal((2, 5, 5, 4)).astype(np.float32)


def _pure(module):
    return nnx.to_pure_dict(nnx.state(module))


# ---------------------------------------------------------------- WS layers
def test_ws_linear_is_linear_on_the_standardized_kernel_and_the_linen_twin(x):
    layer = Z.WSLinear(4, 5, ddof=1, rngs=nnx.Rngs(0))
    assert Z.WSDense is Z.WSLinear
    chex.assert_trees_all_equal(_pure(layer), _pure(nnx.Linear(4, 5, rngs=nnx.Rngs(0))))
    layer.bias[...] = jnp.arange(5.0)
    kernel = np.asarray(layer.kernel[...])
    expected = x @ np.asarray(W.weight_standardization(kernel, ddof=1)) + np.arange(5.0)
    np.testing.assert_allclose(layer(x), expected, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(layer.kernel[...], kernel)  # the param is left as it was
    linen = L.WSDense(5, ddof=1).apply({"params": _pure(layer)}, x)
    np.testing.assert_allclose(layer(x), linen, rtol=1e-6, atol=1e-6)
    # gradients: the linen twin's
    grads = nnx.grad(lambda m: jnp.sum(m(x) ** 2))(layer)
    linen_grads = jax.grad(lambda p: jnp.sum(L.WSDense(5, ddof=1).apply({"params": p}, x) ** 2))(
        _pure(layer))
    chex.assert_trees_all_close(nnx.to_pure_dict(grads), linen_grads, rtol=1e-5, atol=1e-5)


def test_ws_conv_and_scaled_ws_conv_are_the_linen_twins(x):
    ws = Z.WSConv(4, 5, (2, 2), rngs=nnx.Rngs(0))
    chex.assert_trees_all_equal(_pure(ws), _pure(nnx.Conv(4, 5, (2, 2), rngs=nnx.Rngs(0))))
    np.testing.assert_allclose(ws(x), L.WSConv(5, (2, 2)).apply({"params": _pure(ws)}, x),
                               rtol=1e-6, atol=1e-6)
    sws = Z.ScaledWSConv(4, 5, (2, 2), rngs=nnx.Rngs(0))
    assert jax.tree.map(np.shape, _pure(sws)) == {"kernel": (2, 2, 4, 5), "bias": (5,),
                                                  "gain": (5,)}
    assert isinstance(sws.gain, nnx.Param)
    sws.gain[...] = jnp.linspace(0.5, 2, 5)
    linen = L.ScaledWSConv(5, (2, 2)).apply({"params": _pure(sws)}, x)
    np.testing.assert_allclose(nnx.jit(lambda m, x: m(x))(sws, x), linen, rtol=1e-6, atol=1e-6)
    assert np.any(nnx.grad(lambda m: jnp.sum(m(x) ** 2))(sws)["gain"][...] != 0)


# ---------------------------------------------------------------- wrappers
def _sgd(model, x, steps=2, lr=1e-2):
    """Plain SGD on sum(y^2) over every nnx.Param (what an optimizer would do)."""
    for _ in range(steps):
        grads = nnx.grad(lambda m: jnp.sum(m(x) ** 2))(model)
        params = nnx.state(model, nnx.Param)
        nnx.update(model, jax.tree.map(lambda p, g: p - lr * g, params, grads))
    return model


def test_weight_norm_has_flax_nnx_layout_and_first_call_and_trains_as_linen(x):
    ours = Z.WeightNorm(nnx.Linear(4, 5, rngs=nnx.Rngs(0)), rngs=nnx.Rngs(1))
    flax_ = nnx.WeightNorm(nnx.Linear(4, 5, rngs=nnx.Rngs(0)), rngs=nnx.Rngs(1))
    chex.assert_trees_all_equal(_pure(ours), _pure(flax_))  # same paths, shapes and values
    kernel = np.asarray(ours.layer_instance.kernel[...]) * 1.5  # not normalized
    ours.layer_instance.kernel[...] = kernel
    flax_.layer_instance.kernel[...] = kernel
    np.testing.assert_array_equal(ours(x), flax_(x))
    np.testing.assert_array_equal(ours.layer_instance.kernel[...], kernel)  # v is kept ...
    assert not np.allclose(flax_.layer_instance.kernel[...], kernel)  # flax #5576 overwrites it
    assert isinstance(ours.scales[("kernel",)], nnx.Param)  # ... and g is a param (#5577)

    # training = the linen layer's (v and g both trained; v keeps its norm's freedom)
    linen = L.WeightNorm(nn.Dense(5))
    params = {"layer_instance": {"kernel": kernel, "bias": np.zeros(5, np.float32)},
              "layer_instance/kernel/scale": np.ones(5, np.float32)}
    np.testing.assert_allclose(linen.apply({"params": params}, x), ours(x), rtol=1e-6)
    for _ in range(2):
        grads = jax.grad(lambda p: jnp.sum(linen.apply({"params": p}, x) ** 2))(params)
        params = jax.tree.map(lambda p, g: p - 1e-2 * g, params, grads)
    _sgd(ours, x)
    np.testing.assert_allclose(ours.layer_instance.kernel[...], params["layer_instance"]["kernel"],
                               rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(ours.scales[("kernel",)][...],
                               params["layer_instance/kernel/scale"], rtol=1e-5, atol=1e-6)
    assert not np.allclose(ours.scales[("kernel",)][...], 1.0)


def test_centered_weight_norm_is_the_linen_twin(x):
    ours = Z.CenteredWeightNorm(nnx.Conv(4, 5, (2, 2), rngs=nnx.Rngs(0)), feature_axes=-1,
                                rngs=nnx.Rngs(1))
    ours.scales[("kernel",)][...] = jnp.linspace(0.5, 2, 5)
    layer = ours.layer_instance
    params = {"layer_instance": {"kernel": layer.kernel[...], "bias": layer.bias[...]},
              "layer_instance/kernel/scale": ours.scales[("kernel",)][...]}
    linen = L.CenteredWeightNorm(nn.Conv(5, (2, 2)))
    np.testing.assert_allclose(ours(x), linen.apply({"params": params}, x), rtol=1e-6, atol=1e-6)
    (_, w), = ours.normalized()
    flat = np.asarray(w, np.float64).reshape(-1, 5)
    np.testing.assert_allclose(flat.mean(0), 0, atol=1e-6)
    np.testing.assert_allclose(np.linalg.norm(flat, axis=0), np.linspace(0.5, 2, 5), rtol=1e-5)


def test_spectral_norm_has_flax_nnx_layout_and_first_call_and_follows_linen(x):
    ours = Z.SpectralNorm(nnx.Conv(4, 5, (2, 2), rngs=nnx.Rngs(0)), rngs=nnx.Rngs(1))
    flax_ = nnx.SpectralNorm(nnx.Conv(4, 5, (2, 2), rngs=nnx.Rngs(0)), rngs=nnx.Rngs(1))
    chex.assert_trees_all_equal(_pure(ours), _pure(flax_))  # u starts as flax.nnx's
    kernel = np.asarray(ours.layer_instance.kernel[...])
    np.testing.assert_array_equal(ours(x, update_stats=True), flax_(x, update_stats=True))
    chex.assert_trees_all_equal(_pure(ours)["batch_stats"], _pure(flax_)["batch_stats"])
    np.testing.assert_array_equal(ours.layer_instance.kernel[...], kernel)  # W is kept
    assert not np.allclose(flax_.layer_instance.kernel[...], kernel)  # flax #5576: W / sigma

    # the same variables as the linen twin: the same output and updates, call after call
    linen = L.SpectralNorm(nn.Conv(5, (2, 2)))
    stats = _pure(ours)["batch_stats"]
    variables = {"params": {"layer_instance": _pure(ours)["layer_instance"]},
                 "batch_stats": {"layer_instance/kernel/u": stats[("kernel", "u")],
                                 "layer_instance/kernel/sigma": stats[("kernel", "sigma")]}}
    step = nnx.jit(lambda m, x: m(x))  # update_stats from use_running_average (train mode)
    for _ in range(2):
        y, updates = linen.apply(variables, x, update_stats=True, mutable=["batch_stats"])
        variables = {**variables, **updates}
        np.testing.assert_allclose(step(ours, x), y, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(ours.batch_stats[("kernel", "u")][...],
                               variables["batch_stats"]["layer_instance/kernel/u"], rtol=1e-6)

    # eval mode keeps u and sigma; nnx.view switches too
    ours.eval()
    u = np.asarray(ours.batch_stats[("kernel", "u")][...])
    ours(x)
    np.testing.assert_array_equal(ours.batch_stats[("kernel", "u")][...], u)
    nnx.view(ours, use_running_average=False)(x)
    assert not np.array_equal(ours.batch_stats[("kernel", "u")][...], u)


def test_spectral_norm_reaches_the_largest_singular_value(rng):
    layer = nnx.Linear(6, 4, kernel_init=nnx.initializers.normal(3.0), rngs=nnx.Rngs(0))
    ours = Z.SpectralNorm(layer, n_steps=40, rngs=nnx.Rngs(1))
    ours(jnp.ones((1, 6)))
    sv = np.linalg.svd(np.asarray(layer.kernel[...], np.float64), compute_uv=False)
    np.testing.assert_allclose(ours.batch_stats[("kernel", "sigma")][...], sv[0], rtol=1e-5)


def test_wrappers_under_vmap_and_bfloat16(x):
    ours = Z.WeightNorm(nnx.Linear(4, 5, param_dtype=jnp.bfloat16, rngs=nnx.Rngs(0)),
                        param_dtype=jnp.bfloat16, rngs=nnx.Rngs(1))
    x16 = jnp.asarray(x, jnp.bfloat16)
    y = nnx.vmap(lambda m, x: m(x), in_axes=(None, 0))(ours, x16)
    assert y.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(y, np.float32), np.asarray(ours(x16), np.float32))
    kernel = np.asarray(ours.layer_instance.kernel[...], np.float64)
    expected = np.asarray(x16, np.float64) @ (kernel / np.linalg.norm(kernel, axis=0))
    np.testing.assert_allclose(np.asarray(y, np.float32), expected, rtol=0.03, atol=0.03)


def test_wrapped_state_updates_are_kept_and_closed_over_jit_works(x):
    block = nnx.Sequential(nnx.Linear(4, 5, rngs=nnx.Rngs(0)), nnx.BatchNorm(5, rngs=nnx.Rngs(0)))
    ours = Z.WeightNorm(block, rngs=nnx.Rngs(1))
    kernel = np.asarray(block.layers[0].kernel[...])
    ours(x)  # the inner BatchNorm trains: its statistics are written back, the kernel is not
    assert not np.allclose(block.layers[1].mean[...], 0)
    np.testing.assert_array_equal(block.layers[0].kernel[...], kernel)
    # a module closed over by a plain jax.jit is only read (flax.nnx's wrappers write to it)
    ours.eval()
    np.testing.assert_allclose(jax.jit(lambda x: ours(x))(x), ours(x), rtol=1e-6, atol=1e-6)
    layer = Z.WSLinear(4, 5, rngs=nnx.Rngs(0))
    np.testing.assert_allclose(jax.jit(lambda x: layer(x))(x), layer(x), rtol=1e-6, atol=1e-6)


# ---------------------------------------------------------------- errors
def test_errors():
    with pytest.raises(ValueError, match="weight_standardization: epsilon=-1"):
        Z.WSLinear(4, 5, epsilon=-1.0, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="ddof=9"):
        Z.WSConv(2, 3, (1, 1), ddof=9, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="n_steps=-1"):
        Z.SpectralNorm(nnx.Linear(4, 5, rngs=nnx.Rngs(0)), n_steps=-1, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match=r"'kernel' has shape \(2, 2, 4, 5\).*error_on_non_matrix"):
        Z.SpectralNorm(nnx.Conv(4, 5, (2, 2), rngs=nnx.Rngs(0)), error_on_non_matrix=True,
                       rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match=r"'bias' of shape \(5,\)"):
        Z.CenteredWeightNorm(nnx.Linear(4, 5, rngs=nnx.Rngs(0)), variable_filter=nnx.Param,
                             rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match=r"feature_axes=3 is out of range.*param .kernel."):
        Z.WeightNorm(nnx.Linear(4, 5, rngs=nnx.Rngs(0)), feature_axes=3, rngs=nnx.Rngs(0))
