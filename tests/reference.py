"""float64 NumPy references for every equation the tests check, written from the papers.

One module for the whole suite (DESIGN.md section 4): each function takes NumPy (or JAX)
arrays, computes in float64 with plain NumPy and returns float64 arrays, so a test compares
normzoo against the equation and not against normzoo's own code. Taxonomy and notation:
Huang et al., "Normalization Techniques in Training DNNs", TPAMI 2023 (arXiv 2009.12836),
section 1 of REFERENCES.md: x of shape (N, ..., C), channels last.

Contents: moments (masked, over axes); the operations center / scale / standardize over an
area; batch, layer, group, instance and RMS normalization; affine recovery; the estimators
(EMA, debiased EMA, cumulative average); covariance per group of features; the whitening
matrices (ZCA, PCA, Cholesky, Newton-Schulz uncoupled and coupled); batch whitening in
groups; group whitening.
"""

from __future__ import annotations

import numpy as np


def as64(a):
    """``a`` as a float64 NumPy array."""
    return np.asarray(a, dtype=np.float64)


def _axes(axes, ndim):
    return tuple(sorted(int(a) % ndim for a in np.atleast_1d(axes)))


def _weights(x, mask):
    if mask is None:
        return np.ones_like(x)
    return np.broadcast_to(np.asarray(mask, dtype=bool), x.shape).astype(np.float64)


# ---------------------------------------------------------------- moments and operations
def moments(x, axes, mask=None):
    """Mean and biased variance over ``axes`` (keepdims), counting only where ``mask``.

    ``mu = sum(m x) / sum(m)``, ``var = sum(m (x - mu)^2) / sum(m)`` (the biased estimate,
    as BN, Ioffe & Szegedy 2015, eq. in Alg. 1).
    """
    x = as64(x)
    axes = _axes(axes, x.ndim)
    w = _weights(x, mask)
    n = w.sum(axis=axes, keepdims=True)
    mean = np.where(w > 0, x, 0.0).sum(axis=axes, keepdims=True) / n
    var = np.where(w > 0, (x - mean) ** 2, 0.0).sum(axis=axes, keepdims=True) / n
    return mean, var


def mean_square(x, axes, mask=None):
    """``E[x^2]`` over ``axes`` (keepdims), only where ``mask``: RMSNorm's statistic."""
    x = as64(x)
    axes = _axes(axes, x.ndim)
    w = _weights(x, mask)
    return np.where(w > 0, x * x, 0.0).sum(axis=axes, keepdims=True) / w.sum(axis=axes, keepdims=True)


def center(x, axes, mask=None):
    """Centering: ``x - mu`` (Huang et al. 2023, table of operations)."""
    return as64(x) - moments(x, axes, mask)[0]


def scale(x, axes, eps, mask=None):
    """Scaling: ``x / sqrt(E[x^2] + eps)``, no centering (RMSNorm, FRN)."""
    return as64(x) / np.sqrt(mean_square(x, axes, mask) + eps)


def standardize(x, axes, eps, mask=None):
    """Standardization: ``(x - mu) / sqrt(var + eps)`` with the biased variance."""
    mean, var = moments(x, axes, mask)
    return (as64(x) - mean) / np.sqrt(var + eps)


def affine(y, gamma=None, beta=None):
    """Affine recovery ``gamma * y + beta``, per feature (broadcast on the trailing axes)."""
    y = as64(y)
    if gamma is not None:
        y = y * as64(gamma)
    if beta is not None:
        y = y + as64(beta)
    return y


# ---------------------------------------------------------------- the classic layers
def batch_norm(x, gamma=None, beta=None, *, eps=1e-5, axis=-1, mean=None, var=None, mask=None):
    """Batch normalization (Ioffe & Szegedy, ICML 2015, Alg. 1).

    ``y = gamma (x - mu_B) / sqrt(var_B + eps) + beta`` with ``mu_B, var_B`` over every axis
    but the feature ``axis``; given ``mean`` and ``var`` (inference: the running estimates,
    shaped like the features) they replace the batch statistics.
    """
    x = as64(x)
    feat = _axes(axis, x.ndim)
    red = tuple(a for a in range(x.ndim) if a not in feat)
    if mean is None:
        mu, v = moments(x, red, mask)
    else:
        shape = [x.shape[a] if a in feat else 1 for a in range(x.ndim)]
        mu, v = as64(mean).reshape(shape), as64(var).reshape(shape)
    return affine((x - mu) / np.sqrt(v + eps), gamma, beta)


def batch_renorm(x, mean, var, r_max, d_max, gamma=None, beta=None, *, eps=1e-5):
    """Batch renormalization in training (Ioffe 2017, Alg. 1), x (N, C) with running
    ``mean``, ``var`` (C,): ``y = gamma ((x - mu_B) / sigma_B * r + d) + beta``,
    ``r = clip(sigma_B / sigma, 1/r_max, r_max)``, ``d = clip((mu_B - mu) / sigma, +-d_max)``,
    ``sigma_B = sqrt(var_B + eps)``, ``sigma = sqrt(var + eps)``. Returns y, r, d."""
    x = as64(x)
    mu_b, v_b = x.mean(0), x.var(0)
    sigma_b, sigma = np.sqrt(v_b + eps), np.sqrt(as64(var) + eps)
    r = np.clip(sigma_b / sigma, 1 / r_max, r_max)
    d = np.clip((mu_b - as64(mean)) / sigma, -d_max, d_max)
    return affine((x - mu_b) / sigma_b * r + d, gamma, beta), r, d


def ghost_batch_norm(x, k, gamma=None, beta=None, *, eps=1e-5):
    """Ghost batch normalization (Hoffer et al. 2017), x (N, C): BN of each chunk of ``k``
    samples; returns y and the chunks' average mean and variance."""
    x = as64(x)
    chunks = x.reshape(x.shape[0] // k, k, *x.shape[1:])
    y = np.concatenate([batch_norm(c, gamma, beta, eps=eps) for c in chunks])
    return y, chunks.mean(1).mean(0), chunks.var(1).mean(0)


def layer_norm(x, gamma=None, beta=None, *, eps=1e-6, axes=-1, mask=None):
    """Layer normalization (Ba, Kiros & Hinton 2016): standardize each sample over ``axes``."""
    return affine(standardize(x, axes, eps, mask), gamma, beta)


def rms_norm(x, gamma=None, *, eps=1e-6, axes=-1, mask=None):
    """RMSNorm (Zhang & Sennrich, NeurIPS 2019): ``gamma x / sqrt(mean(x^2) + eps)``."""
    return affine(scale(x, axes, eps, mask), gamma)


def group_norm(x, num_groups, gamma=None, beta=None, *, eps=1e-6, mask=None):
    """Group normalization (Wu & He, ECCV 2018, eq. 1-3): x (N, ..., C).

    The C channels form G groups of C/G consecutive channels; ``mu, var`` over the spatial
    axes and the C/G channels of a group, per sample. G = 1 is LN (over all but N), G = C is IN.
    """
    x = as64(x)
    shape = x.shape
    xg = x.reshape(shape[:-1] + (num_groups, shape[-1] // num_groups))
    mg = None
    if mask is not None:
        mg = np.broadcast_to(np.asarray(mask, dtype=bool), shape).reshape(xg.shape)
    axes = tuple(range(1, x.ndim - 1)) + (x.ndim,)
    return affine(standardize(xg, axes, eps, mg).reshape(shape), gamma, beta)


def instance_norm(x, gamma=None, beta=None, *, eps=1e-6, mask=None):
    """Instance normalization (Ulyanov et al. 2016): per sample and channel over the spatial
    axes of x (N, ..., C)."""
    x = as64(x)
    return affine(standardize(x, tuple(range(1, x.ndim - 1)), eps, mask), gamma, beta)


# ---------------------------------------------------------------- estimators
def ema(running, batch, momentum):
    """Flax's exponential moving average: ``running = m * running + (1 - m) * batch``."""
    return momentum * as64(running) + (1.0 - momentum) * as64(batch)


def debiased_ema(running, batch, momentum, t):
    """Debiased EMA at step ``t >= 1`` (Kingma & Ba 2015's bias correction, incremental form).

    ``running <- (1 - w) running + w batch`` with ``w = (1 - m) / (1 - m^t)``: at ``t = 1``,
    ``w = 1`` (the first batch's statistic exactly); the result after ``t`` steps equals the
    EMA started from 0 divided by ``1 - m^t``.
    """
    w = (1.0 - momentum) / (1.0 - momentum**t)
    return (1.0 - w) * as64(running) + w * as64(batch)


def cumulative(running, batch, t):
    """Cumulative average at step ``t >= 1``: weight ``1 / t`` (PyTorch ``momentum=None``)."""
    return (1.0 - 1.0 / t) * as64(running) + as64(batch) / t


def run_estimator(batches, init, update):
    """Fold ``update(running, batch, t)`` over ``batches`` (t = 1, 2, ...) from ``init``."""
    running = as64(init)
    for t, b in enumerate(batches, start=1):
        running = update(running, b, t)
    return running


# ---------------------------------------------------------------- covariance and whitening
def covariance(x2d, mask=None):
    """Mean and biased covariance ``Sigma = Xc^T Xc / m`` of the rows of x2d (m, C).

    ``mask`` (m,) selects the rows (samples) that count.
    """
    x2d = as64(x2d)
    if mask is not None:
        x2d = x2d[np.asarray(mask, dtype=bool)]
    mean = x2d.mean(axis=0)
    xc = x2d - mean
    return mean, xc.T @ xc / x2d.shape[0]


def group_covariance(x2d, group_size=None, mask=None):
    """Per group of ``group_size`` consecutive features: means (K, g) and covariances (K, g, g)."""
    x2d = as64(x2d)
    c = x2d.shape[1]
    g = c if group_size is None else group_size
    pairs = [covariance(x2d[:, k * g:(k + 1) * g], mask) for k in range(c // g)]
    return np.stack([p[0] for p in pairs]), np.stack([p[1] for p in pairs])


def eig_desc(sigma):
    """Eigenpairs in decreasing order, each eigenvector's largest-|entry| made positive."""
    lam, d = np.linalg.eigh(as64(sigma))
    lam, d = lam[::-1], d[:, ::-1]
    pivot = d[np.argmax(np.abs(d), axis=0), np.arange(d.shape[1])]
    return lam, d * np.where(pivot < 0, -1.0, 1.0)


def newton_schulz_uncoupled(sigma_n, iterations):
    """IterNorm's iteration (Huang et al. CVPR 2019, Alg. 1): ``P_0 = I``,
    ``P_k = 1.5 P_{k-1} - 0.5 P_{k-1}^3 Sigma_N``; ``P_T -> Sigma_N^-1/2``."""
    p = np.eye(sigma_n.shape[0])
    for _ in range(iterations):
        p = 1.5 * p - 0.5 * p @ p @ p @ sigma_n
    return p


def newton_schulz_coupled(sigma_n, iterations):
    """The coupled Newton-Schulz iteration (Higham, "Functions of Matrices", 2008, eq. 6.35):
    ``Y_0 = Sigma_N, Z_0 = I, T = (3I - Z Y) / 2, Y <- Y T, Z <- T Z``; equal to the uncoupled
    ``P_k`` in exact arithmetic (``Z_k = P_k``) and numerically stable."""
    eye = np.eye(sigma_n.shape[0])
    y, z = as64(sigma_n), eye
    for _ in range(iterations):
        t = 0.5 * (3.0 * eye - z @ y)
        y, z = y @ t, t @ z
    return z


def whitening_matrix(sigma, method, eps, iterations=5):
    """Whitening matrix Phi of one g x g covariance, ``Sigma_eps = Sigma + eps I = D L D^T``.

    - ``zca``: ``D L^-1/2 D^T`` (DBN, Huang et al. CVPR 2018);
    - ``pca``: ``L^-1/2 D^T`` with decreasing eigenvalues (sign convention of :func:`eig_desc`);
    - ``cholesky``: ``L^-1`` with ``L L^T = Sigma_eps`` (Siarohin et al. ICLR 2019);
    - ``newton``: ``P_T / sqrt(tr Sigma_eps)``, ``P_T`` the Newton-Schulz iterate of
      ``Sigma_N = Sigma_eps / tr Sigma_eps`` (IterNorm, Huang et al. CVPR 2019), coupled form.
    """
    sigma = as64(sigma)
    s = 0.5 * (sigma + sigma.T) + eps * np.eye(sigma.shape[0])
    if method == "zca":
        lam, d = np.linalg.eigh(s)
        return d @ np.diag(lam**-0.5) @ d.T
    if method == "pca":
        lam, d = eig_desc(s)
        return np.diag(lam**-0.5) @ d.T
    if method == "cholesky":
        return np.linalg.inv(np.linalg.cholesky(s))
    if method == "newton":
        tr = np.trace(s)
        return newton_schulz_coupled(s / tr, iterations) / np.sqrt(tr)
    raise ValueError(f"unknown whitening method {method!r}")


def whiten(x2d, method, group_size=None, eps=1e-5, iterations=5, mask=None):
    """Batch whitening of x2d (m, C) in groups of ``group_size`` consecutive features:
    ``y = Phi_k (x - mu_k)`` per group k, statistics over the (masked) rows (DBN)."""
    x2d = as64(x2d)
    c = x2d.shape[1]
    g = c if group_size is None else group_size
    y = np.empty_like(x2d)
    for k in range(c // g):
        sl = slice(k * g, (k + 1) * g)
        mean, sigma = covariance(x2d[:, sl], mask)
        y[:, sl] = (x2d[:, sl] - mean) @ whitening_matrix(sigma, method, eps, iterations).T
    return y


def group_whiten(x, num_groups, method="zca", eps=1e-5, iterations=5):
    """Group whitening (Huang et al., "Group Whitening: Balancing Learning Efficiency and
    Representational Capacity", CVPR 2021, eq. 4-6): x (N, ..., C).

    Each sample's C channels are reshaped to G groups of C/G consecutive channels; the G rows
    ``X_n`` (G, m), m = C/G times the spatial size, are centered per row and whitened with
    their own G x G covariance ``Sigma_n = Xc Xc^T / m``: ``Y_n = Phi(Sigma_n) Xc``.
    """
    x = as64(x)
    n, c = x.shape[0], x.shape[-1]
    g = num_groups
    y = np.empty_like(x)
    for i in range(n):
        xi = x[i].reshape(-1, g, c // g)  # (spatial, G, C/G)
        rows = np.moveaxis(xi, 1, 0).reshape(g, -1)  # (G, m)
        xc = rows - rows.mean(axis=1, keepdims=True)
        phi = whitening_matrix(xc @ xc.T / xc.shape[1], method, eps, iterations)
        yi = np.moveaxis((phi @ xc).reshape(g, -1, c // g), 0, 1)
        y[i] = yi.reshape(x.shape[1:])
    return y
