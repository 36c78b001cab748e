"""Gradients of whitening: finite on singular covariance (batch <= group), correct against finite
differences in float64 (jax.test_util.check_grads under a local enable_x64), and the custom
VJPs of the eigh-based methods equal autodiff through eigh where that is defined."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

import normzoo.functional as F

METHODS = ("zca", "pca", "cholesky", "newton")


def _losses(epsilon, iterations=5, group_size=None, methods=METHODS):
    """Scalar losses of the whitened output, one per method, stacked (one program for all
    methods keeps the compile time down; check_grads draws a separate cotangent for each, so
    the methods are checked independently). Weighted so that no symmetry hides errors."""

    def losses(x, w):
        stats = F.init_whitening_stats(x.shape[-1], group_size)
        out = []
        for method in methods:
            y, _ = F.whiten(x, stats, method=method, epsilon=epsilon, iterations=iterations,
                            group_size=group_size)
            out.append(jnp.sum(w * y) + 0.1 * jnp.sum(jnp.sin(y)))
        return jnp.stack(out)

    return losses


def test_finite_gradients_on_singular_covariance_float32(rng):
    # batch 3 < group 8: rank 2, six eigenvalues equal to epsilon; three equal samples: the
    # covariance is (about) 0, every eigenvalue is epsilon; variances ~1e4, where eps = 1e-5 is
    # below float32's resolution of Sigma (rounding makes Sigma + eps I indefinite).
    x, w = rng.standard_normal((2, 3, 8)).astype(np.float32)
    cases = np.stack([x, np.repeat(x[:1], 3, axis=0), 100 * x])
    losses = _losses(1e-5)

    # a sum is finite with a finite gradient iff every method's loss and gradient are
    value_and_grad = jax.value_and_grad(lambda v: jnp.sum(losses(v, w)))
    values, grads = jax.jit(jax.vmap(value_and_grad))(cases)
    for case, value, g in zip(["3 samples", "equal samples", "variance 1e4"], values, grads):
        assert np.isfinite(float(value)), case
        assert np.all(np.isfinite(np.asarray(g))), case


@pytest.mark.parametrize("samples", [3, 24], ids=["singular", "regular"])
def test_check_grads_float64(rng, samples, x64):
    # against finite differences: every method on a singular covariance (batch 3 < group 6);
    # on a regular one (groups of 3) the custom VJPs (zca, pca; the others are JAX autodiff)
    x = rng.standard_normal((samples, 6))
    w = jnp.asarray(rng.standard_normal((samples, 6)))
    if samples < 6:
        losses = jax.jit(_losses(1e-3))
    else:
        losses = jax.jit(_losses(1e-5, group_size=3, methods=("zca", "pca")))
    check_grads(lambda v: losses(v, w), (x,), order=1, modes=["rev"], eps=1e-6,
                atol=1e-5, rtol=1e-5)


def test_whitening_matrix_gradient_with_repeated_eigenvalues(rng, x64):
    # Sigma = diag(2, 2, 2, 0.5): a triple eigenvalue; zca, cholesky and newton are smooth there
    sigma = jnp.diag(jnp.array([2.0, 2.0, 2.0, 0.5]))
    c = jnp.asarray(rng.standard_normal((4, 4)))

    @jax.jit
    def f(s):
        return jnp.stack([
            jnp.sum(c * F.whitening_matrix(s, method, epsilon=0.1, iterations=30))
            for method in ("zca", "cholesky", "newton")
        ])

    assert np.all(np.isfinite(np.asarray(jax.jacrev(f)(sigma))))
    check_grads(f, (sigma,), order=1, modes=["rev"], eps=1e-6, atol=1e-6, rtol=1e-6)


def test_zca_vjp_equals_autodiff_through_eigh(rng, x64):
    a = rng.standard_normal((2, 5, 5))
    sigma = jnp.asarray(a @ np.swapaxes(a, -1, -2))
    c = jnp.asarray(rng.standard_normal((2, 5, 5)))

    def plain(s):  # textbook ZCA, autodiff through eigh (fine for distinct eigenvalues)
        lam, d = jnp.linalg.eigh(s + 1e-2 * jnp.eye(5))
        return jnp.sum(c * ((d * lam[..., None, :] ** -0.5) @ jnp.swapaxes(d, -1, -2)))

    ours = jax.jit(jax.grad(lambda s: jnp.sum(c * F.whitening_matrix(s, "zca", epsilon=1e-2))))
    expected = jax.jit(jax.grad(plain))(sigma)
    np.testing.assert_allclose(ours(sigma), expected, rtol=1e-8, atol=1e-10)


def test_pca_vjp_equals_autodiff_through_eigh(rng, x64):
    a = rng.standard_normal((5, 5))
    sigma = jnp.asarray(a @ a.T)
    c = jnp.asarray(rng.standard_normal((5, 5)))
    _, d0 = np.linalg.eigh(np.asarray(sigma))
    d0 = d0[:, ::-1]
    pivots = d0[np.argmax(np.abs(d0), axis=0), np.arange(5)]
    signs = jnp.asarray(np.where(pivots < 0, -1.0, 1.0))

    def plain(s):
        lam, d = jnp.linalg.eigh(s + 1e-2 * jnp.eye(5))
        lam, d = lam[::-1], d[:, ::-1] * signs
        return jnp.sum(c * (lam[:, None] ** -0.5 * d.T))

    ours = jax.jit(jax.grad(lambda s: jnp.sum(c * F.whitening_matrix(s, "pca", epsilon=1e-2))))
    expected = jax.jit(jax.grad(plain))(sigma)
    np.testing.assert_allclose(ours(sigma), expected, rtol=1e-7, atol=1e-9)


def test_plain_eigh_gradient_is_nan_on_equal_eigenvalues(rng):
    # the failure the custom VJP exists for: one sample, Sigma = 0, every eigenvalue = eps
    x = rng.standard_normal((1, 6)).astype(np.float32)

    def plain(v):
        xc = v - v.mean(0)
        lam, d = jnp.linalg.eigh(xc.T @ xc + 1e-5 * jnp.eye(6))
        return jnp.sum(jnp.sin(xc @ (d * lam**-0.5) @ d.T))

    # (normzoo's finite gradient on this case: test_finite_gradients_on_singular_covariance_float32)
    assert not np.all(np.isfinite(np.asarray(jax.jit(jax.grad(plain))(x))))


def test_cholesky_jvp_equals_autodiff_through_the_factorization(rng, x64):
    # normzoo's closed-form JVP, dPhi = -low(Phi dS Phi^T) Phi, forward and reverse, against
    # JAX's autodiff through cholesky + triangular_solve of sym(S) + eps I, batched and with
    # a non-symmetric tangent (the symmetrization is part of the function).
    a = rng.standard_normal((3, 5, 5))
    sigma = jnp.asarray(a @ np.swapaxes(a, -1, -2) / 5)
    tangent = jnp.asarray(rng.standard_normal((3, 5, 5)))
    eye = jnp.eye(5)

    def plain(s):
        chol = jnp.linalg.cholesky(0.5 * (s + jnp.swapaxes(s, -1, -2)) + 1e-2 * eye)
        return jax.lax.linalg.triangular_solve(chol, jnp.broadcast_to(eye, s.shape),
                                               left_side=True, lower=True)

    def ours(s):
        return F.whitening_matrix(s, "cholesky", epsilon=1e-2)

    # each jitted (eager, each of their many small ops would compile on its own)
    jvp = lambda f: jax.jit(lambda s, t: jax.jvp(f, (s,), (t,)))  # noqa: E731
    got, got_dot = jvp(ours)(sigma, tangent)
    want, want_dot = jvp(plain)(sigma, tangent)
    np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(got_dot, want_dot, rtol=1e-9, atol=1e-11)
    c = jnp.asarray(rng.standard_normal((3, 5, 5)))
    np.testing.assert_allclose(jax.jit(jax.grad(lambda s: jnp.sum(c * ours(s))))(sigma),
                               jax.jit(jax.grad(lambda s: jnp.sum(c * plain(s))))(sigma),
                               rtol=1e-9, atol=1e-11)
    check_grads(jax.jit(ours), (sigma,), order=1, modes=["fwd", "rev"], eps=1e-6, atol=1e-6,
                rtol=1e-6)


def test_cholesky_retries_failed_factorizations_alone_outside_vmap(rng):
    # float32, batch 3 < group 8, variances ~1e4: rounding leaves Sigma + 1e-5 I indefinite,
    # its plain factorization is NaN; that matrix alone gets a jitter and the batch is
    # factorized again (the lax.cond branch, taken here without vmap), the well-posed
    # matrix beside it unchanged.
    x = 100 * rng.standard_normal((3, 8)).astype(np.float32)
    xc = x - x.mean(0)
    singular = xc.T @ xc / 3
    b = rng.standard_normal((32, 8)).astype(np.float32)
    regular = np.cov(b, rowvar=False, bias=True).astype(np.float32)
    sigma = jnp.asarray(np.stack([singular, regular]))
    eye = np.eye(8, dtype=np.float32)
    plain = jnp.linalg.cholesky(0.5 * (sigma + jnp.swapaxes(sigma, -1, -2)) + 1e-5 * eye)
    assert np.isnan(np.asarray(plain[0])).any() and not np.isnan(np.asarray(plain[1])).any()

    phi = jax.jit(lambda s: F.whitening_matrix(s, "cholesky", epsilon=1e-5))(sigma)
    assert np.all(np.isfinite(np.asarray(phi)))
    np.testing.assert_allclose(phi[1], np.linalg.inv(np.asarray(plain[1])), rtol=1e-4, atol=1e-4)
    # the retried one is the inverse Cholesky factor of Sigma + (eps + jitter) I: lower
    # triangular, its first entry 1 / sqrt(Sigma_00 + eps + jitter)
    jitter = 8 * np.finfo(np.float32).eps * np.max(np.diag(singular))
    p0 = np.asarray(phi[0])
    assert np.all(np.triu(p0, 1) == 0)
    np.testing.assert_allclose(p0[0, 0], 1 / np.sqrt(singular[0, 0] + 1e-5 + jitter), rtol=1e-5)
    grad = jax.jit(jax.grad(lambda s: jnp.sum(jnp.sin(F.whitening_matrix(s, "cholesky",
                                                                        epsilon=1e-5)))))(sigma)
    assert np.all(np.isfinite(np.asarray(grad)))
