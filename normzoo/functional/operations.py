"""The normalizing operations, each written once: centering, scaling, standardization.

Taxonomy of Huang et al. (TPAMI 2023, arXiv 2009.12836), section 3:

===========  ==================================  ==================  ========================
operation    y                                   statistics          examples
===========  ==================================  ==================  ========================
center       x - mu                              ``mean``            mean-only BN (Salimans &
                                                                      Kingma 2016)
scale        x / sqrt(E[x^2] + eps)              ``mean_square``     RMSNorm (Zhang & Sennrich
                                                                      2019), FRN, PowerNorm
standardize  (x - mu) / sqrt(var + eps)          ``mean``, ``var``   BN, LN, GN, IN
===========  ==================================  ==================  ========================

followed by the affine recovery ``gamma * y + beta`` (Ioffe & Szegedy 2015).

:func:`statistics` computes the dict of statistics an operation needs over some axes
(optionally per channel group); :func:`apply_statistics` normalizes ``x`` with such a dict
(batch statistics or running averages alike) and applies the affine in the same
expression. Every layer of the zoo is these two calls with different axes.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import jax
import jax.numpy as jnp
from jax import lax

from normzoo.functional.axes import (
    Axes,
    broadcast_shape,
    canonicalize_axes,
    check_mask,
    split_groups,
)
from normzoo.functional.area import Resolved
from normzoo.functional.fused import normalize_affine, normalize_frozen
from normzoo.functional.moments import moments, statistics_dtype

Array = jax.Array

OPERATIONS = ("center", "scale", "standardize")

#: Statistics each operation keeps (also the keys of its running statistics).
STATISTICS = {"center": ("mean",), "scale": ("mean_square",), "standardize": ("mean", "var")}


def check_operation(operation: str) -> None:
    if operation not in OPERATIONS:
        raise ValueError(f"operation={operation!r} is unknown; expected one of {OPERATIONS}")


def output_dtype(x: Array, scale: Array | None, bias: Array | None, dtype: Any = None):
    """Result dtype as in flax.linen: ``dtype`` if given, else the promotion of x and params."""
    if dtype is not None:
        return jnp.dtype(dtype)
    result = jnp.result_type(*(a for a in (x, scale, bias) if a is not None))
    return result if jnp.issubdtype(result, jnp.inexact) else jnp.dtype(jnp.float32)


def _grouped_axes(
    ndim: int, reduction_axes: Sequence[int], group_axis: int | None
) -> tuple[tuple[int, ...], int]:
    """Reduction axes of the group-split view (channel ``group_axis`` -> (G, C/G)).

    The channel axis itself is replaced by its within-group part; axes after it move by one.
    Returns the new axes and the rank of the split view.
    """
    if group_axis is None:
        return tuple(reduction_axes), ndim
    moved = [a if a < group_axis else a + 1 for a in reduction_axes if a != group_axis]
    return tuple(sorted(moved + [group_axis + 1])), ndim + 1


def statistics(
    x: Array,
    reduction_axes: Sequence[int],
    operation: str = "standardize",
    *,
    num_groups: int | None = None,
    group_axis: int = -1,
    mask: Array | None = None,
    axis_name: Any = None,
    axis_index_groups: Any = None,
    use_fast_variance: bool = True,
    dtype: Any = None,
    force_float32_reductions: bool = True,
) -> dict[str, Array]:
    """Statistics of ``x`` that ``operation`` needs, over canonical ``reduction_axes``.

    With ``num_groups`` the channel axis ``group_axis`` of size C is viewed as
    ``(num_groups, C // num_groups)`` and the statistics also span each group's channels;
    the returned arrays then have a ``num_groups`` axis where the channels were.

    Returns:
      ``{"mean": ...}``, ``{"mean_square": ...}`` or ``{"mean": ..., "var": ...}``, each of the
      shape of ``x`` (group view) with the reduction axes removed, float32 at least.
    """
    check_operation(operation)
    mask = check_mask(mask, x.shape)
    group_axis_c = None if num_groups is None else group_axis % x.ndim
    axes, _ = _grouped_axes(x.ndim, reduction_axes, group_axis_c)
    if group_axis_c is not None:
        x = split_groups(x, num_groups, group_axis_c)
        mask = None if mask is None else split_groups(mask, num_groups, group_axis_c)
    mean, var = moments(
        x,
        axes,
        mask=mask,
        axis_name=axis_name,
        axis_index_groups=axis_index_groups,
        use_mean=operation != "scale",
        use_fast_variance=use_fast_variance,
        dtype=dtype,
        force_float32_reductions=force_float32_reductions,
    )
    if operation == "center":
        return {"mean": mean}
    if operation == "scale":
        return {"mean_square": var}
    return {"mean": mean, "var": var}


def apply_statistics(
    x: Array,
    stats: dict[str, Array],
    reduction_axes: Sequence[int],
    operation: str = "standardize",
    *,
    epsilon: float = 1e-5,
    scale: Array | None = None,
    bias: Array | None = None,
    feature_axes: Sequence[int] = (),
    num_groups: int | None = None,
    group_axis: int = -1,
    dtype: Any = None,
) -> Array:
    """Normalizes ``x`` with ``stats`` (as returned by :func:`statistics`) and applies the affine.

    ``y = (x - mean) * rsqrt(var + eps) * scale + bias`` for standardize (``mean`` dropped for
    scale, the rsqrt dropped for center), computed as one fused elementwise expression.

    Args:
      x: (S...) input; ``reduction_axes`` canonical, as given to :func:`statistics`.
      stats: statistics with the reduction axes removed (group view with ``num_groups``).
      scale, bias: optional params of shape ``[x.shape[a] for a in feature_axes]``.
      feature_axes: canonical axes the params run along.
      dtype: output dtype (default: promotion of x, scale and bias, as flax.linen).

    Returns:
      (S...) array of dtype ``dtype``.
    """
    check_operation(operation)
    out_dtype = output_dtype(x, scale, bias, dtype)
    group_axis_c = None if num_groups is None else group_axis % x.ndim
    axes, _ = _grouped_axes(x.ndim, reduction_axes, group_axis_c)
    if group_axis_c is None and operation != "center" and not jnp.iscomplexobj(x):
        shape = broadcast_shape(x.shape, feature_axes)
        params = [None if p is None else jnp.reshape(p, shape) for p in (scale, bias)]
        centered = operation == "standardize"
        second = stats["var"] if centered else stats["mean_square"]
        mean_b = jnp.expand_dims(stats["mean"], axes) if centered else None
        return normalize_frozen(x, mean_b, jnp.expand_dims(second, axes), *params,
                                tuple(reduction_axes), centered, epsilon, out_dtype)
    y = x if group_axis_c is None else split_groups(x, num_groups, group_axis_c)
    if "mean" in stats:
        y = y - jnp.expand_dims(stats["mean"], axes)
    if operation != "center":
        second = stats["var"] if operation == "standardize" else stats["mean_square"]
        mul = lax.rsqrt(jnp.expand_dims(second, axes) + epsilon)
        if group_axis_c is None and scale is not None:  # complex x
            # Fold the scale into the per-statistic multiplier (one multiply per element).
            mul = mul * jnp.reshape(scale, broadcast_shape(x.shape, feature_axes))
            scale = None
        y = y * mul
    y = jnp.reshape(y, x.shape)
    y = affine(y, scale, bias, feature_axes=feature_axes)
    return jnp.asarray(y, out_dtype)


def normalize_with_statistics(
    x: Array,
    reduction_axes: Sequence[int],
    operation: str = "standardize",
    *,
    epsilon: float = 1e-5,
    scale: Array | None = None,
    bias: Array | None = None,
    feature_axes: Sequence[int] = (),
    num_groups: int | None = None,
    group_axis: int = -1,
    mask: Array | None = None,
    dtype: Any = None,
    **reduction: Any,
) -> tuple[Array, dict[str, Array]]:
    """Normalizes ``x`` by its own statistics: :func:`statistics` then :func:`apply_statistics`.

    ``reduction``: :func:`statistics`'s ``axis_name``, ``axis_index_groups``,
    ``use_fast_variance``, ``force_float32_reductions``. Returns ``(y, stats)`` (stats as
    :func:`statistics` returns them). Without mask and ``axis_name`` the work is one op with
    an analytic backward pass (:func:`normzoo.functional.fused.normalize_affine`): same
    values, fewer passes.
    """
    check_operation(operation)
    for name, param in (("scale", scale), ("bias", bias)):
        check_param_shape(name, param, x.shape, feature_axes)
    groups = dict(num_groups=num_groups, group_axis=group_axis)
    general = mask is not None or reduction.get("axis_name") is not None or operation == "center"
    if general or jnp.iscomplexobj(x):
        stats = statistics(x, reduction_axes, operation, mask=mask, dtype=dtype, **groups,
                           **reduction)
        y = apply_statistics(x, stats, reduction_axes, operation, epsilon=epsilon, scale=scale,
                             bias=bias, feature_axes=feature_axes, dtype=dtype, **groups)
        return y, stats
    # Channel groups stay in x's own layout (no (..., G, C/G) view): see fused.py.
    params = [
        None if p is None else jnp.reshape(p, broadcast_shape(x.shape, feature_axes))
        for p in (scale, bias)
    ]
    y, first, second = normalize_affine(
        x,
        *params,
        tuple(reduction_axes),
        None if num_groups is None else group_axis % x.ndim,
        num_groups,
        operation == "standardize",
        epsilon,
        reduction.get("use_fast_variance", True),
        statistics_dtype(x, dtype, reduction.get("force_float32_reductions", True)),
        output_dtype(x, scale, bias, dtype),
    )
    if operation == "scale":
        return y, {"mean_square": second}
    return y, {"mean": first, "var": second}


def affine(
    y: Array,
    scale: Array | None = None,
    bias: Array | None = None,
    *,
    feature_axes: Axes = -1,
    dtype: Any = None,
) -> Array:
    """Affine recovery ``scale * y + bias`` with per-feature params (Ioffe & Szegedy 2015).

    Args:
      y: (S...) normalized input.
      scale, bias: optional arrays of shape ``[S[a] for a in feature_axes]``.
      feature_axes: axes of ``y`` the params run along.
      dtype: optional output dtype (default: promotion of the inputs).
    """
    feature_axes = canonicalize_axes(y.ndim, feature_axes, name="feature_axes")
    shape = broadcast_shape(y.shape, feature_axes)
    for name, param in (("scale", scale), ("bias", bias)):
        check_param_shape(name, param, y.shape, feature_axes)
    if scale is not None:
        y = y * jnp.reshape(scale, shape)
    if bias is not None:
        y = y + jnp.reshape(bias, shape)
    return y if dtype is None else jnp.asarray(y, dtype)


def check_param_shape(
    name: str, param: Array | None, shape: Sequence[int], feature_axes: Sequence[int]
) -> None:
    """Raises a ValueError naming ``name`` unless ``param`` is None or shaped like the features."""
    expected = tuple(shape[a] for a in feature_axes)
    if param is not None and tuple(jnp.shape(param)) != expected:
        raise ValueError(
            f"{name} has shape {tuple(jnp.shape(param))}; expected {expected}, the sizes of "
            f"feature_axes={tuple(feature_axes)} of an input of shape {tuple(shape)}"
        )


# ------------------------------------------------------------------ as an engine operation

#: Initial value of each kind of running statistic: a zero mean and a unit (mean-square)
#: variance, so that inference before any training step is the identity.
INITIAL = {"mean": 0.0, "var": 1.0, "mean_square": 1.0}


@dataclasses.dataclass(frozen=True)
class Moments:
    """Centering, scaling or standardization over an area, as an operation of the engine.

    ``name``: ``"center"`` (``x - mu``), ``"scale"`` (``x / sqrt(E[x^2] + eps)``) or
    ``"standardize"`` (``(x - mu) / sqrt(var + eps)``); statistics :data:`STATISTICS`.
    The affine recovery is applied in the same fused expression.
    """

    name: str = "standardize"

    def __post_init__(self):
        check_operation(self.name)

    @property
    def keys(self) -> tuple[str, ...]:
        return STATISTICS[self.name]

    def init_stats(self, resolved: Resolved, dtype: Any = jnp.float32) -> dict[str, Array]:
        return {k: jnp.full(resolved.stat_shape, INITIAL[k], dtype) for k in self.keys}

    def param_shapes(self, resolved: Resolved, recovery: str) -> dict[str, tuple[int, ...]]:
        if recovery == "coloring":
            raise ValueError(
                f"recovery='coloring' needs a whitening operation; operation={self.name!r} "
                "takes recovery='affine' or 'none'"
            )
        shape = resolved.param_shape
        return {} if recovery == "none" else {"scale": shape, "bias": shape}

    def _axes(self, resolved: Resolved) -> tuple[int, ...]:
        if resolved.group_axis is None:
            return resolved.reduction_axes
        return tuple(sorted(resolved.reduction_axes + (resolved.group_axis,)))

    def _groups(self, resolved: Resolved) -> dict[str, Any]:
        if resolved.group_axis is None:
            return {}
        return {"num_groups": resolved.num_groups, "group_axis": resolved.group_axis}

    def normalize(self, x, resolved: Resolved, reduction, scale=None, bias=None, mask=None,
                  recovery: str = "affine"):
        """``(y, stats)``: x normalized by its own statistics, then the affine."""
        return normalize_with_statistics(
            x, self._axes(resolved), self.name, scale=scale, bias=bias,
            feature_axes=resolved.feature_axes, mask=mask, **self._groups(resolved),
            **reduction.kwargs(),
        )

    def statistics(self, x, resolved: Resolved, reduction, mask=None) -> dict[str, Array]:
        """The statistics alone (what :meth:`normalize` would normalize with)."""
        options = reduction.kwargs()
        del options["epsilon"]
        return statistics(x, self._axes(resolved), self.name, mask=mask,
                          **self._groups(resolved), **options)

    def normalize_given(self, x, stats, resolved: Resolved, reduction, scale=None, bias=None,
                        recovery: str = "affine"):
        """y from given statistics (running averages, population statistics)."""
        return apply_statistics(
            x, stats, self._axes(resolved), self.name, epsilon=reduction.epsilon, scale=scale,
            bias=bias, feature_axes=resolved.feature_axes, dtype=reduction.dtype,
            **self._groups(resolved),
        )


CENTER, SCALE, STANDARDIZE = Moments("center"), Moments("scale"), Moments("standardize")
