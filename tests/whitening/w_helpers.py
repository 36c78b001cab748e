"""float64 numpy references for whitening, written from the equations (REFERENCES.md section 2),
plus shared jitted entry points so each configuration compiles once per session.
"""

import jax
import numpy as np

import normzoo.functional as F


def x64():
    """float64 locally (never globally): ``jax.enable_x64(True)`` or the older experimental one."""
    if hasattr(jax, "enable_x64"):
        return jax.enable_x64(True)
    from jax import experimental

    return experimental.enable_x64()


# ---------------------------------------------------------------- jitted library calls
_STATIC = (
    "method", "axis", "group_size", "iterations", "train", "momentum", "epsilon",
    "running_average_of", "recovery", "axis_name", "axis_index_groups", "dtype",
)
whiten = jax.jit(F.whiten, static_argnames=_STATIC)
whitening_matrix = jax.jit(F.whitening_matrix, static_argnames=("method", "epsilon", "iterations"))


def whiten_batch(x, method="zca", group_size=None, epsilon=1e-5, iterations=5, axis=-1, **kw):
    """Training-mode whitening of x with fresh statistics (y only)."""
    feat = tuple(np.atleast_1d(axis) % x.ndim)
    shape = tuple(x.shape[a] for a in feat)
    stats = F.init_whitening_stats(shape, group_size, kw.get("running_average_of", "covariance"))
    y, _ = whiten(x, stats, method=method, group_size=group_size, epsilon=epsilon,
                  iterations=iterations, axis=axis, **kw)
    return np.asarray(y, np.float64)


# ---------------------------------------------------------------- numpy references
def np_cov(x2d, mask=None):
    """Biased mean and covariance of the rows of x2d (m, C), float64."""
    x2d = np.asarray(x2d, np.float64)
    if mask is not None:
        x2d = x2d[np.asarray(mask, bool)]
    mean = x2d.mean(axis=0)
    xc = x2d - mean
    return mean, xc.T @ xc / x2d.shape[0]


def np_eig_desc(sigma):
    """Eigenpairs in decreasing order, each vector's largest-|entry| made positive."""
    lam, d = np.linalg.eigh(sigma)
    lam, d = lam[::-1], d[:, ::-1]
    pivot = d[np.argmax(np.abs(d), axis=0), np.arange(d.shape[1])]
    return lam, d * np.where(pivot < 0, -1.0, 1.0)


def np_phi(sigma, method, eps, iterations=5):
    """Whitening matrix of one g x g covariance (float64), from the papers' equations."""
    g = sigma.shape[0]
    s = np.asarray(sigma, np.float64) + eps * np.eye(g)
    if method == "zca":  # D Lambda^-1/2 D^T
        lam, d = np.linalg.eigh(s)
        return d @ np.diag(lam**-0.5) @ d.T
    if method == "pca":  # Lambda^-1/2 D^T
        lam, d = np_eig_desc(s)
        return np.diag(lam**-0.5) @ d.T
    if method == "cholesky":  # L^-1
        return np.linalg.inv(np.linalg.cholesky(s))
    if method == "newton":  # IterNorm: P_k = 1.5 P - 0.5 P^3 Sigma_N, Phi = P_T / sqrt(tr)
        tr = np.trace(s)
        sn = s / tr
        p = np.eye(g)
        for _ in range(iterations):
            p = 1.5 * p - 0.5 * p @ p @ p @ sn
        return p / np.sqrt(tr)
    raise ValueError(method)


def np_whiten(x2d, method, group_size=None, eps=1e-5, iterations=5, mask=None):
    """Batch whitening of x2d (m, C) in groups of consecutive features, float64."""
    x2d = np.asarray(x2d, np.float64)
    c = x2d.shape[1]
    g = c if group_size is None else group_size
    y = np.empty_like(x2d)
    for k in range(c // g):
        sl = slice(k * g, (k + 1) * g)
        mean, sigma = np_cov(x2d[:, sl], mask)
        y[:, sl] = (x2d[:, sl] - mean) @ np_phi(sigma, method, eps, iterations).T
    return y


def correlated(rng, m, c, condition=50.0, loc=1.0, dtype=np.float32):
    """m samples of c features, population covariance with the given condition number."""
    q, _ = np.linalg.qr(rng.standard_normal((c, c)))
    lam = np.geomspace(1.0, 1.0 / condition, c)
    cov_sqrt = q @ np.diag(np.sqrt(lam))
    x = loc + rng.standard_normal((m, c)) @ cov_sqrt.T
    return x.astype(dtype), q @ np.diag(lam) @ q.T
