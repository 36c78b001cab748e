"""normzoo.functional: pure jax.numpy normalization, no Flax.

Stateless transforms return ``y``; those with running statistics take and return them:
``y, new_stats = batch_norm(x, stats, scale, bias, train=True)``. All are jit/vmap/grad safe
and raise clear errors at trace time.
"""

from normzoo.functional.axes import AREAS, canonicalize_axes, resolve_num_groups
from normzoo.functional.moments import combine_across_devices, moments
from normzoo.functional.operations import (
    OPERATIONS,
    STATISTICS,
    affine,
    apply_statistics,
    center,
    scale,
    standardize,
    statistics,
)
from normzoo.functional.presets import (
    batch_norm,
    group_norm,
    instance_norm,
    layer_norm,
    normalize,
    rms_norm,
)
from normzoo.functional.running import ema, init_batch_stats

__all__ = [
    "AREAS",
    "OPERATIONS",
    "STATISTICS",
    "affine",
    "apply_statistics",
    "batch_norm",
    "canonicalize_axes",
    "center",
    "combine_across_devices",
    "ema",
    "group_norm",
    "init_batch_stats",
    "instance_norm",
    "layer_norm",
    "moments",
    "normalize",
    "resolve_num_groups",
    "rms_norm",
    "scale",
    "standardize",
    "statistics",
]

# Whitening family (ZCA, PCA, Cholesky, Newton-Schulz / IterNorm) and per-group covariance.
from normzoo.functional.covariance import (  # noqa: E402
    combine_covariance_across_devices,
    covariance,
)
from normzoo.functional.whitening import (  # noqa: E402
    METHODS as WHITENING_METHODS,
    init_whitening_stats,
    whiten,
    whitening_matrix,
)

__all__ += [
    "WHITENING_METHODS",
    "combine_covariance_across_devices",
    "covariance",
    "init_whitening_stats",
    "whiten",
    "whitening_matrix",
]
