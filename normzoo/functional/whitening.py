"""Whitening in groups: ZCA, PCA, Cholesky and Newton-Schulz (IterNorm), with running statistics.

Per group of ``g`` features, with ``Sigma`` the covariance over the batch area and
``Sigma_eps = Sigma + eps I = D Lambda D^T``, whitening is ``y = Phi (x - mu)`` with
``Phi^T Phi = Sigma_eps^-1`` (so ``Cov[y] = Phi Sigma Phi^T ~ I``):

============  ==================================  ==============================================
method        Phi                                 reference
============  ==================================  ==============================================
``zca``       D Lambda^-1/2 D^T (symmetric)       Bell & Sejnowski 1997; DBN, Huang et al. 2018
``pca``       Lambda^-1/2 D^T (descending order)  DBN paper, section 3 (fails: axis swapping)
``cholesky``  L^-1, L L^T = Sigma_eps             Siarohin et al. ICLR 2019 (whitening, coloring)
``newton``    Z_T / sqrt(tr Sigma_eps)            IterNorm, Huang et al. CVPR 2019
============  ==================================  ==============================================

ZCA is the whitening closest to its input (it minimizes ``E||y - (x - mu)||^2``) and is
rotation-equivariant. PCA's rows are the eigenvectors, whose order and sign change between
batches ("stochastic axis swapping"), so networks trained with it diverge; normzoo orders
them by decreasing eigenvalue and makes the largest-magnitude entry of each positive, which
fixes the sign convention but cannot stop swaps of nearly equal eigenvalues.

Newton-Schulz. IterNorm normalizes ``Sigma_N = Sigma_eps / tr(Sigma_eps)`` (eigenvalues in
(0, 1], where the iteration converges) and iterates ``P_k = 1.5 P_{k-1} - 0.5 P_{k-1}^3 Sigma_N``
from ``P_0 = I``. That uncoupled form is numerically unstable: rounding errors outside the
commuting polynomial family grow, so many iterations drift. normzoo runs the *coupled*
iteration (Higham, "Functions of Matrices", 2008, eq. 6.35), identical in exact arithmetic
(``Z_k = P_k``, ``Y_k = Sigma_N P_k``) and stable::

    Y_0 = Sigma_N, Z_0 = I,  T_k = (3 I - Z_k Y_k) / 2,  Y_{k+1} = Y_k T_k,  Z_{k+1} = T_k Z_k,

so ``Z_T -> Sigma_N^-1/2`` and ``Phi = Z_T / sqrt(tr Sigma_eps)`` converges to ZCA; a few
steps (IterNorm's default 5) whiten partially, stretching small eigen-directions less.

Gradients. Autodiff through ``eigh`` multiplies by ``1 / (lambda_i - lambda_j)``: Inf/NaN when
eigenvalues repeat, which they do whenever the batch has ``m <= g`` samples (the ``g - m + 1``
null directions all get eigenvalue ``eps``). ZCA is a spectral function ``f(Sigma_eps)``,
``f(l) = l^-1/2``, whose derivative is the Daleckii-Krein formula
``dPhi = D (K o (D^T dSigma D)) D^T`` with the divided differences
``K_ij = (f(l_i) - f(l_j)) / (l_i - l_j) = -1 / (s_i s_j (s_i + s_j))``, ``s = sqrt(l)``: finite
and exact for repeated eigenvalues too (``K_ii = f'(l_i)``), with no cancellation. PCA is not a
function of ``Sigma`` on a repeated eigenspace (any rotation of it is a valid ``D``); its VJP
zeroes the ``1 / (l_i - l_j)`` terms of (numerically) equal eigenvalues, which is exact when the
loss does not depend on the basis within the eigenspace, as for the null space of a small batch
(its outputs are zero). Cholesky's JVP is the closed form ``dPhi = -low(Phi dSigma Phi^T) Phi``
(``low``: the strict lower triangle plus half the diagonal), from one factorization; Newton
uses JAX's autodiff (finite for ``eps > 0``).

Rounding. A singular ``Sigma`` computed in float32 has null eigenvalues of about
``ulp(||Sigma||)``, possibly negative and larger than ``eps``. ZCA and PCA clamp them at 0
before adding ``eps``; Cholesky adds a jitter of ``g ulp(max diag)`` to the matrices whose
factorization fails; Newton is scale-free (trace normalization).

Running statistics, two schools (``running_average_of``):

* ``"covariance"`` (Switchable Whitening, Pan et al. ICCV 2019; WC-GAN): EMA of ``mu`` and
  ``Sigma``; ``Phi`` is recomputed from the running covariance at inference, which whitens
  the population: ``Phi(E[Sigma])``. Costs one ``O(g^3)`` factorization per call at inference.
* ``"whitening_matrix"`` (DBN and IterNorm reference code): EMA of ``mu`` and ``Phi`` itself;
  inference is a matrix product. Note ``E[Sigma_B^-1/2] != (E[Sigma_B])^-1/2``: for small
  batches the averaged matrix over-whitens (``Sigma_B^-1/2`` is biased upward, Jensen), but it
  is the average of the transforms the network was trained with.

Cost per group: ``O(g^2 m)`` for the covariance and for applying ``Phi``, plus ``O(g^3)`` for
``Phi`` (eigh, Cholesky, or ``3 T`` matrix products for Newton), so ``C/g`` groups cost
``O(C g m + C g^2)``.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from normzoo.functional.axes import (
    Axes,
    canonicalize_axes,
    check_floating,
    check_mask,
    check_momentum,
)
from normzoo.functional.covariance import (
    HIGHEST,
    MatrixView,
    check_group_size,
    combine_covariance_across_devices,
    local_covariance,
)
from normzoo.functional.moments import statistics_dtype
from normzoo.functional.operations import output_dtype
from normzoo.functional.running import ema

Array = jax.Array
Stats = dict[str, Array]

METHODS = ("zca", "pca", "cholesky", "newton")
RUNNING_AVERAGES = ("covariance", "whitening_matrix")
RECOVERIES = ("affine", "coloring")


def check_method(method: str) -> None:
    if method not in METHODS:
        raise ValueError(f"method={method!r} is unknown; expected one of {METHODS}")


def _check_choice(value: Any, name: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"{name}={value!r} is unknown; expected one of {choices}")


def _check_iterations(iterations: Any) -> None:
    integer = isinstance(iterations, (int, np.integer)) and not isinstance(iterations, bool)
    if not integer or iterations < 1:
        raise ValueError(f"iterations={iterations!r} must be an int >= 1 (Newton-Schulz steps)")


def _check_epsilon(epsilon: Any) -> None:
    if not isinstance(epsilon, (int, float, np.floating)) or not epsilon >= 0:
        raise ValueError(f"epsilon={epsilon!r} must be a float >= 0 (added to the covariance)")


def _symmetrize(a: Array) -> Array:
    return 0.5 * (a + jnp.swapaxes(a, -1, -2))


def _eye_like(a: Array) -> Array:
    return jnp.broadcast_to(jnp.eye(a.shape[-1], dtype=a.dtype), a.shape)


def _eigh(sigma: Array, epsilon: float) -> tuple[Array, Array]:
    """Eigenpairs of ``sigma + eps I``: ascending ``(lam, D)``, ``lam >= eps``.

    ``sigma`` is PSD; rounding can make its null eigenvalues slightly negative, so they are
    clamped at 0 before ``eps`` is added (same eigenvectors), which keeps ``lam^-1/2`` finite.
    """
    lam, d = jnp.linalg.eigh(_symmetrize(sigma), symmetrize_input=False)
    return jnp.maximum(lam, 0) + epsilon, d


def _quad(d: Array, inner: Array) -> Array:
    """``D inner D^T``."""
    return jnp.einsum("...ij,...jk,...lk->...il", d, inner, d, precision=HIGHEST)


# ---------------------------------------------------------------- ZCA
@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def _zca(sigma: Array, epsilon: float) -> Array:
    lam, d = _eigh(sigma, epsilon)
    return _quad(d, lax.rsqrt(lam)[..., None] * _eye_like(d))


def _zca_fwd(sigma, epsilon):
    lam, d = _eigh(sigma, epsilon)
    return _quad(d, lax.rsqrt(lam)[..., None] * _eye_like(d)), (lam, d)


def _zca_bwd(epsilon, residuals, g):
    lam, d = residuals
    s = jnp.sqrt(lam)
    # Divided differences of f(l) = l^-1/2: -1 / (s_i s_j (s_i + s_j)); diagonal = f'(l_i).
    k = -1.0 / (s[..., :, None] * s[..., None, :] * (s[..., :, None] + s[..., None, :]))
    inner = k * jnp.einsum("...ji,...jk,...kl->...il", d, _symmetrize(g), d, precision=HIGHEST)
    return (_quad(d, inner),)


_zca.defvjp(_zca_fwd, _zca_bwd)


# ---------------------------------------------------------------- PCA
def _pca_basis(sigma: Array, epsilon: float) -> tuple[Array, Array]:
    """Descending eigenpairs with the sign convention: each column's largest |entry| > 0."""
    lam, d = _eigh(sigma, epsilon)
    lam, d = lam[..., ::-1], d[..., ::-1]
    pivot = jnp.take_along_axis(d, jnp.argmax(jnp.abs(d), axis=-2)[..., None, :], axis=-2)
    return lam, d * jnp.where(pivot < 0, -1.0, 1.0).astype(d.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def _pca(sigma: Array, epsilon: float) -> Array:
    lam, u = _pca_basis(sigma, epsilon)
    return lax.rsqrt(lam)[..., :, None] * jnp.swapaxes(u, -1, -2)


def _pca_fwd(sigma, epsilon):
    lam, u = _pca_basis(sigma, epsilon)
    return lax.rsqrt(lam)[..., :, None] * jnp.swapaxes(u, -1, -2), (lam, u)


def _pca_bwd(epsilon, residuals, g):
    lam, u = residuals
    f = lax.rsqrt(lam)
    # Phi = diag(f) U^T:  dL/df_i = (G U)_ii,  dL/dU = G^T diag(f).
    f_bar = jnp.einsum("...ij,...ji->...i", g, u, precision=HIGHEST)
    lam_bar = f_bar * (-0.5) * f**3
    u_bar = jnp.swapaxes(g, -1, -2) * f[..., None, :]
    # Eigenvector derivative: F_ij = 1 / (l_j - l_i), zeroed for (numerically) equal l.
    diff = lam[..., None, :] - lam[..., :, None]
    tol = 16 * lam.shape[-1] * jnp.finfo(lam.dtype).eps * jnp.max(lam, axis=-1)[..., None, None]
    degenerate = jnp.abs(diff) <= tol
    f_mat = jnp.where(degenerate, 0.0, 1.0 / jnp.where(degenerate, 1.0, diff))
    inner = f_mat * jnp.einsum("...ji,...jk->...ik", u, u_bar, precision=HIGHEST)
    inner = inner + lam_bar[..., None] * _eye_like(u)
    return (_symmetrize(_quad(u, inner)),)


_pca.defvjp(_pca_fwd, _pca_bwd)


# ---------------------------------------------------------------- Cholesky, Newton
def _cholesky_inverse(sigma_eps: Array) -> Array:
    """``L^-1`` with ``L L^T = sigma_eps`` (symmetric), one factorization per matrix.

    When eps is below the float resolution of a singular Sigma (e.g. float32, variances ~1e4,
    batch < group), rounding leaves Sigma + eps I numerically indefinite and the
    factorization fails (NaN). Those matrices alone get a jitter of ``g ulp(max diag)``
    and the batch is factorized again, in a branch that runs only when a factorization
    failed (under ``vmap`` both branches run), so well-posed inputs cost one factorization
    and are unchanged.
    """
    eye = _eye_like(sigma_eps)
    chol = jnp.linalg.cholesky(sigma_eps, symmetrize_input=False)
    failed = jnp.any(jnp.isnan(chol), axis=(-2, -1))

    def retry(chol):
        diag_max = jnp.max(jnp.diagonal(sigma_eps, axis1=-2, axis2=-1), axis=-1)
        jitter = sigma_eps.shape[-1] * jnp.finfo(sigma_eps.dtype).eps * diag_max
        shifted = sigma_eps + jnp.where(failed, jitter, 0.0)[..., None, None] * eye
        return jnp.linalg.cholesky(shifted, symmetrize_input=False)

    chol = lax.cond(jnp.any(failed), retry, lambda chol: chol, chol)
    return lax.linalg.triangular_solve(chol, eye, left_side=True, lower=True)


@functools.partial(jax.custom_jvp, nondiff_argnums=(1,))
def _cholesky(sigma: Array, epsilon: float) -> Array:
    return _cholesky_inverse(_symmetrize(sigma) + epsilon * _eye_like(sigma))


@_cholesky.defjvp
def _cholesky_jvp(epsilon, primals, tangents):
    # Phi = L^-1, L L^T = S:  Phi dS Phi^T = X + X^T with X = Phi dL lower triangular, so
    # X = low(Phi dS Phi^T) (strict lower part plus half the diagonal) and
    # dPhi = -Phi dL Phi = -X Phi. The jitter of a failed factorization is a constant.
    (sigma,), (dsigma,) = primals, tangents
    phi = _cholesky(sigma, epsilon)
    mm = functools.partial(jnp.matmul, precision=HIGHEST)
    a = mm(mm(phi, _symmetrize(dsigma)), jnp.swapaxes(phi, -1, -2))
    low = jnp.tril(a, -1) + 0.5 * a * _eye_like(a)
    return phi, -mm(low, phi)


def _newton(sigma: Array, epsilon: float, iterations: int) -> Array:
    eye = _eye_like(sigma)
    sigma = _symmetrize(sigma) + epsilon * eye
    trace = jnp.trace(sigma, axis1=-2, axis2=-1)[..., None, None]
    mm = functools.partial(jnp.matmul, precision=HIGHEST)

    def step(_, yz):
        y, z = yz
        t = 1.5 * eye - 0.5 * mm(z, y)
        return mm(y, t), mm(t, z)

    _, z = lax.fori_loop(0, iterations, step, (sigma / trace, eye))
    return _symmetrize(z) * lax.rsqrt(trace)


def whitening_matrix(
    cov: Array,
    method: str = "zca",
    *,
    epsilon: float = 1e-5,
    iterations: int = 5,
) -> Array:
    """Whitening matrices ``Phi`` of covariance matrices ``cov`` (..., g, g), batched.

    ``Phi^T Phi = (cov + eps I)^-1`` for ``zca``, ``pca`` and ``cholesky`` (exactly) and for
    ``newton`` in the limit of many ``iterations`` (see the module docstring for each form).

    Args:
      cov: (..., g, g) symmetric positive semi-definite matrices (float32 or float64).
      method: ``"zca"``, ``"pca"``, ``"cholesky"`` or ``"newton"``.
      epsilon: added to the diagonal (> 0 for a singular ``cov``).
      iterations: Newton-Schulz steps (``newton`` only; IterNorm's default is 5).

    Returns:
      ``Phi`` of the shape and dtype of ``cov``. Gradients are finite for every method,
      including repeated eigenvalues and singular ``cov`` (custom VJP for zca / pca).
    """
    check_method(method)
    _check_epsilon(epsilon)
    _check_iterations(iterations)
    cov = jnp.asarray(cov)
    if cov.ndim < 2 or cov.shape[-1] != cov.shape[-2]:
        raise ValueError(f"cov has shape {cov.shape}; expected square matrices (..., g, g)")
    if method == "zca":
        return _zca(cov, float(epsilon))
    if method == "pca":
        return _pca(cov, float(epsilon))
    if method == "cholesky":
        return _cholesky(cov, float(epsilon))
    return _newton(cov, float(epsilon), int(iterations))


# ---------------------------------------------------------------- running statistics
def init_whitening_stats(
    feature_shape: tuple[int, ...] | int,
    group_size: int | None = None,
    running_average_of: str = "covariance",
    dtype: Any = jnp.float32,
) -> Stats:
    """Initial running statistics: ``mean`` zeros, and identity matrices per group.

    Returns ``{"mean": (C...), "covariance" | "whitening_matrix": (C/g, g, g)}`` so that
    inference before any training step is (about) the identity.
    """
    _check_choice(running_average_of, "running_average_of", RUNNING_AVERAGES)
    shape = (feature_shape,) if isinstance(feature_shape, int) else tuple(feature_shape)
    features = int(np.prod(shape, dtype=np.int64))
    num_groups = check_group_size(features, group_size)
    g = features // num_groups
    eye = jnp.broadcast_to(jnp.eye(g, dtype=dtype), (num_groups, g, g))
    return {"mean": jnp.zeros(shape, dtype), running_average_of: eye}


def _check_stats(stats: Any, running_average_of: str, feature_shape, matrix_shape) -> None:
    keys = ("mean", running_average_of)
    if not isinstance(stats, dict) or set(stats) != set(keys):
        got = sorted(stats) if isinstance(stats, dict) else type(stats).__name__
        raise ValueError(
            f"stats has keys {got}; expected a dict with keys {list(keys)} for "
            f"running_average_of={running_average_of!r} (see init_whitening_stats)"
        )
    for key, shape in (("mean", feature_shape), (running_average_of, matrix_shape)):
        if tuple(jnp.shape(stats[key])) != tuple(shape):
            raise ValueError(
                f"stats[{key!r}] has shape {tuple(jnp.shape(stats[key]))}; expected {tuple(shape)}"
            )


def _check_params(scale, bias, recovery, view, num_groups) -> None:
    g = view.features // num_groups
    if scale is not None:
        expected = view.feature_shape if recovery == "affine" else (num_groups, g, g)
        if tuple(jnp.shape(scale)) != tuple(expected):
            what = "the feature sizes" if recovery == "affine" else "(groups, g, g) matrices"
            raise ValueError(
                f"scale has shape {tuple(jnp.shape(scale))}; expected {tuple(expected)}, "
                f"{what} for recovery={recovery!r}"
            )
    if bias is not None and tuple(jnp.shape(bias)) != view.feature_shape:
        raise ValueError(
            f"bias has shape {tuple(jnp.shape(bias))}; expected {view.feature_shape}, "
            "the feature sizes"
        )


def _recover(y, scale, bias, recovery, view, num_groups, precision):
    """Affine (per feature) or coloring (full matrix per group) on the matrix view (m, C)."""
    if scale is not None:
        if recovery == "affine":
            y = y * jnp.reshape(scale, (-1,))
        else:
            g = view.features // num_groups
            yg = y.reshape(y.shape[:-1] + (num_groups, g))
            y = jnp.einsum("...gj,gij->...gi", yg, scale.astype(y.dtype), precision=precision)
            y = y.reshape(y.shape[:-2] + (view.features,))
    if bias is not None:
        y = y + jnp.reshape(bias, (-1,))
    return y


def whiten(
    x: Array,
    stats: Stats,
    scale: Array | None = None,
    bias: Array | None = None,
    *,
    method: str = "zca",
    axis: Axes = -1,
    group_size: int | None = None,
    iterations: int = 5,
    train: bool = True,
    momentum: float = 0.99,
    epsilon: float = 1e-5,
    running_average_of: str = "covariance",
    recovery: str = "affine",
    mask: Array | None = None,
    axis_name: Any = None,
    axis_index_groups: Any = None,
    dtype: Any = None,
    precision: Any = HIGHEST,
) -> tuple[Array, Stats]:
    """Batch whitening in groups (DBN, Huang et al. CVPR 2018; IterNorm, Huang et al. CVPR 2019).

    ``y = recovery(Phi (x - mu))`` per group of ``group_size`` features, with ``mu`` and the
    covariance ``Sigma`` over every axis but ``axis`` (the batch area) in training, and the
    running statistics at inference (``train=False``); ``Phi = whitening_matrix(Sigma, method)``.

    Args:
      x: (N, ..., C) input (``axis`` the feature axis or axes; all others are samples).
      stats: running statistics from :func:`init_whitening_stats`: ``{"mean": (C...),
        running_average_of: (C/g, g, g)}``, float32.
      scale: ``recovery="affine"``: per-feature scale (C...); ``"coloring"``: a full matrix per
        group (C/g, g, g) applied as ``y_group = scale[k] @ y_group`` (Siarohin et al. 2019).
      bias: optional per-feature bias (C...).
      method: ``"zca"`` (default), ``"pca"``, ``"cholesky"`` or ``"newton"``.
      group_size: features per group; ``None`` = all features in one group.
      iterations: Newton-Schulz steps for ``method="newton"``.
      train: batch statistics and updated running ones; else the running ones.
      momentum: EMA decay, ``new = momentum * stats + (1 - momentum) * batch`` (Flax).
      epsilon: added to the covariance's diagonal.
      running_average_of: ``"covariance"`` (EMA of Sigma; Phi recomputed at inference) or
        ``"whitening_matrix"`` (EMA of Phi, as the DBN / IterNorm reference code).
      recovery: ``"affine"`` or ``"coloring"``.
      mask: optional bool, broadcastable to x: which samples count in the statistics (a
        sample counts if its mask holds for all its features).
      axis_name, axis_index_groups: statistics also over this named axis, count-weighted.
      dtype: output dtype (default: promotion of x and params, as flax.linen).
      precision: of the matrix products (default ``HIGHEST``).

    Returns:
      ``(y, new_stats)``: y like x; ``new_stats`` is ``stats`` when ``train`` is False.

    Raises:
      ValueError naming the argument: unknown ``method`` / ``running_average_of`` /
      ``recovery``, a ``group_size`` that does not divide the features, an input without a
      batch (sample) axis, bad ``stats`` / ``scale`` / ``bias`` / ``mask`` shapes.
    """
    check_floating(x)
    if jnp.iscomplexobj(x):
        raise TypeError(f"x has dtype {jnp.result_type(x)}; whitening supports real inputs only")
    check_method(method)
    _check_choice(running_average_of, "running_average_of", RUNNING_AVERAGES)
    _check_choice(recovery, "recovery", RECOVERIES)
    _check_iterations(iterations)
    _check_epsilon(epsilon)
    if isinstance(momentum, (int, float)):
        check_momentum(momentum)
    feature_axes = canonicalize_axes(x.ndim, axis, name="axis")
    reduction_axes = tuple(a for a in range(x.ndim) if a not in feature_axes)
    if not reduction_axes:
        raise ValueError(
            f"x has shape {tuple(x.shape)} and axis={axis!r} covers every axis: batch whitening "
            "needs a batch (sample) axis besides the features, e.g. x of shape (N, C)"
        )
    view = MatrixView(x.shape, reduction_axes, feature_axes)
    num_groups = check_group_size(view.features, group_size)
    g = view.features // num_groups
    _check_stats(stats, running_average_of, view.feature_shape, (num_groups, g, g))
    _check_params(scale, bias, recovery, view, num_groups)
    mask = check_mask(mask, x.shape)
    out_dtype = output_dtype(x, scale, bias, dtype)
    xm = view.to_matrix(jnp.asarray(x).astype(statistics_dtype(x)))  # (m, C), float32+

    if train:
        count, mean, m2 = local_covariance(xm, view.sample_mask(mask), num_groups, precision)
        if axis_name is not None:
            count, mean, m2 = combine_covariance_across_devices(
                count, mean, m2, axis_name, axis_index_groups
            )
        cov = m2 / count
        phi = whitening_matrix(cov, method, epsilon=epsilon, iterations=iterations)
        batch = {"mean": jnp.reshape(mean, view.feature_shape)}
        batch[running_average_of] = cov if running_average_of == "covariance" else phi
        new_stats = ema(stats, jax.lax.stop_gradient(batch), momentum)
    else:
        mean = jnp.reshape(stats["mean"], (-1,)).astype(xm.dtype)
        running = jnp.asarray(stats[running_average_of]).astype(xm.dtype)
        if running_average_of == "covariance":
            phi = whitening_matrix(running, method, epsilon=epsilon, iterations=iterations)
        else:
            phi = running
        new_stats = stats

    xc = (xm - mean).reshape(xm.shape[:-1] + (num_groups, g))
    y = jnp.einsum("...gj,gij->...gi", xc, phi, precision=precision)
    y = y.reshape(xm.shape)
    y = _recover(y, scale, bias, recovery, view, num_groups, precision)
    return view.from_matrix(y.astype(out_dtype)), new_stats
