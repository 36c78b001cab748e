"""The one linen base of every normzoo layer: params and ``batch_stats`` for a Normalizer.

A layer is a flax dataclass with its fields and one method, ``normalizer(shape)``, that
returns the :class:`~normzoo.functional.engine.Normalizer` those fields describe. The base
declares what the normalizer needs (``params``: ``scale`` (or ``coloring``) then ``bias``;
``batch_stats``: the estimator's running statistics, float32 unless
``force_float32_reductions`` is False) and calls it. No normalization math lives here.

Field names the base reads when a layer has them (flax.linen's): ``use_running_average``,
``use_scale``, ``use_bias``, ``scale_init``, ``bias_init``, ``param_dtype``, ``axis_name``,
``force_float32_reductions``; and ``coloring_init`` for a coloring recovery.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax.linen.module import merge_param
from jax.nn import initializers

from normzoo.functional.axes import check_floating
from normzoo.functional.engine import Normalizer
from normzoo.functional.reduction import Reduction

Array = jax.Array


def identity_init(key: Any, shape: Any, dtype: Any = jnp.float32) -> Array:
    """Identity matrices of ``shape`` (..., g, g): the coloring matrices' initial value."""
    del key
    return jnp.broadcast_to(jnp.eye(shape[-1], dtype=dtype), tuple(shape))


class Normalization(nn.Module):
    """Base class: subclasses declare fields and implement :meth:`normalizer`."""

    def normalizer(self, shape: Sequence[int]) -> Normalizer:
        """The normalizer these fields describe, for inputs of ``shape``."""
        raise NotImplementedError

    def reduction(self) -> Reduction:
        """The reduction options from the flax fields of that name (defaults where absent)."""
        fields = {f.name for f in dataclasses.fields(Reduction)}
        return Reduction(**{k: getattr(self, k) for k in fields if hasattr(self, k)})

    def _normalize(self, x: Array, use_running_average: bool | None, mask: Array | None) -> Array:
        check_floating(x)
        norm = self.normalizer(x.shape)
        running = norm.estimator.running
        train = True
        if running:
            train = not merge_param(
                "use_running_average", getattr(self, "use_running_average", None),
                use_running_average,
            )
        initializing = self.is_initializing()
        if running and initializing and norm.reduction.axis_name is not None:
            # As flax.linen: statistics of the init call stay on this device.
            norm = dataclasses.replace(
                norm, reduction=dataclasses.replace(norm.reduction, axis_name=None))
        float32 = getattr(self, "force_float32_reductions", True)
        param_dtype = getattr(self, "param_dtype", jnp.float32)
        stats_dtype = jnp.float32 if float32 else param_dtype
        variables = {
            k: self.variable("batch_stats", k, lambda v=v: v)
            for k, v in norm.init_stats(x.shape, stats_dtype).items()
        }
        scale, bias = self._params(norm, x.shape, param_dtype)
        y, new_stats = norm.apply(
            x, {k: v.value for k, v in variables.items()} or None, scale, bias,
            train=train, mask=mask,
        )
        if running and train and not initializing:
            for k, v in variables.items():
                v.value = new_stats[k]
        return y

    def _params(self, norm: Normalizer, shape, param_dtype) -> tuple[Array | None, Array | None]:
        shapes = norm.param_shapes(shape)
        coloring = norm.recovery == "coloring"
        declared = []
        for key, used in (("scale", getattr(self, "use_scale", True)),
                          ("bias", getattr(self, "use_bias", False))):
            if not used or key not in shapes:
                declared.append(None)
                continue
            name = "coloring" if coloring and key == "scale" else key
            default = initializers.ones if key == "scale" else initializers.zeros
            init = getattr(self, f"{name}_init", default)
            declared.append(self.param(name, init, tuple(shapes[key]), param_dtype))
        return declared[0], declared[1]


class WithRunningAverage(Normalization):
    """A layer whose call takes ``use_running_average`` (flax.linen.BatchNorm's signature)."""

    @nn.compact
    def __call__(
        self, x: Array, use_running_average: bool | None = None, *, mask: Array | None = None
    ) -> Array:
        """Normalizes ``x`` (N, ..., C); ``mask`` (broadcastable to x) selects what counts."""
        return self._normalize(x, use_running_average, mask)


class Stateless(Normalization):
    """A layer whose call takes ``x`` and ``mask`` only (flax.linen.LayerNorm's signature)."""

    @nn.compact
    def __call__(self, x: Array, *, mask: Array | None = None) -> Array:
        """Normalizes ``x`` (N, ..., C); ``mask`` (broadcastable to x) selects what counts."""
        return self._normalize(x, None, mask)
