"""The area of a normalizer: which axes its statistics span (Huang et al., TPAMI 2023, section 3.1).

An :class:`Area` is a small frozen description; :meth:`Area.resolve` turns it into the
canonical axes for one input shape and raises a ValueError naming the argument when they do
not fit. For an input ``(N, *spatial, C)`` with the batch axis first and features ``C``:

==========  ==============================================  ==========================
area        statistics over                                 examples
==========  ==============================================  ==========================
batch       every axis except the feature axes              BN, DBN, IterNorm
layer       every axis except the batch axis 0 (or given)   LN, RMSNorm
group       like layer, within groups of C / G channels     GN, group whitening
instance    every axis except 0 and the feature axes        IN, instance whitening
position    the feature axes of each sample and position    PositionalNorm (Li 2019)
axes        the given ``reduction_axes``                    anything else
==========  ==============================================  ==========================
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Sequence

from normzoo.functional.axes import (
    Axes,
    canonicalize_axes,
    check_area,
    complement_axes,
    resolve_num_groups,
)


@dataclasses.dataclass(frozen=True)
class Resolved:
    """An area resolved for one input shape (all axes canonical, sorted).

    Attributes:
      shape: the input shape.
      reduction_axes: axes of x the statistics span, apart from the channel axis of a group
        split (whose within-group part they also span).
      feature_axes: axes the affine params (and a batch area's running statistics) run along.
      num_groups, group_axis: the channel axis split into ``num_groups`` groups, or None.
    """

    shape: tuple[int, ...]
    reduction_axes: tuple[int, ...]
    feature_axes: tuple[int, ...]
    num_groups: int | None = None
    group_axis: int | None = None
    #: How the user spelled the feature axes (argument name and value), for error messages.
    feature_spec: tuple[str, Any] = ("feature_axes", -1)

    @property
    def count(self) -> int:
        """Elements behind each statistic."""
        n = math.prod(self.shape[a] for a in self.reduction_axes)
        if self.group_axis is not None:
            n *= self.shape[self.group_axis] // self.num_groups
        return n

    @property
    def stat_shape(self) -> tuple[int, ...]:
        """Shape of each statistic: x's with the reduction axes removed (channels -> groups)."""
        return tuple(
            self.num_groups if a == self.group_axis else n
            for a, n in enumerate(self.shape)
            if a not in self.reduction_axes
        )

    @property
    def param_shape(self) -> tuple[int, ...]:
        """Shape of the affine params: the sizes of the feature axes."""
        return tuple(self.shape[a] for a in self.feature_axes)


@dataclasses.dataclass(frozen=True)
class Area:
    """Which axes the statistics span; see the module docstring for the kinds.

    Attributes:
      kind: ``"batch"``, ``"layer"``, ``"group"``, ``"instance"``, ``"position"`` or ``"axes"``.
      feature_axes: the params' axes (default the last).
      reduction_axes: ``layer`` / ``group``: overrides the default span (every axis but 0;
        for ``group`` it must include the channel axis); ``axes``: the span itself.
      num_groups, group_size: ``group``: exactly one of them (flax.linen.GroupNorm's rule).
      feature_name: how errors name ``feature_axes`` (``"axis"`` for BatchNorm's field).
      virtual_batch_size: ``batch``: statistics per chunk of this many samples (ghost batch
        normalization, Hoffer et al. 2017); None: the whole batch.
    """

    kind: str = "batch"
    feature_axes: Axes = -1
    reduction_axes: Axes | None = None
    num_groups: int | None = None
    group_size: int | None = None
    feature_name: str = "feature_axes"
    virtual_batch_size: int | None = None

    def __post_init__(self):
        check_area(self.kind)
        k = self.virtual_batch_size
        if k is None:
            return
        if self.kind != "batch":
            raise ValueError(f"virtual_batch_size={k!r} needs area 'batch'; got {self.kind!r}")
        if isinstance(k, bool) or not isinstance(k, int) or k <= 0:
            raise ValueError(f"virtual_batch_size={k!r} must be a positive int (samples per "
                             "chunk) or None")

    def resolve(self, shape: Sequence[int]) -> Resolved:
        """The canonical axes for an input of ``shape``; ValueError where they do not fit."""
        shape = tuple(shape)
        ndim = len(shape)
        spec = (self.feature_name, self.feature_axes)

        def resolved(*args) -> Resolved:
            return Resolved(shape, *args, feature_spec=spec)

        features = canonicalize_axes(ndim, self.feature_axes, name=self.feature_name)
        kind = self.kind
        if kind in ("layer", "group", "instance", "position") and ndim < 2:
            raise ValueError(
                f"area={kind!r} needs an input of rank >= 2 with the batch axis first, "
                f"got shape {shape}"
            )
        if kind in ("group", "instance", "position") and 0 in features:
            raise ValueError(
                f"{self.feature_name}={self.feature_axes!r} contains the batch axis 0: "
                f"area={kind!r} keeps axis 0 as the batch and cannot normalize it as a feature. "
                "The channel axes cannot include the leading dimension as this is assumed "
                "to be the batch axis."
            )
        if kind == "batch":
            return resolved(complement_axes(ndim, features), features)
        if kind == "instance":
            return resolved(tuple(a for a in range(1, ndim) if a not in features), features)
        if kind == "position":
            return resolved(features, features)
        if kind == "axes":
            if self.reduction_axes is None:
                raise ValueError("area='axes' needs reduction_axes (the axes to reduce)")
            return resolved(
                canonicalize_axes(ndim, self.reduction_axes, name="reduction_axes"), features
            )
        default = tuple(range(1, ndim))
        axes = (
            default
            if self.reduction_axes is None
            else canonicalize_axes(ndim, self.reduction_axes, name="reduction_axes")
        )
        if kind == "layer":
            return resolved(axes, features)
        if len(features) != 1:
            raise ValueError(
                f"{self.feature_name}={self.feature_axes!r}: area='group' splits exactly one "
                "channel axis into groups"
            )
        channel = features[0]
        if channel not in axes:
            raise ValueError(
                f"reduction_axes={self.reduction_axes!r} must include the channel axis "
                f"({channel}) that area='group' splits into groups"
            )
        groups = resolve_num_groups(shape[channel], self.num_groups, self.group_size)
        return resolved(tuple(a for a in axes if a != channel), features, groups, channel)


def batch(axis: Axes = -1, virtual_batch_size: int | None = None) -> Area:
    """Statistics over every axis but ``axis`` (BatchNorm's area); with
    ``virtual_batch_size``, per chunk of that many samples (ghost batches)."""
    return Area("batch", axis, feature_name="axis", virtual_batch_size=virtual_batch_size)


def layer(reduction_axes: Axes | None = None, feature_axes: Axes = -1) -> Area:
    """Statistics over ``reduction_axes`` of each sample (default: every axis but 0)."""
    return Area("layer", feature_axes, reduction_axes)


def group(
    num_groups: int | None = 32, group_size: int | None = None, *,
    reduction_axes: Axes | None = None, feature_axes: Axes = -1,
) -> Area:
    """Statistics per sample and group of channels (GroupNorm's area)."""
    return Area("group", feature_axes, reduction_axes, num_groups, group_size)


def instance(feature_axes: Axes = -1) -> Area:
    """Statistics per sample and feature over the remaining (spatial) axes."""
    return Area("instance", feature_axes)


def position(feature_axes: Axes = -1) -> Area:
    """Statistics over the feature axes at each sample and position (PositionalNorm)."""
    return Area("position", feature_axes)


def axes(reduction_axes: Axes, feature_axes: Axes = -1) -> Area:
    """Statistics over exactly ``reduction_axes``."""
    return Area("axes", feature_axes, reduction_axes)
