"""The one NNX base of every normzoo layer: ``nnx.Param`` and ``nnx.BatchStat`` from a linen twin.

An NNX layer is its linen twin's configuration (the same fields with the same defaults and the
same methods of :class:`~normzoo.linen.base.Layer`: ``feature_shape``, ``param_specs``,
``init_stats``, ``compute``) plus what NNX needs up front:
``num_features`` (NNX creates params and statistics in ``__init__``, not at the first call),
``rngs`` and flax.nnx's ``promote_dtype`` / ``*_metadata`` arguments. So the two APIs cannot
drift apart: a layer is written once, in :mod:`normzoo.linen`, and both bases run the same
methods (for a normalizer of the taxonomy, the same
:class:`~normzoo.functional.engine.Normalizer`).

Variables, as flax.nnx: ``scale`` / ``coloring`` and ``bias`` are ``nnx.Param``; the
estimator's running statistics (``mean``, ``var``, ...) are ``nnx.BatchStat``, float32
unless ``force_float32_reductions`` is False. A variable that runs along the feature axes is
stored flat, shaped ``(num_features,)`` as in flax.nnx, and reshaped to the feature axes of
the input at the call (so several feature axes work as in flax.nnx); the whitening layers'
per-group matrices keep their ``(C/g, g, g)`` shape.

Modes: a layer with running statistics has ``use_running_average`` (default False, as
flax.nnx.BatchNorm), set by ``model.train()`` / ``model.eval()`` and ``nnx.view(model,
use_running_average=...)``; the call argument overrides it.
"""

from __future__ import annotations

import dataclasses
import inspect
import math
from types import MappingProxyType
from typing import Any, ClassVar, Mapping, Sequence

import jax
import jax.numpy as jnp
from flax import nnx
from flax.nnx.nn.dtypes import promote_dtype as flax_promote_dtype

from normzoo.functional.axes import canonicalize_axes, check_floating
from normzoo.functional.engine import Normalizer

Array = jax.Array

#: Fields of a linen module that are not configuration.
_LINEN_ONLY = ("parent", "name")
#: Arguments every NNX layer takes beside its twin's fields (flax.nnx's).
_NNX_KEYWORDS = ("promote_dtype", "rngs", "bias_metadata", "scale_metadata")


def nominal_shape(config: Any, num_features: int) -> tuple[int, ...]:
    """An input shape with ``num_features`` on the last feature axis and 1 elsewhere: the
    smallest shape on which ``config``'s axes (``axis`` / ``feature_axes`` /
    ``reduction_axes``) resolve. Params and statistics depend on the feature sizes only."""
    feature = getattr(config, "axis", getattr(config, "feature_axes", -1))
    named = [getattr(config, n, None) for n in ("axis", "feature_axes", "reduction_axes")]
    ints = [
        a for v in named if v is not None
        for a in (v if isinstance(v, Sequence) else (v,))
        if isinstance(a, int) and not isinstance(a, bool)
    ]
    ndim = max([2] + [a + 1 for a in ints if a >= 0] + [1 - a for a in ints if a < 0])
    name = "axis" if hasattr(config, "axis") else "feature_axes"
    features = canonicalize_axes(ndim, feature, name=name)
    shape = [1] * ndim
    shape[features[-1]] = num_features
    return tuple(shape)


class Normalization(nnx.Module):
    """Base class: a subclass names its linen twin, ``class X(Base, linen=normzoo.linen.X)``.

    ``__init__(num_features, *positional, rngs, promote_dtype=..., **fields)`` takes the twin's
    fields by keyword (``positional`` names those flax.nnx also takes by position, as
    GroupNorm's ``num_groups, group_size``); ``defaults`` overrides the twin's defaults where
    flax.nnx differs from flax.linen.
    """

    linen: ClassVar[type]
    positional: ClassVar[tuple[str, ...]] = ()
    defaults: ClassVar[Mapping[str, Any]] = MappingProxyType({})
    fields: ClassVar[tuple[str, ...]] = ()

    def __init_subclass__(cls, *, linen: type | None = None, positional: Sequence[str] = (),
                          **kwargs: Any):
        super().__init_subclass__(**kwargs)
        if linen is None:
            return
        cls.linen = linen
        cls.positional = tuple(positional)
        cls.fields = tuple(
            f.name for f in dataclasses.fields(linen) if f.init and f.name not in _LINEN_ONLY
        )
        cls.__signature__ = _signature(cls)

    def __init__(
        self,
        num_features: int,
        *args: Any,
        rngs: nnx.Rngs,
        promote_dtype: Any = flax_promote_dtype,
        bias_metadata: Mapping[str, Any] = MappingProxyType({}),
        scale_metadata: Mapping[str, Any] = MappingProxyType({}),
        **fields: Any,
    ):
        name = type(self).__name__
        if isinstance(num_features, bool) or not isinstance(num_features, int) or num_features <= 0:
            raise ValueError(f"{name}: num_features={num_features!r} must be a positive int")
        if len(args) > len(self.positional):
            raise TypeError(
                f"{name}() takes {1 + len(self.positional)} positional arguments "
                f"(num_features{''.join(', ' + p for p in self.positional)}); "
                f"got {1 + len(args)}"
            )
        for key, value in zip(self.positional, args):
            if key in fields:
                raise TypeError(f"{name}() got multiple values for argument {key!r}")
            fields[key] = value
        unknown = sorted(set(fields) - set(self.fields))
        if unknown:
            raise TypeError(
                f"{name}() got unexpected keyword argument(s) {unknown}; it takes "
                f"{list(self.fields) + list(_NNX_KEYWORDS)}"
            )
        config = {f.name: f.default for f in dataclasses.fields(self.linen)
                  if f.name in self.fields and f.default is not dataclasses.MISSING}
        config.update(self.defaults)
        config.update(fields)
        missing = [k for k in self.fields if k not in config]
        if missing:
            raise TypeError(f"{name}() missing required keyword argument(s) {missing}")
        for key in self.fields:
            setattr(self, key, config[key])
        self.num_features = num_features
        self.promote_dtype = promote_dtype

        twin = self._twin()
        shape = nominal_shape(twin, num_features)
        feature_shape = twin.feature_shape(shape)
        along_features: list[str] = []

        def stored(key: str, value: Array) -> Array:
            if value.shape != feature_shape:
                return value
            along_features.append(key)
            return value.reshape((num_features,))

        stats = twin.init_stats(shape)
        for key, value in stats.items():
            setattr(self, key, nnx.BatchStat(stored(key, value)))
        param_dtype = getattr(twin, "param_dtype", jnp.float32)
        specs = twin.param_specs(shape)
        for var_name, init, param_shape in specs:
            metadata = {"scale": scale_metadata, "coloring": scale_metadata,
                        "bias": bias_metadata}.get(var_name, {})
            value = init(rngs.params(), param_shape, param_dtype)
            setattr(self, var_name, nnx.Param(stored(var_name, value), **metadata))
        declared = {var_name for var_name, *_ in specs}
        for key in ("scale", "bias"):  # flax.nnx keeps a None attribute for an unused param
            if key not in declared and hasattr(twin, f"use_{key}"):
                setattr(self, key, nnx.data(None))
        #: Which variables the call reads (params, running statistics), and those stored
        #: flat as (num_features,), reshaped to the input's feature axes.
        self.param_names = tuple(var_name for var_name, *_ in specs)
        self.stat_names = tuple(stats)
        self.feature_names = tuple(along_features)

    # ----------------------------------------------------------------- configuration
    def _twin(self) -> Any:
        """The linen twin with these fields (unbound: it only describes the normalizer)."""
        return self.linen(**{k: getattr(self, k) for k in self.fields}, parent=None)

    def normalizer(self, shape: Sequence[int]) -> Normalizer:
        """The normalizer these fields describe, for inputs of ``shape`` (the twin's; layers of
        the taxonomy only)."""
        return self._twin().normalizer(tuple(shape))

    # ----------------------------------------------------------------- the call
    def _apply(self, x: Array, use_running_average: bool | None = None,
               mask: Array | None = None) -> Array:
        check_floating(x)
        twin = self._twin()
        train = True
        if self.stat_names:
            flag = self.use_running_average if use_running_average is None else use_running_average
            if flag is None:
                raise ValueError(
                    f"No use_running_average was given to {type(self).__name__}: pass it to "
                    "the constructor, to the call, or set it with model.train() / "
                    "model.eval() or nnx.view(model, use_running_average=True/False)"
                )
            train = not flag
        feature_shape = twin.feature_shape(x.shape)
        stats = {k: self._value(k, feature_shape, x.shape) for k in self.stat_names}
        params = {k: self._value(k, feature_shape, x.shape) for k in self.param_names}
        # flax.nnx's dtype rule: x and every variable promoted together (``dtype`` forces it);
        # the statistics themselves stay as stored (float32).
        promoted = self.promote_dtype((x, *params.values(), *stats.values()),
                                      dtype=getattr(self, "dtype", None))
        x = promoted[0]
        params = dict(zip(params, promoted[1:1 + len(params)]))
        y, new_stats = self._compute(twin, x, params, stats or None, train=train, mask=mask)
        if self.stat_names and train:
            for key in self.stat_names:
                variable = getattr(self, key)
                variable.set_value(jnp.reshape(new_stats[key], variable.shape))
        return y

    def _compute(self, twin: Any, x: Array, params: dict[str, Array], stats: Any, *,
                 train: bool, mask: Array | None) -> tuple[Array, Any]:
        """The twin's ``compute`` (one seam: :func:`normzoo.tools.recalibrate_nnx` wraps it)."""
        return twin.compute(x, params, stats, train=train,
                            **({} if mask is None else {"mask": mask}))

    def _value(self, key: str, feature_shape: tuple[int, ...], shape: Sequence[int]) -> Array:
        """A variable's value; one stored flat is reshaped to the input's feature axes."""
        value = getattr(self, key)[...]
        if key not in self.feature_names:
            return value
        if math.prod(feature_shape) != value.size:
            raise ValueError(
                f"{type(self).__name__}: num_features={self.num_features}, but the input of "
                f"shape {tuple(shape)} has {math.prod(feature_shape)} features"
            )
        return jnp.reshape(value, feature_shape)


class WithRunningAverage(Normalization):
    """A layer whose call takes ``use_running_average`` (flax.nnx.BatchNorm's signature)."""

    defaults: ClassVar[Mapping[str, Any]] = MappingProxyType({"use_running_average": False})

    def __call__(
        self, x: Array, use_running_average: bool | None = None, *, mask: Array | None = None
    ) -> Array:
        """Normalizes ``x`` (N, ..., C); ``mask`` (broadcastable to x) selects what counts."""
        return self._apply(x, use_running_average, mask)

    def set_view(self, use_running_average: bool | None = None):
        """Used by ``nnx.view``.

        Args:
          use_running_average: if True, the stored running statistics are used instead of
            the batch statistics of the input.
        """
        if use_running_average is not None:
            self.use_running_average = use_running_average


class Stateless(Normalization):
    """A layer whose call takes ``x`` and ``mask`` only (flax.nnx.LayerNorm's signature)."""

    def __call__(self, x: Array, *, mask: Array | None = None) -> Array:
        """Normalizes ``x`` (N, ..., C); ``mask`` (broadcastable to x) selects what counts."""
        return self._apply(x, None, mask)


def _signature(cls: type) -> inspect.Signature:
    """flax.nnx's constructor signature: ``(num_features, *positional, *, fields..., rngs)``."""
    linen_fields = {f.name: f for f in dataclasses.fields(cls.linen)}
    defaults = {**{k: linen_fields[k].default for k in cls.fields}, **cls.defaults}
    defaults = {k: inspect.Parameter.empty if v is dataclasses.MISSING else v
                for k, v in defaults.items()}
    P = inspect.Parameter
    params = [P("num_features", P.POSITIONAL_OR_KEYWORD, annotation=int)]
    params += [P(k, P.POSITIONAL_OR_KEYWORD, default=defaults[k]) for k in cls.positional]
    params += [P(k, P.KEYWORD_ONLY, default=defaults[k]) for k in cls.fields
               if k not in cls.positional]
    params += [
        P("promote_dtype", P.KEYWORD_ONLY, default=flax_promote_dtype),
        P("rngs", P.KEYWORD_ONLY, annotation=nnx.Rngs),
        P("bias_metadata", P.KEYWORD_ONLY, default=MappingProxyType({})),
        P("scale_metadata", P.KEYWORD_ONLY, default=MappingProxyType({})),
    ]
    return inspect.Signature(params)
