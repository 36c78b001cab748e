"""One engine for the whole taxonomy: a normalizer is area x operation x recovery x estimator.

Huang et al., "Normalization Techniques in Training DNNs: Methodology, Analysis and
Application" (TPAMI 2023, arXiv 2009.12836) describe every normalizer by *where* its
statistics come from (the area), *what* it does with them (the operation), *how* it gives the
network its representational power back (the recovery) and *which* statistics it uses at
inference (the estimator). :class:`Normalizer` is exactly that tuple, plus the reduction
options, as one small frozen value with two pure functions (optax's shape):

* :meth:`Normalizer.init_stats` ``(x_shape) -> stats`` (empty without running statistics);
* :meth:`Normalizer.apply` ``(x, stats, scale, bias, *, train, mask) -> (y, new_stats)``.

============  ===================================================  =========================
axis          values                                                module
============  ===================================================  =========================
area          batch, layer, group, instance, position, axes        :mod:`~.area`
operation     center, scale, standardize; whiten (zca, pca,        :mod:`~.operations`,
              cholesky, newton; blocks; iterations)                :mod:`~.whitening`
recovery      none, affine, coloring (whitening)                   here
estimator     batch only, EMA, debiased EMA, cumulative, given     :mod:`~.estimators`
reduction     axis_name, axis_index_groups, variance algorithm,    :mod:`~.reduction`
              statistics dtype, epsilon (the mask is per call)
============  ===================================================  =========================

BatchNorm is ``Normalizer(area.batch(), STANDARDIZE, "affine", EMA(0.99))``; GroupNorm
``Normalizer(area.group(32), STANDARDIZE)``; group whitening
``Normalizer(area.group(8), Whiten("zca"))``.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Protocol

import jax
import jax.numpy as jnp

from normzoo.functional.area import Area, Resolved
from normzoo.functional.axes import check_floating, check_mask
from normzoo.functional.estimators import BatchOnly, Estimator
from normzoo.functional.moments import collective
from normzoo.functional.operations import STANDARDIZE, output_dtype
from normzoo.functional.reduction import Reduction

Array = jax.Array
Stats = dict[str, Array]

RECOVERIES = ("none", "affine", "coloring")

#: Areas whose statistics are per sample: no running statistics there.
PER_SAMPLE_AREAS = ("layer", "group", "instance", "position")


class Operation(Protocol):
    """What an operation provides to the engine (:class:`~.operations.Moments`, :class:`~.whitening.Whiten`)."""

    name: str
    keys: tuple[str, ...]

    def init_stats(self, resolved: Resolved, dtype: Any = ...) -> Stats: ...
    def param_shapes(self, resolved: Resolved, recovery: str) -> dict[str, tuple[int, ...]]: ...
    def statistics(self, x, resolved, reduction, mask=None) -> Stats: ...
    def normalize(self, x, resolved, reduction, scale=None, bias=None, mask=None,
                  recovery="affine") -> tuple[Array, Stats]: ...
    def normalize_given(self, x, stats, resolved, reduction, scale=None, bias=None,
                        recovery="affine") -> Array: ...


@dataclasses.dataclass(frozen=True)
class Normalizer:
    """A point of the taxonomy; see the module docstring.

    Attributes:
      area: which axes the statistics span (:class:`~.area.Area`).
      operation: what is done with them (default: standardize).
      recovery: ``"none"``, ``"affine"`` (per-feature ``scale``, ``bias``) or ``"coloring"``
        (whitening only: a ``(blocks, g, g)`` matrix as ``scale``, and ``bias``).
      estimator: which statistics inference uses and how running ones update.
      reduction: the reduction options.
    """

    area: Area
    operation: Operation = STANDARDIZE
    recovery: str = "affine"
    estimator: Estimator = BatchOnly()
    reduction: Reduction = Reduction()

    def __post_init__(self):
        if self.recovery not in RECOVERIES:
            raise ValueError(f"recovery={self.recovery!r} is unknown; expected one of {RECOVERIES}")

    # ----------------------------------------------------------------- shapes and state
    def resolve(self, shape: tuple[int, ...]) -> Resolved:
        """The area for an input of ``shape``; ValueError where the configuration does not fit."""
        resolved = self.area.resolve(shape)
        if self.estimator.running and self.area.kind in PER_SAMPLE_AREAS:
            raise ValueError(
                f"estimator {type(self.estimator).__name__} keeps running statistics, which need "
                f"statistics shared by all samples (area 'batch' or 'axes'); "
                f"area={self.area.kind!r} gives each sample its own"
            )
        return resolved

    def param_shapes(self, shape: tuple[int, ...]) -> dict[str, tuple[int, ...]]:
        """``{"scale": ..., "bias": ...}``: the recovery's params for an input of ``shape``."""
        return self.operation.param_shapes(self.resolve(shape), self.recovery)

    def init_stats(self, shape: tuple[int, ...], dtype: Any = jnp.float32) -> Stats:
        """Initial running statistics for inputs of ``shape`` (``{}`` without an estimator
        that keeps them); float32 unless ``dtype`` says otherwise."""
        if not self.estimator.running:
            return {}
        resolved = self.resolve(shape)
        return self.estimator.init(self.operation.init_stats(resolved, dtype))

    # ----------------------------------------------------------------- the transform
    def apply(
        self,
        x: Array,
        stats: Stats | None = None,
        scale: Array | None = None,
        bias: Array | None = None,
        *,
        train: bool = True,
        mask: Array | None = None,
    ) -> tuple[Array, Stats | None]:
        """Normalizes ``x`` and returns ``(y, new_stats)``.

        Args:
          x: (N, ...) input, batch axis first.
          stats: running statistics (:meth:`init_stats`) when the estimator keeps them, else
            None (``{}`` is accepted too).
          scale, bias: the recovery's params (:meth:`param_shapes`), or None.
          train: normalize with this batch's statistics and update the running ones; False
            uses the estimator's inference statistics (no effect without running statistics).
          mask: optional bool array broadcastable to x: which elements count in the statistics.

        Returns:
          ``y`` like x (dtype: ``reduction.dtype``, else the promotion of x and params) and
          the new running statistics (``stats`` unchanged at inference; None without any).
        """
        check_floating(x)
        resolved = self.resolve(x.shape)
        op, estimator, reduction = self.operation, self.estimator, self.reduction
        self._check_params(scale, bias, resolved)
        if mask is not None:
            check_mask(mask, x.shape)
        if estimator.running:
            self._check_stats(stats, resolved)
        elif stats:
            raise ValueError(
                f"stats must be None: {type(estimator).__name__} keeps no running statistics "
                f"(area={self.area.kind!r})"
            )
        else:
            stats = None
        if _empty_batch(x):
            return jnp.zeros(x.shape, output_dtype(x, scale, bias, reduction.dtype)), stats
        self._check_nonempty(resolved)
        recovery = dict(recovery=self.recovery)
        if estimator.running and (not train or estimator.normalizes_with_running):
            given = estimator.inference(stats)
            return op.normalize_given(x, given, resolved, reduction, scale, bias, **recovery), stats
        if self.area.virtual_batch_size is not None:
            return self._ghost(x, stats, scale, bias, mask, resolved)
        if estimator.running and estimator.corrects_batch:
            batch = op.statistics(x, resolved, reduction, mask)
            given = estimator.correct(stats, batch, reduction.epsilon)
            y = op.normalize_given(x, given, resolved, reduction, scale, bias, **recovery)
            return y, estimator.update(stats, self._observed(batch, resolved, mask))
        y, batch = op.normalize(x, resolved, reduction, scale, bias, mask, **recovery)
        if not estimator.running:
            return y, None
        return y, estimator.update(stats, self._observed(batch, resolved, mask))

    def _observed(self, batch: Stats, resolved: Resolved, mask: Array | None) -> Stats:
        """What the running statistics see of the batch (PyTorch's unbiased variance when the
        estimator asks: ``n`` = the elements behind each statistic, on this device)."""
        if not self.estimator.unbiased:
            return batch
        if mask is not None:
            raise ValueError("an unbiased running variance needs the element count of each "
                             "statistic; with a mask it varies: pass unbiased=False")
        return self.estimator.observed(batch, resolved.count)

    def _ghost(self, x, stats, scale, bias, mask, resolved: Resolved):
        """Training with ghost batches (Hoffer et al. 2017): each chunk of
        ``virtual_batch_size`` samples normalized with its own statistics, exactly as this
        normalizer applied to each chunk alone; the running statistics are updated once,
        with the chunks' average.

        Chunk statistics stay on each device (``axis_name`` does not join them: that is the
        point of ghost batches); with ``axis_name`` the chunks' average, and so the running
        statistics, are averaged over the devices too.
        """
        op, estimator, reduction = self.operation, self.estimator, self.reduction
        k = self.area.virtual_batch_size
        n = x.shape[0]
        if n % k:
            raise ValueError(f"virtual_batch_size={k} must divide the batch: an input of shape "
                             f"{x.shape} has {n} samples")
        if not hasattr(op, "keys") or op.name not in ("center", "scale", "standardize"):
            raise ValueError(f"virtual_batch_size works with center, scale and standardize; "
                             f"operation={op.name!r}")
        chunks = (n // k, k) + x.shape[1:]
        xg = jnp.reshape(x, chunks)
        inner = Area("axes", (0,) + tuple(a + 1 for a in resolved.feature_axes),
                     tuple(a + 1 for a in resolved.reduction_axes)).resolve(chunks)
        local = dataclasses.replace(reduction, axis_name=None, axis_index_groups=None)
        per_chunk = [None if p is None else jnp.broadcast_to(p, (n // k,) + jnp.shape(p))
                     for p in (scale, bias)]
        mask_g = None if mask is None else jnp.reshape(jnp.broadcast_to(mask, x.shape), chunks)
        if estimator.running and estimator.corrects_batch:
            batch = op.statistics(xg, inner, local, mask_g)
            given = estimator.correct(stats, batch, reduction.epsilon)
            y = op.normalize_given(xg, given, inner, local, *per_chunk, recovery=self.recovery)
        else:
            y, batch = op.normalize(xg, inner, local, *per_chunk, mask_g, recovery=self.recovery)
        y = jnp.reshape(y, x.shape)
        if not estimator.running:
            return y, None
        average = {key: jnp.mean(v, axis=0) for key, v in batch.items()}
        if reduction.axis_name is not None:
            average = collective(jax.lax.pmean, average, reduction.axis_name,
                                 reduction.axis_index_groups)
        return y, estimator.update(stats, self._observed(average, inner, mask))

    # ----------------------------------------------------------------- checks
    def _check_params(self, scale, bias, resolved: Resolved) -> None:
        expected = self.operation.param_shapes(resolved, self.recovery)
        for name, value in (("scale", scale), ("bias", bias)):
            if value is None:
                continue
            if name not in expected:
                raise ValueError(f"{name} was given but recovery={self.recovery!r} has no {name}")
            if tuple(jnp.shape(value)) != tuple(expected[name]):
                raise ValueError(
                    f"{name} has shape {tuple(jnp.shape(value))}; expected {tuple(expected[name])} "
                    f"for an input of shape {resolved.shape} (feature_axes="
                    f"{resolved.feature_axes}, recovery={self.recovery!r})"
                )

    def _check_stats(self, stats: Any, resolved: Resolved) -> None:
        template = self.estimator.init(self.operation.init_stats(resolved))
        if not isinstance(stats, dict) or set(stats) != set(template):
            got = sorted(stats) if isinstance(stats, dict) else type(stats).__name__
            raise ValueError(
                f"stats has keys {got}; expected a dict with keys {sorted(template)} "
                f"(see Normalizer.init_stats, init_batch_stats or init_whitening_stats)"
            )
        for key, value in template.items():
            if tuple(jnp.shape(stats[key])) != value.shape:
                raise ValueError(
                    f"stats[{key!r}] has shape {tuple(jnp.shape(stats[key]))}; expected "
                    f"{value.shape} for an input of shape {resolved.shape}"
                )

    def _check_nonempty(self, resolved: Resolved) -> None:
        if resolved.count == 0 and math.prod(resolved.stat_shape) > 0:
            raise ValueError(
                f"the statistics of area={self.area.kind!r} span axes {resolved.reduction_axes} "
                f"of an input of shape {resolved.shape}, which hold no elements: the "
                "statistics are undefined"
            )


def _empty_batch(x: Array) -> bool:
    """A batch with no samples: the output is empty and running statistics stay as they are."""
    return x.ndim > 0 and x.shape[0] == 0
