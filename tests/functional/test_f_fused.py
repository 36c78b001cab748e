"""The fused op (normzoo.functional.fused): channels-last GroupNorm / InstanceNorm / BatchNorm
statistics and the transposed linearization, against flax.linen and in forward mode."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from f_helpers import x64
from jax.test_util import check_grads

import normzoo.functional as F
from normzoo.functional.fused import computed_once
from normzoo.functional.operations import normalize_with_statistics

SHAPE = (3, 5, 4, 12)  # NHWC


def _data(seed=0, loc=0.3):
    rng = np.random.default_rng(seed)
    x = jnp.asarray(loc + rng.standard_normal(SHAPE), jnp.float32)
    dy = jnp.asarray(rng.standard_normal(SHAPE), jnp.float32)
    scale = jnp.asarray(rng.uniform(0.5, 1.5, SHAPE[-1]), jnp.float32)
    bias = jnp.asarray(0.1 * rng.standard_normal(SHAPE[-1]), jnp.float32)
    return x, dy, scale, bias


LAYERS = {
    "gn": (lambda x, s, b: F.group_norm(x, s, b, num_groups=4),
           nn.GroupNorm(num_groups=4, use_fast_variance=False)),
    "gn_size1": (lambda x, s, b: F.group_norm(x, s, b, num_groups=12),
                 nn.GroupNorm(num_groups=12, use_fast_variance=False)),
    "in": (lambda x, s, b: F.instance_norm(x, s, b),
           nn.InstanceNorm(use_fast_variance=False)),
    "bn": (lambda x, s, b: F.batch_norm(x, F.init_batch_stats((SHAPE[-1],)), s, b,
                                        epsilon=1e-5)[0],
           nn.BatchNorm(use_running_average=False, use_fast_variance=False)),
    "ln": (lambda x, s, b: F.layer_norm(x, s, b),
           nn.LayerNorm(use_fast_variance=False)),
    "ln_2axes": (lambda x, s, b: F.layer_norm(x, s, b, reduction_axes=(2, 3)),
                 nn.LayerNorm(reduction_axes=(2, 3), use_fast_variance=False)),
    "rms": (lambda x, s, b: F.rms_norm(x, s) + b,
            nn.Sequential([nn.RMSNorm(use_fast_variance=False), lambda y: y])),
}


def _flax(module, x, s, b):
    if isinstance(module, nn.Sequential):  # RMSNorm (no bias), then + b
        return module.apply({"params": {"layers_0": {"scale": s}}}, x) + b
    variables = {"params": {"scale": s, "bias": b}}
    if isinstance(module, nn.BatchNorm):
        variables["batch_stats"] = {"mean": jnp.zeros_like(s), "var": jnp.ones_like(s)}
        return module.apply(variables, x, mutable=["batch_stats"])[0]
    return module.apply(variables, x)


@pytest.mark.parametrize("name", sorted(LAYERS))
def test_matches_flax_values_and_gradients(name):
    ours, module = LAYERS[name]
    x, dy, s, b = _data()
    theirs = lambda x, s, b: _flax(module, x, s, b)  # noqa: E731
    # jitted, both: eager, each of the many small ops would compile on its own
    np.testing.assert_allclose(jax.jit(ours)(x, s, b), jax.jit(theirs)(x, s, b), rtol=2e-5,
                               atol=2e-5)
    loss = lambda f: lambda x, s, b: jnp.sum(f(x, s, b) * dy)  # noqa: E731
    g_ours = jax.jit(jax.grad(loss(ours), argnums=(0, 1, 2)))(x, s, b)
    g_theirs = jax.jit(jax.grad(loss(theirs), argnums=(0, 1, 2)))(x, s, b)
    for a, e in zip(g_ours, g_theirs):
        np.testing.assert_allclose(a, e, rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("name", sorted(LAYERS))
def test_check_grads_forward_and_reverse(name):
    ours, _ = LAYERS[name]
    with x64():
        x, _, s, b = (jnp.asarray(a, jnp.float64) for a in _data(1))
        check_grads(jax.jit(ours), (x, s, b), order=1, modes=("rev", "fwd"), atol=1e-5, rtol=1e-5)


def test_group_norm_large_mean_and_statistics():
    x, _, s, b = _data(2, loc=1e4)
    y = jax.jit(lambda x: F.group_norm(x, s, b, num_groups=4))(x)
    xhat = np.asarray((y - b) / s, np.float64).reshape(SHAPE[0], -1, 4, 3)
    np.testing.assert_allclose(xhat.std(axis=(1, 3)), 1.0, rtol=2e-2)
    stats = jax.jit(lambda x: F.statistics(x, (1, 2, 3), num_groups=4))(x)
    x64 = np.asarray(x, np.float64).reshape(SHAPE[:-1] + (4, 3))
    np.testing.assert_allclose(stats["var"], x64.var(axis=(1, 2, 4)), rtol=2e-2)


def test_group_norm_gradient_through_statistics():
    """Cotangents of the returned statistics flow back through the per-channel sums."""
    x, _, s, b = _data(3)

    def fused(x):
        y, stats = normalize_with_statistics(x, (1, 2, 3), num_groups=4, scale=s, bias=b,
                                               feature_axes=(3,))
        return jnp.sum(y) + jnp.sum(stats["mean"] ** 2) + jnp.sum(jnp.sqrt(stats["var"]))

    def general(x):  # the mask path is plain autodiff over the split view
        y, stats = normalize_with_statistics(x, (1, 2, 3), num_groups=4, scale=s, bias=b,
                                               feature_axes=(3,), mask=jnp.ones(SHAPE, bool))
        return jnp.sum(y) + jnp.sum(stats["mean"] ** 2) + jnp.sum(jnp.sqrt(stats["var"]))

    np.testing.assert_allclose(jax.jit(jax.grad(fused))(x), jax.jit(jax.grad(general))(x),
                               rtol=1e-4, atol=1e-5)


# (reduction axes, feature axes) of LayerNorm / RMSNorm in the NHWC test shape: the scale
# varies along the statistic's axes only (matrix-vector backward) or also across them.
ROW_CASES = [((3,), (3,)), ((2, 3), (3,)), ((1, 2, 3), (2, 3)), ((3,), (2, 3)), ((2,), (2,))]


@pytest.mark.parametrize("centered", [True, False])
@pytest.mark.parametrize("axes,features", ROW_CASES)
def test_row_norm_gradients_match_autodiff(axes, features, centered):
    """LayerNorm / RMSNorm's fused backward (outer-product terms where the scale is per
    feature, the general form where it also varies across rows) against plain autodiff of
    the mask path, with cotangents on y and on the returned statistics."""
    rng = np.random.default_rng(4)
    x = jnp.asarray(0.3 + rng.standard_normal(SHAPE), jnp.float32)
    pshape = tuple(SHAPE[a] for a in features)
    s = jnp.asarray(rng.uniform(0.5, 1.5, pshape), jnp.float32)
    b = jnp.asarray(0.1 * rng.standard_normal(pshape), jnp.float32)
    dy = jnp.asarray(rng.standard_normal(SHAPE), jnp.float32)
    operation = "standardize" if centered else "scale"

    def loss(mask):
        def f(x, s, b):
            y, stats = normalize_with_statistics(
                x, axes, operation, scale=s, bias=b, feature_axes=features, mask=mask)
            return jnp.sum(y * dy) + sum(jnp.sum(jnp.sin(v)) for v in stats.values())
        return f

    fused = jax.jit(jax.grad(loss(None), argnums=(0, 1, 2)))(x, s, b)
    general = jax.jit(jax.grad(loss(jnp.ones(SHAPE, bool)), argnums=(0, 1, 2)))(x, s, b)
    for a, e in zip(fused, general):
        np.testing.assert_allclose(a, e, rtol=1e-4, atol=1e-5)
    with x64():
        args = tuple(jnp.asarray(a, jnp.float64) for a in (x, s, b))
        check_grads(jax.jit(loss(None)), args, order=1, modes=("rev", "fwd"), atol=1e-5,
                    rtol=1e-5)


# ------------------------------------------- the plan: every variance method and output form

# (function, reduction axes of the statistics in the NHWC test shape, channel groups)
PLANNED = {
    "ln": (lambda x, s, b, fast: F.layer_norm(x, s, b, use_fast_variance=fast), (3,), 1),
    "bn": (lambda x, s, b, fast: F.batch_norm(x, F.init_batch_stats((SHAPE[-1],)), s, b,
                                              use_fast_variance=fast)[0], (0, 1, 2), 1),
    "in": (lambda x, s, b, fast: F.instance_norm(x, s, b, use_fast_variance=fast), (1, 2), 1),
    "gn": (lambda x, s, b, fast: F.group_norm(x, s, b, num_groups=4, use_fast_variance=fast),
           (1, 2), 4),
}


def _np_normalized(x, axes, groups, eps):
    """float64 reference of (x - mean) / sqrt(var + eps) on the same (rounded) input."""
    x64 = np.asarray(x, np.float64)
    if groups == 1:
        mean, var = x64.mean(axes, keepdims=True), x64.var(axes, keepdims=True)
        return (x64 - mean) / np.sqrt(var + eps)
    grouped = x64.reshape(x64.shape[:-1] + (groups, -1))
    red = axes + (4,)
    mean, var = grouped.mean(red, keepdims=True), grouped.var(red, keepdims=True)
    return ((grouped - mean) / np.sqrt(var + eps)).reshape(x64.shape)


@pytest.mark.parametrize("fast", [True, False])
@pytest.mark.parametrize("loc", [0.3, 1e4])
@pytest.mark.parametrize("name", sorted(PLANNED))
def test_planned_forward_is_exact_for_any_offset(name, loc, fast):
    # The forward pass picks a variance method and output form per layout (two-pass for
    # LN/BN, guarded one-pass for IN/GN, fused._plan): all must stay accurate when
    # |mean| >> std, where flax's fast variance is off by ~300x. At 1e4 the float32 mean
    # itself is rounded to a few ulps (~1e-3): that, not the variance, bounds the output.
    fn, axes, groups = PLANNED[name]
    x, _, s, b = _data(4, loc=loc)
    eps = 1e-5 if name == "bn" else 1e-6
    y = np.asarray(jax.jit(lambda x: fn(x, s, b, fast))(x), np.float64)
    xhat = _np_normalized(x, axes, groups, eps)
    tol = 2e-5 if loc < 1 else 1e-2
    np.testing.assert_allclose((y - np.asarray(b)) / np.asarray(s), xhat, rtol=tol, atol=tol)


@pytest.mark.parametrize("name", sorted(PLANNED))
def test_planned_forward_half_precision(name):
    fn, axes, groups = PLANNED[name]
    x, _, s, b = _data(5)
    xb = x.astype(jnp.bfloat16)
    y = jax.jit(lambda x: fn(x, s, b, True))(xb)
    expected = _np_normalized(xb, axes, groups, 1e-5 if name == "bn" else 1e-6)
    np.testing.assert_allclose((np.asarray(y, np.float64) - np.asarray(b)) / np.asarray(s),
                               expected, rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("loc", [0.3, 1e4])
@pytest.mark.parametrize("name", sorted(PLANNED))
def test_forward_and_linearization_agree(name, loc):
    # jax.jvp runs the linearization's own statistics (guarded one pass, plain output
    # form); the plain call runs the planned forward: the two primal outputs must agree.
    fn, _, _ = PLANNED[name]
    x, dy, s, b = _data(6, loc=loc)
    f = lambda x: fn(x, s, b, True)  # noqa: E731
    y_plain = jax.jit(f)(x)
    y_lin, _ = jax.jit(lambda x, t: jax.jvp(f, (x,), (t,)))(x, dy)
    tol = 2e-5 if loc < 1 else 1e-2  # at 1e4: a few float32 ulps of the mean
    np.testing.assert_allclose(y_plain, y_lin, rtol=tol, atol=tol)


@pytest.mark.parametrize("name", ["in", "gn", "bn"])
def test_vmap_over_the_guard_matches_a_python_loop(name):
    # Under jax.vmap the guard's lax.cond becomes a select over both branches; members with
    # |mean| ~ 1e4 and ~ 0.3 batched together must match the per-member values and grads.
    fn, _, _ = PLANNED[name]
    _, dy, s, b = _data(7)
    xs = jnp.stack([_data(8, loc=0.3)[0], _data(9, loc=1e4)[0]])
    f = lambda x: fn(x, s, b, True)  # noqa: E731
    g = jax.grad(lambda x: jnp.sum(f(x) * dy))
    y_vmap, g_vmap = jax.jit(jax.vmap(f))(xs), jax.jit(jax.vmap(g))(xs)
    for i in range(2):
        np.testing.assert_allclose(y_vmap[i], jax.jit(f)(xs[i]), rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(g_vmap[i], jax.jit(g)(xs[i]), rtol=1e-4, atol=1e-4)


def test_computed_once_is_an_exact_linear_identity_through_a_dot():
    rng = np.random.default_rng(5)
    a = jnp.asarray(rng.standard_normal((2, 1, 3)), jnp.float32)
    b = jnp.asarray(rng.standard_normal((2, 1, 3)) * 1e30, jnp.float32)
    out = jax.jit(computed_once)(a, b)
    np.testing.assert_array_equal(out[0], a)
    np.testing.assert_array_equal(out[1], b)
    # Linear: the gradient of <w, out> is w, and forward mode agrees.
    w = (jnp.arange(6.0).reshape(a.shape), -jnp.ones_like(b))
    grads = jax.grad(lambda a, b: sum(jnp.sum(wi * oi) for wi, oi in zip(w, computed_once(a, b))),
                     argnums=(0, 1))(a, b)
    np.testing.assert_array_equal(grads[0], w[0])
    np.testing.assert_array_equal(grads[1], w[1])
    _, tangents = jax.jvp(computed_once, (a, b), w)
    np.testing.assert_array_equal(tangents[0], w[0])
    # On CPU it is a dot in the compiled program (the point of it), forward and backward.
    hlo = jax.jit(jax.grad(lambda a, b: jnp.sum(computed_once(a, b)[0] * b))).lower(a, b)
    assert " dot(" in hlo.compile().as_text()
    with pytest.raises(ValueError, match="at least 2 arrays"):
        computed_once(a)


@pytest.mark.parametrize("name", ["LayerNorm", "RMSNorm"])
def test_frozen_params_16_bit_gradient_equals_the_closed_form(name):
    """With frozen params and a 16-bit input, LayerNorm's and RMSNorm's jvp take the plain
    formula; its dx equals the closed form's (params differentiated) and the float64
    truth, also where |mean| >> std (LayerNorm)."""
    import normzoo

    rng = np.random.default_rng(3)
    loc = 1e3 if name == "LayerNorm" else 1.0
    x = jnp.asarray(loc + 0.1 * rng.standard_normal((8, 64)), jnp.bfloat16)
    c = jnp.asarray(rng.standard_normal((8, 64)), jnp.float32)
    layer = getattr(normzoo, name)(dtype=jnp.bfloat16)
    params = {"scale": jnp.asarray(1 + rng.random(64), jnp.float32)}
    if name == "LayerNorm":
        params["bias"] = jnp.asarray(rng.random(64), jnp.float32)
    variables = {"params": params}

    def loss(v, x):
        return jnp.sum(layer.apply(v, x).astype(jnp.float32) * c)

    dx_frozen = jax.grad(loss, argnums=1)(variables, x)
    _, dx_closed = jax.grad(loss, argnums=(0, 1))(variables, x)
    # both are bfloat16 roundings of float32 sums with large cancelling terms (|mean| >>
    # std): compare at bfloat16's resolution of the gradient's scale
    scale = np.abs(np.asarray(dx_closed, np.float32)).max()
    np.testing.assert_allclose(np.asarray(dx_frozen, np.float32),
                               np.asarray(dx_closed, np.float32), rtol=0, atol=1e-2 * scale)
    # the float64 truth of d/dx sum(LN(x) * c) at the same (bf16-exact) x
    x64 = np.asarray(x, np.float64)
    g = np.asarray(c, np.float64) * np.asarray(variables["params"]["scale"], np.float64)
    cen = x64 - x64.mean(1, keepdims=True) if name == "LayerNorm" else x64
    r = 1 / np.sqrt((cen**2).mean(1, keepdims=True) + 1e-6)
    xhat = cen * r
    g_mean = g.mean(1, keepdims=True) if name == "LayerNorm" else 0.0
    truth = r * (g - g_mean - xhat * (g * xhat).mean(1, keepdims=True))
    err = np.abs(np.asarray(dx_frozen, np.float64) - truth).max() / np.abs(truth).max()
    assert err < 2e-2, err
    # and the forward values are the same as without differentiation
    y_jvp = jax.jvp(lambda x: layer.apply(variables, x), (x,), (jnp.ones_like(x),))[0]
    np.testing.assert_allclose(np.asarray(y_jvp, np.float32),
                               np.asarray(layer.apply(variables, x), np.float32),
                               rtol=1e-2, atol=1e-2)
