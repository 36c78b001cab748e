"""float64 numpy references written from the equations (Huang et al. 2023, section 1 table).

Each helper takes numpy arrays and reduction axes and returns float64 results.
"""

import importlib

import numpy as np


def as64(a):
    return np.asarray(a, dtype=np.float64)


def np_moments(x, axes, mask=None):
    """Biased mean and variance over ``axes`` (only where ``mask``), float64, keepdims."""
    x = as64(x)
    axes = tuple(np.atleast_1d(axes).tolist()) if not isinstance(axes, tuple) else axes
    if mask is None:
        m = np.ones_like(x)
    else:
        m = np.broadcast_to(np.asarray(mask, dtype=np.float64), x.shape)
    xz = np.where(m > 0, x, 0.0)
    n = m.sum(axis=axes, keepdims=True)
    mean = xz.sum(axis=axes, keepdims=True) / n
    var = (np.where(m > 0, (x - mean) ** 2, 0.0)).sum(axis=axes, keepdims=True) / n
    return mean, var


def np_mean_square(x, axes, mask=None):
    x = as64(x)
    if mask is None:
        m = np.ones_like(x)
    else:
        m = np.broadcast_to(np.asarray(mask, dtype=np.float64), x.shape)
    return (np.where(m > 0, x * x, 0.0)).sum(axis=axes, keepdims=True) / m.sum(axis=axes, keepdims=True)


def np_standardize(x, axes, eps, mask=None):
    mean, var = np_moments(x, axes, mask)
    return (as64(x) - mean) / np.sqrt(var + eps)


def np_center(x, axes, mask=None):
    mean, _ = np_moments(x, axes, mask)
    return as64(x) - mean


def np_scale(x, axes, eps, mask=None):
    return as64(x) / np.sqrt(np_mean_square(x, axes, mask) + eps)


def np_group_standardize(x, num_groups, eps, mask=None):
    """GroupNorm without affine: x of shape (N, ..., C), statistics per sample and group."""
    x = as64(x)
    shape = x.shape
    xg = x.reshape(shape[:-1] + (num_groups, shape[-1] // num_groups))
    mg = None
    if mask is not None:
        mg = np.broadcast_to(np.asarray(mask), shape).reshape(xg.shape)
    axes = tuple(range(1, x.ndim - 1)) + (x.ndim,)
    return np_standardize(xg, axes, eps, mg).reshape(shape)


def masked(a, mask):
    """Values of ``a`` where ``mask`` (broadcast) is true, as a flat float64 array."""
    a = as64(a)
    return a[np.broadcast_to(np.asarray(mask, dtype=bool), a.shape)]


def x64():
    """Context manager enabling float64 locally (never globally).

    jax >= 0.9 spells it ``jax.enable_x64(True)``; older releases had
    ``jax.experimental.enable_x64()``.
    """
    import jax

    if hasattr(jax, "enable_x64"):
        return jax.enable_x64(True)
    return importlib.import_module("jax.experimental").enable_x64()
