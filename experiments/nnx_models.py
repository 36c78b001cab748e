"""The models of :mod:`experiments.models` in Flax NNX (``python -m experiments SUITE --api nnx``).

:class:`MLP`, :class:`CNN`, :class:`ResNet` and :class:`Transformer` are ``nnx.Module`` s built from ``nnx.Linear`` /
``nnx.Conv`` and ``registry.make(name, api="nnx", num_features=..., rngs=...)`` normalizers,
computing what their Linen twins compute, layer for layer (same activations, placement, dropout,
pooling and sown intermediates).

Attribute names: every attribute is named as the Linen twin's submodule (``dense_0``, ``head``,
``conv_1``, ``stem``, ``block0_a``, ``block1_proj``, and the normalizers' automatic Linen names
``BatchNorm_0``, ``GroupNorm_3``, ...). So ``normzoo.nnx.linen_to_nnx(linen_variables, model)``
maps without ``rename``, and the NNX state (``nnx.split(model, nnx.Param, nnx.BatchStat)`` as pure
dicts) is the same tree as the Linen ``{'params', 'batch_stats'}``: weight decay masks, the
"normalizer parameter" test of :func:`experiments.models.is_norm_param`, checkpoints and the job
cache's layout are shared by both APIs.

Training (:mod:`experiments.train` has one loop for both APIs): :class:`NNXModel` is the
functional face of an NNX model, with Linen's ``apply(variables, x, *, train, dropout_rate,
rngs, mutable)``: it merges ``graphdef`` with the ``params`` / ``batch_stats`` pure dicts
(``nnx.merge``), calls the module (normalizers in training or inference mode through their
``use_running_average`` call argument), and returns the logits and, as asked by ``mutable``, the
new ``nnx.BatchStat`` state and the intermediates captured with ``nnx.capture``. The train state,
optimizer, metrics and evaluation are the Linen path's.

Same numbers as ``--api linen`` for the same seed:

* Initialisation: :meth:`NNXModel.from_linen` takes the Linen twin's variables, created exactly as
  the Linen path creates them (:func:`experiments.train.init_states`: the cached template, kernels
  drawn from the run's seed) and copies them into the NNX model with ``linen_to_nnx``. The NNX
  model's own initialisation is not used: its constructor runs under ``nnx.eval_shape`` (structure
  and shapes only) and every value is overwritten by the copy. This is what makes the comparison
  exact (NNX initialisers and Linen's ``init`` consume keys differently).
* Dropout: the masks use the keys Linen's ``self.make_rng('dropout')`` returns in the Linen
  models (:func:`linen_dropout_key`: the ``n``-th call in the top-level module folds ``n`` into the
  ``rngs={'dropout': key}`` key), so both APIs drop the same units.
"""
from __future__ import annotations

from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from flax.core.scope import LazyRng

from normzoo import registry
from normzoo.nnx import WithRunningAverage, linen_to_nnx
from normzoo.nnx.weights import WSConv
from experiments.models import ACTIVATIONS, Overrides, attention, build_model, default_norm_overrides, make_norm

_KERNEL_INIT = nnx.initializers.normal(1.0)


def linen_dropout_key(key: jax.Array, n: int) -> jax.Array:
    """The key of the ``n``-th (1-based) ``make_rng('dropout')`` call of a top-level Linen module
    applied with ``rngs={'dropout': key}`` (flax.linen folds the call count into the key)."""
    return LazyRng.create(key, n).as_jax_rng()


def _dropout(x: jax.Array, rate: jax.Array | float, key: jax.Array) -> jax.Array:
    """:func:`experiments.models._dropout` (training mode) with an explicit key."""
    keep = 1.0 - jnp.asarray(rate, x.dtype)
    mask = jax.random.uniform(key, x.shape) < keep
    return jnp.where(mask, x / jnp.maximum(keep, 1e-6), 0.0)


def make_norm_nnx(norm_name: str, width: int, ndim: int, overrides: Overrides, rngs: nnx.Rngs) -> nnx.Module:
    """:func:`experiments.models.make_norm` in NNX: the same registry entry and overrides, with
    ``num_features=width``; its mode is chosen per call (see :func:`call_norm`)."""
    kwargs = {**default_norm_overrides(norm_name, width, ndim), **dict(overrides)}
    return registry.make(norm_name, api="nnx", num_features=width, rngs=rngs, **kwargs)


def call_norm(layer: nnx.Module, x: jax.Array, train: bool) -> jax.Array:
    """Apply a normalizer: layers with running statistics get ``use_running_average=not train``
    (as the Linen models construct theirs); the others take ``x`` only."""
    if isinstance(layer, WithRunningAverage):
        return layer(x, use_running_average=not train)
    return layer(x)

def sowing_norms(module: nnx.Module, train: bool) -> Callable[[jax.Array], jax.Array]:
    """The module's normalizers ``module.norm_names`` in call order: each call applies the next
    one and sows its output as ``norm_out_{i}`` (the Linen models' intermediates)."""
    count = 0

    def norm(h: jax.Array) -> jax.Array:
        nonlocal count
        out = call_norm(getattr(module, module.norm_names[count]), h, train)
        module.sow(nnx.Intermediate, f"norm_out_{count}", out)
        count += 1
        return out

    return norm



class _Names:
    """Linen's automatic submodule names (``{ClassName}_{count}``) for the normalizers."""

    def __init__(self, norm: str, overrides: Overrides) -> None:
        self.norm, self.overrides, self.counts = norm, overrides, {}

    def __call__(self, width: int, ndim: int) -> str:
        prefix = type(make_norm(self.norm, width, ndim, True, self.overrides)).__name__
        k = self.counts.get(prefix, 0)
        self.counts[prefix] = k + 1
        return f"{prefix}_{k}"


class _Model(nnx.Module):
    """Shared configuration of the NNX models (fields as in :class:`experiments.models.MLP`)."""

    def _configure(self, num_classes: int, norm: str, norm_position: str, norm_overrides: Overrides,
                   activation: str, dropout: bool) -> None:
        self.num_classes = num_classes
        self.norm = norm
        self.norm_position = norm_position
        self.norm_overrides = tuple(norm_overrides)
        self.activation = activation
        self.dropout = dropout

    def _norm_act(self, name: str, x: jax.Array, train: bool, index: int | None) -> jax.Array:
        """``norm -> act`` or ``act -> norm`` as the Linen MLP/CNN, sowing ``norm_out_{index}``."""
        act = ACTIVATIONS[self.activation]
        layer = getattr(self, name)
        if self.norm_position == "before":
            x = call_norm(layer, x, train)
            self.sow(nnx.Intermediate, f"norm_out_{index}", x)
            return act(x)
        x = call_norm(layer, act(x), train)
        self.sow(nnx.Intermediate, f"norm_out_{index}", x)
        return x


class MLP(_Model):
    """NNX twin of :class:`experiments.models.MLP`; ``in_features`` = the flattened input size."""

    def __init__(self, widths: Sequence[int], num_classes: int, *, in_features: int, norm: str = "none",
                 norm_position: str = "before", norm_overrides: Overrides = (), activation: str = "relu",
                 dropout: bool = False, rngs: nnx.Rngs) -> None:
        self._configure(num_classes, norm, norm_position, norm_overrides, activation, dropout)
        self.widths = tuple(widths)
        names = _Names(norm, self.norm_overrides)
        norm_names = []
        fan_in = in_features
        for i, width in enumerate(self.widths):
            setattr(self, f"dense_{i}", nnx.Linear(fan_in, width, kernel_init=_KERNEL_INIT, rngs=rngs))
            norm_names.append(names(width, 2))
            setattr(self, norm_names[-1], make_norm_nnx(norm, width, 2, self.norm_overrides, rngs))
            fan_in = width
        self.norm_names = tuple(norm_names)
        self.head = nnx.Linear(fan_in, num_classes, kernel_init=_KERNEL_INIT, rngs=rngs)

    def __call__(self, x: jax.Array, *, train: bool, dropout_rate: jax.Array | float = 0.0,
                 dropout_key: jax.Array | None = None) -> jax.Array:
        calls = 0
        x = x.reshape(x.shape[0], -1)
        for i in range(len(self.widths)):
            self.sow(nnx.Intermediate, f"layer_in_{i}", x)
            x = getattr(self, f"dense_{i}")(x)
            x = self._norm_act(self.norm_names[i], x, train, i)
            if self.dropout and train:
                calls += 1
                x = _dropout(x, dropout_rate, linen_dropout_key(dropout_key, calls))
        self.sow(nnx.Intermediate, f"layer_in_{len(self.widths)}", x)
        return self.head(x)


class CNN(_Model):
    """NNX twin of :class:`experiments.models.CNN`; ``input_shape`` = one sample's shape,
    ``(H, W, C)`` or ``(L, C)``."""

    def __init__(self, channels: Sequence[int], num_classes: int, *, input_shape: Sequence[int], norm: str = "none",
                 norm_position: str = "before", norm_overrides: Overrides = (), activation: str = "relu",
                 dropout: bool = False, weight_std: bool = False, rngs: nnx.Rngs) -> None:
        self._configure(num_classes, norm, norm_position, norm_overrides, activation, dropout)
        self.channels = tuple(channels)
        spatial = len(input_shape) - 1
        names = _Names(norm, self.norm_overrides)
        norm_names = []
        fan_in = input_shape[-1]
        conv = WSConv if weight_std else nnx.Conv
        for i, c in enumerate(self.channels):
            stride = 2 if i % 2 == 1 else 1
            setattr(self, f"conv_{i}", conv(fan_in, c, (3,) * spatial, strides=(stride,) * spatial,
                                            kernel_init=_KERNEL_INIT, rngs=rngs))
            norm_names.append(names(c, spatial + 2))
            setattr(self, norm_names[-1], make_norm_nnx(norm, c, spatial + 2, self.norm_overrides, rngs))
            fan_in = c
        self.norm_names = tuple(norm_names)
        self.head = nnx.Linear(fan_in, num_classes, kernel_init=_KERNEL_INIT, rngs=rngs)

    def __call__(self, x: jax.Array, *, train: bool, dropout_rate: jax.Array | float = 0.0,
                 dropout_key: jax.Array | None = None) -> jax.Array:
        for i in range(len(self.channels)):
            self.sow(nnx.Intermediate, f"layer_in_{i}", x)
            x = getattr(self, f"conv_{i}")(x)
            x = self._norm_act(self.norm_names[i], x, train, i)
        x = x.mean(axis=tuple(range(1, x.ndim - 1)))
        if self.dropout and train:
            x = _dropout(x, dropout_rate, linen_dropout_key(dropout_key, 1))
        self.sow(nnx.Intermediate, f"layer_in_{len(self.channels)}", x)
        return self.head(x)


class ResNet(_Model):
    """NNX twin of :class:`experiments.models.ResNet` (stem, basic blocks ``block{i}_a`` /
    ``block{i}_b`` / ``block{i}_proj``, pooling, ``head``)."""

    def __init__(self, channels: Sequence[int], num_classes: int, *, input_shape: Sequence[int], norm: str = "none",
                 norm_position: str = "before", norm_overrides: Overrides = (), activation: str = "relu",
                 dropout: bool = False, rngs: nnx.Rngs) -> None:
        self._configure(num_classes, norm, norm_position, norm_overrides, activation, dropout)
        self.channels = tuple(channels)
        spatial = len(input_shape) - 1
        ndim = spatial + 2
        k3, one = (3,) * spatial, (1,) * spatial
        names = _Names(norm, self.norm_overrides)
        norm_names = []

        def add_norm(width: int) -> None:
            norm_names.append(names(width, ndim))
            setattr(self, norm_names[-1], make_norm_nnx(norm, width, ndim, self.norm_overrides, rngs))

        def conv(cin: int, cout: int, kernel: tuple[int, ...], strides: tuple[int, ...]) -> nnx.Conv:
            return nnx.Conv(cin, cout, kernel, strides=strides, kernel_init=_KERNEL_INIT, rngs=rngs)

        self.stem = conv(input_shape[-1], self.channels[0], k3, one)
        add_norm(self.channels[0])
        prev = self.channels[0]
        for i, c in enumerate(self.channels):
            stride = (2,) * spatial if c != prev else one
            setattr(self, f"block{i}_a", conv(prev, c, k3, stride))
            add_norm(c)
            setattr(self, f"block{i}_b", conv(c, c, k3, one))
            add_norm(c)
            if c != prev:
                setattr(self, f"block{i}_proj", conv(prev, c, one, stride))
            prev = c
        self.norm_names = tuple(norm_names)
        self.head = nnx.Linear(prev, num_classes, kernel_init=_KERNEL_INIT, rngs=rngs)

    def __call__(self, x: jax.Array, *, train: bool, dropout_rate: jax.Array | float = 0.0,
                 dropout_key: jax.Array | None = None) -> jax.Array:
        act = ACTIVATIONS[self.activation]
        norm = sowing_norms(self, train)

        x = act(norm(self.stem(x)))
        prev = self.channels[0]
        for i, c in enumerate(self.channels):
            self.sow(nnx.Intermediate, f"layer_in_{i}", x)
            h = act(norm(getattr(self, f"block{i}_a")(x)))
            h = norm(getattr(self, f"block{i}_b")(h))
            skip = x if c == prev else getattr(self, f"block{i}_proj")(x)
            x = act(h + skip)
            prev = c
        x = x.mean(axis=tuple(range(1, x.ndim - 1)))
        if self.dropout and train:
            x = _dropout(x, dropout_rate, linen_dropout_key(dropout_key, 1))
        return self.head(x)


class Transformer(_Model):
    """NNX twin of :class:`experiments.models.Transformer` (``stem``, ``stem_pos``, per block
    ``block{b}_qkv`` / ``_proj`` / ``_fc1`` / ``_fc2``, the normalizers, ``head``);
    ``input_shape`` = one sample's shape, ``(L,)`` or ``(L, 1)``."""

    def __init__(self, width: int, depth: int, num_classes: int, *, input_shape: Sequence[int], norm: str = "ln",
                 norm_position: str = "before", norm_overrides: Overrides = (), activation: str = "gelu",
                 dropout: bool = False, patch: int = 4, heads: int = 4, rngs: nnx.Rngs) -> None:
        self._configure(num_classes, norm, norm_position, norm_overrides, activation, dropout)
        self.width, self.depth, self.patch, self.heads = width, depth, patch, heads
        length = int(np.prod(input_shape))
        tokens = length // patch
        names = _Names(norm, self.norm_overrides)
        norm_names = []

        def add_norm() -> None:
            norm_names.append(names(width, 2))
            setattr(self, norm_names[-1], make_norm_nnx(norm, width, 2, self.norm_overrides, rngs))

        def dense(cin: int, cout: int) -> nnx.Linear:
            return nnx.Linear(cin, cout, kernel_init=_KERNEL_INIT, rngs=rngs)

        self.stem = dense(patch, width)
        self.stem_pos = nnx.Param(jnp.zeros((tokens, width)))
        for b in range(depth):
            add_norm()
            setattr(self, f"block{b}_qkv", dense(width, 3 * width))
            setattr(self, f"block{b}_proj", dense(width, width))
            add_norm()
            setattr(self, f"block{b}_fc1", dense(width, 2 * width))
            setattr(self, f"block{b}_fc2", dense(2 * width, width))
        add_norm()
        self.norm_names = tuple(norm_names)
        self.head = dense(width, num_classes)

    def __call__(self, x: jax.Array, *, train: bool, dropout_rate: jax.Array | float = 0.0,
                 dropout_key: jax.Array | None = None) -> jax.Array:
        act = ACTIVATIONS[self.activation]
        n = x.shape[0]
        x = x.reshape(n, -1)
        tokens, hd = x.shape[1] // self.patch, self.width // self.heads
        x = self.stem(x.reshape(n, tokens, self.patch)) + self.stem_pos[...]
        norm = sowing_norms(self, train)

        for b in range(self.depth):
            qkv = getattr(self, f"block{b}_qkv")(norm(x))
            x = x + getattr(self, f"block{b}_proj")(attention(qkv, self.heads, hd))
            h = act(getattr(self, f"block{b}_fc1")(norm(x)))
            x = x + getattr(self, f"block{b}_fc2")(h)
        x = norm(x).mean(axis=1)
        if self.dropout and train:
            x = _dropout(x, dropout_rate, linen_dropout_key(dropout_key, 1))
        return self.head(x)


class NNXModel:
    """An NNX model, functionally: Linen's ``apply`` signature over ``nnx.split`` state.

    Built by :func:`build_nnx_model` (``build_model(..., api="nnx")``). NNX modules need their input
    size up front, Linen's do not; so the graph is built per input shape on first use
    (:meth:`graphdef`). ``linen`` is the Linen twin: :func:`experiments.train.init_states` creates
    its variables as for ``--api linen`` and hands them to :meth:`from_linen`. One instance per
    configuration (:func:`experiments.common.cached_model`): its ``apply`` is the train state's
    static ``apply_fn``, so jobs of one configuration share compiled functions.
    """

    def __init__(self, kind: str, linen: Any, factory: Callable[[tuple[int, ...]], nnx.Module]) -> None:
        self.kind = kind
        self.linen = linen
        self._factory = factory
        self._graphdefs: dict[tuple[int, ...], Any] = {}

    def __repr__(self) -> str:
        return f"NNXModel({self.linen!r})"

    def module(self, input_shape: Sequence[int]) -> nnx.Module:
        """A concrete NNX module for samples of ``input_shape``, initialised by NNX (``nnx.Rngs(0)``),
        to inspect or use directly (``nnx.eval_shape(lambda: m.module(shape))`` for its structure only);
        training does not use its values (see :meth:`from_linen`)."""
        return self._factory(tuple(int(d) for d in input_shape))

    def graphdef(self, input_shape: Sequence[int]) -> Any:
        """The ``nnx.GraphDef`` for samples of ``input_shape``, from an abstract module
        (``nnx.eval_shape``: nothing computed, so it may be first asked for inside a jit trace)."""
        return self._abstract(input_shape)[0]

    def _abstract(self, input_shape: Sequence[int]) -> tuple[Any, dict[str, Any]]:
        shape = tuple(int(d) for d in input_shape)
        if shape not in self._graphdefs:
            abstract = nnx.eval_shape(lambda: self._factory(shape))
            # only Params and BatchStats: the split raises if the model held any other state
            graphdef, params, stats = nnx.split(abstract, nnx.Param, nnx.BatchStat)
            self._graphdefs[shape] = graphdef, {"params": nnx.to_pure_dict(params),
                                                "batch_stats": nnx.to_pure_dict(stats)}
        return self._graphdefs[shape]

    def from_linen(self, variables: dict[str, Any], input_shape: Sequence[int]) -> dict[str, Any]:
        """The NNX state (``{'params', 'batch_stats'}`` pure dicts, numpy) holding Linen ``variables``.

        The module is merged from :meth:`graphdef` and placeholders (its constructor ran only
        abstractly, so nothing of the NNX initialisation is computed) and filled with
        ``normzoo.nnx.linen_to_nnx``, which checks that every variable has its twin of the same size."""
        graphdef, abstract = self._abstract(input_shape)
        fresh = jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), abstract)
        model = linen_to_nnx(variables, nnx.merge(graphdef, fresh["params"], fresh["batch_stats"]))
        _, params, stats = nnx.split(model, nnx.Param, nnx.BatchStat)
        return {"params": nnx.to_pure_dict(params), "batch_stats": nnx.to_pure_dict(stats)}

    def apply(self, variables: dict[str, Any], x: jax.Array, *, train: bool, dropout_rate: jax.Array | float = 0.0,
              rngs: dict[str, jax.Array] | None = None, mutable: Any = False) -> Any:
        """``linen.Module.apply`` for the NNX model: ``variables`` = ``{'params', 'batch_stats'}`` pure
        dicts; ``mutable`` may name ``batch_stats`` (the new ``nnx.BatchStat`` state is returned) and
        ``intermediates`` (the values the model sows, as Linen's ``{name: (value,)}``)."""
        # jax arrays, not numpy: a normalizer's in-place ``variable[...] = new`` would write into a numpy
        # buffer (and fail on tracers) where a jax array is replaced
        params, stats = jax.tree.map(jnp.asarray, (variables["params"], variables.get("batch_stats", {})))
        model = nnx.merge(self.graphdef(x.shape[1:]), params, stats)
        key = (rngs or {}).get("dropout")
        logits, inter = nnx.capture(model, nnx.Intermediate)(x, train=train, dropout_rate=dropout_rate,
                                                             dropout_key=key)
        if not mutable:
            return logits
        mutable = [mutable] if isinstance(mutable, str) else list(mutable)
        cols: dict[str, Any] = {}
        if "batch_stats" in mutable:
            cols["batch_stats"] = nnx.to_pure_dict(nnx.state(model, nnx.BatchStat))
        if "intermediates" in mutable:
            cols["intermediates"] = nnx.to_pure_dict(inter)
        return logits, cols


NNX_MODELS = {"mlp": MLP, "cnn": CNN, "resnet": ResNet, "transformer": Transformer}


def build_nnx_model(kind: str, **kwargs: Any) -> NNXModel:
    """:func:`experiments.models.build_model` in NNX (same arguments): an :class:`NNXModel` whose
    ``linen`` is ``build_model(kind, **kwargs)``."""
    linen = build_model(kind, **kwargs)
    fields = dict(num_classes=linen.num_classes, norm=linen.norm, norm_position=linen.norm_position,
                  norm_overrides=linen.norm_overrides, activation=linen.activation, dropout=linen.dropout)

    def factory(input_shape: tuple[int, ...]) -> nnx.Module:
        rngs = nnx.Rngs(0)
        if kind == "mlp":
            size = 1
            for d in input_shape:
                size *= d
            return MLP(linen.widths, in_features=size, rngs=rngs, **fields)
        if kind == "transformer":
            return Transformer(linen.width, linen.depth, input_shape=input_shape, patch=linen.patch,
                               heads=linen.heads, rngs=rngs, **fields)
        if kind == "cnn":
            return CNN(linen.channels, input_shape=input_shape, weight_std=linen.weight_std, rngs=rngs, **fields)
        return NNX_MODELS[kind](linen.channels, input_shape=input_shape, rngs=rngs, **fields)

    return NNXModel(kind, linen, factory)
