"""Weight-space normalization: the kernel is normalized, not the activations.

Each function maps a kernel (and its learned gain, or the persistent power-iteration vector)
to the kernel a layer uses. A kernel is laid out as flax's: the output (feature) axis last,
the fan-in axes before it (Dense ``(in, out)``, Conv ``(*kernel_size, in / groups, out)``), so
the default ``fan_in_axes=None`` means every axis but the last. Per output channel, over its
fan-in:

* ``weight_standardization`` (Qiao et al. 2019): ``(W - mean W) / (std W + eps)``;
* ``scaled_weight_standardization`` (Brock et al. 2021, NF-Nets):
  ``gain (W - mean W) rsqrt(max(var W * fan_in, eps))``;
* ``weight_norm`` (Salimans & Kingma 2016): ``g v / ||v||``, as ``g v rsqrt(sum v^2 + eps)``;
* ``centered_weight_norm`` (Huang et al. 2017): ``g c / ||c||``, ``c = v - mean v``;
* ``spectral_norm`` (Miyato et al. 2018): ``W / sigma(W)``, sigma by power iteration from a
  persistent ``u``.

Conventions, each the published one:

* Weight Standardization (Qiao et al., "Micro-Batch Training with Batch-Channel Normalization
  and Weight Standardization", arXiv 1903.10520): ``eps`` (1e-5) is added to the standard
  deviation, outside the square root, as in the authors' layers
  (github.com/joe-siyuan-qiao/WeightStandardization); ``ddof=0`` (the paper's 1/I and their
  TensorFlow layer's ``K.std``), ``ddof=1`` for their PyTorch layer (``torch.std_mean``).
* Scaled WS (Brock et al., "High-Performance Large-Scale Image Recognition Without
  Normalization", ICML 2021; deepmind-research ``nfnets/base.py`` ``WSConv2D``): the same
  fused form ``W * scale - mean * scale``, ``scale = rsqrt(max(var * fan_in, eps)) * gain``,
  biased variance, ``eps = 1e-4``.
* Weight Norm and Spectral Norm follow flax.linen / flax.nnx (``WeightNorm``,
  ``SpectralNorm``) operation for operation, so that the layers built on them agree with
  flax's to the bit in float32: ``v * rsqrt(sum v^2 + eps)`` with ``eps = 1e-12``; the
  kernel flattened to ``(-1, out)``, ``u`` of shape ``(1, out)``, ``n_steps`` of
  ``v = l2n(u W^T), u = l2n(v W)``, both under ``stop_gradient``, ``sigma = v W u^T``,
  ``W / sigma`` (``W`` unchanged where ``sigma == 0``).

Precision: the statistics are computed in float32 at least (float64 for float64 kernels) and
the result has the dtype JAX's promotion gives the inputs (flax's rule): a bfloat16 kernel with
a bfloat16 gain gives bfloat16, its mean and variance summed in float32.

Every function is a pure jax.numpy function (jit / vmap / grad safe) and checks its arguments
at trace time: a ``TypeError`` or ``ValueError`` names the argument, its value and what was
expected.
"""

from __future__ import annotations

import math
import numbers
from typing import Any, Sequence

import jax
import jax.numpy as jnp
from jax import lax

from normzoo.functional.axes import Axes, canonicalize_axes

Array = jax.Array

__all__ = [
    "centered_weight_norm",
    "fan_in_axes_of",
    "init_spectral_u",
    "scaled_weight_standardization",
    "spectral_norm",
    "weight_norm",
    "weight_standardization",
]


# ----------------------------------------------------------------------------- checks
def _check_kernel(kernel: Any, name: str, fn: str) -> Array:
    if not hasattr(kernel, "dtype") or not hasattr(kernel, "shape"):
        kernel = jnp.asarray(kernel)
    if not jnp.issubdtype(kernel.dtype, jnp.floating):
        raise TypeError(
            f"{fn}: {name} has dtype {kernel.dtype}; expected a real floating dtype "
            f"(float32, bfloat16, float16, float64). Cast it first, e.g. "
            f"{name}.astype(jnp.float32)"
        )
    return kernel


def _check_epsilon(epsilon: Any, fn: str) -> None:
    """A real number >= 0 (arrays are let through: they may be traced)."""
    if isinstance(epsilon, bool) or (
        isinstance(epsilon, numbers.Number)
        and not (isinstance(epsilon, numbers.Real) and epsilon >= 0)
    ):
        raise ValueError(f"{fn}: epsilon={epsilon!r} must be a float >= 0")


def fan_in_axes_of(
    shape: Sequence[int], fan_in_axes: Axes | None = None, *, name: str = "kernel",
    fn: str = "fan_in_axes_of", allow_empty: bool = False,
) -> tuple[int, ...]:
    """The canonical fan-in axes of a kernel of ``shape``: ``fan_in_axes``, or every axis but
    the last (the output axis) when None.

    Raises:
      TypeError / ValueError: an axis is not an int or is out of range (naming ``fan_in_axes``);
        no fan-in axis at all (a kernel of rank < 2 with the default) unless ``allow_empty``.
    """
    ndim = len(shape)
    if fan_in_axes is None:
        axes = tuple(range(ndim - 1))
    else:
        try:
            axes = canonicalize_axes(ndim, fan_in_axes, name="fan_in_axes")
        except (TypeError, ValueError) as error:
            raise type(error)(f"{fn}: {error} ({name} has shape {tuple(shape)})") from None
    if not axes and not allow_empty:
        raise ValueError(
            f"{fn}: {name} of shape {tuple(shape)} has no fan-in axes "
            f"(fan_in_axes={fan_in_axes!r}); expected a kernel of rank >= 2, fan-in axes first "
            "and the output axis last (Dense (in, out), Conv (*kernel_size, in, out)), or "
            "explicit fan_in_axes"
        )
    return axes


def _feature_shape(shape: Sequence[int], axes: Sequence[int]) -> tuple[int, ...]:
    """Sizes of the axes that are not fan-in: the shape of a per-output-channel param."""
    return tuple(n for i, n in enumerate(shape) if i not in axes)


def _keepdims_shape(shape: Sequence[int], axes: Sequence[int]) -> tuple[int, ...]:
    return tuple(1 if i in axes else n for i, n in enumerate(shape))


def _check_param(param: Any, name: str, fn: str, kernel: Array, axes: Sequence[int]) -> Array:
    """``param`` (one value per output channel, or a scalar) reshaped to broadcast on kernel."""
    param = _check_kernel(param, name, fn)
    expected = _feature_shape(kernel.shape, axes)
    if tuple(param.shape) not in (expected, ()):
        raise ValueError(
            f"{fn}: {name} has shape {tuple(param.shape)}; expected {expected} (one value per "
            f"output channel of the kernel of shape {tuple(kernel.shape)} with fan-in axes "
            f"{tuple(axes)}) or () (one value)"
        )
    if param.ndim == 0:
        return param
    return jnp.reshape(param, _keepdims_shape(kernel.shape, axes))


def _compute_dtype(*arrays: Array) -> Any:
    """float32 at least: the dtype of the statistics."""
    return jnp.promote_types(jnp.result_type(*arrays), jnp.float32)


# ----------------------------------------------------------------------------- functions
def weight_standardization(
    kernel: Array, *, fan_in_axes: Axes | None = None, epsilon: float = 1e-5, ddof: int = 0,
) -> Array:
    """Weight Standardization (Qiao et al. 2019, arXiv 1903.10520).

    ``W_hat = (W - mean(W)) / (std(W) + eps)`` per output channel, the mean and standard
    deviation over its fan-in (eps outside the square root, as the authors' layers).

    Args:
      kernel: ``(..., out)`` (Dense ``(in, out)``, Conv ``(*kernel_size, in / groups, out)``).
      fan_in_axes: the axes each statistic reduces over; default every axis but the last.
      epsilon: added to the standard deviation; >= 0.
      ddof: the standard deviation's delta degrees of freedom: 0 (default, the paper's 1/I and
        the authors' TensorFlow layer) or 1 (their PyTorch layer, ``torch.std``).

    Returns:
      ``W_hat``, of ``kernel``'s shape and dtype (statistics in float32 at least).
    """
    fn = "weight_standardization"
    kernel = _check_kernel(kernel, "kernel", fn)
    _check_epsilon(epsilon, fn)
    axes = fan_in_axes_of(kernel.shape, fan_in_axes, fn=fn)
    fan_in = math.prod(kernel.shape[i] for i in axes)
    if isinstance(ddof, bool) or not isinstance(ddof, int) or not 0 <= ddof < max(fan_in, 1):
        raise ValueError(
            f"{fn}: ddof={ddof!r} must be an int in [0, fan_in) = [0, {fan_in}) (0: biased, "
            "1: unbiased standard deviation)"
        )
    w = kernel.astype(_compute_dtype(kernel))
    mean = jnp.mean(w, axis=axes, keepdims=True)
    centered = w - mean
    var = jnp.sum(lax.square(centered), axis=axes, keepdims=True) / (fan_in - ddof)
    return (centered / (jnp.sqrt(var) + epsilon)).astype(kernel.dtype)


def scaled_weight_standardization(
    kernel: Array, gain: Array | None = None, *, fan_in_axes: Axes | None = None,
    epsilon: float = 1e-4,
) -> Array:
    """Scaled Weight Standardization (Brock et al. 2021, NF-Nets, arXiv 2102.06171).

    ``W_hat = gain * (W - mean(W)) * rsqrt(max(var(W) * fan_in, eps))`` per output channel
    over its fan-in (biased variance), in deepmind-research ``nfnets/base.py``'s fused form
    ``W * scale - mean * scale``, ``scale = rsqrt(max(var * fan_in, eps)) * gain``. The rows
    of ``W_hat`` have unit norm (times ``gain``), so ``x W_hat`` keeps unit-variance inputs at
    unit variance.

    Args:
      kernel: ``(..., out)``, the fan-in axes first.
      gain: the learned gain, shape ``(out,)`` (the sizes of the non-fan-in axes) or ``()``;
        None for 1.
      fan_in_axes: default every axis but the last.
      epsilon: the floor of ``var * fan_in``; >= 0 (NF-Nets: 1e-4).

    Returns:
      ``W_hat``, of ``kernel``'s shape, in the dtype ``kernel`` and ``gain`` promote to.
    """
    fn = "scaled_weight_standardization"
    kernel = _check_kernel(kernel, "kernel", fn)
    _check_epsilon(epsilon, fn)
    axes = fan_in_axes_of(kernel.shape, fan_in_axes, fn=fn)
    fan_in = math.prod(kernel.shape[i] for i in axes)
    arrays = [kernel]
    if gain is not None:
        gain = _check_param(gain, "gain", fn, kernel, axes)
        arrays.append(gain)
    dtype = _compute_dtype(*arrays)
    w = kernel.astype(dtype)
    mean = jnp.mean(w, axis=axes, keepdims=True)
    var = jnp.mean(lax.square(w - mean), axis=axes, keepdims=True)
    scale = lax.rsqrt(jnp.maximum(var * fan_in, jnp.asarray(epsilon, dtype)))
    if gain is not None:
        scale = scale * gain.astype(dtype)
    return (w * scale - mean * scale).astype(jnp.result_type(*arrays))


def _l2_normalize(x: Array, axes: Sequence[int], epsilon: float) -> Array:
    """flax's ``_l2_normalize``: ``x * rsqrt(sum(x * x, axes) + eps)``."""
    return x * lax.rsqrt(jnp.sum(x * x, axis=tuple(axes), keepdims=True) + epsilon)


def weight_norm(
    v: Array, g: Array | None = None, *, fan_in_axes: Axes | None = None,
    epsilon: float = 1e-12,
) -> Array:
    """Weight Normalization (Salimans & Kingma 2016, arXiv 1602.07868).

    ``w = g * v / ||v||`` per output channel, the norm over its fan-in, computed as flax does:
    ``g * v * rsqrt(sum(v^2) + eps)``.

    Args:
      v: the direction, ``(..., out)``.
      g: the norm of each output channel, shape ``(out,)`` (the sizes of the non-fan-in axes)
        or ``()``; None for 1 (unit norm).
      fan_in_axes: default every axis but the last; ``()`` is allowed (flax.linen.WeightNorm of
        a vector with ``feature_axes=-1``: each entry divided by its own magnitude).
      epsilon: added to the squared norm; >= 0.

    Returns:
      ``w``, of ``v``'s shape, in the dtype ``v`` and ``g`` promote to.
    """
    fn = "weight_norm"
    v = _check_kernel(v, "v", fn)
    _check_epsilon(epsilon, fn)
    axes = fan_in_axes_of(v.shape, fan_in_axes, name="v", fn=fn, allow_empty=True)
    return _scaled(_l2_normalize(v.astype(_compute_dtype(v)), axes, epsilon), v, g, fn, axes)


def centered_weight_norm(
    v: Array, g: Array | None = None, *, fan_in_axes: Axes | None = None,
    epsilon: float = 1e-12,
) -> Array:
    """Centered Weight Normalization (Huang et al., "Centered Weight Normalization in
    Accelerating Training of Deep Neural Networks", ICCV 2017).

    ``w = g * (v - mean(v)) / ||v - mean(v)||`` per output channel over its fan-in, computed
    as :func:`weight_norm` on the centered ``v``: ``g * c * rsqrt(sum(c^2) + eps)``. Each
    output channel's weights have mean 0 and norm ``g``.

    Args:
      v: the direction, ``(..., out)``, at least one fan-in axis.
      g: shape ``(out,)`` or ``()``; None for 1.
      fan_in_axes: default every axis but the last.
      epsilon: added to the squared norm; >= 0.

    Returns:
      ``w``, of ``v``'s shape, in the dtype ``v`` and ``g`` promote to.
    """
    fn = "centered_weight_norm"
    v = _check_kernel(v, "v", fn)
    _check_epsilon(epsilon, fn)
    axes = fan_in_axes_of(v.shape, fan_in_axes, name="v", fn=fn)
    c = v.astype(_compute_dtype(v))
    c = c - jnp.mean(c, axis=axes, keepdims=True)
    return _scaled(_l2_normalize(c, axes, epsilon), v, g, fn, axes)


def _scaled(unit: Array, v: Array, g: Array | None, fn: str, axes: Sequence[int]) -> Array:
    if g is None:
        return unit.astype(v.dtype)
    g = _check_param(g, "g", fn, v, axes)
    return (unit * g.astype(unit.dtype)).astype(jnp.result_type(v, g))


def init_spectral_u(key: Array, kernel_shape: Sequence[int], dtype: Any = jnp.float32) -> Array:
    """A random start ``u`` of shape ``(1, kernel_shape[-1])`` for :func:`spectral_norm`
    (standard normal, as flax.linen.SpectralNorm; only its direction matters)."""
    if len(kernel_shape) < 2:
        raise ValueError(
            f"init_spectral_u: kernel_shape={tuple(kernel_shape)!r} must have rank >= 2")
    return jax.random.normal(key, (1, kernel_shape[-1]), dtype)


def spectral_norm(
    w: Array, u: Array, *, n_steps: int = 1, epsilon: float = 1e-12,
) -> tuple[Array, Array, Array]:
    """Spectral Normalization (Miyato et al. 2018, arXiv 1802.05957): ``W / sigma(W)``.

    ``W`` is viewed as the matrix ``(-1, out)`` (flax's reshape: every axis but the last
    flattened). ``n_steps`` of power iteration from the persistent ``u``::

        v = l2n(u W^T),   u = l2n(v W),       l2n(a) = a * rsqrt(sum(a^2) + eps)

    then ``u, v`` under ``stop_gradient`` and ``sigma = v W u^T``, the estimate of the largest
    singular value (it converges to it as the steps accumulate across training calls). The
    gradient flows through ``sigma``'s dependence on ``W`` (Miyato et al.'s).

    Args:
      w: ``(..., out)``, rank >= 2.
      u: the persistent vector, ``(1, out)`` (flax's ``u``) or ``(out,)``.
      n_steps: power-iteration steps, an int >= 1.
      epsilon: added to the squared norms; >= 0.

    Returns:
      ``(w / sigma, new_u, sigma)``: ``w / sigma`` of ``w``'s shape in the dtype ``w`` and ``u``
      promote to (``w`` itself where ``sigma == 0``); ``new_u`` of ``u``'s shape and dtype, to
      store for the next call; ``sigma`` a scalar in the dtype of the power iteration
      (float32 at least).
    """
    fn = "spectral_norm"
    w = _check_kernel(w, "w", fn)
    u = _check_kernel(u, "u", fn)
    _check_epsilon(epsilon, fn)
    if isinstance(n_steps, bool) or not isinstance(n_steps, int) or n_steps < 1:
        raise ValueError(f"{fn}: n_steps={n_steps!r} must be an int >= 1")
    if w.ndim < 2:
        raise ValueError(
            f"{fn}: w of shape {tuple(w.shape)} is not a matrix; expected rank >= 2 "
            "(higher ranks are flattened to (-1, out))"
        )
    out = w.shape[-1]
    if tuple(u.shape) not in ((1, out), (out,)):
        raise ValueError(
            f"{fn}: u has shape {tuple(u.shape)}; expected (1, {out}) (or ({out},)) for w of "
            f"shape {tuple(w.shape)}"
        )
    dtype = _compute_dtype(w, u)
    matrix = jnp.reshape(w, (-1, out)).astype(dtype)
    u0 = jnp.reshape(u, (1, out)).astype(dtype)
    v0 = None
    for _ in range(n_steps):
        v0 = _l2_normalize(jnp.matmul(u0, matrix.T), (1,), epsilon)
        u0 = _l2_normalize(jnp.matmul(v0, matrix), (1,), epsilon)
    u0 = lax.stop_gradient(u0)
    v0 = lax.stop_gradient(v0)
    sigma = jnp.matmul(jnp.matmul(v0, matrix), u0.T)[0, 0]
    normalized = matrix / jnp.where(sigma != 0, sigma, jnp.ones_like(sigma))
    result_dtype = jnp.result_type(w, u)
    return (
        jnp.reshape(normalized, w.shape).astype(result_dtype),
        jnp.reshape(u0, u.shape).astype(u.dtype),
        sigma,
    )
