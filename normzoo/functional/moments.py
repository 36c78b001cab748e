"""Means and variances: float32 at least, masks, exact cross-device combination.

The one idea of this module is :func:`moments`. Everything that needs statistics of
activations (every layer of the zoo) goes through it.

Accuracy. The textbook one-pass variance ``E[x^2] - E[x]^2`` cancels catastrophically when
``|mean| >> std``: for ``x = 1e4 + N(0, 1)`` in float32 both terms are ~1e8 and their
difference (1) is below float32's resolution there (8), so flax.linen's default
(``use_fast_variance=True``) returns a variance of 0 or 16 and a BatchNorm output std of
~300. normzoo keeps the single pass but first subtracts a *pilot* value per feature,
the mean of a few samples of the data taken under ``stop_gradient`` (Chan, Golub & LeVeque,
"Algorithms for computing the sample variance", 1983, the shifted-data algorithm):

    d = x - s,   mean = s + E[d],   var = E[d^2] - E[d]^2.

Both sums still fuse into one read of ``x``; with ``s`` within a few standard deviations
of the mean the cancellation is gone. The shift is a constant for autodiff, and the
formulas are exact for any constant, so values and gradients equal the true moments.

:func:`reduced_moments` offers three exact methods: ``shifted`` (above), ``two_pass``
(``E[|x - E[x]|^2]``) and ``guarded`` (the plain one pass, recomputed in a second pass
behind a ``lax.cond`` only if some statistic has ``|mean| > ~16 std``, where the plain
formula would lose more than ``2^-16`` of the variance). Which is fastest depends on the
layout and the compiler, not on the bytes read: :func:`normzoo.functional.fused._plan`
picks per layout by measurement.

Cross-device. Under ``jax.vmap(axis_name=...)``, ``shard_map`` or ``pmap`` each device
computes its local ``(count, mean, M2)`` (M2 = sum of squared deviations) and the devices
combine them with the parallel formula of Chan et al.:

    n = sum_d n_d,   mean = sum_d n_d mean_d / n,   M2 = sum_d [M2_d + n_d (mean_d - mean)^2].

This is exact for uneven or masked shards, where averaging per-device means (flax #2417,
PyTorch #22192) is not, and free of the cancellation of ``E[x^2] - E[x]^2``. It costs two
small ``psum`` rounds (counts and means, then M2) instead of flax's one ``pmean``.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
from jax import lax

from normzoo.functional.axes import Axes, canonicalize_axes, check_floating, check_mask

Array = jax.Array


def abs_square(x: Array) -> Array:
    """``|x|^2`` elementwise, real for complex ``x``."""
    if jnp.iscomplexobj(x):
        return lax.square(lax.real(x)) + lax.square(lax.imag(x))
    return lax.square(x)


def statistics_dtype(x: Array, dtype: Any = None, force_float32_reductions: bool = True):
    """Dtype of the statistics: ``dtype`` (default: x's), promoted to float32 at least."""
    dtype = jnp.result_type(x) if dtype is None else jnp.dtype(dtype)
    if force_float32_reductions:
        dtype = jnp.promote_types(dtype, jnp.float32)
    return dtype


#: Elements averaged into the pilot shift (along one reduction axis).
PILOT_SAMPLES = 8


def pilot(x: Array, axes: Sequence[int]) -> Array:
    """A shift close to the mean of ``x`` over ``axes``: the mean of a few of its elements.

    The first ``PILOT_SAMPLES`` elements along the last of ``axes`` longer than 1 (the first
    element along the others) are averaged, under ``stop_gradient``; ``axes`` are kept with
    size 1.

    Why a (tiny) reduction and not one element: XLA recomputes a slice of ``x`` inside every
    kernel that uses it, so the running-statistics update would read ``x`` after the output,
    and an output written over ``x`` (a loop, a donated buffer) would first copy all of ``x``.
    A reduction is materialized once, as a small array.
    """
    long_axes = [ax for ax in axes if x.shape[ax] > 1]
    averaged = long_axes[-1] if long_axes else None
    index = [slice(None)] * x.ndim
    for ax in axes:
        index[ax] = slice(0, PILOT_SAMPLES if ax == averaged else 1)
    sample = x[tuple(index)]
    if averaged is not None:
        sample = jnp.mean(sample, averaged, keepdims=True)
    return lax.stop_gradient(sample)


#: How :func:`reduced_moments` computes a variance (see the module docstring).
VARIANCE_METHODS = ("two_pass", "shifted", "guarded")

#: ``guarded`` trusts ``E[x^2] - E[x]^2`` while ``E[x^2] <= GUARD_RATIO * var``, that is
#: ``|mean| <= sqrt(GUARD_RATIO - 1) * std`` (about 16 std): the float32 cancellation error is
#: then below ``GUARD_RATIO * 2^-24 = 2^-16`` of the variance (times the summation's own
#: rounding growth). Beyond, the variance is recomputed exactly around the mean.
GUARD_RATIO = 256.0


def reduced_moments(
    x: Array,
    mean_of: Callable[[Array], Array],
    use_mean: bool,
    method: str = "two_pass",
    pilot: Array | None = None,
    spread: Callable[[Array], Array] = lambda stat: stat,
) -> tuple[Array, Array]:
    """Mean and biased variance of ``x``, for any way of averaging it into statistics.

    Args:
      x: full-size input.
      mean_of: full-size array -> its mean per statistic, kept broadcastable ("stat form").
      use_mean: False for ``(0, E[|x|^2])`` (RMS statistics).
      method: one of :data:`VARIANCE_METHODS`, all exact to rounding:
        ``two_pass``: ``E[|x - E[x]|^2]``, two reads of x (free when a statistic's elements
        are contiguous and the whole kernel runs per row, as for LayerNorm);
        ``shifted``: one pass around ``pilot`` (module docstring);
        ``guarded``: one pass ``E[|x|^2] - |E[x]|^2``, and a second pass (``lax.cond``, so
        only when needed) if any statistic has ``|mean|`` above ~16 std (:data:`GUARD_RATIO`).
      pilot: the shift of ``shifted``, in stat form.
      spread: stat form -> a form that broadcasts against ``x`` (identity unless the
        statistics are finished on partial sums, as for channel groups in
        :mod:`normzoo.functional.fused`).

    Returns:
      ``(mean, var)`` in stat form; ``(0, E[|x|^2])`` if not ``use_mean``.
    """
    if method not in VARIANCE_METHODS:
        raise ValueError(f"method={method!r} is unknown; expected one of {VARIANCE_METHODS}")
    if not use_mean:
        second = mean_of(abs_square(x))
        return jnp.zeros_like(second), second
    if method == "shifted":
        if pilot is None:
            raise ValueError("method='shifted' needs a pilot shift; got pilot=None")
        shift = spread(pilot)
        mean_shifted = mean_of(x - shift)
        # Spelled differently on purpose: XLA would merge two identical ``x - shift`` and
        # write the shared result to memory; two spellings fuse into their own reductions,
        # so x is read twice and nothing full-size is written.
        second_shifted = mean_of(abs_square(x + (-shift)))
        var = jnp.maximum(0.0, second_shifted - abs_square(mean_shifted))
        return pilot + mean_shifted, var
    mean = mean_of(x)

    def around_mean():  # the exact second pass
        return mean_of(abs_square(x - spread(mean)))

    if method == "two_pass":
        return mean, around_mean()
    second = mean_of(abs_square(x))
    fast = second - abs_square(mean)
    # Also true where fast <= 0 < second (a constant statistic, or total cancellation).
    risky = jnp.any(second > GUARD_RATIO * fast)
    return mean, lax.cond(risky, around_mean, lambda: jnp.maximum(fast, 0.0))


def _local_moments(
    x: Array,
    axes: tuple[int, ...],
    mask: Array | None,
    use_mean: bool,
    use_fast_variance: bool,
) -> tuple[Array, Array]:
    """Mean and biased variance of ``x`` over ``axes`` on this device (``axes`` removed).

    With a mask the two-pass formula is used: the pilot's samples may lie outside the mask
    (padding can hold any value) and make a poor shift.
    """
    shifted = use_fast_variance and mask is None
    mean, var = reduced_moments(
        x,
        lambda v: jnp.mean(v, axes, keepdims=True, where=mask),
        use_mean,
        "shifted" if shifted else "two_pass",
        pilot(x, axes) if shifted else None,
    )
    return jnp.squeeze(mean, axes), jnp.squeeze(var, axes)


def _count(x: Array, axes: tuple[int, ...], mask: Array | None, like: Array) -> Array:
    """Number of elements reduced per statistic, broadcast like ``like`` (float)."""
    if mask is None:
        n = 1
        for ax in axes:
            n *= x.shape[ax]
        return jnp.full(like.shape, n, jnp.real(like).dtype)
    return jnp.sum(mask, axes).astype(jnp.real(like).dtype)


def collective(op: Any, v: Any, axis_name: Any, axis_index_groups: Any = None) -> Any:
    """``op(v, axis_name, axis_index_groups=axis_index_groups)`` for ``op`` ``lax.psum`` or
    ``lax.pmean``. jax implements ``axis_index_groups`` under ``pmap``, and under
    ``shard_map`` only with ``check_vma=False``; elsewhere it raises a bare
    NotImplementedError, turned here into a ValueError that names the argument and the ways
    to per-group statistics there."""
    try:
        return op(v, axis_name, axis_index_groups=axis_index_groups)
    except NotImplementedError as error:
        if axis_index_groups is None:
            raise
        raise ValueError(
            f"axis_index_groups={axis_index_groups!r}: jax supports axis_index_groups under "
            "jax.pmap, and under shard_map only with check_vma=False; otherwise give each "
            f"group its own mesh axis (e.g. a mesh ('group', {axis_name!r})) and pass "
            f"axis_name={axis_name!r} with axis_index_groups=None") from error


def combine_across_devices(
    count: Array,
    mean: Array,
    second: Array,
    axis_name: Any,
    axis_index_groups: Any = None,
    centered: bool = True,
) -> tuple[Array, Array, Array]:
    """Exact count-weighted combination of per-device moments.

    Args:
      count: (F...) elements behind each local statistic (0 allowed).
      mean: (F...) local means (ignored when ``centered`` is False).
      second: (F...) local variances (``centered``) or local ``E[|x|^2]``.
      axis_name, axis_index_groups: as in ``jax.lax.psum``.

    Returns:
      ``(count, mean, second)`` over all devices of the group: one ``psum`` for the counts
      and means, and for centered moments a second one for ``M2`` around the global mean.
    """
    has_data = count > 0
    count = count.astype(mean.dtype)
    psum = lambda v: collective(lax.psum, v, axis_name, axis_index_groups)  # noqa: E731
    weighted = jnp.where(has_data, count * (mean if centered else second), 0)
    total, weighted_sum = psum(jnp.stack([count, weighted]))
    total = jnp.real(total)
    if not centered:
        return total, jnp.zeros_like(mean), jnp.real(weighted_sum) / total
    global_mean = weighted_sum / total
    local_m2 = count * second + count * abs_square(mean - global_mean)
    m2 = psum(jnp.real(jnp.where(has_data, local_m2, 0)))
    return total, global_mean, m2 / total


def moments(
    x: Array,
    axes: Axes,
    *,
    mask: Array | None = None,
    axis_name: Any = None,
    axis_index_groups: Any = None,
    use_mean: bool = True,
    use_fast_variance: bool = True,
    dtype: Any = None,
    force_float32_reductions: bool = True,
) -> tuple[Array, Array]:
    """Mean and (biased) variance of ``x`` over ``axes``.

    Args:
      x: input of any shape ``S``; real or complex floating.
      axes: axes of ``x`` to reduce (int or sequence, negative allowed).
      mask: optional bool array broadcastable to ``S``; only True elements count.
      axis_name: optional named axis (vmap / shard_map / pmap) the statistics span too.
      axis_index_groups: optional groups of indices within ``axis_name``.
      use_mean: if False, the mean is taken as 0 and ``var = E[|x|^2]`` (RMS statistics).
      use_fast_variance: one pass over ``x`` with a pilot shift (accurate, see module
        docstring); False computes the mean first and then ``E[|x - mean|^2]``.
      dtype: dtype of the statistics; promoted to float32 at least unless
        ``force_float32_reductions`` is False.

    Returns:
      ``(mean, var)``, each of shape ``S`` with ``axes`` removed.

    Raises:
      TypeError: ``x`` is not floating. ValueError: bad ``axes`` or ``mask`` shape, or
      ``axes`` that hold no elements.
    """
    check_floating(x)
    axes = canonicalize_axes(x.ndim, axes, name="axes")
    if x.size == 0 and any(x.shape[a] == 0 for a in axes):
        raise ValueError(
            f"axes={axes} of an input of shape {tuple(x.shape)} hold no elements: the mean and "
            "variance over them are undefined"
        )
    mask = check_mask(mask, x.shape)
    x = jnp.asarray(x).astype(statistics_dtype(x, dtype, force_float32_reductions))
    mean, var = _local_moments(x, axes, mask, use_mean, use_fast_variance)
    if axis_name is None:
        return mean, var
    count = _count(x, axes, mask, var)
    _, mean, var = combine_across_devices(
        count, mean, var, axis_name, axis_index_groups, centered=use_mean
    )
    return mean, var
