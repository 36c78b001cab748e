"""normzoo.functional.whiten / whitening_matrix: numpy float64 references and the properties of
issue 3 (output covariance, ZCA / Cholesky structure, Newton convergence, groups, running
statistics, dtypes, jit / vmap, masks, errors)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import normzoo.functional as F
import reference
from w_helpers import correlated, whiten, whiten_batch, whitening_matrix

METHODS = ("zca", "pca", "cholesky", "newton")


def _off(a):
    return np.linalg.norm(a - np.diag(np.diag(a)))


# ---------------------------------------------------------------- forward vs numpy float64
@pytest.mark.parametrize(
    "method, group_size", [(m, 4) for m in METHODS] + [("zca", None), ("newton", None)]
)
def test_forward_matches_float64_reference(rng, method, group_size):
    x, _ = correlated(rng, 64, 8, condition=10.0)
    y = whiten_batch(x, method, group_size, epsilon=1e-3)
    np.testing.assert_allclose(y, reference.whiten(x, method, group_size, eps=1e-3), atol=1e-4, rtol=1e-4)


def test_forward_channels_last_conv(rng):
    x = rng.standard_normal((6, 4, 4, 8)).astype(np.float32)
    y = whiten_batch(x, "zca", 4, epsilon=1e-3)
    ref = reference.whiten(x.reshape(-1, 8), "zca", 4, eps=1e-3).reshape(x.shape)
    np.testing.assert_allclose(y, ref, atol=1e-4, rtol=1e-4)


def test_feature_axis_not_last(rng):
    x = rng.standard_normal((40, 6, 3)).astype(np.float32)  # (N, C, L), features on axis 1
    y = whiten_batch(x, "cholesky", epsilon=1e-3, axis=1)
    ref = reference.whiten(np.moveaxis(x, 1, -1).reshape(-1, 6), "cholesky", eps=1e-3)
    np.testing.assert_allclose(np.moveaxis(y, 1, -1).reshape(-1, 6), ref, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("method", METHODS)
def test_whitening_matrix_matches_reference(rng, method):
    a = rng.standard_normal((3, 5, 5))
    sigma = (a @ np.swapaxes(a, -1, -2) / 5).astype(np.float32)
    phi = whitening_matrix(sigma, method=method, epsilon=1e-2, iterations=5)
    for k in range(3):
        np.testing.assert_allclose(phi[k], reference.whitening_matrix(sigma[k], method, 1e-2), atol=1e-4, rtol=1e-4)


# ---------------------------------------------------------------- properties
@pytest.fixture(scope="module")
def big_batch():
    """1024 samples, 16 features, condition number 50 (issue 3's setting)."""
    return correlated(np.random.default_rng(1), 1024, 16, condition=50.0, loc=3.0)[0]


@pytest.mark.parametrize("method", ["zca", "pca", "cholesky"])
def test_training_output_is_white(big_batch, method):
    y = whiten_batch(big_batch, method, epsilon=1e-6)
    np.testing.assert_allclose(np.cov(y.T, bias=True), np.eye(16), atol=2e-2)
    np.testing.assert_allclose(y.mean(axis=0), 0.0, atol=1e-4)


def test_zca_cross_covariance_is_symmetric_positive_definite(big_batch):
    y = whiten_batch(big_batch, "zca", epsilon=1e-6)
    xc = big_batch - big_batch.mean(axis=0)
    cross = y.T @ xc / len(y)  # = Phi Sigma = Sigma^1/2, symmetric PD
    np.testing.assert_allclose(cross, cross.T, atol=1e-3 * np.abs(cross).max())
    assert np.linalg.eigvalsh(0.5 * (cross + cross.T)).min() > 0


def test_zca_is_rotation_equivariant(big_batch, rng):
    q, _ = np.linalg.qr(rng.standard_normal((16, 16)))
    y = whiten_batch(big_batch, "zca", epsilon=1e-6)
    y_rot = whiten_batch((big_batch @ q).astype(np.float32), "zca", epsilon=1e-6)
    np.testing.assert_allclose(y_rot, y @ q, atol=2e-3)


def test_cholesky_first_feature_is_standardized(big_batch):
    y = whiten_batch(big_batch, "cholesky", epsilon=1e-6)
    x0 = big_batch[:, 0].astype(np.float64)
    np.testing.assert_allclose(y[:, 0], (x0 - x0.mean()) / np.sqrt(x0.var() + 1e-6), atol=1e-4)


def test_newton_five_steps_remove_most_correlation(big_batch):
    _, sigma = reference.covariance(big_batch)
    before = _off(np.corrcoef(big_batch.T))
    ratios = []
    for t in (1, 3, 5):
        phi = np.asarray(whitening_matrix(sigma.astype(np.float32), method="newton",
                                          epsilon=1e-6, iterations=t), np.float64)
        cov_y = phi @ sigma @ phi.T
        d = np.sqrt(np.diag(cov_y))
        ratios.append(_off(cov_y / np.outer(d, d)) / before)
    assert ratios[0] > ratios[1] > ratios[2]  # partial whitening, improving with each step
    assert ratios[2] < 0.5


def test_newton_thirty_steps_equal_zca(big_batch):
    zca = whiten_batch(big_batch, "zca", epsilon=1e-6)
    newton = whiten_batch(big_batch, "newton", epsilon=1e-6, iterations=30)
    np.testing.assert_allclose(newton, zca, atol=1e-3)


def test_coupled_newton_is_stable_for_many_iterations(rng):
    # condition 1e4: the paper's uncoupled iteration amplifies rounding errors in float32 and
    # blows up; the coupled one converges to ZCA and stays there
    q, _ = np.linalg.qr(rng.standard_normal((16, 16)))
    sigma = (q @ np.diag(np.geomspace(1, 1e-4, 16)) @ q.T).astype(np.float32)
    sigma = 0.5 * (sigma + sigma.T)

    def error(phi):
        phi = np.asarray(phi, np.float64)
        return np.abs(phi @ sigma.astype(np.float64) @ phi.T - np.eye(16)).max()

    p, sn, tr = np.eye(16, dtype=np.float32), sigma / np.trace(sigma), np.trace(sigma)
    with np.errstate(all="ignore"):
        for _ in range(60):
            p = 1.5 * p - 0.5 * p @ p @ p @ sn
    assert not error(p / np.sqrt(tr)) < 1  # uncoupled: NaN or far off

    phi = whitening_matrix(sigma, method="newton", epsilon=0.0, iterations=60)
    assert error(phi) < 1e-3
    zca = reference.whitening_matrix(sigma, "zca", 0.0)
    np.testing.assert_allclose(phi, zca, atol=1e-3 * np.abs(zca).max())


def test_group_whitening_leaves_cross_group_correlation(rng):
    x, sigma_pop = correlated(rng, 2048, 8, condition=20.0)
    y = whiten_batch(x, "zca", group_size=4, epsilon=1e-6)
    c = np.cov(y.T, bias=True)
    for k in range(2):
        np.testing.assert_allclose(c[4 * k:4 * k + 4, 4 * k:4 * k + 4], np.eye(4), atol=1e-3)
    _, sigma = reference.covariance(x)
    phi = [reference.whitening_matrix(sigma[s, s], "zca", 1e-6) for s in (slice(0, 4), slice(4, 8))]
    expected = phi[0] @ sigma[:4, 4:] @ phi[1].T  # cross-group block, untouched
    np.testing.assert_allclose(c[:4, 4:], expected, atol=1e-3)
    assert np.abs(expected).max() > 0.1


@pytest.mark.parametrize(
    "method, running_average_of", [("zca", "covariance"), ("newton", "whitening_matrix")]
)
def test_inference_whitens_fresh_samples_after_training(rng, method, running_average_of):
    _, sigma = correlated(rng, 1, 8, condition=20.0)
    chol = np.linalg.cholesky(sigma).astype(np.float32)
    stats = F.init_whitening_stats(8, running_average_of=running_average_of)
    iterations = 15 if method == "newton" else 5

    @jax.jit
    def train(stats, key):
        def step(stats, k):
            x = 2.0 + jax.random.normal(k, (256, 8)) @ chol.T
            _, stats = F.whiten(x, stats, method=method, momentum=0.9, epsilon=1e-5,
                                iterations=iterations, running_average_of=running_average_of)
            return stats, None
        return jax.lax.scan(step, stats, jax.random.split(key, 80))[0]

    stats = train(stats, jax.random.key(0))
    fresh = 2.0 + rng.standard_normal((4096, 8)).astype(np.float32) @ chol.T
    y, same = whiten(fresh, stats, method=method, train=False, iterations=iterations,
                     running_average_of=running_average_of)
    jax.tree.map(np.testing.assert_array_equal, same, stats)  # inference leaves them alone
    y = np.asarray(y, np.float64)
    np.testing.assert_allclose(np.cov(y.T, bias=True), np.eye(8), atol=0.15)
    np.testing.assert_allclose(y.mean(axis=0), 0.0, atol=0.15)


@pytest.mark.parametrize("running_average_of", ["covariance", "whitening_matrix"])
def test_running_statistics_update_rule(rng, running_average_of):
    x = rng.standard_normal((32, 4)).astype(np.float32)
    stats = {"mean": jnp.full((4,), 0.5), running_average_of: 2.0 * jnp.eye(4)[None]}
    _, new = whiten(x, stats, momentum=0.8, epsilon=1e-3, running_average_of=running_average_of)
    mean, sigma = reference.covariance(x)
    batch = sigma if running_average_of == "covariance" else reference.whitening_matrix(sigma, "zca", 1e-3)
    np.testing.assert_allclose(new["mean"], 0.8 * 0.5 + 0.2 * mean, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(new[running_average_of][0], 0.8 * 2 * np.eye(4) + 0.2 * batch,
                               rtol=1e-4, atol=1e-5)
    assert all(v.dtype == jnp.float32 for v in new.values())


@pytest.mark.parametrize("running_average_of", ["covariance", "whitening_matrix"])
def test_inference_uses_running_statistics(rng, running_average_of):
    x = rng.standard_normal((16, 4)).astype(np.float32)
    a = rng.standard_normal((4, 4))
    running = (a @ a.T / 4 + np.eye(4)).astype(np.float32)
    mean = jnp.asarray(rng.standard_normal(4), jnp.float32)
    stats = {"mean": mean, running_average_of: running[None]}
    y, _ = whiten(x, stats, method="cholesky", train=False, epsilon=1e-3,
                  running_average_of=running_average_of)
    phi = reference.whitening_matrix(running, "cholesky", 1e-3) if running_average_of == "covariance" else running
    np.testing.assert_allclose(y, (x - np.asarray(stats["mean"])) @ phi.T, rtol=1e-4, atol=1e-4)


def test_affine_recovery(rng):
    x = rng.standard_normal((32, 4)).astype(np.float32)
    scale, bias = rng.standard_normal((2, 4)).astype(np.float32)
    y, _ = whiten(x, F.init_whitening_stats(4), scale, bias, epsilon=1e-3)
    expected = reference.whiten(x, "zca", eps=1e-3) * scale + bias
    np.testing.assert_allclose(y, expected, rtol=1e-4, atol=1e-4)


def test_coloring_recovery(rng):
    x = rng.standard_normal((32, 8)).astype(np.float32)
    w = rng.standard_normal((2, 4, 4)).astype(np.float32)
    bias = rng.standard_normal(8).astype(np.float32)
    y, _ = whiten(x, F.init_whitening_stats(8, 4), w, bias, group_size=4, epsilon=1e-3,
                  recovery="coloring")
    yw = reference.whiten(x, "zca", 4, eps=1e-3)
    expected = np.concatenate([yw[:, :4] @ w[0].T, yw[:, 4:] @ w[1].T], axis=1) + bias
    np.testing.assert_allclose(y, expected, rtol=1e-4, atol=1e-4)


def test_mask_equals_whitening_the_selected_samples(rng):
    x = rng.standard_normal((40, 6)).astype(np.float32)
    mask = rng.random(40) < 0.5
    x_nan = np.where(mask[:, None], x, np.nan).astype(np.float32)
    y, _ = whiten(x_nan, F.init_whitening_stats(6), mask=mask[:, None], epsilon=1e-3)
    ref = reference.whiten(x[mask], "zca", eps=1e-3)
    np.testing.assert_allclose(np.asarray(y)[mask], ref, rtol=1e-4, atol=1e-4)


def test_axis_name_under_vmap_equals_full_batch(rng):
    x = rng.standard_normal((4, 16, 6)).astype(np.float32)
    stats = F.init_whitening_stats(6, 3)
    y, new = jax.jit(jax.vmap(
        lambda v: F.whiten(v, stats, group_size=3, epsilon=1e-3, axis_name="b"), axis_name="b"
    ))(x)
    ref = reference.whiten(x.reshape(-1, 6), "zca", 3, eps=1e-3).reshape(x.shape)
    np.testing.assert_allclose(y, ref, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(new["covariance"][0], new["covariance"][3])


def test_vmap_without_axis_name_whitens_each_slice(rng):
    x = rng.standard_normal((3, 20, 4)).astype(np.float32)
    y, _ = jax.jit(jax.vmap(lambda v: F.whiten(v, F.init_whitening_stats(4), epsilon=1e-3)))(x)
    for k in range(3):
        np.testing.assert_allclose(y[k], reference.whiten(x[k], "zca", eps=1e-3), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("method", ["zca", "newton"])
def test_bf16_input_with_float32_statistics(rng, method):
    x = rng.standard_normal((64, 8)).astype(jnp.bfloat16)
    y, new = whiten(x, F.init_whitening_stats(8), method=method, epsilon=1e-3)
    assert y.dtype == jnp.bfloat16
    assert all(v.dtype == jnp.float32 for v in new.values())
    ref = reference.whiten(np.asarray(x, np.float32), method, eps=1e-3)
    np.testing.assert_allclose(np.asarray(y, np.float32), ref, atol=5e-2, rtol=2e-2)
    y32, _ = jax.eval_shape(lambda s: F.whiten(x, F.init_whitening_stats(8), s), jnp.ones(8))
    assert y32.dtype == jnp.float32  # promotion with float32 params, as flax.linen


def test_output_dtype_option(rng):
    x = rng.standard_normal((16, 4)).astype(np.float32)
    y, _ = jax.eval_shape(lambda v: F.whiten(v, F.init_whitening_stats(4), dtype=jnp.float16), x)
    assert y.dtype == jnp.float16


# ---------------------------------------------------------------- errors (one per message)
def _call(x=None, stats=None, *args, **kw):
    x = jnp.ones((8, 4)) if x is None else x
    stats = F.init_whitening_stats(x.shape[-1]) if stats is None else stats
    return F.whiten(x, stats, *args, **kw)


def test_error_group_size_not_dividing():
    with pytest.raises(ValueError, match=r"group_size=3 must be a positive divisor of the 4"):
        _call(group_size=3)


def test_error_unknown_method():
    with pytest.raises(ValueError, match=r"method='svd' is unknown; expected one of"):
        _call(method="svd")


def test_error_batch_dimension_missing():
    with pytest.raises(ValueError, match=r"x has shape \(4,\) and axis=-1 covers every axis"):
        _call(jnp.ones((4,)))


def test_error_unknown_running_average_of():
    with pytest.raises(ValueError, match=r"running_average_of='sigma' is unknown"):
        _call(running_average_of="sigma")


def test_error_unknown_recovery():
    with pytest.raises(ValueError, match=r"recovery='whiten' is unknown"):
        _call(recovery="whiten")


def test_error_bad_iterations():
    with pytest.raises(ValueError, match=r"iterations=0 must be an int >= 1"):
        _call(method="newton", iterations=0)


def test_error_negative_epsilon():
    with pytest.raises(ValueError, match=r"epsilon=-1.0 must be a float >= 0"):
        _call(epsilon=-1.0)


def test_error_momentum_out_of_range():
    with pytest.raises(ValueError, match=r"momentum=1.5 must be in \[0, 1\]"):
        _call(momentum=1.5)


def test_error_stats_keys():
    with pytest.raises(ValueError, match=r"stats has keys \['mean', 'var'\]; expected a dict"):
        _call(stats={"mean": jnp.zeros(4), "var": jnp.ones(4)})


def test_error_stats_shape():
    match = r"stats\['covariance'\] has shape \(1, 4, 4\); expected \(2, 2, 2\)"
    with pytest.raises(ValueError, match=match):
        _call(group_size=2)


def test_error_scale_shape():
    with pytest.raises(ValueError, match=r"scale has shape \(3,\); expected \(4,\)"):
        _call(None, None, jnp.ones(3))


def test_error_coloring_shape():
    with pytest.raises(ValueError, match=r"scale has shape \(4,\); expected \(1, 4, 4\).*coloring"):
        _call(None, None, jnp.ones(4), recovery="coloring")


def test_error_bias_shape():
    with pytest.raises(ValueError, match=r"bias has shape \(5,\); expected \(4,\)"):
        _call(None, None, None, jnp.ones(5))


def test_error_mask_shape():
    with pytest.raises(ValueError, match=r"mask has shape \(3,\), which does not broadcast"):
        _call(mask=jnp.ones(3, bool))


def test_error_axis_out_of_range():
    with pytest.raises(ValueError, match=r"axis=2 is out of range"):
        _call(axis=2)


def test_error_integer_input():
    with pytest.raises(TypeError, match="expected a floating dtype"):
        _call(jnp.ones((8, 4), jnp.int32))


def test_error_whitening_matrix_not_square():
    with pytest.raises(ValueError, match=r"cov has shape \(3, 4\); expected square"):
        F.whitening_matrix(jnp.ones((3, 4)))


def test_error_init_stats_group_size():
    with pytest.raises(ValueError, match=r"group_size=5 must be a positive divisor of the 8"):
        F.init_whitening_stats(8, 5)
