"""PyTorch BatchNorm <-> normzoo / flax BatchNorm: momentum and variables.

PyTorch (``torch.nn.BatchNorm1d/2d/3d``) and flax write the same running average with
opposite momenta: PyTorch ``running = (1 - m) running + m batch`` (default ``m = 0.1``),
flax ``running = m' running + (1 - m') batch`` (default 0.99), so ``m' = 1 - m``; PyTorch's
``momentum=None`` is the cumulative average, normzoo's ``estimator="cumulative"``.

The state dict ``weight, bias, running_mean, running_var, num_batches_tracked`` maps to
``{'params': {'scale', 'bias'}, 'batch_stats': {'mean', 'var'}}``. PyTorch's running
variance averages the *unbiased* batch variances (``n / (n - 1)`` times the biased one),
flax's and normzoo's the biased ones; the conversion keeps ``running_var`` as it is, since it
is the variance inference normalizes with, so the converted layer's eval output equals
PyTorch's. (Training on from it mixes biased batch variances into an unbiased average: a
difference of ``1 / (n - 1)`` relatively, for ``n`` elements per channel in a batch.)

Layout: PyTorch's BatchNorm2d normalizes channel axis 1 of NCHW inputs, flax's (and
normzoo's default) the last axis of NHWC inputs: transpose the input
(``x.transpose(0, 2, 3, 1)``), or build the layer with ``axis=1``. The variables are the same
either way. ``epsilon``: PyTorch's ``eps`` (default 1e-5, as flax's).

torch is not needed: anything ``np.asarray`` takes works, and torch tensors (also on GPU or
requiring grad) are detached and copied to the host.
"""

from __future__ import annotations

from typing import Any, Mapping

import numpy as np

#: PyTorch's BatchNorm state dict keys, in its order.
TORCH_KEYS = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")


def torch_momentum_to_flax(momentum: float | None) -> float | str:
    """flax's / normzoo's ``momentum`` for PyTorch's: ``1 - momentum``.

    PyTorch: ``running = (1 - m) running + m batch``; flax: ``running = m' running +
    (1 - m') batch``; so ``m' = 1 - m`` (PyTorch's default 0.1 is flax's 0.9). PyTorch's
    ``momentum=None`` (the cumulative average of all batches) returns ``"cumulative"``:
    normzoo's ``Standardization(area="batch", estimator="cumulative")``.

    Raises:
      TypeError: not a number or None.
      ValueError: outside [0, 1].
    """
    if momentum is None:
        return "cumulative"
    if isinstance(momentum, bool) or not isinstance(momentum, (int, float, np.floating)):
        raise TypeError(f"momentum must be a number in [0, 1] or None; got {momentum!r}")
    if not 0.0 <= float(momentum) <= 1.0:
        raise ValueError(f"momentum={momentum!r} must be in [0, 1] (PyTorch convention: "
                         "running = (1 - momentum) * running + momentum * batch)")
    return 1.0 - float(momentum)


def flax_momentum_to_torch(momentum: float | str) -> float | None:
    """PyTorch's ``momentum`` for flax's / normzoo's: ``1 - momentum`` (``"cumulative"`` ->
    None); the inverse of :func:`torch_momentum_to_flax`."""
    if momentum == "cumulative":
        return None
    value = torch_momentum_to_flax(momentum)  # the same map; validates
    assert isinstance(value, float)
    return value


def _array(value: Any, name: str, dtype: Any = None) -> np.ndarray:
    """``value`` as a numpy array (a torch tensor detached and moved to the host first)."""
    if hasattr(value, "detach") and callable(value.detach):
        value = value.detach()
        if hasattr(value, "cpu"):
            value = value.cpu()
        if hasattr(value, "numpy"):
            value = value.numpy()
    try:
        out = np.asarray(value)
    except Exception as error:  # noqa: BLE001 - reported with the key's name
        raise TypeError(f"{name} is not an array ({type(value).__name__}): {error}") from error
    if dtype is not None:
        out = out.astype(dtype)
    return out


def from_torch_batch_norm(
    state_dict: Mapping[str, Any],
    *,
    prefix: str = "",
    dtype: Any = np.float32,
    count: bool = False,
) -> dict[str, dict[str, np.ndarray]]:
    """flax / normzoo variables of a PyTorch BatchNorm's ``state_dict``.

    ``weight -> params/scale``, ``bias -> params/bias``, ``running_mean -> batch_stats/mean``,
    ``running_var -> batch_stats/var`` (kept as is: the unbiased running variance PyTorch's
    eval normalizes with; module docstring), so that ``y = (x - mean) / sqrt(var + eps) *
    scale + bias`` is PyTorch's eval output.

    Args:
      state_dict: the layer's state dict (``bn.state_dict()``), or a model's with ``prefix``.
        Values: torch tensors, numpy arrays, or anything ``np.asarray`` takes.
      prefix: the layer's key prefix in a model's state dict, e.g. ``"layer1.0.bn1."``.
      dtype: of the returned arrays (float32, as flax's and normzoo's variables).
      count: also return ``batch_stats/count`` (int32) from ``num_batches_tracked``: the
        state of normzoo's ``estimator="cumulative"`` (PyTorch's ``momentum=None``).

    Returns:
      ``{'params': {'scale', 'bias'}, 'batch_stats': {'mean', 'var'}}`` of numpy arrays; no
      ``params`` for ``affine=False`` (build the layer with ``use_scale=False,
      use_bias=False``), no ``batch_stats`` for ``track_running_stats=False``.

    Raises:
      TypeError: ``state_dict`` not a mapping, a value that is not an array.
      KeyError: neither running statistics nor affine params under ``prefix``, or only one of
        a pair (``weight`` / ``bias``, ``running_mean`` / ``running_var``).
      ValueError: shapes that are not one vector of the same length.
    """
    if not isinstance(state_dict, Mapping):
        raise TypeError(f"state_dict must be a mapping (bn.state_dict()); got "
                        f"{type(state_dict).__name__}")
    if not isinstance(prefix, str):
        raise TypeError(f"prefix must be a str; got {prefix!r}")
    present = {k: prefix + k in state_dict for k in TORCH_KEYS}
    out: dict[str, dict[str, np.ndarray]] = {}
    for (a, b), collection, names in (
            (("weight", "bias"), "params", ("scale", "bias")),
            (("running_mean", "running_var"), "batch_stats", ("mean", "var"))):
        if present[a] != present[b]:
            have, missing = (a, b) if present[a] else (b, a)
            raise KeyError(f"state_dict has {prefix + have!r} but not {prefix + missing!r}")
        if present[a]:
            out[collection] = {
                name: _array(state_dict[prefix + key], f"state_dict[{prefix + key!r}]", dtype)
                for key, name in zip((a, b), names)
            }
    if not out:
        raise KeyError(f"state_dict has none of {[prefix + k for k in TORCH_KEYS[:4]]}; keys: "
                       f"{sorted(state_dict)[:10]}")
    sizes = {}
    for collection, leaves in out.items():
        for name, value in leaves.items():
            if value.ndim != 1:
                raise ValueError(f"{collection}/{name} has shape {value.shape}; a BatchNorm's "
                                 "variables are vectors (num_features,)")
            sizes[f"{collection}/{name}"] = value.shape[0]
    if len(set(sizes.values())) > 1:
        raise ValueError(f"the BatchNorm's variables differ in length: {sizes}")
    if count:
        if "batch_stats" not in out:
            raise KeyError("count=True needs running statistics; the state dict has none "
                           "(track_running_stats=False)")
        tracked = (_array(state_dict[prefix + "num_batches_tracked"], "num_batches_tracked")
                   if present["num_batches_tracked"] else np.zeros((), np.int64))
        out["batch_stats"]["count"] = np.asarray(tracked, np.int32).reshape(())
    return out


def to_torch_batch_norm(
    variables: Mapping[str, Any],
    num_batches_tracked: int | None = None,
    *,
    dtype: Any = np.float32,
) -> dict[str, np.ndarray]:
    """A PyTorch BatchNorm state dict (numpy arrays) of flax / normzoo BatchNorm variables.

    The inverse of :func:`from_torch_batch_norm`: ``params/scale -> weight``, ``params/bias
    -> bias``, ``batch_stats/mean -> running_mean``, ``batch_stats/var -> running_var``
    (as is: PyTorch's eval then normalizes exactly as the flax layer's), flattened to
    ``(num_features,)``. Load with ``bn.load_state_dict({k: torch.from_numpy(v) for k, v
    in sd.items()})``.

    Args:
      variables: ``{'params': {'scale', 'bias'}, 'batch_stats': {'mean', 'var'}}`` of one
        layer (``variables['params']['BatchNorm_0']`` etc. picked out; an NNX layer's via
        ``normzoo.nnx.nnx_to_linen(layer)``).
      num_batches_tracked: PyTorch's counter; None: ``batch_stats/count`` when present
        (normzoo's counting estimators), else 0.
      dtype: of the float arrays.

    Returns:
      ``{'weight', 'bias', 'running_mean', 'running_var', 'num_batches_tracked'}`` (int64
      scalar); without ``weight`` / ``bias`` when the layer has neither (``affine=False``);
      a layer with only one of ``scale`` / ``bias`` gets the other as ones / zeros, so that
      it loads into an ``affine=True`` BatchNorm.

    Raises:
      TypeError: ``variables`` not a mapping, ``num_batches_tracked`` not an int.
      KeyError: no ``batch_stats/mean`` and ``var`` (PyTorch's BatchNorm keeps them).
      ValueError: sizes that differ.
    """
    if not isinstance(variables, Mapping):
        raise TypeError(f"variables must be a mapping {{'params': ..., 'batch_stats': ...}}; "
                        f"got {type(variables).__name__}")
    params = variables.get("params", {}) or {}
    stats = variables.get("batch_stats", {}) or {}
    if "mean" not in stats or "var" not in stats:
        raise KeyError(f"variables['batch_stats'] must have 'mean' and 'var'; got "
                       f"{sorted(stats)} (pass one layer's variables)")
    mean = _array(stats["mean"], "batch_stats/mean", dtype).reshape(-1)
    var = _array(stats["var"], "batch_stats/var", dtype).reshape(-1)
    out = {"running_mean": mean, "running_var": var}
    if "scale" in params or "bias" in params:
        c = mean.shape[0]
        out["weight"] = (_array(params["scale"], "params/scale", dtype).reshape(-1)
                         if "scale" in params else np.ones((c,), dtype))
        out["bias"] = (_array(params["bias"], "params/bias", dtype).reshape(-1)
                       if "bias" in params else np.zeros((c,), dtype))
    sizes = {k: v.shape[0] for k, v in out.items()}
    if len(set(sizes.values())) > 1:
        raise ValueError(f"the BatchNorm's variables differ in length: {sizes}")
    if num_batches_tracked is None:
        num_batches_tracked = int(np.asarray(stats["count"])) if "count" in stats else 0
    elif isinstance(num_batches_tracked, bool) or not isinstance(
            num_batches_tracked, (int, np.integer)):
        raise TypeError(f"num_batches_tracked must be an int; got {num_batches_tracked!r}")
    ordered = {k: out[k] for k in TORCH_KEYS[:4] if k in out}
    ordered["num_batches_tracked"] = np.asarray(num_batches_tracked, np.int64)
    return ordered
