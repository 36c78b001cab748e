"""normzoo.functional presets (batch_norm, layer_norm, rms_norm, group_norm, instance_norm)
against flax.linen modules holding the same parameters, and against float64 numpy."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import normzoo.functional as F
import reference

TOL = dict(rtol=2e-5, atol=2e-5)


def _x(rng, shape, loc=0.3, scale=1.7):
    return (loc + scale * rng.standard_normal(shape)).astype(np.float32)


def _jit(fn, *args, **static):
    """``fn(*args, **static)`` compiled as one program: eager, each of its many small ops
    would compile on its own."""
    return jax.jit(lambda *a: fn(*a, **static))(*args)


def _params(rng, shape):
    return (1.0 + 0.3 * rng.standard_normal(shape)).astype(np.float32), \
        (0.2 * rng.standard_normal(shape)).astype(np.float32)


# ---------------------------------------------------------------- batch_norm
def test_init_batch_stats():
    stats = F.init_batch_stats((6,))
    assert set(stats) == {"mean", "var"}
    assert stats["mean"].dtype == jnp.float32 and stats["var"].dtype == jnp.float32
    np.testing.assert_array_equal(stats["mean"], np.zeros(6))
    np.testing.assert_array_equal(stats["var"], np.ones(6))
    stats2 = F.init_batch_stats((3, 4))
    assert stats2["mean"].shape == (3, 4) and stats2["var"].shape == (3, 4)


@pytest.mark.parametrize("axis,shape", [(-1, (8, 6)), (-1, (4, 3, 3, 5)), ((1, 2), (4, 3, 2, 5)), (1, (4, 3, 5))])
@pytest.mark.parametrize("masked", [False, True])
def test_batch_norm_train_matches_flax(rng, axis, shape, masked):
    x = _x(rng, shape)
    axes = tuple(np.atleast_1d(axis) % len(shape))
    fshape = tuple(shape[a] for a in axes)
    scale, bias = _params(rng, fshape)
    stats = {"mean": (0.1 * rng.standard_normal(fshape)).astype(np.float32),
             "var": (1.0 + rng.random(fshape)).astype(np.float32)}
    mask = None
    if masked:
        mask = rng.random(shape) < 0.7
        mask[:2] = True
        x = np.where(mask, x, np.nan).astype(np.float32)
    y, new = _jit(F.batch_norm, x, stats, scale, bias, axis=axis, train=True, momentum=0.9,
                  mask=mask)
    mod = nn.BatchNorm(use_running_average=False, axis=axis, momentum=0.9)
    variables = {"params": {"scale": scale, "bias": bias}, "batch_stats": stats}
    y_ref, upd = _jit(mod.apply, variables, x, mask=mask, mutable=["batch_stats"])
    if mask is None:
        np.testing.assert_allclose(y, y_ref, **TOL)
    else:
        np.testing.assert_allclose(np.asarray(y)[mask], np.asarray(y_ref)[mask], **TOL)
    assert set(new) == {"mean", "var"}
    np.testing.assert_allclose(new["mean"], upd["batch_stats"]["mean"], **TOL)
    np.testing.assert_allclose(new["var"], upd["batch_stats"]["var"], **TOL)
    assert new["mean"].dtype == jnp.float32 and new["var"].dtype == jnp.float32


def test_batch_norm_train_numpy_equations(rng):
    x = _x(rng, (16, 3), loc=2.0)
    stats = F.init_batch_stats((3,))
    y, new = _jit(F.batch_norm, x, stats, train=True, momentum=0.8, epsilon=1e-3)
    np.testing.assert_allclose(y, reference.standardize(x, (0,), 1e-3), **TOL)
    mean, var = reference.moments(x, (0,))
    np.testing.assert_allclose(new["mean"], 0.2 * mean.ravel(), **TOL)
    np.testing.assert_allclose(new["var"], 0.8 + 0.2 * var.ravel(), **TOL)  # biased variance


def test_batch_norm_defaults_momentum_099_eps_1e5(rng):
    x = (3e-3 * rng.standard_normal((16, 3))).astype(np.float32)  # var ~ eps
    y, new = _jit(F.batch_norm, x, F.init_batch_stats((3,)))
    np.testing.assert_allclose(y, reference.standardize(x, (0,), 1e-5), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(new["mean"], 0.01 * x.mean(0), rtol=1e-4, atol=1e-9)


def test_batch_norm_eval_uses_running_stats_and_returns_them_unchanged(rng):
    x = _x(rng, (8, 6))
    scale, bias = _params(rng, (6,))
    stats = {"mean": rng.standard_normal(6).astype(np.float32),
             "var": (0.5 + rng.random(6)).astype(np.float32)}
    y, new = _jit(F.batch_norm, x, stats, scale, bias, train=False, epsilon=1e-5)
    ref = (x - stats["mean"]) / np.sqrt(stats["var"].astype(np.float64) + 1e-5) * scale + bias
    np.testing.assert_allclose(y, ref, **TOL)
    np.testing.assert_array_equal(new["mean"], stats["mean"])
    np.testing.assert_array_equal(new["var"], stats["var"])
    mod = nn.BatchNorm(use_running_average=True)
    y_ref = _jit(mod.apply, {"params": {"scale": scale, "bias": bias}, "batch_stats": stats}, x)
    np.testing.assert_allclose(y, y_ref, **TOL)


def test_batch_norm_running_stats_converge(rng):
    stats = F.init_batch_stats((2,))
    step = jax.jit(lambda x, s: F.batch_norm(x, s, momentum=0.5))
    x = None
    for _ in range(40):
        x = (np.array([3.0, -1.0]) + np.array([2.0, 0.5]) * rng.standard_normal((256, 2))).astype(np.float32)
        _, stats = step(x, stats)
    np.testing.assert_allclose(stats["mean"], [3.0, -1.0], atol=0.3)
    np.testing.assert_allclose(stats["var"], [4.0, 0.25], rtol=0.25)


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_batch_norm_half_precision_stats_float32(rng, dtype):
    x = jnp.asarray(_x(rng, (32, 4)), dtype)
    y, new = _jit(F.batch_norm, x, F.init_batch_stats((4,)), momentum=0.0)
    assert new["mean"].dtype == jnp.float32 and new["var"].dtype == jnp.float32
    xf = np.asarray(x.astype(jnp.float32))
    mean, var = reference.moments(xf, (0,))
    np.testing.assert_allclose(new["mean"], mean.ravel(), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(new["var"], var.ravel(), rtol=1e-5, atol=1e-5)
    tol = 2e-2 if dtype == jnp.bfloat16 else 3e-3
    np.testing.assert_allclose(np.asarray(y, np.float32), reference.standardize(xf, (0,), 1e-5), rtol=tol, atol=tol)


# ---------------------------------------------------------------- layer_norm / rms_norm
LN_CASES = [
    dict(reduction_axes=-1, feature_axes=-1),
    dict(reduction_axes=1, feature_axes=-1),
    dict(reduction_axes=(1, 2), feature_axes=-1),
    dict(reduction_axes=(1, 2, 3), feature_axes=(2, 3)),
    dict(reduction_axes=-2, feature_axes=(1, 3)),
]


@pytest.mark.parametrize("kw", LN_CASES)
def test_layer_norm_matches_flax(rng, kw):
    x = _x(rng, (2, 3, 4, 5))
    fa = tuple(np.atleast_1d(kw["feature_axes"]) % 4)
    scale, bias = _params(rng, tuple(x.shape[a] for a in fa))
    y = _jit(F.layer_norm, x, scale, bias, **kw)
    y_ref = _jit(nn.LayerNorm(**kw).apply, {"params": {"scale": scale, "bias": bias}}, x)
    np.testing.assert_allclose(y, y_ref, **TOL)


def test_layer_norm_defaults_numpy(rng):
    x = (1e-3 * rng.standard_normal((3, 7))).astype(np.float32)  # var ~ default eps 1e-6
    np.testing.assert_allclose(_jit(F.layer_norm, x), reference.standardize(x, (1,), 1e-6),
                               rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("use_fast_variance", [True, False])
def test_layer_norm_mask_matches_flax(rng, use_fast_variance):
    x = _x(rng, (3, 4, 5))
    mask = rng.random(x.shape) < 0.6
    mask[..., :2] = True
    x = np.where(mask, x, np.nan).astype(np.float32)
    scale, bias = _params(rng, (5,))
    y = _jit(F.layer_norm, x, scale, bias, mask=mask, use_fast_variance=use_fast_variance)
    y_ref = _jit(nn.LayerNorm(use_fast_variance=use_fast_variance).apply,
                 {"params": {"scale": scale, "bias": bias}}, x, mask=mask)
    np.testing.assert_allclose(np.asarray(y)[mask], np.asarray(y_ref)[mask], **TOL)


@pytest.mark.parametrize("kw", [dict(reduction_axes=-1), dict(reduction_axes=1, feature_axes=-1),
                                dict(reduction_axes=(1, 2), feature_axes=(1, 2))])
def test_rms_norm_matches_flax(rng, kw):
    x = _x(rng, (2, 3, 4))
    fa = tuple(np.atleast_1d(kw.get("feature_axes", -1)) % 3)
    scale, _ = _params(rng, tuple(x.shape[a] for a in fa))
    y = _jit(F.rms_norm, x, scale, **kw)
    y_ref = _jit(nn.RMSNorm(**kw).apply, {"params": {"scale": scale}}, x)
    np.testing.assert_allclose(y, y_ref, **TOL)
    y_noscale = _jit(F.rms_norm, x, None, **kw)
    y_ref = _jit(nn.RMSNorm(use_scale=False, **kw).apply, {}, x)
    np.testing.assert_allclose(y_noscale, y_ref, **TOL)


def test_rms_norm_mask_matches_flax(rng):
    x = _x(rng, (3, 4, 5))
    mask = rng.random(x.shape) < 0.6
    mask[..., :1] = True
    x = np.where(mask, x, np.nan).astype(np.float32)
    y = _jit(F.rms_norm, x, None, mask=mask)
    y_ref = _jit(nn.RMSNorm(use_scale=False).apply, {}, x, mask=mask)
    np.testing.assert_allclose(np.asarray(y)[mask], np.asarray(y_ref)[mask], **TOL)
    z = np.square(np.asarray(y, np.float64)).mean(-1, where=mask)
    np.testing.assert_allclose(z, 1.0, atol=1e-4)


# ---------------------------------------------------------------- group_norm
@pytest.mark.parametrize("kw", [dict(num_groups=2), dict(num_groups=8), dict(num_groups=1),
                                dict(num_groups=None, group_size=2), dict(num_groups=None, group_size=1)])
def test_group_norm_matches_flax(rng, kw):
    x = _x(rng, (2, 3, 3, 8))
    scale, bias = _params(rng, (8,))
    y = _jit(F.group_norm, x, scale, bias, **kw)
    y_ref = _jit(nn.GroupNorm(**kw).apply, {"params": {"scale": scale, "bias": bias}}, x)
    np.testing.assert_allclose(y, y_ref, **TOL)


def test_group_norm_numpy_and_default_32_groups(rng):
    x = _x(rng, (2, 5, 64))
    np.testing.assert_allclose(_jit(F.group_norm, x, epsilon=1e-5),
                               reference.group_norm(x, 32, eps=1e-5), **TOL)
    np.testing.assert_allclose(_jit(F.group_norm, x, num_groups=4, epsilon=1e-5),
                               reference.group_norm(x, 4, eps=1e-5), **TOL)


def test_group_norm_explicit_reduction_axes_matches_flax(rng):
    x = _x(rng, (2, 3, 4, 8))
    scale, bias = _params(rng, (8,))
    for red in [(0, 1, 3), (-3, -2, -1)]:
        y = _jit(F.group_norm, x, scale, bias, num_groups=2, reduction_axes=red)
        y_ref = _jit(nn.GroupNorm(num_groups=2, reduction_axes=red).apply,
                     {"params": {"scale": scale, "bias": bias}}, x)
        np.testing.assert_allclose(y, y_ref, **TOL)


def test_group_norm_mask_matches_flax(rng):
    x = _x(rng, (5, 3, 12))
    mask = rng.random(x.shape) < 0.6
    mask[..., :2] = True
    mask[..., 6:8] = True
    x = np.where(mask, x, np.nan).astype(np.float32)
    y = _jit(F.group_norm, x, None, None, num_groups=2, mask=mask)
    y_ref = _jit(nn.GroupNorm(num_groups=2, use_bias=False, use_scale=False).apply, {}, x,
                 mask=mask)
    np.testing.assert_allclose(np.asarray(y)[mask], np.asarray(y_ref)[mask], **TOL)


# ---------------------------------------------------------------- instance_norm
@pytest.mark.parametrize("feature_axes", [-1, (1, 2), (1, 3), (1, 2, 3)])
def test_instance_norm_matches_flax(rng, feature_axes):
    x = _x(rng, (2, 3, 4, 5))
    fa = tuple(np.atleast_1d(feature_axes) % 4)
    scale, bias = _params(rng, tuple(x.shape[a] for a in fa))
    y = _jit(F.instance_norm, x, scale, bias, feature_axes=feature_axes)
    y_ref = _jit(nn.InstanceNorm(feature_axes=feature_axes).apply,
                 {"params": {"scale": scale, "bias": bias}}, x)
    np.testing.assert_allclose(y, y_ref, **TOL)


def test_instance_norm_numpy(rng):
    x = _x(rng, (2, 4, 4, 3))
    np.testing.assert_allclose(_jit(F.instance_norm, x, epsilon=1e-5),
                               reference.standardize(x, (1, 2), 1e-5), **TOL)


# ---------------------------------------------------------------- equivalences (no parameters)
def test_presets_equivalences(rng):
    x = _x(rng, (2, 3, 4, 6))
    ln_all = _jit(F.layer_norm, x, reduction_axes=(1, 2, 3))
    np.testing.assert_allclose(_jit(F.group_norm, x, num_groups=1), ln_all, **TOL)
    inorm = _jit(F.instance_norm, x)
    np.testing.assert_allclose(_jit(F.group_norm, x, num_groups=None, group_size=1), inorm,
                               **TOL)
    np.testing.assert_allclose(_jit(F.layer_norm, x, reduction_axes=(1, 2)), inorm, **TOL)
