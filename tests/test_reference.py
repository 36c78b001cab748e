"""tests/reference.py against itself: where two equations of the papers describe the same
quantity, the float64 references agree, so a slip in one of them cannot hide."""

import numpy as np
import pytest

import reference


def _spd(rng, g, condition=100.0):
    q, _ = np.linalg.qr(rng.standard_normal((g, g)))
    return q @ np.diag(np.geomspace(1.0, 1.0 / condition, g)) @ q.T


@pytest.mark.parametrize("method", ["zca", "pca", "cholesky"])
def test_whitening_matrices_invert_the_covariance(rng, method):
    sigma, eps = _spd(rng, 5), 1e-3
    phi = reference.whitening_matrix(sigma, method, eps)
    np.testing.assert_allclose(phi.T @ phi, np.linalg.inv(sigma + eps * np.eye(5)), rtol=1e-9, atol=1e-9)


def test_newton_schulz_coupled_equals_uncoupled_and_converges_to_zca(rng):
    sigma = _spd(rng, 6, condition=20.0)
    sn = sigma / np.trace(sigma)
    for t in (1, 3, 5):  # IterNorm's T; the uncoupled form drifts for many steps
        np.testing.assert_allclose(reference.newton_schulz_coupled(sn, t),
                                   reference.newton_schulz_uncoupled(sn, t), rtol=1e-9, atol=1e-9)
    np.testing.assert_allclose(reference.whitening_matrix(sigma, "newton", 0.0, iterations=60),
                               reference.whitening_matrix(sigma, "zca", 0.0), rtol=1e-8, atol=1e-8)


def test_whiten_gives_identity_covariance_per_group(rng):
    x = 1.0 + rng.standard_normal((40, 6)) @ rng.standard_normal((6, 6))
    y = reference.whiten(x, "cholesky", group_size=3, eps=0.0)
    _, cov = reference.group_covariance(y, 3)
    np.testing.assert_allclose(cov, np.broadcast_to(np.eye(3), (2, 3, 3)), atol=1e-10)


def test_group_whiten_whitens_each_samples_group_rows(rng):
    x = rng.standard_normal((2, 5, 3, 8))  # (N, H, W, C), G = 4 rows of C/G = 2 channels
    y = reference.group_whiten(x, 4, "zca", eps=0.0)
    for n in range(2):
        rows = np.moveaxis(y[n].reshape(15, 4, 2), 1, 0).reshape(4, 30)
        np.testing.assert_allclose(rows.mean(axis=1), 0.0, atol=1e-12)
        np.testing.assert_allclose(rows @ rows.T / 30, np.eye(4), atol=1e-10)


def test_group_norm_spans_layer_norm_and_instance_norm(rng):
    x = rng.standard_normal((2, 3, 4, 6))
    np.testing.assert_allclose(reference.group_norm(x, 1, eps=1e-6),
                               reference.layer_norm(x, eps=1e-6, axes=(1, 2, 3)), atol=1e-12)
    np.testing.assert_allclose(reference.group_norm(x, 6, eps=1e-6),
                               reference.instance_norm(x, eps=1e-6), atol=1e-12)


def test_estimators_closed_forms(rng):
    batches, m = rng.standard_normal((6, 3)), 0.9
    ema = reference.run_estimator(batches, np.zeros(3), lambda r, b, t: reference.ema(r, b, m))
    debiased = reference.run_estimator(batches, np.full(3, 7.0),
                                       lambda r, b, t: reference.debiased_ema(r, b, m, t))
    np.testing.assert_allclose(debiased, ema / (1 - m**6), rtol=1e-12)  # Adam's bias correction
    np.testing.assert_allclose(reference.debiased_ema(np.full(3, 7.0), batches[0], m, 1), batches[0])
    mean = reference.run_estimator(batches, np.full(3, 7.0), lambda r, b, t: reference.cumulative(r, b, t))
    np.testing.assert_allclose(mean, batches.mean(axis=0), rtol=1e-12)


def test_masked_moments_equal_the_moments_of_the_kept_values(rng):
    x, mask = rng.standard_normal((5, 4)), rng.random((5, 4)) < 0.6
    mask[0] = True
    mean, var = reference.moments(x, 0, mask)
    for j in range(4):
        kept = x[mask[:, j], j]
        np.testing.assert_allclose([mean[0, j], var[0, j]], [kept.mean(), kept.var()], rtol=1e-12)
