"""Per-group covariance over any reduction axes: float32 at least, masks, exact across devices.

The whitening layers (:mod:`normzoo.functional.whitening`) need, per group of ``g`` features,
the mean and the biased covariance over the reduction axes (the *batch area* for DBN and
IterNorm: every axis but the features). :func:`covariance` computes them for an input of
any layout:

* ``feature_axes`` (one or more axes, flattened in order into ``C`` features) split into
  ``num_groups`` groups of ``g = C / num_groups`` consecutive features;
* ``reduction_axes`` (the ``m`` samples each covariance is taken over);
* every other axis is *kept*: one covariance per index (per sample for instance whitening).

Accuracy. Two passes: the mean, then ``Xc^T Xc / m`` on the centered data. The second pass is
an ``O(m g^2)`` matrix product that dwarfs the ``O(m g)`` mean, so the exact (centered) form
costs nothing extra, and it cannot cancel when ``|mean| >> std``. Products run at
``precision=HIGHEST`` by default, so TPUs and GPUs (bf16 / tf32 passes) keep float32 accuracy.

Masks. A mask selects *samples*: an element of the reduction area counts if its mask is True
for every feature (a covariance needs the whole feature vector; padding positions are
masked for all their features anyway).

Cross-device. As :func:`normzoo.functional.moments` does for variances, each device computes
its ``(count, mean, M2)`` with ``M2 = Xc^T Xc`` the matrix of centered cross products, and the
parallel formula of Chan, Golub & LeVeque (1983), generalized to matrices, combines them
exactly (two ``psum`` rounds: counts and means, then the ``M2`` terms):

    n = sum_d n_d,  mean = sum_d n_d mean_d / n,
    M2 = sum_d [M2_d + n_d (mean_d - mean)(mean_d - mean)^T],  Sigma = M2 / n.

Exact for uneven or masked shards, where averaging per-device covariances is not.
"""

from __future__ import annotations

from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from normzoo.functional.axes import Axes, canonicalize_axes, check_floating, check_mask
from normzoo.functional.moments import collective, statistics_dtype

Array = jax.Array

#: Default precision of the matrix products (full float32 on TPU / GPU too).
HIGHEST = lax.Precision.HIGHEST


def check_group_size(features: int, group_size: int | None) -> int:
    """``group_size`` (``None``: all ``features`` in one group) checked against ``features``.

    Returns the number of groups. Raises ValueError naming ``group_size`` unless it is a
    positive divisor of ``features``.
    """
    if group_size is None:
        return 1
    if (
        isinstance(group_size, bool)
        or not isinstance(group_size, (int, np.integer))
        or group_size <= 0
        or features % group_size
    ):
        raise ValueError(
            f"group_size={group_size!r} must be a positive divisor of the {features} features "
            "(or None for one group of all features)"
        )
    return features // int(group_size)


class MatrixView:
    """Moves ``x`` (any layout) to ``(K..., m, C)`` and back: kept, reduced, feature axes.

    ``K...`` are the kept axes (in order), ``m`` the product of the reduction axes' sizes and
    ``C`` the product of the feature axes' sizes. A transpose is skipped when the axes are
    already in that order (the channels-last batch area ``(N, ..., C)`` is a free reshape).
    """

    def __init__(
        self, shape: Sequence[int], reduction_axes: Sequence[int], feature_axes: Sequence[int]
    ):
        ndim = len(shape)
        overlap = set(reduction_axes) & set(feature_axes)
        if overlap:
            raise ValueError(
                f"reduction_axes={tuple(reduction_axes)} and feature_axes={tuple(feature_axes)} "
                f"overlap in {sorted(overlap)}; an axis is either reduced or a feature"
            )
        self.shape = tuple(shape)
        used = set(reduction_axes) | set(feature_axes)
        self.kept_axes = tuple(a for a in range(ndim) if a not in used)
        self.reduction_axes = tuple(reduction_axes)
        self.feature_axes = tuple(feature_axes)
        self.perm = self.kept_axes + self.reduction_axes + self.feature_axes
        self.kept_shape = tuple(shape[a] for a in self.kept_axes)
        self.samples = int(np.prod([shape[a] for a in self.reduction_axes], dtype=np.int64))
        self.features = int(np.prod([shape[a] for a in self.feature_axes], dtype=np.int64))
        self.feature_shape = tuple(shape[a] for a in self.feature_axes)

    def to_matrix(self, x: Array) -> Array:
        if self.perm != tuple(range(len(self.perm))):
            x = jnp.transpose(x, self.perm)
        return jnp.reshape(x, self.kept_shape + (self.samples, self.features))

    def from_matrix(self, y: Array) -> Array:
        permuted = tuple(self.shape[a] for a in self.perm)
        y = jnp.reshape(y, permuted)
        if self.perm != tuple(range(len(self.perm))):
            y = jnp.transpose(y, np.argsort(self.perm))
        return y

    def sample_mask(self, mask: Array | None) -> Array | None:
        """``(K..., m)`` bool: a sample counts if its mask holds for every feature."""
        if mask is None:
            return None
        mask = jnp.broadcast_to(mask, self.shape)
        return jnp.all(self.to_matrix(mask), axis=-1)


def _grouped(a: Array, num_groups: int) -> Array:
    """``(..., C)`` -> ``(..., G, g)``."""
    return jnp.reshape(a, a.shape[:-1] + (num_groups, a.shape[-1] // num_groups))


def local_covariance(
    xm: Array,
    sample_mask: Array | None,
    num_groups: int,
    precision: Any = HIGHEST,
) -> tuple[Array, Array, Array]:
    """``(count, mean, M2)`` of a matrix view ``xm`` (K..., m, C) on this device.

    Returns ``count`` (K...), ``mean`` (K..., C) and ``M2`` (K..., G, g, g), the sum of the
    centered cross products per group (``Sigma = M2 / count``).
    """
    if sample_mask is None:
        count = jnp.full(xm.shape[:-2], xm.shape[-2], xm.dtype)
        mean = jnp.mean(xm, axis=-2)
        xc = xm - mean[..., None, :]
    else:
        w = sample_mask.astype(xm.dtype)[..., None]
        count = jnp.sum(sample_mask, axis=-1).astype(xm.dtype)
        # where(), not a product: masked-out values may be inf / NaN padding.
        xz = jnp.where(w > 0, xm, 0)
        mean = jnp.sum(xz, axis=-2) / jnp.maximum(count, 1)[..., None]
        xc = jnp.where(w > 0, xm - mean[..., None, :], 0)
    xg = _grouped(xc, num_groups)  # (K..., m, G, g)
    m2 = jnp.einsum("...mgi,...mgj->...gij", xg, xg, precision=precision)
    return count, mean, m2


def combine_covariance_across_devices(
    count: Array,
    mean: Array,
    m2: Array,
    axis_name: Any,
    axis_index_groups: Any = None,
) -> tuple[Array, Array, Array]:
    """Exact count-weighted combination of per-device ``(count, mean, M2)``.

    Two ``psum`` rounds, as :func:`normzoo.functional.combine_across_devices`: the counts and
    count-weighted means give the global mean, then each device's ``M2`` plus its between-device
    term ``n_d (mean_d - mean)(mean_d - mean)^T`` is summed. Nothing is formed around the
    origin, so there is no cancellation when ``|mean| >> std``; the results are identical on
    every device (replicated under ``shard_map``).

    Args:
      count: (K...) samples behind the local statistics (0 allowed).
      mean: (K..., C) local means.
      m2: (K..., G, g, g) local sums of centered cross products.
      axis_name, axis_index_groups: as in ``jax.lax.psum``.

    Returns:
      ``(count, mean, M2)`` over all devices of the group.
    """
    num_groups = m2.shape[-3]
    has_data = (count > 0)[..., None]

    def psum(v):
        return collective(lax.psum, v, axis_name, axis_index_groups)

    weighted = jnp.where(has_data, count[..., None] * mean, 0)
    packed = psum(jnp.concatenate([count[..., None], weighted], axis=-1))
    total, global_mean = packed[..., 0], packed[..., 1:] / jnp.maximum(packed[..., :1], 1)
    delta = _grouped(jnp.where(has_data, mean - global_mean, 0), num_groups)  # (K..., G, g)
    between = count[..., None, None, None] * (delta[..., :, None] * delta[..., None, :])
    return total, global_mean, psum(m2 + between)


def covariance(
    x: Array,
    reduction_axes: Axes,
    feature_axes: Axes = -1,
    *,
    group_size: int | None = None,
    mask: Array | None = None,
    axis_name: Any = None,
    axis_index_groups: Any = None,
    dtype: Any = None,
    precision: Any = HIGHEST,
) -> tuple[Array, Array]:
    """Mean and biased covariance of ``x`` per group of features, over ``reduction_axes``.

    ``Sigma = (1/m) sum_i (x_i - mu)(x_i - mu)^T`` over the ``m`` samples of the reduction
    axes, one ``g x g`` matrix per group of ``g = group_size`` consecutive features.

    Args:
      x: input of any shape; real floating.
      reduction_axes: the axes the statistics span (for the batch area: all but the features).
      feature_axes: the feature axis or axes (flattened in order into ``C`` features).
      group_size: features per group; ``None`` (default) = one group of all ``C`` features.
      mask: optional bool, broadcastable to ``x``: which samples count (see module docstring).
      axis_name, axis_index_groups: also span this named axis (vmap / shard_map / pmap);
        combined exactly, weighted by sample counts.
      dtype: statistics dtype, promoted to float32 at least.
      precision: of the matrix products (default ``HIGHEST``).

    Returns:
      ``(mean, cov)``: ``mean`` of shape ``(K..., *feature_shape)`` and ``cov`` of shape
      ``(K..., C / g, g, g)``, with ``K...`` the sizes of the axes neither reduced nor features
      (none for the batch area).

    Raises:
      TypeError: ``x`` is not floating. ValueError: bad axes, ``group_size`` or ``mask``.
    """
    check_floating(x)
    if jnp.iscomplexobj(x):
        raise TypeError(f"x has dtype {jnp.result_type(x)}; covariance supports real inputs only")
    reduction_axes = canonicalize_axes(x.ndim, reduction_axes, name="reduction_axes")
    feature_axes = canonicalize_axes(x.ndim, feature_axes, name="feature_axes")
    view = MatrixView(x.shape, reduction_axes, feature_axes)
    num_groups = check_group_size(view.features, group_size)
    mask = check_mask(mask, x.shape)
    xm = view.to_matrix(jnp.asarray(x).astype(statistics_dtype(x, dtype)))
    count, mean, m2 = local_covariance(xm, view.sample_mask(mask), num_groups, precision)
    if axis_name is not None:
        count, mean, m2 = combine_covariance_across_devices(
            count, mean, m2, axis_name, axis_index_groups
        )
    cov = m2 / count[..., None, None, None]
    return jnp.reshape(mean, view.kept_shape + view.feature_shape), cov
