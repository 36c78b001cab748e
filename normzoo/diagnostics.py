"""Per-layer activation statistics: pure functions, and sowing them from Linen and NNX models.

The pure functions take an activation ``x`` with its features on ``feature_axis`` (the
samples are every other axis, flattened) and return float32 scalars (float64 only for a
float64 input under ``jax_enable_x64``; bfloat16 / float16 inputs are upcast first). They are
jittable, vmappable and differentiable where their value is:

* :func:`activation_stats` -> ``{name: scalar}``: ``mean``, ``std``, ``min``, ``max`` over all
  elements; ``p{q}`` for each percentile ``q`` (``p1``, ``p50``, ``p99`` by default, linear
  interpolation as ``numpy.percentile``); per-feature summaries ``feature_mean_abs`` (mean over
  features of ``|feature mean|``), ``feature_mean_abs_max``, ``feature_std_mean``,
  ``feature_std_min``, ``feature_std_max``; ``zero_fraction`` (elements exactly 0) and
  ``dead_fraction`` (features that are 0 on every sample: dead ReLUs). Standard deviations are
  population ones (``ddof=0``), computed in two passes.
* :func:`covariance_condition_number` -> scalar: ``lambda_max / lambda_min`` of the
  ``features x features`` covariance, with ``lambda_min`` clipped at ``epsilon * lambda_max``.

Collecting them from a model:

* Linen: inside a module, ``sow_stats(self, "h", x)`` sows ``activation_stats(x)`` into the
  ``diagnostics`` collection (nothing is stored unless that collection is mutable, so a model
  that sows costs nothing in an ordinary ``apply``); ``collect_linen(model.apply, variables,
  x)`` runs ``apply`` with ``mutable=['diagnostics']`` and returns ``{'path/to/module/h':
  stats}``.
* NNX: ``sow_stats_nnx(self, "h", x)`` sows into the :class:`Diagnostics` variable type (an
  ``nnx.Intermediate`` subclass, so the models' ``nnx.capture(model, nnx.Intermediate)`` does
  not pick the statistics up, as Linen's ``intermediates`` collection does not hold
  ``diagnostics``); ``collect_nnx(model, x)`` runs the call under ``nnx.capture`` and returns
  the same ``{path: stats}``. A Linen model and its NNX twin with the same submodule names
  give the same keys and numbers.

A module that sows the same name several times in one call (a layer applied twice) gives
keys ``'path/h/0'``, ``'path/h/1'``, ...; once, ``'path/h'``.
"""
from __future__ import annotations

import functools
from typing import Any, Callable, Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from normzoo.functional.factorize import serial_on_cpu

Array = jax.Array

__all__ = [
    "COLLECTION",
    "Diagnostics",
    "activation_stats",
    "collect_linen",
    "collect_nnx",
    "covariance_condition_number",
    "flatten_sown",
    "sow_stats",
    "sow_stats_nnx",
]

#: The Linen collection :func:`sow_stats` writes to.
COLLECTION = "diagnostics"

#: Default percentiles of :func:`activation_stats`.
PERCENTILES = (1, 50, 99)

#: Default ``epsilon`` of :func:`covariance_condition_number`: condition numbers are capped at 1e8.
CONDITION_EPSILON = 1e-8


# -- pure functions -------------------------------------------------------------------------------


def _compute_dtype(dtype: Any) -> Any:
    """float32 for every input of at most 32 bits (bf16, f16, ints, bools); float64 stays."""
    return jnp.promote_types(jnp.dtype(dtype), jnp.float32) if jnp.issubdtype(dtype, jnp.floating) else jnp.float32


def _check(x: Any, feature_axis: Any, fn: str) -> tuple[Array, int]:
    """``x`` as an array and ``feature_axis`` as a non-negative int, or a ValueError."""
    x = x if isinstance(x, jax.Array) else jnp.asarray(x)
    if x.ndim == 0:
        raise ValueError(f"{fn}: x is a scalar; expected an array with a feature axis")
    if isinstance(feature_axis, bool) or not isinstance(feature_axis, (int, np.integer)):
        raise ValueError(f"{fn}: feature_axis={feature_axis!r} must be an int")
    if not -x.ndim <= feature_axis < x.ndim:
        raise ValueError(
            f"{fn}: feature_axis={feature_axis} is out of range for x of shape {x.shape}: "
            f"expected an axis in [{-x.ndim}, {x.ndim - 1}]"
        )
    if x.size == 0:
        raise ValueError(f"{fn}: x of shape {x.shape} is empty")
    return x, int(feature_axis) % x.ndim


def _matrix(x: Array, axis: int) -> Array:
    """``(samples, features)`` in the compute dtype (features on ``axis``)."""
    x = jnp.moveaxis(x, axis, -1)
    return x.reshape(-1, x.shape[-1])


def _percentile_keys(percentiles: Sequence[float]) -> list[tuple[str, float]]:
    if isinstance(percentiles, (int, float)):
        percentiles = (percentiles,)
    out = []
    for q in percentiles:
        if isinstance(q, bool) or not isinstance(q, (int, float, np.integer, np.floating)) or not 0 <= q <= 100:
            raise ValueError(f"activation_stats: percentiles={tuple(percentiles)!r}: each must be a number in [0, 100]")
        out.append((f"p{float(q):g}", float(q)))
    if len({k for k, _ in out}) != len(out):
        raise ValueError(f"activation_stats: percentiles={tuple(percentiles)!r} has duplicates")
    return out


def activation_stats(
    x: Any, *, feature_axis: int = -1, percentiles: Sequence[float] = PERCENTILES
) -> dict[str, Array]:
    """Summary statistics of an activation ``x``, as a flat dict of scalars.

    Args:
      x: an array of any floating (or integer) dtype with at least one axis; the features are on
        ``feature_axis``, every other axis counts as samples.
      feature_axis: the feature axis (an int in ``[-x.ndim, x.ndim)``).
      percentiles: percentiles in ``[0, 100]`` of all elements, one key ``p{q:g}`` each
        (``p1``, ``p50``, ``p99``; ``p99.9`` for 99.9).

    Returns:
      ``mean``, ``std`` (population), ``min``, ``max`` and the percentiles over all elements;
      ``feature_mean_abs`` / ``feature_mean_abs_max`` (mean / max over features of the absolute
      per-feature mean), ``feature_std_mean`` / ``feature_std_min`` / ``feature_std_max`` (of the
      per-feature population std over the samples); ``zero_fraction`` (fraction of elements
      exactly 0) and ``dead_fraction`` (fraction of features that are 0 on every sample). All
      float32 scalars (float64 for a float64 input with x64 enabled).

    Raises:
      ValueError: ``x`` is a scalar or empty, ``feature_axis`` is not an int in range, or a
        percentile is outside ``[0, 100]``.
    """
    keys = tuple(_percentile_keys(percentiles))
    x, axis = _check(x, feature_axis, "activation_stats")
    return _activation_stats(x, axis, keys)


@functools.partial(jax.jit, static_argnums=(1, 2))  # one compilation per shape eagerly; inlined under a trace
def _activation_stats(x: Array, axis: int, keys: tuple[tuple[str, float], ...]) -> dict[str, Array]:
    h = _matrix(x, axis)
    zero = h == 0
    h = h.astype(_compute_dtype(h.dtype))
    mean = jnp.mean(h)
    std = jnp.sqrt(jnp.mean(jnp.square(h - mean)))
    f_mean = jnp.mean(h, axis=0)
    f_std = jnp.sqrt(jnp.mean(jnp.square(h - f_mean), axis=0))
    stats = {
        "mean": mean,
        "std": std,
        "min": jnp.min(h),
        "max": jnp.max(h),
    }
    if keys:
        qs = jnp.percentile(h, jnp.asarray([q for _, q in keys], h.dtype))
        stats.update({k: qs[i] for i, (k, _) in enumerate(keys)})
    stats.update(
        feature_mean_abs=jnp.mean(jnp.abs(f_mean)),
        feature_mean_abs_max=jnp.max(jnp.abs(f_mean)),
        feature_std_mean=jnp.mean(f_std),
        feature_std_min=jnp.min(f_std),
        feature_std_max=jnp.max(f_std),
        zero_fraction=jnp.mean(zero.astype(h.dtype)),
        dead_fraction=jnp.mean(jnp.all(zero, axis=0).astype(h.dtype)),
    )
    return stats


def covariance_condition_number(
    x: Any, *, feature_axis: int = -1, epsilon: float = CONDITION_EPSILON
) -> Array:
    """Condition number ``lambda_max / lambda_min`` of the covariance of the features of ``x``.

    The covariance is ``features x features``, over the samples = every axis but
    ``feature_axis`` flattened (population normalization; the ratio does not depend on it),
    computed in float32 (float64 for a float64 input with x64 enabled; bf16 / f16 upcast) from
    centered values with a full-precision matmul, and its eigenvalues by ``jnp.linalg.eigvalsh``.

    ``lambda_min`` is clipped at ``epsilon * lambda_max``, so the result is at most
    ``1 / epsilon`` (1e8 by default): a singular covariance (fewer samples than features, a
    dead or constant feature, linearly dependent features), whose smallest eigenvalue is 0 or
    a tiny, possibly negative rounding error, gives a large finite number instead of ``inf``
    or NaN, and a zero covariance (every feature constant) gives ``1 / epsilon``. In float32
    eigenvalues below about ``1e-6 * lambda_max`` are at the level of rounding, so condition
    numbers above about 1e6 mean "(numerically) singular" rather than their exact value. A
    perfectly whitened ``x`` gives 1.

    Args:
      x: an array with at least two samples (elements per feature).
      feature_axis: the feature axis (an int in ``[-x.ndim, x.ndim)``).
      epsilon: relative floor of the smallest eigenvalue, in ``(0, 1]``.

    Raises:
      ValueError: ``x`` is a scalar or empty, ``feature_axis`` is not an int in range, there are
        fewer than 2 samples, or ``epsilon`` is not in ``(0, 1]``.
    """
    if isinstance(epsilon, bool) or not isinstance(epsilon, (int, float, np.floating)) or not 0 < epsilon <= 1:
        raise ValueError(f"covariance_condition_number: epsilon={epsilon!r} must be a number in (0, 1]")
    x, axis = _check(x, feature_axis, "covariance_condition_number")
    n = x.size // x.shape[axis]
    if n < 2:
        raise ValueError(
            f"covariance_condition_number: x of shape {x.shape} has {n} sample(s) per feature "
            f"(the elements of every axis but feature_axis={feature_axis}); a covariance needs at least 2"
        )
    return _condition_number(x, axis, float(epsilon))


_eigvalsh = serial_on_cpu(jnp.linalg.eigvalsh)


@functools.partial(jax.jit, static_argnums=(1, 2))
def _condition_number(x: Array, axis: int, epsilon: float) -> Array:
    h = _matrix(x, axis)
    h = h.astype(_compute_dtype(h.dtype))
    hc = h - h.mean(0)
    cov = jnp.matmul(hc.T, hc, precision=jax.lax.Precision.HIGHEST) / h.shape[0]
    ev = _eigvalsh(cov)  # one matrix at a time on CPU (normzoo.functional.factorize)
    top, bottom = ev[-1], ev[0]
    floor = jnp.maximum(bottom, top * jnp.asarray(epsilon, h.dtype))
    cap = jnp.asarray(1.0 / epsilon, h.dtype)
    # a zero covariance (top <= 0 up to rounding) is singular: the cap; NaN input stays NaN
    return jnp.where(top <= 0, cap, top / jnp.where(top <= 0, 1.0, floor))


def _stats(x: Any, feature_axis: int, percentiles: Sequence[float], condition_number: bool,
           epsilon: float) -> dict[str, Array]:
    stats = activation_stats(x, feature_axis=feature_axis, percentiles=percentiles)
    if condition_number:
        stats["condition_number"] = covariance_condition_number(x, feature_axis=feature_axis, epsilon=epsilon)
    return stats


# -- flattening sown values -----------------------------------------------------------------------


def flatten_sown(tree: Mapping[str, Any]) -> dict[str, Any]:
    """``{'a': {'b': {'h': (s0,)}}}`` (a sown collection: nested dicts whose leaves are the
    tuples ``sow`` appends to) -> ``{'a/b/h': s0}``; a tuple of several values gives
    ``'a/b/h/0'``, ``'a/b/h/1'``, ...; keys in the order of the tree (sorted by Flax)."""
    out: dict[str, Any] = {}

    def walk(node: Any, path: tuple[str, ...]) -> None:
        if isinstance(node, tuple):
            if len(node) == 1:
                out["/".join(path)] = node[0]
            else:
                for i, v in enumerate(node):
                    out["/".join((*path, str(i)))] = v
        elif isinstance(node, Mapping):
            for k, v in node.items():
                walk(v, (*path, str(k)))
        else:  # a value sown with a custom reduce_fn
            out["/".join(path)] = node

    walk(tree, ())
    return out


# -- Linen ----------------------------------------------------------------------------------------


def sow_stats(
    module: Any, name: str, x: Any, *, feature_axis: int = -1, percentiles: Sequence[float] = PERCENTILES,
    condition_number: bool = False, epsilon: float = CONDITION_EPSILON,
) -> bool:
    """Sow :func:`activation_stats` of ``x`` (plus ``condition_number`` if asked) under ``name``
    in the ``diagnostics`` collection of Linen ``module`` (call it inside ``@nn.compact`` /
    ``setup``-bound methods, as ``module.sow``).

    Returns whether it was stored: the statistics are only computed when the collection is
    mutable (``collect_linen``, or ``apply(..., mutable=['diagnostics'])``), so a model that sows
    costs nothing in an ordinary ``apply``; never in ``init`` (where every collection is
    mutable), so the variables of a model never hold statistics.
    """
    if module.is_initializing() or not module.is_mutable_collection(COLLECTION):
        return False
    return module.sow(COLLECTION, name, _stats(x, feature_axis, percentiles, condition_number, epsilon))


def collect_linen(
    apply_fn: Callable[..., Any], variables: Mapping[str, Any], *args: Any, mutable: Any = (),
    with_output: bool = False, **kwargs: Any,
) -> Any:
    """Run ``apply_fn(variables, *args, mutable=[..., 'diagnostics'], **kwargs)`` and return the
    sown statistics ``{'module/path/name': stats}`` (``(output, stats)`` with ``with_output``).

    ``apply_fn`` is ``model.apply`` (or a Linen module, whose ``apply`` is used); ``mutable``
    names further collections to make mutable (e.g. ``['batch_stats']`` for BatchNorm in
    training mode; their updates are discarded). Jittable: wrap it in ``jax.jit`` with
    ``apply_fn`` closed over.
    """
    if isinstance(apply_fn, nn.Module):
        apply_fn = apply_fn.apply
    extra = [mutable] if isinstance(mutable, str) else list(mutable or ())
    # statistics already in ``variables`` (e.g. a model initialised before it sowed) would be
    # appended to, not replaced
    variables = {k: v for k, v in variables.items() if k != COLLECTION}
    out, cols = apply_fn(variables, *args, mutable=[*extra, COLLECTION], **kwargs)
    stats = flatten_sown(_unfreeze(cols.get(COLLECTION, {})))
    return (out, stats) if with_output else stats


def _unfreeze(tree: Any) -> Any:
    if isinstance(tree, Mapping):
        return {k: _unfreeze(v) for k, v in tree.items()}
    return tree


# -- NNX ------------------------------------------------------------------------------------------


class Diagnostics(nnx.Intermediate):
    """The NNX variable type of sown activation statistics: an ``nnx.Intermediate``, so a
    filter on ``nnx.Intermediate`` (``nnx.state(model, nnx.Intermediate)``) includes it, while
    ``nnx.capture(fn, nnx.Intermediate)``, which captures that exact type, does not."""


def sow_stats_nnx(
    module: Any, name: str, x: Any, *, feature_axis: int = -1, percentiles: Sequence[float] = PERCENTILES,
    condition_number: bool = False, epsilon: float = CONDITION_EPSILON,
) -> bool:
    """Sow :func:`activation_stats` of ``x`` (plus ``condition_number`` if asked) under ``name`` as
    a :class:`Diagnostics` variable of NNX ``module`` (``module.sow(Diagnostics, name, stats)``).

    Inside :func:`collect_nnx` (or ``nnx.capture(..., Diagnostics)``) the statistics are
    computed and captured; inside a capture of other types only (as the experiment models'
    ``nnx.capture(model, nnx.Intermediate)``) they are neither computed nor stored, and False is
    returned. Outside any capture nothing is computed either (Flax 0.12 deprecates sowing there,
    which would store the values as attributes of the module, accumulating call after call).
    """
    captures = getattr(module, "__captures__", None)
    if captures is None or not any(type(v) is Diagnostics for v in captures):
        return False
    return module.sow(Diagnostics, name, _stats(x, feature_axis, percentiles, condition_number, epsilon))


def _call(model: Any, *args: Any, **kwargs: Any) -> Any:
    return model(*args, **kwargs)


def collect_nnx(
    model: Any, *args: Any, call: Callable[..., Any] = _call, with_output: bool = False, **kwargs: Any
) -> Any:
    """Run ``call(model, *args, **kwargs)`` (default ``model(*args, **kwargs)``) under
    ``nnx.capture(..., Diagnostics)`` and return the sown statistics ``{'attr/path/name': stats}``
    (``(output, stats)`` with ``with_output``).

    The statistics live only in the capture, never on the model, so repeated calls do not
    accumulate them; any :class:`Diagnostics` left on ``model`` as attributes (sown outside a
    capture by other code) are popped first. Works eagerly and inside ``nnx.jit`` / ``jax.jit``.
    """
    if nnx.state(model, Diagnostics):
        nnx.pop(model, Diagnostics)

    def run(m: Any, *a: Any) -> Any:
        return call(m, *a, **kwargs)

    try:
        out, state = nnx.capture(run, Diagnostics)(model, *args)
    except BaseException:  # nnx.capture leaves its buffers on the modules when the call raises
        for _, m in nnx.iter_modules(model):
            if hasattr(m, "__captures__"):
                delattr(m, "__captures__")
        raise
    stats = flatten_sown(nnx.to_pure_dict(state))
    return (out, stats) if with_output else stats
