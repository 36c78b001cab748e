"""The one linen base of every normzoo layer: declare the variables, then compute.

A layer is a flax dataclass with its fields and four small methods, the protocol that both
Flax APIs run (:class:`Layer`; the NNX base, :mod:`normzoo.nnx.base`, calls the same methods
of an unbound twin, so both APIs declare the same variables and compute the same numbers):

* ``feature_shape(shape)``: the sizes of the feature axes of an input of ``shape``;
* ``param_specs(shape)``: ``[(name, init, shape)]``, the params, in flax's order;
* ``init_stats(shape)``: the initial running statistics (``batch_stats``), ``{}`` if none;
* ``compute(x, params, stats, *, train, mask)``: ``(y, new_stats)``.

The normalizers of the taxonomy get all four from one method, ``normalizer(shape)``, that
returns the :class:`~normzoo.functional.engine.Normalizer` their fields describe
(:class:`Normalization`: ``params`` ``scale`` (or ``coloring``) then ``bias``;
``batch_stats`` the estimator's, float32 unless ``force_float32_reductions`` is False).
No normalization math lives here.

Field names the base reads when a layer has them (flax.linen's): ``use_running_average``,
``use_scale``, ``use_bias``, ``scale_init``, ``bias_init``, ``param_dtype``, ``axis_name``,
``force_float32_reductions``; and ``coloring_init`` for a coloring recovery.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax.linen.module import merge_param
from jax.nn import initializers

from normzoo.functional.axes import check_floating
from normzoo.functional.engine import Normalizer
from normzoo.functional.reduction import Reduction

Array = jax.Array
Stats = dict[str, Array]
#: ``(name, init, shape)`` of one param.
Spec = tuple[str, Callable[..., Any], tuple[int, ...]]


def identity_init(key: Any, shape: Any, dtype: Any = jnp.float32) -> Array:
    """Identity matrices of ``shape`` (..., g, g): the coloring matrices' initial value."""
    del key
    return jnp.broadcast_to(jnp.eye(shape[-1], dtype=dtype), tuple(shape))


class Layer(nn.Module):
    """Base class of the protocol (module docstring): declares the variables, calls ``compute``."""

    def feature_shape(self, shape: Sequence[int]) -> tuple[int, ...]:
        raise NotImplementedError

    def param_specs(self, shape: Sequence[int]) -> list[Spec]:
        raise NotImplementedError

    def init_stats(self, shape: Sequence[int]) -> Stats:
        """Initial running statistics (``batch_stats``); none by default."""
        return {}

    def compute(self, x: Array, params: dict[str, Array], stats: Stats | None, *,
                train: bool, mask: Array | None = None) -> tuple[Array, Stats | None]:
        raise NotImplementedError

    def _apply(self, x: Array, use_running_average: bool | None = None,
               mask: Array | None = None) -> Array:
        check_floating(x)
        initial = self.init_stats(x.shape)
        train = True
        if initial:
            train = not merge_param(
                "use_running_average", getattr(self, "use_running_average", None),
                use_running_average,
            )
        variables = {k: self.variable("batch_stats", k, lambda v=v: v) for k, v in initial.items()}
        param_dtype = getattr(self, "param_dtype", jnp.float32)
        params = {name: self.param(name, init, shape, param_dtype)
                  for name, init, shape in self.param_specs(x.shape)}
        initializing = self.is_initializing()
        layer = self
        if initial and initializing and getattr(self, "axis_name", None) is not None:
            # As flax.linen.BatchNorm: the statistics of the init call stay on this device.
            layer = self.clone(parent=None, axis_name=None)
        y, new_stats = layer.compute(
            x, params, {k: v.value for k, v in variables.items()} or None, train=train,
            **({} if mask is None else {"mask": mask}))
        if initial and train and not initializing:
            for k, v in variables.items():
                v.value = new_stats[k]
        return y


class Normalization(Layer):
    """A point of the taxonomy: subclasses declare fields and implement :meth:`normalizer`."""

    def normalizer(self, shape: Sequence[int]) -> Normalizer:
        """The normalizer these fields describe, for inputs of ``shape``."""
        raise NotImplementedError

    def reduction(self) -> Reduction:
        """The reduction options from the flax fields of that name (defaults where absent)."""
        fields = {f.name for f in dataclasses.fields(Reduction)}
        return Reduction(**{k: getattr(self, k) for k in fields if hasattr(self, k)})

    def feature_shape(self, shape: Sequence[int]) -> tuple[int, ...]:
        return self.normalizer(shape).resolve(tuple(shape)).param_shape

    def param_specs(self, shape: Sequence[int]) -> list[Spec]:
        """The recovery's params: ``scale`` (``coloring`` for a coloring recovery) when
        ``use_scale`` (default True), then ``bias`` when ``use_bias`` (default False), as the
        recovery has them; inits from the ``{name}_init`` fields (ones / zeros by default)."""
        norm = self.normalizer(shape)
        shapes = norm.param_shapes(tuple(shape))
        specs = []
        for key, used in (("scale", getattr(self, "use_scale", True)),
                          ("bias", getattr(self, "use_bias", False))):
            if not used or key not in shapes:
                continue
            name = "coloring" if norm.recovery == "coloring" and key == "scale" else key
            default = initializers.ones if key == "scale" else initializers.zeros
            specs.append((name, getattr(self, f"{name}_init", default), tuple(shapes[key])))
        return specs

    def init_stats(self, shape: Sequence[int]) -> Stats:
        return self.normalizer(shape).init_stats(tuple(shape), stats_dtype(self))

    def compute(self, x: Array, params: dict[str, Array], stats: Stats | None, *,
                train: bool, mask: Array | None = None) -> tuple[Array, Stats | None]:
        scale = params.get("scale", params.get("coloring"))
        return self.normalizer(x.shape).apply(x, stats, scale, params.get("bias"),
                                              train=train, mask=mask)


def stats_dtype(layer: Any) -> Any:
    """dtype of the running statistics: float32, or ``param_dtype`` when the layer's
    ``force_float32_reductions`` is False."""
    if getattr(layer, "force_float32_reductions", True):
        return jnp.float32
    return getattr(layer, "param_dtype", jnp.float32)


class WithRunningAverage(Normalization):
    """A layer whose call takes ``use_running_average`` (flax.linen.BatchNorm's signature)."""

    @nn.compact
    def __call__(
        self, x: Array, use_running_average: bool | None = None, *, mask: Array | None = None
    ) -> Array:
        """Normalizes ``x`` (N, ..., C); ``mask`` (broadcastable to x) selects what counts."""
        return self._apply(x, use_running_average, mask)


class Stateless(Normalization):
    """A layer whose call takes ``x`` and ``mask`` only (flax.linen.LayerNorm's signature)."""

    @nn.compact
    def __call__(self, x: Array, *, mask: Array | None = None) -> Array:
        """Normalizes ``x`` (N, ..., C); ``mask`` (broadcastable to x) selects what counts."""
        return self._apply(x, None, mask)
