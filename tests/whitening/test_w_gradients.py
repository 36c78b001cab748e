"""Gradients of whitening: finite on singular covariance (batch <= group), correct against finite
differences in float64 (jax.test_util.check_grads under a local enable_x64), and the custom
VJPs of the eigh-based methods equal autodiff through eigh where that is defined."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

import normzoo.functional as F
from w_helpers import x64

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
def test_check_grads_float64(rng, samples):
    # against finite differences: every method on a singular covariance (batch 3 < group 6);
    # on a regular one (groups of 3) the custom VJPs (zca, pca; the others are JAX autodiff)
    with x64():
        x = rng.standard_normal((samples, 6))
        w = jnp.asarray(rng.standard_normal((samples, 6)))
        if samples < 6:
            losses = jax.jit(_losses(1e-3))
        else:
            losses = jax.jit(_losses(1e-5, group_size=3, methods=("zca", "pca")))
        check_grads(lambda v: losses(v, w), (x,), order=1, modes=["rev"], eps=1e-6,
                    atol=1e-5, rtol=1e-5)


def test_whitening_matrix_gradient_with_repeated_eigenvalues(rng):
    # Sigma = diag(2, 2, 2, 0.5): a triple eigenvalue; zca, cholesky and newton are smooth there
    with x64():
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


def test_zca_vjp_equals_autodiff_through_eigh(rng):
    with x64():
        a = rng.standard_normal((2, 5, 5))
        sigma = jnp.asarray(a @ np.swapaxes(a, -1, -2))
        c = jnp.asarray(rng.standard_normal((2, 5, 5)))

        def plain(s):  # textbook ZCA, autodiff through eigh (fine for distinct eigenvalues)
            lam, d = jnp.linalg.eigh(s + 1e-2 * jnp.eye(5))
            return jnp.sum(c * ((d * lam[..., None, :] ** -0.5) @ jnp.swapaxes(d, -1, -2)))

        ours = jax.jit(jax.grad(lambda s: jnp.sum(c * F.whitening_matrix(s, "zca", epsilon=1e-2))))
        expected = jax.jit(jax.grad(plain))(sigma)
        np.testing.assert_allclose(ours(sigma), expected, rtol=1e-8, atol=1e-10)


def test_pca_vjp_equals_autodiff_through_eigh(rng):
    with x64():
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
