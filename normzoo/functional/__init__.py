"""normzoo.functional: pure jax.numpy normalization, no Flax.

The engine (:mod:`normzoo.functional.engine`): a :class:`Normalizer` is an :class:`Area`, an
operation (:class:`Moments` or :class:`Whiten`), a recovery and an estimator, plus
:class:`Reduction` options. The presets (``batch_norm``, ``layer_norm``, ...) are points of it.

Stateless transforms return ``y``; those with running statistics take and return them:
``y, new_stats = batch_norm(x, stats, scale, bias, train=True)``. All are jit/vmap/grad safe
and raise clear errors at trace time.
"""

from normzoo.functional import area
from normzoo.functional.area import Area
from normzoo.functional.axes import AREAS, canonicalize_axes, resolve_num_groups
from normzoo.functional.covariance import combine_covariance_across_devices, covariance
from normzoo.functional.engine import Normalizer
from normzoo.functional.estimators import (
    EMA,
    ESTIMATORS,
    BatchOnly,
    Cumulative,
    DebiasedEMA,
    Estimator,
    Population,
    Renorm,
    renorm_warmup,
)
from normzoo.functional.moments import combine_across_devices, moments
from normzoo.functional.operations import (
    CENTER,
    OPERATIONS,
    SCALE,
    STANDARDIZE,
    STATISTICS,
    Moments,
    affine,
    apply_statistics,
    statistics,
)
from normzoo.functional.presets import (
    batch_norm,
    batch_renorm,
    center,
    group_norm,
    init_batch_renorm_stats,
    instance_norm,
    layer_norm,
    normalize,
    rms_norm,
    scale,
    standardize,
    whiten,
)
from normzoo.functional.reduction import Reduction
from normzoo.functional.running import ema, init_batch_stats
from normzoo.functional.whitening import (
    METHODS as WHITENING_METHODS,
    Whiten,
    init_whitening_stats,
    whitening_matrix,
)

__all__ = [
    "AREAS",
    "Area",
    "BatchOnly",
    "CENTER",
    "Cumulative",
    "DebiasedEMA",
    "EMA",
    "ESTIMATORS",
    "Estimator",
    "Moments",
    "Normalizer",
    "OPERATIONS",
    "Population",
    "Reduction",
    "Renorm",
    "SCALE",
    "STANDARDIZE",
    "STATISTICS",
    "WHITENING_METHODS",
    "Whiten",
    "affine",
    "apply_statistics",
    "area",
    "batch_norm",
    "batch_renorm",
    "canonicalize_axes",
    "center",
    "combine_across_devices",
    "combine_covariance_across_devices",
    "covariance",
    "ema",
    "group_norm",
    "init_batch_renorm_stats",
    "init_batch_stats",
    "init_whitening_stats",
    "instance_norm",
    "layer_norm",
    "moments",
    "normalize",
    "renorm_warmup",
    "resolve_num_groups",
    "rms_norm",
    "scale",
    "standardize",
    "statistics",
    "whiten",
    "whitening_matrix",
]

from normzoo.functional.activation import (  # noqa: E402
    dyt,
    evonorm_b0,
    evonorm_s0,
    filter_response_norm,
    init_evonorm_b0_stats,
    local_response_norm,
    tlu,
)
from normzoo.functional.weights import (  # noqa: E402
    centered_weight_norm,
    init_spectral_u,
    scaled_weight_standardization,
    spectral_norm,
    weight_norm,
    weight_standardization,
)

__all__ += [
    "centered_weight_norm",
    "dyt",
    "evonorm_b0",
    "evonorm_s0",
    "filter_response_norm",
    "init_evonorm_b0_stats",
    "init_spectral_u",
    "local_response_norm",
    "scaled_weight_standardization",
    "spectral_norm",
    "tlu",
    "weight_norm",
    "weight_standardization",
]
from normzoo.functional.switchable import (  # noqa: E402
    init_switchable_norm_stats,
    switchable_norm,
)

__all__ += ["init_switchable_norm_stats", "switchable_norm"]
