"""Axes logic, written once: canonical axes, normalization areas, group splits, input checks.

Every error here is raised at trace time (shapes are static) and names the argument,
the value and what was expected, instead of an ``IndexError`` from deep inside XLA.

Areas (Huang et al., "Normalization Techniques in Training DNNs", TPAMI 2023, arXiv 2009.12836),
for an input of shape ``(N, *spatial, C)`` with the batch axis first:

========  =========================================  ===========
area      statistics over                            examples
========  =========================================  ===========
batch     every axis except the feature axes         BN
layer     every axis except the batch axis 0         LN, RMSNorm
instance  every axis except 0 and the feature axes   IN
group     like layer, per group of C / G channels    GN
========  =========================================  ===========
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any, Union

import jax.numpy as jnp
import numpy as np

Axes = Union[int, Sequence[int]]

AREAS = ("batch", "layer", "group", "instance", "position", "axes")


def canonicalize_axes(ndim: int, axes: Axes, *, name: str = "axes") -> tuple[int, ...]:
    """Returns ``axes`` as sorted, deduplicated, non-negative ints for an ``ndim``-D input.

    Raises:
      TypeError: an axis is not an integer.
      ValueError: an axis is outside ``[-ndim, ndim)``; the message names ``name``.
    """
    items = tuple(axes) if isinstance(axes, Iterable) else (axes,)
    result = set()
    for axis in items:
        if isinstance(axis, bool) or not isinstance(axis, (int, np.integer)):
            raise TypeError(f"{name}={axes!r}: every axis must be an int, got {axis!r}")
        if not -ndim <= axis < ndim:
            raise ValueError(
                f"{name}={axes!r} is out of range for an input of rank {ndim}: "
                f"expected axes in [{-ndim}, {ndim - 1}]"
            )
        result.add(int(axis) % ndim)
    return tuple(sorted(result))


def complement_axes(ndim: int, axes: Sequence[int]) -> tuple[int, ...]:
    """The axes of an ``ndim``-D array that are not in (canonical) ``axes``."""
    return tuple(i for i in range(ndim) if i not in axes)


def feature_shape(shape: Sequence[int], feature_axes: Sequence[int]) -> tuple[int, ...]:
    """Shape of per-feature parameters: the sizes of the (canonical) feature axes."""
    return tuple(shape[ax] for ax in feature_axes)


def broadcast_shape(shape: Sequence[int], feature_axes: Sequence[int]) -> tuple[int, ...]:
    """``shape`` with every non-feature axis set to 1, for broadcasting parameters against x."""
    return tuple(n if ax in feature_axes else 1 for ax, n in enumerate(shape))


def area_reduction_axes(ndim: int, area: str, feature_axes: Sequence[int]) -> tuple[int, ...]:
    """Reduction axes of an area (see module docstring); ``feature_axes`` canonical.

    For ``group`` the reduction also spans the within-group channels, handled by
    :func:`split_groups`; the axes returned here are the ones outside the channel axis.
    """
    check_area(area)
    if area in ("layer", "group", "instance") and ndim < 2:
        raise ValueError(
            f"area={area!r} needs an input of rank >= 2 with the batch axis first, got rank {ndim}"
        )
    if area in ("group", "instance") and 0 in feature_axes:
        raise ValueError(
            f"feature_axes={feature_axes!r} contains the batch axis 0: area={area!r} keeps axis 0 "
            "as the batch and cannot normalize it as a feature"
        )
    if area == "batch":
        return complement_axes(ndim, feature_axes)
    if area == "layer":
        return tuple(range(1, ndim))
    return tuple(i for i in range(1, ndim) if i not in feature_axes)


def check_area(area: str) -> None:
    if area not in AREAS:
        raise ValueError(f"area={area!r} is unknown; expected one of {AREAS}")


def resolve_num_groups(channels: int, num_groups: int | None, group_size: int | None) -> int:
    """Number of groups from exactly one of ``num_groups`` / ``group_size``.

    Raises ValueError (naming the argument and value) when both or neither are given, or
    when the value does not divide ``channels``.
    """
    if (num_groups is None) == (group_size is None):
        raise ValueError(
            f"exactly one of num_groups={num_groups!r} and group_size={group_size!r} must be set "
            "(to set group_size on a layer whose num_groups defaults to 32, pass num_groups=None)"
        )
    if group_size is not None:
        if not isinstance(group_size, (int, np.integer)) or group_size <= 0 or channels % group_size:
            raise ValueError(
                f"group_size={group_size!r} must be a positive divisor of the {channels} channels"
            )
        return channels // int(group_size)
    if not isinstance(num_groups, (int, np.integer)) or num_groups <= 0 or channels % num_groups:
        raise ValueError(
            f"num_groups={num_groups!r} must be a positive divisor of the {channels} channels"
        )
    return int(num_groups)


def split_groups(x: jnp.ndarray, num_groups: int, axis: int = -1) -> jnp.ndarray:
    """Reshapes channel ``axis`` of size C into ``(num_groups, C // num_groups)`` (a free view)."""
    axis = axis % x.ndim
    shape = x.shape[:axis] + (num_groups, x.shape[axis] // num_groups) + x.shape[axis + 1 :]
    return x.reshape(shape)


def check_floating(x: Any, name: str = "x") -> None:
    """Raises TypeError unless ``x`` is a real or complex floating array."""
    dtype = jnp.result_type(x)
    if not jnp.issubdtype(dtype, jnp.inexact):
        raise TypeError(
            f"{name} has dtype {dtype}; expected a floating dtype (float32, bfloat16, float16, ...). "
            f"Cast it first, e.g. {name}.astype(jnp.float32)"
        )


def check_mask(mask: Any, shape: Sequence[int], name: str = "mask") -> jnp.ndarray | None:
    """Returns ``mask`` as a bool array broadcast to ``shape``, or raises a ValueError naming it."""
    if mask is None:
        return None
    mask = jnp.asarray(mask)
    try:
        target = np.broadcast_shapes(tuple(mask.shape), tuple(shape))
    except ValueError:
        target = None
    if target != tuple(shape):
        raise ValueError(
            f"{name} has shape {tuple(mask.shape)}, which does not broadcast to the input shape "
            f"{tuple(shape)}"
        )
    return jnp.broadcast_to(mask.astype(bool), tuple(shape))


def check_positive(value: float, name: str) -> None:
    if not value > 0:
        raise ValueError(f"{name}={value!r} must be > 0")


def check_momentum(momentum: float) -> None:
    if not 0.0 <= momentum <= 1.0:
        raise ValueError(f"momentum={momentum!r} must be in [0, 1] (Flax convention: "
                         "running = momentum * running + (1 - momentum) * batch)")
