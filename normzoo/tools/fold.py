"""Folding an inference-mode BatchNorm into the Dense / Conv layer before it.

At inference a BatchNorm is a per-channel affine map, so ``y = BN(x W + c)`` is one linear
layer (Ioffe & Szegedy 2015, section 3.1; Jacob et al. 2018, "Quantization and Training of
Neural Networks for Efficient Integer-Arithmetic-Only Inference", section 3.2). With
``s = g / sqrt(var + eps)`` per output channel::

    W' = W * s            (each output channel's column of W, or filter of a Conv)
    c' = (c - mu) * s + b

(``g = 1`` without ``use_scale``; ``b = 0`` without ``use_bias``; ``c = 0`` when the
Dense / Conv has no bias: a bias is created.) The same holds for normzoo's other batch-area
layers with running statistics: ``Centering`` (``s = g``, statistics ``mean``) and
``Scaling`` (``s = g / sqrt(mean_square + eps)``, no shift). Whitening layers are not
per-channel and are refused.

All math is float32 (or wider); the results are cast back to the kernel's / bias's dtype.

* :func:`fold_batch_norm_linen`: Linen variable trees, by path;
* :func:`fold_batch_norm_nnx`: an ``nnx.Linear`` / ``nnx.Conv`` and the BatchNorm after it.

Both take normzoo's layers (``normzoo.BatchNorm``, ``normzoo.nnx.BatchNorm``, ...) and
flax's own (``flax.linen.BatchNorm``, ``flax.nnx.BatchNorm``): their variables have the same
names (``scale``, ``bias``; ``mean``, ``var``).
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import jax.numpy as jnp
import numpy as np
from flax import nnx

Path = tuple[str, ...]

#: The statistics a foldable layer keeps (normzoo's ``STATISTICS``); a layer's statistics
#: must be exactly one of these sets (``count`` aside).
FOLDABLE_STATISTICS = ({"mean", "var"}, {"mean"}, {"mean_square"})
#: Extra running state dropped with the layer (the estimators' update counter).
_STATE = ("count",)


def fold_affine(
    kernel: Any,
    bias: Any | None,
    stats: Mapping[str, Any],
    scale: Any | None,
    shift: Any | None,
    epsilon: float,
    *,
    where: str = "the layer",
) -> tuple[Any, Any]:
    """``(W', c')`` for ``BN(x W + c)`` (module docstring): the kernel's last axis is the
    output channels, ``stats`` the BatchNorm's running statistics (``mean`` / ``var`` /
    ``mean_square``), ``scale`` / ``shift`` its ``scale`` / ``bias`` params or None.

    Raises:
      ValueError: statistics that are not a foldable set, or sizes that differ from the
        kernel's output channels (``where`` names the pair in the message).
    """
    keys = set(stats) - set(_STATE)
    if keys not in FOLDABLE_STATISTICS:
        raise ValueError(
            f"{where}: cannot fold statistics {sorted(keys)}; a per-channel layer keeps one of "
            f"{[sorted(s) for s in FOLDABLE_STATISTICS]} (whitening layers mix channels and "
            "do not fold into a per-channel affine map)"
        )
    kernel = jnp.asarray(kernel)
    if kernel.ndim < 1:
        raise ValueError(f"{where}: the kernel must have an output-channel axis; got shape "
                         f"{kernel.shape}")
    channels = kernel.shape[-1]
    math_dtype = jnp.promote_types(kernel.dtype, jnp.float32)

    def channel(name: str, value: Any) -> Any:
        value = jnp.asarray(value)
        if value.size != channels:
            raise ValueError(
                f"{where}: the BatchNorm's {name} has shape {value.shape} ({value.size} "
                f"channels) but the kernel of shape {kernel.shape} has {channels} output "
                "channels (its last axis)"
            )
        return value.reshape((channels,)).astype(math_dtype)

    eps = jnp.asarray(epsilon, math_dtype)
    s = jnp.ones((channels,), math_dtype) if scale is None else channel("scale", scale)
    if "var" in keys:
        s = s / jnp.sqrt(channel("var", stats["var"]) + eps)
    elif "mean_square" in keys:
        s = s / jnp.sqrt(channel("mean_square", stats["mean_square"]) + eps)
    c = jnp.zeros((channels,), math_dtype) if bias is None else channel("bias", bias)
    if "mean" in keys:
        c = c - channel("mean", stats["mean"])
    c = c * s
    if shift is not None:
        c = c + channel("bias", shift)
    new_kernel = (kernel.astype(math_dtype) * s).astype(kernel.dtype)
    bias_dtype = kernel.dtype if bias is None else jnp.asarray(bias).dtype
    new_bias = c.astype(bias_dtype)
    if bias is not None:
        new_bias = new_bias.reshape(jnp.shape(bias))
    return new_kernel, new_bias


# --------------------------------------------------------------------------- Linen
def fold_batch_norm_linen(
    variables: Mapping[str, Any],
    pairs: Mapping[Sequence[str], Sequence[str]] | Sequence[tuple[Sequence[str], Sequence[str]]],
    *,
    epsilon: float | Mapping[Sequence[str], float] = 1e-5,
) -> dict[str, Any]:
    """Folds inference-mode BatchNorms into the Dense / Conv layers before them.

    ``W' = W * g / sqrt(var + eps)`` per output channel and ``c' = (c - mu) * g /
    sqrt(var + eps) + b`` (Ioffe & Szegedy 2015; module docstring), for each ``(layer path,
    BatchNorm path)`` of ``pairs``.

    Args:
      variables: a Linen model's ``{'params': ..., 'batch_stats': ...}``.
      pairs: ``{layer_path: batch_norm_path}`` (or a sequence of such pairs); a path is a
        tuple of submodule names, e.g. ``{('Conv_0',): ('BatchNorm_0',)}``. The layer's
        ``kernel`` has its output channels last (flax's Dense and Conv); the BatchNorm must
        normalize those channels (its feature axis the last one, as flax's default).
      epsilon: the BatchNorms' ``epsilon`` (Linen variables do not carry it): one number, or
        ``{batch_norm_path: epsilon}`` (default 1e-5, flax's and normzoo's BatchNorm default).

    Returns:
      New variables (the input is not changed): each layer's ``kernel`` and ``bias`` folded
      (a ``bias`` created for a layer built with ``use_bias=False``), each BatchNorm's
      ``params`` and ``batch_stats`` removed (a collection left empty is removed too).

    The folded model is the same model with each folded BatchNorm replaced by the identity
    and each folded layer built with ``use_bias=True``, for example a ``fold: bool`` field::

        x = nn.Conv(64, (3, 3), use_bias=self.fold, name="conv")(x)
        if not self.fold:
            x = nn.BatchNorm(use_running_average=not train, name="bn")(x)

    Name the layers explicitly: without the BatchNorm, flax's automatic names
    (``BatchNorm_1``, ...) of the layers after it would shift.

    Raises:
      KeyError: a path that is not in ``variables`` (both paths named).
      ValueError: sizes that do not match, a BatchNorm without ``mean`` / ``var``, a path
        used twice, a negative ``epsilon``.
      TypeError: ``pairs`` or a path of the wrong type.
    """
    if not isinstance(variables, Mapping):
        raise TypeError(f"variables must be a mapping {{'params': ..., 'batch_stats': ...}}; "
                        f"got {type(variables).__name__}")
    pair_list = _pairs(pairs)
    out = _to_dicts(variables)
    params = out.get("params", {})
    stats = out.get("batch_stats", {})
    used: set[Path] = set()
    for layer_path, bn_path in pair_list:
        where = f"fold {'/'.join(layer_path)} <- {'/'.join(bn_path)}"
        for path in (layer_path, bn_path):
            if path in used:
                raise ValueError(f"{where}: path {'/'.join(path)} appears in more than one pair")
            used.add(path)
        eps = _epsilon(epsilon, bn_path, where)
        layer = _node(params, layer_path, f"{where}: params/{'/'.join(layer_path)}")
        if not isinstance(layer, dict) or "kernel" not in layer:
            has = sorted(layer) if isinstance(layer, dict) else type(layer).__name__
            raise KeyError(f"{where}: params/{'/'.join(layer_path)} has no 'kernel' (a Dense "
                           f"or Conv layer); it has {has}")
        bn_stats = _node(stats, bn_path, f"{where}: batch_stats/{'/'.join(bn_path)}")
        bn_params = _node(params, bn_path, None) or {}
        kernel, bias = fold_affine(
            layer["kernel"], layer.get("bias"), bn_stats, bn_params.get("scale"),
            bn_params.get("bias"), eps, where=where)
        layer["kernel"], layer["bias"] = kernel, bias
        _remove(params, bn_path)
        _remove(stats, bn_path)
    for collection in ("params", "batch_stats"):
        if collection in out and not out[collection]:
            del out[collection]
    return out


def _pairs(pairs: Any) -> list[tuple[Path, Path]]:
    items = pairs.items() if isinstance(pairs, Mapping) else pairs
    try:
        items = list(items)
    except TypeError:
        raise TypeError(f"pairs must be a mapping {{layer_path: batch_norm_path}} or a "
                        f"sequence of (layer_path, batch_norm_path); got {type(pairs).__name__}")
    if not items:
        raise ValueError("pairs is empty: nothing to fold")
    out = []
    for item in items:
        if not isinstance(item, (tuple, list)) or len(item) != 2:
            raise TypeError(
                f"pairs: each entry must be (layer_path, batch_norm_path); got {item!r}")
        out.append((_path(item[0], "layer path"), _path(item[1], "BatchNorm path")))
    return out


def _path(path: Any, what: str) -> Path:
    if isinstance(path, str):
        return (path,)
    if not isinstance(path, (tuple, list)) or not path or not all(
            isinstance(p, str) for p in path):
        raise TypeError(f"pairs: a {what} must be a non-empty tuple of submodule names "
                        f"(str); got {path!r}")
    return tuple(path)


def _epsilon(epsilon: Any, bn_path: Path, where: str) -> float:
    if isinstance(epsilon, Mapping):
        table = {(k,) if isinstance(k, str) else tuple(k): v for k, v in epsilon.items()}
        if bn_path not in table:
            raise KeyError(f"{where}: epsilon has no entry for {bn_path!r}")
        epsilon = table[bn_path]
    if isinstance(epsilon, bool) or not isinstance(epsilon, (int, float, np.floating)):
        raise TypeError(f"{where}: epsilon must be a number; got {epsilon!r}")
    if epsilon < 0:
        raise ValueError(f"{where}: epsilon={epsilon!r} must be >= 0")
    return float(epsilon)


def _to_dicts(tree: Any) -> Any:
    """Plain nested dicts (FrozenDicts thawed), leaves shared."""
    if isinstance(tree, Mapping):
        return {k: _to_dicts(v) for k, v in tree.items()}
    return tree


def _node(tree: dict, path: Path, missing: str | None) -> Any:
    node: Any = tree
    for part in path:
        if not isinstance(node, dict) or part not in node:
            if missing is None:
                return None
            raise KeyError(f"{missing} is not in the variables")
        node = node[part]
    return node


def _remove(tree: dict, path: Path) -> None:
    """Deletes ``path`` and the parents it leaves empty."""
    parents = [tree]
    for part in path[:-1]:
        node = parents[-1].get(part)
        if not isinstance(node, dict):
            return
        parents.append(node)
    parents[-1].pop(path[-1], None)
    for parent, part in zip(reversed(parents[:-1]), reversed(path[:-1])):
        if parent[part]:
            break
        del parent[part]


# --------------------------------------------------------------------------- NNX
def fold_batch_norm_nnx(layer: nnx.Linear | nnx.Conv, batch_norm: Any, *,
                        inplace: bool = False) -> nnx.Linear | nnx.Conv:
    """The ``nnx.Linear`` / ``nnx.Conv`` computing ``batch_norm(layer(x))`` in eval mode.

    ``W' = W * g / sqrt(var + eps)`` per output channel and ``c' = (c - mu) * g /
    sqrt(var + eps) + b`` (Ioffe & Szegedy 2015; module docstring), with ``eps`` the
    BatchNorm's ``epsilon`` and its running statistics.

    Args:
      layer: an ``nnx.Linear`` or ``nnx.Conv`` (output channels last).
      batch_norm: ``flax.nnx.BatchNorm``, ``normzoo.nnx.BatchNorm`` or another normzoo layer
        with per-channel running statistics (``Centering``, ``Scaling``, ``Standardization``
        over the batch area); its feature axis must be the last one (``axis=-1``).
      inplace: update ``layer`` itself (else a copy is returned and ``layer`` is unchanged).

    The running statistics are folded whatever ``batch_norm.use_running_average`` says: a
    BatchNorm in training mode (``use_running_average=False``) normalizes each batch with its
    own statistics, which no fixed linear layer can reproduce, so the fold is always of the
    eval-mode (running-statistics) BatchNorm. A layer built with ``use_bias=False`` gets a
    bias (``use_bias`` becomes True).

    Raises:
      TypeError: ``layer`` not an ``nnx.Linear`` / ``nnx.Conv``, or ``batch_norm`` without
        running statistics.
      ValueError: channel counts that differ, a feature axis other than the last.
    """
    if not isinstance(layer, (nnx.Linear, nnx.Conv)):
        raise TypeError(f"layer must be an nnx.Linear or nnx.Conv; got {type(layer).__name__}")
    name = type(batch_norm).__name__
    where = f"fold_batch_norm_nnx({type(layer).__name__}, {name})"
    stat_keys = [k for k in ("mean", "var", "mean_square", "count")
                 if isinstance(getattr(batch_norm, k, None), nnx.BatchStat)]
    if not stat_keys:
        raise TypeError(f"batch_norm must be a BatchNorm-like nnx module with running "
                        f"statistics (nnx.BatchStat 'mean' / 'var'); {name} has none")
    axis = getattr(batch_norm, "axis", -1)
    if axis not in (-1, (-1,), [-1]):
        raise ValueError(f"{where}: batch_norm.axis={axis!r}; folding needs the BatchNorm over "
                         "the last axis (-1), where Linear and Conv put their output channels")
    epsilon = getattr(batch_norm, "epsilon", None)
    if epsilon is None:
        raise TypeError(f"{where}: batch_norm has no 'epsilon' attribute")
    stats = {k: getattr(batch_norm, k)[...] for k in stat_keys}

    def param(owner: Any, key: str) -> Any:
        value = getattr(owner, key, None)
        return value[...] if isinstance(value, nnx.Variable) else None

    kernel, bias = fold_affine(
        layer.kernel[...], param(layer, "bias"), stats, param(batch_norm, "scale"),
        param(batch_norm, "bias"), epsilon, where=where)
    out = layer if inplace else nnx.clone(layer)
    out.kernel.set_value(kernel)
    if isinstance(getattr(out, "bias", None), nnx.Variable):
        out.bias.set_value(bias)
    else:
        out.bias = nnx.Param(bias)
        out.use_bias = True
    return out
