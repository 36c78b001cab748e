"""Prototypes of faster normalization, measured with the benchmark's own machinery.

Not part of normzoo: quick candidates for ``normzoo/functional``, kept
here so that the evidence behind the proposal can be rerun. ``proto_nhwc``'s channels-last
group sums and ``proto_vjp``'s backward reading only ``x``, ``dy`` and per-channel vectors
are now in :mod:`normzoo.functional.fused` (as a ``custom_jvp``, which keeps forward mode);
``proto_moments`` was not adopted (its unshifted ``E[x]`` loses the large-mean accuracy of
the shifted mean). The ideas, measured separately:

``proto_moments`` (forward only; backward by autodiff)
    XLA:CPU materializes any full-size elementwise result that feeds more than one
    reduction. normzoo's shifted one-pass moments compute ``d = x - pilot`` once and reduce
    ``d`` and ``d^2``: ``d`` is written to memory and read twice (a write and a read more
    than flax's plain ``E[x]``, ``E[x^2]``). Here the mean is ``E[x]`` (no cancellation in a
    mean) and only the second moment is shifted, ``var = E[(x - s)^2] - (E[x] - s)^2``, so
    each reduction reads ``x`` itself and nothing is materialized; accuracy for
    ``|mean| >> std`` is kept (``E[x] - s`` is a few std at most).

``proto_nhwc`` (GroupNorm / InstanceNorm only; :func:`group_standardize_vjp`)
    Like ``proto_vjp`` but without the (N, H, W, G, C/G) group view: every full-size
    reduction is over the spatial axes in x's own layout, to per-(sample, channel) partial
    sums, and the group sums and parameter gradients are finished on those (N, C) arrays.

``proto_vjp`` (the moments above plus a ``jax.custom_vjp``)
    The backward pass in closed form, saving only ``x``, the per-statistic ``mean`` and
    ``r = rsqrt(var + eps)``: with ``g = dy * scale``, ``n`` elements per statistic and
    ``c = x - mean``::

        dx      = r (g - E[g]) - c r^3 E[g c]
        dscale  = sum(dy c r),  dbias = sum(dy)                     # over the params' axes

    written so that every reduction reads ``x`` / ``dy`` directly (see ``_vjp_bwd``), and
    ``dx`` is one elementwise pass. The running-statistics outputs are treated as
    non-differentiable here (their cotangents are dropped; normzoo's op would add
    ``dmean / n + 2 dvar (x - mean) / n`` to ``dx``, one more fused term).

Run ``python -m benchmarks.prototypes`` for the noise-free evidence (kernels and passes
over memory of one step, from the compiled HLO, see :mod:`benchmarks.hlo`) and
``python -m benchmarks --prototypes --layers bn,ln,gn,in`` to time them side by side.
"""

from __future__ import annotations

import argparse
import functools
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

from benchmarks import layers as L
from benchmarks.hlo import summary

Array = jax.Array


# ----------------------------------------------------------------------- moments


def _pilot(x: Array, axes: tuple[int, ...]) -> Array:
    index = tuple(slice(0, 1) if a in axes else slice(None) for a in range(x.ndim))
    return lax.stop_gradient(x[index])


def unshared_moments(xf: Array, axes: tuple[int, ...]) -> tuple[Array, Array, Array]:
    """``(mean, var, s)`` with keepdims: ``E[x]`` and the pilot-shifted second moment."""
    s = _pilot(xf, axes)
    mean = jnp.mean(xf, axes, keepdims=True)
    second = jnp.mean(jnp.square(xf - s), axes, keepdims=True)
    var = jnp.maximum(second - jnp.square(mean - s), 0.0)
    return mean, var, s


def standardize_autodiff(x, scale_b, bias_b, axes, eps, out_dtype):
    """``proto_moments``: the unshared moments, then the affine; autodiff backward."""
    xf = x.astype(jnp.promote_types(x.dtype, jnp.float32))
    mean, var, _ = unshared_moments(xf, axes)
    y = (xf - mean) * (lax.rsqrt(var + eps) * scale_b) + bias_b
    return y.astype(out_dtype), mean, var


# -------------------------------------------------------------------- custom vjp


def _count(x: Array, axes: tuple[int, ...]) -> int:
    n = 1
    for a in axes:
        n *= x.shape[a]
    return n


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5))
def standardize_vjp(x, scale_b, bias_b, axes, eps, out_dtype):
    """``proto_vjp``: forward as :func:`standardize_autodiff`, closed-form backward."""
    out, _ = _vjp_fwd(x, scale_b, bias_b, axes, eps, out_dtype)
    return out


def _vjp_fwd(x, scale_b, bias_b, axes, eps, out_dtype):
    xf = x.astype(jnp.promote_types(x.dtype, jnp.float32))
    mean, var, _ = unshared_moments(xf, axes)
    r = lax.rsqrt(var + eps)
    y = (xf - mean) * (r * scale_b) + bias_b
    return (y.astype(out_dtype), mean, var), (x, scale_b, mean, r)


def _vjp_bwd(axes, eps, out_dtype, res, cotangents):
    """Reductions over the raw ``x`` and ``dy`` only, nothing full-size shared between them.

    XLA:CPU writes to memory any full-size value that feeds two kernels, so: the pilot is
    not used here (``x - s`` would be merged with the forward's and materialized), and when
    ``scale`` is constant over the statistics' axes (BN, IN) it is factored out of the sums
    instead of forming ``g = dy * scale`` (shared by two sums and ``dx``).
    """
    x, scale_b, mean, r = res
    dy = cotangents[0].astype(mean.dtype)
    xf = x.astype(mean.dtype)
    n = _count(x, axes)
    param_axes = tuple(a for a in range(x.ndim) if scale_b.shape[a] == 1)
    centered = xf - mean
    if all(scale_b.shape[a] == 1 for a in axes):  # scale constant per statistic: factor out
        sum_dy = jnp.sum(dy, axes, keepdims=True)
        sum_dyc = jnp.sum(dy * centered, axes, keepdims=True)
        k = scale_b * r
        dx = (dy - sum_dy / n) * k - centered * (k * r * r * sum_dyc / n)
    else:
        sum_g = jnp.sum(dy * scale_b, axes, keepdims=True)
        sum_gc = jnp.sum(dy * scale_b * centered, axes, keepdims=True)
        dx = r * (dy * scale_b - sum_g / n) - centered * (r * r * r * sum_gc / n)
    dscale = jnp.sum(dy * centered * r, param_axes, keepdims=True)
    dbias = jnp.sum(dy, param_axes, keepdims=True)
    return dx.astype(x.dtype), dscale.astype(scale_b.dtype), dbias.astype(scale_b.dtype)


standardize_vjp.defvjp(_vjp_fwd, _vjp_bwd)


# --------------------------------------------------- channels-last group statistics


def _per_channel(v: Array, k: int) -> Array:
    """(N, G) -> (N, C): each group's value repeated over its k channels (tiny)."""
    return jnp.repeat(v, k, axis=-1)


def _per_group(v: Array, k: int) -> Array:
    """(N, C) -> (N, G): sum over each group's k channels (tiny)."""
    return v.reshape(v.shape[:-1] + (v.shape[-1] // k, k)).sum(-1)


def _spatial(v: Array, ndim: int) -> Array:
    """(N, C) -> (N, 1, ..., 1, C) to broadcast against channels-last x."""
    return v.reshape(v.shape[:1] + (1,) * (ndim - 2) + v.shape[1:])


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5))
def group_standardize_vjp(x, scale, bias, groups, eps, out_dtype):
    """``proto_nhwc``: GroupNorm (IN: groups = C) on channels-last x, no group reshape.

    Every full-size reduction runs over the spatial axes only, in x's own layout, giving
    per-(sample, channel) partial sums (N, C); the group sums and the parameter gradients
    are then finished on those tiny arrays. The forward reads x twice (E[x], shifted
    E[x^2]) and writes y once; the backward reads dy, then dy and x, then writes dx.
    """
    out, _ = _group_fwd(x, scale, bias, groups, eps, out_dtype)
    return out


def _group_fwd(x, scale, bias, groups, eps, out_dtype):
    xf = x.astype(jnp.promote_types(x.dtype, jnp.float32))
    nd, c = x.ndim, x.shape[-1]
    k = c // groups
    spatial = tuple(range(1, nd - 1))
    n = k * _count(x, spatial)
    s = _per_channel(lax.stop_gradient(xf[(slice(None),) + (0,) * (nd - 2)][:, ::k]), k)  # (N, C)
    s1 = jnp.sum(xf, spatial)                                                     # (N, C)
    s2 = jnp.sum(jnp.square(xf - _spatial(s, nd)), spatial)                      # (N, C)
    mean = _per_group(s1, k) / n                                                  # (N, G)
    var = jnp.maximum(_per_group(s2, k) / n - jnp.square(mean - s[:, ::k]), 0.0)
    r = lax.rsqrt(var + eps)
    mean_c, r_c = _per_channel(mean, k), _per_channel(r, k)                       # (N, C)
    y = (xf - _spatial(mean_c, nd)) * _spatial(r_c * scale, nd) + bias
    return (y.astype(out_dtype), mean, var), (x, scale, mean_c, r_c)


def _group_bwd(groups, eps, out_dtype, res, cotangents):
    x, scale, mean_c, r_c = res
    dy = cotangents[0].astype(mean_c.dtype)
    xf = x.astype(mean_c.dtype)
    nd, c = x.ndim, x.shape[-1]
    k = c // groups
    spatial = tuple(range(1, nd - 1))
    n = k * _count(x, spatial)
    t1 = jnp.sum(dy, spatial)                                                     # (N, C)
    t2 = jnp.sum(dy * (xf - _spatial(mean_c, nd)), spatial)                      # (N, C)
    e_g = _per_channel(_per_group(scale * t1, k), k) / n                          # (N, C)
    e_gc = _per_channel(_per_group(scale * t2, k), k) / n
    dx = (dy * _spatial(r_c * scale, nd) - _spatial(r_c * e_g, nd)
          - (xf - _spatial(mean_c, nd)) * _spatial(r_c ** 3 * e_gc, nd))
    dscale = jnp.sum(r_c * t2, 0)
    dbias = jnp.sum(t1, 0)
    return dx.astype(x.dtype), dscale.astype(scale.dtype), dbias.astype(scale.dtype)


group_standardize_vjp.defvjp(_group_fwd, _group_bwd)


def _nhwc_factory(variant: L.Variant) -> Any:
    def factory(dtype):
        eps = L.EPSILON[variant.layer]

        def apply(params, stats, x):
            groups = L.GN_GROUPS if variant.layer == "gn" else x.shape[-1]
            y, _, _ = group_standardize_vjp(x, params["scale"], params["bias"], groups, eps, dtype)
            return y, stats

        return apply

    return factory


# ------------------------------------------------------------------------ layers


def _apply_factory(variant: L.Variant, op) -> Any:
    """``factory(dtype) -> apply(params, stats, x)`` for one layer over ``op``."""

    def factory(dtype):
        eps = L.EPSILON[variant.layer]

        def apply(params, stats, x):
            c = x.shape[-1]
            view, axes = x, tuple(range(1, x.ndim))
            param_shape = (1,) * (x.ndim - 1) + (c,)
            if variant.layer == "bn":
                axes = tuple(range(x.ndim - 1))
            elif variant.layer == "in":
                axes = tuple(range(1, x.ndim - 1))
            elif variant.layer == "gn":
                g = L.GN_GROUPS
                view = x.reshape(x.shape[:-1] + (g, c // g))
                axes = tuple(range(1, x.ndim - 1)) + (x.ndim,)
                param_shape = (1,) * (x.ndim - 1) + (g, c // g)
            scale = params["scale"].reshape(param_shape)
            bias = params["bias"].reshape(param_shape)
            y, mean, var = op(view, scale, bias, axes, eps, dtype)
            y = y.reshape(x.shape)
            if variant.layer == "bn" and variant.train:
                m = L.MOMENTUM
                stats = {"mean": m * stats["mean"] + (1 - m) * mean.reshape(-1),
                         "var": m * stats["var"] + (1 - m) * var.reshape(-1)}
            return y, stats

        return apply

    return factory


PROTOTYPED = ("bn-train", "ln", "gn", "in")


def extra_impls() -> dict[str, dict[str, Any]]:
    """Variant key -> prototype name -> ``factory(dtype)``, for ``build_groups(extra_impls=)``."""
    out = {}
    for variant in L.variants(["bn", "ln", "gn", "in"]):
        if variant.key in PROTOTYPED:
            out[variant.key] = {
                "proto_moments": _apply_factory(variant, standardize_autodiff),
                "proto_vjp": _apply_factory(variant, standardize_vjp),
            }
            if variant.layer in ("gn", "in"):
                out[variant.key]["proto_nhwc"] = _nhwc_factory(variant)
    return out


# ---------------------------------------------------------------------- evidence


def passes_table(dtype: str = "float32", quick: bool = False) -> str:
    """Kernels and passes over memory of one step (compiled HLO), every implementation."""
    shapes = L.QUICK_SHAPES if quick else L.FULL_SHAPES
    extra = extra_impls()
    rows = ["| layer | pass | impl | kernels | passes (bytes / x bytes) |", "|---|---|---|---|---|"]
    for variant in L.variants(["bn", "ln", "gn", "in"]):
        if variant.key not in PROTOTYPED:
            continue
        dt = jnp.dtype(dtype)
        x, dy0, params, stats = L._inputs(variant, shapes[variant.layer], dt)
        applies = dict(L.implementations(variant, dt))
        applies.update({k: f(dt) for k, f in extra[variant.key].items()})
        for pass_, make in (("fwd", L.forward_step), ("fwd+bwd", L.grad_step)):
            for name, apply in applies.items():
                s = summary(make(apply), params, stats, x, dy0)
                passes = s["traffic"] / x.nbytes
                rows.append(f"| {variant.label} | {pass_} | {name} | {s['n_kernels']} "
                            f"| {passes:.1f} |")
    return "\n".join(rows)


def check_against_flax(dtype: str = "float32") -> str:
    """Max relative difference of y, dx and dparams of the prototypes vs flax two-pass."""
    extra = extra_impls()
    lines = []
    for variant in L.variants(["bn", "ln", "gn", "in"]):
        if variant.key not in PROTOTYPED:
            continue
        dt = jnp.dtype(dtype)
        x, dy0, params, stats = L._inputs(variant, L.QUICK_SHAPES[variant.layer], dt)
        ref = L.grad_step(L.implementations(variant, dt)["flax_2pass"])
        ref_y = L.implementations(variant, dt)["flax_2pass"](params, stats, x)[0]
        rdx, rdp, _ = jax.jit(ref)(params, stats, x, dy0)
        for name, factory in extra[variant.key].items():
            apply = factory(dt)
            y = apply(params, stats, x)[0]
            dx, dp, _ = jax.jit(L.grad_step(apply))(params, stats, x, dy0)

            def rel(a, b):
                a, b = jnp.asarray(a, jnp.float32), jnp.asarray(b, jnp.float32)
                return float(jnp.max(jnp.abs(a - b)) / jnp.max(jnp.abs(b)))

            worst = max([rel(y, ref_y), rel(dx, rdx)]
                        + [rel(dp[k].reshape(rdp[k].shape), rdp[k]) for k in rdp])
            lines.append(f"{variant.label:16s} {name:14s} max rel diff vs flax 2-pass: {worst:.1e}")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.prototypes")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    p.add_argument("--quick", action="store_true", help="tiny shapes")
    args = p.parse_args(argv)
    print(check_against_flax(args.dtype))
    print()
    print(passes_table(args.dtype, args.quick))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
