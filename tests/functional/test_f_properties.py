"""normzoo.functional: jit / vmap / grad safety, check_grads in float64, invariances,
the large-mean precision contract, and one test per error message."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

import normzoo.functional as F
import reference

TOL = dict(rtol=2e-5, atol=2e-5)

def jjv(f, *args, **kwargs):
    """jax.jit(jax.vmap(...)): one compile instead of op-by-op batched dispatch."""
    return jax.jit(jax.vmap(f, *args, **kwargs))



def _x(rng, shape, loc=0.3, scale=1.5):
    return (loc + scale * rng.standard_normal(shape)).astype(np.float32)


# ---------------------------------------------------------------- jit / vmap
def test_jit_matches_eager(rng):
    x = _x(rng, (8, 6))
    stats = F.init_batch_stats((6,))
    y0, s0 = F.batch_norm(x, stats)
    y1, s1 = jax.jit(F.batch_norm, static_argnames=("train",))(x, stats, train=True)
    np.testing.assert_allclose(y0, y1, **TOL)
    np.testing.assert_allclose(s0["var"], s1["var"], **TOL)
    for fn in (F.layer_norm, F.rms_norm, F.instance_norm, F.standardize, F.center, F.scale):
        np.testing.assert_allclose(fn(x[:, None]), jax.jit(fn)(x[:, None]), **TOL)
    np.testing.assert_allclose(F.group_norm(x, num_groups=3),
                               jax.jit(lambda v: F.group_norm(v, num_groups=3))(x), **TOL)


def test_vmap_layer_norm_over_leading_axis(rng):
    x = _x(rng, (3, 4, 6))
    scale = (1 + 0.1 * rng.standard_normal(6)).astype(np.float32)
    y_v = jjv(lambda v: F.layer_norm(v, scale))(x)
    np.testing.assert_allclose(y_v, F.layer_norm(x, scale), **TOL)


def test_vmap_batch_norm_per_group_of_examples(rng):
    x = _x(rng, (3, 8, 6))
    stats = F.init_batch_stats((6,))
    y_v, s_v = jjv(lambda v: F.batch_norm(v, stats, momentum=0.0))(x)
    assert s_v["mean"].shape == (3, 6)
    for i in range(3):
        y_i, s_i = F.batch_norm(x[i], stats, momentum=0.0)
        np.testing.assert_allclose(y_v[i], y_i, **TOL)
        np.testing.assert_allclose(s_v["var"][i], s_i["var"], **TOL)


def test_vmap_axis_name_per_example_batch_norm_equals_full_batch(rng):
    # the classic Flax pattern: vmap over examples, statistics across the named axis
    x = _x(rng, (8, 6))
    stats = F.init_batch_stats((6,))
    y_v, s_v = jjv(lambda v: F.batch_norm(v, stats, axis_name="batch", momentum=0.5),
                        axis_name="batch")(x)
    y, s = F.batch_norm(x, stats, momentum=0.5)
    np.testing.assert_allclose(y_v, y, **TOL)
    np.testing.assert_allclose(s_v["var"], np.broadcast_to(s["var"], (8, 6)), **TOL)


def test_vmap_axis_name_masked_uneven_shards_are_exact(rng):
    # 4 "devices" x 5 rows; per-device kept counts differ (1 .. 5 rows)
    x = _x(rng, (4, 5, 3), loc=2.0)
    mask = np.zeros((4, 5, 1), bool)
    for d, n in enumerate([1, 2, 5, 3]):
        mask[d, :n] = True
    xn = np.where(mask, x, np.nan).astype(np.float32)
    stats = F.init_batch_stats((3,))
    y_v, s_v = jjv(lambda v, m: F.batch_norm(v, stats, mask=m, axis_name="d", momentum=0.0),
                        axis_name="d")(xn, mask)
    flat_x, flat_m = x.reshape(20, 3), mask.reshape(20, 1)
    mean, var = reference.moments(flat_x, (0,), flat_m)
    for d in range(4):
        np.testing.assert_allclose(s_v["mean"][d], mean.ravel(), **TOL)
        np.testing.assert_allclose(s_v["var"][d], var.ravel(), **TOL)
    ref = reference.standardize(flat_x, (0,), 1e-5, flat_m).reshape(4, 5, 3)
    sel = np.broadcast_to(mask, x.shape)
    np.testing.assert_allclose(np.asarray(y_v)[sel], ref[sel], **TOL)


def test_vmap_axis_name_moments_uneven_counts(rng):
    x = _x(rng, (4, 6, 2))
    mask = np.zeros((4, 6, 2), bool)
    for d, n in enumerate([6, 1, 3, 2]):
        mask[d, :n] = True
    for fast in (True, False):
        mean, var = jjv(lambda v, m: F.moments(v, 0, mask=m, axis_name="d", use_fast_variance=fast),
                             axis_name="d")(x, mask)
        rm, rv = reference.moments(x.reshape(24, 2), (0,), mask.reshape(24, 2))
        np.testing.assert_allclose(mean[0], rm.ravel(), **TOL)
        np.testing.assert_allclose(var[3], rv.ravel(), **TOL)


# ---------------------------------------------------------------- gradients
def _x64(shape, seed=0, loc=0.5):
    return loc + np.random.default_rng(seed).standard_normal(shape)


@pytest.mark.parametrize("name", ["standardize", "center", "scale", "layer_norm", "rms_norm",
                                  "instance_norm", "group_norm", "batch_norm"])
def test_check_grads_float64(name, x64):
    x = jnp.asarray(_x64((4, 3, 4)))
    s = jnp.asarray(1.0 + 0.1 * _x64((4,), 1, 0.0))
    b = jnp.asarray(0.1 * _x64((4,), 2, 0.0))
    fns = {
        "standardize": lambda x: F.standardize(x, (1, 2)),
        "center": lambda x: F.center(x, -1),
        "scale": lambda x: F.scale(x, (1, 2)),
        "layer_norm": lambda x, s, b: F.layer_norm(x, s, b),
        "rms_norm": lambda x, s: F.rms_norm(x, s),
        "instance_norm": lambda x, s, b: F.instance_norm(x, s, b),
        "group_norm": lambda x, s, b: F.group_norm(x, s, b, num_groups=2),
        "batch_norm": lambda x, s, b: F.batch_norm(x, F.init_batch_stats((4,)), s, b)[0],
    }
    fn = fns[name]
    nargs = fn.__code__.co_argcount
    fn = jax.jit(fn)  # one compile instead of op-by-op dispatch of every perturbed call
    args = (x, s, b)[:nargs]
    out = fn(*args)
    assert out.dtype == jnp.float64
    check_grads(fn, args, order=1, modes=("rev", "fwd"), atol=1e-5, rtol=1e-5)


def test_check_grads_second_order_standardize(x64):
    x = jnp.asarray(_x64((3, 5)))
    check_grads(jax.jit(lambda v: F.standardize(v, -1)), (x,), order=2, modes=("rev",), atol=1e-5, rtol=1e-5)


def test_check_grads_masked_batch_norm(x64):
    x = jnp.asarray(_x64((6, 3)))
    mask = np.random.default_rng(3).random((6, 3)) < 0.7
    mask[:2] = True
    check_grads(jax.jit(lambda v: F.batch_norm(v, F.init_batch_stats((3,)), mask=mask)[0] * mask),
                (x,), order=1, modes=("rev",), atol=1e-5, rtol=1e-5)


def test_grad_through_running_stats_is_finite(rng):
    x = _x(rng, (8, 4))

    def loss(x):
        y, s = F.batch_norm(x, F.init_batch_stats((4,)), momentum=0.9)
        return jnp.sum(y ** 3) + jnp.sum(s["var"]) + jnp.sum(s["mean"])

    g = jax.jit(jax.grad(loss))(x)
    assert np.all(np.isfinite(g))


# ---------------------------------------------------------------- invariance
@pytest.mark.parametrize("a,b", [(3.0, -2.0), (0.25, 5.0)])
def test_batch_norm_affine_invariance(rng, a, b):
    x = _x(rng, (16, 5))
    stats = F.init_batch_stats((5,))
    bn = jax.jit(lambda x: F.batch_norm(x, stats, epsilon=1e-10))
    y1, _ = bn(x)
    y2, _ = bn((a * x + b).astype(np.float32))
    np.testing.assert_allclose(y1, y2, rtol=1e-4, atol=1e-4)


def test_layer_norm_affine_invariance_per_sample(rng):
    x = _x(rng, (4, 16))
    a = np.array([[0.5], [2.0], [7.0], [1.0]], np.float32)
    b = np.array([[1.0], [-3.0], [0.0], [10.0]], np.float32)
    ln = jax.jit(lambda x: F.layer_norm(x, epsilon=1e-10))
    y1 = ln(x)
    y2 = ln(a * x + b)
    np.testing.assert_allclose(y1, y2, rtol=1e-4, atol=1e-4)


# ---------------------------------------------------------------- large mean (beats flax)
def _large(rng, shape, offset=1e4):
    return (offset + rng.standard_normal(shape)).astype(np.float32)


def _std_ok(y, axes):
    std = np.asarray(y, np.float64).std(axis=axes)
    np.testing.assert_allclose(std, 1.0, rtol=0.01)


def test_large_mean_moments_fast_variance(rng):
    x = _large(rng, (256, 16))
    mean, var = jax.jit(lambda x: F.moments(x, 0))(x)  # default use_fast_variance=True
    rm, rv = reference.moments(x, (0,))
    np.testing.assert_allclose(var, rv.ravel(), rtol=0.02)
    np.testing.assert_allclose(mean, rm.ravel(), rtol=1e-6)


def test_large_mean_batch_norm(rng):
    x = _large(rng, (256, 16))
    y, new = jax.jit(lambda x: F.batch_norm(x, F.init_batch_stats((16,)), momentum=0.0))(x)
    _std_ok(y, 0)
    _, rv = reference.moments(x, (0,))
    np.testing.assert_allclose(new["var"], rv.ravel(), rtol=0.02)


def test_large_mean_batch_norm_per_feature_offsets(rng):
    offsets = np.array([1e4, -3e4, 5e3, 2e4], np.float32)
    x = (offsets + rng.standard_normal((256, 4))).astype(np.float32)
    y, new = jax.jit(lambda x: F.batch_norm(x, F.init_batch_stats((4,)), momentum=0.0))(x)
    _std_ok(y, 0)
    np.testing.assert_allclose(new["var"], reference.moments(x, (0,))[1].ravel(), rtol=0.02)


def test_large_mean_layer_norm_and_group_norm(rng):
    x = _large(rng, (4, 8, 8, 16))
    _std_ok(jax.jit(lambda x: F.layer_norm(x, reduction_axes=(1, 2, 3)))(x), (1, 2, 3))
    y = np.asarray(jax.jit(lambda x: F.group_norm(x, num_groups=4))(x),
                   np.float64).reshape(4, 8, 8, 4, 4)
    _std_ok(y, (1, 2, 4))
    # per-sample offsets differ by orders of magnitude: a single global shift is not enough
    x2 = (np.array([1e4, -2e4, 3e3, 5e4], np.float32)[:, None]
          + rng.standard_normal((4, 256))).astype(np.float32)
    _std_ok(jax.jit(F.layer_norm)(x2), 1)
    _std_ok(jax.jit(lambda x: F.standardize(x, -1))(x2), 1)


def test_large_mean_with_mask(rng):
    x = _large(rng, (256, 4))
    mask = rng.random((256, 4)) < 0.5
    x = np.where(mask, x, np.nan).astype(np.float32)  # masked-out NaNs must not become the shift
    mean, var = jax.jit(lambda x, m: F.moments(x, 0, mask=m))(x, mask)
    rv = reference.moments(np.nan_to_num(x), (0,), mask)[1].ravel()
    np.testing.assert_allclose(var, rv, rtol=0.02)


# ---------------------------------------------------------------- errors (trace time, named)
def _raises(exc, *needles, fn):
    with pytest.raises(exc) as info:
        fn()
    msg = str(info.value)
    for n in needles:
        assert n in msg, f"{n!r} not in error message: {msg!r}"


def test_error_batch_norm_axis_out_of_range(rng):
    x = _x(rng, (8, 6))
    _raises(ValueError, "axis", "5", fn=lambda: F.batch_norm(x, F.init_batch_stats((6,)), axis=5))
    # at trace time, under jit
    _raises(ValueError, "axis", "5",
            fn=lambda: jax.jit(lambda v: F.batch_norm(v, F.init_batch_stats((6,)), axis=5))(x))


def test_error_moments_axes_out_of_range(rng):
    x = _x(rng, (8, 6))
    _raises(ValueError, "axes", "2", fn=lambda: F.moments(x, 2))
    _raises(ValueError, "-3", fn=lambda: F.standardize(x, -3))


def test_error_layer_norm_axes_out_of_range(rng):
    x = _x(rng, (2, 3, 4))
    _raises(ValueError, "reduction_axes", "3", fn=lambda: F.layer_norm(x, reduction_axes=3))
    _raises(ValueError, "feature_axes", "-4",
            fn=lambda: F.layer_norm(x, jnp.ones(2), feature_axes=-4))


def test_error_group_norm(rng):
    x = _x(rng, (2, 3, 8))
    _raises(ValueError, "num_groups", "3", fn=lambda: F.group_norm(x, num_groups=3))
    _raises(ValueError, "group_size", "3", fn=lambda: F.group_norm(x, num_groups=None, group_size=3))
    _raises(ValueError, "num_groups", "group_size", fn=lambda: F.group_norm(x, num_groups=2, group_size=4))
    _raises(ValueError, "num_groups", "group_size",
            fn=lambda: F.group_norm(x, num_groups=None, group_size=None))


def test_error_instance_norm_feature_axes_batch_axis(rng):
    x = _x(rng, (2, 3, 4))
    _raises(ValueError, "feature_axes", fn=lambda: F.instance_norm(x, feature_axes=0))
    _raises(ValueError, "feature_axes", fn=lambda: F.instance_norm(x, feature_axes=(-3, 1)))


def test_error_mask_shape(rng):
    x = _x(rng, (8, 6))
    bad = np.ones((8, 5), bool)
    _raises(ValueError, "mask", fn=lambda: F.moments(x, 0, mask=bad))
    _raises(ValueError, "mask", fn=lambda: F.batch_norm(x, F.init_batch_stats((6,)), mask=bad))
    _raises(ValueError, "mask", fn=lambda: F.layer_norm(x, mask=bad))


def test_error_integer_input():
    x = jnp.arange(48, dtype=jnp.int32).reshape(8, 6)
    with pytest.raises((TypeError, ValueError)) as info:
        F.batch_norm(x, F.init_batch_stats((6,)))
    msg = str(info.value)
    assert "int32" in msg and ("dtype" in msg or "x" in msg)
    with pytest.raises((TypeError, ValueError), match="int32"):
        F.layer_norm(x)
