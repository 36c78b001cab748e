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
on those tiny arrays. A strided reduction over a split channel axis is several times slower on
CPU than a reduction that keeps the contiguous channel axis.

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
:func:`computed_once`, a tiny identity matrix product: otherwise XLA:CPU recomputes their
arithmetic for every element (BatchNorm training step, bfloat16: the ``dx`` kernel went
from ~4.2 to ~2.2 ms).

When ``scale`` varies within a statistic the backward's sums are over ``g = dy * scale``.
For LayerNorm and RMSNorm (x a ``(rows, features)`` matrix, scale per feature) the per-row
terms times the scale are written as outer products (:func:`_outer`), so their transposes
are matrix-vector products: ``E[g] = dy @ scale / n``, ``E[g c] = (dy * c) @ scale / n``
and ``dscale = r @ (dy * c)``, the one full-size ``dy * c`` written once and read by both.
XLA:CPU runs those as BLAS matrix-vector products at memory speed; its fused row and column
reductions over two arrays ran ~2x slower (training step, 4096x1024 float32: 4.7 ms
against flax's 9.6 ms; with reductions 10.6 ms). That form is chosen on CPU only
(``lax.platform_dependent``): elsewhere, and where the scale also varies across rows, one
``xhat`` is shared by the row sums and the column sums, as in flax's autodiff.

Statistics. Which variance algorithm (two-pass, shifted or guarded one-pass) and which
output form run is decided per layout and dtype by :func:`_plan`, from measurements: on
XLA:CPU the time of a kernel is not its bytes. A reduction over ``x - shift`` with a
broadcast shift runs ~3x slower than one over ``x`` and ``x^2``, a kernel writing a fresh
buffer ~3x slower than one writing in place, and the forward pass fused into one kernel
slower than reductions followed by a separate elementwise kernel. Every choice is exact to
rounding when ``|mean| >> std`` (tests/functional/test_f_fused.py).

Native kernels. On CPU the forward pass of the layouts and dtypes in :data:`NATIVE_PLAN`
runs as one hand-written kernel (:mod:`normzoo.functional.native`): XLA:CPU's reductions
along the contiguous axis are serial loops, so LayerNorm and RMSNorm cost 4-6 copies of x
there. Where :data:`NATIVE_BACKWARD_PLAN` says so, the linearization uses them too: the
native forward plus :func:`normzoo.functional.native.linear.tangent`, a primitive whose
transpose (the backward pass of ``jax.grad``) is a native kernel. ``native_policy`` (a
static argument, :func:`normzoo.functional.native.policy`, so traces made with the kernels
on and off are cached apart) selects them from a minimum size of x on, and
``lax.platform_dependent`` keeps the XLA code for other backends.

Given statistics. :func:`normalize_frozen` (BatchNorm at inference, with its running
averages) runs on CPU the native ``channel_affine`` kernel (XLA:CPU's elementwise loop over
bfloat16 is slow: a bfloat16 copy costs more than a float32 one of the same shape) and takes
its derivative from the same primitive in a ``frozen`` view: one native pass for ``dx`` and
the params' sums, where autodiff leaves column sums to XLA:CPU's slow reductions over the
leading axes.

Used for the common case (no mask, no ``axis_name``); the general path in
:mod:`normzoo.functional.operations` covers the rest with plain autodiff.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

from normzoo.functional import native
from normzoo.functional.native.linear import View, tangent as native_tangent
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
    dot again, so a backward pass gets the same boundary: the ``dx`` kernel of a BatchNorm
    training step (64x28x28x128, bfloat16, jax.profiler) went from ~4.2 to ~2.2 ms; an
    elementwise pass with five per-channel coefficients from 2.4 to 1.4 ms (float32). Exact
    for finite values
    (products by 1 and 0); a non-finite entry turns the others at its position NaN
    (``0 * inf``). Other backends get ``stats`` as they are (measured on CPU only).
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

    Chosen by measurement on XLA:CPU (2 cores, jax 0.10; loops of the forward pass with the
    output written over x, float32 64x28x28x128 / 4096x1024, µs per step, copy ~500 / ~350):

    ================  ===========  ==========  ==========  ===========
    statistic spans   one-pass     shifted     two-pass    chosen
    ================  ===========  ==========  ==========  ===========
    trailing (LN)     1820 (flax)  2200        1130 *      two-pass, offset form
    leading (BN)      1490 (flax)  2030        1800 *      two-pass, negated form
    middle (IN, GN)   2630 (flax)  7230        3540        guarded 2560, negated form
    ================  ===========  ==========  ==========  ===========

    (* with the offset form; for BN the negated form below does the same without the
    offset form's per-element cost: 1690 µs against flax's 1500 in the benchmark's loop,
    the price of two dependent reductions instead of two independent ones.)

    For 16-bit inputs two-pass with the plain form is as fast as flax's one pass or faster
    for LN and IN (LN 1350 vs 1320, IN 3120 vs 4200 µs, bfloat16): there XLA runs the whole
    normalization as one kernel, and both other forms were slower (the float32 copy of x
    gets written). BN takes the negated form: with the plain one XLA wrote the shared
    ``x - mean`` to memory (2030 µs against 3280, flax 2100; per-iteration slopes of the
    benchmark's loops); for IN the negated form was 3x slower.

    Output forms (``a = r * scale`` per channel where the scale folds in):

    * ``plain``: ``(x - mean) * a + b``;
    * ``negated``: ``(x + (-mean)) * a + b``, the same arithmetic spelled apart from the
      two-pass variance's ``x - mean``: one shared full-size ``x - mean`` is written to
      memory by XLA:CPU and read back by both kernels (BN: 6 passes over x instead of 4);
    * ``offset``: ``(x - head) * a + (b - tail * a)`` with ``mean = head + tail`` and ``head``
      the mean rounded to 16 bits; XLA:CPU then runs the reductions as its fast reduction
      kernels and ``y`` as a separate elementwise kernel instead of one slower fused kernel
      (LN). It stays accurate when ``|mean| >> std``: ``x - head`` is exact there
      (Sterbenz) and ``|tail| <= 2^-17 |mean|``, so the error is ``~eps (1 + 2^-16 |mean| /
      std)`` of the output where plain ``x * a - mean * a`` would lose ``eps |mean| / std``.
      Its per-channel terms are recomputed per element inside the kernel, which costs
      where the kernel would be separate anyway (BN), so it is used for LN only.

    ``use_fast_variance=False`` (flax's two-pass) always gets ``two_pass``.

    Under differentiation (the linearization) the statistics are ``guarded`` for every
    layout: timed in training-step loops (fwd+bwd, float32), it beat ``shifted`` and
    ``two_pass`` everywhere (time(flax) / time(normzoo): BN 1.65 vs 1.31 and 1.05, GN 1.82
    vs 1.51 and 1.53, IN 0.97 vs 0.74 and 0.86, LN 0.89 vs 0.87 and 0.75), although
    ``shifted`` reads x fewest times in the compiled HLO: on XLA:CPU a reduction over
    ``x - shift`` with a broadcast shift runs ~3x slower than one over ``x`` and ``x^2``.
    With LayerNorm's matrix-vector backward (module docstring) ``guarded`` still wins:
    4.9 ms per step against 8.3 ms for ``two_pass`` (4096x1024 float32; flax 9.4 ms).
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


#: (kernel, x dtype) pairs that use the native CPU kernels (for x of at least
#: ``native.MIN_SIZE["forward"]`` elements): every one beat this module's XLA forward
#: pass, measured side by side (``python -m benchmarks --passes fwd``, 2-core
#: CPU, time of the XLA path / time of the kernel, float32 / bfloat16): row LN 2.04 / 1.98,
#: RMS 5.80 / 1.27; grouped BN 1.54 / 3.14, GN 2.17 / 6.02, IN 1.68 / 3.17; ``frozen``
#: (:func:`normalize_frozen`, the ``channel_affine`` kernel) 1.05 / 1.67.
NATIVE_PLAN = {("row", "float32"), ("row", "bfloat16"),
               ("grouped", "float32"), ("grouped", "bfloat16"),
               ("frozen", "float32"), ("frozen", "bfloat16")}


#: Where the linearization (training steps) uses the native kernels too: the forward pass
#: and :func:`normzoo.functional.native.linear.tangent`, whose transpose is the native
#: backward kernel. Keys: (kernel, x dtype, variant), variant ``centered`` (LN) or
#: ``uncentered`` (RMS) for rows, ``per_sample`` (IN, GN) or ``whole`` (BN: the batch axes
#: reduced too) for groups, ``frozen`` for given statistics (:func:`normalize_frozen`:
#: BatchNorm at inference, 1.3-1.6 / 1.9-3.7 against the XLA autodiff, float32 /
#: bfloat16, over four benchmark runs of 2026-12-01). Measured
#: in training-step loops (``python -m benchmarks
#: --passes fwd+bwd``, time of the XLA linearization / native): float32 LN 1.13-1.28, RMS
#: 0.97-1.15 (a tie or better since the row backward takes rows in groups of 4; 0.83
#: before), GN 1.86, IN 1.31; bfloat16 LN 2.69, RMS 1.78, BN 1.94, GN 4.17, IN 3.03. Left
#: out: float32 BN (0.60), where XLA's backward (column reductions fused with the input's
#: update) is faster. Only for x of at least ``native.MIN_SIZE["backward"]`` elements: on
#: smaller arrays XLA's fused code was faster.
NATIVE_BACKWARD_PLAN = {
    ("row", "float32", "centered"), ("row", "bfloat16", "centered"),
    ("row", "float32", "uncentered"), ("row", "bfloat16", "uncentered"),
    ("grouped", "float32", "per_sample"), ("grouped", "bfloat16", "per_sample"),
    ("grouped", "bfloat16", "whole"),
    ("grouped", "float32", "frozen"), ("grouped", "bfloat16", "frozen"),
}


def _native_backward_planned(view: View, dtype) -> bool:
    if view.kind == "row":
        variant = "centered" if view.centered else "uncentered"
    elif view.frozen:
        variant = "frozen"
    else:
        variant = "per_sample" if view.batch > 1 else "whole"
    return (view.kind, jnp.dtype(dtype).name, variant) in NATIVE_BACKWARD_PLAN


def _native_view(x, scale_b, bias_b, layout, centered, epsilon, stat_dtype, out_dtype):
    """How a native CPU kernel (:mod:`normzoo.functional.native`) reads x, or None where
    none applies; with the params' shape as the kernel's (F,) vectors see them.

    ``row``: the statistics span x's trailing axes, x is a ``(R, F)`` matrix and the params
    vary along F only (LayerNorm, RMSNorm). ``grouped``: the statistics span a contiguous
    run of axes followed by the channel axes, x is ``(B, M, C)`` with the params per channel
    (BatchNorm, InstanceNorm, GroupNorm with the group axis last). Only for float32 and
    bfloat16 x and y, float32 statistics, and the pairs of :data:`NATIVE_PLAN`.
    """
    f32 = jnp.dtype(jnp.float32)
    if (jnp.dtype(stat_dtype) != f32 or x.dtype not in native.SUPPORTED_DTYPES
            or jnp.dtype(out_dtype) not in native.SUPPORTED_DTYPES or x.size == 0):
        return None
    shape, ndim, sums = x.shape, layout.ndim, layout.sum_axes
    if not sums:
        return None
    first, stop = sums[0], sums[-1] + 1
    if sums != tuple(range(first, stop)):
        return None
    params_constant_before = lambda axis: all(  # noqa: E731
        p is None or all(p.shape[a] == 1 for a in range(axis)) for p in (scale_b, bias_b))
    if stop == ndim and layout.group_axis is None:
        kind, param_axis = "row", first
    elif layout.group_axis in (None, stop) and (layout.group_axis is None or stop == ndim - 1):
        kind, param_axis = "grouped", stop
    else:
        return None
    if (kind, x.dtype.name) not in NATIVE_PLAN or not params_constant_before(param_axis):
        return None
    # Inside shard_map the results vary along x's mesh axes: params must not vary further.
    if any(p is not None and not native.varying_axes(p) <= native.varying_axes(x)
           for p in (scale_b, bias_b)):
        return None
    stat_shape = [1 if a in sums else size for a, size in enumerate(shape)]  # layout.mean's
    if layout.group_axis is not None:
        stat_shape[layout.group_axis] //= layout.k
    view = View(kind, math.prod(shape[param_axis:]), batch=math.prod(shape[:first]),
                group_size=layout.k, centered=centered, epsilon=float(epsilon),
                out_dtype=jnp.dtype(out_dtype), stat_shape=tuple(stat_shape))
    return view, (1,) * param_axis + tuple(shape[param_axis:])


def _vector(param, fill, view, param_shape):
    """A param broadcast to the kernel's (F,) float32 vector (``fill`` where None)."""
    if param is None:
        return jnp.full((view.features,), fill, jnp.float32)
    return jnp.broadcast_to(param, param_shape).reshape(view.features).astype(jnp.float32)


def _native_run(view, param_shape, in_place=True):
    """``(x, scale_b, bias_b) -> (y, mean, var)`` (stat form) on the view's kernel."""

    def run(x, scale_b, bias_b):
        options = dict(epsilon=view.epsilon, centered=view.centered, out_dtype=view.out_dtype,
                       stat_shape=view.stat_shape, in_place=in_place)
        scale_v = _vector(scale_b, 1.0, view, param_shape)
        bias_v = _vector(bias_b, 0.0, view, param_shape)
        if view.kind == "row":
            return native.row_normalize(x, scale_v, bias_v, features=view.features, **options)
        return native.grouped_normalize(x, scale_v, bias_v, group_size=view.group_size,
                                        batch=view.batch, channels=view.features, **options)

    return run


@functools.partial(jax.custom_jvp, nondiff_argnums=tuple(range(3, 12)))
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
    native_policy: tuple[int, int] | None = None,
) -> tuple[Array, Array, Array]:
    """``(y, mean, var)``: x normalized by its own statistics over ``axes``, then the affine.

    Args:
      x: (S...) input; ``axes`` canonical reduction axes.
      scale_b, bias_b: optional params already shaped to broadcast against x (rank of x).
      group_axis, num_groups: optional channel axis whose channels form ``num_groups``
        groups of ``C / num_groups``; each statistic then also spans a group's channels.
      centered: standardize (True) or scale by the root mean square (False; mean is 0).
      stat_dtype / out_dtype: dtype of the statistics / of y.
      native_policy: None, or on CPU use the native kernels where they apply
        (:func:`_native_view`, :data:`NATIVE_PLAN`, :data:`NATIVE_BACKWARD_PLAN`) for x of at
        least ``native_policy[0]`` elements (forward) / ``native_policy[1]`` (training).

    Returns:
      y (S...) in ``out_dtype``; mean and var (or mean square) with the reduction axes
      removed (the group axis, if any, of size ``num_groups``).
    """
    layout = _Layout(x.shape, axes, group_axis, num_groups)
    y, mean, var = _statistics_and_output(
        x, scale_b, bias_b, layout, centered, epsilon, use_fast_variance, stat_dtype, out_dtype,
        native_policy is not None and x.size >= native_policy[0],
    )
    return y, layout.squeeze(mean), layout.squeeze(var)


def _statistics_and_output(x, scale_b, bias_b, layout, centered, epsilon, use_fast_variance,
                           stat_dtype, out_dtype, use_native):
    """``(y, mean, var)`` (stat form): on CPU from a native kernel where one applies, else XLA.

    Only the undifferentiated call comes here: derivatives go through the linearization.
    """

    def with_xla(x, scale_b, bias_b):
        y, mean, var, *_ = _forward(
            x, scale_b, bias_b, layout, centered, epsilon, use_fast_variance, stat_dtype,
            out_dtype,
        )
        return y, mean, var

    found = use_native and _native_view(
        x, scale_b, bias_b, layout, centered, epsilon, stat_dtype, out_dtype)
    if not found:
        return with_xla(x, scale_b, bias_b)
    return lax.platform_dependent(x, scale_b, bias_b, cpu=_native_run(*found), default=with_xla)


@normalize_affine.defjvp
def _normalize_affine_jvp(
    axes, group_axis, num_groups, centered, epsilon, use_fast_variance, stat_dtype, out_dtype,
    native_policy, primals, tangents,
):
    """The linearization: on CPU the native kernels' where they apply, else in XLA."""
    x, scale_b, bias_b = primals
    layout = _Layout(x.shape, axes, group_axis, num_groups)
    options = (centered, epsilon, use_fast_variance, stat_dtype, out_dtype)
    use_native = native_policy is not None and x.size >= native_policy[1]
    found = use_native and _native_view(
        x, scale_b, bias_b, layout, centered, epsilon, stat_dtype, out_dtype)
    if not found or not _native_backward_planned(found[0], x.dtype):
        return _xla_linearization(layout, *options, primals, tangents)

    def on_cpu(primals, tangents):
        return _native_linearization(found, layout, *options, primals, tangents)

    def elsewhere(primals, tangents):
        return _xla_linearization(layout, *options, primals, tangents)

    return lax.platform_dependent(primals, tangents, cpu=on_cpu, default=elsewhere)


def _native_linearization(found, layout, centered, epsilon, use_fast_variance, stat_dtype,
                          out_dtype, primals, tangents):
    """The native forward and :func:`normzoo.functional.native.linear.tangent`, whose
    transpose (reverse mode) is the native backward kernel.

    The forward kernel is wrapped in a ``custom_jvp`` with the XLA forward's derivative, so
    this linearization can itself be differentiated (second derivatives).
    """
    view, param_shape = found
    x, scale_b, bias_b = primals
    dx, dscale, dbias = tangents

    def with_xla(x, scale_b, bias_b):
        return _forward(x, scale_b, bias_b, layout, centered, epsilon, use_fast_variance,
                        stat_dtype, out_dtype)[:3]

    forward = jax.custom_jvp(_native_run(view, param_shape, in_place=False))  # x is kept
    forward.defjvp(lambda p, t: jax.jvp(with_xla, p, t))
    y, mean, var = forward(x, scale_b, bias_b)
    vector = lambda v, fill: _vector(v, fill, view, param_shape)  # noqa: E731
    dy, dmean, dvar = native_tangent(
        x, vector(scale_b, 1.0), mean, var, dx.astype(x.dtype),
        vector(None if scale_b is None else dscale, 0.0),
        vector(None if bias_b is None else dbias, 0.0), view=view)
    return ((y, layout.squeeze(mean), layout.squeeze(var)),
            (dy, layout.squeeze(dmean), layout.squeeze(dvar)))


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
            # and a broadcast r, and read both (jax.profiler, 4096x1024 float32).
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


@functools.partial(jax.custom_jvp, nondiff_argnums=tuple(range(5, 10)))
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
    native_policy: tuple[int, int] | None = None,
) -> Array:
    """:func:`frozen_forward` (BatchNorm at inference: statistics given, not x's own), with
    a derivative that on CPU runs the native grouped backward kernel in its ``frozen`` mode:
    one pass that writes ``gx = (r scale) gy`` and takes the sums ``sum(gy)`` and
    ``sum(gy (x - mean))`` for the params' gradients. Autodiff of the formula leaves those
    column sums to XLA:CPU's reductions over the leading axes, ~3 copies of x each.

    The statistics' own tangents (a gradient with respect to the running averages) fold
    into per-channel ones, ``dy = r scale dx + (x - mean) r dscale' + dbias'`` with
    ``dscale' = dscale - scale r^2 dvar / 2`` and ``dbias' = dbias - r scale dmean``, so the
    one kernel serves them too.

    Args:
      x: (S...) input; ``axes`` the canonical axes the statistics were reduced over.
      mean_b, var_b: the statistics (mean None when not ``centered``: then ``var_b`` is
        the mean square), scale_b, bias_b: optional params; all shaped to broadcast against
        x (rank of x).
      native_policy: as :func:`normalize_affine`'s (the smallest x whose forward pass /
        derivative uses the kernels).
    """
    found = (native_policy is not None and x.size >= native_policy[0]
             and ("frozen", x.dtype.name) in NATIVE_PLAN
             and _frozen_view(x, scale_b, bias_b, axes, centered, epsilon, out_dtype))
    args = (x, mean_b, var_b, scale_b, bias_b)
    with_xla = lambda *p: frozen_forward(*p, centered, epsilon, out_dtype)  # noqa: E731
    if not found:
        return with_xla(*args)
    run = _frozen_run(*found, centered, epsilon, out_dtype, in_place=True)
    return lax.platform_dependent(*args, cpu=run, default=with_xla)


def _frozen_view(x, scale_b, bias_b, axes, centered, epsilon, out_dtype):
    """The native grouped view of x with given statistics (``frozen``), with the params'
    shape, or None where the statistics are not one per channel of a ``(1, M, C)`` view."""
    layout = _Layout(x.shape, axes, None, None)
    found = _native_view(x, scale_b, bias_b, layout, centered, epsilon, jnp.float32, out_dtype)
    if not found:
        return None
    view, param_shape = found
    stat_shape = (1,) * len(layout.sum_axes) + x.shape[len(layout.sum_axes):]
    if view.kind != "grouped" or view.batch != 1 or param_shape != stat_shape:
        return None
    return dataclasses.replace(view, frozen=True), param_shape


def _frozen_run(view, param_shape, centered, epsilon, out_dtype, in_place):
    """:func:`frozen_forward` on the native ``channel_affine`` kernel (same rounding of the
    per-channel multiplier ``rsqrt(var + eps) * scale``)."""

    def run(x, mean_b, var_b, scale_b, bias_b):
        vector = lambda v, fill: _vector(v, fill, view, param_shape)  # noqa: E731
        mul = lax.rsqrt(vector(var_b, 0.0) + epsilon) * vector(scale_b, 1.0)
        return native.channel_affine(x, vector(mean_b if centered else None, 0.0), mul,
                                     vector(bias_b, 0.0), out_dtype=out_dtype,
                                     channels=view.features, in_place=in_place)

    return run


@normalize_frozen.defjvp
def _normalize_frozen_jvp(axes, centered, epsilon, out_dtype, native_policy, primals, tangents):
    x, mean_b, var_b, scale_b, bias_b = primals

    def with_xla(primals, tangents):
        forward = lambda *p: frozen_forward(*p, centered, epsilon, out_dtype)  # noqa: E731
        return jax.jvp(forward, primals, tangents)

    found = (native_policy is not None and x.size >= native_policy[1]
             and _frozen_view(x, scale_b, bias_b, axes, centered, epsilon, out_dtype))
    if not found or not _native_backward_planned(found[0], x.dtype):
        return with_xla(primals, tangents)
    view, param_shape = found

    def on_cpu(primals, tangents):
        x, mean_b, var_b, scale_b, bias_b = primals
        dx, dmean, dvar, dscale, dbias = tangents
        vector = lambda v, fill: _vector(v, fill, view, param_shape)  # noqa: E731
        if ("frozen", x.dtype.name) in NATIVE_PLAN:  # x is kept for the backward
            y = _frozen_run(view, param_shape, centered, epsilon, out_dtype, False)(*primals)
        else:
            y = frozen_forward(*primals, centered, epsilon, out_dtype)
        var_v = vector(var_b, 0.0)
        r = lax.rsqrt(var_v + epsilon)
        scale_v = vector(scale_b, 1.0)
        # The statistics' tangents as per-channel ones of the params (docstring).
        dscale_v = vector(None if scale_b is None else dscale, 0.0)
        dscale_v = dscale_v - scale_v * (0.5 * r * r) * vector(dvar, 0.0)
        dbias_v = vector(None if bias_b is None else dbias, 0.0)
        mean_v = vector(mean_b if centered else None, 0.0)
        if centered:
            dbias_v = dbias_v - r * scale_v * vector(dmean, 0.0)
        stats = lambda v: v.reshape(view.stat_shape)  # noqa: E731
        dy, _, _ = native_tangent(x, scale_v, stats(mean_v), stats(var_v), dx.astype(x.dtype),
                                  dscale_v, dbias_v, view=view)
        return y, dy

    return lax.platform_dependent(primals, tangents, cpu=on_cpu, default=with_xla)
