"""Weight-space normalization as flax.linen layers, on :mod:`normzoo.functional.weights`.

Layers that normalize their own kernel (flax.linen's layer with its fields, its variables and
its call; the kernel normalized before use, the stored ``kernel`` left as it is):

==================  =================  ===============================  =====================
layer               flax.linen base    params                           paper
==================  =================  ===============================  =====================
``WSDense``         ``nn.Dense``       kernel, bias                     Qiao et al. 2019
``WSConv``          ``nn.Conv``        kernel, bias                     Qiao et al. 2019
``ScaledWSConv``    ``nn.Conv``        kernel, gain (ones), bias        Brock et al. 2021
==================  =================  ===============================  =====================

Wrappers of any layer (``Wrapper(layer)(x)``), which normalize the wrapped layer's variables
through ``nn.map_variables`` as flax does:

* ``WeightNorm`` and ``SpectralNorm``: flax.linen's layers of the same name, field for field,
  variable for variable (``params`` ``'{layer}/{path}/scale'``; ``batch_stats``
  ``'{layer}/{path}/u'`` and ``'/sigma'``) and, in float32, bit for bit (tested against
  flax). What differs: the statistics of a bfloat16 / float16 kernel are computed in float32
  (flax computes them in the kernel's dtype); ``n_steps`` and ``epsilon`` are checked (flax
  takes ``n_steps=-1`` silently; ``n_steps=0`` is flax's "no normalization" here too); and an
  error names the variable. As flax.linen, initialization stores the normalized kernel
  (``map_variables(init=True)`` writes the mapped view back); later calls leave it alone.
* ``CenteredWeightNorm`` (Huang et al. 2017; flax has none): ``WeightNorm``'s fields and
  variables, each output channel centered before it is normalized.

The NNX twins are in :mod:`normzoo.nnx.weights`; the same variables give the same numbers.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Iterable

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax.linen import dtypes
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
    "WeightNorm",
]


# ----------------------------------------------------------------------------- own kernels
class _NormalizedKernel:
    """Mixin for a flax.linen layer that reads its kernel with ``self.param('kernel', ...)``:
    the value it gets is ``self.normalize_kernel(kernel)`` (the stored param is unchanged).
    flax documents overriding ``Module.param`` under ``nn.nowrap`` for exactly this."""

    @nn.nowrap
    def param(self, name: str, init_fn: Callable[..., Any], *init_args: Any, unbox: bool = True,
              **init_kwargs: Any) -> Any:
        value = super().param(name, init_fn, *init_args, unbox=unbox, **init_kwargs)
        if name != "kernel" or not unbox:
            return value
        return self.normalize_kernel(value)

    @nn.nowrap
    def normalize_kernel(self, kernel: Array) -> Array:
        raise NotImplementedError


class _Standardized(_NormalizedKernel):
    @nn.nowrap
    def normalize_kernel(self, kernel: Array) -> Array:
        """``(W - mean) / (std + epsilon)`` per output channel (the last axis)."""
        return W.weight_standardization(kernel, epsilon=self.epsilon, ddof=self.ddof)


class WSDense(_Standardized, nn.Dense):
    """``nn.Dense`` with Weight Standardization (Qiao et al. 2019, arXiv 1903.10520).

    ``y = x W_hat + b``, ``W_hat = (W - mean(W)) / (std(W) + epsilon)`` per output feature over
    the ``in`` inputs (:func:`normzoo.functional.weight_standardization`). ``nn.Dense``'s fields
    and variables (``kernel (in, out)``, ``bias (out,)``), plus:

    Attributes:
      epsilon: added to the standard deviation (default 1e-5, the authors').
      ddof: 0 (default, biased std: the paper, the authors' TensorFlow layer) or 1 (unbiased:
        their PyTorch layer).
    """

    epsilon: float = 1e-5
    ddof: int = 0


class WSConv(_Standardized, nn.Conv):
    """``nn.Conv`` with Weight Standardization (Qiao et al. 2019): each output channel's
    filter, over ``(*kernel_size, in / groups)``, standardized before the convolution.

    ``nn.Conv``'s fields and variables (``kernel (*kernel_size, in / groups, out)``, ``bias``),
    plus ``epsilon`` (1e-5) and ``ddof`` (0) as :class:`WSDense`. A ``mask`` multiplies the
    standardized kernel (its statistics are over the whole filter).
    """

    epsilon: float = 1e-5
    ddof: int = 0


class ScaledWSConv(_NormalizedKernel, nn.Conv):
    """``nn.Conv`` with Scaled Weight Standardization and a learned gain (Brock et al. 2021,
    NF-Nets, arXiv 2102.06171; deepmind-research ``nfnets/base.py`` ``WSConv2D``).

    ``W_hat = gain * (W - mean(W)) / sqrt(max(var(W) * fan_in, epsilon))`` per output channel
    over its fan-in ``(*kernel_size, in / groups)``
    (:func:`normzoo.functional.scaled_weight_standardization`). Params: ``kernel``, ``gain``
    ``(out,)`` (``gain_init``, ones), ``bias`` (``use_bias``, as ``nn.Conv``).

    Attributes:
      epsilon: the floor of ``var * fan_in`` (default 1e-4, NF-Nets').
      gain_init: initializer of ``gain`` (default ones).
    """

    epsilon: float = 1e-4
    gain_init: Initializer = initializers.ones

    @nn.nowrap
    def normalize_kernel(self, kernel: Array) -> Array:
        gain = self.param("gain", self.gain_init, (kernel.shape[-1],), self.param_dtype)
        return W.scaled_weight_standardization(kernel, gain, epsilon=self.epsilon)


# ----------------------------------------------------------------------------- wrappers
def _path_name(layer: nn.Module, path: tuple) -> str:
    """flax's variable name of a mapped variable: ``'{layer}/{key}/{key}'``."""
    return layer.name + "/" + jax.tree_util.keystr(path[1:], simple=True, separator="/")


def _feature_axes(layer: str, name: str, value: Array, feature_axes: Axes | None
                  ) -> tuple[int, ...]:
    """Canonical ``feature_axes`` of a variable (None: none), errors naming the variable."""
    if feature_axes is None:
        return ()
    try:
        return canonicalize_axes(value.ndim, feature_axes, name="feature_axes")
    except (TypeError, ValueError) as error:
        raise type(error)(
            f"{layer}: {error} (variable {name!r} of shape {tuple(value.shape)})") from None


class WeightNorm(nn.Module):
    """Weight Normalization of a wrapped layer (Salimans & Kingma 2016, arXiv 1602.07868).

    ``w = scale * v / ||v||`` for each variable ``v`` of ``layer_instance`` whose path matches
    ``variable_filter``, the norm over every axis except ``feature_axes``
    (:func:`normzoo.functional.weight_norm`). flax.linen.WeightNorm's fields, defaults,
    variables (``params``: ``'{layer}/{path}/scale'``, shape of the feature axes) and numbers;
    see the module docstring for what differs.

    Attributes:
      layer_instance: the wrapped module.
      epsilon: added to the squared norm (1e-12).
      dtype: the result's dtype (default: inferred from the variable and its scale).
      param_dtype: the dtype of ``scale``.
      use_scale: learn ``scale`` (the norm ``g``); False fixes it to 1.
      scale_init: initializer of ``scale`` (ones; flax #4138: ``||v||`` reproduces PyTorch's
        ``weight_norm``, whose ``g`` starts at the norm of the initial weights).
      feature_axes: the axes that keep their own norm (default -1, the output axis); None
        for one norm of the whole variable.
      variable_filter: normalize the variables whose path ``'{layer}/{key}/...'`` contains one
        of these strings (default ``{'kernel'}``); None or empty for every variable.
    """

    layer_instance: nn.Module
    epsilon: float = 1e-12
    dtype: Any = None
    param_dtype: Any = jnp.float32
    use_scale: bool = True
    scale_init: Initializer = initializers.ones
    feature_axes: Axes | None = -1
    variable_filter: Iterable | None = dataclasses.field(default_factory=lambda: {"kernel"})

    #: The functional core, ``fn(v, g, fan_in_axes=..., epsilon=...)``, and whether it needs
    #: an axis outside ``feature_axes`` (a class attribute, not a field).
    _function = staticmethod(W.weight_norm)
    _needs_fan_in = False

    @nn.compact
    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        """Calls ``layer_instance(*args, **kwargs)`` with its variables normalized."""
        return nn.map_variables(
            lambda layer: layer(*args, **kwargs),
            trans_in_fn=lambda vs: jax.tree_util.tree_map_with_path(self._normalize, vs),
            init=self.is_initializing(),
        )(self.layer_instance)

    def _normalize(self, path: tuple, vs: Any) -> Array:
        value = jnp.asarray(vs)
        name = _path_name(self.layer_instance, path)
        if self.variable_filter and not any(s in name for s in self.variable_filter):
            return value
        feature_axes = _feature_axes(type(self).__name__, name, value, self.feature_axes)
        fan_in = tuple(i for i in range(value.ndim) if i not in feature_axes)
        if self._needs_fan_in and not fan_in:
            raise ValueError(
                f"{type(self).__name__}: variable {name!r} of shape {tuple(value.shape)} has "
                f"no axis outside feature_axes={self.feature_axes!r} to normalize over; restrict "
                f"variable_filter (now {self.variable_filter!r}) to kernels, e.g. {{'kernel'}}"
            )
        scale = None
        if self.use_scale:
            scale = self.param(name + "/scale", self.scale_init,
                               tuple(value.shape[i] for i in feature_axes), self.param_dtype)
        out = self._function(value, scale, fan_in_axes=fan_in, epsilon=self.epsilon)
        return jnp.asarray(out, dtypes.canonicalize_dtype(vs, scale, dtype=self.dtype))


class CenteredWeightNorm(WeightNorm):
    """Centered Weight Normalization of a wrapped layer (Huang et al., "Centered Weight
    Normalization in Accelerating Training of Deep Neural Networks", ICCV 2017).

    ``w = scale * (v - mean(v)) / ||v - mean(v)||``, the mean and norm over every axis except
    ``feature_axes`` (:func:`normzoo.functional.centered_weight_norm`): each output channel's
    weights have mean 0 and norm ``scale``. :class:`WeightNorm`'s fields and variables
    (flax has no such layer); a filtered variable needs at least one axis outside
    ``feature_axes`` (a bias has none: keep ``variable_filter={'kernel'}``).
    """

    _function = staticmethod(W.centered_weight_norm)
    _needs_fan_in = True


class SpectralNorm(nn.Module):
    """Spectral Normalization of a wrapped layer (Miyato et al. 2018, arXiv 1802.05957).

    Each variable of rank >= 2 of ``layer_instance``, viewed as ``(-1, out)``, is divided by
    its largest singular value, estimated by ``n_steps`` of power iteration from a persistent
    ``u`` (:func:`normzoo.functional.spectral_norm`). flax.linen.SpectralNorm's fields, call
    (``update_stats`` keyword), variables (``collection_name``, default ``'batch_stats'``:
    ``'{layer}/{path}/u'`` ``(1, out)`` and ``'{layer}/{path}/sigma'`` ``()``, in
    ``param_dtype``) and numbers; scalars and vectors pass unchanged, as in flax.

    Attributes:
      layer_instance: the wrapped module.
      n_steps: power-iteration steps per call, an int >= 0 (0: no normalization, as flax).
      epsilon: added to the squared norms of the iteration (1e-12).
      dtype: the result's dtype (default: inferred from the variable and ``u``).
      param_dtype: the dtype of ``u`` and ``sigma``.
      error_on_non_matrix: raise for a variable of rank > 2 instead of flattening it.
      collection_name: the collection of ``u`` and ``sigma``.
    """

    layer_instance: nn.Module
    n_steps: int = 1
    epsilon: float = 1e-12
    dtype: Any = None
    param_dtype: Any = jnp.float32
    error_on_non_matrix: bool = False
    collection_name: str = "batch_stats"

    @nn.compact
    def __call__(self, *args: Any, update_stats: bool, **kwargs: Any) -> Any:
        """Calls ``layer_instance(*args, **kwargs)`` with its matrices spectrally normalized.

        Args:
          update_stats: store the new ``u`` and ``sigma`` (training: pass
            ``mutable=[collection_name]``); False leaves them (evaluation).
        """
        if isinstance(self.n_steps, bool) or not isinstance(self.n_steps, int) or self.n_steps < 0:
            raise ValueError(f"SpectralNorm: n_steps={self.n_steps!r} must be an int >= 0")
        return nn.map_variables(
            lambda layer: layer(*args, **kwargs),
            trans_in_fn=lambda vs: jax.tree_util.tree_map_with_path(
                functools.partial(self._normalize, update_stats=update_stats), vs),
            init=self.is_initializing(),
            mutable=True,
        )(self.layer_instance)

    def _normalize(self, path: tuple, vs: Any, update_stats: bool) -> Array:
        value = jnp.asarray(vs)
        if value.ndim <= 1 or self.n_steps < 1:
            return value
        name = _path_name(self.layer_instance, path)
        if value.ndim > 2 and self.error_on_non_matrix:
            raise ValueError(
                f"SpectralNorm: variable {name!r} has shape {tuple(value.shape)} (rank "
                f"{value.ndim}) but error_on_non_matrix=True; set it to False to flatten it "
                f"to ({-1}, {value.shape[-1]})"
            )
        u_name, sigma_name = name + "/u", name + "/sigma"
        u_var = self.variable(
            self.collection_name, u_name, jax.random.normal,
            self.make_rng("params") if not self.has_variable(self.collection_name, u_name)
            else None,
            (1, value.shape[-1]), self.param_dtype,
        )
        sigma_var = self.variable(self.collection_name, sigma_name, jnp.ones, (),
                                  self.param_dtype)
        u = u_var.value
        normalized, new_u, sigma = W.spectral_norm(value, u, n_steps=self.n_steps,
                                                   epsilon=self.epsilon)
        if update_stats:
            u_var.value = new_u
            sigma_var.value = sigma.astype(sigma_var.value.dtype)
        return jnp.asarray(normalized, dtypes.canonicalize_dtype(vs, u, dtype=self.dtype))
