"""Helpers for the linen tests: run a normzoo layer and its flax.linen twin side by side,
and float64 numpy references from the equations."""

import flax.linen as nn
import jax
import importlib

import numpy as np

import normzoo

TOL = dict(rtol=2e-5, atol=2e-5)
DROPIN = ["BatchNorm", "LayerNorm", "GroupNorm", "InstanceNorm", "RMSNorm"]


def x64():
    """Enable float64 locally: ``jax.enable_x64(True)`` (jax >= 0.9) or the old experimental one."""
    if hasattr(jax, "enable_x64"):
        return jax.enable_x64(True)
    return importlib.import_module("jax.experimental").enable_x64()


def pair(name, **kwargs):
    """(flax layer, normzoo layer) built with the same fields."""
    return getattr(nn, name)(**kwargs), getattr(normzoo, name)(**kwargs)


def init_both(name, x, key=0, call_kwargs=None, **kwargs):
    ref, nz = pair(name, **kwargs)
    call_kwargs = call_kwargs or {}
    k = jax.random.key(key)
    return ref, nz, ref.init(k, x, **call_kwargs), nz.init(k, x, **call_kwargs)


def assert_trees_equal(a, b, exact=True, **tol):
    """Same structure, shapes, dtypes; values equal (or allclose)."""
    sa, sb = jax.tree_util.tree_structure(a), jax.tree_util.tree_structure(b)
    assert sa == sb, f"tree structures differ:\n{sa}\n{sb}"
    for (path, va), vb in zip(jax.tree_util.tree_leaves_with_path(a), jax.tree_util.tree_leaves(b)):
        assert va.shape == vb.shape, (path, va.shape, vb.shape)
        assert va.dtype == vb.dtype, (path, va.dtype, vb.dtype)
        if exact:
            np.testing.assert_array_equal(np.asarray(va), np.asarray(vb), err_msg=str(path))
        else:
            np.testing.assert_allclose(np.asarray(va, np.float64), np.asarray(vb, np.float64),
                                       err_msg=str(path), **(tol or TOL))


def np_moments(x, axes, mask=None):
    x = np.asarray(x, np.float64)
    m = np.ones_like(x) if mask is None else np.broadcast_to(np.asarray(mask, np.float64), x.shape)
    xz = np.where(m > 0, x, 0.0)
    n = m.sum(axis=axes, keepdims=True)
    mean = xz.sum(axis=axes, keepdims=True) / n
    var = np.where(m > 0, (x - mean) ** 2, 0.0).sum(axis=axes, keepdims=True) / n
    return mean, var


def np_standardize(x, axes, eps, mask=None):
    mean, var = np_moments(x, axes, mask)
    return (np.asarray(x, np.float64) - mean) / np.sqrt(var + eps)


def np_mean_square(x, axes, mask=None):
    x = np.asarray(x, np.float64)
    m = np.ones_like(x) if mask is None else np.broadcast_to(np.asarray(mask, np.float64), x.shape)
    return np.where(m > 0, x * x, 0.0).sum(axis=axes, keepdims=True) / m.sum(axis=axes, keepdims=True)
