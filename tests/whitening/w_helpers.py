"""Shared jitted entry points for the whitening tests, so each configuration compiles once per
session, and correlated test data. The float64 references live in tests/reference.py.
"""

import jax
import numpy as np

import normzoo.functional as F


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


def correlated(rng, m, c, condition=50.0, loc=1.0, dtype=np.float32):
    """m samples of c features, population covariance with the given condition number."""
    q, _ = np.linalg.qr(rng.standard_normal((c, c)))
    lam = np.geomspace(1.0, 1.0 / condition, c)
    cov_sqrt = q @ np.diag(np.sqrt(lam))
    x = loc + rng.standard_normal((m, c)) @ cov_sqrt.T
    return x.astype(dtype), q @ np.diag(lam) @ q.T
