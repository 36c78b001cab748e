"""The normalization-activation layers as ``flax.nnx`` modules: each is its linen twin's fields.

``FilterResponseNorm(num_features, *, fields..., rngs)`` and so on: ``num_features`` first, the
twin's (:mod:`normzoo.linen.activation`) fields by keyword, then ``rngs`` (and flax.nnx's
``promote_dtype``, ``scale_metadata``, ``bias_metadata``). The variables are the twin's,
declared by the twin's own ``param_specs`` / ``init_stats`` for a nominal input with
``num_features`` on the feature axis (``nnx.Param``; EvoNormB0's ``var`` an
``nnx.BatchStat``, float32), and the call runs the twin's ``compute``: the same variables and
the same numbers as linen, written once. A variable along the feature axes is stored flat,
``(num_features,)``, as flax.nnx, and reshaped to the input's feature axes at the call.

``EvoNormB0`` has ``use_running_average`` (default False), set by ``model.train()`` /
``model.eval()`` and ``nnx.view(model, use_running_average=...)``; the call argument overrides
it.

    >>> from flax import nnx
    >>> import normzoo.nnx.activation as za
    >>> frn = za.FilterResponseNorm(64, rngs=nnx.Rngs(0))
    >>> b0 = za.EvoNormB0(64, momentum=0.9, rngs=nnx.Rngs(0))
    >>> y = b0(x); b0.eval(); y = b0(x)
"""

from __future__ import annotations

from types import MappingProxyType
from typing import Any, ClassVar, Mapping

import jax

from normzoo.linen import activation as linen
from normzoo.nnx.base import Normalization

Array = jax.Array


class StatelessActivation(Normalization):
    """A layer called as ``layer(x)``."""

    def __call__(self, x: Array) -> Array:
        """Applies the layer to ``x`` (N, ..., C)."""
        return self._apply(x)


class FilterResponseNorm(StatelessActivation, linen=linen.FilterResponseNorm):
    """FRN + TLU (Singh & Krishnan 2020); fields as
    :class:`normzoo.linen.activation.FilterResponseNorm`.

    Variables: ``scale``, ``bias``, ``tau`` (``nnx.Param``, (num_features,)); ``eps`` () with
    ``learned_epsilon``.
    """


class TLU(StatelessActivation, linen=linen.TLU):
    """``max(x, tau)``; fields as :class:`normzoo.linen.activation.TLU`. Variables: ``tau``."""


class EvoNormB0(Normalization, linen=linen.EvoNormB0):
    """EvoNorm-B0 (Liu et al. 2020); fields as :class:`normzoo.linen.activation.EvoNormB0`.

    Variables: ``scale``, ``bias``, ``v`` (``nnx.Param``, (num_features,)); ``var``
    (``nnx.BatchStat``, (num_features,), float32). ``use_running_average`` defaults to False.
    """

    defaults: ClassVar[Mapping[str, Any]] = MappingProxyType({"use_running_average": False})

    def __call__(self, x: Array, use_running_average: bool | None = None) -> Array:
        """Applies EvoNorm-B0 to ``x`` (N, ..., C); the argument overrides the attribute."""
        return self._apply(x, use_running_average)

    def set_view(self, use_running_average: bool | None = None):
        """Used by ``nnx.view``.

        Args:
          use_running_average: if True, the stored running variance is used instead of the
            batch variance of the input.
        """
        if use_running_average is not None:
            self.use_running_average = use_running_average


class EvoNormS0(StatelessActivation, linen=linen.EvoNormS0):
    """EvoNorm-S0 (Liu et al. 2020); fields as :class:`normzoo.linen.activation.EvoNormS0`.

    Variables: ``scale``, ``bias``, ``v`` (``nnx.Param``, (num_features,)).
    """


class LocalResponseNorm(StatelessActivation, linen=linen.LocalResponseNorm):
    """LRN (PyTorch's formula); ``LocalResponseNorm(num_features, size=5, rngs=...)``, fields as
    :class:`normzoo.linen.activation.LocalResponseNorm`. No variables."""


class DyT(StatelessActivation, linen=linen.DyT):
    """Dynamic Tanh (Zhu et al. 2025); fields as :class:`normzoo.linen.activation.DyT`.

    Variables: ``alpha`` (), ``scale``, ``bias`` (``nnx.Param``, (num_features,)).
    """


#: Each linen layer class of :mod:`normzoo.linen.activation` and its NNX twin.
TWINS: dict[type, type] = {
    cls.linen: cls
    for cls in (FilterResponseNorm, TLU, EvoNormB0, EvoNormS0, LocalResponseNorm, DyT)
}
