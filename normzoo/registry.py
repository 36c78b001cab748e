"""Pick a normalization layer by name, as experiments and command lines do.

    >>> from normzoo import registry
    >>> layer = registry.make("bn", use_running_average=False, momentum=0.9)
    >>> variables = layer.init(jax.random.key(0), x)

``use_running_average`` is forwarded to the layers that keep running statistics
(``registry.is_stateful(name)``) and dropped for the others, so a model can treat every
name alike. Keyword overrides go to the layer's constructor.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable

import flax.linen as nn

from normzoo.linen import (
    BatchNorm,
    Centering,
    CholeskyWhitening,
    DecorrelatedBatchNorm,
    GroupNorm,
    InstanceNorm,
    IterNorm,
    LayerNorm,
    PCAWhitening,
    RMSNorm,
    Scaling,
    ZCAWhitening,
)


class Identity(nn.Module):
    """The ``none`` normalizer: returns its input unchanged."""

    @nn.compact
    def __call__(self, x, *, mask=None):
        return x


@dataclasses.dataclass(frozen=True)
class Entry:
    """A registered normalizer: how to build it and whether it keeps ``batch_stats``."""

    name: str
    factory: Callable[..., nn.Module]
    stateful: bool
    description: str


_REGISTRY: dict[str, Entry] = {}


def register(
    name: str, factory: Callable[..., nn.Module], *, stateful: bool, description: str
) -> None:
    """Adds (or replaces) ``name``; ``factory(**kwargs)`` returns a linen module."""
    _REGISTRY[name] = Entry(name, factory, stateful, description)


def names() -> list[str]:
    """Registered names, in registration order."""
    return list(_REGISTRY)


def describe(name: str) -> str:
    return _get(name).description


def is_stateful(name: str) -> bool:
    """Whether the layer keeps running statistics in ``batch_stats``."""
    return _get(name).stateful


def _get(name: str) -> Entry:
    if name not in _REGISTRY:
        raise ValueError(f"normalizer name={name!r} is unknown; expected one of {names()}")
    return _REGISTRY[name]


def make(name: str, *, use_running_average: bool | None = None, **overrides: Any) -> nn.Module:
    """Builds the layer ``name`` with constructor ``overrides``.

    ``use_running_average`` goes to stateful layers only (see :func:`is_stateful`).
    """
    entry = _get(name)
    if entry.stateful:
        overrides["use_running_average"] = use_running_average
    return entry.factory(**overrides)


register("none", Identity, stateful=False, description="no normalization (identity)")
register("bn", BatchNorm, stateful=True, description="BatchNorm (Ioffe & Szegedy 2015)")
register("ln", LayerNorm, stateful=False, description="LayerNorm (Ba et al. 2016)")
register("gn", GroupNorm, stateful=False, description="GroupNorm (Wu & He 2018)")
register("in", InstanceNorm, stateful=False, description="InstanceNorm (Ulyanov et al. 2016)")
register("rms", RMSNorm, stateful=False, description="RMSNorm (Zhang & Sennrich 2019)")
register(
    "center",
    functools.partial(Centering, area="batch"),
    stateful=True,
    description="mean-only BatchNorm: x - mu_B (Salimans & Kingma 2016)",
)
register(
    "scale",
    functools.partial(Scaling, area="batch"),
    stateful=True,
    description="mean-square BatchNorm: x / sqrt(E_B[x^2] + eps), no centering",
)

register(
    "zca",
    ZCAWhitening,
    stateful=True,
    description="ZCA batch whitening of all features: D Lambda^-1/2 D^T (Bell & Sejnowski 1997)",
)
register(
    "pca",
    PCAWhitening,
    stateful=True,
    description="PCA batch whitening Lambda^-1/2 D^T (baseline; stochastic axis swapping)",
)
register(
    "cholesky",
    CholeskyWhitening,
    stateful=True,
    description="Cholesky batch whitening L^-1 (Siarohin et al. 2019)",
)
register(
    "iternorm",
    IterNorm,
    stateful=True,
    description="IterNorm: 5 Newton-Schulz steps, groups of 64 (Huang et al. CVPR 2019)",
)
register(
    "dbn",
    DecorrelatedBatchNorm,
    stateful=True,
    description="Decorrelated BatchNorm: ZCA in groups of 16 (Huang et al. CVPR 2018)",
)
