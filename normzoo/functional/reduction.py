"""Reduction options: how statistics are reduced, one frozen value passed whole.

Every operation of the engine takes the same :class:`Reduction` instead of a dozen keyword
arguments. The mask is not part of it: it is data that changes with every batch, while the
options are configuration fixed when the layer is built.
"""

from __future__ import annotations

import dataclasses
import numbers
from typing import Any


@dataclasses.dataclass(frozen=True)
class Reduction:
    """How a normalizer reduces its statistics.

    Attributes:
      epsilon: added to the variance (or mean square, or the covariance's diagonal); >= 0.
      axis_name: a named axis (vmap / shard_map / pmap) the statistics also span; devices'
        moments are combined exactly, weighted by element counts.
      axis_index_groups: groups of indices within ``axis_name`` (as ``lax.psum``).
      use_fast_variance: one pass over x, shifted so it stays exact when ``|mean| >> std``;
        False: flax's two-pass formula.
      dtype: the output dtype (default: the promotion of x and params, as flax.linen); the
        statistics are computed in it, promoted to float32 unless ``force_float32_reductions``
        is False.
      force_float32_reductions: statistics (and running statistics) in float32 at least.
    """

    epsilon: float = 1e-5
    axis_name: Any = None
    axis_index_groups: Any = None
    use_fast_variance: bool = True
    dtype: Any = None
    force_float32_reductions: bool = True

    def __post_init__(self):
        check_epsilon(self.epsilon)

    def kwargs(self) -> dict[str, Any]:
        """The options as keyword arguments (shallow: values are not copied)."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}


def check_epsilon(epsilon: Any) -> None:
    """Raises a ValueError unless ``epsilon`` is a real number >= 0 (arrays are let through)."""
    if isinstance(epsilon, bool) or (
        isinstance(epsilon, numbers.Number) and not (isinstance(epsilon, numbers.Real) and epsilon >= 0)
    ):
        raise ValueError(
            f"epsilon={epsilon!r} must be a float >= 0 (added to the variance before the "
            "square root)"
        )
