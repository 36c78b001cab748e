"""Where the CPU kernels take over from normzoo's pure-JAX ops, and where they step aside.

:class:`CpuKernels` is the object :func:`normzoo.backends.cpu.enable` registers in
:mod:`normzoo.functional.backend`; :mod:`normzoo.functional.fused` asks it at trace time.
It takes over only where the kernels measured no slower than the pure-JAX path and keep
every transformation working (docs/performance.md, "Opt-in CPU kernels"):

* forward passes (:data:`NATIVE_PLAN`) of x of at least ``MIN_SIZE["forward"]`` elements:
  the row kernel (LayerNorm, RMSNorm), the grouped kernel (BatchNorm in training,
  InstanceNorm, GroupNorm) and ``channel_affine`` (BatchNorm at inference);
* linearizations (training steps, :data:`NATIVE_BACKWARD_PLAN`: LayerNorm, InstanceNorm,
  GroupNorm, bfloat16 BatchNorm) of x of at least ``MIN_SIZE["backward"]`` elements: the
  native forward plus :func:`normzoo.backends.cpu.linear.tangent`, whose transpose is the
  native backward.

It steps aside (the pure-JAX code runs) for:

* given statistics under differentiation (BatchNorm at inference under ``grad``): a custom
  call cannot be partly dropped, while XLA drops the parameters' sums that a frozen-params
  gradient does not use; the kernel's forward is wrapped in a ``custom_jvp`` whose rule is
  the plain formula's, so every derivative order works;
* LayerNorm's linearization when no param is differentiated (only ``dx`` used), for the
  same reason, and RMSNorm's linearization: the pure-JAX closed form measured faster;
* a process with more than one device, outside ``shard_map``: under ``jit`` a custom call
  has no sharding rule, so XLA would gather a sharded batch onto one device and return a
  replicated output. Inside ``shard_map`` every device runs the kernel on its own shard, so
  the kernels are used there (``enable(multi_device=True)`` uses them everywhere, for
  processes whose inputs are never sharded);
* layouts, dtypes and sizes outside the plans, other backends than CPU
  (``lax.platform_dependent``), and any array that varies along more ``shard_map`` axes
  than x.

Every forward kernel sits in a ``custom_jvp`` with the XLA derivative, and the tangent
primitive has a jax.numpy reference for forward mode, vmap and higher derivatives, so
``jvp(grad)``, ``grad(vdot(grad))`` and ``hessian`` work with the kernels on.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
from jax import lax

from normzoo.backends.cpu import ffi
from normzoo.backends.cpu.linear import View, tangent as native_tangent
from normzoo.functional import fused
from normzoo.functional.fused import _forward, _Layout, frozen_forward

#: Smallest x, in elements, whose forward pass / training step use the kernels: on smaller
#: arrays XLA's fused code was as fast or faster (docs/performance.md).
MIN_SIZE = {"forward": 1 << 16, "backward": 1 << 21}

#: Settings of the registered backend (:func:`normzoo.backends.cpu.enable`).
SETTINGS = {"multi_device": False}

#: (kernel, x dtype) pairs whose forward pass uses the kernels (for x of at least
#: ``MIN_SIZE["forward"]`` elements): each beat the pure-JAX forward pass, measured side by
#: side (docs/performance.md). ``frozen``: given statistics, the ``channel_affine`` kernel.
NATIVE_PLAN = {("row", "float32"), ("row", "bfloat16"),
               ("grouped", "float32"), ("grouped", "bfloat16"),
               ("frozen", "float32"), ("frozen", "bfloat16")}

#: Where the linearization (training steps) uses the native kernels too: the forward pass
#: and :func:`normzoo.backends.cpu.linear.tangent`, whose transpose is the native backward
#: kernel. Keys: (kernel, x dtype, variant), variant ``centered`` (LN) or ``uncentered``
#: (RMS) for rows, ``per_sample`` (IN, GN) or ``whole`` (BN: the batch axes reduced too) for
#: groups. Left out, because the pure-JAX closed form measured faster (docs/performance.md):
#: RMSNorm (XLA fuses its whole uncentered backward), float32 BN (XLA's column reductions
#: fuse with the input's update); and given statistics (no custom call under
#: differentiation, above). Rows also step aside when no param is differentiated
#: (:meth:`CpuKernels.linearize_affine`).
NATIVE_BACKWARD_PLAN = {
    ("row", "float32", "centered"), ("row", "bfloat16", "centered"),
    ("grouped", "float32", "per_sample"), ("grouped", "bfloat16", "per_sample"),
    ("grouped", "bfloat16", "whole"),
}


def _steps_aside_for_devices(x) -> bool:
    """Outside ``shard_map`` in a process with several devices (module docstring)."""
    if SETTINGS["multi_device"] or ffi.varying_axes(x):
        return False
    return jax.device_count() > 1


def _native_backward_planned(view: View, dtype) -> bool:
    if view.kind == "row":
        variant = "centered" if view.centered else "uncentered"
    elif view.frozen:
        variant = "frozen"
    else:
        variant = "per_sample" if view.batch > 1 else "whole"
    return (view.kind, jnp.dtype(dtype).name, variant) in NATIVE_BACKWARD_PLAN


def _native_view(x, scale_b, bias_b, layout, centered, epsilon, stat_dtype, out_dtype):
    """How a CPU kernel (:mod:`normzoo.backends.cpu.ffi`) reads x, or None where none
    applies; with the params' shape as the kernel's (F,) vectors see them.

    ``row``: the statistics span x's trailing axes, x is a ``(R, F)`` matrix and the params
    vary along F only (LayerNorm, RMSNorm). ``grouped``: the statistics span a contiguous
    run of axes followed by the channel axes, x is ``(B, M, C)`` with the params per channel
    (BatchNorm, InstanceNorm, GroupNorm with the group axis last). Only for float32 and
    bfloat16 x and y, float32 statistics, and the pairs of :data:`NATIVE_PLAN`.
    """
    f32 = jnp.dtype(jnp.float32)
    if (jnp.dtype(stat_dtype) != f32 or x.dtype not in ffi.SUPPORTED_DTYPES
            or jnp.dtype(out_dtype) not in ffi.SUPPORTED_DTYPES or x.size == 0
            or _steps_aside_for_devices(x)):
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
    if any(p is not None and not ffi.varying_axes(p) <= ffi.varying_axes(x)
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
            return ffi.row_normalize(x, scale_v, bias_v, features=view.features, **options)
        return ffi.grouped_normalize(x, scale_v, bias_v, group_size=view.group_size,
                                     batch=view.batch, channels=view.features, **options)

    return run


def _native_linearization(found, layout, centered, epsilon, use_fast_variance, stat_dtype,
                          out_dtype, primals, tangents):
    """The native forward and :func:`normzoo.backends.cpu.linear.tangent`, whose
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
        return ffi.channel_affine(x, vector(mean_b if centered else None, 0.0), mul,
                                     vector(bias_b, 0.0), out_dtype=out_dtype,
                                     channels=view.features, in_place=in_place)

    return run


class CpuKernels:
    """The backend object of :mod:`normzoo.functional.backend` (its three methods)."""

    def normalize_affine(self, x, scale_b, bias_b, layout, centered, epsilon,
                         use_fast_variance, stat_dtype, out_dtype):
        """The undifferentiated forward pass on a kernel where one applies, else None."""
        if x.size < MIN_SIZE["forward"]:
            return None
        found = _native_view(x, scale_b, bias_b, layout, centered, epsilon, stat_dtype,
                             out_dtype)
        if not found:
            return None

        def with_xla(x, scale_b, bias_b):
            return _forward(x, scale_b, bias_b, layout, centered, epsilon, use_fast_variance,
                            stat_dtype, out_dtype)[:3]

        return lax.platform_dependent(x, scale_b, bias_b, cpu=_native_run(*found),
                                      default=with_xla)

    def linearize_affine(self, layout, centered, epsilon, use_fast_variance, stat_dtype,
                         out_dtype, primals, tangents, *, frozen=False):
        """The native linearization where :data:`NATIVE_BACKWARD_PLAN` has it, else None.

        ``frozen`` (no param differentiated, or none given): the row kernels step aside.
        Their backward computes the params' column sums in the same pass as ``dx`` and a
        custom call cannot be partly dropped, while XLA drops those sums from the closed
        form when nothing uses them. Without params no measurement favours the kernels, so
        one rule covers both.
        """
        x, scale_b, bias_b = primals
        if x.size < MIN_SIZE["backward"]:
            return None
        found = _native_view(x, scale_b, bias_b, layout, centered, epsilon, stat_dtype,
                             out_dtype)
        if not found or not _native_backward_planned(found[0], x.dtype):
            return None
        if frozen and found[0].kind == "row":
            return None
        options = (centered, epsilon, use_fast_variance, stat_dtype, out_dtype)

        def on_cpu(primals, tangents):
            return _native_linearization(found, layout, *options, primals, tangents)

        def elsewhere(primals, tangents):
            return fused._xla_linearization(layout, *options, primals, tangents)

        return lax.platform_dependent(primals, tangents, cpu=on_cpu, default=elsewhere)

    def normalize_frozen(self, x, mean_b, var_b, scale_b, bias_b, axes, centered, epsilon,
                         out_dtype):
        """Given statistics on ``channel_affine`` where it applies, else None.

        The kernel sits in a ``custom_jvp`` whose rule is the plain formula's (primal and
        tangent in XLA): differentiated, no custom call is left in the program, so XLA drops
        what a frozen-params gradient does not use, and every derivative order works.
        """
        if x.size < MIN_SIZE["forward"] or ("frozen", x.dtype.name) not in NATIVE_PLAN:
            return None
        found = _frozen_view(x, scale_b, bias_b, axes, centered, epsilon, out_dtype)
        if not found:
            return None
        with_xla = lambda *p: frozen_forward(*p, centered, epsilon, out_dtype)  # noqa: E731
        run = _frozen_run(*found, centered, epsilon, out_dtype, in_place=True)
        forward = jax.custom_jvp(
            lambda *p: lax.platform_dependent(*p, cpu=run, default=with_xla))
        forward.defjvp(lambda p, t: jax.jvp(with_xla, p, t))
        return forward(x, mean_b, var_b, scale_b, bias_b)
