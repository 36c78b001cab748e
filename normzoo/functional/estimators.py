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

Batch Renorm (Ioffe 2017) fits here too: its estimator also corrects the batch statistics
used in training; the hook is :meth:`Estimator.normalizes_with_running` and the engine's
general path (statistics, then normalization with given statistics).
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

    skip_nonfinite: bool = dataclasses.field(default=False, kw_only=True)

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


#: Names of the estimators, as layers' ``estimator=`` fields take them.
ESTIMATORS = {
    "batch": BatchOnly,
    "ema": EMA,
    "debiased_ema": DebiasedEMA,
    "cumulative": Cumulative,
    "population": Population,
}


def make_estimator(name: str, *, momentum: Any = 0.99, skip_nonfinite: bool = False) -> Estimator:
    """The estimator called ``name`` (a key of :data:`ESTIMATORS`)."""
    if name not in ESTIMATORS:
        raise ValueError(f"estimator={name!r} is unknown; expected one of {tuple(ESTIMATORS)}")
    cls = ESTIMATORS[name]
    if issubclass(cls, EMA):
        return cls(momentum=momentum, skip_nonfinite=skip_nonfinite)
    return cls(skip_nonfinite=skip_nonfinite)
