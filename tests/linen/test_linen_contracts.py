"""Where normzoo must beat flax.linen (large mean, errors), and the drop-in contract at model
level: swapping the layer in a model changes nothing; flax checkpoints load unchanged."""

from typing import Any

import flax.linen as nn
import flax.serialization
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import normzoo
import reference
from linen_helpers import TOL, assert_trees_equal, jit_apply, jit_init


def _x(rng, shape, loc=0.3, scale=1.5):
    return (loc + scale * rng.standard_normal(shape)).astype(np.float32)


# ---------------------------------------------------------------- large mean, default fast variance
def _large(rng, shape):
    return (1e4 + rng.standard_normal(shape)).astype(np.float32)


def _out_std(y, axes):
    return np.asarray(y, np.float64).std(axis=axes)


def test_large_mean_batch_norm(rng):
    x = _large(rng, (256, 16))
    true_var = reference.moments(x, (0,))[1].ravel()
    layer = normzoo.BatchNorm(use_running_average=False, momentum=0.0)
    v = jit_init(layer, jax.random.key(0), x)
    y, upd = jit_apply(layer, v, x, mutable=["batch_stats"])
    np.testing.assert_allclose(_out_std(y, 0), 1.0, rtol=0.01)
    np.testing.assert_allclose(upd["batch_stats"]["var"], true_var, rtol=0.02)
    # default momentum: the EMA formula with the accurate batch variance
    y, upd = jit_apply(normzoo.BatchNorm(use_running_average=False), v, x,
                       mutable=["batch_stats"])
    np.testing.assert_allclose((np.asarray(upd["batch_stats"]["var"], np.float64) - 0.99) / 0.01,
                               true_var, rtol=0.02)
    # eval with the exact batch statistics as running statistics also standardizes
    stats = {"mean": x.mean(0, dtype=np.float64).astype(np.float32), "var": true_var.astype(np.float32)}
    y_eval = jit_apply(normzoo.BatchNorm(use_running_average=True),
                       {"params": v["params"], "batch_stats": stats}, x)
    np.testing.assert_allclose(_out_std(y_eval, 0), 1.0, rtol=0.01)
    # documentation only (not asserted, so the suite does not depend on flax staying broken):
    y_flax, u_flax = jit_apply(nn.BatchNorm(use_running_average=False, momentum=0.0), v, x,
                               mutable=["batch_stats"])
    print(f"flax.linen BatchNorm on 1e4 + N(0,1): output std {_out_std(y_flax, 0).mean():.1f}, "
          f"running var {np.asarray(u_flax['batch_stats']['var']).mean():.2f} (truth ~1)")


def test_large_mean_batch_norm_nhwc(rng):
    x = _large(rng, (8, 4, 4, 8))
    layer = normzoo.BatchNorm(use_running_average=False, momentum=0.0)
    v = jit_init(layer, jax.random.key(0), x)
    y, upd = jit_apply(layer, v, x, mutable=["batch_stats"])
    np.testing.assert_allclose(_out_std(y, (0, 1, 2)), 1.0, rtol=0.01)
    np.testing.assert_allclose(upd["batch_stats"]["var"], reference.moments(x, (0, 1, 2))[1].ravel(), rtol=0.02)


def test_large_mean_layer_norm(rng):
    x = _large(rng, (4, 256))
    y = jit_apply(normzoo.LayerNorm(), {"params": {"scale": jnp.ones(256), "bias": jnp.zeros(256)}},
                  x)
    np.testing.assert_allclose(_out_std(y, 1), 1.0, rtol=0.01)
    x2 = _large(rng, (4, 8, 8, 4))
    y2 = jit_apply(normzoo.LayerNorm(reduction_axes=(1, 2, 3), use_scale=False, use_bias=False),
                   {}, x2)
    np.testing.assert_allclose(_out_std(y2, (1, 2, 3)), 1.0, rtol=0.01)


def test_large_mean_group_norm_and_instance_norm(rng):
    x = _large(rng, (4, 8, 8, 16))
    y = jit_apply(normzoo.GroupNorm(num_groups=4, use_scale=False, use_bias=False), {}, x)
    np.testing.assert_allclose(_out_std(np.asarray(y).reshape(4, 8, 8, 4, 4), (1, 2, 4)), 1.0, rtol=0.01)
    y = jit_apply(normzoo.InstanceNorm(use_scale=False, use_bias=False), {}, x)
    np.testing.assert_allclose(_out_std(y, (1, 2)), 1.0, rtol=0.01)


def test_large_mean_standardization_layer(rng):
    x = _large(rng, (64, 16))
    for area in ("batch", "layer"):
        layer = normzoo.Standardization(area=area, use_scale=False, use_bias=False)
        kw = dict(use_running_average=False) if area == "batch" else {}
        v = jit_init(layer, jax.random.key(0), x, **kw)
        y = jit_apply(layer, v, x, mutable=["batch_stats"], **kw)[0]
        np.testing.assert_allclose(_out_std(y, 0 if area == "batch" else 1), 1.0, rtol=0.01)


# ---------------------------------------------------------------- errors: argument and value named
def _init(layer, x, **kw):
    return layer.init(jax.random.key(0), x, **kw)


def test_error_batch_norm_axis_out_of_range(rng):
    x = _x(rng, (8, 6))
    with pytest.raises(ValueError, match="axis") as info:
        _init(normzoo.BatchNorm(use_running_average=False, axis=5), x)
    assert "5" in str(info.value)
    with pytest.raises(ValueError, match="axis") as info:
        _init(normzoo.BatchNorm(use_running_average=False, axis=(0, -3)), x)
    assert "-3" in str(info.value)


def test_error_batch_norm_axis_out_of_range_under_jit(rng):
    x = _x(rng, (8, 6))
    layer = normzoo.BatchNorm(use_running_average=True, axis=2)
    v = {"params": {"scale": jnp.ones(6), "bias": jnp.zeros(6)},
         "batch_stats": {"mean": jnp.zeros(6), "var": jnp.ones(6)}}
    with pytest.raises(ValueError, match="axis"):
        jax.jit(layer.apply)(v, x)


@pytest.mark.parametrize("kw,needle,value", [
    (dict(reduction_axes=3), "reduction_axes", "3"),
    (dict(reduction_axes=(1, -4)), "reduction_axes", "-4"),
    (dict(feature_axes=3), "feature_axes", "3"),
    (dict(feature_axes=(-1, 7)), "feature_axes", "7"),
])
def test_error_layer_norm_axes(rng, kw, needle, value):
    x = _x(rng, (2, 3, 4))
    for cls in (normzoo.LayerNorm, normzoo.RMSNorm):
        with pytest.raises(ValueError, match=needle) as info:
            _init(cls(**kw), x)
        assert value in str(info.value)


@pytest.mark.parametrize("kw,needles", [
    (dict(num_groups=3), ("num_groups", "3")),
    (dict(num_groups=0), ("num_groups", "0")),
    (dict(num_groups=None, group_size=5), ("group_size", "5")),
    (dict(num_groups=4, group_size=8), ("num_groups", "group_size")),
    (dict(num_groups=None, group_size=None), ("num_groups", "group_size")),
])
def test_error_group_norm_groups(rng, kw, needles):
    x = _x(rng, (2, 3, 32))
    with pytest.raises(ValueError) as info:
        _init(normzoo.GroupNorm(**kw), x)
    for n in needles:
        assert n in str(info.value), (n, str(info.value))


def test_error_group_norm_reduction_axes_without_channels(rng):
    x = _x(rng, (2, 5, 4, 8))
    with pytest.raises(ValueError, match="reduction_axes"):
        _init(normzoo.GroupNorm(num_groups=2, reduction_axes=(0, 1, 2)), x)
    with pytest.raises(ValueError, match="reduction_axes"):
        _init(normzoo.GroupNorm(num_groups=2, reduction_axes=(1, 9)), x)


@pytest.mark.parametrize("feature_axes", [0, -4, (0, 3), (2, -4)])
def test_error_instance_norm_feature_axes_batch_axis(rng, feature_axes):
    x = _x(rng, (2, 3, 4, 5))
    with pytest.raises(ValueError, match="feature_axes"):
        _init(normzoo.InstanceNorm(feature_axes=feature_axes), x)


@pytest.mark.parametrize("name", ["BatchNorm", "LayerNorm", "GroupNorm", "InstanceNorm", "RMSNorm"])
def test_error_mask_shape(rng, name):
    x = _x(rng, (4, 3, 8))
    kw = dict(use_running_average=False) if name == "BatchNorm" else {}
    if name == "GroupNorm":
        kw["num_groups"] = 2
    bad = np.ones((4, 3, 5), bool)
    with pytest.raises(ValueError, match="mask") as info:
        _init(getattr(normzoo, name)(**kw), x, mask=bad)
    assert "(4, 3, 5)" in str(info.value) or "4, 3, 5" in str(info.value)


@pytest.mark.parametrize("name", ["BatchNorm", "LayerNorm", "GroupNorm", "InstanceNorm", "RMSNorm",
                                  "Centering", "Scaling", "Standardization"])
def test_error_integer_input(name):
    x = jnp.arange(4 * 3 * 8, dtype=jnp.int32).reshape(4, 3, 8)
    kw = dict(use_running_average=False) if name in ("BatchNorm", "Centering", "Standardization") else {}
    if name == "GroupNorm":
        kw["num_groups"] = 2
    with pytest.raises((TypeError, ValueError)) as info:
        _init(getattr(normzoo, name)(**kw), x)
    msg = str(info.value)
    assert "int32" in msg and ("dtype" in msg or "x" in msg), msg


# ---------------------------------------------------------------- model swap / checkpoints
class Net(nn.Module):
    norm: Any = nn.BatchNorm
    ln: Any = nn.LayerNorm

    @nn.compact
    def __call__(self, x, train: bool):
        x = nn.Dense(16)(x)
        x = self.norm(use_running_average=not train, momentum=0.9)(x)
        x = nn.relu(x)
        x = nn.Dense(8)(x)
        x = self.ln()(x)
        return nn.Dense(3)(x)


def _nets():
    return Net(nn.BatchNorm, nn.LayerNorm), Net(normzoo.BatchNorm, normzoo.LayerNorm)


def test_model_swap_same_variable_tree(rng):
    x = _x(rng, (8, 5))
    ref, nz = _nets()
    v_ref = jax.jit(ref.init, static_argnames="train")(jax.random.key(0), x, train=False)
    v_nz = jax.jit(nz.init, static_argnames="train")(jax.random.key(0), x, train=False)
    assert_trees_equal(v_ref, v_nz, exact=True)


def test_model_swap_same_training_steps(rng):
    x = _x(rng, (16, 5))
    labels = rng.integers(0, 3, 16)
    tx = optax.sgd(0.1, momentum=0.9)
    results = []
    for net in _nets():
        v = jax.jit(net.init, static_argnames="train")(jax.random.key(0), x, train=False)
        params, stats = v["params"], v["batch_stats"]
        opt = tx.init(params)

        @jax.jit
        def step(params, stats, opt, net=net):
            def loss_fn(p):
                logits, upd = net.apply({"params": p, "batch_stats": stats}, x, train=True,
                                        mutable=["batch_stats"])
                return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean(), upd
            (loss, upd), g = jax.value_and_grad(loss_fn, has_aux=True)(params)
            updates, opt = tx.update(g, opt, params)
            return optax.apply_updates(params, updates), upd["batch_stats"], opt, loss

        losses = []
        for _ in range(3):
            params, stats, opt, loss = step(params, stats, opt)
            losses.append(float(loss))
        eval_out = jit_apply(net, {"params": params, "batch_stats": stats}, x, train=False)
        results.append((losses, params, stats, eval_out))
    np.testing.assert_allclose(results[1][0], results[0][0], rtol=2e-5)
    assert_trees_equal(results[0][1], results[1][1], exact=False, rtol=1e-4, atol=2e-5)
    assert_trees_equal(results[0][2], results[1][2], exact=False, rtol=1e-4, atol=2e-5)
    np.testing.assert_allclose(results[1][3], results[0][3], rtol=1e-4, atol=5e-5)


def test_flax_checkpoint_loads_into_normzoo_model(rng):
    x = _x(rng, (8, 5))
    ref, nz = _nets()
    v = jit_init(ref, jax.random.key(1), x, train=False)
    # make the statistics non-trivial with a flax training step
    _, upd = jit_apply(ref, v, x, train=True, mutable=["batch_stats"])
    v = {"params": v["params"], **upd}
    blob = flax.serialization.to_bytes(v)
    template = jit_init(nz, jax.random.key(99), x, train=False)
    restored = flax.serialization.from_bytes(template, blob)
    assert_trees_equal(v, restored, exact=True)
    y_ref = jit_apply(ref, v, x, train=False)
    np.testing.assert_allclose(jit_apply(nz, restored, x, train=False), y_ref, **TOL)
    # and the raw flax dict applies to normzoo as is
    np.testing.assert_allclose(jit_apply(nz, v, x, train=False), y_ref, **TOL)
