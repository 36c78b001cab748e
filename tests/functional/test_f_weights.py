"""normzoo.functional.weights against float64 NumPy references written from the papers.

Weight Standardization (Qiao et al. 2019), Scaled WS (Brock et al. 2021, NF-Nets), Weight Norm
(Salimans & Kingma 2016), Centered Weight Norm (Huang et al. 2017), Spectral Norm (Miyato et
al. 2018): values (float64), the properties of the normalized kernel (mean 0 / std 1, norm g,
largest singular value 1 vs numpy.linalg.svd), gradients by central differences, jit / vmap,
bfloat16 and the argument errors.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from normzoo.functional import weights as W


# ---------------------------------------------------------------- float64 references
def _fan_in(shape):
    return tuple(range(len(shape) - 1))


def ref_ws(w, eps=1e-5, ddof=0):
    """Qiao et al.: (W - mean) / (std + eps) per output channel (last axis) over the fan-in."""
    w = np.asarray(w, np.float64)
    axes = _fan_in(w.shape)
    n = np.prod([w.shape[i] for i in axes])
    mean = w.mean(axis=axes, keepdims=True)
    std = np.sqrt(((w - mean) ** 2).sum(axis=axes, keepdims=True) / (n - ddof))
    return (w - mean) / (std + eps)


def ref_sws(w, gain, eps=1e-4):
    """Brock et al.: gain (W - mean) / sqrt(max(N var, eps))."""
    w = np.asarray(w, np.float64)
    axes = _fan_in(w.shape)
    n = np.prod([w.shape[i] for i in axes])
    mean = w.mean(axis=axes, keepdims=True)
    var = ((w - mean) ** 2).mean(axis=axes, keepdims=True)
    return np.asarray(gain, np.float64) * (w - mean) / np.sqrt(np.maximum(var * n, eps))


def ref_wn(v, g, eps=1e-12):
    """Salimans & Kingma: g v / ||v|| (flax's eps inside the square root)."""
    v = np.asarray(v, np.float64)
    norm = np.sqrt((v * v).sum(axis=_fan_in(v.shape), keepdims=True) + eps)
    return np.asarray(g, np.float64) * v / norm


def ref_cwn(v, g, eps=1e-12):
    """Huang et al.: g (v - mean v) / ||v - mean v||."""
    v = np.asarray(v, np.float64)
    return ref_wn(v - v.mean(axis=_fan_in(v.shape), keepdims=True), g, eps)


def ref_power(w, u, n_steps, eps=1e-12):
    """Miyato et al.'s power iteration on W (-1, out) from u (1, out): (v, u, sigma)."""
    m = np.asarray(w, np.float64).reshape(-1, w.shape[-1])
    u = np.asarray(u, np.float64).reshape(1, -1)
    for _ in range(n_steps):
        v = u @ m.T
        v = v / np.sqrt((v * v).sum() + eps)
        u = v @ m
        u = u / np.sqrt((u * u).sum() + eps)
    return v, u, (v @ m @ u.T)[0, 0]


def fd_grad(fun, x, h=1e-6):
    x = np.asarray(x, np.float64)
    g = np.zeros(x.size)
    for i in range(x.size):
        e = np.zeros(x.size)
        e[i] = h
        e = e.reshape(x.shape)
        g[i] = (fun(x + e) - fun(x - e)) / (2 * h)
    return g.reshape(x.shape)


@pytest.fixture
def conv_kernel(rng):
    return (0.3 + rng.standard_normal((3, 3, 2, 4))).astype(np.float32)


# ---------------------------------------------------------------- values, float64
def test_values_match_the_float64_references(x64, rng):
    w = 0.2 + rng.standard_normal((3, 2, 5))
    g = 0.5 + rng.random(5)
    u = rng.standard_normal((1, 5))

    @jax.jit
    def all_of_them(w, g, u):
        return (W.weight_standardization(w), W.weight_standardization(w, ddof=1, epsilon=1e-3),
                W.scaled_weight_standardization(w, g), W.weight_norm(w, g),
                W.centered_weight_norm(w, g), W.spectral_norm(w, u, n_steps=3))

    ws, ws1, sws, wn, cwn, (out, new_u, sigma) = all_of_them(w, g, u)
    np.testing.assert_allclose(ws, ref_ws(w), rtol=1e-12)
    np.testing.assert_allclose(ws1, ref_ws(w, 1e-3, 1), rtol=1e-12)
    np.testing.assert_allclose(sws, ref_sws(w, g), rtol=1e-12)
    np.testing.assert_allclose(wn, ref_wn(w, g), rtol=1e-12)
    np.testing.assert_allclose(cwn, ref_cwn(w, g), rtol=1e-12)
    _, u_ref, sigma_ref = ref_power(w, u, 3)
    np.testing.assert_allclose(sigma, sigma_ref, rtol=1e-12)
    np.testing.assert_allclose(new_u, u_ref, rtol=1e-12)
    np.testing.assert_allclose(out, w / sigma_ref, rtol=1e-12)
    assert out.dtype == new_u.dtype == sigma.dtype == jnp.float64


def test_standardized_kernel_has_mean_0_and_std_1_per_output_channel(conv_kernel):
    for ddof in (0, 1):
        w_hat = np.asarray(W.weight_standardization(conv_kernel, ddof=ddof), np.float64)
        flat = w_hat.reshape(-1, 4)
        np.testing.assert_allclose(flat.mean(0), 0, atol=1e-6)
        np.testing.assert_allclose(flat.std(0, ddof=ddof), 1, atol=1e-4)  # eps = 1e-5


def test_scaled_ws_rows_have_norm_gain_and_keep_unit_variance(conv_kernel, rng):
    gain = np.asarray([0.5, 1.0, 2.0, 3.0], np.float32)
    w_hat = np.asarray(W.scaled_weight_standardization(conv_kernel, gain), np.float64)
    flat = w_hat.reshape(-1, 4)
    np.testing.assert_allclose(flat.mean(0), 0, atol=1e-6)
    np.testing.assert_allclose(np.linalg.norm(flat, axis=0), gain, rtol=1e-5)
    # NF-Nets' point: x ~ N(0, 1) keeps unit variance through x W_hat (gain 1).
    x = rng.standard_normal((20000, 18))
    y = x @ np.asarray(W.scaled_weight_standardization(conv_kernel.reshape(18, 4)), np.float64)
    np.testing.assert_allclose(y.var(0), 1, atol=0.05)


def test_weight_norms_have_norm_g(conv_kernel):
    g = np.asarray([0.5, 1.0, 2.0, 3.0], np.float32)
    wn = np.asarray(W.weight_norm(conv_kernel, g), np.float64).reshape(-1, 4)
    np.testing.assert_allclose(np.linalg.norm(wn, axis=0), g, rtol=1e-6)
    # the direction is v's
    np.testing.assert_allclose(wn / g, conv_kernel.reshape(-1, 4)
                               / np.linalg.norm(conv_kernel.reshape(-1, 4), axis=0), rtol=1e-5)
    cwn = np.asarray(W.centered_weight_norm(conv_kernel, g), np.float64).reshape(-1, 4)
    np.testing.assert_allclose(cwn.mean(0), 0, atol=1e-7)
    np.testing.assert_allclose(np.linalg.norm(cwn, axis=0), g, rtol=1e-6)
    # g = None: unit norm; a scalar g: one norm
    np.testing.assert_allclose(np.linalg.norm(np.asarray(W.weight_norm(conv_kernel)).reshape(-1, 4),
                                              axis=0), 1, rtol=1e-6)
    np.testing.assert_allclose(W.weight_norm(conv_kernel, jnp.float32(2.0)),
                               2 * W.weight_norm(conv_kernel), rtol=1e-6)


def test_explicit_fan_in_axes(conv_kernel, rng):
    np.testing.assert_array_equal(W.weight_standardization(conv_kernel, fan_in_axes=(0, 1, 2)),
                                  W.weight_standardization(conv_kernel))
    # statistics over the spatial axes only: one per (in, out) pair, g of shape (2, 4)
    g = rng.random((2, 4)).astype(np.float32) + 0.5
    wn = np.asarray(W.weight_norm(conv_kernel, g, fan_in_axes=(0, 1)), np.float64)
    np.testing.assert_allclose(np.sqrt((wn ** 2).sum((0, 1))), g, rtol=1e-6)
    # every axis: one statistic for the whole kernel (a scalar g)
    ws = np.asarray(W.weight_standardization(conv_kernel, fan_in_axes=(0, 1, 2, 3)))
    np.testing.assert_allclose([ws.mean(), ws.std()], [0, 1], atol=1e-4)


def test_spectral_norm_converges_to_the_largest_singular_value(rng):
    w = rng.standard_normal((6, 2, 4)).astype(np.float32)  # viewed as (12, 4)
    sv = np.linalg.svd(w.reshape(12, 4).astype(np.float64), compute_uv=False)
    u = rng.standard_normal((1, 4)).astype(np.float32)
    step = jax.jit(lambda w, u: W.spectral_norm(w, u))
    sigmas = []
    for _ in range(30):  # one step per call, u carried over: the training regime
        out, u, sigma = step(w, u)
        sigmas.append(float(sigma))
    assert all(s <= sv[0] * (1 + 1e-6) for s in sigmas)  # v W u^T never exceeds sigma_max
    np.testing.assert_allclose(sigmas[-1], sv[0], rtol=1e-5)
    assert out.shape == w.shape and u.shape == (1, 4)
    np.testing.assert_allclose(np.linalg.svd(np.asarray(out).reshape(12, 4), compute_uv=False)[0],
                               1, rtol=1e-5)
    # (out,)-shaped u gives a (out,)-shaped u back; many steps in one call = as many calls
    out30, u30, sigma30 = jax.jit(lambda w, u: W.spectral_norm(w, u, n_steps=30))(
        w, np.ones(4, np.float32))
    assert u30.shape == (4,)
    np.testing.assert_allclose(sigma30, sv[0], rtol=1e-5)


def test_spectral_norm_of_zero_matrix_is_unchanged():
    out, u, sigma = W.spectral_norm(jnp.zeros((3, 2)), jnp.ones((1, 2)))
    assert float(sigma) == 0 and np.all(np.asarray(out) == 0) and np.all(np.isfinite(u))


# ---------------------------------------------------------------- gradients
def test_gradients_match_finite_differences(x64, rng):
    w = 0.2 + rng.standard_normal((3, 4))
    g = 0.5 + rng.random(4)
    c = rng.standard_normal((3, 4))
    functions = [
        (lambda w, g: W.weight_standardization(w), lambda w, g: ref_ws(w)),
        (lambda w, g: W.weight_standardization(w, ddof=1), lambda w, g: ref_ws(w, ddof=1)),
        (W.scaled_weight_standardization, ref_sws),
        (W.weight_norm, ref_wn),
        (W.centered_weight_norm, ref_cwn),
    ]
    # d/dw and d/dg of sum(c * f(w, g)) for every function, in one compiled call
    grads = jax.jit(lambda w, g: [jax.grad(lambda w, g: jnp.sum(c * f(w, g)), (0, 1))(w, g)
                                  for f, _ in functions])(w, g)
    for (grad_w, grad_g), (_, ref) in zip(grads, functions):
        np.testing.assert_allclose(grad_w, fd_grad(lambda w: np.sum(c * ref(w, g)), w),
                                   rtol=1e-6, atol=1e-8)
        np.testing.assert_allclose(grad_g, fd_grad(lambda g: np.sum(c * ref(w, g)), g),
                                   rtol=1e-6, atol=1e-8)


def test_spectral_norm_gradient_with_u_and_v_held_fixed(x64, rng):
    """Miyato et al.'s gradient: u and v are constants (stop_gradient), sigma = v W u^T is not."""
    w = rng.standard_normal((3, 4))
    c = rng.standard_normal((3, 4))
    u_top = np.linalg.svd(w)[2][:1]  # the top right singular vector: power iteration's limit
    u = rng.standard_normal((1, 4))
    grad = jax.jit(jax.grad(lambda w, u: jnp.sum(c * W.spectral_norm(w, u, n_steps=2)[0])))
    v0, u0, _ = ref_power(w, u, 2)
    expected = fd_grad(lambda w: np.sum(c * w / (v0 @ w @ u0.T)[0, 0]), w)
    np.testing.assert_allclose(grad(w, u), expected, rtol=1e-6, atol=1e-9)
    # at convergence it is the gradient of W / sigma_max(W) itself (envelope theorem)
    expected = fd_grad(lambda w: np.sum(c * w / np.linalg.svd(w, compute_uv=False)[0]), w)
    np.testing.assert_allclose(grad(w, u_top), expected, rtol=1e-6, atol=1e-8)


# ---------------------------------------------------------------- transforms, dtypes
def test_jit_and_vmap(rng):
    ws = rng.standard_normal((3, 6, 4)).astype(np.float32)
    gs = (rng.random((3, 4)) + 0.5).astype(np.float32)
    us = rng.standard_normal((3, 1, 4)).astype(np.float32)
    batched = jax.jit(jax.vmap(lambda w, g, u: (
        W.weight_standardization(w), W.scaled_weight_standardization(w, g), W.weight_norm(w, g),
        W.centered_weight_norm(w, g), W.spectral_norm(w, u, n_steps=2))))(ws, gs, us)
    for i in range(3):
        w, g, u = ws[i], gs[i], us[i]
        _, u_ref, sigma_ref = ref_power(w, u, 2)
        expected = (ref_ws(w), ref_sws(w, g), ref_wn(w, g), ref_cwn(w, g),
                    (w / sigma_ref, u_ref, sigma_ref))
        jax.tree.map(lambda b, e: np.testing.assert_allclose(b[i], e, rtol=1e-5, atol=1e-5),
                     batched, expected)


def test_bfloat16_kernels_use_float32_statistics(conv_kernel):
    w16 = jnp.asarray(conv_kernel, jnp.bfloat16)
    w32 = np.asarray(w16, np.float64)  # the same values
    g16 = jnp.asarray([0.5, 1.0, 2.0, 3.0], jnp.bfloat16)
    g = np.asarray(g16, np.float64)
    u = jnp.ones((1, 4), jnp.float32)
    for out, ref in [
        (W.weight_standardization(w16), ref_ws(w32)),
        (W.scaled_weight_standardization(w16, g16), ref_sws(w32, g)),
        (W.weight_norm(w16, g16), ref_wn(w32, g)),
        (W.centered_weight_norm(w16, g16), ref_cwn(w32, g)),
    ]:
        assert out.dtype == jnp.bfloat16
        # the float64 result rounded once to bfloat16: within one bfloat16 ulp (2^-8 relative)
        np.testing.assert_allclose(np.asarray(out, np.float64), ref, rtol=2 ** -8, atol=1e-3)
    out, new_u, sigma = W.spectral_norm(w16, u, n_steps=20)
    assert out.dtype == jnp.float32 and new_u.dtype == jnp.float32 and sigma.dtype == jnp.float32
    sv = np.linalg.svd(w32.reshape(-1, 4), compute_uv=False)[0]
    np.testing.assert_allclose(sigma, sv, rtol=1e-5)
    # a bfloat16 gain with a float32 kernel promotes to float32 (flax's rule)
    assert W.weight_norm(jnp.asarray(conv_kernel), g16).dtype == jnp.float32


# ---------------------------------------------------------------- errors
@pytest.mark.parametrize("call, error, words", [
    (lambda: W.weight_standardization(jnp.ones((3, 4), jnp.int32)), TypeError,
     ["kernel", "int32", "floating"]),
    (lambda: W.weight_standardization(jnp.ones((4,))), ValueError,
     ["kernel", "(4,)", "no fan-in axes"]),
    (lambda: W.weight_standardization(jnp.ones((3, 4)), fan_in_axes=2), ValueError,
     ["fan_in_axes=2", "out of range", "(3, 4)"]),
    (lambda: W.weight_standardization(jnp.ones((3, 4)), fan_in_axes=0.5), TypeError,
     ["fan_in_axes"]),
    (lambda: W.weight_standardization(jnp.ones((3, 4)), epsilon=-1.0), ValueError,
     ["epsilon=-1.0", ">= 0"]),
    (lambda: W.weight_standardization(jnp.ones((3, 4)), ddof=3), ValueError,
     ["ddof=3", "[0, 3)"]),
    (lambda: W.scaled_weight_standardization(jnp.ones((3, 4)), jnp.ones(3)), ValueError,
     ["gain", "(3,)", "(4,)"]),
    (lambda: W.weight_norm(jnp.ones((3, 4)), jnp.ones((4, 1))), ValueError,
     ["g has shape (4, 1)", "(4,)"]),
    (lambda: W.weight_norm(jnp.ones((3, 4)), jnp.ones(4, jnp.int32)), TypeError, ["g", "int32"]),
    (lambda: W.centered_weight_norm(jnp.ones((4,))), ValueError, ["v", "no fan-in axes"]),
    (lambda: W.spectral_norm(jnp.ones((3, 4)), jnp.ones((1, 3))), ValueError,
     ["u has shape (1, 3)", "(1, 4)"]),
    (lambda: W.spectral_norm(jnp.ones((4,)), jnp.ones((1, 4))), ValueError,
     ["not a matrix", "(4,)"]),
    (lambda: W.spectral_norm(jnp.ones((3, 4)), jnp.ones((1, 4)), n_steps=0), ValueError,
     ["n_steps=0", ">= 1"]),
])
def test_errors_name_the_argument(call, error, words):
    with pytest.raises(error) as info:
        call()
    for word in words:
        assert word in str(info.value), (word, str(info.value))


def test_errors_are_raised_at_trace_time():
    with pytest.raises(ValueError, match="no fan-in axes"):
        jax.jit(W.weight_standardization).lower(jax.ShapeDtypeStruct((4,), jnp.float32))
