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
(its outputs are zero). All three rules are JVPs (``custom_jvp``), linear in the tangent, so forward and
reverse mode both work. Cholesky's JVP is the closed form ``dPhi = -low(Phi dSigma Phi^T) Phi``
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

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from normzoo.functional.factorize import serial_on_cpu
from normzoo.functional.area import Resolved
from normzoo.functional.axes import broadcast_shape, split_groups
from normzoo.functional.covariance import (
    HIGHEST,
    MatrixView,
    check_group_size,
    combine_covariance_across_devices,
    local_covariance,
)
from normzoo.functional.moments import statistics_dtype
from normzoo.functional.operations import output_dtype
from normzoo.functional.reduction import Reduction, check_epsilon

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


def _symmetrize(a: Array) -> Array:
    return 0.5 * (a + jnp.swapaxes(a, -1, -2))


def _eye_like(a: Array) -> Array:
    return jnp.broadcast_to(jnp.eye(a.shape[-1], dtype=a.dtype), a.shape)


_EIGH = {False: functools.partial(jnp.linalg.eigh, symmetrize_input=False)}
_EIGH[True] = serial_on_cpu(_EIGH[False])


def _eigh(sigma: Array, epsilon: float, serial: bool) -> tuple[Array, Array]:
    """Eigenpairs of ``sigma + eps I``: ascending ``(lam, D)``, ``lam >= eps``.

    ``sigma`` is PSD; rounding can make its null eigenvalues slightly negative, so they are
    clamped at 0 before ``eps`` is added (same eigenvectors), which keeps ``lam^-1/2`` finite.
    ``serial``: one matrix at a time on CPU (:mod:`normzoo.functional.factorize`).
    """
    lam, d = _EIGH[serial](_symmetrize(sigma))
    return jnp.maximum(lam, 0) + epsilon, d


def _quad(d: Array, inner: Array) -> Array:
    """``D inner D^T``."""
    return jnp.einsum("...ij,...jk,...lk->...il", d, inner, d, precision=HIGHEST)


# ---------------------------------------------------------------- ZCA
def _zca_from(lam: Array, d: Array) -> Array:
    return _quad(d, lax.rsqrt(lam)[..., None] * _eye_like(d))


@functools.partial(jax.custom_jvp, nondiff_argnums=(1, 2))
def _zca(sigma: Array, epsilon: float, serial: bool) -> Array:
    return _zca_from(*_eigh(sigma, epsilon, serial))


@_zca.defjvp
def _zca_jvp(epsilon, serial, primals, tangents):
    # Daleckii-Krein: dPhi = D (K o (D^T dSigma D)) D^T, K the divided differences of
    # f(l) = l^-1/2, -1 / (s_i s_j (s_i + s_j)) with s = sqrt(l) (diagonal: f'(l_i)). The
    # tangent map is linear in dSigma, so reverse mode is its transpose (the same formula).
    (sigma,), (dsigma,) = primals, tangents
    lam, d = _eigh(sigma, epsilon, serial)
    s = jnp.sqrt(lam)
    k = -1.0 / (s[..., :, None] * s[..., None, :] * (s[..., :, None] + s[..., None, :]))
    inner = k * jnp.einsum("...ji,...jk,...kl->...il", d, _symmetrize(dsigma), d,
                           precision=HIGHEST)
    return _zca_from(lam, d), _quad(d, inner)


# ---------------------------------------------------------------- PCA
def _pca_basis(sigma: Array, epsilon: float, serial: bool) -> tuple[Array, Array]:
    """Descending eigenpairs with the sign convention: each column's largest |entry| > 0."""
    lam, d = _eigh(sigma, epsilon, serial)
    lam, d = lam[..., ::-1], d[..., ::-1]
    pivot = jnp.take_along_axis(d, jnp.argmax(jnp.abs(d), axis=-2)[..., None, :], axis=-2)
    return lam, d * jnp.where(pivot < 0, -1.0, 1.0).astype(d.dtype)


@functools.partial(jax.custom_jvp, nondiff_argnums=(1, 2))
def _pca(sigma: Array, epsilon: float, serial: bool) -> Array:
    lam, u = _pca_basis(sigma, epsilon, serial)
    return lax.rsqrt(lam)[..., :, None] * jnp.swapaxes(u, -1, -2)


@_pca.defjvp
def _pca_jvp(epsilon, serial, primals, tangents):
    # Phi = diag(f) U^T, f = lam^-1/2: with A = U^T dSigma U, dlam = diag(A) and
    # dU = U (F o A), F_ij = 1 / (l_j - l_i) zeroed for (numerically) equal eigenvalues:
    # exact when the loss does not depend on the basis within an eigenspace (module
    # docstring). Linear in dSigma, so reverse mode is its transpose.
    (sigma,), (dsigma,) = primals, tangents
    lam, u = _pca_basis(sigma, epsilon, serial)
    f = lax.rsqrt(lam)
    a = jnp.einsum("...ji,...jk,...kl->...il", u, _symmetrize(dsigma), u, precision=HIGHEST)
    diff = lam[..., None, :] - lam[..., :, None]
    tol = 16 * lam.shape[-1] * jnp.finfo(lam.dtype).eps * jnp.max(lam, axis=-1)[..., None, None]
    degenerate = jnp.abs(diff) <= tol
    f_mat = jnp.where(degenerate, 0.0, 1.0 / jnp.where(degenerate, 1.0, diff))
    du = jnp.einsum("...ij,...jk->...ik", u, f_mat * a, precision=HIGHEST)
    df = -0.5 * f**3 * jnp.diagonal(a, axis1=-2, axis2=-1)
    ut = jnp.swapaxes(u, -1, -2)
    phi = f[..., :, None] * ut
    return phi, df[..., :, None] * ut + f[..., :, None] * jnp.swapaxes(du, -1, -2)


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


_CHOLESKY_INVERSE = {False: _cholesky_inverse, True: serial_on_cpu(_cholesky_inverse)}


@functools.partial(jax.custom_jvp, nondiff_argnums=(1, 2))
def _cholesky(sigma: Array, epsilon: float, serial: bool) -> Array:
    return _CHOLESKY_INVERSE[serial](_symmetrize(sigma) + epsilon * _eye_like(sigma))


@_cholesky.defjvp
def _cholesky_jvp(epsilon, serial, primals, tangents):
    # Phi = L^-1, L L^T = S:  Phi dS Phi^T = X + X^T with X = Phi dL lower triangular, so
    # X = low(Phi dS Phi^T) (strict lower part plus half the diagonal) and
    # dPhi = -Phi dL Phi = -X Phi. The jitter of a failed factorization is a constant.
    (sigma,), (dsigma,) = primals, tangents
    phi = _cholesky(sigma, epsilon, serial)
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
    serial_on_cpu: bool = True,
) -> Array:
    """Whitening matrices ``Phi`` of covariance matrices ``cov`` (..., g, g), batched.

    ``Phi^T Phi = (cov + eps I)^-1`` for ``zca``, ``pca`` and ``cholesky`` (exactly) and for
    ``newton`` in the limit of many ``iterations`` (see the module docstring for each form).

    Args:
      cov: (..., g, g) symmetric positive semi-definite matrices (float32 or float64).
      method: ``"zca"``, ``"pca"``, ``"cholesky"`` or ``"newton"``.
      epsilon: added to the diagonal (> 0 for a singular ``cov``).
      iterations: Newton-Schulz steps (``newton`` only; IterNorm's default is 5).
      serial_on_cpu: on CPU, factorize one matrix at a time, also under ``vmap``
        (:mod:`normzoo.functional.factorize`: batched LAPACK calls that run concurrently can
        hang jaxlib's CPU thread pool). ``False`` keeps the batched call, for a batch of
        matrices that is sharded over devices (a loop over it would gather it).

    Returns:
      ``Phi`` of the shape and dtype of ``cov``. Gradients are finite for every method,
      including repeated eigenvalues and singular ``cov`` (custom VJP for zca / pca).
    """
    check_method(method)
    check_epsilon(epsilon)
    _check_iterations(iterations)
    cov = jnp.asarray(cov)
    if cov.ndim < 2 or cov.shape[-1] != cov.shape[-2]:
        raise ValueError(f"cov has shape {cov.shape}; expected square matrices (..., g, g)")
    if method == "zca":
        return _zca(cov, float(epsilon), bool(serial_on_cpu))
    if method == "pca":
        return _pca(cov, float(epsilon), bool(serial_on_cpu))
    if method == "cholesky":
        return _cholesky(cov, float(epsilon), bool(serial_on_cpu))
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


@dataclasses.dataclass(frozen=True)
class Whiten:
    """Whitening as an operation of the engine: ``y = Phi (x - mu)`` per group of features.

    The covariance spans the area's reduction axes; the *decorrelated features* are the
    area's feature axes, or the ``G`` channel groups of a group area (group whitening, Huang
    et al. CVPR 2021: each sample's channels reshaped to ``G`` rows of ``C / G``); the axes
    neither reduced nor decorrelated (the sample axis of a per-sample area) get matrices of
    their own. ``group_size`` splits the decorrelated features into diagonal blocks (DBN).

    Attributes:
      method: ``"zca"``, ``"pca"``, ``"cholesky"`` or ``"newton"`` (:func:`whitening_matrix`).
      group_size: features per decorrelated block (None: one block of all).
      iterations: Newton-Schulz steps for ``"newton"``.
      running_average_of: ``"covariance"`` or ``"whitening_matrix"`` (module docstring).
      precision: of the matrix products.
    """

    method: str = "zca"
    group_size: int | None = None
    iterations: int = 5
    running_average_of: str = "covariance"
    precision: Any = HIGHEST

    def __post_init__(self):
        check_method(self.method)
        _check_iterations(self.iterations)
        _check_choice(self.running_average_of, "running_average_of", RUNNING_AVERAGES)

    @property
    def name(self) -> str:
        return "whiten"

    @property
    def keys(self) -> tuple[str, ...]:
        return ("mean", self.running_average_of)

    def _view(self, resolved: Resolved) -> tuple[MatrixView, int]:
        """The matrix view (of the group split, for a group area) and the number of blocks."""
        shape, red, feat = resolved.shape, resolved.reduction_axes, resolved.feature_axes
        if resolved.group_axis is not None:
            a = resolved.group_axis
            g = resolved.num_groups
            shape = shape[:a] + (g, shape[a] // g) + shape[a + 1:]
            red = tuple(sorted([r if r < a else r + 1 for r in red] + [a + 1]))
            feat = (a,)
        if not red:
            name, value = resolved.feature_spec
            raise ValueError(
                f"x has shape {resolved.shape} and {name}={value!r} covers every axis: "
                "whitening needs a batch (sample) axis besides the features, e.g. x of shape (N, C)"
            )
        view = MatrixView(shape, red, feat)
        return view, check_group_size(view.features, self.group_size)

    def init_stats(self, resolved: Resolved, dtype: Any = jnp.float32) -> Stats:
        view, blocks = self._view(resolved)
        return init_whitening_stats(
            view.feature_shape, None if blocks == 1 else view.features // blocks,
            self.running_average_of, dtype,
        )

    def param_shapes(self, resolved: Resolved, recovery: str) -> dict[str, tuple[int, ...]]:
        _check_choice(recovery, "recovery", RECOVERIES + ("none",))
        if recovery == "none":
            return {}
        if recovery == "affine":
            return {"scale": resolved.param_shape, "bias": resolved.param_shape}
        view, blocks = self._view(resolved)
        if resolved.group_axis is not None or view.kept_axes:
            raise ValueError(
                "recovery='coloring' needs the batch area (one set of whitened features); "
                "use recovery='affine' for per-sample areas"
            )
        g = view.features // blocks
        return {"scale": (blocks, g, g), "bias": resolved.param_shape}

    def _split(self, a: Array | None, resolved: Resolved) -> Array | None:
        if a is None or resolved.group_axis is None:
            return a
        return split_groups(a, resolved.num_groups, resolved.group_axis)

    def _moments(self, x, resolved, reduction: Reduction, mask):
        view, blocks = self._view(resolved)
        if mask is not None:
            mask = self._split(jnp.broadcast_to(mask, x.shape), resolved)
        xm = view.to_matrix(self._split(x, resolved).astype(statistics_dtype(x)))  # (K..., m, C)
        count, mean, m2 = local_covariance(xm, view.sample_mask(mask), blocks, self.precision)
        if reduction.axis_name is not None:
            count, mean, m2 = combine_covariance_across_devices(
                count, mean, m2, reduction.axis_name, reduction.axis_index_groups
            )
        cov = m2 / (count if not view.kept_axes else count[..., None, None, None])
        return view, blocks, xm, mean, cov

    def statistics(self, x, resolved: Resolved, reduction: Reduction, mask=None) -> Stats:
        view, _, _, mean, cov = self._moments(x, resolved, reduction, mask)
        batch = {"mean": jnp.reshape(mean, view.kept_shape + view.feature_shape)}
        if self.running_average_of == "covariance":
            batch["covariance"] = cov
        else:
            batch["whitening_matrix"] = self._matrix(cov, reduction, view)
        return batch

    def _matrix(self, cov: Array, reduction: Reduction, view) -> Array:
        # per-sample matrices (kept axes) run along the batch, which may be sharded: batched;
        # the batch area's few group matrices: one at a time on CPU
        return whitening_matrix(cov, self.method, epsilon=reduction.epsilon,
                                iterations=self.iterations, serial_on_cpu=not view.kept_axes)

    def normalize(self, x, resolved, reduction: Reduction, scale=None, bias=None, mask=None,
                  recovery: str = "affine"):
        view, blocks, xm, mean, cov = self._moments(x, resolved, reduction, mask)
        phi = self._matrix(cov, reduction, view)
        batch = {"mean": jnp.reshape(mean, view.kept_shape + view.feature_shape)}
        batch[self.running_average_of] = cov if self.running_average_of == "covariance" else phi
        y = self._transform(x, xm, mean, phi, view, blocks, resolved, reduction, scale, bias,
                            recovery)
        return y, jax.lax.stop_gradient(batch)

    def normalize_given(self, x, stats, resolved, reduction: Reduction, scale=None, bias=None,
                        recovery: str = "affine"):
        view, blocks = self._view(resolved)
        xm = view.to_matrix(self._split(x, resolved).astype(statistics_dtype(x)))
        mean = jnp.reshape(stats["mean"], (-1,)).astype(xm.dtype)
        running = jnp.asarray(stats[self.running_average_of]).astype(xm.dtype)
        phi = running
        if self.running_average_of == "covariance":
            phi = self._matrix(running, reduction, view)
        return self._transform(x, xm, mean, phi, view, blocks, resolved, reduction, scale, bias,
                               recovery)

    def _transform(self, x, xm, mean, phi, view, blocks, resolved, reduction, scale, bias,
                   recovery):
        """``recovery(Phi (x - mu))`` back in x's layout."""
        out_dtype = output_dtype(x, scale, bias, reduction.dtype)
        g = view.features // blocks
        xc = (xm - mean[..., None, :]).reshape(xm.shape[:-1] + (blocks, g))
        if view.kept_axes:
            y = jnp.einsum("...mgj,...gij->...mgi", xc, phi, precision=self.precision)
        else:
            y = jnp.einsum("...gj,gij->...gi", xc, phi, precision=self.precision)
        y = y.reshape(xm.shape)
        if resolved.group_axis is None and not view.kept_axes:
            y = _recover(y, scale, bias, recovery, view, blocks, self.precision)
            return view.from_matrix(y.astype(out_dtype))
        y = jnp.reshape(view.from_matrix(y), x.shape)
        shape = broadcast_shape(x.shape, resolved.feature_axes)
        if scale is not None:
            y = y * jnp.reshape(scale, shape)
        if bias is not None:
            y = y + jnp.reshape(bias, shape)
        return y.astype(out_dtype)
