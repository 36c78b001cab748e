"""normzoo.linen.weights: the WS layers against flax.linen's Dense / Conv on the standardized
kernel, WeightNorm / SpectralNorm against flax.linen's (variables, outputs, gradients and
updates), CenteredWeightNorm against its float64 reference; errors and bfloat16."""

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import normzoo.linen.weights as Z
from normzoo.functional import weights as W


def _ws_ref(w, eps=1e-5, ddof=0):
    w = np.asarray(w, np.float64)
    axes = tuple(range(w.ndim - 1))
    n = np.prod(w.shape[:-1])
    mean = w.mean(axes, keepdims=True)
    std = np.sqrt(((w - mean) ** 2).sum(axes, keepdims=True) / (n - ddof))
    return (w - mean) / (std + eps)


def _sws_ref(w, gain, eps=1e-4):
    w = np.asarray(w, np.float64)
    axes = tuple(range(w.ndim - 1))
    mean = w.mean(axes, keepdims=True)
    var = ((w - mean) ** 2).mean(axes, keepdims=True)
    n = np.prod(w.shape[:-1])
    return np.asarray(gain, np.float64) * (w - mean) / np.sqrt(np.maximum(var * n, eps))


def _cwn_ref(v, g, eps=1e-12):
    v = np.asarray(v, np.float64)
    axes = tuple(range(v.ndim - 1))
    c = v - v.mean(axes, keepdims=True)
    return np.asarray(g, np.float64) * c / np.sqrt((c * c).sum(axes, keepdims=True) + eps)


@pytest.fixture
def x(rng):
    return rng.standard_normal((2, 5, 5, 4)).astype(np.float32)


# ---------------------------------------------------------------- WS layers
def test_ws_dense_is_dense_on_the_standardized_kernel(x, rng):
    key = jax.random.key(0)
    for ddof in (0, 1):
        layer = Z.WSDense(5, ddof=ddof)
        variables = layer.init(key, x)
        chex.assert_trees_all_equal(variables, nn.Dense(5).init(key, x))  # flax's variables
        p = dict(variables["params"], bias=rng.standard_normal(5).astype(np.float32))
        expected = x @ _ws_ref(p["kernel"], ddof=ddof) + p["bias"]
        np.testing.assert_allclose(layer.apply({"params": p}, x), expected, rtol=1e-5, atol=1e-5)
        assert np.array_equal(p["kernel"], variables["params"]["kernel"])  # stored as it was
    # the gradient is Dense's through the standardization
    grad = jax.grad(lambda p: jnp.sum(layer.apply({"params": p}, x) ** 2))(p)
    expected = jax.grad(lambda p: jnp.sum(nn.Dense(5).apply(
        {"params": {**p, "kernel": W.weight_standardization(p["kernel"], ddof=1)}}, x) ** 2))(p)
    chex.assert_trees_all_close(grad, expected, rtol=1e-6, atol=1e-6)


def test_ws_conv_and_scaled_ws_conv_are_conv_on_the_normalized_kernel(x):
    key = jax.random.key(1)
    conv = dict(features=6, kernel_size=(3, 3), feature_group_count=2, padding="VALID")
    ws = Z.WSConv(**conv)
    variables = ws.init(key, x)
    chex.assert_trees_all_equal(variables, nn.Conv(**conv).init(key, x))
    kernel = variables["params"]["kernel"]
    assert kernel.shape == (3, 3, 2, 6)
    reference = {"params": {**variables["params"], "kernel": _ws_ref(kernel).astype(np.float32)}}
    np.testing.assert_allclose(ws.apply(variables, x), nn.Conv(**conv).apply(reference, x),
                               rtol=1e-5, atol=1e-5)

    sws = Z.ScaledWSConv(**conv)
    variables = sws.init(key, x)
    assert jax.tree.map(np.shape, variables) == {
        "params": {"kernel": (3, 3, 2, 6), "gain": (6,), "bias": (6,)}}
    np.testing.assert_array_equal(variables["params"]["gain"], np.ones(6))
    params = {**variables["params"], "gain": np.linspace(0.5, 2, 6).astype(np.float32)}
    w_hat = _sws_ref(params["kernel"], params["gain"]).astype(np.float32)
    reference = {"params": {"kernel": w_hat, "bias": params["bias"]}}
    np.testing.assert_allclose(sws.apply({"params": params}, x),
                               nn.Conv(**conv).apply(reference, x), rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------- wrappers vs flax.linen
def _wrapped(wrapper, layer, **fields):
    class Model(nn.Module):
        @nn.compact
        def __call__(self, x, **call):
            return wrapper(layer(), **fields)(x, **call)
    return Model()


WN_CASES = [
    (lambda: nn.Dense(5), {}),
    (lambda: nn.Conv(5, (2, 2)), {"feature_axes": None, "use_scale": False}),
    (lambda: nn.Conv(5, (2, 2)), {"variable_filter": None, "scale_init": nn.initializers.normal()}),
]


@pytest.mark.parametrize("layer, fields", WN_CASES)
def test_weight_norm_is_flax_weight_norm(x, layer, fields):
    ours, flax_ = _wrapped(Z.WeightNorm, layer, **fields), _wrapped(nn.WeightNorm, layer, **fields)
    key = jax.random.key(2)
    variables = ours.init(key, x)
    chex.assert_trees_all_equal(variables, flax_.init(key, x))  # layout, values (init stores
    # the normalized kernel, as flax's); a kernel that is not normalized, as after training:
    variables = jax.tree.map(lambda a: a * 1.5, variables)

    def run(model):
        def loss(variables):
            y = model.apply(variables, x)
            return jnp.sum(y ** 2), y
        return jax.grad(loss, has_aux=True)(variables)

    (grads_ours, y_ours), (grads_flax, y_flax) = run(ours), run(flax_)
    chex.assert_trees_all_equal(y_ours, y_flax)
    chex.assert_trees_all_close(grads_ours, grads_flax, rtol=1e-6, atol=1e-6)
    if not fields:  # under jit too
        np.testing.assert_allclose(jax.jit(ours.apply)(variables, x), y_ours, rtol=1e-6,
                                   atol=1e-6)


@pytest.mark.parametrize("layer, fields", [
    (lambda: nn.Dense(5), {}),
    (lambda: nn.Conv(5, (2, 2)), {"n_steps": 3}),
])
def test_spectral_norm_is_flax_spectral_norm(x, layer, fields):
    ours = _wrapped(Z.SpectralNorm, layer, **fields)
    flax_ = _wrapped(nn.SpectralNorm, layer, **fields)
    key = jax.random.key(3)
    for update_stats in (False, True):
        variables = ours.init(key, x, update_stats=update_stats)
        chex.assert_trees_all_equal(variables, flax_.init(key, x, update_stats=update_stats))

    def train(model, state):
        """An SGD step (u and sigma updated), then the evaluation output."""
        for _ in range(1):
            def loss(params):
                y, updates = model.apply({**state, "params": params}, x, update_stats=True,
                                         mutable=["batch_stats"])
                return jnp.sum(y ** 2), updates
            (_, updates), grads = jax.value_and_grad(loss, has_aux=True)(state["params"])
            params = jax.tree.map(lambda p, g: p - 1e-3 * g, state["params"], grads)
            state = {**updates, "params": params}
        return state, model.apply(state, x, update_stats=False)

    (state_ours, y_ours), (state_flax, y_flax) = train(ours, variables), train(flax_, variables)
    chex.assert_trees_all_close(state_ours, state_flax, rtol=1e-6, atol=1e-6)
    chex.assert_trees_all_close(y_ours, y_flax, rtol=1e-6, atol=1e-6)
    (sigma,) = [v for k, v in state_ours["batch_stats"]["SpectralNorm_0"].items()
                if k.endswith("/kernel/sigma")]
    assert not np.allclose(sigma, 1.0)  # updated from its initial 1


def test_spectral_norm_with_no_steps_is_flax_no_op(x):
    ours = _wrapped(Z.SpectralNorm, lambda: nn.Dense(5), n_steps=0)
    flax_ = _wrapped(nn.SpectralNorm, lambda: nn.Dense(5), n_steps=0)
    variables = ours.init(jax.random.key(0), x, update_stats=True)
    chex.assert_trees_all_equal(variables, flax_.init(jax.random.key(0), x, update_stats=True))
    assert "batch_stats" not in variables
    chex.assert_trees_all_equal(ours.apply(variables, x, update_stats=False),
                                nn.Dense(5).apply({"params": variables["params"]["Dense_0"]}, x))


def test_spectral_norm_normalizes_the_largest_singular_value_to_1(rng):
    x = rng.standard_normal((2, 6)).astype(np.float32)
    seen = {}

    class Probe(nn.Module):
        @nn.compact
        def __call__(self, x):
            kernel = self.param("kernel", nn.initializers.normal(3.0), (6, 4))
            seen["kernel"] = kernel
            return x @ kernel

    model = Z.SpectralNorm(Probe(), n_steps=40)
    variables = model.init(jax.random.key(0), x, update_stats=True)
    _, updates = model.apply(variables, x, update_stats=True, mutable=["batch_stats"])
    sv = np.linalg.svd(np.asarray(variables["params"]["layer_instance"]["kernel"], np.float64),
                       compute_uv=False)
    np.testing.assert_allclose(updates["batch_stats"]["layer_instance/kernel/sigma"], sv[0],
                               rtol=1e-5)
    used = np.asarray(seen["kernel"], np.float64)  # what the layer saw in the last call
    np.testing.assert_allclose(np.linalg.svd(used, compute_uv=False)[0], 1, rtol=1e-5)


def test_centered_weight_norm(x):
    conv = dict(features=5, kernel_size=(2, 2))
    model = _wrapped(Z.CenteredWeightNorm, lambda: nn.Conv(**conv))
    variables = model.init(jax.random.key(4), x)
    assert jax.tree.map(np.shape, variables["params"]["CenteredWeightNorm_0"]) == {
        "Conv_0/kernel/scale": (5,)}  # WeightNorm's layout
    params = jax.tree.map(lambda a: a * 1.5 + 0.1, variables["params"])
    scale = np.linspace(0.5, 2, 5).astype(np.float32)
    params["CenteredWeightNorm_0"]["Conv_0/kernel/scale"] = scale
    kernel = _cwn_ref(params["Conv_0"]["kernel"], scale)
    np.testing.assert_allclose(kernel.reshape(-1, 5).mean(0), 0, atol=1e-12)
    np.testing.assert_allclose(np.linalg.norm(kernel.reshape(-1, 5), axis=0), scale, rtol=1e-6)
    reference = {"params": {**params["Conv_0"], "kernel": kernel.astype(np.float32)}}
    np.testing.assert_allclose(model.apply({"params": params}, x),
                               nn.Conv(**conv).apply(reference, x), rtol=1e-5, atol=1e-5)


def test_bfloat16_params_get_float32_statistics(x):
    x = jnp.asarray(x, jnp.bfloat16)
    fields = dict(dtype=jnp.bfloat16, param_dtype=jnp.bfloat16)
    ours = _wrapped(Z.WeightNorm, lambda: nn.Dense(5, **fields), param_dtype=jnp.bfloat16)
    flax_ = _wrapped(nn.WeightNorm, lambda: nn.Dense(5, **fields), param_dtype=jnp.bfloat16)
    variables = ours.init(jax.random.key(5), x)
    chex.assert_trees_all_equal_shapes_and_dtypes(variables, flax_.init(jax.random.key(5), x))
    y_ours, y_flax = ours.apply(variables, x), flax_.apply(variables, x)
    assert y_ours.dtype == y_flax.dtype
    np.testing.assert_allclose(np.asarray(y_ours, np.float32), np.asarray(y_flax, np.float32),
                               rtol=0.05, atol=0.05)


# ---------------------------------------------------------------- errors
def test_errors_name_the_variable(x):
    model = _wrapped(Z.SpectralNorm, lambda: nn.Conv(5, (2, 2)), error_on_non_matrix=True)
    with pytest.raises(ValueError, match=r"'Conv_0/kernel' has shape \(2, 2, 4, 5\)"):
        model.init(jax.random.key(0), x, update_stats=False)
    with pytest.raises(ValueError, match="n_steps=-1"):
        _wrapped(Z.SpectralNorm, lambda: nn.Dense(5), n_steps=-1).init(
            jax.random.key(0), x, update_stats=False)
    with pytest.raises(ValueError, match=r"'Dense_0/bias' of shape \(5,\).*variable_filter"):
        _wrapped(Z.CenteredWeightNorm, lambda: nn.Dense(5), variable_filter=None).init(
            jax.random.key(0), x)
    with pytest.raises(ValueError, match=r"feature_axes=3 is out of range.*'Dense_0/kernel'"):
        _wrapped(Z.WeightNorm, lambda: nn.Dense(5), feature_axes=3).init(jax.random.key(0), x)
    with pytest.raises(ValueError, match="weight_standardization: epsilon=-1"):
        Z.WSDense(3, epsilon=-1.0).init(jax.random.key(0), x)
