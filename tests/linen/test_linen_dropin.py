"""normzoo's BatchNorm / LayerNorm / GroupNorm / InstanceNorm / RMSNorm are drop-in for
flax.linen's: same fields and defaults, call signature, variables, outputs, running stats,
gradients. Covers the cases of flax's own NormalizationTest (tests/linen/linen_test.py)."""

import dataclasses
import inspect

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import normzoo
import reference
from linen_helpers import DROPIN, TOL, assert_trees_equal, init_both


def _x(rng, shape, loc=0.3, scale=1.5, dtype=np.float32):
    return (loc + scale * rng.standard_normal(shape)).astype(dtype)


def _fields(cls):
    return {f.name: f.default for f in dataclasses.fields(cls)
            if f.name not in ("parent", "name")}


# ---------------------------------------------------------------- API surface
#: Fields normzoo adds after flax's (a default that keeps flax's behaviour).
EXTRA_FIELDS = {"BatchNorm": {"virtual_batch_size": None, "unbiased_running_var": False,
                              "estimator": "ema"}}


@pytest.mark.parametrize("name", DROPIN)
def test_same_fields_and_defaults(name):
    ours, theirs = _fields(getattr(normzoo, name)), _fields(getattr(nn, name))
    # flax's fields first, in flax's order (positional construction works), then the extras
    assert list(ours)[: len(theirs)] == list(theirs), "field names/order differ"
    assert {k: ours[k] for k in list(ours)[len(theirs):]} == EXTRA_FIELDS.get(name, {})
    for k in theirs:
        a, b = ours[k], theirs[k]
        if callable(b) and not isinstance(b, type):
            # initializers: same behaviour
            assert np.array_equal(a(jax.random.key(0), (3,)), b(jax.random.key(0), (3,))), k
        else:
            assert a == b or (a is b), (k, a, b)


@pytest.mark.parametrize("name", DROPIN)
def test_same_call_signature(name):
    ours = inspect.signature(getattr(normzoo, name).__call__)
    theirs = inspect.signature(getattr(nn, name).__call__)
    assert [(p.name, p.kind, p.default) for p in ours.parameters.values()] == \
        [(p.name, p.kind, p.default) for p in theirs.parameters.values()]


def test_positional_construction():
    # fields are dataclass fields in flax's order, so positional args mean the same
    ref, nz = nn.GroupNorm(4, None, 1e-3), normzoo.GroupNorm(4, None, 1e-3)
    assert (nz.num_groups, nz.group_size, nz.epsilon) == (ref.num_groups, ref.group_size, ref.epsilon)


# ---------------------------------------------------------------- variables
VAR_CASES = [
    ("BatchNorm", (4, 3, 5), dict(use_running_average=False)),
    ("BatchNorm", (4, 3, 5), dict(use_running_average=False, axis=(1, 2))),
    ("BatchNorm", (4, 5), dict(use_running_average=False, param_dtype=jnp.bfloat16)),
    ("BatchNorm", (4, 5), dict(use_running_average=False, param_dtype=jnp.bfloat16,
                               force_float32_reductions=False)),
    ("LayerNorm", (2, 3, 4, 5), dict()),
    ("LayerNorm", (2, 3, 4, 5), dict(reduction_axes=(1, 2, 3), feature_axes=(2, 3), use_scale=False)),
    ("GroupNorm", (2, 3, 8), dict(num_groups=4)),
    ("GroupNorm", (2, 3, 8), dict(num_groups=None, group_size=2, use_bias=False)),
    ("InstanceNorm", (2, 3, 4, 5), dict(feature_axes=(1, 3))),
    ("RMSNorm", (2, 3, 4), dict()),
    ("RMSNorm", (2, 3, 4), dict(use_scale=False)),
]


@pytest.mark.parametrize("name,shape,kw", VAR_CASES)
def test_same_variables(rng, name, shape, kw):
    x = _x(rng, shape)
    _, _, v_ref, v_nz = init_both(name, x, **kw)
    assert_trees_equal(v_ref, v_nz, exact=True)


def test_same_variables_with_random_initializers(rng):
    x = _x(rng, (2, 3, 4, 5))
    inits = dict(bias_init=nn.initializers.uniform(), scale_init=nn.initializers.normal())
    for name, kw in [("BatchNorm", dict(use_running_average=False)), ("LayerNorm", {}),
                     ("GroupNorm", dict(num_groups=5)), ("InstanceNorm", {})]:
        _, _, v_ref, v_nz = init_both(name, x, key=7, **kw, **inits)
        assert_trees_equal(v_ref, v_nz, exact=True)
    _, _, v_ref, v_nz = init_both("RMSNorm", x, key=7, scale_init=nn.initializers.normal())
    assert_trees_equal(v_ref, v_nz, exact=True)


def test_init_with_output_and_tabulate_shapes(rng):
    x = _x(rng, (4, 6))
    y, v = normzoo.BatchNorm(use_running_average=False).init_with_output(jax.random.key(0), x)
    assert y.shape == x.shape and y.dtype == x.dtype
    assert jax.tree_util.tree_map(jnp.shape, v) == {
        "params": {"scale": (6,), "bias": (6,)}, "batch_stats": {"mean": (6,), "var": (6,)}}


# ---------------------------------------------------------------- BatchNorm numbers
def _random_variables(rng, v):
    """Perturb initial variables so scale/bias/running stats are not trivial."""
    def perturb(path, a):
        key = jax.tree_util.keystr(path)
        noise = 0.3 * rng.standard_normal(a.shape)
        if "var" in key or "scale" in key:
            return jnp.asarray(1.0 + np.abs(noise), a.dtype)
        return jnp.asarray(noise, a.dtype)
    return jax.tree_util.tree_map_with_path(perturb, v)


@pytest.mark.parametrize("shape,axis", [((8, 6), -1), ((4, 3, 3, 5), -1), ((4, 3, 2, 5), (1, 2)),
                                        ((4, 5, 3), 1), ((4, 5, 3), (-1, -2))])
@pytest.mark.parametrize("use_fast_variance", [True, False])
def test_batch_norm_train_and_eval_match_flax(rng, shape, axis, use_fast_variance):
    x = _x(rng, shape)
    kw = dict(axis=axis, momentum=0.9, use_fast_variance=use_fast_variance)
    ref, nz, v_ref, v_nz = init_both("BatchNorm", x, call_kwargs=dict(use_running_average=False), **kw)
    v = _random_variables(rng, v_ref)
    y_ref, u_ref = ref.apply(v, x, use_running_average=False, mutable=["batch_stats"])
    y_nz, u_nz = nz.apply(v, x, use_running_average=False, mutable=["batch_stats"])
    np.testing.assert_allclose(y_nz, y_ref, **TOL)
    assert_trees_equal(u_ref, u_nz, exact=False)
    # eval: running averages, no update
    v_next = {"params": v["params"], **u_ref}
    e_ref = ref.apply(v_next, x, use_running_average=True)
    e_nz = nz.apply(v_next, x, use_running_average=True)
    np.testing.assert_allclose(e_nz, e_ref, **TOL)


@pytest.mark.parametrize("test_mask", [False, True])
def test_batch_norm_flax_checklist(rng, test_mask):
    # output moments 0/1 and EMA with momentum 0.9 from zero/one init, with and without mask
    x = _x(rng, (4, 3, 2))
    m = None
    if test_mask:
        m = rng.integers(0, 2, (4, 3, 1)).astype(bool)
        m[0, :2] = True
        x = np.where(m, x, np.nan).astype(np.float32)
    layer = normzoo.BatchNorm(momentum=0.9, use_running_average=False)
    y, v = layer.init_with_output(jax.random.key(1), x, mask=m)
    y64 = np.asarray(y, np.float64)
    w = np.broadcast_to(m, x.shape) if m is not None else np.ones(x.shape, bool)
    np.testing.assert_allclose(np.mean(y64, (0, 1), where=w), 0.0, atol=1e-4)
    np.testing.assert_allclose(np.var(y64, (0, 1), where=w), 1.0, rtol=1e-4)
    # init does not update the running stats
    np.testing.assert_array_equal(v["batch_stats"]["mean"], np.zeros(2))
    np.testing.assert_array_equal(v["batch_stats"]["var"], np.ones(2))
    _, upd = layer.apply(v, x, mask=m, mutable=["batch_stats"])
    mean, var = reference.moments(np.nan_to_num(x), (0, 1), m)
    np.testing.assert_allclose(upd["batch_stats"]["mean"], 0.1 * mean.ravel(), atol=1e-5)
    np.testing.assert_allclose(upd["batch_stats"]["var"], 0.9 + 0.1 * var.ravel(), rtol=1e-5)


def test_batch_norm_mask_matches_flax(rng):
    x = _x(rng, (6, 4, 3))
    m = rng.random((6, 4, 3)) < 0.6
    m[:2] = True
    xn = np.where(m, x, np.nan).astype(np.float32)
    ref, nz, v, _ = init_both("BatchNorm", xn, call_kwargs=dict(mask=m), use_running_average=False)
    v = _random_variables(rng, v)
    y_ref, u_ref = ref.apply(v, xn, mask=m, mutable=["batch_stats"])
    y_nz, u_nz = nz.apply(v, xn, mask=m, mutable=["batch_stats"])
    np.testing.assert_allclose(np.asarray(y_nz)[m], np.asarray(y_ref)[m], **TOL)
    assert_trees_equal(u_ref, u_nz, exact=False)
    assert np.all(np.isfinite(u_nz["batch_stats"]["var"]))


def test_batch_norm_complex(rng):
    x = (rng.standard_normal((4, 3, 2)) + 1j * rng.standard_normal((4, 3, 2))).astype(np.complex64)
    layer = normzoo.BatchNorm(momentum=0.9, use_running_average=False, dtype=jnp.complex64)
    y, v = layer.init_with_output(jax.random.key(0), x)
    assert y.dtype == jnp.complex64
    np.testing.assert_allclose(np.mean(np.asarray(y), (0, 1)), 0.0, atol=1e-4)
    np.testing.assert_allclose(np.var(np.asarray(y), (0, 1)), 1.0, rtol=1e-4)
    _, upd = layer.apply(v, x, mutable=["batch_stats"])
    # as flax's own checklist: the running mean keeps the complex batch mean (no silent
    # dropping of the imaginary part); the variance E|x - mu|^2 is real
    np.testing.assert_allclose(upd["batch_stats"]["mean"], 0.1 * x.mean((0, 1)), atol=1e-4)
    np.testing.assert_allclose(upd["batch_stats"]["var"], 0.9 + 0.1 * x.var((0, 1)), rtol=1e-4)


def test_batch_norm_use_running_average_merge_rules(rng):
    x = _x(rng, (4, 3))
    v = normzoo.BatchNorm(use_running_average=True).init(jax.random.key(0), x)
    # call-time value overrides a None field; constructor value used when the call passes None
    y1 = normzoo.BatchNorm().apply(v, x, True)
    y2 = normzoo.BatchNorm(use_running_average=True).apply(v, x)
    np.testing.assert_array_equal(y1, y2)
    for ours, theirs in [(normzoo.BatchNorm(), nn.BatchNorm()),
                         (normzoo.BatchNorm(use_running_average=True), nn.BatchNorm(use_running_average=True))]:
        args = () if ours.use_running_average is None else (False,)
        with pytest.raises(ValueError):
            theirs.apply(v, x, *args)
        with pytest.raises(ValueError):
            ours.apply(v, x, *args)


def test_batch_norm_eval_needs_no_mutable(rng):
    x = _x(rng, (4, 3))
    layer = normzoo.BatchNorm(use_running_average=True)
    v = layer.init(jax.random.key(0), x)
    y = layer.apply(v, x)  # no mutable=...: must not try to write batch_stats
    np.testing.assert_allclose(y, x / np.sqrt(1 + 1e-5), **TOL)


def test_batch_norm_multi_init_with_axis_name(rng):
    # axis_name is ignored during init, so a model can be initialized outside vmap/shard_map
    class Foo(nn.Module):
        @nn.compact
        def __call__(self, x):
            norm = normzoo.BatchNorm(name="norm", use_running_average=False, axis_name="batch")
            x = norm(x)
            return x, norm(x)

    x = _x(rng, (2, 4))
    (y1, y2), v = Foo().init_with_output(jax.random.key(0), x)
    np.testing.assert_allclose(y1, y2, rtol=0.005, atol=1e-3)
    assert set(v["batch_stats"]["norm"]) == {"mean", "var"}


def test_batch_norm_shared_instance_updates_twice(rng):
    class Twice(nn.Module):
        @nn.compact
        def __call__(self, x, cls):
            bn = cls(use_running_average=False, momentum=0.5)
            return bn(bn(x))

    x = _x(rng, (8, 3), loc=2.0)
    outs = []
    for cls in (nn.BatchNorm, normzoo.BatchNorm):
        v = Twice().init(jax.random.key(0), x, cls)
        outs.append(Twice().apply(v, x, cls, mutable=["batch_stats"]))
    np.testing.assert_allclose(outs[1][0], outs[0][0], **TOL)
    assert_trees_equal(outs[0][1], outs[1][1], exact=False)


# ---------------------------------------------------------------- LayerNorm / RMSNorm
LN_CASES = [
    dict(reduction_axes=-1), dict(reduction_axes=1), dict(reduction_axes=(1, 2)),
    dict(reduction_axes=(0, 1, 2)), dict(reduction_axes=-1, use_fast_variance=False),
    dict(reduction_axes=(1, 2), feature_axes=(1, 2)), dict(reduction_axes=-2, feature_axes=(0, 2)),
]


@pytest.mark.parametrize("kw", LN_CASES)
def test_layer_norm_matches_flax(rng, kw):
    x = _x(rng, (2, 3, 4))
    ref, nz, v, v_nz = init_both("LayerNorm", x, **kw)
    assert_trees_equal(v, v_nz)
    v = _random_variables(rng, v)
    y = nz.apply(v, x)
    assert y.dtype == x.dtype and y.shape == x.shape
    np.testing.assert_allclose(y, ref.apply(v, x), **TOL)


@pytest.mark.parametrize("reduction_axes", [-1, 1, (1, 2), (0, 1, 2)])
def test_layer_norm_one_liner(rng, reduction_axes):
    x = _x(rng, (2, 3, 4))
    layer = normzoo.LayerNorm(use_bias=False, use_scale=False, epsilon=1e-5, reduction_axes=reduction_axes)
    y, _ = layer.init_with_output(jax.random.key(0), x)
    ax = tuple(np.atleast_1d(reduction_axes) % 3)
    np.testing.assert_allclose(y, reference.standardize(x, ax, 1e-5), **TOL)


def test_layer_norm_huge_offset_two_pass(rng):
    # flax's checklist: x + 1e6 with use_fast_variance=False against the float32 one-liner
    # (at 1e6 one float32 ulp is 0.0625, so only the same float32 arithmetic agrees to 1e-3)
    x = jnp.asarray(_x(rng, (2, 3, 4), loc=0.0, scale=1.0)) + 1e6
    layer = normzoo.LayerNorm(use_bias=False, use_scale=False, epsilon=1e-5, use_fast_variance=False)
    y, _ = layer.init_with_output(jax.random.key(0), x)
    one_liner = (x - x.mean(-1, keepdims=True)) * jax.lax.rsqrt(x.var(-1, keepdims=True) + 1e-5)
    np.testing.assert_allclose(y, one_liner, atol=1e-3, rtol=1e-3)


@pytest.mark.parametrize("use_fast_variance", [False, True])
def test_layer_norm_large_offset_float64_reference(rng, use_fast_variance):
    # |mean| = 1e4 >> std = 1: both paths within float32's representation limit
    # (ulp(1e4) ~ 1e-3) of the float64 truth on the same float32 data
    x = (_x(rng, (2, 3, 64), loc=0.0, scale=1.0).astype(np.float64) + 1e4).astype(np.float32)
    layer = normzoo.LayerNorm(use_bias=False, use_scale=False, epsilon=1e-5,
                              use_fast_variance=use_fast_variance)
    y, _ = layer.init_with_output(jax.random.key(0), x)
    np.testing.assert_allclose(y, reference.standardize(x, (2,), 1e-5), atol=3e-3, rtol=3e-3)


def test_layer_norm_mask(rng):
    x = _x(rng, (3, 4, 5))
    m = rng.random(x.shape) < 0.5
    m[..., :2] = True
    xn = np.where(m, x, np.nan).astype(np.float32)
    y, v = normzoo.LayerNorm().init_with_output(jax.random.key(0), xn, mask=m)
    y64 = np.asarray(y, np.float64)
    np.testing.assert_allclose(np.mean(y64, -1, where=m), 0.0, atol=1e-4)
    np.testing.assert_allclose(np.var(y64, -1, where=m), 1.0, atol=1e-4)
    y_ref = nn.LayerNorm().apply(v, xn, mask=m)
    np.testing.assert_allclose(np.asarray(y)[m], np.asarray(y_ref)[m], **TOL)


@pytest.mark.parametrize("kw", [dict(reduction_axes=-1), dict(reduction_axes=1), dict(reduction_axes=(1, 2)),
                                dict(reduction_axes=(1, 2), feature_axes=(1, 2)), dict(use_scale=False)])
def test_rms_norm_matches_flax(rng, kw):
    x = _x(rng, (2, 3, 4))
    ref, nz, v, v_nz = init_both("RMSNorm", x, **kw)
    assert_trees_equal(v, v_nz)
    v = _random_variables(rng, v)
    np.testing.assert_allclose(nz.apply(v, x), ref.apply(v, x), **TOL)


def test_rms_norm_one_liner_and_mask(rng):
    x = _x(rng, (2, 3, 4))
    for red in (-1, 1, (1, 2)):
        y, _ = normzoo.RMSNorm(use_scale=False, epsilon=1e-5, reduction_axes=red).init_with_output(
            jax.random.key(0), x)
        ms = np.mean(np.asarray(x, np.float64) ** 2, axis=red, keepdims=True)
        np.testing.assert_allclose(y, x / np.sqrt(ms + 1e-5), **TOL)
    x = _x(rng, (3, 4, 5))
    m = rng.random(x.shape) < 0.5
    m[..., :1] = True
    xn = np.where(m, x, np.nan).astype(np.float32)
    y, _ = normzoo.RMSNorm().init_with_output(jax.random.key(0), xn, mask=m)
    np.testing.assert_allclose(np.mean(np.square(np.asarray(y, np.float64)), -1, where=m), 1.0, atol=1e-4)


# ---------------------------------------------------------------- GroupNorm
@pytest.mark.parametrize("kw", [dict(num_groups=2), dict(num_groups=8), dict(num_groups=1),
                                dict(num_groups=None, group_size=4), dict(num_groups=None, group_size=1),
                                dict(num_groups=2, use_fast_variance=False)])
def test_group_norm_matches_flax(rng, kw):
    x = _x(rng, (2, 3, 3, 8))
    ref, nz, v, v_nz = init_both("GroupNorm", x, **kw)
    assert_trees_equal(v, v_nz)
    v = _random_variables(rng, v)
    np.testing.assert_allclose(nz.apply(v, x), ref.apply(v, x), **TOL)


def test_group_norm_one_liner(rng):
    x = _x(rng, (2, 5, 4, 4, 32))
    y, _ = normzoo.GroupNorm(num_groups=2, use_bias=False, use_scale=False, epsilon=1e-5).init_with_output(
        jax.random.key(0), x)
    assert y.dtype == x.dtype and y.shape == x.shape
    ref = reference.standardize(x.reshape(2, 5, 4, 4, 2, 16), (1, 2, 3, 5), 1e-5).reshape(x.shape)
    np.testing.assert_allclose(y, ref, **TOL)


def test_group_norm_unbatched_reduction_axes(rng):
    x = _x(rng, (2, 5, 4, 4, 8))
    layer = normzoo.GroupNorm(num_groups=2, use_bias=False, use_scale=False, epsilon=1e-5,
                              reduction_axes=(0, 1, 3, 4))
    y, _ = layer.init_with_output(jax.random.key(0), x)
    ref = reference.standardize(x.reshape(2, 5, 4, 4, 2, 4), (0, 1, 3, 5), 1e-5).reshape(x.shape)
    np.testing.assert_allclose(y, ref, **TOL)


def test_group_norm_batched_negative_reduction_axes(rng):
    # init on (3, 4, C), apply on a stack (5, 3, 4, C): negative axes keep meaning
    x = _x(rng, (3, 4, 8))
    layer = normzoo.GroupNorm(num_groups=2, use_bias=False, use_scale=False, epsilon=1e-5,
                              reduction_axes=(-3, -2, -1))
    y, v = layer.init_with_output(jax.random.key(0), x)
    xs = np.stack([x] * 5)
    ys = layer.apply(v, xs)
    np.testing.assert_allclose(y, ys[0], **TOL)
    ref = reference.standardize(xs.reshape(5, 3, 4, 2, 4), (1, 2, 4), 1e-5).reshape(xs.shape)
    np.testing.assert_allclose(ys, ref, **TOL)


def test_group_norm_mask(rng):
    x = _x(rng, (5, 3, 4, 12))
    m = rng.random(x.shape) < 0.5
    m[..., :2] = True
    m[..., 6:8] = True
    xn = np.where(m, x, np.nan).astype(np.float32)
    layer = normzoo.GroupNorm(2, use_bias=False, use_scale=False)
    y, _ = layer.init_with_output(jax.random.key(0), xn, mask=m)
    yr, mr = np.asarray(y, np.float64).reshape(5, 3, 4, 2, 6), m.reshape(5, 3, 4, 2, 6)
    np.testing.assert_allclose(np.mean(yr, (1, 2, 4), where=mr), 0.0, atol=1e-4)
    np.testing.assert_allclose(np.var(yr, (1, 2, 4), where=mr), 1.0, atol=1e-4)
    y_ref = nn.GroupNorm(2, use_bias=False, use_scale=False).apply({}, xn, mask=m)
    np.testing.assert_allclose(np.asarray(y)[m], np.asarray(y_ref)[m], **TOL)


# ---------------------------------------------------------------- InstanceNorm
@pytest.mark.parametrize("feature_axes,fast", [(-1, True), ((1, 2), True), ((1, 2, 3), True), (-1, False)])
def test_instance_norm(rng, feature_axes, fast):
    x = _x(rng, (2, 3, 4, 5))
    if not fast:
        x = x + np.float32(1e4)
    kw = dict(use_bias=False, use_scale=False, epsilon=1e-5, feature_axes=feature_axes,
              use_fast_variance=fast)
    y, _ = normzoo.InstanceNorm(**kw).init_with_output(jax.random.key(0), x)
    assert y.dtype == x.dtype and y.shape == x.shape
    fa = set(np.atleast_1d(feature_axes) % 4)
    red = tuple(i for i in range(1, 4) if i not in fa)
    ref = reference.standardize(x, red, 1e-5)
    # +1e4: float32 resolves x only to ~1e-3, the two-pass mean is exact to about that
    np.testing.assert_allclose(y, ref, atol=3e-3 if not fast else 2e-5, rtol=3e-3 if not fast else 2e-5)
    if fast:
        ref_mod, nz, v, v_nz = init_both("InstanceNorm", x, feature_axes=feature_axes)
        assert_trees_equal(v, v_nz)
        v = _random_variables(rng, v)
        np.testing.assert_allclose(nz.apply(v, x), ref_mod.apply(v, x), **TOL)


def test_instance_norm_mask_matches_flax(rng):
    x = _x(rng, (2, 4, 4, 3))
    m = rng.random(x.shape) < 0.6
    m[:, :2, 0] = True
    xn = np.where(m, x, np.nan).astype(np.float32)
    y = normzoo.InstanceNorm().apply({"params": {"scale": jnp.ones(3), "bias": jnp.zeros(3)}}, xn, mask=m)
    y_ref = nn.InstanceNorm().apply({"params": {"scale": jnp.ones(3), "bias": jnp.zeros(3)}}, xn, mask=m)
    np.testing.assert_allclose(np.asarray(y)[m], np.asarray(y_ref)[m], **TOL)


# ---------------------------------------------------------------- equivalences (flax checklist)
U = dict(bias_init=nn.initializers.uniform(), scale_init=nn.initializers.uniform())
EQUIV = [
    (("LayerNorm", dict(feature_axes=(1, 2))), ("InstanceNorm", dict(feature_axes=(1, 2)))),
    (("LayerNorm", dict(reduction_axes=(1, 2), feature_axes=-1)), ("InstanceNorm", dict(feature_axes=-1))),
    (("LayerNorm", dict(reduction_axes=-2, feature_axes=(1, 3), **U)), ("InstanceNorm", dict(feature_axes=(1, -1), **U))),
    (("LayerNorm", dict(reduction_axes=(1, 2, 3), **U)), ("GroupNorm", dict(num_groups=1, **U))),
    (("InstanceNorm", dict(**U)), ("GroupNorm", dict(num_groups=None, group_size=1, **U))),
]


@pytest.mark.parametrize("first,second", EQUIV)
def test_normalization_equivalences(first, second):
    x = jax.random.normal(jax.random.key(0), (2, 3, 4, 5))
    l1, l2 = getattr(normzoo, first[0])(**first[1]), getattr(normzoo, second[0])(**second[1])
    v1, v2 = l1.init(jax.random.key(1), x), l2.init(jax.random.key(1), x)
    assert_trees_equal(v1, v2, exact=True)
    np.testing.assert_allclose(l1.apply(v1, x), l2.apply(v2, x), atol=1e-6)


# ---------------------------------------------------------------- dtypes
DTYPE_CASES = [
    (jnp.bfloat16, None, jnp.float32), (jnp.float16, jnp.float16, jnp.float16),
    (jnp.float32, jnp.bfloat16, jnp.float32), (jnp.bfloat16, None, jnp.bfloat16),
]


@pytest.mark.parametrize("name", DROPIN)
@pytest.mark.parametrize("x_dtype,dtype,param_dtype", DTYPE_CASES)
def test_dtypes_match_flax(rng, name, x_dtype, dtype, param_dtype):
    x = jnp.asarray(_x(rng, (8, 2, 8)), x_dtype)
    kw = dict(dtype=dtype, param_dtype=param_dtype)
    call = {}
    if name == "BatchNorm":
        kw["use_running_average"] = False
    if name == "GroupNorm":
        kw["num_groups"] = 4
    ref, nz, v_ref, v_nz = init_both(name, x, **kw)
    assert_trees_equal(v_ref, v_nz, exact=True)
    mutable = ["batch_stats"] if name == "BatchNorm" else False
    out_ref = ref.apply(v_ref, x, mutable=mutable, **call)
    out_nz = nz.apply(v_ref, x, mutable=mutable, **call)
    y_ref, y_nz = (out_ref[0], out_nz[0]) if mutable else (out_ref, out_nz)
    assert y_nz.dtype == y_ref.dtype, (y_nz.dtype, y_ref.dtype)
    tol = 2e-2 if jnp.bfloat16 in (x_dtype, dtype, param_dtype, y_ref.dtype) else 4e-3
    np.testing.assert_allclose(np.asarray(y_nz, np.float32), np.asarray(y_ref, np.float32), rtol=tol, atol=tol)
    if mutable:
        for k in ("mean", "var"):
            assert out_nz[1]["batch_stats"][k].dtype == jnp.float32
            np.testing.assert_allclose(out_nz[1]["batch_stats"][k], out_ref[1]["batch_stats"][k], **TOL)


@pytest.mark.parametrize("x_dtype", [jnp.bfloat16, jnp.float16])
def test_force_float32_reductions_false_matches_flax_dtypes(rng, x_dtype):
    x = jnp.asarray(_x(rng, (16, 4)), x_dtype)
    kw = dict(use_running_average=False, force_float32_reductions=False, param_dtype=x_dtype, dtype=x_dtype)
    ref, nz, v_ref, v_nz = init_both("BatchNorm", x, **kw)
    assert_trees_equal(v_ref, v_nz, exact=True)
    y_ref, u_ref = ref.apply(v_ref, x, mutable=["batch_stats"])
    y_nz, u_nz = nz.apply(v_ref, x, mutable=["batch_stats"])
    assert y_nz.dtype == y_ref.dtype
    for k in ("mean", "var"):
        assert u_nz["batch_stats"][k].dtype == u_ref["batch_stats"][k].dtype
    np.testing.assert_allclose(np.asarray(y_nz, np.float32), np.asarray(y_ref, np.float32), rtol=5e-2, atol=5e-2)
    for name in ("LayerNorm", "RMSNorm"):
        ref, nz, v_ref, v_nz = init_both(name, x, force_float32_reductions=False, param_dtype=x_dtype)
        assert_trees_equal(v_ref, v_nz, exact=True)
        assert nz.apply(v_ref, x).dtype == ref.apply(v_ref, x).dtype


@pytest.mark.parametrize("name", DROPIN)
def test_half_precision_statistics_in_float32(rng, name):
    # bf16 input, f32 params: flax and normzoo both reduce in float32; outputs agree to
    # the rounding of the final result, and the reference is the upcast input in float64.
    x = jnp.asarray(_x(rng, (16, 2, 8), loc=3.0), jnp.bfloat16)
    kw = dict(use_running_average=False) if name == "BatchNorm" else {}
    if name == "GroupNorm":
        kw["num_groups"] = 2
    layer = getattr(normzoo, name)(use_scale=False, **kw, **({} if name == "RMSNorm" else dict(use_bias=False)))
    v = layer.init(jax.random.key(0), x)
    y = layer.apply(v, x, mutable=["batch_stats"])[0] if name == "BatchNorm" else layer.apply(v, x)
    assert y.dtype == jnp.bfloat16  # no float32 params -> output keeps the input dtype (as flax)
    xf = np.asarray(x.astype(jnp.float32), np.float64)
    if name == "BatchNorm":
        ref = reference.standardize(xf, (0, 1), 1e-5)
    elif name == "LayerNorm":
        ref = reference.standardize(xf, (2,), 1e-6)
    elif name == "InstanceNorm":
        ref = reference.standardize(xf, (1,), 1e-6)
    elif name == "GroupNorm":
        ref = reference.standardize(xf.reshape(16, 2, 2, 4), (1, 3), 1e-6).reshape(xf.shape)
    else:
        ref = xf / np.sqrt(np.mean(xf ** 2, -1, keepdims=True) + 1e-6)
    np.testing.assert_allclose(np.asarray(y, np.float32), ref, rtol=1.6e-2, atol=1.6e-2)


# ---------------------------------------------------------------- gradients
GRAD_CASES = [
    ("BatchNorm", (8, 6), dict(use_running_average=False)),
    ("BatchNorm", (4, 3, 5), dict(use_running_average=False, axis=(1, 2), use_fast_variance=False)),
    ("BatchNorm", (8, 6), dict(use_running_average=True)),
    ("LayerNorm", (4, 3, 6), dict(reduction_axes=(1, 2))),
    ("RMSNorm", (4, 6), dict()),
    ("GroupNorm", (4, 3, 6), dict(num_groups=3)),
    ("InstanceNorm", (4, 3, 6), dict()),
]


@pytest.mark.parametrize("name,shape,kw", GRAD_CASES)
def test_gradients_match_flax(rng, name, shape, kw):
    x = _x(rng, shape)
    w = rng.standard_normal(shape).astype(np.float32)
    ref, nz, v, _ = init_both(name, x, **kw)
    v = _random_variables(rng, v)
    params, rest = v["params"], {k: val for k, val in v.items() if k != "params"}

    def loss(layer):
        def f(params, x):
            out = layer.apply({"params": params, **rest}, x, mutable=["batch_stats"])
            return jnp.sum(out[0] * w)
        return f

    g_ref = jax.jit(jax.grad(loss(ref), argnums=(0, 1)))(params, x)
    g_nz = jax.jit(jax.grad(loss(nz), argnums=(0, 1)))(params, x)
    assert_trees_equal(g_ref, g_nz, exact=False, rtol=2e-5, atol=5e-5)


def test_check_grads_layers_float64(x64):
    from jax.test_util import check_grads

    x = jnp.asarray(0.5 + np.random.default_rng(0).standard_normal((6, 4)))
    # (LayerNorm / RMSNorm math is checked in float64 in tests/functional)
    for layer in [normzoo.BatchNorm(use_running_average=False, param_dtype=jnp.float64),
                  normzoo.GroupNorm(num_groups=2, param_dtype=jnp.float64)]:
        v = layer.init(jax.random.key(0), x)
        f = jax.jit(lambda x, p, layer=layer, v=v: layer.apply({**v, "params": p}, x, mutable=["batch_stats"])[0])
        assert f(x, v["params"]).dtype == jnp.float64
        check_grads(f, (x, v["params"]), order=1, modes=("rev",), atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------- jit / vmap
def test_jit_apply_matches_eager(rng):
    x = _x(rng, (8, 6))
    layer = normzoo.BatchNorm(use_running_average=False)
    v = layer.init(jax.random.key(0), x)
    f = lambda v, x: layer.apply(v, x, mutable=["batch_stats"])
    (y0, u0), (y1, u1) = f(v, x), jax.jit(f)(v, x)
    np.testing.assert_allclose(y0, y1, **TOL)
    assert_trees_equal(u0, u1, exact=False)


def test_nn_vmap_lifted_layer_norm(rng):
    # lifted vmap over a leading axis with shared params
    x = _x(rng, (3, 4, 6))
    VLN = nn.vmap(normzoo.LayerNorm, in_axes=0, out_axes=0, variable_axes={"params": None},
                  split_rngs={"params": False})
    layer = VLN()
    v = layer.init(jax.random.key(0), x)
    assert jax.tree_util.tree_map(jnp.shape, v) == {"params": {"scale": (6,), "bias": (6,)}}
    np.testing.assert_allclose(layer.apply(v, x), normzoo.LayerNorm().apply(v, x), **TOL)
