"""normzoo.functional: moments, center, scale, standardize, affine, ema against float64 numpy."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import normzoo.functional as F
import reference

SHAPE = (4, 5, 6)


def _x(rng, shape=SHAPE, loc=0.5, scale=2.0):
    return (loc + scale * rng.standard_normal(shape)).astype(np.float32)


def _mask(rng, shape, keep_each=None):
    m = rng.random(shape) < 0.6
    if keep_each is not None:  # guarantee >= 2 kept elements per statistic
        idx = [slice(None)] * len(shape)
        for ax in keep_each:
            idx[ax] = slice(0, 2)
        m[tuple(idx)] = True
    return m


# ---------------------------------------------------------------- moments
@pytest.mark.parametrize("axes", [0, -1, (0, 1), (1, 2), (0, 1, 2)])
@pytest.mark.parametrize("use_fast_variance", [True, False])
def test_moments_match_numpy(rng, axes, use_fast_variance):
    x = _x(rng)
    mean, var = F.moments(x, axes, use_fast_variance=use_fast_variance)
    ax = tuple(np.atleast_1d(axes) % x.ndim)
    expected_shape = tuple(n for i, n in enumerate(x.shape) if i not in ax)
    assert mean.shape == expected_shape and var.shape == expected_shape
    assert mean.dtype == jnp.float32 and var.dtype == jnp.float32
    ref_mean, ref_var = reference.moments(x, ax)
    np.testing.assert_allclose(mean, ref_mean.reshape(expected_shape), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(var, ref_var.reshape(expected_shape), rtol=1e-5, atol=1e-5)


def test_moments_negative_and_duplicate_axes_are_canonicalized(rng):
    x = _x(rng)
    m1, v1 = F.moments(x, (-1, 0))
    m2, v2 = F.moments(x, (0, 2))
    np.testing.assert_array_equal(m1, m2)
    np.testing.assert_array_equal(v1, v2)


@pytest.mark.parametrize("use_fast_variance", [True, False])
def test_moments_with_mask(rng, use_fast_variance):
    x = _x(rng)
    mask = _mask(rng, x.shape, keep_each=(2,))
    x_nan = np.where(mask, x, np.nan).astype(np.float32)  # masked-out values must not leak
    mean, var = F.moments(x_nan, -1, mask=mask, use_fast_variance=use_fast_variance)
    ref_mean, ref_var = reference.moments(x, (2,), mask)
    np.testing.assert_allclose(mean, ref_mean[..., 0], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(var, ref_var[..., 0], rtol=1e-5, atol=1e-5)


def test_moments_broadcastable_mask(rng):
    x = _x(rng)
    mask = rng.random((4, 5, 1)) < 0.6
    mask[:, :2] = True
    mean, var = F.moments(x, (0, 1), mask=mask)
    ref_mean, ref_var = reference.moments(x, (0, 1), mask)
    np.testing.assert_allclose(mean, ref_mean.ravel(), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(var, ref_var.ravel(), rtol=1e-5, atol=1e-5)


def test_moments_use_mean_false_gives_zero_mean_and_second_moment(rng):
    x = _x(rng)
    mean, var = F.moments(x, (1, 2), use_mean=False)
    np.testing.assert_array_equal(mean, np.zeros((4,), np.float32))
    np.testing.assert_allclose(var, reference.mean_square(x, (1, 2)).ravel(), rtol=1e-5)


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_moments_half_precision_input_reduces_in_float32(rng, dtype):
    x32 = _x(rng, (64, 8))
    x = jnp.asarray(x32, dtype)
    mean, var = F.moments(x, 0)
    assert mean.dtype == jnp.float32 and var.dtype == jnp.float32
    # reference: the same (rounded) values, upcast, in float64
    ref_mean, ref_var = reference.moments(np.asarray(x.astype(jnp.float32)), (0,))
    np.testing.assert_allclose(mean, ref_mean.ravel(), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(var, ref_var.ravel(), rtol=1e-5, atol=1e-5)


def test_moments_float64_input_stays_float64(x64):
    rng = np.random.default_rng(1)
    x = 3.0 + rng.standard_normal((16, 3))
    mean, var = F.moments(jnp.asarray(x, jnp.float64), 0)
    assert mean.dtype == jnp.float64 and var.dtype == jnp.float64
    np.testing.assert_allclose(var, x.var(0), rtol=1e-12)
    np.testing.assert_allclose(mean, x.mean(0), rtol=1e-12)


def test_moments_variance_never_negative():
    # identical values: any one-pass formula may round to a tiny negative number
    x = jnp.full((32, 4), 1234.5678, jnp.float32)
    _, var = F.moments(x, 0)
    assert np.all(np.asarray(var) >= 0)
    np.testing.assert_allclose(var, 0.0, atol=1e-6)


# ---------------------------------------------------------------- center / scale / standardize
@pytest.mark.parametrize("axes", [-1, (1, 2)])
def test_center(rng, axes):
    x = _x(rng)
    y = F.center(x, axes)
    ax = tuple(np.atleast_1d(axes) % 3)
    np.testing.assert_allclose(y, reference.center(x, ax), rtol=1e-5, atol=1e-5)


def test_center_default_axis_is_last(rng):
    x = _x(rng)
    np.testing.assert_allclose(F.center(x), reference.center(x, (2,)), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("axes", [-1, (1, 2)])
def test_scale(rng, axes):
    x = _x(rng)
    ax = tuple(np.atleast_1d(axes) % 3)
    y = F.scale(x, axes, epsilon=1e-3)
    np.testing.assert_allclose(y, reference.scale(x, ax, 1e-3), rtol=1e-5, atol=1e-5)


def test_scale_default_epsilon_is_1e_6(rng):
    x = (1e-3 * rng.standard_normal((4, 6))).astype(np.float32)  # E[x^2] ~ 1e-6 ~ eps
    np.testing.assert_allclose(F.scale(x), reference.scale(x, (1,), 1e-6), rtol=1e-4)


@pytest.mark.parametrize("axes", [-1, (1, 2), (0, 1)])
@pytest.mark.parametrize("use_fast_variance", [True, False])
def test_standardize(rng, axes, use_fast_variance):
    x = _x(rng)
    ax = tuple(np.atleast_1d(axes) % 3)
    y = F.standardize(x, axes, epsilon=1e-4, use_fast_variance=use_fast_variance)
    np.testing.assert_allclose(y, reference.standardize(x, ax, 1e-4), rtol=1e-5, atol=2e-5)


def test_standardize_default_epsilon_is_1e_5(rng):
    x = (3e-3 * rng.standard_normal((4, 6))).astype(np.float32)  # var ~ 1e-5 ~ eps
    np.testing.assert_allclose(F.standardize(x), reference.standardize(x, (1,), 1e-5), rtol=1e-4)


def test_center_scale_standardize_with_mask(rng):
    x = _x(rng)
    mask = _mask(rng, x.shape, keep_each=(2,))
    xn = np.where(mask, x, np.nan).astype(np.float32)
    for got, ref in [
        (F.center(xn, -1, mask=mask), reference.center(x, (2,), mask)),
        (F.scale(xn, -1, mask=mask), reference.scale(x, (2,), 1e-6, mask)),
        (F.standardize(xn, -1, mask=mask), reference.standardize(x, (2,), 1e-5, mask)),
    ]:
        got = np.asarray(got)
        np.testing.assert_allclose(got[mask], ref[mask], rtol=1e-5, atol=2e-5)


def test_standardize_output_moments(rng):
    x = _x(rng, (3, 50))
    y = np.asarray(F.standardize(x, -1, epsilon=0.0), np.float64)
    np.testing.assert_allclose(y.mean(-1), 0.0, atol=1e-5)
    np.testing.assert_allclose(y.var(-1), 1.0, rtol=1e-4)


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_standardize_half_precision_close_to_float32_path(rng, dtype):
    x = jnp.asarray(_x(rng, (8, 32)), dtype)
    y = F.standardize(x, -1)
    ref = reference.standardize(np.asarray(x.astype(jnp.float32)), (1,), 1e-5)
    # statistics in float32; only the output rounding (8 / 11 mantissa bits) may differ
    tol = 2e-2 if dtype == jnp.bfloat16 else 3e-3
    np.testing.assert_allclose(np.asarray(y, np.float32), ref, rtol=tol, atol=tol)
    assert np.all(np.isfinite(np.asarray(y, np.float32)))


# ---------------------------------------------------------------- affine / ema
def test_affine_last_axis(rng):
    y = _x(rng)
    s = rng.standard_normal(6).astype(np.float32)
    b = rng.standard_normal(6).astype(np.float32)
    np.testing.assert_allclose(F.affine(y, s, b), y * s + b, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(F.affine(y, s), y * s, rtol=1e-6)
    np.testing.assert_allclose(F.affine(y, bias=b), y + b, rtol=1e-6)
    np.testing.assert_array_equal(F.affine(y), y)


def test_affine_multiple_feature_axes(rng):
    y = _x(rng)
    s = rng.standard_normal((5, 6)).astype(np.float32)
    b = rng.standard_normal((5, 6)).astype(np.float32)
    out = F.affine(y, s, b, feature_axes=(1, 2))
    np.testing.assert_allclose(out, y * s[None] + b[None], rtol=1e-6, atol=1e-6)
    s1 = rng.standard_normal(5).astype(np.float32)
    out = F.affine(y, s1, feature_axes=1)
    np.testing.assert_allclose(out, y * s1[None, :, None], rtol=1e-6, atol=1e-6)


def test_affine_dtype(rng):
    y = _x(rng)
    s = np.ones(6, np.float32)
    out = F.affine(y, s, dtype=jnp.bfloat16)
    assert out.dtype == jnp.bfloat16


def test_ema_arrays_and_dicts():
    run = {"mean": jnp.zeros(3), "var": jnp.ones(3)}
    batch = {"mean": jnp.array([1.0, 2.0, 3.0]), "var": jnp.array([4.0, 5.0, 6.0])}
    out = F.ema(run, batch, 0.9)
    assert set(out) == {"mean", "var"}
    np.testing.assert_allclose(out["mean"], [0.1, 0.2, 0.3], rtol=1e-6)
    np.testing.assert_allclose(out["var"], [0.9 + 0.4, 0.9 + 0.5, 0.9 + 0.6], rtol=1e-6)
    np.testing.assert_allclose(F.ema(jnp.float32(2.0), jnp.float32(4.0), 0.25), 3.5)
    # momentum 1 keeps the running value; momentum 0 takes the batch value
    np.testing.assert_array_equal(F.ema(run, batch, 1.0)["var"], run["var"])
    np.testing.assert_array_equal(F.ema(run, batch, 0.0)["var"], batch["var"])


# ------------------------------------------------- reduced_moments: the three variance methods

@pytest.mark.parametrize("loc", [0.0, 1e4])
@pytest.mark.parametrize("method", ["two_pass", "shifted", "guarded"])
def test_reduced_moments_methods_match_float64(rng, method, loc):
    from normzoo.functional.moments import pilot, reduced_moments

    x = jnp.asarray(loc + rng.standard_normal((64, 6)), jnp.float32)
    mean_of = lambda v: jnp.mean(v, 0, keepdims=True)  # noqa: E731
    shift = pilot(x, (0,)) if method == "shifted" else None
    mean, var = jax.jit(lambda x: reduced_moments(x, mean_of, True, method, shift))(x)
    x64 = np.asarray(x, np.float64)
    np.testing.assert_allclose(mean[0], x64.mean(0), rtol=1e-6)
    # 1e4 + N(0, 1): E[x^2] - E[x]^2 alone would be off by ~8 (float32 spacing at 1e8)
    np.testing.assert_allclose(var[0], x64.var(0), rtol=1e-4)


def test_reduced_moments_guarded_takes_the_exact_branch_only_when_needed(rng):
    from normzoo.functional.moments import reduced_moments

    mean_of = lambda v: jnp.mean(v, 0, keepdims=True)  # noqa: E731
    x = jnp.asarray(rng.standard_normal((32, 3)), jnp.float32)
    jaxpr = jax.make_jaxpr(lambda x: reduced_moments(x, mean_of, True, "guarded"))(x)
    assert "cond" in str(jaxpr)  # the exact pass sits behind a lax.cond
    # a constant column: E[x^2] > 0 = var, the exact branch returns exactly 0
    const = jnp.full((32, 3), 7.0, jnp.float32)
    _, var = reduced_moments(const, mean_of, True, "guarded")
    np.testing.assert_array_equal(var, 0.0)


def test_reduced_moments_rejects_unknown_method_and_missing_pilot():
    from normzoo.functional.moments import reduced_moments

    x = jnp.ones((4, 2))
    mean_of = lambda v: jnp.mean(v, 0, keepdims=True)  # noqa: E731
    with pytest.raises(ValueError, match="method='fast'"):
        reduced_moments(x, mean_of, True, "fast")
    with pytest.raises(ValueError, match="pilot"):
        reduced_moments(x, mean_of, True, "shifted")
