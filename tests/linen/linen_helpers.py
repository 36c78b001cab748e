"""Helpers for the linen tests: run a normzoo layer and its flax.linen twin side by side.
The float64 references live in tests/reference.py."""

import chex
import flax.linen as nn
import jax

import normzoo

TOL = dict(rtol=2e-5, atol=2e-5)
DROPIN = ["BatchNorm", "LayerNorm", "GroupNorm", "InstanceNorm", "RMSNorm"]


def pair(name, **kwargs):
    """(flax layer, normzoo layer) built with the same fields."""
    return getattr(nn, name)(**kwargs), getattr(normzoo, name)(**kwargs)


def init_both(name, x, key=0, call_kwargs=None, **kwargs):
    ref, nz = pair(name, **kwargs)
    call_kwargs = call_kwargs or {}
    k = jax.random.key(key)
    return ref, nz, ref.init(k, x, **call_kwargs), nz.init(k, x, **call_kwargs)


def jit_init(layer, key, *args, **kwargs):
    """``layer.init(key, *args, **kwargs)`` compiled as one program (keyword arguments fixed)."""
    return jax.jit(lambda k, *a: layer.init(k, *a, **kwargs))(key, *args)


def jit_apply(layer, variables, *args, **kwargs):
    """``layer.apply(variables, *args, **kwargs)`` compiled as one program (keyword arguments
    fixed), not an eager compile of each of its small ops."""
    return jax.jit(lambda v, *a: layer.apply(v, *a, **kwargs))(variables, *args)


def assert_trees_equal(a, b, exact=True, **tol):
    """Same structure, shapes and dtypes; values equal (``exact``) or close (``tol``, TOL)."""
    chex.assert_trees_all_equal_shapes_and_dtypes(a, b)
    if exact:
        chex.assert_trees_all_equal(a, b)
    else:
        chex.assert_trees_all_close(a, b, **(tol or TOL))
