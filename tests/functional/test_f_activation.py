"""normzoo.functional.activation (FRN + TLU, EvoNorm-B0 / S0, LRN, DyT) against float64 NumPy
references written from the papers' equations (below), by value, by finite-difference
gradients, under jit / vmap, in bfloat16, and every error message.

References (x of shape (N, ..., C), channels last):

* FRN (Singh & Krishnan 2020): ``nu2 = mean_{spatial} x^2``,
  ``max(g x / sqrt(nu2 + |eps|) + b, tau)``;
* EvoNorm-B0 (Liu et al. 2020): ``x / max(sqrt(var_B + eps), v x + sqrt(var_I + eps)) g + b``;
* EvoNorm-S0: ``x sigmoid(v x) / sqrt(var_G + eps) g + b``;
* LRN (PyTorch's ``LocalResponseNorm``): a loop over the channels, window
  ``[c - n//2, c + (n-1)//2]``;
* DyT (Zhu et al. 2025): ``g tanh(alpha x) + b``.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import normzoo.functional.activation as FA

TOL = dict(rtol=2e-5, atol=2e-5)
C = 4
SHAPE = (3, 2, 3, C)  # (N, H, W, C)


# ---------------------------------------------------------------- float64 references
def _spatial(x):
    return tuple(range(1, x.ndim - 1))


def frn_ref(x, g=None, b=None, tau=None, eps=1e-6, learned=None):
    x = np.asarray(x, np.float64)
    nu2 = np.mean(x * x, axis=_spatial(x), keepdims=True)
    e = abs(eps) + (0.0 if learned is None else abs(float(learned)))
    y = x / np.sqrt(nu2 + e)
    y = y * (1.0 if g is None else g) + (0.0 if b is None else b)
    return y if tau is None else np.maximum(y, tau)


def b0_ref(x, g, b, v, eps=1e-5, running_var=None):
    """``(y, var_B)``: the batch variance, or the running one at inference."""
    x = np.asarray(x, np.float64)
    var_b = x.var(axis=tuple(range(x.ndim - 1))) if running_var is None else running_var
    var_i = x.var(axis=_spatial(x), keepdims=True)
    den = np.maximum(np.sqrt(var_b + eps), v * x + np.sqrt(var_i + eps))
    return x / den * g + b, var_b


def s0_ref(x, g, b, v, groups, eps=1e-5):
    x = np.asarray(x, np.float64)
    c = x.shape[-1]
    xg = x.reshape(x.shape[:-1] + (groups, c // groups))
    var = xg.var(axis=_spatial(x) + (x.ndim,), keepdims=True)
    std = np.broadcast_to(np.sqrt(var + eps), xg.shape).reshape(x.shape)
    return x / (1.0 + np.exp(-v * x)) / std * g + b


def lrn_ref(x, size, alpha=1e-4, beta=0.75, k=1.0):
    """PyTorch's LocalResponseNorm, channels last, as an explicit loop over channels."""
    x = np.asarray(x, np.float64)
    y = np.empty_like(x)
    channels = x.shape[-1]
    for c in range(channels):
        lo, hi = max(0, c - size // 2), min(channels, c + (size - 1) // 2 + 1)
        window = np.sum(x[..., lo:hi] ** 2, axis=-1)
        y[..., c] = x[..., c] / (k + alpha / size * window) ** beta
    return y


def dyt_ref(x, alpha, g, b):
    return g * np.tanh(alpha * np.asarray(x, np.float64)) + b


# ---------------------------------------------------------------- data
def _x(rng, shape=SHAPE, loc=0.3):
    return (loc + 1.5 * rng.standard_normal(shape)).astype(np.float32)


def _p(rng, c=C, loc=1.0, spread=0.3):
    return (loc + spread * rng.standard_normal(c)).astype(np.float32)


# ---------------------------------------------------------------- values
@pytest.mark.parametrize("case", ["spatial", "dense_1x1", "learned_eps", "no_tlu"])
def test_frn_matches_paper(rng, case):
    shape = (3, C) if case == "dense_1x1" else SHAPE
    x, g, b, tau = _x(rng, shape), _p(rng), _p(rng, loc=0.0), _p(rng, loc=0.1)
    learned = np.float32(-0.3) if case == "learned_eps" else None
    tau = None if case == "no_tlu" else tau
    eps = 1e-2 if case == "dense_1x1" else 1e-6
    y = jax.jit(lambda *a: FA.filter_response_norm(*a[:4], epsilon=eps, learned_epsilon=a[4]))(
        x, g, b, tau, learned)
    np.testing.assert_allclose(y, frn_ref(x, g, b, tau, eps, learned), **TOL)
    assert y.dtype == jnp.float32 and y.shape == x.shape


def test_frn_several_feature_axes_and_tlu(rng):
    x = _x(rng, (2, 3, 2, 4))
    g, tau = _p(rng, (2, 4)), _p(rng, (2, 4), loc=0.0)
    y, z = jax.jit(lambda x, g, tau: (FA.filter_response_norm(x, g, None, tau, feature_axes=(2, 3)),
                                      FA.tlu(x, tau, feature_axes=(2, 3))))(x, g, tau)
    nu2 = np.mean(np.asarray(x, np.float64) ** 2, axis=1, keepdims=True)
    np.testing.assert_allclose(y, np.maximum(g * x / np.sqrt(nu2 + 1e-6), tau), **TOL)
    np.testing.assert_allclose(z, np.maximum(x, tau))


def test_evonorm_b0_train_eval_and_running_variance(rng):
    momentum = 0.8
    x, g, b, v = _x(rng), _p(rng), _p(rng, loc=0.0), _p(rng, loc=0.5, spread=0.5)
    stats = {"var": (0.5 + rng.random(C)).astype(np.float32)}
    b0 = jax.jit(FA.evonorm_b0, static_argnames=("train", "momentum"))
    y, new = b0(x, stats, g, b, v, train=True, momentum=momentum)
    y_ref, var_b = b0_ref(x, g, b, v)
    np.testing.assert_allclose(y, y_ref, **TOL)
    np.testing.assert_allclose(new["var"], momentum * stats["var"] + (1 - momentum) * var_b,
                               **TOL)
    assert set(new) == {"var"} and new["var"].dtype == jnp.float32
    y_eval, same = b0(x, new, g, b, v, train=False, momentum=momentum)
    np.testing.assert_allclose(y_eval, b0_ref(x, g, b, v, running_var=new["var"])[0], **TOL)
    np.testing.assert_array_equal(same["var"], new["var"])
    init = FA.init_evonorm_b0_stats(C)
    assert set(init) == {"var"} and init["var"].dtype == jnp.float32
    np.testing.assert_array_equal(init["var"], np.ones(C))


def test_evonorm_b0_axis_name_is_the_whole_batch(rng):
    # Under vmap with axis_name, the batch variance spans every shard, exactly.
    x, g, b, v = _x(rng, (4, 2, 2, C)), _p(rng), _p(rng, loc=0.0), _p(rng)
    stats = FA.init_evonorm_b0_stats(C)
    shards = x.reshape(2, 2, 2, 2, C)
    y, new = jax.jit(jax.vmap(lambda s: FA.evonorm_b0(s, stats, g, b, v, axis_name="d"),
                      axis_name="d"))(shards)
    y_ref, var_b = b0_ref(x, g, b, v)
    np.testing.assert_allclose(np.reshape(y, x.shape), y_ref, **TOL)
    np.testing.assert_allclose(new["var"][0], 0.99 + 0.01 * var_b, **TOL)


@pytest.mark.parametrize("groups,size", [(2, None), (None, 1)], ids=["num_groups", "group_size"])
def test_evonorm_s0_matches_paper(rng, groups, size):
    x, g, b, v = _x(rng), _p(rng), _p(rng, loc=0.0), _p(rng, loc=0.5, spread=0.5)
    y = jax.jit(lambda *a: FA.evonorm_s0(*a, num_groups=groups, group_size=size))(x, g, b, v)
    np.testing.assert_allclose(y, s0_ref(x, g, b, v, groups or C // size), **TOL)


def test_lrn_matches_pytorch_loop(rng):
    x = _x(rng, (2, 3, 5))
    sizes = (1, 2, 3, 6)  # odd, even, and wider than the 5 channels
    ys = jax.jit(lambda x: [FA.local_response_norm(x, size=n, alpha=0.5, beta=0.75, k=2.0)
                            for n in sizes])(x)
    for size, y in zip(sizes, ys):
        np.testing.assert_allclose(y, lrn_ref(x, size, 0.5, 0.75, 2.0), **TOL, err_msg=size)


def test_lrn_defaults_and_channel_axis(rng):
    x = _x(rng, (2, 5, 3))
    y = jax.jit(lambda x: FA.local_response_norm(x, size=3, axis=1))(x)
    expected = np.moveaxis(lrn_ref(np.moveaxis(x, 1, -1), 3), -1, 1)  # alpha 1e-4, beta .75, k 1
    np.testing.assert_allclose(y, expected, **TOL)


def test_lrn_matches_torch(rng):
    torch = pytest.importorskip("torch")
    x = _x(rng, (2, 6, 3, 3))  # torch: (N, C, H, W)
    for size in (2, 5):
        y_t = torch.nn.LocalResponseNorm(size, alpha=0.3, beta=0.75, k=1.5)(torch.tensor(x))
        y = FA.local_response_norm(x, size=size, alpha=0.3, beta=0.75, k=1.5, axis=1)
        np.testing.assert_allclose(y, y_t.numpy(), **TOL)


def test_dyt_matches_paper(rng):
    x, g, b = _x(rng), _p(rng), _p(rng, loc=0.0)
    y, y_plain = jax.jit(lambda x, g, b: (FA.dyt(x, jnp.float32(0.7), g, b), FA.dyt(x, 0.5)))(
        x, g, b)
    np.testing.assert_allclose(y, dyt_ref(x, 0.7, g, b), **TOL)
    np.testing.assert_allclose(y_plain, np.tanh(0.5 * x.astype(np.float64)), **TOL)


# ---------------------------------------------------------------- gradients
def _fd(fun, args, h=1e-6):
    """Central differences of scalar ``fun(*args)`` w.r.t. every entry of every arg."""
    grads = []
    for i, a in enumerate(args):
        a = np.asarray(a, np.float64)
        g = np.empty(a.size)
        for j in range(a.size):
            e = np.zeros(a.size)
            e[j] = h
            plus = [*args[:i], a + e.reshape(a.shape), *args[i + 1:]]
            minus = [*args[:i], a - e.reshape(a.shape), *args[i + 1:]]
            g[j] = (fun(*plus) - fun(*minus)) / (2 * h)
        grads.append(g.reshape(a.shape))
    return grads


# (name, normzoo function of (x, *params), numpy reference of the same, param shapes)
GRAD_CASES = {
    "frn": (lambda x, g, b, t, e: FA.filter_response_norm(x, g, b, t, learned_epsilon=e),
            lambda x, g, b, t, e: frn_ref(x, g, b, t, 1e-6, e), [(C,), (C,), (C,), ()]),
    "tlu": (lambda x, t: FA.tlu(x, t), lambda x, t: np.maximum(x, t), [(C,)]),
    "evonorm_b0": (lambda x, g, b, v: FA.evonorm_b0(x, FA.init_evonorm_b0_stats(C), g, b, v)[0],
                   lambda x, g, b, v: b0_ref(x, g, b, v)[0], [(C,), (C,), (C,)]),
    "evonorm_b0_eval": (
        lambda x, g, b, v: FA.evonorm_b0(x, {"var": jnp.full(C, 0.7)}, g, b, v, train=False)[0],
        lambda x, g, b, v: b0_ref(x, g, b, v, running_var=0.7)[0], [(C,), (C,), (C,)]),
    "evonorm_s0": (lambda x, g, b, v: FA.evonorm_s0(x, g, b, v, num_groups=2),
                   lambda x, g, b, v: s0_ref(x, g, b, v, 2), [(C,), (C,), (C,)]),
    "lrn": (lambda x: FA.local_response_norm(x, size=3, alpha=0.5, k=1.5),
            lambda x: lrn_ref(x, 3, 0.5, 0.75, 1.5), []),
    "dyt": (lambda x, a, g, b: FA.dyt(x, a, g, b), dyt_ref, [(), (C,), (C,)]),
}


@pytest.mark.parametrize("name", list(GRAD_CASES))
def test_gradients_match_finite_differences(x64, rng, name):
    fun, ref, shapes = GRAD_CASES[name]
    x = rng.standard_normal((2, 2, 2, C)) + 0.2
    params = [0.3 + rng.random(s) if s else np.float64(0.4 + rng.random()) for s in shapes]
    if name == "frn":
        params[2] = params[2] - 0.3  # tau inside the range of y: both branches of the max
    c = rng.standard_normal(x.shape)
    args = [x, *params]
    grads = jax.jit(jax.grad(lambda *a: jnp.sum(c * fun(*a)), argnums=tuple(range(len(args)))))(
        *[jnp.asarray(a) for a in args])
    expected = _fd(lambda *a: np.sum(c * ref(*a)), args)
    for got, want in zip(grads, expected):
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)


# ---------------------------------------------------------------- transforms and dtypes
def _calls(rng):
    g, b, v, t = _p(rng), _p(rng, loc=0.0), _p(rng), _p(rng, loc=0.0)
    stats = FA.init_evonorm_b0_stats(C)
    return {
        "frn": lambda x, **kw: FA.filter_response_norm(x, g, b, t, **kw),
        "tlu": lambda x, **kw: FA.tlu(x, t, **kw),
        "evonorm_b0": lambda x, **kw: FA.evonorm_b0(x, stats, g, b, v, **kw)[0],
        "evonorm_s0": lambda x, **kw: FA.evonorm_s0(x, g, b, v, num_groups=2, **kw),
        "lrn": lambda x, **kw: FA.local_response_norm(x, size=3, **kw),
        "dyt": lambda x, **kw: FA.dyt(x, jnp.float32(0.5), g, b, **kw),
    }


def test_vmap_equals_per_sample_calls_under_jit(rng):
    x = _x(rng, (2,) + SHAPE)
    for name, call in _calls(rng).items():
        batched, *each = jax.jit(lambda x, c=call: (jax.vmap(c)(x), c(x[0]), c(x[1])))(x)
        for i in range(2):
            np.testing.assert_allclose(batched[i], each[i], rtol=1e-6, atol=1e-6, err_msg=name)


def test_bfloat16_float32_statistics_and_flax_dtype_rule(rng):
    x32 = _x(rng)
    x16 = jnp.asarray(x32, jnp.bfloat16)
    for name, call in _calls(rng).items():
        exact, y, forced = jax.jit(lambda a, c=call: (
            c(a.astype(jnp.float32)), c(a), c(a, dtype=jnp.bfloat16)))(x16)
        # float32 params promote (flax's rule), LRN has none: its output stays bfloat16
        assert y.dtype == (jnp.bfloat16 if name == "lrn" else jnp.float32), name
        np.testing.assert_allclose(np.asarray(y, np.float32), exact, rtol=2e-2, atol=2e-2,
                                   err_msg=name)
        assert forced.dtype == jnp.bfloat16, name
        np.testing.assert_allclose(np.asarray(forced, np.float32), exact, rtol=2e-2, atol=2e-2,
                                   err_msg=name)
    # the running variance of a bfloat16 batch is float32, from float32 statistics; with
    # bfloat16 params too the output is bfloat16
    g16 = jnp.ones(C, jnp.bfloat16)
    var, y_dyt, y_frn = jax.jit(lambda a: (
        FA.evonorm_b0(a, FA.init_evonorm_b0_stats(C), momentum=0.0)[1]["var"],
        FA.dyt(a, jnp.bfloat16(0.5), g16, g16), FA.filter_response_norm(a, g16, g16, g16)))(x16)
    assert var.dtype == jnp.float32
    np.testing.assert_allclose(var, np.asarray(x16, np.float64).var((0, 1, 2)), rtol=1e-5)
    assert y_dyt.dtype == jnp.bfloat16 and y_frn.dtype == jnp.bfloat16


# ---------------------------------------------------------------- errors
def test_non_float_input_is_a_type_error():
    xi = jnp.ones(SHAPE, jnp.int32)
    ones = jnp.ones(C)
    calls = [
        lambda: FA.filter_response_norm(xi), lambda: FA.tlu(xi, ones),
        lambda: FA.evonorm_b0(xi, FA.init_evonorm_b0_stats(C)),
        lambda: FA.evonorm_s0(xi, num_groups=2), lambda: FA.local_response_norm(xi, size=3),
        lambda: FA.dyt(xi, 0.5),
    ]
    for call in calls:
        with pytest.raises(TypeError, match=r"x has dtype int32; expected a floating dtype"):
            call()


def test_epsilon_must_be_non_negative():
    x = jnp.ones(SHAPE)
    for call in (lambda: FA.filter_response_norm(x, epsilon=-1e-6),
                 lambda: FA.evonorm_b0(x, FA.init_evonorm_b0_stats(C), epsilon=-1.0),
                 lambda: FA.evonorm_s0(x, num_groups=2, epsilon=-1.0)):
        with pytest.raises(ValueError, match=r"epsilon=-1(\.0)?(e-06)? must be a float >= 0"):
            call()


def test_param_shape_errors_name_the_param():
    x = jnp.ones(SHAPE)
    bad = jnp.ones(C + 1)
    stats = FA.init_evonorm_b0_stats(C)
    cases = [
        ("scale", lambda: FA.filter_response_norm(x, bad)),
        ("tau", lambda: FA.filter_response_norm(x, tau=bad)),
        ("tau", lambda: FA.tlu(x, bad)),
        ("v", lambda: FA.evonorm_b0(x, stats, v=bad)),
        ("bias", lambda: FA.evonorm_s0(x, bias=bad, num_groups=2)),
        ("v", lambda: FA.evonorm_s0(x, v=bad, num_groups=2)),
        ("scale", lambda: FA.dyt(x, 0.5, bad)),
    ]
    for name, call in cases:
        with pytest.raises(ValueError, match=rf"^{name} has shape \(5,\); expected \(4,\)"):
            call()
    with pytest.raises(ValueError, match=r"learned_epsilon has shape \(4,\); expected \(\)"):
        FA.filter_response_norm(x, learned_epsilon=jnp.ones(C))
    with pytest.raises(ValueError, match=r"alpha has shape \(4,\); expected \(\)"):
        FA.dyt(x, jnp.ones(C))
    with pytest.raises(ValueError, match=r"tau is None"):
        FA.tlu(x, None)


def test_evonorm_configuration_errors():
    x = jnp.ones(SHAPE)
    stats = FA.init_evonorm_b0_stats(C)
    with pytest.raises(ValueError, match=r"stats has keys \['mean', 'var'\]; expected .*'var'"):
        FA.evonorm_b0(x, {"mean": jnp.zeros(C), "var": jnp.ones(C)})
    with pytest.raises(ValueError, match=r"stats\['var'\] has shape \(3,\); expected \(4,\)"):
        FA.evonorm_b0(x, {"var": jnp.ones(3)})
    with pytest.raises(ValueError, match=r"momentum=1.5 must be in \[0, 1\]"):
        FA.evonorm_b0(x, stats, momentum=1.5)
    with pytest.raises(ValueError, match=r"axis=0 contains the batch axis 0"):
        FA.evonorm_b0(x, {"var": jnp.ones(3)}, axis=0)
    with pytest.raises(ValueError, match=r"axis=4 is out of range"):
        FA.evonorm_b0(x, stats, axis=4)
    with pytest.raises(ValueError, match=r"num_groups=3 must be a positive divisor of the 4"):
        FA.evonorm_s0(x, num_groups=3)
    with pytest.raises(ValueError, match=r"group_size=3 must be a positive divisor of the 4"):
        FA.evonorm_s0(x, num_groups=None, group_size=3)
    with pytest.raises(ValueError, match=r"exactly one of num_groups=2 and group_size=2"):
        FA.evonorm_s0(x, num_groups=2, group_size=2)
    with pytest.raises(ValueError, match=r"needs an input of rank >= 2"):
        FA.evonorm_s0(jnp.ones(C), num_groups=2)


def test_lrn_and_frn_configuration_errors():
    x = jnp.ones(SHAPE)
    for size in (0, -2, 2.5, True, None):
        with pytest.raises(ValueError, match=rf"size={size!r} must be a positive int"):
            FA.local_response_norm(x, size=size)
    with pytest.raises(TypeError, match=r"axis=\(1, 2\) must be one int"):
        FA.local_response_norm(x, size=3, axis=(1, 2))
    with pytest.raises(ValueError, match=r"axis=5 is out of range"):
        FA.local_response_norm(x, size=3, axis=5)
    with pytest.raises(TypeError, match=r"alpha=1j must be a real number"):
        FA.local_response_norm(x, size=3, alpha=1j)
    with pytest.raises(ValueError, match=r"feature_axes=0 contains the batch axis 0"):
        FA.filter_response_norm(x, feature_axes=0)
    with pytest.raises(ValueError, match=r"feature_axes=7 is out of range"):
        FA.dyt(x, 0.5, feature_axes=7)
