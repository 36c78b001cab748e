"""Estimators: which statistics a normalizer uses at inference and how its running ones update.

An estimator is a small frozen object (optax's style): :meth:`Estimator.init` adds its own
state to a fresh dict of statistics, :meth:`Estimator.update` folds one batch's statistics
into the running ones, :meth:`Estimator.inference` returns what inference normalizes with.
Every update is a convex combination ``running <- (1 - w) running + w batch``:

=====================  ============================  ==================================  =========
estimator              weight ``w`` at step ``t``    running statistic after ``t`` steps state
=====================  ============================  ==================================  =========
:class:`BatchOnly`     (none: no running stats)      (batch statistics at inference too)
:class:`EMA`           ``1 - momentum``              Flax: ``m r + (1 - m) b``, from init
:class:`DebiasedEMA`   ``(1-m) / (1-m^t)``           the EMA of the batches alone         ``count``
:class:`Cumulative`    ``1 / t``                     the plain average of all batches     ``count``
:class:`Population`    0 (never updated)             the given statistics, train and eval
=====================  ============================  ==================================  =========

``DebiasedEMA`` is the EMA started from zero and divided by ``1 - m^t`` (Kingma & Ba's bias
correction), written as the incremental update above so that the stored value is the
estimate itself: at ``t = 1`` it is the first batch's statistics exactly, whatever the
initial value (Equinox's ``mode="batch"`` starts its variance at 1 and divides, which is
biased early on). ``Cumulative`` is ``momentum=None`` of PyTorch's BatchNorm.

``skip_nonfinite=True`` keeps every running statistic (and the count) as it was when any
statistic of the batch is not finite (a NaN or inf batch, a diverging step), so one bad
batch cannot poison inference. Off by default, so ``EMA`` equals flax.linen exactly.

Batch Renorm (Ioffe 2017) is an estimator too (:class:`Renorm`): an EMA whose training
step also corrects the batch statistics it normalizes with (:meth:`Estimator.correct`, the
engine's general path: statistics, then normalization with given statistics).
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import jax
import jax.numpy as jnp

from normzoo.functional.axes import check_momentum

Array = jax.Array
Stats = dict[str, Array]

#: Key of the number of updates, for estimators whose weight depends on it.
COUNT = "count"


@dataclasses.dataclass(frozen=True)
class Estimator:
    """Batch statistics only (base class): no running statistics; inference = training."""

    #: Whether the estimator keeps running statistics (``batch_stats``).
    running: ClassVar[bool] = False
    #: Whether training normalizes with the running statistics too (given statistics).
    normalizes_with_running: ClassVar[bool] = False
    #: Whether the state carries :data:`COUNT`.
    counts: ClassVar[bool] = False
    #: Whether training normalizes with :meth:`correct` of the batch statistics.
    corrects_batch: ClassVar[bool] = False

    skip_nonfinite: bool = dataclasses.field(default=False, kw_only=True)
    #: Store the unbiased variance ``n / (n - 1) var_B`` (PyTorch's convention) in the
    #: running statistics; normalization in training still uses the biased ``var_B``.
    unbiased: bool = dataclasses.field(default=False, kw_only=True)

    def observed(self, batch: Stats, count: int) -> Stats:
        """The batch statistics the running ones are updated with: ``batch``, its ``var``
        times ``count / (count - 1)`` when :attr:`unbiased` (``count`` elements per
        statistic; one element gives the biased 0)."""
        if not self.unbiased or "var" not in batch or count < 2:
            return batch
        return {**batch, "var": batch["var"] * (count / (count - 1))}

    def init(self, stats: Stats) -> Stats:
        """``stats`` (the operation's initial statistics) with the estimator's own state."""
        if self.counts:
            return {**stats, COUNT: jnp.zeros((), jnp.int32)}
        return dict(stats)

    def weight(self, running: Stats) -> Any:
        """Weight of the new batch in the convex combination (module docstring)."""
        raise NotImplementedError

    def update(self, running: Stats, batch: Stats) -> Stats:
        """Running statistics after one batch (``batch`` has the operation's keys)."""
        w = self.weight(running)
        new = {k: _mix(running[k], batch[k], w) for k in batch}
        if self.counts:
            new[COUNT] = running[COUNT] + 1
        if not self.skip_nonfinite:
            return new
        finite = jnp.all(jnp.stack([jnp.all(jnp.isfinite(v)) for v in batch.values()]))
        return {k: jnp.where(finite, new[k], running[k]) for k in new}

    def inference(self, running: Stats) -> Stats:
        """The statistics inference normalizes with (the operation's keys)."""
        return {k: v for k, v in running.items() if k != COUNT}

    def correct(self, running: Stats, batch: Stats, epsilon: float) -> Stats:
        """The statistics training normalizes with, from this batch's (when
        :attr:`corrects_batch`); ``batch`` may carry leading chunk axes (ghost batches)."""
        return batch


def _mix(running: Array, batch: Array, w: Any) -> Array:
    """``(1 - w) running + w batch``, spelled as Flax's EMA when ``w = 1 - momentum``."""
    return (1 - w) * running + w * batch


@dataclasses.dataclass(frozen=True)
class BatchOnly(Estimator):
    """No running statistics: every call normalizes with its own batch (LN, GN, IN)."""


@dataclasses.dataclass(frozen=True)
class EMA(Estimator):
    """``running = momentum * running + (1 - momentum) * batch`` (Flax's convention)."""

    running: ClassVar[bool] = True
    momentum: Any = 0.99

    def __post_init__(self):
        if isinstance(self.momentum, (int, float)):
            check_momentum(self.momentum)

    def update(self, running: Stats, batch: Stats) -> Stats:
        m = self.momentum
        if self.skip_nonfinite:
            return super().update(running, batch)
        # Flax's own expression (same rounding as flax.linen.BatchNorm).
        return {k: m * running[k] + (1 - m) * batch[k] for k in batch}

    def weight(self, running: Stats) -> Any:
        return 1 - self.momentum


@dataclasses.dataclass(frozen=True)
class DebiasedEMA(EMA):
    """The bias-corrected EMA: the EMA of the batches seen, exact from the first step."""

    counts: ClassVar[bool] = True

    def update(self, running: Stats, batch: Stats) -> Stats:
        return Estimator.update(self, running, batch)

    def weight(self, running: Stats) -> Any:
        t = (running[COUNT] + 1).astype(jnp.float32)
        m = jnp.asarray(self.momentum, jnp.float32)
        return (1 - m) / (1 - m**t)


@dataclasses.dataclass(frozen=True)
class Cumulative(Estimator):
    """The plain average of every batch seen (PyTorch's ``momentum=None``)."""

    running: ClassVar[bool] = True
    counts: ClassVar[bool] = True

    def weight(self, running: Stats) -> Any:
        return 1.0 / (running[COUNT] + 1).astype(jnp.float32)


@dataclasses.dataclass(frozen=True)
class Population(Estimator):
    """Given (population) statistics, used in training and inference alike, never updated
    (frozen BatchNorm, as when fine-tuning with the statistics of pre-training)."""

    running: ClassVar[bool] = True
    normalizes_with_running: ClassVar[bool] = True

    def update(self, running: Stats, batch: Stats) -> Stats:
        return running


@dataclasses.dataclass(frozen=True)
class Renorm(EMA):
    """Batch Renormalization (Ioffe 2017, arXiv 1702.03275): BatchNorm's EMA, and in
    training the batch statistics corrected towards the running ones.

    With ``sigma = sqrt(var + eps)`` (running) and ``sigma_B = sqrt(var_B + eps)`` (batch),
    ``r = sg(clip(sigma_B / sigma, 1 / r_max, r_max))`` and
    ``d = sg(clip((mu_B - mu) / sigma, -d_max, d_max))`` (``sg``: stop_gradient), training
    computes ``(x - mu_B) / sigma_B * r + d``; inference uses the running statistics as
    BatchNorm. ``r_max = 1, d_max = 0`` is BatchNorm. ``r_max`` / ``d_max`` are numbers or
    schedules ``f(step) -> value`` of the update count kept in ``count`` (see
    :func:`renorm_warmup`, the paper's).

    The correction is given to the engine as statistics: ``mean' = mu_B - d sigma_B / r`` and
    ``var' = sigma_B^2 / r^2 - eps`` normalize to exactly the expression above, and the
    gradient flows through ``mu_B`` and ``sigma_B`` with ``r`` and ``d`` held constant, as the
    paper's.
    """

    counts: ClassVar[bool] = True
    corrects_batch: ClassVar[bool] = True
    r_max: Any = 3.0
    d_max: Any = 5.0

    def __post_init__(self):
        super().__post_init__()
        for name in ("r_max", "d_max"):
            value = getattr(self, name)
            if callable(value):
                continue
            low = 1.0 if name == "r_max" else 0.0
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value < low:
                raise ValueError(f"{name}={value!r} must be a number >= {low:g} or a schedule "
                                 "f(step) -> value")

    def update(self, running: Stats, batch: Stats) -> Stats:
        if self.skip_nonfinite:
            return Estimator.update(self, running, batch)
        new = EMA.update(self, running, batch)
        new[COUNT] = running[COUNT] + 1
        return new

    def correct(self, running: Stats, batch: Stats, epsilon: float) -> Stats:
        if set(batch) != {"mean", "var"}:
            raise ValueError(f"Batch Renorm corrects a mean and a variance (operation "
                             f"'standardize'); got statistics {sorted(batch)}")
        step = running[COUNT]
        r_max = jnp.asarray(_at(self.r_max, step), jnp.float32)
        d_max = jnp.asarray(_at(self.d_max, step), jnp.float32)
        sigma = jnp.sqrt(running["var"] + epsilon)
        sigma_b = jnp.sqrt(batch["var"] + epsilon)
        r = jax.lax.stop_gradient(jnp.clip(sigma_b / sigma, 1 / r_max, r_max))
        d = jax.lax.stop_gradient(
            jnp.clip((batch["mean"] - running["mean"]) / sigma, -d_max, d_max))
        return {"mean": batch["mean"] - d * sigma_b / r,
                "var": (batch["var"] + epsilon) / (r * r) - epsilon}


def _at(value: Any, step: Array) -> Any:
    """A number, or a schedule's value at ``step``."""
    return value(step) if callable(value) else value


def renorm_warmup(start: float, end: float, begin: int, until: int):
    """``f(step)``: ``start`` until step ``begin``, then linear to ``end`` at step ``until``.

    The paper's schedules (Ioffe 2017, section 4): ``r_max = renorm_warmup(1, 3, 5000,
    40000)``, ``d_max = renorm_warmup(0, 5, 5000, 25000)``.
    """
    if not 0 <= begin < until:
        raise ValueError(f"renorm_warmup needs 0 <= begin < until; got begin={begin!r}, "
                         f"until={until!r}")
    return _Warmup(float(start), float(end), int(begin), int(until))


@dataclasses.dataclass(frozen=True)
class _Warmup:
    """A hashable linear warm-up (module fields must be hashable)."""

    start: float
    end: float
    begin: int
    until: int

    def __call__(self, step: Array) -> Array:
        t = jnp.clip((jnp.asarray(step, jnp.float32) - self.begin) / (self.until - self.begin),
                     0.0, 1.0)
        return self.start + t * (self.end - self.start)


#: Names of the estimators, as layers' ``estimator=`` fields take them.
ESTIMATORS = {
    "batch": BatchOnly,
    "ema": EMA,
    "debiased_ema": DebiasedEMA,
    "cumulative": Cumulative,
    "population": Population,
    "renorm": Renorm,
}


def make_estimator(name: str, *, momentum: Any = 0.99, skip_nonfinite: bool = False,
                   unbiased: bool = False) -> Estimator:
    """The estimator called ``name`` (a key of :data:`ESTIMATORS`)."""
    if name not in ESTIMATORS:
        raise ValueError(f"estimator={name!r} is unknown; expected one of {tuple(ESTIMATORS)}")
    cls = ESTIMATORS[name]
    options = dict(skip_nonfinite=skip_nonfinite, unbiased=unbiased)
    if issubclass(cls, EMA):
        return cls(momentum=momentum, **options)
    return cls(**options)
