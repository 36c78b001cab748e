"""Pick a normalization layer by name, as experiments and command lines do.

    >>> from normzoo import registry
    >>> layer = registry.make("bn", use_running_average=False, momentum=0.9)
    >>> variables = layer.init(jax.random.key(0), x)
    >>> layer = registry.make("bn", api="nnx", num_features=64, rngs=nnx.Rngs(0))

``use_running_average`` is forwarded to the layers that keep running statistics
(``registry.is_stateful(name)``) and dropped for the others, so a model can treat every
name alike. Keyword overrides go to the layer's constructor. ``api="nnx"`` builds the
:mod:`normzoo.nnx` twin of the same entry (``num_features`` and ``rngs`` then required).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable

import flax.linen as nn
from flax import nnx

from normzoo.linen import (
    BatchNorm,
    BatchRenorm,
    Centering,
    CholeskyWhitening,
    DecorrelatedBatchNorm,
    DyT,
    EvoNormB0,
    EvoNormS0,
    FilterResponseNorm,
    GroupNorm,
    GroupWhitening,
    InstanceNorm,
    IterNorm,
    LayerNorm,
    LocalResponseNorm,
    PCAWhitening,
    RMSNorm,
    Scaling,
    SwitchableNorm,
    ZCAWhitening,
)


class Identity(nn.Module):
    """The ``none`` normalizer: returns its input unchanged."""

    @nn.compact
    def __call__(self, x, *, mask=None):
        return x


class IdentityNNX(nnx.Module):
    """The ``none`` normalizer in NNX (``num_features`` and ``rngs`` accepted and unused)."""

    def __init__(self, num_features: int | None = None, *, rngs: nnx.Rngs | None = None):
        self.num_features = num_features

    def __call__(self, x, *, mask=None):
        return x


APIS = ("linen", "nnx")


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


def make(name: str, *, use_running_average: bool | None = None, api: str = "linen",
         num_features: int | None = None, rngs: nnx.Rngs | None = None,
         **overrides: Any) -> nn.Module | nnx.Module:
    """Builds the layer ``name`` with constructor ``overrides``.

    ``use_running_average`` goes to stateful layers only (see :func:`is_stateful`).
    ``api``: ``"linen"`` (a flax.linen module) or ``"nnx"`` (its :mod:`normzoo.nnx` twin,
    built with ``num_features`` and ``rngs``; ``use_running_average=None`` keeps the NNX
    default, training mode).
    """
    entry = _get(name)
    if api not in APIS:
        raise ValueError(f"api={api!r} is unknown; expected one of {APIS}")
    if api == "linen":
        if num_features is not None or rngs is not None:
            raise TypeError("num_features and rngs are for api='nnx'; linen layers infer "
                            "their features from the input")
        if entry.stateful:
            overrides["use_running_average"] = use_running_average
        return entry.factory(**overrides)
    if num_features is None or rngs is None:
        raise TypeError(f"api='nnx' needs num_features and rngs (got num_features="
                        f"{num_features!r}, rngs={rngs!r})")
    if entry.stateful and use_running_average is not None:
        overrides["use_running_average"] = use_running_average
    return nnx_factory(entry.factory)(num_features, rngs=rngs, **overrides)


def nnx_factory(factory: Callable[..., Any]) -> Callable[..., Any]:
    """The NNX twin of a linen factory: a layer class, or a ``functools.partial`` of one."""
    # normzoo.nnx imports normzoo.linen: imported on use
    from normzoo.nnx import ACTIVATION_TWINS, TWINS

    twins = {**TWINS, **ACTIVATION_TWINS}

    if factory is Identity:
        return IdentityNNX
    if isinstance(factory, functools.partial):
        return functools.partial(nnx_factory(factory.func), *factory.args, **factory.keywords)
    if factory not in twins:
        raise ValueError(f"{factory!r} has no normzoo.nnx twin; register a linen class of "
                         "normzoo.linen (or a functools.partial of one)")
    return twins[factory]


register("none", Identity, stateful=False, description="no normalization (identity)")
register("bn", BatchNorm, stateful=True, description="BatchNorm (Ioffe & Szegedy 2015)")
register("brn", BatchRenorm, stateful=True,
         description="Batch Renorm: r_max 3, d_max 5 (Ioffe 2017)")
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
register(
    "frn",
    FilterResponseNorm,
    stateful=False,
    description="FilterResponseNorm + TLU: max(g x / sqrt(E_HW[x^2] + eps) + b, tau) "
    "(Singh & Krishnan 2020)",
)
register(
    "evonorm_b0",
    EvoNormB0,
    stateful=True,
    description="EvoNorm-B0: x / max(sqrt(var_B + eps), v x + sqrt(var_I + eps)) g + b "
    "(Liu et al. 2020)",
)
register(
    "evonorm_s0",
    EvoNormS0,
    stateful=False,
    description="EvoNorm-S0: x sigmoid(v x) / sqrt(var_G + eps) g + b, 32 groups (Liu et al. 2020)",
)
register(
    "lrn",
    functools.partial(LocalResponseNorm, size=5, alpha=5e-4, beta=0.75, k=2.0),
    stateful=False,
    description="LocalResponseNorm with AlexNet's n=5, k=2, beta=0.75, alpha=1e-4 (not divided "
    "by n; PyTorch's alpha 5e-4) (Krizhevsky et al. 2012)",
)
register("dyt", DyT, stateful=False,
         description="Dynamic Tanh: g tanh(alpha x) + b (Zhu et al. CVPR 2025)")
register(
    "sn",
    SwitchableNorm,
    stateful=True,
    description="Switchable Norm: IN, LN and BN statistics mixed by learned softmax weights "
    "(Luo et al. ICLR 2019)",
)
register(
    "gw",
    GroupWhitening,
    stateful=False,
    description="Group whitening: per sample, the G channel groups ZCA-whitened, G = 64 "
    "(at most C) (Huang et al. CVPR 2021)",
)
