"""Whitening rows: covariance, eigh-ZCA, Cholesky and Newton-Schulz against one G x G matmul.

For each configuration (G features per group, ``groups`` groups, ``m`` samples) one group
times, interleaved, in float32:

=============  ===========================================================  ===============
name           computes (batched over the groups)                           input
=============  ===========================================================  ===============
``matmul``     ``S @ S``: one G x G matmul per group (the yardstick)        S (groups,G,G)
``cov``        centered covariance ``Xc^T Xc / m``                          X (m, groups*G)
``zca_eigh``   ``U diag((lambda + eps)^-1/2) U^T`` from ``eigh``            S
``cholesky``   ``L^-1`` with ``L L^T = S + eps I`` (triangular solve)       S
``newtonT``    IterNorm: ``P <- 1.5 P - 0.5 P^3 S_N``, T steps,             S
               ``S_N = (S + eps I) / tr``, ``W = P_T / sqrt(tr)``
=============  ===========================================================  ===============

Loops feed the result back without drifting: ``S <- S0 + c sym(W)`` (``c = 1e-3``; S0 has
eigenvalues in [0.02, 1], condition number 50, so S stays positive definite) and
``X <- X0 + c diag(cov(X))``. Reported: time per call and ``time / time(matmul)``.

normzoo's own functions (``normzoo.functional.covariance`` / ``whitening_matrix``) are
timed alongside as ``nz_<name>`` when :func:`normzoo_ops` can find and call them; otherwise the
rows time the jax.numpy reference only and say why in a note. If their signatures change,
adapt the calls in :func:`normzoo_ops` (one place).
"""

from __future__ import annotations

import importlib
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from benchmarks.harness import Group

#: (G, groups): G = 16 (DBN), 64 (IterNorm), 512 (one big group), several group counts.
FULL_CONFIGS = ((16, 64), (16, 256), (64, 16), (64, 64), (512, 1), (512, 2))
QUICK_CONFIGS = ((16, 4),)
FULL_SAMPLES = 2048
QUICK_SAMPLES = 128
NEWTON_STEPS = (3, 5, 7)
EPSILON = 1e-5
FEEDBACK = 1e-3
YARDSTICK = "matmul"


# ------------------------------------------------------------- jax.numpy reference


def covariance(x: jax.Array, groups: int) -> jax.Array:
    """(m, groups * G) -> (groups, G, G): centered covariance per group of features."""
    m = x.shape[0]
    xg = x.reshape(m, groups, -1)
    xc = xg - jnp.mean(xg, axis=0)
    return jnp.einsum("mgi,mgj->gij", xc, xc) / m


def _eye_like(s: jax.Array) -> jax.Array:
    return jnp.broadcast_to(jnp.eye(s.shape[-1], dtype=s.dtype), s.shape)


def zca_eigh(s: jax.Array, eps: float = EPSILON) -> jax.Array:
    lam, u = jnp.linalg.eigh(s)
    return (u * lax.rsqrt(lam + eps)[..., None, :]) @ jnp.swapaxes(u, -1, -2)


def cholesky_inverse(s: jax.Array, eps: float = EPSILON) -> jax.Array:
    eye = _eye_like(s)
    chol = jnp.linalg.cholesky(s + eps * eye)
    return lax.linalg.triangular_solve(chol, eye, left_side=True, lower=True)


def newton_schulz(s: jax.Array, steps: int, eps: float = EPSILON) -> jax.Array:
    eye = _eye_like(s)
    s = s + eps * eye
    trace = jnp.trace(s, axis1=-2, axis2=-1)[..., None, None]
    s_n = s / trace
    p = eye
    for _ in range(steps):
        p = 1.5 * p - 0.5 * (p @ p @ p) @ s_n
    return p * lax.rsqrt(trace)


def matmul(s: jax.Array) -> jax.Array:
    return s @ s


def reference_ops() -> dict[str, Callable[..., jax.Array]]:
    """name -> ``op(x_or_s, groups)``; ``cov`` takes X, the others S."""
    ops = {
        YARDSTICK: lambda s, g: matmul(s),
        "cov": covariance,
        "zca_eigh": lambda s, g: zca_eigh(s),
        "cholesky": lambda s, g: cholesky_inverse(s),
    }
    for t in NEWTON_STEPS:
        ops[f"newton{t}"] = lambda s, g, t=t: newton_schulz(s, t)
    return ops


# ---------------------------------------------------------------------- normzoo


def normzoo_ops(
    g: int = 4, groups: int = 2
) -> tuple[dict[str, Callable[..., jax.Array]], list[str]]:
    """normzoo's whitening functions as ``op(x_or_s, groups)``, or ({}, notes) when missing.

    Uses the public API: ``normzoo.functional.covariance(x, reduction_axes,
    group_size=G) -> (mean, cov)`` and ``normzoo.functional.whitening_matrix(cov, method,
    epsilon=, iterations=)``. Each op is traced once on a small example; one that is missing
    or fails is skipped with a note, so these rows keep working while the API moves.
    """
    try:
        functional = importlib.import_module("normzoo.functional")
    except ImportError as err:  # pragma: no cover - normzoo itself is missing
        return {}, [f"normzoo.functional is not importable ({err})"]
    candidates: dict[str, Callable[..., jax.Array]] = {}
    notes = []
    cov_fn = getattr(functional, "covariance", None)
    if cov_fn is not None:
        candidates["cov"] = lambda x, groups: cov_fn(x, (0,), group_size=x.shape[-1] // groups)[1]
    else:
        notes.append("normzoo.functional.covariance is missing: the covariance row times "
                     "jax.numpy only")
    mat_fn = getattr(functional, "whitening_matrix", None)
    if mat_fn is not None:
        candidates["zca_eigh"] = lambda s, groups: mat_fn(s, "zca", epsilon=EPSILON)
        candidates["cholesky"] = lambda s, groups: mat_fn(s, "cholesky", epsilon=EPSILON)
        for t in NEWTON_STEPS:
            candidates[f"newton{t}"] = (
                lambda s, groups, t=t: mat_fn(s, "newton", iterations=t, epsilon=EPSILON))
    else:
        notes.append("normzoo.functional.whitening_matrix is missing: whitening rows time the "
                     "jax.numpy reference only")
    x = jnp.ones((8, g * groups), jnp.float32)
    s = jnp.broadcast_to(jnp.eye(g, dtype=jnp.float32), (groups, g, g))
    ops = {}
    for name, op in candidates.items():
        example = x if name == "cov" else s
        try:
            out = jax.eval_shape(lambda a, op=op: op(a, groups), example)
            if tuple(out.shape) != (groups, g, g):
                raise ValueError(f"returned shape {tuple(out.shape)}, expected {(groups, g, g)}")
        except Exception as err:  # noqa: BLE001 - any failure means: skip with a note
            notes.append(f"normzoo whitening {name!r} skipped: {type(err).__name__}: {err}")
            continue
        ops[name] = op
    return ops, notes


# -------------------------------------------------------------------------- groups


def _spd(rng: np.random.Generator, groups: int, g: int, condition: float = 50.0) -> np.ndarray:
    q, _ = np.linalg.qr(rng.normal(size=(groups, g, g)))
    lam = np.geomspace(1.0 / condition, 1.0, g)
    return np.einsum("kij,j,klj->kil", q, lam, q)


def _loop(op: Callable[..., jax.Array], groups: int, takes_x: bool):
    """``loop(n, c, x0, s0, x, s)``: carries ``x`` (cov) or ``s`` (the others) from x0 / s0."""

    def loop(n, c, x0, s0, x, s):
        if takes_x:
            def body(i, x):
                cov = op(x, groups)
                diag = jnp.diagonal(cov, axis1=-2, axis2=-1).reshape(-1)
                return x0 + c * diag
            return lax.fori_loop(0, n, body, x)

        def body(i, s):
            w = op(s, groups)
            return s0 + c * 0.5 * (w + jnp.swapaxes(w, -1, -2))
        return lax.fori_loop(0, n, body, s)

    return loop


def build_groups(
    *,
    quick: bool = False,
    configs: Sequence[tuple[int, int]] | None = None,
    samples: int | None = None,
    with_normzoo: bool = True,
    ops: Sequence[str] | None = None,
) -> tuple[list[Group], list[str]]:
    """One group per (G, groups): every op interleaved with the matmul yardstick.

    Args:
      quick: :data:`QUICK_CONFIGS` and :data:`QUICK_SAMPLES` instead of the full ones.
      configs: (G, groups) pairs overriding the defaults; samples: rows of X.
      with_normzoo: also time normzoo's functions where :func:`normzoo_ops` finds them.
      ops: subset of the op names (the matmul yardstick is always timed).

    Returns:
      ``(groups, notes)``; the notes say which normzoo functions were skipped and why.
    """
    configs = configs or (QUICK_CONFIGS if quick else FULL_CONFIGS)
    m = samples or (QUICK_SAMPLES if quick else FULL_SAMPLES)
    zoo, notes = normzoo_ops() if with_normzoo else ({}, [])
    rng = np.random.default_rng(0)
    groups_out = []
    for g, groups in configs:
        x0 = jnp.asarray(rng.normal(0.3, 1.0, (m, groups * g)), jnp.float32)
        s0 = jnp.asarray(_spd(rng, groups, g), jnp.float32)
        keep = (lambda name: ops is None or name in ops or name == YARDSTICK)
        loops = {name: _loop(op, groups, name == "cov")
                 for name, op in reference_ops().items() if keep(name)}
        loops.update({f"nz_{name}": _loop(op, groups, name == "cov")
                      for name, op in zoo.items() if keep(name)})
        carried = {name: (3,) if name.endswith("cov") else (4,) for name in loops}
        groups_out.append(Group(
            meta={"kind": "whitening", "G": g, "groups": groups, "samples": m, "dtype": "float32",
                  "normzoo": sorted(zoo)},
            loops=loops,
            args=(jnp.float32(FEEDBACK), x0, s0, x0, s0),
            carried=carried,
            reference=YARDSTICK,
            roofline=None,
            min_iters=1,
            max_repeats=None if quick else 7,
        ))
    return groups_out, notes
