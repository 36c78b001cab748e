"""The layer groups: normzoo vs flax.linen (fast and two-pass variance) vs plain jax.numpy.

Every implementation is wrapped as ``apply(params, stats, x) -> (y, new_stats)`` (``stats``
is ``{}`` for stateless layers; BN eval returns its ``stats`` unchanged) and turned into
the loops of :mod:`benchmarks.harness`:

* ``fwd``:     ``x, stats <- apply(params, stats, x)``
* ``fwd+bwd``: ``dx, dparams = grad(sum(y * dy0))`` with one fixed upstream gradient ``dy0``,
  then ``x <- x - lr dx`` and ``params <- params - lr dparams / k`` (``lr`` a runtime scalar,
  ``k`` the elements per param); BN train also carries its updated running statistics.
  The update of x is computed in float32 and rounded once to x's dtype: in bfloat16
  arithmetic its two extra roundings would cost more than the layers' own work (XLA:CPU
  converts float32 -> bfloat16 in software).

  ``dy0`` is loop-invariant, so XLA hoists what depends on it alone out of the loop: the
  sum of dy (the bias gradient), for every implementation alike (checked in the compiled
  HLO). The alternatives cost more than the layers (``jax.profiler`` on XLA:CPU): a dynamic
  slice of a stacked ``(2, *shape)`` array is several times slower than a copy;
  ``dy0 * sign`` or ``-dy`` carried are written to a fresh buffer or copied each
  iteration, and on CPU a kernel writing a new buffer is slower than one writing in
  place (the copy roofline ``x + 1`` writes in place). A loss whose gradient depends on
  ``y`` is what :mod:`benchmarks.training` times.

The carried arrays are donated and each timed run continues from the previous one's output
(:class:`benchmarks.harness.Group` ``carried``).

Params are random (``scale ~ U(0.5, 0.9)``, ``bias ~ N(0, 0.1)``) and shared by every
implementation, so the gradient of the sum is not trivially zero and BN eval's forward
iteration ``x <- (x - m) k + b`` (``k < 1``) stays bounded. Layers use ``dtype`` = the input
dtype and float32 params (mixed precision as in flax examples), so the output feeds back.

Extra implementations (for example the prototypes of :mod:`benchmarks.prototypes`) can be
added per layer key with ``extra_impls``.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

import normzoo
from benchmarks import backend
from benchmarks.harness import Group

Apply = Callable[[Any, Any, jax.Array], tuple[jax.Array, Any]]

#: Layer keys accepted by ``--layers``; "bn" expands to a training and an eval row.
LAYERS = ("bn", "ln", "gn", "in", "rms")
PASSES = ("fwd", "fwd+bwd")
#: ``normzoo`` is the default path (CPU kernels off); ``normzoo_cpu`` the same layers with the
#: opt-in CPU kernels on, timed only where ``normzoo.backends.cpu`` is available.
IMPLS = ("normzoo", "normzoo_cpu", "flax_fast", "flax_2pass", "jnp")
COPY = "copy"
#: A second copy loop, identical to COPY: ``time(copy) / time(copy_twin)`` is how far apart
#: two identical programs land in the same run (buffer placement, interference).
TWIN = "copy_twin"

#: Shapes: (4096, 1024) for LN/RMS and NHWC (64, 28, 28, 128) for BN/GN/IN.
FULL_SHAPES = {"ln": (4096, 1024), "rms": (4096, 1024), "bn": (64, 28, 28, 128),
               "gn": (64, 28, 28, 128), "in": (64, 28, 28, 128)}
QUICK_SHAPES = {"ln": (256, 128), "rms": (256, 128), "bn": (8, 8, 8, 64),
                "gn": (8, 8, 8, 64), "in": (8, 8, 8, 64)}

GN_GROUPS = 32
MOMENTUM = 0.99
#: flax.linen's default epsilons, which both libraries use.
EPSILON = {"bn": 1e-5, "ln": 1e-6, "gn": 1e-6, "in": 1e-6, "rms": 1e-6}
#: Step size of the feedback in fwd+bwd loops (a runtime argument; 1.0 in the check run).
LR = 1e-2


@dataclasses.dataclass(frozen=True)
class Variant:
    """One row family: a layer and (for BN) its mode."""

    layer: str
    train: bool | None = None

    @property
    def key(self) -> str:
        if self.train is None:
            return self.layer
        return f"{self.layer}-{'train' if self.train else 'eval'}"

    @property
    def label(self) -> str:
        names = {"bn": "BatchNorm", "ln": "LayerNorm", "gn": "GroupNorm",
                 "in": "InstanceNorm", "rms": "RMSNorm"}
        if self.train is None:
            return names[self.layer]
        return f"{names[self.layer]} {'train' if self.train else 'eval'}"


def variants(layers: Sequence[str]) -> list[Variant]:
    out = []
    for layer in layers:
        if layer not in LAYERS:
            raise ValueError(f"layer={layer!r} is unknown; expected one of {LAYERS}")
        if layer == "bn":
            out.extend([Variant("bn", True), Variant("bn", False)])
        else:
            out.append(Variant(layer))
    return out


# ---------------------------------------------------------------------------- modules


def make_module(lib: Any, variant: Variant, dtype: Any, use_fast_variance: bool) -> nn.Module:
    """The layer from ``lib`` (``flax.linen`` or ``normzoo``) with the benchmark's settings."""
    common = dict(dtype=dtype, use_fast_variance=use_fast_variance)
    layer = variant.layer
    if layer == "bn":
        return lib.BatchNorm(use_running_average=not variant.train, momentum=MOMENTUM, **common)
    if layer == "ln":
        return lib.LayerNorm(**common)
    if layer == "gn":
        return lib.GroupNorm(num_groups=GN_GROUPS, **common)
    if layer == "in":
        return lib.InstanceNorm(**common)
    if layer == "rms":
        return lib.RMSNorm(**common)
    raise ValueError(f"layer={layer!r} is unknown")


def linen_apply(module: nn.Module, variant: Variant) -> Apply:
    """``apply(params, stats, x)`` over a linen module (BN train returns new batch_stats)."""
    mutable = variant.layer == "bn" and variant.train

    def apply(params, stats, x):
        variables = {"params": params, **({"batch_stats": stats} if stats else {})}
        if mutable:
            y, updates = module.apply(variables, x, mutable=["batch_stats"])
            return y, updates["batch_stats"]
        return module.apply(variables, x), stats

    return apply


# ------------------------------------------------------------------ plain jax.numpy


def _f32(x: jax.Array) -> jax.Array:
    return x.astype(jnp.promote_types(x.dtype, jnp.float32))


def _textbook(x32, axes, eps):
    mean = jnp.mean(x32, axes, keepdims=True)
    var = jnp.mean(jnp.square(x32 - mean), axes, keepdims=True)
    return (x32 - mean) / jnp.sqrt(var + eps), mean, var


def jnp_apply(variant: Variant, dtype: Any) -> Apply:
    """The textbook formula in jax.numpy: two-pass float32 statistics, then the affine."""
    layer, eps = variant.layer, EPSILON[variant.layer]

    def apply(params, stats, x):
        x32 = _f32(x)
        scale = params["scale"]
        if layer == "rms":
            y = x32 / jnp.sqrt(jnp.mean(jnp.square(x32), -1, keepdims=True) + eps) * scale
            return y.astype(dtype), stats
        if layer == "ln":
            y, _, _ = _textbook(x32, (-1,), eps)
        elif layer == "in":
            y, _, _ = _textbook(x32, tuple(range(1, x.ndim - 1)), eps)
        elif layer == "gn":
            c = x.shape[-1]
            grouped = x32.reshape(x.shape[:-1] + (GN_GROUPS, c // GN_GROUPS))
            y, _, _ = _textbook(grouped, tuple(range(1, x.ndim - 1)) + (x.ndim,), eps)
            y = y.reshape(x.shape)
        elif variant.train:  # BN train: batch statistics and the EMA of the running ones
            y, mean, var = _textbook(x32, tuple(range(x.ndim - 1)), eps)
            stats = {"mean": MOMENTUM * stats["mean"] + (1 - MOMENTUM) * mean.reshape(-1),
                     "var": MOMENTUM * stats["var"] + (1 - MOMENTUM) * var.reshape(-1)}
        else:  # BN eval: running statistics
            y = (x32 - stats["mean"]) / jnp.sqrt(stats["var"] + eps)
        return (y * scale + params["bias"]).astype(dtype), stats

    return apply


# ------------------------------------------------------------------------- loops


def forward_loop(apply: Apply):
    def loop(n, lr, x, params, stats, dy0):
        del lr, dy0

        def body(i, carry):
            x, stats = carry
            y, stats = apply(params, stats, x)
            return y.astype(x.dtype), stats

        return lax.fori_loop(0, n, body, (x, stats))

    return loop


def forward_step(apply: Apply):
    """One forward step ``(y, new_stats)`` (``dy`` unused), for the memory analysis."""

    def step(params, stats, x, dy):
        del dy
        return apply(params, stats, x)

    return step


def copy_step(params, stats, x, dy):
    del params, stats, dy
    return x + jnp.asarray(1, x.dtype)


def grad_step(apply: Apply):
    """One forward+backward step: ``(dx, dparams, new_stats)`` of ``sum(y * dy)``."""

    def step(params, stats, x, dy):
        def loss(p, x):
            y, new_stats = apply(p, stats, x)
            return jnp.sum(y.astype(jnp.float32) * dy.astype(jnp.float32)), new_stats

        (dparams, dx), new_stats = jax.grad(loss, argnums=(0, 1), has_aux=True)(params, x)
        return dx, dparams, new_stats

    return step


def forward_backward_loop(apply: Apply):
    step = grad_step(apply)

    def loop(n, lr, x, params, stats, dy0):
        def body(i, carry):
            x, params, stats = carry
            dx, dparams, stats = step(params, stats, x, dy0)
            # One rounding to x's dtype: in bfloat16 arithmetic (a rounding after the product
            # and one after the difference) this update alone would cost more than a copy.
            x = (x.astype(jnp.float32) - lr * dx.astype(jnp.float32)).astype(x.dtype)
            # Params take a step scaled by 1 / (elements per param): bounded over long runs.
            params = jax.tree_util.tree_map(
                lambda p, g: (p - (lr * p.size / x.size) * g).astype(p.dtype), params, dparams)
            return x, params, stats

        return lax.fori_loop(0, n, body, (x, params, stats))

    return loop


def copy_loop(n, lr, x, params, stats, dy0):
    """The roofline: ``x <- x + 1``, one read and one write of x per iteration."""
    del lr, params, stats, dy0
    return lax.fori_loop(0, n, lambda i, x: x + jnp.asarray(1, x.dtype), x)


def _check_forward(out, args):
    y, stats = out
    return [y, stats]


def _check_backward(out, args):
    lr, x, params, _, _ = args  # lr = 1 in the check run: x - x1 = dx
    x1, params1, _ = out
    dx = x.astype(jnp.float32) - x1.astype(jnp.float32)
    dparams = jax.tree_util.tree_map(lambda p, q: (p - q) * (x.size / p.size) / lr, params, params1)
    return [dx, dparams]


# ------------------------------------------------------------------------- groups


def _inputs(variant: Variant, shape, dtype, seed: int = 0):
    """x, dy0, params, stats (params and stats identical for every implementation)."""
    rng = np.random.default_rng(seed)
    x = jnp.asarray(rng.normal(0.3, 1.0, shape), dtype)
    dy0 = jnp.asarray(rng.normal(0.0, 1.0, tuple(shape)), dtype)
    key = jax.random.PRNGKey(0)
    variables = jax.eval_shape(make_module(nn, variant, dtype, True).init, key, x)
    params = {
        k: jnp.asarray(
            rng.uniform(0.5, 0.9, v.shape) if k == "scale" else rng.normal(0, 0.1, v.shape),
            v.dtype)
        for k, v in variables["params"].items()
    }
    stats = {}
    if "batch_stats" in variables:
        c = variables["batch_stats"]["mean"].shape
        stats = {"mean": jnp.asarray(rng.normal(0, 0.1, c), jnp.float32),
                 "var": jnp.asarray(rng.uniform(1.0, 2.0, c), jnp.float32)}
    zoo = jax.eval_shape(make_module(normzoo, variant, dtype, True).init, key, x)
    if jax.tree_util.tree_map(str, zoo) != jax.tree_util.tree_map(str, variables):
        raise AssertionError(f"normzoo and flax variables differ for {variant.key}")
    return x, dy0, params, stats


def with_cpu_kernels(apply: Apply, flag: bool) -> Apply:
    """``apply`` traced with normzoo's opt-in CPU kernels switched to ``flag``."""
    return backend.traced(apply, flag)


def implementations(variant: Variant, dtype: Any) -> dict[str, Apply]:
    """Every implementation this tree has (``normzoo_cpu`` only with the CPU backend)."""
    zoo = {name: with_cpu_kernels(linen_apply(make_module(normzoo, variant, dtype, True),
                                              variant), flag)
           for name, flag in backend.columns().items()}
    return {
        **zoo,
        "flax_fast": linen_apply(make_module(nn, variant, dtype, True), variant),
        "flax_2pass": linen_apply(make_module(nn, variant, dtype, False), variant),
        "jnp": jnp_apply(variant, dtype),
    }


def build_groups(
    layers: Sequence[str] = LAYERS,
    dtypes: Sequence[str] = ("float32", "bfloat16"),
    passes: Sequence[str] = PASSES,
    *,
    quick: bool = False,
    shapes: dict[str, tuple[int, ...]] | None = None,
    impls: Sequence[str] = IMPLS,
    extra_impls: dict[str, dict[str, Callable[[Any], Apply]]] | None = None,
) -> list[Group]:
    """The layer groups, in order variant x dtype x pass.

    Args:
      layers: keys of :data:`LAYERS`.
      dtypes: input (and output) dtypes by name.
      passes: subset of :data:`PASSES`.
      quick: tiny shapes (:data:`QUICK_SHAPES`) instead of :data:`FULL_SHAPES`.
      shapes: per-layer overrides.
      impls: which of :data:`IMPLS` to time (the copy is always timed).
      extra_impls: variant key (``"ln"``, ``"bn-train"``...) -> name -> ``factory(dtype)``
        returning an ``apply(params, stats, x)``; timed alongside the others.
    """
    table = dict(QUICK_SHAPES if quick else FULL_SHAPES)
    table.update(shapes or {})
    extra_impls = extra_impls or {}
    groups = []
    for variant in variants(layers):
        shape = tuple(table[variant.layer])
        for dtype_name in dtypes:
            dtype = jnp.dtype(dtype_name)
            x, dy0, params, stats = _inputs(variant, shape, dtype)
            applies = {k: v for k, v in implementations(variant, dtype).items() if k in impls}
            for name, factory in extra_impls.get(variant.key, {}).items():
                applies[name] = factory(dtype)
            args = (jnp.float32(LR), x, params, stats, dy0)
            check_args = (jnp.float32(1.0),) + args[1:]
            for pass_ in passes:
                if pass_ not in PASSES:
                    raise ValueError(f"pass={pass_!r} is unknown; expected one of {PASSES}")
                make = forward_loop if pass_ == "fwd" else forward_backward_loop
                loops = {name: make(apply) for name, apply in applies.items()}
                loops[COPY] = copy_loop
                loops[TWIN] = copy_loop
                make_step = forward_step if pass_ == "fwd" else grad_step
                steps = {name: make_step(apply) for name, apply in applies.items()}
                steps[COPY] = copy_step
                groups.append(Group(
                    meta={"kind": "layer", "layer": variant.layer, "variant": variant.key,
                          "label": variant.label, "pass": pass_, "shape": list(shape),
                          "dtype": dtype_name, "x_bytes": int(x.nbytes)},
                    loops=loops,
                    args=args,
                    reference="normzoo" if "normzoo" in applies else None,
                    roofline=COPY,
                    cache_keys={COPY: COPY, TWIN: TWIN},
                    controls=(TWIN,),
                    steps=steps,
                    step_args=(params, stats, x, dy0),
                    check_args=check_args,
                    check_fn=_check_forward if pass_ == "fwd" else _check_backward,
                    check_reference=next((n for n in ("flax_2pass", "flax_fast") if n in applies),
                                         None),
                    carried={**{name: (1, 3) if pass_ == "fwd" else (1, 2, 3) for name in applies},
                             COPY: (1,), TWIN: (1,)},
                ))
    return groups
