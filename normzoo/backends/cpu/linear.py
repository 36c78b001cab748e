"""The linearization of the native forward pass, with the native backward as its transpose.

:func:`tangent` is the derivative of ``(y, mean, var)`` of
:func:`normzoo.backends.cpu.ffi.row_normalize` / :func:`grouped_normalize` in the
direction ``(dx, dscale, dbias)``, at fixed ``x``, ``scale`` and statistics. It is a JAX
primitive (``normzoo_norm_tangent``) linear in ``(dx, dscale, dbias)`` whose transpose is a
second primitive (``normzoo_norm_cotangent``): on CPU one native kernel that reads ``x``
and ``gy`` once for the sums and once for ``gx`` (``normzoo_cpu.cc``, the closed form of
Ioffe & Szegedy 2015, section 3). So ``jax.grad`` of a normzoo layer runs that kernel,
while forward mode (``jvp``, ``jacfwd``) evaluates the tangent in XLA.

Each primitive also has a pure-``jax.numpy`` reference (:func:`_reference_tangent` and its
``jax.linear_transpose``): other backends lower it, and ``vmap`` and the derivatives of the
primitives with respect to ``x``, ``scale`` and the statistics (second derivatives) use it.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.interpreters import ad, batching, mlir

try:  # jax >= 0.4.36
    from jax.extend.core import Primitive
except ImportError:  # pragma: no cover
    from jax.core import Primitive

from normzoo.backends.cpu import library

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class View:
    """How a kernel reads x: ``row`` (R, F) or ``grouped`` (B, M, C) with groups of k.

    ``frozen`` (grouped only): the statistics are given, not x's own (BatchNorm at inference,
    with its running averages): ``y = (x - mean) * (r * scale) + bias`` with ``mean`` and
    ``var`` constants, so the tangent is ``r scale dx + (x - mean) r dscale + dbias`` and
    its ``dmean``, ``dvar`` outputs are 0.
    """

    kind: str
    features: int  # F (row) or C (grouped)
    batch: int = 1  # B (grouped)
    group_size: int = 1  # k (grouped)
    centered: bool = True
    epsilon: float = 1e-5
    out_dtype: Any = jnp.float32
    stat_shape: tuple[int, ...] = ()
    frozen: bool = False

    def __post_init__(self):
        if self.frozen and self.kind != "grouped":
            raise ValueError(f"frozen statistics need the grouped view, not {self.kind!r}")

    def attributes(self) -> dict[str, Any]:
        """The FFI attributes of the backward kernel."""
        common = dict(epsilon=np.float32(self.epsilon), centered=bool(self.centered))
        if self.kind == "row":
            return dict(common, features=np.int64(self.features))
        return dict(common, group_size=np.int64(self.group_size), batch=np.int64(self.batch),
                    channels=np.int64(self.features), frozen=bool(self.frozen))


# ------------------------------------------------------------------ the jnp reference


def _split(view: View, x: Array):
    """x as (statistic rows, elements, ...) and how to broadcast statistics and vectors."""
    if view.kind == "row":
        return x.reshape(-1, view.features), (-1, 1), (1, view.features), (1,)
    g = view.features // view.group_size
    return (x.reshape(view.batch, -1, g, view.group_size), (view.batch, 1, g, 1),
            (1, 1, g, view.group_size), (1, 3))


def _reference_tangent(view: View, x, scale, mean, var, dx, dscale, dbias):
    """``(dy, dmean, dvar)`` in jax.numpy: the derivative of the forward pass."""
    xs, stat_b, vec_b, axes = _split(view, x.astype(jnp.float32))
    dxs = _split(view, dx.astype(jnp.float32))[0]
    m = mean.reshape(stat_b) if view.centered else 0.0
    r = lax.rsqrt(var.reshape(stat_b) + view.epsilon)
    c = xs - m
    s, ds, db = (v.reshape(vec_b) for v in (scale, dscale, dbias))
    if view.frozen:  # statistics given: no terms through them
        zero = jnp.zeros(view.stat_shape, jnp.float32)
        dy = s * (r * dxs) + c * r * ds + db
        return dy.reshape(x.shape).astype(view.out_dtype), zero, zero
    dmean = jnp.mean(dxs, axes, keepdims=True) if view.centered else jnp.zeros_like(r)
    dvar = 2.0 * jnp.mean(c * dxs, axes, keepdims=True)
    dr = -0.5 * r * r * r * dvar
    dy = s * (r * dxs - r * dmean + c * dr) + c * r * ds + db
    return (dy.reshape(x.shape).astype(view.out_dtype), dmean.reshape(view.stat_shape),
            dvar.reshape(view.stat_shape))


def _reference_cotangent(view: View, x, scale, mean, var, gy, gmean, gvar):
    """``(gx, gscale, gbias)``: the transpose of :func:`_reference_tangent` (by JAX)."""
    f32 = jnp.float32
    linear = lambda dx, ds, db: _reference_tangent(view, x, scale, mean, var, dx, ds, db)  # noqa: E731
    avals = (jax.ShapeDtypeStruct(x.shape, x.dtype), jax.ShapeDtypeStruct(scale.shape, f32),
             jax.ShapeDtypeStruct(scale.shape, f32))
    return jax.linear_transpose(linear, *avals)((gy, gmean, gvar))


# ------------------------------------------------------------------ the primitives

tangent_p = Primitive("normzoo_norm_tangent")
tangent_p.multiple_results = True
cotangent_p = Primitive("normzoo_norm_cotangent")
cotangent_p.multiple_results = True


def tangent(x, scale, mean, var, dx, dscale, dbias, *, view: View):
    """``(dy, dmean, dvar)``, linear in ``(dx, dscale, dbias)``; ``scale`` etc. (F,) float32."""
    return tangent_p.bind(x, scale, mean, var, dx, dscale, dbias, view=view)


@tangent_p.def_abstract_eval
def _tangent_abstract(x, scale, mean, var, dx, dscale, dbias, *, view):
    stat = jax.core.ShapedArray(view.stat_shape, jnp.float32)
    return [jax.core.ShapedArray(x.shape, view.out_dtype), stat, stat]


@cotangent_p.def_abstract_eval
def _cotangent_abstract(x, scale, mean, var, gy, gmean, gvar, *, view):
    vector = jax.core.ShapedArray(scale.shape, jnp.float32)
    return [jax.core.ShapedArray(x.shape, x.dtype), vector, vector]


def _reference(primitive):
    return _reference_tangent if primitive is tangent_p else _reference_cotangent


def _apply(primitive, *args, **params):
    """Eager evaluation: the primitive compiled on its own (cached per shapes and params)."""
    try:
        from jax._src.dispatch import apply_primitive
    except ImportError:  # pragma: no cover - a jax without it
        return jax.jit(lambda *a: primitive.bind(*a, **params))(*args)
    return apply_primitive(primitive, *args, **params)


for _p in (tangent_p, cotangent_p):
    _ref = _reference(_p)
    mlir.register_lowering(
        _p, mlir.lower_fun(lambda *args, view, _ref=_ref: _ref(view, *args),
                           multiple_results=True))
    _p.def_impl(functools.partial(_apply, _p))

    def _jvp(primals, tangents, *, view, _ref=_ref):
        # jax.jvp needs primals and tangents of one tree structure: both tuples.
        tangents = tuple(ad.instantiate_zeros(t) for t in tangents)
        return jax.jvp(lambda *a: _ref(view, *a), tuple(primals), tangents)

    def _batch(args, dims, *, view, _ref=_ref):
        out = jax.vmap(lambda *a: _ref(view, *a), in_axes=dims)(*args)
        return out, (0,) * len(out)

    ad.primitive_jvps[_p] = _jvp
    batching.primitive_batchers[_p] = _batch


def _transpose_to(other):
    """Transpose of a primitive linear in its last three arguments: ``other`` on the cts."""

    def transpose(cts, x, scale, mean, var, *linear, view):
        if any(ad.is_undefined_primal(v) for v in (x, scale, mean, var)):
            raise NotImplementedError("normzoo native linearization: nonlinear argument "
                                      "is not a constant")
        if view.frozen and other is cotangent_p:
            # The statistics' cotangents meet outputs that are 0 for given statistics and are
            # not read: pass arrays of their shape that exist anyway, not fresh zeros.
            cts = [cts[0], mean, var]
        cts = [ad.instantiate_zeros(ct) if type(ct) is ad.Zero else ct for ct in cts]
        outs = other.bind(x, scale, mean, var, *cts, view=view)
        return [None] * 4 + [o if ad.is_undefined_primal(v) else None
                             for o, v in zip(outs, linear)]

    return transpose


ad.primitive_transposes[tangent_p] = _transpose_to(cotangent_p)
ad.primitive_transposes[cotangent_p] = _transpose_to(tangent_p)


def _cotangent_cpu(ctx, x, scale, mean, var, gy, gmean, gvar, *, view):
    library.load()  # builds and registers the kernels if this process has not yet
    target = "normzoo_row_norm_backward" if view.kind == "row" else "normzoo_grouped_norm_backward"
    rule = jax.ffi.ffi_lowering(target)
    return rule(ctx, x, scale, mean, var, gy, gmean, gvar, **view.attributes())


mlir.register_lowering(cotangent_p, _cotangent_cpu, platform="cpu")
