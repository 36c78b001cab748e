"""The one place an optional backend plugs into the pure-JAX ops.

:mod:`normzoo.functional.fused` asks :func:`active` at trace time, at the few places a
hand-written kernel can take over; with nothing registered (the default) the ops are plain
JAX and nothing else is imported, compiled or called. A registered backend is an object
with three methods, each returning None to decline (then the plain JAX code runs):

* ``normalize_affine(x, scale_b, bias_b, layout, centered, epsilon, use_fast_variance,
  stat_dtype, out_dtype)`` -> ``(y, mean, var)`` in the layout's stat form: the forward
  pass of :func:`normzoo.functional.fused.normalize_affine`, undifferentiated;
* ``linearize_affine(layout, centered, epsilon, use_fast_variance, stat_dtype, out_dtype,
  primals, tangents, *, frozen)`` -> ``(primals_out, tangents_out)``: its ``custom_jvp``
  rule; ``frozen`` says that no param is differentiated (their tangents were symbolic
  zeros, given here as zero arrays);
* ``normalize_frozen(x, mean_b, var_b, scale_b, bias_b, axes, centered, epsilon,
  out_dtype)`` -> ``y``: :func:`normzoo.functional.fused.normalize_frozen`; whatever it
  returns must be differentiable (a backend wraps its kernel in its own ``custom_jvp``).

Because the choice is made while tracing, a function jitted (and called) before a backend
is registered or removed keeps its trace until it is retraced: the registering code (e.g.
:func:`normzoo.backends.cpu.enable`) calls ``jax.clear_caches()``.
"""

from __future__ import annotations

from typing import Any

_active: Any = None


def active() -> Any:
    """The registered backend, or None (the default)."""
    return _active


def register(obj: Any) -> None:
    """Makes ``obj`` the backend consulted by ops traced from now on."""
    global _active
    _active = obj


def unregister() -> None:
    """Removes the registered backend, if any: ops traced from now on are plain JAX."""
    global _active
    _active = None
