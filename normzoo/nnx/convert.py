"""Move variables between Linen's ``{'params', 'batch_stats'}`` and an NNX module.

A Linen model keeps its variables in nested dicts keyed by submodule name; an NNX model keeps
them as attributes. :func:`linen_to_nnx` copies a Linen checkpoint into an NNX model whose
attribute paths name the same submodules, and :func:`nnx_to_linen` goes back. Both work for
normzoo's layers and for flax's own (``flax.linen.BatchNorm`` <-> ``flax.nnx.BatchNorm`` and any
mix with normzoo's): the variable names (``scale``, ``bias``, ``mean``, ``var``, ...) are the
same, and a variable stored flat in NNX (``(num_features,)``) and per feature axis in Linen is
reshaped when the sizes agree.

Paths: an NNX path ``('blocks', 0, 'norm', 'scale')`` is the Linen path
``('blocks_0', 'norm', 'scale')`` (a list index joins its attribute as Linen's automatic names
do); ``rename`` maps other NNX path prefixes to Linen ones, for example
``{('bn',): ('BatchNorm_0',)}`` for a Linen model that named nothing.

    >>> variables = linen_model.init(key, x)
    >>> linen_to_nnx(variables, nnx_model)       # the NNX model now computes the same y
    >>> nnx_to_linen(nnx_model) == variables      # and back
"""

from __future__ import annotations

from typing import Any, Mapping

import jax
import jax.numpy as jnp
from flax import nnx

#: NNX variable type -> Linen collection.
COLLECTIONS: dict[type, str] = {nnx.Param: "params", nnx.BatchStat: "batch_stats"}

Path = tuple[Any, ...]


def linen_path(path: Path, rename: Mapping[Path, Path] | None = None) -> tuple[str, ...]:
    """The Linen path of an NNX variable path (list indices joined, ``rename`` applied)."""
    path = tuple(path)
    for prefix, target in sorted((rename or {}).items(), key=lambda kv: -len(kv[0])):
        if path[: len(prefix)] == tuple(prefix):
            path = tuple(target) + path[len(prefix):]
            break
    out: list[str] = []
    for part in path:
        if isinstance(part, int) and out:
            out[-1] = f"{out[-1]}_{part}"
        else:
            out.append(str(part))
    return tuple(out)


def _variables(model: Any):
    """``(nnx path, collection, Variable)`` for every Param and BatchStat of ``model``."""
    for path, node in nnx.iter_graph(model):
        for kind, collection in COLLECTIONS.items():
            if isinstance(node, kind):
                yield tuple(path), collection, node


def linen_to_nnx(variables: Mapping[str, Any], model: Any, *,
                 rename: Mapping[Path, Path] | None = None) -> Any:
    """Copies Linen ``variables`` into ``model`` in place (and returns it).

    Every ``nnx.Param`` / ``nnx.BatchStat`` of the model must have its Linen twin, in
    ``params`` / ``batch_stats``, with the same number of elements; Linen variables the model
    does not have are an error too, so a mismatched pair of models cannot load silently.

    Raises:
      KeyError: a variable missing on either side (all of them named).
      ValueError: a variable whose size differs.
    """
    flat = {
        (collection, *path): leaf
        for collection in COLLECTIONS.values()
        for path, leaf in _flatten(variables.get(collection, {}))
    }
    seen = set()
    missing = []
    writes = []
    for path, collection, variable in _variables(model):
        key = (collection, *linen_path(path, rename))
        if key not in flat:
            missing.append("/".join(key))
            continue
        seen.add(key)
        value = jnp.asarray(flat[key])
        if value.size != variable.size:
            raise ValueError(
                f"{'/'.join(key)} has shape {value.shape} in the Linen variables but "
                f"{variable.shape} in the NNX model"
            )
        writes.append((variable, value))
    extra = sorted("/".join(k) for k in set(flat) - seen)
    if missing or extra:
        raise KeyError(
            f"the Linen variables and the NNX model do not match: missing in the Linen "
            f"variables: {missing}; not in the NNX model: {extra} (pass rename= to map paths)"
        )
    # Every check passed: only now is the model written, so a failed load leaves it as it was.
    for variable, value in writes:
        variable.set_value(jnp.reshape(value, variable.shape).astype(variable.dtype))
    return model


def nnx_to_linen(model: Any, *, rename: Mapping[Path, Path] | None = None,
                 shapes: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """``{'params': ..., 'batch_stats': ...}`` of ``model`` as nested dicts on Linen paths.

    ``shapes``: optional Linen variables (or their ``jax.eval_shape``) to take each leaf's
    shape from, for Linen layers that keep a variable per feature axis where NNX keeps it flat.
    """
    out: dict[str, Any] = {}
    template = dict(_flatten_all(shapes)) if shapes is not None else {}
    for path, collection, variable in _variables(model):
        key = (collection, *linen_path(path, rename))
        value = variable[...]
        if key in template:
            value = jnp.reshape(value, jnp.shape(template[key]))
        node = out
        for part in key[:-1]:
            node = node.setdefault(part, {})
        node[key[-1]] = value
    return out


def _flatten(tree: Mapping[str, Any]):
    for path, leaf in jax.tree_util.tree_flatten_with_path(dict(tree))[0]:
        yield tuple(p.key for p in path), leaf


def _flatten_all(tree: Mapping[str, Any]):
    for collection in COLLECTIONS.values():
        for path, leaf in _flatten(tree.get(collection, {})):
            yield (collection, *path), leaf
