"""Matrix factorizations that never run as batched LAPACK calls on CPU.

jaxlib's CPU LAPACK kernels (``eigh``, ``cholesky``, ``triangular_solve`` of a batch of
matrices) split a batch into chunks, queue them on XLA's intra-op thread pool and then block
until the chunks are done. When as many batched calls as the pool has threads run at once, every
pool thread is blocked waiting for chunks that no free thread can run: the process hangs for
ever. XLA runs independent operations concurrently, and whitening layers make independent
factorizations: at inference each layer factorizes its own running covariance, independent of
the other layers; a ``vmap`` over seeds, models or groups batches every call. On a 2-core
machine two such calls are enough.

:func:`serial_on_cpu` wraps a function of one batch of square matrices ``(..., n, n)`` so that,
on CPU, it runs one matrix at a time (a ``lax.map`` loop over the flattened batch, each LAPACK
call with a batch of one, which runs inline), also under ``jax.vmap`` (a ``custom_vmap`` rule
folds the mapped axis into the loop). Other backends call it batched, unchanged. The results are
those of the batched call, matrix for matrix. The whitening operators call it on primal values
inside their own ``custom_jvp`` rules; where it is differentiated (second derivatives), its
derivative is ``fn``'s, computed batched.
"""
from __future__ import annotations

import functools
import math
from typing import Callable

import jax
from jax import lax

Array = jax.Array


def _one_at_a_time(fn: Callable[[Array], Array | tuple[Array, ...]], a: Array):
    batch = a.shape[:-2]
    n = math.prod(batch)
    if n <= 1:
        return fn(a)
    results = lax.map(fn, a.reshape((n,) + a.shape[-2:]))
    return jax.tree.map(lambda r: r.reshape(batch + r.shape[1:]), results)


def serial_on_cpu(fn: Callable[[Array], Array | tuple[Array, ...]]):
    """``fn(a)`` for ``a`` of shape ``(..., n, n)``, its outputs batched like ``a``; on CPU
    one matrix at a time (module docstring), elsewhere batched."""

    def platform_call(a: Array):
        return lax.platform_dependent(a, cpu=functools.partial(_one_at_a_time, fn), default=fn)

    @jax.custom_batching.custom_vmap
    def wrapped(a: Array):
        return platform_call(a)

    @wrapped.def_vmap
    def _rule(axis_size: int, in_batched: list[bool], a: Array):
        out = wrapped(a)  # the mapped axis (if any) is now a leading batch axis of ``a``
        return out, jax.tree.map(lambda _: bool(in_batched[0]), out)

    # ``custom_vmap`` has no derivative; the whitening operators differentiate their own
    # rules (first order never reaches here). Higher orders differentiate ``fn`` itself.
    @jax.custom_jvp
    def differentiable(a: Array):
        return wrapped(a)

    @differentiable.defjvp
    def _jvp(primals, tangents):
        return jax.jvp(fn, primals, tangents)

    return functools.wraps(fn)(differentiable)
