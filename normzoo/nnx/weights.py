"""Weight-space normalization as Flax NNX layers: the twins of :mod:`normzoo.linen.weights`.

Layers that normalize their own kernel (flax.nnx's layer with its constructor, variables and
call, plus the normalization's own keywords; flax.nnx's own call runs on the normalized
kernel, the stored ``kernel`` param is left as it is):

==================  =================  ============================================  ==========
layer               flax.nnx base      extra keywords / variables                    linen twin
==================  =================  ============================================  ==========
``WSLinear``        ``nnx.Linear``     ``epsilon=1e-5, ddof=0``                      WSDense
``WSConv``          ``nnx.Conv``       ``epsilon=1e-5, ddof=0``                      WSConv
``ScaledWSConv``    ``nnx.Conv``       ``epsilon=1e-4, gain_init``; ``gain`` Param   ScaledWSConv
==================  =================  ============================================  ==========

(``WSDense`` is ``WSLinear``, under linen's name.)

Wrappers of any layer, ``Wrapper(layer, ..., rngs=rngs)(x)``:

* ``WeightNorm`` and ``SpectralNorm``: flax.nnx's constructor and call, flax.nnx's variables
  and layout (``scales``: a dict from the wrapped param's path to its scale;
  ``batch_stats``: ``path + ('u',)`` ``(1, out)`` and ``path + ('sigma',)`` ``()``
  ``nnx.BatchStat``; ``use_running_average = not update_stats``, so ``model.train()`` /
  ``model.eval()`` / ``nnx.view`` switch the updates), and flax.nnx's numbers on a first
  call. Two things flax.nnx 0.12 gets wrong are fixed: flax.nnx writes the normalized
  weight back into the wrapped layer's param at every call (the optimizer then steps from
  ``v / ||v||`` or ``W / sigma``, not from ``v`` or ``W``, unlike the papers and flax.linen), and its ``WeightNorm.scales`` are plain arrays, not ``nnx.Param``, so
  ``g`` is never trained. Here the param keeps its value (the layer is
  called on a shallow copy holding the normalized weight, :func:`call_with`) and every
  scale is an ``nnx.Param``: training follows the linen layer step for step, and a model
  closed over by a plain ``jax.jit`` works (flax.nnx's raises ``TraceContextError``).
  ``SpectralNorm``'s ``u`` starts as flax.nnx's
  (``normal(0.01)``, one ``rngs.params()`` key per matrix); a scale takes one
  ``rngs.params()`` key (flax.nnx passes the stream itself to ``scale_init``).
* ``CenteredWeightNorm`` (Huang et al. 2017): ``WeightNorm``'s constructor and variables,
  each output channel centered before it is normalized.

Numbers: the same as the linen twin's for the same variables (tested), all on
:mod:`normzoo.functional.weights` (statistics in float32 at least).
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
from flax import nnx
from flax.linen import dtypes
from flax.nnx.nn.dtypes import promote_dtype as flax_promote_dtype
from jax.nn import initializers

from normzoo.functional import weights as W
from normzoo.functional.axes import Axes, canonicalize_axes

Array = jax.Array
Initializer = Callable[..., Array]

__all__ = [
    "CenteredWeightNorm",
    "ScaledWSConv",
    "SpectralNorm",
    "WSConv",
    "WSDense",
    "WSLinear",
    "WeightNorm",
]


def call_with(module: nnx.Module, values: Mapping[tuple, Array],
              fn: Callable[[nnx.Module], Any]) -> Any:
    """``fn(copy)``, ``copy`` a shallow copy of ``module`` whose variables at the paths of
    ``values`` hold those values.

    How a normalized weight reaches a layer whose call reads ``self.kernel[...]``: the layer's
    own code runs, gradients flow to the stored value through the normalization, and the
    stored param is never written (flax.nnx's wrappers write the normalized weight into it;
    writing would also fail for a module closed over by a plain
    ``jax.jit``). The copy shares every other array with ``module``; whatever else the call
    changes in it (an inner BatchNorm's statistics, an RNG count) is written back.
    """
    graphdef, state = nnx.split(module)
    copy = nnx.merge(graphdef, state, copy=True)
    copied = dict(nnx.to_flat_state(nnx.state(copy)))
    for path, value in values.items():
        copied[path].set_value(value)
    result = fn(copy)
    after = dict(nnx.to_flat_state(nnx.state(copy)))
    for path, variable in nnx.to_flat_state(state):
        if path in values or path not in after:
            continue
        value = after[path].get_value()
        if value is not variable.get_value():
            variable.set_value(value)
    return result


def _params(module: nnx.Module) -> list[tuple[tuple, nnx.Variable]]:
    """``(path, nnx.Param)`` of every param of ``module``, in flax's order."""
    return list(nnx.to_flat_state(nnx.state(module, nnx.Param)))


# ----------------------------------------------------------------------------- own kernels
class WSLinear(nnx.Linear):
    """``nnx.Linear`` with Weight Standardization (Qiao et al. 2019, arXiv 1903.10520).

    ``y = x W_hat + b``, ``W_hat = (W - mean(W)) / (std(W) + epsilon)`` per output feature
    (:func:`normzoo.functional.weight_standardization`). ``nnx.Linear(in_features,
    out_features, *, ..., rngs)``'s arguments and variables (``kernel (in, out)``, ``bias``),
    plus ``epsilon`` (1e-5, the authors') and ``ddof`` (0: biased std, the paper and the
    authors' TensorFlow layer; 1: their PyTorch layer). The linen twin is ``WSDense``.
    """

    def __init__(self, in_features: int, out_features: int, *, epsilon: float = 1e-5,
                 ddof: int = 0, **kwargs: Any):
        super().__init__(in_features, out_features, **kwargs)
        self.epsilon = epsilon
        self.ddof = ddof
        jax.eval_shape(self._normalize, self.kernel.get_value())  # errors at construction

    def _normalize(self, kernel: Array) -> Array:
        return W.weight_standardization(kernel, epsilon=self.epsilon, ddof=self.ddof)

    def normalized_kernel(self) -> Array:
        """The kernel the call uses: ``W_hat``."""
        return self._normalize(self.kernel[...])

    def __call__(self, inputs: Array, out_sharding: Any = None) -> Array:
        """``nnx.Linear``'s call with the standardized kernel."""
        return call_with(self, {("kernel",): self.normalized_kernel()},
                         lambda layer: nnx.Linear.__call__(layer, inputs, out_sharding))


#: linen's name for :class:`WSLinear`.
WSDense = WSLinear


class WSConv(nnx.Conv):
    """``nnx.Conv`` with Weight Standardization (Qiao et al. 2019): each output channel's
    filter, over ``(*kernel_size, in / groups)``, standardized before the convolution.

    ``nnx.Conv(in_features, out_features, kernel_size, strides, *, ..., rngs)``'s arguments and
    variables, plus ``epsilon`` (1e-5) and ``ddof`` (0) as :class:`WSLinear`. A ``mask``
    multiplies the standardized kernel (its statistics are over the whole filter).
    """

    def __init__(self, in_features: int, out_features: int, kernel_size: int | Sequence[int],
                 strides: Any = 1, *, epsilon: float = 1e-5, ddof: int = 0, **kwargs: Any):
        super().__init__(in_features, out_features, kernel_size, strides, **kwargs)
        self.epsilon = epsilon
        self.ddof = ddof
        jax.eval_shape(self._normalize, self.kernel.get_value())

    def _normalize(self, kernel: Array) -> Array:
        return W.weight_standardization(kernel, epsilon=self.epsilon, ddof=self.ddof)

    def normalized_kernel(self) -> Array:
        """The kernel the call uses: ``W_hat``."""
        return self._normalize(self.kernel[...])

    def __call__(self, inputs: Array, out_sharding: Any = None) -> Array:
        """``nnx.Conv``'s call with the standardized kernel."""
        return call_with(self, {("kernel",): self.normalized_kernel()},
                         lambda layer: nnx.Conv.__call__(layer, inputs, out_sharding))


class ScaledWSConv(nnx.Conv):
    """``nnx.Conv`` with Scaled Weight Standardization and a learned gain (Brock et al. 2021,
    NF-Nets, arXiv 2102.06171).

    ``W_hat = gain * (W - mean(W)) / sqrt(max(var(W) * fan_in, epsilon))`` per output channel
    (:func:`normzoo.functional.scaled_weight_standardization`). ``nnx.Conv``'s arguments and
    variables plus ``gain``, an ``nnx.Param`` ``(out_features,)`` from ``gain_init`` (ones,
    one ``rngs.params()`` key), and ``epsilon`` (1e-4, NF-Nets').
    """

    def __init__(self, in_features: int, out_features: int, kernel_size: int | Sequence[int],
                 strides: Any = 1, *, epsilon: float = 1e-4,
                 gain_init: Initializer = initializers.ones, rngs: nnx.Rngs, **kwargs: Any):
        super().__init__(in_features, out_features, kernel_size, strides, rngs=rngs, **kwargs)
        self.epsilon = epsilon
        self.gain = nnx.Param(gain_init(rngs.params(), (out_features,), self.param_dtype))
        jax.eval_shape(self._normalize, self.kernel.get_value(), self.gain.get_value())

    def _normalize(self, kernel: Array, gain: Array) -> Array:
        return W.scaled_weight_standardization(kernel, gain, epsilon=self.epsilon)

    def normalized_kernel(self) -> Array:
        """The kernel the call uses: ``W_hat`` (with the gain)."""
        return self._normalize(self.kernel[...], self.gain[...])

    def __call__(self, inputs: Array, out_sharding: Any = None) -> Array:
        """``nnx.Conv``'s call with the standardized, gained kernel."""
        return call_with(self, {("kernel",): self.normalized_kernel()},
                         lambda layer: nnx.Conv.__call__(layer, inputs, out_sharding))


# ----------------------------------------------------------------------------- wrappers
class WeightNorm(nnx.Module):
    """Weight Normalization of a wrapped layer (Salimans & Kingma 2016, arXiv 1602.07868).

    ``w = scale * v / ||v||`` for each param ``v`` of ``layer_instance`` that
    ``variable_filter`` selects, the norm over every axis except ``feature_axes``
    (:func:`normzoo.functional.weight_norm`). flax.nnx.WeightNorm's constructor and layout
    (``scales[path]``, shaped as the feature axes, here ``nnx.Param``); the param itself is not
    overwritten (see the module docstring).

    Args:
      layer_instance: the wrapped module.
      feature_axes: the axes that keep their own norm (default -1); None for one norm.
      use_scale: learn a scale (``g``) per feature; False fixes it to 1.
      scale_init: initializer of the scales (ones), called with ``(key, shape, param_dtype)``.
      epsilon: added to the squared norm (1e-12).
      dtype: the normalized weight's dtype (default: inferred from the param and its scale).
      param_dtype: the scales' dtype.
      variable_filter: which params (default ``nnx.PathContains('kernel')``).
      promote_dtype: accepted for flax.nnx's signature (flax.nnx does not use it either).
      rngs: the scales' keys.
    """

    _function = staticmethod(W.weight_norm)
    _needs_fan_in = False

    def __init__(
        self,
        layer_instance: nnx.Module,
        *,
        feature_axes: Axes | None = -1,
        use_scale: bool = True,
        scale_init: Initializer = initializers.ones,
        epsilon: float = 1e-12,
        dtype: Any = None,
        param_dtype: Any = jnp.float32,
        variable_filter: Any = nnx.PathContains("kernel"),
        promote_dtype: Any = flax_promote_dtype,
        rngs: nnx.Rngs,
    ):
        self.layer_instance = layer_instance
        self.feature_axes = () if feature_axes is None else feature_axes
        self.use_scale = use_scale
        self.scale_init = scale_init
        self.epsilon = epsilon
        self.dtype = dtype
        self.param_dtype = param_dtype
        self.variable_filter = nnx.filterlib.to_predicate(variable_filter)
        self.promote_dtype = promote_dtype
        scales = {}
        for path, param in self._targets():
            feature_axes_, _ = self._axes(path, param)
            if use_scale:
                shape = tuple(param.shape[i] for i in feature_axes_)
                scales[path] = nnx.Param(scale_init(rngs.params(), shape, param_dtype))
        self.scales: dict | None = nnx.data(scales) if use_scale else None
        for path, param in self._targets():  # argument errors at construction
            jax.eval_shape(functools.partial(self._normalize, path), param.get_value(),
                           None if self.scales is None else self.scales[path].get_value())

    def _targets(self) -> list[tuple[tuple, nnx.Variable]]:
        return [(p, v) for p, v in _params(self.layer_instance) if self.variable_filter(p, v)]

    def _axes(self, path: tuple, param: Any) -> tuple[tuple[int, ...], tuple[int, ...]]:
        name = "/".join(map(str, path))
        try:
            feature_axes = canonicalize_axes(param.ndim, self.feature_axes, name="feature_axes")
        except (TypeError, ValueError) as error:
            raise type(error)(f"{type(self).__name__}: {error} (param {name!r} of shape "
                              f"{tuple(param.shape)})") from None
        fan_in = tuple(i for i in range(param.ndim) if i not in feature_axes)
        if self._needs_fan_in and not fan_in:
            raise ValueError(
                f"{type(self).__name__}: param {name!r} of shape "
                f"{tuple(param.shape)} has no axis outside feature_axes={self.feature_axes!r} "
                "to normalize over; restrict variable_filter to kernels, e.g. "
                "nnx.PathContains('kernel')"
            )
        return feature_axes, fan_in

    def _normalize(self, path: tuple, value: Array, scale: Array | None) -> Array:
        _, fan_in = self._axes(path, value)
        out = self._function(value, scale, fan_in_axes=fan_in, epsilon=self.epsilon)
        return jnp.asarray(out, dtypes.canonicalize_dtype(value, scale, dtype=self.dtype))

    def normalized(self) -> list[tuple[tuple, Array]]:
        """``(path, w)``: the weights the call uses, for each selected param."""
        result = []
        for path, param in self._targets():
            scale = None
            if self.use_scale:
                if self.scales is None or path not in self.scales:
                    raise RuntimeError(
                        f"{type(self).__name__}: no scale for the param {path} of the wrapped "
                        "layer; its params must not change after the wrapper is built")
                scale = self.scales[path][...]
            result.append((path, self._normalize(path, param[...], scale)))
        return result

    def __call__(self, x: Array, *args: Any, **kwargs: Any) -> Any:
        """Calls ``layer_instance(x, *args, **kwargs)`` with its weights normalized."""
        return call_with(self.layer_instance, dict(self.normalized()),
                         lambda layer: layer(x, *args, **kwargs))


class CenteredWeightNorm(WeightNorm):
    """Centered Weight Normalization of a wrapped layer (Huang et al., ICCV 2017).

    ``w = scale * (v - mean(v)) / ||v - mean(v)||`` over every axis except ``feature_axes``
    (:func:`normzoo.functional.centered_weight_norm`). :class:`WeightNorm`'s constructor and
    variables; every selected param needs an axis outside ``feature_axes``.
    """

    _function = staticmethod(W.centered_weight_norm)
    _needs_fan_in = True


class SpectralNorm(nnx.Module):
    """Spectral Normalization of a wrapped layer (Miyato et al. 2018, arXiv 1802.05957).

    Each param of rank >= 2 of ``layer_instance``, viewed as ``(-1, out)``, divided by its
    largest singular value, estimated by ``n_steps`` of power iteration from a persistent
    ``u`` (:func:`normzoo.functional.spectral_norm`). flax.nnx.SpectralNorm's constructor,
    call and layout (``batch_stats[path + ('u',)]`` ``(1, out)``, ``batch_stats[path +
    ('sigma',)]`` ``()``, ``nnx.BatchStat`` in ``param_dtype``); the param itself is not
    overwritten (see the module docstring).

    Args:
      layer_instance: the wrapped module.
      n_steps: power-iteration steps per call, an int >= 0 (0: no normalization, as flax).
      epsilon: added to the squared norms of the iteration (1e-12).
      dtype: the normalized weight's dtype (default: inferred from the param and ``u``).
      param_dtype: the dtype of ``u`` and ``sigma``.
      error_on_non_matrix: raise for a param of rank > 2 instead of flattening it.
      update_stats: the default of the call's ``update_stats`` (stored as
        ``use_running_average = not update_stats``, which ``model.train()`` / ``.eval()`` set).
      rngs: ``u``'s keys.
    """

    def __init__(
        self,
        layer_instance: nnx.Module,
        *,
        n_steps: int = 1,
        epsilon: float = 1e-12,
        dtype: Any = None,
        param_dtype: Any = jnp.float32,
        error_on_non_matrix: bool = False,
        update_stats: bool = True,
        rngs: nnx.Rngs,
    ):
        if isinstance(n_steps, bool) or not isinstance(n_steps, int) or n_steps < 0:
            raise ValueError(f"SpectralNorm: n_steps={n_steps!r} must be an int >= 0")
        self.layer_instance = layer_instance
        self.n_steps = n_steps
        self.epsilon = epsilon
        self.dtype = dtype
        self.param_dtype = param_dtype
        self.error_on_non_matrix = error_on_non_matrix
        self.use_running_average = not update_stats
        batch_stats = {}
        for path, param in self._targets():
            key = rngs.params()
            batch_stats[path + ("u",)] = nnx.BatchStat(
                initializers.normal()(key, (1, param.shape[-1]), param_dtype))
            batch_stats[path + ("sigma",)] = nnx.BatchStat(initializers.ones(key, (), param_dtype))
        self.batch_stats = nnx.data(batch_stats)
        for path, param in self._targets():  # argument errors at construction
            jax.eval_shape(functools.partial(W.spectral_norm, n_steps=n_steps, epsilon=epsilon),
                           param.get_value(), batch_stats[path + ("u",)].get_value())

    def _targets(self) -> list[tuple[tuple, nnx.Variable]]:
        """The params that are normalized: rank >= 2 (none when ``n_steps`` is 0)."""
        targets = []
        for path, param in _params(self.layer_instance):
            if param.ndim <= 1 or self.n_steps < 1:
                continue
            if param.ndim > 2 and self.error_on_non_matrix:
                raise ValueError(
                    f"SpectralNorm: param {'/'.join(map(str, path))!r} has shape "
                    f"{tuple(param.shape)} (rank {param.ndim}) but error_on_non_matrix=True; "
                    f"set it to False to flatten it to (-1, {param.shape[-1]})"
                )
            targets.append((path, param))
        return targets

    def __call__(self, x: Array, update_stats: bool | None = None, **kwargs: Any) -> Any:
        """Calls ``layer_instance(x, **kwargs)`` with its matrices spectrally normalized.

        Args:
          update_stats: store the new ``u`` and ``sigma``; default ``not use_running_average``.
        """
        if update_stats is None:
            if self.use_running_average is None:
                raise ValueError(
                    "No update_stats was given to SpectralNorm: pass it to the constructor or "
                    "the call, or set it with model.train() / model.eval()")
            update_stats = not self.use_running_average
        values = {}
        for path, param in self._targets():
            u_var = self.batch_stats.get(path + ("u",))
            sigma_var = self.batch_stats.get(path + ("sigma",))
            if u_var is None or sigma_var is None:
                raise RuntimeError(
                    f"SpectralNorm: no u / sigma for the param {path} of the wrapped layer; "
                    "its params must not change after the wrapper is built")
            u = u_var[...]
            normalized, new_u, sigma = W.spectral_norm(
                param[...], u, n_steps=self.n_steps, epsilon=self.epsilon)
            if update_stats:
                u_var.set_value(new_u)
                sigma_var.set_value(sigma.astype(sigma_var[...].dtype))
            dtype = dtypes.canonicalize_dtype(param[...], u, dtype=self.dtype)
            values[path] = jnp.asarray(normalized, dtype)
        return call_with(self.layer_instance, values, lambda layer: layer(x, **kwargs))

    def set_view(self, use_running_average: bool | None = None):
        """Used by ``nnx.view``.

        Args:
          use_running_average: True: keep ``u`` and ``sigma`` (evaluation); False: update them.
        """
        if use_running_average is not None:
            self.use_running_average = use_running_average

