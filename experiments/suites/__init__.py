"""The comparison suites, by command-line name. Each module has ``NAME``, ``DEFAULTS``, ``QUICK``
and ``run(ctx) -> SuiteReport``; its docstring states the seed claim it checks."""
from __future__ import annotations

from types import ModuleType

from experiments.suites import (
    batch_size,
    covariate_shift,
    hparam_search,
    init_scale,
    lr_robustness,
    no_norm,
    overfitting,
    placement,
    small_batch,
    train_vs_eval,
    whitening,
)

SUITES: dict[str, ModuleType] = {
    m.NAME: m
    for m in (
        init_scale,
        overfitting,
        hparam_search,
        batch_size,
        whitening,
        covariate_shift,
        placement,
        train_vs_eval,
        lr_robustness,
        small_batch,
        no_norm,
    )
}
