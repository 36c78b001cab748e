"""normzoo.Whitening and its presets: variables, train / inference, init, bf16, axis_name,
registry."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import normzoo
import normzoo.functional as F
from normzoo import registry
import reference


def _init_apply(layer, x, train=True, **kw):
    """Jitted init then apply (one compile each instead of op-by-op dispatch)."""
    init = jax.jit(
        lambda x, kw: layer.init(jax.random.key(0), x, use_running_average=not train, **kw)
    )
    apply = jax.jit(lambda v, x, kw: layer.apply(v, x, use_running_average=not train,
                                                 mutable=["batch_stats"], **kw))
    variables = init(x, kw)
    y, updates = apply(variables, x, kw)
    return variables, y, updates


def test_variables_names_shapes_dtypes_and_initial_values(rng):
    x = rng.standard_normal((16, 8)).astype(np.float32)
    variables, _, _ = _init_apply(normzoo.Whitening(group_size=4), x)
    shapes = jax.tree.map(lambda a: (a.shape, a.dtype), variables)
    assert shapes == {
        "params": {"scale": ((8,), jnp.float32), "bias": ((8,), jnp.float32)},
        "batch_stats": {"mean": ((8,), jnp.float32), "covariance": ((2, 4, 4), jnp.float32)},
    }
    # init does not update the statistics
    np.testing.assert_array_equal(variables["batch_stats"]["mean"], 0.0)
    np.testing.assert_array_equal(
        variables["batch_stats"]["covariance"], np.tile(np.eye(4), (2, 1, 1))
    )


def test_training_matches_functional_and_updates_stats(rng):
    x = (1.0 + rng.standard_normal((32, 2, 6))).astype(np.float32)
    layer = normzoo.Whitening(method="cholesky", group_size=3, momentum=0.9, epsilon=1e-3)
    variables, y, updates = _init_apply(layer, x)
    y_f, stats_f = F.whiten(x, variables["batch_stats"], variables["params"]["scale"],
                            variables["params"]["bias"], method="cholesky", group_size=3,
                            momentum=0.9, epsilon=1e-3)
    np.testing.assert_allclose(y, y_f, rtol=1e-6, atol=1e-6)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
                 updates["batch_stats"], stats_f)
    ref = reference.whiten(x.reshape(-1, 6), "cholesky", 3, eps=1e-3).reshape(x.shape)
    np.testing.assert_allclose(y, ref, rtol=1e-4, atol=1e-4)


def test_inference_uses_batch_stats_and_leaves_them(rng):
    x = rng.standard_normal((16, 4)).astype(np.float32)
    layer = normzoo.Whitening(running_average_of="whitening_matrix")
    variables, y, updates = _init_apply(layer, x, train=False)
    assert set(variables["batch_stats"]) == {"mean", "whitening_matrix"}
    np.testing.assert_allclose(y, x)  # initial stats: mean 0, Phi = I
    jax.tree.map(np.testing.assert_array_equal, updates["batch_stats"], variables["batch_stats"])


def test_coloring_recovery_params(rng):
    x = rng.standard_normal((16, 8)).astype(np.float32)
    layer = normzoo.Whitening(group_size=4, recovery="coloring")
    variables, y, _ = _init_apply(layer, x)
    assert variables["params"]["coloring"].shape == (2, 4, 4)
    np.testing.assert_array_equal(variables["params"]["coloring"], np.tile(np.eye(4), (2, 1, 1)))
    np.testing.assert_allclose(y, reference.whiten(x, "zca", 4), rtol=1e-4, atol=1e-4)


def test_bf16_input_keeps_float32_stats(rng):
    x = rng.standard_normal((32, 4, 4, 8)).astype(jnp.bfloat16)
    layer = normzoo.IterNorm(dtype=jnp.bfloat16)
    variables, y, updates = _init_apply(layer, x)
    assert y.dtype == jnp.bfloat16
    assert all(v.dtype == jnp.float32 for v in jax.tree.leaves(updates))
    assert all(np.all(np.isfinite(np.asarray(v))) for v in jax.tree.leaves(updates))


def test_jit_and_grad_of_params(rng):
    x = rng.standard_normal((8, 16)).astype(np.float32)  # batch 8 < group 16: singular
    layer = normzoo.DecorrelatedBatchNorm()
    variables, _, _ = _init_apply(layer, x)

    @jax.jit
    def loss(params, x):
        y, _ = layer.apply({"params": params, "batch_stats": variables["batch_stats"]}, x,
                           use_running_average=False, mutable=["batch_stats"])
        return jnp.sum(jnp.sin(y))

    grads = jax.grad(loss, argnums=(0, 1))(variables["params"], x)
    assert all(np.all(np.isfinite(np.asarray(g))) for g in jax.tree.leaves(grads))


def test_axis_name_under_vmap_and_init_outside(rng):
    x = rng.standard_normal((4, 8, 6)).astype(np.float32)
    layer = normzoo.Whitening(axis_name="batch", epsilon=1e-3)
    # no named axis here: init ignores axis_name
    variables = jax.jit(lambda v: layer.init(jax.random.key(0), v, use_running_average=False))(x[0])
    y, _ = jax.jit(jax.vmap(
        lambda v: layer.apply(variables, v, use_running_average=False, mutable=["batch_stats"]),
        axis_name="batch",
    ))(x)
    np.testing.assert_allclose(y, reference.whiten(x.reshape(-1, 6), "zca", eps=1e-3).reshape(x.shape),
                               rtol=1e-4, atol=1e-4)


def test_mask_argument(rng):
    x = rng.standard_normal((20, 4)).astype(np.float32)
    mask = np.arange(20)[:, None] < 12
    _, y, _ = _init_apply(normzoo.Whitening(epsilon=1e-3), x, mask=mask)
    np.testing.assert_allclose(np.asarray(y)[:12], reference.whiten(x[:12], "zca", eps=1e-3),
                               rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize(
    "cls, method, features, groups",
    [
        (normzoo.ZCAWhitening, "zca", 8, 1),
        (normzoo.PCAWhitening, "pca", 8, 1),
        (normzoo.CholeskyWhitening, "cholesky", 8, 1),
        (normzoo.IterNorm, "newton", 8, 1),  # fewer than 64 features: one group
        (normzoo.IterNorm, "newton", 128, 2),
        (normzoo.IterNorm, "newton", 96, 3),  # 64 does not divide 96: halved to 32
        (normzoo.DecorrelatedBatchNorm, "zca", 32, 2),
    ],
)
def test_presets(cls, method, features, groups):
    layer = cls()
    assert layer.method == method
    shapes = jax.eval_shape(
        lambda x: layer.init(jax.random.key(0), x, use_running_average=False),
        jax.ShapeDtypeStruct((4, features), jnp.float32),
    )
    matrices = shapes["batch_stats"]
    reference_code = cls in (normzoo.IterNorm, normzoo.DecorrelatedBatchNorm)
    key = "whitening_matrix" if reference_code else "covariance"
    g = features // groups
    assert matrices[key].shape == (groups, g, g)


def test_iternorm_defaults():
    layer = normzoo.IterNorm()
    defaults = (layer.group_size, layer.iterations, layer.running_average_of)
    assert defaults == (64, 5, "whitening_matrix")
    assert normzoo.DecorrelatedBatchNorm().group_size == 16


@pytest.mark.parametrize("name", ["zca", "pca", "cholesky", "iternorm", "dbn"])
def test_registry_names(name, rng):
    assert registry.is_stateful(name)
    layer = registry.make(name, use_running_average=True)
    assert isinstance(layer, normzoo.Whitening) and layer.use_running_average is True
    assert registry.describe(name)


# ---------------------------------------------------------------- errors
def _init(layer, x):
    return layer.init(jax.random.key(0), x, use_running_average=False)


def test_error_layer_group_size_not_dividing():
    with pytest.raises(ValueError, match=r"group_size=3 must be a positive divisor of the 8"):
        _init(normzoo.Whitening(group_size=3), jnp.ones((4, 8)))


def test_error_layer_unknown_method():
    with pytest.raises(ValueError, match=r"method='eig' is unknown"):
        _init(normzoo.Whitening(method="eig"), jnp.ones((4, 8)))


def test_error_layer_unknown_recovery():
    with pytest.raises(ValueError, match=r"recovery='colour' is unknown"):
        _init(normzoo.Whitening(recovery="colour"), jnp.ones((4, 8)))


def test_error_layer_batch_dimension_missing():
    with pytest.raises(ValueError, match=r"x has shape \(8,\) and axis=-1 covers every axis"):
        _init(normzoo.Whitening(), jnp.ones((8,)))


def test_error_layer_use_running_average_missing():
    with pytest.raises(ValueError, match="use_running_average"):
        normzoo.Whitening().init(jax.random.key(0), jnp.ones((4, 8)))
