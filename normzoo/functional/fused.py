"""Batch statistics, normalization and affine in one op with an analytic backward pass.

Autodiff of ``(x - mean(x)) * rsqrt(var(x) + eps) * scale + bias`` keeps many intermediates
and walks the data several times; the closed form needs only ``x``, the per-statistic
``mean`` and ``r = rsqrt(var + eps)``. The op is a ``jax.custom_jvp`` with a hand-written
linearization whose transpose JAX derives as exactly the closed form below, so forward mode
(``jvp``, ``jacfwd``, ``hessian``) works as well as reverse mode. With ``c = x - mean``,
``xhat = c * r``, ``g = dy * scale`` and ``E`` the mean over the statistic's elements (Ioffe &
Szegedy 2015, section 3):

    dx     = r * (g - E[g]) - c * r^3 * E[g * c]          (standardize)
    dx     = r * g - x * r^3 * E[g * x]                    (scale: mean = 0, r = rsqrt(E[x^2] + eps))
    dscale = sum(dy * xhat),   dbias = sum(dy)             (over the axes the params broadcast along)

plus the terms of the returned statistics' own cotangents (``dmean / n`` and
``dvar * 2 c / n``), so gradients through the running-statistics update are exact too.

Layout. Channel groups (GroupNorm) are not a ``(..., G, C/G)`` view of x: every full-size
reduction runs over the reduction axes *other than the channel axis*, in x's own layout,
to per-channel partial means (``(N, C)`` for NHWC GroupNorm), and the groups are finished
on those tiny arrays: a strided reduction over a split channel axis is slower on CPU than
one that keeps the contiguous channel axis.

Passes. XLA:CPU writes to memory any full-size value that feeds more than one kernel, so
the linearization is written so that its transpose reads only ``x``, ``dy`` and small
per-statistic vectors. When ``scale`` is constant over the statistic's elements but the
channel (BatchNorm, InstanceNorm, GroupNorm) it is applied to the per-channel sums instead
of forming ``g = dy * scale``, and every full-size term has one of three forms,
``dx * k``, ``bcast(s1)`` and ``c * bcast(s2)`` (``k, s1, s2`` per channel), whose transposes
are ``dy * k``, ``sum(dy)`` and ``sum(dy * c)``: the parameter gradients reuse those same two
sums, and ``dx`` is one elementwise pass. ``c = x - mean`` is spelled two ways (one for
the sums, one for ``dx``) so that XLA does not merge and materialize it. The per-channel
vectors that pass reads (``mean``, ``k`` and the cotangents of the sums) go through
:func:`computed_once`, so that XLA:CPU computes them once rather than per element.

When ``scale`` varies within a statistic the backward's sums are over ``g = dy * scale``.
For LayerNorm and RMSNorm (x a ``(rows, features)`` matrix, scale per feature) the per-row
terms times the scale are written as outer products (:func:`_outer`), so their transposes
are matrix-vector products: ``E[g] = dy @ scale / n``, ``E[g c] = (dy * c) @ scale / n``
and ``dscale = r @ (dy * c)``, the one full-size ``dy * c`` written once and read by both.
XLA:CPU runs those as BLAS matrix-vector products at memory speed, faster than its fused
row and column reductions over two arrays. That form is chosen on CPU only
(``lax.platform_dependent``): elsewhere, and where the scale also varies across rows, one
``xhat`` is shared by the row sums and the column sums, as in flax's autodiff.

Statistics. Which variance algorithm (two-pass, shifted or guarded one-pass) and which
output form run is decided per layout and dtype by :func:`_plan`, from measurements
(docs/performance.md): on XLA:CPU the time of a kernel is not its bytes. Every choice is
exact to rounding when ``|mean| >> std`` (tests/functional/test_f_fused.py).

Given statistics. :func:`normalize_frozen` (BatchNorm at inference, with its running
averages) is the plain formula, differentiated by plain autodiff: XLA then drops the
parameters' sums where their gradients are not used (frozen parameters).

Backends. Everything here is plain JAX (public API only). An optional backend registered in
:mod:`normzoo.functional.backend` (the opt-in CPU kernels, :mod:`normzoo.backends.cpu`) is
asked at trace time, at three places, whether it takes over: the forward pass of
:func:`normalize_affine`, its linearization, and the forward pass of
:func:`normalize_frozen`. With none registered (the default) nothing else runs.

Used for the common case (no mask, no ``axis_name``); the general path in
:mod:`normzoo.functional.operations` covers the rest with plain autodiff.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax
from jax.custom_derivatives import SymbolicZero

from normzoo.functional import backend
from normzoo.functional.moments import reduced_moments

Array = jax.Array

class _Layout:
    """Where the statistics of x live, and how full-size arrays reduce to them.

    The reduction runs over ``sum_axes`` (the reduction axes but the grouped channel axis),
    giving per-channel means of x's shape with ``sum_axes`` set to 1 ("per-channel form");
    with channel groups, :meth:`mean` then averages the ``k`` channels of each group
    ("stat form": channel axis of size G) and :meth:`to_channel` repeats a statistic over
    them. Without groups the two forms are one.
    """

    def __init__(self, shape, axes, group_axis, num_groups):
        self.group_axis = group_axis
        self.sum_axes = tuple(a for a in axes if a != group_axis)
        self.k = 1 if group_axis is None else shape[group_axis] // num_groups
        self.ndim = len(shape)
        self.count = self.k * math.prod(shape[a] for a in self.sum_axes)

    def sum(self, v: Array) -> Array:
        """Full-size -> stat form: the sum over each statistic's ``count`` elements."""
        per_channel = jnp.sum(v, self.sum_axes, keepdims=True)
        if self.group_axis is None:
            return per_channel
        a = self.group_axis
        split = per_channel.shape[:a] + (-1, self.k) + per_channel.shape[a + 1 :]
        return jnp.sum(per_channel.reshape(split), a + 1)

    def mean(self, v: Array) -> Array:
        """Full-size -> stat form: the mean over each statistic's elements.

        Spelled ``jnp.mean`` over ``sum_axes``: XLA:CPU then fuses the moments and the
        normalization into one kernel, which a sum scaled by ``1 / n`` afterwards prevents.
        """
        per_channel = jnp.expand_dims(jnp.mean(v, self.sum_axes), self.sum_axes)
        if self.group_axis is None:
            return per_channel
        a = self.group_axis
        split = per_channel.shape[:a] + (-1, self.k) + per_channel.shape[a + 1 :]
        return jnp.mean(per_channel.reshape(split), a + 1)

    def to_channel(self, stat: Array) -> Array:
        """Stat -> per-channel form: each group's value repeated over its channels (tiny)."""
        return stat if self.group_axis is None else jnp.repeat(stat, self.k, self.group_axis)

    def squeeze(self, stat: Array) -> Array:
        """Stat form -> the returned statistics (the summed axes removed)."""
        return jnp.squeeze(stat, self.sum_axes)


def _per_channel(scale_b: Array | None, layout: _Layout) -> bool:
    """Whether ``scale_b`` is constant over ``sum_axes`` (can multiply per-channel sums)."""
    return scale_b is None or all(scale_b.shape[a] == 1 for a in layout.sum_axes)


def _row_view(layout: _Layout, shape: tuple[int, ...], scale_b: Array):
    """``(row, feature)`` flatteners when x is a ``(rows, features)`` matrix, else None.

    That is when the statistics span the trailing axes (LayerNorm, RMSNorm) and ``scale_b``
    varies along them only. ``row``: stat form -> (R,); ``feature``: a param shaped like
    ``scale_b`` -> (F,), broadcast over the statistic's axes it is constant along.
    """
    lead = layout.ndim - len(layout.sum_axes)
    if layout.group_axis is not None or layout.sum_axes != tuple(range(lead, layout.ndim)):
        return None
    if any(scale_b.shape[a] != 1 for a in range(lead)):
        return None
    feature_shape = (1,) * lead + tuple(shape[lead:])

    def row(stat: Array) -> Array:
        return stat.reshape(-1)

    def feature(param: Array) -> Array:
        return jnp.broadcast_to(param, feature_shape).reshape(-1)

    return row, feature


def _outer(u: Array, v: Array) -> Array:
    """``u v^T`` (R, F) as a dot with no contraction: its transpose is a matrix-vector product.

    Full precision: the default precision of a float32 dot is lower on TPU and GPU.
    """
    return lax.dot_general(u, v, (((), ()), ((), ())), precision=lax.Precision.HIGHEST)


def computed_once(*stats: Array) -> tuple[Array, ...]:
    """``stats`` unchanged; on CPU through one tiny identity matrix product (a linear op).

    XLA:CPU fuses cheap per-statistic arithmetic into the full-size kernel that consumes it
    and recomputes it for every element; a dot is never fused that way, so the arithmetic
    before it runs once, in its own small kernel. The op is linear and its transpose is a
    dot again, so a backward pass gets the same boundary (docs/performance.md). Exact for
    finite values (products by 1 and 0); a non-finite entry turns the others at its position
    NaN (``0 * inf``). Other backends get ``stats`` as they are (measured on CPU only).
    """

    def through_dot(*stats):
        stacked = jnp.stack([jnp.reshape(v, -1) for v in stats])  # (k, size)
        eye = jnp.eye(len(stats), dtype=stacked.dtype)
        out = lax.dot_general(eye, stacked, (((1,), (0,)), ((), ())),
                              precision=lax.Precision.HIGHEST)
        return tuple(jnp.reshape(o, v.shape) for o, v in zip(out, stats))

    if len(stats) < 2:
        raise ValueError(f"computed_once needs at least 2 arrays (a dot contracting over 1 "
                         f"is simplified away); got {len(stats)}")
    return lax.platform_dependent(*stats, cpu=through_dot, default=lambda *stats: stats)


def _leading_bits(v: Array) -> Array:
    """``v`` rounded to 16 significant bits (the "head" of the offset form in :func:`_plan`)."""
    info = jnp.finfo(v.dtype)
    return lax.reduce_precision(v, exponent_bits=info.nexp, mantissa_bits=16)


def _plan(
    layout: _Layout, dtype: Any, use_fast_variance: bool, differentiated: bool = False
) -> tuple[str, str]:
    """``(variance method, output form)``: the fastest exact way for this layout and dtype.

    Chosen by measurement on XLA:CPU (loops of the forward pass and of training steps;
    the numbers are in docs/performance.md, section "Variance plan"):

    * statistics over the trailing axes (LayerNorm): two-pass, offset form;
    * over the leading axes (BatchNorm): two-pass, negated form;
    * over middle axes (InstanceNorm, GroupNorm): guarded one-pass, negated form;
    * 16-bit inputs: two-pass, with the negated form for BatchNorm and the plain form
      otherwise (there XLA runs the whole normalization as one kernel);
    * ``use_fast_variance=False`` (flax's two-pass) always gets ``two_pass``;
    * under differentiation (the linearization) ``guarded`` for every layout (``two_pass``
      without fast variance) and the plain form: on XLA:CPU a reduction over ``x - shift``
      with a broadcast shift is slower than one over ``x`` and ``x^2``.

    Output forms (``a = r * scale`` per channel where the scale folds in):

    * ``plain``: ``(x - mean) * a + b``;
    * ``negated``: ``(x + (-mean)) * a + b``, the same arithmetic spelled apart from the
      two-pass variance's ``x - mean``, so that XLA:CPU does not write one shared full-size
      ``x - mean`` to memory and read it back in both kernels;
    * ``offset``: ``(x - head) * a + (b - tail * a)`` with ``mean = head + tail`` and ``head``
      the mean rounded to 16 bits; XLA:CPU then runs the reductions as its fast reduction
      kernels and ``y`` as a separate elementwise kernel instead of one slower fused kernel
      (LN). It stays accurate when ``|mean| >> std``: ``x - head`` is exact there
      (Sterbenz) and ``|tail| <= 2^-17 |mean|``, so the error is ``~eps (1 + 2^-16 |mean| /
      std)`` of the output where plain ``x * a - mean * a`` would lose ``eps |mean| / std``.
      Its per-channel terms are recomputed per element inside the kernel, which costs
      where the kernel would be separate anyway (BN), so it is used for LN only.
    """
    if differentiated:
        return ("guarded" if use_fast_variance else "two_pass"), "plain"
    n = len(layout.sum_axes)
    leading = layout.sum_axes == tuple(range(n))
    if jnp.dtype(dtype).itemsize < 4:
        return "two_pass", "negated" if leading else "plain"
    if layout.sum_axes == tuple(range(layout.ndim - n, layout.ndim)):
        return "two_pass", "offset"
    if leading or not use_fast_variance:
        return "two_pass", "negated"
    return "guarded", "negated"


def _forward(x, scale_b, bias_b, layout, centered, epsilon, use_fast_variance, stat_dtype,
             out_dtype, differentiated=False):
    """``y``, the stat-form ``mean``, ``var``, ``r`` and the per-channel ``mean``, ``r``."""
    xf = x.astype(stat_dtype)
    method, form = _plan(layout, x.dtype, use_fast_variance, differentiated)
    mean, var = reduced_moments(xf, layout.mean, centered, method, spread=layout.to_channel)
    r = lax.rsqrt(var + epsilon)
    mean_c, r_c = layout.to_channel(mean), layout.to_channel(r)
    folded = scale_b is not None and _per_channel(scale_b, layout)
    if centered and form == "offset":  # (x - head) * a + (b - tail * a)
        head = _leading_bits(mean_c)
        tail = mean_c - head  # exact (Sterbenz)
        if folded or scale_b is None:
            a = r_c * scale_b if folded else r_c
            offset = -tail * a if bias_b is None else bias_b - tail * a
            return ((xf - head) * a + offset).astype(out_dtype), mean, var, r, mean_c, r_c
        y = ((xf - head) * r_c - tail * r_c) * scale_b  # scale varies within a statistic (LN)
    else:
        if not centered:
            c = xf
        else:
            c = xf + (-mean_c) if form == "negated" else xf - mean_c
        # One multiplier r * scale, as flax.linen (same rounding; per channel when folded).
        y = c * (r_c if scale_b is None else r_c * scale_b)
    if bias_b is not None:
        y = y + bias_b
    return y.astype(out_dtype), mean, var, r, mean_c, r_c


@functools.partial(jax.custom_jvp, nondiff_argnums=tuple(range(3, 11)))
def normalize_affine(
    x: Array,
    scale_b: Array | None,
    bias_b: Array | None,
    axes: tuple[int, ...],
    group_axis: int | None,
    num_groups: int | None,
    centered: bool,
    epsilon: float,
    use_fast_variance: bool,
    stat_dtype: Any,
    out_dtype: Any,
) -> tuple[Array, Array, Array]:
    """``(y, mean, var)``: x normalized by its own statistics over ``axes``, then the affine.

    Args:
      x: (S...) input; ``axes`` canonical reduction axes.
      scale_b, bias_b: optional params already shaped to broadcast against x (rank of x).
      group_axis, num_groups: optional channel axis whose channels form ``num_groups``
        groups of ``C / num_groups``; each statistic then also spans a group's channels.
      centered: standardize (True) or scale by the root mean square (False; mean is 0).
      stat_dtype / out_dtype: dtype of the statistics / of y.

    Returns:
      y (S...) in ``out_dtype``; mean and var (or mean square) with the reduction axes
      removed (the group axis, if any, of size ``num_groups``).
    """
    layout = _Layout(x.shape, axes, group_axis, num_groups)
    options = (centered, epsilon, use_fast_variance, stat_dtype, out_dtype)
    taken = None
    active = backend.active()
    if active is not None:  # an opt-in backend may run this forward pass (module docstring)
        taken = active.normalize_affine(x, scale_b, bias_b, layout, *options)
    if taken is None:
        taken = _forward(x, scale_b, bias_b, layout, *options)[:3]
    y, mean, var = taken
    return y, layout.squeeze(mean), layout.squeeze(var)


def _normalize_affine_jvp(
    axes, group_axis, num_groups, centered, epsilon, use_fast_variance, stat_dtype, out_dtype,
    primals, tangents,
):
    """The closed-form linearization (or an opt-in backend's, where it takes over).

    ``tangents`` may hold symbolic zeros (params that are not differentiated). With frozen
    params, a 16-bit input and a scale that varies within each statistic (LayerNorm,
    RMSNorm), the plain formula's own linearization is used instead (:func:`_plain_jvp`):
    measured on XLA:CPU, the closed form's matrix-vector sums then make XLA write float32
    copies of the full-size 16-bit arrays, and the plain form fuses into fewer passes
    (docs/performance.md).
    """
    x = primals[0]
    layout = _Layout(x.shape, axes, group_axis, num_groups)
    options = (centered, epsilon, use_fast_variance, stat_dtype, out_dtype)
    frozen = all(t is None or isinstance(t, SymbolicZero) for t in tangents[1:])
    if (frozen and group_axis is None and jnp.dtype(x.dtype).itemsize < 4
            and primals[1] is not None and not _per_channel(primals[1], layout)):
        return _plain_jvp(layout, options, primals, tangents[0])
    tangents = tuple(
        jnp.zeros(t.shape, t.dtype) if isinstance(t, SymbolicZero) else t for t in tangents)
    active = backend.active()
    if active is not None:
        taken = active.linearize_affine(layout, *options, primals, tangents, frozen=frozen)
        if taken is not None:
            return taken
    return _xla_linearization(layout, *options, primals, tangents)


normalize_affine.defjvp(_normalize_affine_jvp, symbolic_zeros=True)


def _plain_jvp(layout, options, primals, dx):
    """The linearization of the plain formula in x alone (params given, frozen):
    ``y = (x - E[x]) * rsqrt(E[(x - E[x])^2] + eps) * scale + bias`` (two passes, so the
    variance stays exact), or ``x * rsqrt(E[x^2] + eps) * scale`` without centering.

    The statistics read x converted to the statistics dtype and ``y`` reads x itself (the
    conversion is exact): on XLA:CPU one shared full-size converted copy would be written to
    memory, two separate conversions fuse into their kernels.
    """
    centered, epsilon, _, stat_dtype, out_dtype = options
    x, scale_b, bias_b = primals

    def plain(x):
        xf = x.astype(stat_dtype)
        if centered:
            mean = layout.mean(xf)
            c = xf - mean
            var = layout.mean(c * c)
            y = (x - mean) * (layout.to_channel(lax.rsqrt(var + epsilon)) * scale_b)
        else:
            var = layout.mean(xf * xf)
            mean = jnp.zeros_like(var)
            y = x * (layout.to_channel(lax.rsqrt(var + epsilon)) * scale_b)
        if bias_b is not None:
            y = y + bias_b
        return y.astype(out_dtype), layout.squeeze(mean), layout.squeeze(var)

    return jax.jvp(plain, (x,), (dx,))


def _xla_linearization(layout, centered, epsilon, use_fast_variance, stat_dtype, out_dtype,
                       primals, tangents):
    """The linearization, written so that its transpose is the closed-form backward pass.

    ``dvar = 2 E[c dx]`` (the ``E[c] dmean`` term vanishes), ``dr = -r^3 dvar / 2`` and
    ``dxhat = r dx - r dmean + c dr``; see the module docstring for the three term forms.
    """
    x, scale_b, bias_b = primals
    dx, dscale, dbias = tangents
    y, mean, var, r, mean_c, r_c = _forward(
        x, scale_b, bias_b, layout, centered, epsilon, use_fast_variance, stat_dtype, out_dtype,
        differentiated=True,
    )
    xf, dx = x.astype(stat_dtype), dx.astype(stat_dtype)
    folded = _per_channel(scale_b, layout)
    k = r_c * scale_b if scale_b is not None and folded else r_c
    if folded and centered:  # the per-channel vectors of dx's elementwise pass, once
        mean_c, k = computed_once(mean_c, k)
    # x - mean spelled two ways, as in moments.py: after transposition ``c_dx`` lands in dx's
    # elementwise pass and ``c_dy`` in the sums over dy * c; one shared value would be
    # written to memory by XLA:CPU and read back by both kernels.
    c_dx = xf - mean_c if centered else xf
    c_dy = xf + (-mean_c) if centered else xf
    # The sums, then one boundary (computed_once), then the division: transposed, every
    # per-statistic step of the backward runs before the boundary, in a small kernel.
    n = layout.count
    if centered:
        sum_cdx, sum_dx = computed_once(layout.sum(c_dx * dx), layout.sum(dx))
        half_dvar, dmean = sum_cdx / n, sum_dx / n
    else:
        sum_cdx, _ = computed_once(layout.sum(c_dx * dx), jnp.zeros_like(mean))
        half_dvar, dmean = sum_cdx / n, jnp.zeros_like(mean)
    # Per-channel coefficients of the three term forms: dx * k + bcast(s1) + c * bcast(s2).
    s1 = -layout.to_channel(r * dmean)
    s2 = layout.to_channel(-r * r * r * half_dvar)
    if scale_b is not None and folded:
        s1, s2 = s1 * scale_b, s2 * scale_b + r_c * dscale
    if bias_b is not None and folded:
        s1 = s1 + dbias
    if folded:
        dy = dx * k + s1 + c_dy * s2
    else:  # scale varies within a statistic (LayerNorm, RMSNorm): g = dy * scale is needed

        def shared_xhat():
            # One full-size xhat feeds both the row sums (dvar) and the column sums
            # (dscale): XLA:CPU writes it once; spelled with c and r separately it wrote c
            # and a broadcast r, and read both.
            xhat = c_dy * r_c
            return (dx * k + s1 + xhat * (s2 / r_c)) * scale_b + xhat * dscale

        rows = _row_view(layout, x.shape, scale_b)
        if rows is None:
            dy = shared_xhat()
        else:

            def outer_products():
                # Each per-row term times the per-feature scale is an outer product (a dot
                # with no contraction) whose transpose is a matrix-vector product: the row
                # sums become ``dy @ scale`` and ``(dy * c) @ scale``, and ``dscale`` is
                # ``r @ (dy * c)``, the one full-size ``dy * c`` shared by both.
                row, feature = rows
                scale_f = feature(scale_b).astype(stat_dtype)
                dscale_f = feature(dscale).astype(stat_dtype)
                terms = _outer(row(s2), scale_f) + _outer(row(r_c), dscale_f)
                out = dx * (k * scale_b) + c_dy * terms.reshape(x.shape)
                if centered:
                    out = out + _outer(row(s1), scale_f).reshape(x.shape)
                return out

            # Measured on XLA:CPU only (module docstring); other backends keep the form of
            # flax's autodiff.
            dy = lax.platform_dependent(cpu=outer_products, default=shared_xhat)
        if bias_b is not None:
            dy = dy + dbias
    tangent_out = (dy.astype(out_dtype), layout.squeeze(dmean), layout.squeeze(2.0 * half_dvar))
    return (y, layout.squeeze(mean), layout.squeeze(var)), tangent_out


# ------------------------------------------------------------- given (frozen) statistics


def frozen_forward(x, mean_b, var_b, scale_b, bias_b, centered, epsilon, out_dtype):
    """``(x - mean) * (rsqrt(var + eps) * scale) + bias`` with given statistics, in flax's
    order (one multiplier per channel); ``mean_b`` etc. shaped to broadcast against x."""
    y = x - mean_b if centered else x
    mul = lax.rsqrt(var_b + epsilon)
    if scale_b is not None:
        mul = mul * scale_b
    y = y * mul
    if bias_b is not None:
        y = y + bias_b
    return jnp.asarray(y, out_dtype)

def normalize_frozen(
    x: Array,
    mean_b: Array | None,
    var_b: Array,
    scale_b: Array | None,
    bias_b: Array | None,
    axes: tuple[int, ...],
    centered: bool,
    epsilon: float,
    out_dtype: Any,
) -> Array:
    """:func:`frozen_forward` (BatchNorm at inference: statistics given, not x's own).

    Differentiated by plain autodiff, so XLA drops the sums for the parameters' gradients
    where they are not used (frozen parameters), and every derivative order works.

    Args:
      x: (S...) input; ``axes`` the canonical axes the statistics were reduced over.
      mean_b, var_b: the statistics (mean None when not ``centered``: then ``var_b`` is
        the mean square), scale_b, bias_b: optional params; all shaped to broadcast against
        x (rank of x).
    """
    active = backend.active()
    if active is not None:  # an opt-in backend may run this forward pass (module docstring)
        y = active.normalize_frozen(x, mean_b, var_b, scale_b, bias_b, axes, centered, epsilon,
                                    out_dtype)
        if y is not None:
            return y
    return frozen_forward(x, mean_b, var_b, scale_b, bias_b, centered, epsilon, out_dtype)
