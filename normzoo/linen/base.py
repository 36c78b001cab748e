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
        param_dtype = getattr(self, "param_dtype", jnp.float32)
        variables = {
            k: self.variable("batch_stats", k, lambda v=v: v)
            for k, v in norm.init_stats(x.shape, stats_dtype(self)).items()
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
        declared = {
            key: self.param(name, init, shape_, param_dtype)
            for key, name, init, shape_ in param_specs(self, norm, shape)
        }
        return declared.get("scale"), declared.get("bias")


def stats_dtype(layer: Any) -> Any:
    """dtype of the running statistics: float32, or ``param_dtype`` when the layer's
    ``force_float32_reductions`` is False."""
    if getattr(layer, "force_float32_reductions", True):
        return jnp.float32
    return getattr(layer, "param_dtype", jnp.float32)


def param_specs(layer: Any, norm: Normalizer, shape: Sequence[int]) -> list[tuple]:
    """``[(key, name, init, shape)]``: the params a layer declares, in flax's order.

    ``key`` is ``"scale"`` or ``"bias"`` (the engine's argument); ``name`` the variable's name
    (``"coloring"`` for the scale of a coloring recovery); ``init`` the layer's
    ``{name}_init`` field (ones / zeros by default). A param is declared when the layer's
    ``use_scale`` (default True) / ``use_bias`` (default False) says so and the recovery has it.
    Shared by the linen and NNX bases, so both declare the same variables.
    """
    shapes = norm.param_shapes(tuple(shape))
    coloring = norm.recovery == "coloring"
    specs = []
    for key, used in (("scale", getattr(layer, "use_scale", True)),
                      ("bias", getattr(layer, "use_bias", False))):
        if not used or key not in shapes:
            continue
        name = "coloring" if coloring and key == "scale" else key
        default = initializers.ones if key == "scale" else initializers.zeros
        specs.append((key, name, getattr(layer, f"{name}_init", default), tuple(shapes[key])))
    return specs


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
