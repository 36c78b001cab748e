"""Models that take any normalizer from ``normzoo.registry`` by name.

* :class:`MLP` - ``Dense -> [norm] -> act -> [norm] -> [dropout]`` per hidden layer (norm before
  or after the activation), as in "Deep Learning from Scratch" ch. 6 and the BN paper.
* :class:`CNN` - 3x3 conv blocks ``Conv -> norm -> act``, stride 2 every other block, global
  average pooling, a Dense classifier. Convolves over every axis but the last, so it runs on
  images ``(N, H, W, C)`` and sequences ``(N, L, C)`` alike.
* :class:`ResNet` - a small pre-pool ResNet of basic blocks ``conv-norm-act-conv-norm (+skip)``.
* :class:`Transformer` - a small pre-LN transformer over a 1-D signal cut into patches (tokens):
  ``x + attn(norm(x))``, ``x + mlp(norm(x))`` per block, a final norm, mean pooling, a Dense head.

Their Flax NNX versions (``--api nnx``) are in :mod:`experiments.nnx_models`.

Normalizers are generic: each one is ``registry.make(name, use_running_average=not train, **kw)``
and the models never special-case BatchNorm; whether a layer keeps running statistics is the
registry's business (``registry.is_stateful``), and they land in the ``batch_stats`` collection.

All kernels are initialised from N(0, 1); :func:`scale_init` rescales them afterwards (He, Xavier or a
fixed std) so the std can differ per run inside one ``jax.vmap``.

Intermediates: with ``mutable=['intermediates']`` the models ``sow`` ``norm_out_{i}`` (output of the
i-th normalizer, or of the spot where it would be for ``none``) and ``layer_in_{i}`` (input of the
i-th Dense/Conv), used by the covariate-shift and whitening suites.
"""
from __future__ import annotations

import math
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from normzoo import registry
from normzoo.linen.weights import WSConv

Overrides = tuple[tuple[str, Any], ...]

ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "relu": nn.relu,
    "sigmoid": nn.sigmoid,
    "tanh": jnp.tanh,
    "gelu": nn.gelu,
    "identity": lambda x: x,
}


def _largest_divisor_at_most(n: int, cap: int) -> int:
    return max(d for d in range(1, min(n, cap) + 1) if n % d == 0)


def default_norm_overrides(name: str, width: int, ndim: int) -> dict[str, Any]:
    """Constructor overrides that make registry defaults fit a layer of ``width`` features.

    * ``gn``, ``evonorm_s0``, ``gw``: ``num_groups`` = the largest divisor of ``width`` that is <= 32 and <= width / 2
      (Flax's default of 32 groups does not divide e.g. 100).
    * ``ln``/``rms`` on ``ndim``-D activations with spatial axes: statistics over all of (H, W, C)
      per sample, as in the GN paper's LayerNorm (Flax defaults to the channel axis only).
    """
    if name in ("gn", "evonorm_s0", "gw"):
        return {"num_groups": _largest_divisor_at_most(width, min(32, max(1, width // 2)))}
    if name in ("ln", "rms") and ndim > 2:
        return {"reduction_axes": tuple(range(1, ndim))}
    return {}


def freeze_overrides(overrides: dict[str, Any] | None) -> Overrides:
    """Turn a dict of constructor overrides into a hashable, sorted tuple (lists become tuples)."""

    def _fix(v: Any) -> Any:
        return tuple(_fix(u) for u in v) if isinstance(v, (list, tuple)) else v

    return tuple(sorted((k, _fix(v)) for k, v in (overrides or {}).items()))


def make_norm(norm_name: str, width: int, ndim: int, train: bool, overrides: Overrides = ()) -> nn.Module:
    """Build one normalizer for activations of shape ``(N, ..., width)`` with ``ndim`` axes.

    ``overrides`` (constructor fields) win over :func:`default_norm_overrides`.
    """
    kwargs = {**default_norm_overrides(norm_name, width, ndim), **dict(overrides)}
    return registry.make(norm_name, use_running_average=not train, **kwargs)


def norm_overrides_for(name: str, base: dict[str, Any] | None = None, *, stateful: dict[str, Any] | None = None) -> Overrides:
    """Overrides for ``name``: ``base`` for every normalizer, plus ``stateful`` (e.g. ``momentum``)
    only for normalizers the registry marks stateful. Fields the layer does not accept are dropped
    (checked by constructing it), so one suite setting fits every registry entry."""
    wanted = dict(base or {})
    if name in registry.names() and registry.is_stateful(name):
        wanted.update(stateful or {})
    accepted: dict[str, Any] = {}
    for k, v in wanted.items():
        try:
            registry.make(name, use_running_average=False, **{**accepted, k: v})
        except (TypeError, ValueError):
            continue
        accepted[k] = v
    return freeze_overrides(accepted)


def check_norm(name: str, width: int, ndim: int, overrides: Overrides = ()) -> str | None:
    """Return ``None`` if ``name`` can be built with these overrides, else a short reason."""
    if name not in registry.names():
        return f"'{name}' is not in normzoo.registry (available: {', '.join(registry.names())})"
    try:
        make_norm(name, width, ndim, True, overrides)
    except (TypeError, ValueError) as e:
        return f"'{name}' rejects overrides {dict(overrides)}: {e}"
    return None


def _dropout(module: nn.Module, x: jax.Array, rate: jax.Array | float, train: bool) -> jax.Array:
    """Inverted dropout with a rate that may be a traced per-run value (flax's needs a static one)."""
    if not train:
        return x
    keep = 1.0 - jnp.asarray(rate, x.dtype)
    mask = jax.random.uniform(module.make_rng("dropout"), x.shape) < keep
    return jnp.where(mask, x / jnp.maximum(keep, 1e-6), 0.0)


_KERNEL_INIT = nn.initializers.normal(1.0)


class MLP(nn.Module):
    """Fully connected classifier.

    Input ``(N, *input_shape)`` is flattened to ``(N, D)``; output logits ``(N, num_classes)``.

    Attributes:
      widths: hidden layer widths, e.g. ``(100,) * 5``.
      num_classes: output size.
      norm: registry name of the normalizer after each hidden Dense (``"none"`` for none).
      norm_position: ``"before"`` (Dense -> norm -> act, as in the BN paper) or ``"after"``
        (Dense -> act -> norm).
      norm_overrides: extra constructor fields for the normalizer (hashable tuple of pairs).
      activation: key of :data:`ACTIVATIONS`.
      dropout: whether to apply dropout after each hidden layer (rate given at call time).
    """

    widths: Sequence[int]
    num_classes: int
    norm: str = "none"
    norm_position: str = "before"
    norm_overrides: Overrides = ()
    activation: str = "relu"
    dropout: bool = False

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool, dropout_rate: jax.Array | float = 0.0) -> jax.Array:
        act = ACTIVATIONS[self.activation]
        x = x.reshape(x.shape[0], -1)
        for i, width in enumerate(self.widths):
            self.sow("intermediates", f"layer_in_{i}", x)
            x = nn.Dense(width, kernel_init=_KERNEL_INIT, name=f"dense_{i}")(x)
            norm = make_norm(self.norm, width, 2, train, self.norm_overrides)
            if self.norm_position == "before":
                x = norm(x)
                self.sow("intermediates", f"norm_out_{i}", x)
                x = act(x)
            else:
                x = norm(act(x))
                self.sow("intermediates", f"norm_out_{i}", x)
            if self.dropout:
                x = _dropout(self, x, dropout_rate, train)
        self.sow("intermediates", f"layer_in_{len(self.widths)}", x)
        return nn.Dense(self.num_classes, kernel_init=_KERNEL_INIT, name="head")(x)


class CNN(nn.Module):
    """Small convolutional classifier for ``(N, H, W, C)`` images or ``(N, L, C)`` sequences.

    Attributes:
      channels: output channels per conv block; blocks with odd index use stride 2.
      num_classes, norm, norm_overrides, activation, dropout: as in :class:`MLP`.
      weight_std: weight-standardized convolutions (``normzoo.linen.WSConv``, Qiao et al. 2019:
        each filter standardized over its fan-in before use; same variables as ``nn.Conv``).
    """

    channels: Sequence[int]
    num_classes: int
    norm: str = "none"
    norm_position: str = "before"
    norm_overrides: Overrides = ()
    activation: str = "relu"
    dropout: bool = False
    weight_std: bool = False

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool, dropout_rate: jax.Array | float = 0.0) -> jax.Array:
        act = ACTIVATIONS[self.activation]
        spatial = x.ndim - 2
        for i, c in enumerate(self.channels):
            self.sow("intermediates", f"layer_in_{i}", x)
            stride = 2 if i % 2 == 1 else 1
            conv = WSConv if self.weight_std else nn.Conv
            x = conv(c, (3,) * spatial, strides=(stride,) * spatial, kernel_init=_KERNEL_INIT, name=f"conv_{i}")(x)
            norm = make_norm(self.norm, c, x.ndim, train, self.norm_overrides)
            if self.norm_position == "before":
                x = norm(x)
                self.sow("intermediates", f"norm_out_{i}", x)
                x = act(x)
            else:
                x = norm(act(x))
                self.sow("intermediates", f"norm_out_{i}", x)
        x = x.mean(axis=tuple(range(1, x.ndim - 1)))
        if self.dropout:
            x = _dropout(self, x, dropout_rate, train)
        self.sow("intermediates", f"layer_in_{len(self.channels)}", x)
        return nn.Dense(self.num_classes, kernel_init=_KERNEL_INIT, name="head")(x)


class ResNet(nn.Module):
    """Small ResNet: stem conv, ``stages`` basic blocks (stride 2 when the width grows), pooling.

    A basic block is ``conv3 -> norm -> act -> conv3 -> norm`` plus the (1x1-projected when the
    shape changes) input, then ``act``.
    """

    channels: Sequence[int]
    num_classes: int
    norm: str = "none"
    norm_position: str = "before"
    norm_overrides: Overrides = ()
    activation: str = "relu"
    dropout: bool = False

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool, dropout_rate: jax.Array | float = 0.0) -> jax.Array:
        act = ACTIVATIONS[self.activation]
        spatial = x.ndim - 2
        k3, one = (3,) * spatial, (1,) * spatial
        count = 0

        def norm(h: jax.Array) -> jax.Array:
            nonlocal count
            out = make_norm(self.norm, h.shape[-1], h.ndim, train, self.norm_overrides)(h)
            self.sow("intermediates", f"norm_out_{count}", out)
            count += 1
            return out

        x = act(norm(nn.Conv(self.channels[0], k3, kernel_init=_KERNEL_INIT, name="stem")(x)))
        prev = self.channels[0]
        for i, c in enumerate(self.channels):
            stride = (2,) * spatial if c != prev else one
            self.sow("intermediates", f"layer_in_{i}", x)
            h = act(norm(nn.Conv(c, k3, strides=stride, kernel_init=_KERNEL_INIT, name=f"block{i}_a")(x)))
            h = norm(nn.Conv(c, k3, kernel_init=_KERNEL_INIT, name=f"block{i}_b")(h))
            skip = x if c == prev else nn.Conv(c, one, strides=stride, kernel_init=_KERNEL_INIT, name=f"block{i}_proj")(x)
            x = act(h + skip)
            prev = c
        x = x.mean(axis=tuple(range(1, x.ndim - 1)))
        if self.dropout:
            x = _dropout(self, x, dropout_rate, train)
        return nn.Dense(self.num_classes, kernel_init=_KERNEL_INIT, name="head")(x)


class Transformer(nn.Module):
    """Small pre-LN transformer classifier for 1-D signals ``(N, L)`` or ``(N, L, 1)``.

    The signal is cut into ``L // patch`` non-overlapping patches (tokens of ``patch`` values;
    ``L`` must be a multiple of ``patch``), embedded by a Dense layer (``stem``) plus a learned
    positional embedding (``stem_pos``, N(0, 0.02)), then ``depth`` pre-LN blocks
    ``x + proj(attention(norm(x)))``, ``x + fc2(act(fc1(norm(x))))`` (MLP ratio 2, ``heads``
    heads), a final norm, mean pooling over tokens and a Dense ``head``.

    Normalizers act per token over the ``width`` channels (built as for a ``(N, width)`` layer,
    so ``ln``/``rms`` reduce over channels only; ``bn`` reduces over samples and tokens; ``dyt`` is
    elementwise; ``none`` is the identity). ``norm_out_{i}`` is sown for each of the
    ``2 * depth + 1`` normalizers.

    Attributes:
      width: model width (channels per token); a multiple of ``heads``.
      depth: number of blocks.
      num_classes, norm, norm_overrides, activation, dropout: as in :class:`MLP` (dropout before
        the head); ``norm_position`` is accepted for a uniform interface and must be ``"before"``.
      patch: values per token.
      heads: attention heads.
    """

    width: int
    depth: int
    num_classes: int
    norm: str = "ln"
    norm_position: str = "before"
    norm_overrides: Overrides = ()
    activation: str = "gelu"
    dropout: bool = False
    patch: int = 4
    heads: int = 4

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool, dropout_rate: jax.Array | float = 0.0) -> jax.Array:
        act = ACTIVATIONS[self.activation]
        n = x.shape[0]
        x = x.reshape(n, -1)
        if x.shape[1] % self.patch:
            raise ValueError(f"signal length {x.shape[1]} is not a multiple of patch={self.patch}")
        tokens, hd = x.shape[1] // self.patch, self.width // self.heads
        x = x.reshape(n, tokens, self.patch)
        x = nn.Dense(self.width, kernel_init=_KERNEL_INIT, name="stem")(x)
        x = x + self.param("stem_pos", nn.initializers.normal(0.02), (tokens, self.width))
        count = 0

        def norm(h: jax.Array) -> jax.Array:
            nonlocal count
            out = make_norm(self.norm, self.width, 2, train, self.norm_overrides)(h)
            self.sow("intermediates", f"norm_out_{count}", out)
            count += 1
            return out

        for b in range(self.depth):
            qkv = nn.Dense(3 * self.width, kernel_init=_KERNEL_INIT, name=f"block{b}_qkv")(norm(x))
            x = x + nn.Dense(self.width, kernel_init=_KERNEL_INIT, name=f"block{b}_proj")(
                attention(qkv, self.heads, hd))
            h = act(nn.Dense(2 * self.width, kernel_init=_KERNEL_INIT, name=f"block{b}_fc1")(norm(x)))
            x = x + nn.Dense(self.width, kernel_init=_KERNEL_INIT, name=f"block{b}_fc2")(h)
        x = norm(x).mean(axis=1)
        if self.dropout:
            x = _dropout(self, x, dropout_rate, train)
        return nn.Dense(self.num_classes, kernel_init=_KERNEL_INIT, name="head")(x)


def attention(qkv: jax.Array, heads: int, head_dim: int) -> jax.Array:
    """Softmax self-attention of ``qkv`` ``(N, T, 3 * heads * head_dim)`` (queries, keys and values
    concatenated); returns ``(N, T, heads * head_dim)``."""
    n, t, _ = qkv.shape
    q, k, v = jnp.moveaxis(qkv.reshape(n, t, 3, heads, head_dim), 2, 0)
    w = jax.nn.softmax(jnp.einsum("nqhd,nkhd->nhqk", q, k) / math.sqrt(head_dim), axis=-1)
    return jnp.einsum("nhqk,nkhd->nqhd", w, v).reshape(n, t, heads * head_dim)


MODELS = {"mlp": MLP, "cnn": CNN, "resnet": ResNet, "transformer": Transformer}


def build_model(
    kind: str,
    *,
    num_classes: int,
    width: int = 100,
    depth: int = 5,
    norm: str = "none",
    norm_position: str = "before",
    norm_overrides: Overrides = (),
    activation: str = "relu",
    dropout: bool = False,
    weight_std: bool = False,
    api: str = "linen",
) -> Any:
    """Build a model by kind: ``mlp`` (``depth`` hidden layers of ``width``), ``cnn``
    (``depth`` conv blocks of ``width`` channels, doubled at the second half; ``weight_std``:
    weight-standardized convolutions), ``resnet`` (``depth`` basic blocks) or ``transformer``
    (``depth`` pre-LN blocks of width ``width`` over patches of 4 values).

    ``api="nnx"`` builds the Flax NNX version instead, an
    :class:`experiments.nnx_models.NNXModel` with the same ``apply`` signature (same numbers)."""
    if api not in registry.APIS:
        raise ValueError(f"api={api!r} is unknown; expected one of {list(registry.APIS)}")
    if api == "nnx":
        from experiments.nnx_models import build_nnx_model  # imports this module

        return build_nnx_model(kind, num_classes=num_classes, width=width, depth=depth, norm=norm,
                               norm_position=norm_position, norm_overrides=norm_overrides,
                               activation=activation, dropout=dropout, weight_std=weight_std)
    if kind not in MODELS:
        raise ValueError(f"model={kind!r} is unknown; expected one of {list(MODELS)}")
    if norm_position not in ("before", "after"):
        raise ValueError(f"norm_position={norm_position!r}; expected 'before' or 'after'")
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation={activation!r} is unknown; expected one of {list(ACTIVATIONS)}")
    common = dict(
        num_classes=num_classes,
        norm=norm,
        norm_position=norm_position,
        norm_overrides=norm_overrides,
        activation=activation,
        dropout=dropout,
    )
    if weight_std and kind != "cnn":
        raise ValueError(f"weight_std=True is a CNN option; model={kind!r}")
    if kind == "mlp":
        return MLP(widths=(width,) * depth, **common)
    if kind == "transformer":
        if norm_position != "before":
            raise ValueError("the transformer is pre-LN: norm_position must be 'before'")
        return Transformer(width=width, depth=depth, **common)
    if kind == "cnn":
        chans = tuple(width if i < (depth + 1) // 2 else 2 * width for i in range(depth))
        return CNN(channels=chans, weight_std=weight_std, **common)
    chans = tuple(width if i < (depth + 1) // 2 else 2 * width for i in range(depth))
    return MODELS[kind](channels=chans, **common)


_OWN_LAYERS = ("dense_", "conv_", "head", "stem", "block")


def is_norm_param(path: tuple[Any, ...]) -> bool:
    """Whether a params-tree path belongs to a normalizer (every submodule the models do not name
    themselves: Dense/Conv layers are named ``dense_i``, ``conv_i``, ``head``, ``stem``, ``block*``)."""
    top = getattr(path[0], "key", str(path[0]))
    return not str(top).startswith(_OWN_LAYERS)


def scale_init(params: Any, mode: str, std: jax.Array | float) -> Any:
    """Rescale N(0, 1) kernels: ``mode='std'`` multiplies by ``std``; ``'he'`` by sqrt(2 / fan_in);
    ``'xavier'`` by sqrt(1 / fan_in). Biases and normalizer parameters are left as they are.

    ``std`` may be a traced scalar, so runs with different init stds share one compiled function.
    """

    def _scale(path: tuple[Any, ...], leaf: jax.Array) -> jax.Array:
        if getattr(path[-1], "key", None) != "kernel":
            return leaf
        fan_in = math.prod(leaf.shape[:-1])
        if mode == "std":
            return leaf * std
        if mode == "he":
            return leaf * math.sqrt(2.0 / fan_in)
        if mode == "xavier":
            return leaf * math.sqrt(1.0 / fan_in)
        raise ValueError(f"init={mode!r} is unknown; expected 'he', 'xavier' or 'std'")

    return jax.tree_util.tree_map_with_path(_scale, params)
