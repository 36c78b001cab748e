"""flax's own NNX normalization tests, run against normzoo.nnx.

These tests follow google/flax ``tests/nnx/nn/normalization_test.py`` (the version
shipped with flax 0.12.8, class ``TestLinenConsistency``): each builds a small model
``norm_layer -> Linear`` once in NNX and once in Linen, copies the Linen ``Dense``
weights into the NNX ``Linear`` and compares the outputs (and, for BatchNorm, the
parameters and the updated running statistics). Here the NNX normalization layers are
normzoo.nnx's (``BatchNorm``, ``LayerNorm``, ``RMSNorm``, ``GroupNorm``,
``InstanceNorm``); everything else -- ``nnx.Linear``, ``nnx.Sequential``,
``nnx.SpectralNorm`` and the whole Linen side, which is the reference -- stays flax.

Test names, parameter names and parameter values are flax's; the model code is
written again in plain pytest (``parametrize`` instead of ``parameterized.product``).
Differences from flax's file:

* Closeness instead of bits: flax compares with ``assert_array_equal``; here shape
  and dtype must be the same and the values close to the rounding of the *reference
  array's* dtype: rtol = atol = 1e-5 for float32 arrays, 2e-2 for float16 / bfloat16
  ones (see ``_assert_close``).
* ``test_nnx_linen_weightnorm_equivalence`` is not ported: it involves no layer that
  normzoo provides (``nnx.WeightNorm`` around ``nnx.Linear``).
* ``test_nnx_linen_spectralnorm_equivalence`` keeps flax's ``nnx.SpectralNorm`` and
  puts normzoo's ``BatchNorm`` inside the wrapped ``nnx.Sequential``. flax's test
  copies the ``Dense`` bias into the BatchNorm bias (both are zeros at init); here the
  BatchNorm's own Linen bias is copied.
* ``test_nnx_linen_instancenorm_equivalence``: flax's input is ``(10, 6)``, so
  InstanceNorm reduces over no axis at all (each output is the bias), and with
  ``MASK6`` the masked-out channels are 0/0 = NaN in Linen; that case is kept as it is
  (NaNs must then sit in the same places, as under ``assert_array_equal``), and one
  extra input shape ``(4, 3, 6)`` is added: a real spatial axis and a ``(3, 6)`` mask
  that leaves every channel some positions.
* The spectral-norm test also compares the BatchNorm's running mean / var.
* Every norm-layer test also compares the normalization layer's own output (shape,
  dtype, values) before the ``Linear``: with ``dtype=float16`` the ``Linear`` casts
  its input, which would hide a wrong output dtype of the norm layer.
* No sampling: every test runs flax's full cross product of its parameter axes
  (16 cases each, 32 for InstanceNorm with the extra shape); the shapes are flax's
  own tiny ones and the whole file takes about 10 s on 2 CPU cores.

``NNX_SUITE_USE_FLAX=1`` in the environment runs the same tests against flax.nnx's own
layers (a check of the tests themselves); by default they run against normzoo.nnx.
"""

import itertools
import os
import typing as tp

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen
from flax import nnx

# ------------------------------------------------------------------ the one switch
USE_FLAX_NNX = os.environ.get("NNX_SUITE_USE_FLAX", "") == "1"
if USE_FLAX_NNX:
    from flax.nnx import BatchNorm, GroupNorm, InstanceNorm, LayerNorm, RMSNorm
else:
    from normzoo.nnx import BatchNorm, GroupNorm, InstanceNorm, LayerNorm, RMSNorm


# ------------------------------------------------------------------ helpers
_HALF = (jnp.float16, jnp.bfloat16)


def _tol(dtype):
    if any(jnp.dtype(dtype) == jnp.dtype(h) for h in _HALF):
        return dict(rtol=2e-2, atol=2e-2)
    return dict(rtol=1e-5, atol=1e-5)


def _assert_close(actual, desired, what="output", truth=None):
    """flax's assert_array_equal, relaxed to the rounding of ``desired``'s dtype.

    ``truth``: the float64 two-pass value. Where flax.linen's one-pass
    ``E[x^2] - E[x]^2`` (``use_fast_variance=True``) cancels -- groups or masked channels
    of a few close values -- normzoo, which keeps one pass but shifts it (README, "Where
    normzoo differs"), is allowed to differ from flax only by being closer to the truth:
    within the tolerance of the truth, and at most flax's own largest error from it.
    """
    actual, desired = jnp.asarray(actual), jnp.asarray(desired)
    assert actual.shape == desired.shape, (what, actual.shape, desired.shape)
    assert actual.dtype == desired.dtype, (what, actual.dtype, desired.dtype)
    a, d = np.asarray(actual, np.float32), np.asarray(desired, np.float32)
    if truth is not None and not np.allclose(a, d, equal_nan=True, **_tol(desired.dtype)):
        t = np.asarray(truth, np.float64)
        np.testing.assert_allclose(a, t, err_msg=what + " vs float64 truth",
                                   **_tol(desired.dtype))
        assert np.nanmax(np.abs(a - t)) <= np.nanmax(np.abs(d - t)), what
        return
    np.testing.assert_allclose(a, d, err_msg=what, **_tol(desired.dtype))


def _truth(linen_model, variables, x, mask, method=None):
    """The Linen model in float64 with the two-pass variance: the exact value."""
    kwargs = dict(linen_model.norm_kwargs, use_fast_variance=False)
    model = LinenModel(linen_model.norm_cls, tuple(kwargs.items()), jnp.float64, jnp.float64)
    with jax.enable_x64(True):
        v64 = jax.tree.map(lambda a: np.asarray(a, np.float64), variables)
        out = model.apply(v64, np.asarray(x, np.float64), mask=mask, method=method,
                          mutable=["batch_stats"])[0]
        return np.asarray(out)


def _identity_promote(x, **kwargs):
    # flax passes ``promote_dtype=lambda x, **kwargs: x`` "to ensure same behavior as
    # Linen": the NNX layer then does no dtype promotion of its own.
    return x


def _id(value):
    if value is None:
        return "None"
    if isinstance(value, np.ndarray):
        return "mask" + "x".join(map(str, value.shape))
    if isinstance(value, tuple):
        return "x".join(map(str, value))
    try:
        return jnp.dtype(value).name
    except TypeError:
        return str(value)


def _product(**axes):
    """``pytest.mark.parametrize`` over the cross product of ``axes``, as flax's
    ``parameterized.product``, with readable ids."""
    rows = list(itertools.product(*axes.values()))
    return pytest.mark.parametrize(
        ",".join(axes), rows,
        ids=["-".join(f"{n}={_id(v)}" for n, v in zip(axes, row)) for row in rows])


MASK5 = np.array([True, False, True, False, True])
MASK6 = np.array([True, False, True, False, True, False])

# flax's parameter axes, shared by the five norm-layer tests
COMMON_AXES = dict(
    dtype=[jnp.float32, jnp.float16],
    param_dtype=[jnp.float32, jnp.float16],
    use_fast_variance=[True, False],
)


class NNXModel(nnx.Module):
    """``norm_layer -> Linear(in_features, 4)``, the NNX model of every flax test."""

    def __init__(self, norm_layer, in_features, dtype, param_dtype, rngs):
        self.norm_layer = norm_layer
        self.linear = nnx.Linear(
            in_features, 4, dtype=dtype, param_dtype=param_dtype, rngs=rngs)

    def __call__(self, x, *, mask=None):
        x = self.norm_layer(x, mask=mask)
        x = self.linear(x)
        return x


class LinenModel(linen.Module):
    """``norm_layer -> Dense(4)``, the Linen model of every flax test."""

    norm_cls: tp.Any = None
    norm_kwargs: tuple = ()  # (name, value) pairs, hashable
    dtype: tp.Any = None
    param_dtype: tp.Any = jnp.float32

    def setup(self):
        self.norm_layer = self.norm_cls(
            dtype=self.dtype, param_dtype=self.param_dtype, **dict(self.norm_kwargs))
        self.linear = linen.Dense(4, dtype=self.dtype, param_dtype=self.param_dtype)

    def __call__(self, x, *, mask=None):
        x = self.norm_layer(x, mask=mask)
        x = self.linear(x)
        return x


def _linen_and_nnx(linen_cls, linen_kwargs, nnx_layer, x, dtype, param_dtype, rngs):
    """Builds both models as flax's tests do and copies the Dense weights over."""
    linen_model = LinenModel(linen_cls, tuple(linen_kwargs.items()), dtype, param_dtype)
    variables = linen_model.init(jax.random.key(1), x)
    nnx_model = NNXModel(nnx_layer, x.shape[-1], dtype, param_dtype, rngs=rngs)
    nnx_model.linear.kernel[...] = variables["params"]["linear"]["kernel"]
    nnx_model.linear.bias[...] = variables["params"]["linear"]["bias"]
    return linen_model, variables, nnx_model


def _norm_only(module, x, mask):
    return module.norm_layer(x, mask=mask)


def _check_norm_output(linen_model, variables, nnx_model, x, mask):
    """Added: the normalization layer's own output (its dtype is hidden behind a
    float16 ``Linear``, which casts its input). Runs on a copy: BatchNorm's running
    statistics are left alone."""
    linen_norm = linen_model.apply(
        variables, x, mask, method=_norm_only, mutable=["batch_stats"])[0]
    _assert_close(nnx.clone(nnx_model.norm_layer)(x, mask=mask), linen_norm,
                  "norm_layer output", _truth(linen_model, variables, x, mask, _norm_only))


def _check_stateless(linen_cls, linen_kwargs, nnx_layer, x, dtype, param_dtype, mask,
                     rngs):
    linen_model, variables, nnx_model = _linen_and_nnx(
        linen_cls, linen_kwargs, nnx_layer, x, dtype, param_dtype, rngs)
    _check_norm_output(linen_model, variables, nnx_model, x, mask)
    linen_out = linen_model.apply(variables, x, mask=mask)
    assert isinstance(linen_out, jax.Array)
    nnx_out = nnx_model(x, mask=mask)
    _assert_close(nnx_out, linen_out, truth=_truth(linen_model, variables, x, mask))


# ------------------------------------------------------------------ the tests
@_product(**COMMON_AXES, mask=[None, MASK5])
def test_nnx_linen_batchnorm_equivalence(dtype, param_dtype, use_fast_variance, mask):
    rngs = nnx.Rngs(42)
    x = jax.random.normal(jax.random.key(0), (10, 5))
    norm = BatchNorm(
        5, use_running_average=False, dtype=dtype, param_dtype=param_dtype,
        use_fast_variance=use_fast_variance, promote_dtype=_identity_promote, rngs=rngs)
    linen_model, variables, nnx_model = _linen_and_nnx(
        linen.BatchNorm,
        dict(use_running_average=False, use_fast_variance=use_fast_variance),
        norm, x, dtype, param_dtype, rngs)
    _check_norm_output(linen_model, variables, nnx_model, x, mask)

    linen_out, updates = linen_model.apply(
        variables, x, mask=mask, mutable=["batch_stats"])
    variables = {**variables, **updates}
    nnx_out = nnx_model(x, mask=mask)
    _assert_close(nnx_out, linen_out)
    # parameters, and running statistics after one training step
    layer, ref = nnx_model.norm_layer, variables
    _assert_close(layer.scale[...], ref["params"]["norm_layer"]["scale"], "scale")
    _assert_close(layer.bias[...], ref["params"]["norm_layer"]["bias"], "bias")
    _assert_close(layer.mean[...], ref["batch_stats"]["norm_layer"]["mean"], "mean")
    _assert_close(layer.var[...], ref["batch_stats"]["norm_layer"]["var"], "var")


@_product(**COMMON_AXES, mask=[None, MASK5])
def test_nnx_linen_layernorm_equivalence(dtype, param_dtype, use_fast_variance, mask):
    rngs = nnx.Rngs(42)
    x = jax.random.normal(jax.random.key(0), (10, 5))
    norm = LayerNorm(
        5, dtype=dtype, param_dtype=param_dtype, use_fast_variance=use_fast_variance,
        promote_dtype=_identity_promote, rngs=rngs)
    _check_stateless(linen.LayerNorm, dict(use_fast_variance=use_fast_variance),
                     norm, x, dtype, param_dtype, mask, rngs)


@_product(**COMMON_AXES, mask=[None, MASK5])
def test_nnx_linen_rmsnorm_equivalence(dtype, param_dtype, use_fast_variance, mask):
    rngs = nnx.Rngs(42)
    x = jax.random.normal(jax.random.key(0), (10, 5))
    norm = RMSNorm(
        5, dtype=dtype, param_dtype=param_dtype, use_fast_variance=use_fast_variance,
        promote_dtype=_identity_promote, rngs=rngs)
    _check_stateless(linen.RMSNorm, dict(use_fast_variance=use_fast_variance),
                     norm, x, dtype, param_dtype, mask, rngs)


@_product(**COMMON_AXES, mask=[None, MASK6])
def test_nnx_linen_groupnorm_equivalence(dtype, param_dtype, use_fast_variance, mask):
    rngs = nnx.Rngs(42)
    x = jax.random.normal(jax.random.key(0), (10, 6))
    norm = GroupNorm(
        6, num_groups=3, dtype=dtype, param_dtype=param_dtype,
        use_fast_variance=use_fast_variance, promote_dtype=_identity_promote,
        rngs=rngs)
    _check_stateless(
        linen.GroupNorm, dict(num_groups=3, use_fast_variance=use_fast_variance),
        norm, x, dtype, param_dtype, mask, rngs)


# flax: x of shape (10, 6) and MASK6; added: (4, 3, 6) with a (3, 6) mask that
# leaves every channel at least one position
_INSTANCE_MASKS = {(10, 6): MASK6,
                   (4, 3, 6): np.array([MASK6, ~MASK6, [1, 1, 0, 0, 1, 1]], bool)}


@_product(**COMMON_AXES, masked=[False, True], shape=[(10, 6), (4, 3, 6)])
def test_nnx_linen_instancenorm_equivalence(
        dtype, param_dtype, use_fast_variance, masked, shape):
    rngs = nnx.Rngs(42)
    x = jax.random.normal(jax.random.key(0), shape)
    mask = _INSTANCE_MASKS[shape] if masked else None
    # as in flax, this test leaves promote_dtype at its default
    norm = InstanceNorm(
        6, dtype=dtype, param_dtype=param_dtype, use_fast_variance=use_fast_variance,
        rngs=rngs)
    _check_stateless(linen.InstanceNorm, dict(use_fast_variance=use_fast_variance),
                     norm, x, dtype, param_dtype, mask, rngs)


@_product(dtype=[jnp.float32, jnp.float16], param_dtype=[jnp.float32, jnp.float16],
         n_steps=[1, 10], update_stats=[True, False])
def test_nnx_linen_spectralnorm_equivalence(dtype, param_dtype, n_steps, update_stats):
    class NNXSpectral(nnx.Module):
        def __init__(self, rngs):
            self.seq = nnx.Sequential(
                nnx.Linear(5, 4, dtype=dtype, param_dtype=param_dtype, rngs=rngs),
                nnx.relu,
                BatchNorm(4, dtype=dtype, param_dtype=param_dtype, rngs=rngs,
                          use_running_average=not update_stats),
            )
            self.norm_layer = nnx.SpectralNorm(
                self.seq, n_steps=n_steps, dtype=dtype, param_dtype=param_dtype,
                update_stats=update_stats, rngs=rngs)

        def __call__(self, x):
            return self.norm_layer(x)

    class LinenSpectral(linen.Module):
        def setup(self):
            self.seq = linen.Sequential([
                linen.Dense(4, dtype=dtype, param_dtype=param_dtype),
                linen.relu,
                linen.BatchNorm(dtype=dtype, param_dtype=param_dtype,
                                use_running_average=not update_stats),
            ])
            self.norm_layer = linen.SpectralNorm(self.seq, n_steps=n_steps)

        def __call__(self, x):
            return self.norm_layer(x, update_stats=update_stats)

    x = jax.random.normal(jax.random.key(0), (10, 5))
    linen_model = LinenSpectral()
    variables = linen_model.init(jax.random.key(1), x)
    nnx_model = NNXSpectral(rngs=nnx.Rngs(42))

    # same weights and power-iteration state on both sides
    dense, bn = variables["params"]["seq"]["layers_0"], variables["params"]["seq"]["layers_2"]
    nnx_model.seq.layers[0].kernel.set_value(dense["kernel"])
    nnx_model.seq.layers[0].bias.set_value(dense["bias"])
    nnx_model.seq.layers[2].scale.set_value(bn["scale"])
    nnx_model.seq.layers[2].bias.set_value(bn["bias"])
    stats = variables["batch_stats"]["norm_layer"]
    u_path, sigma_path = ("layers", 0, "kernel", "u"), ("layers", 0, "kernel", "sigma")
    nnx_model.norm_layer.batch_stats[u_path].set_value(stats["seq/layers_0/kernel/u"])
    nnx_model.norm_layer.batch_stats[sigma_path].set_value(
        stats["seq/layers_0/kernel/sigma"])

    linen_out, linen_state = linen_model.apply(variables, x, mutable=["batch_stats"])
    nnx_out = nnx_model(x)
    _assert_close(nnx_out, linen_out)
    new_stats = linen_state["batch_stats"]["norm_layer"]
    _assert_close(nnx_model.norm_layer.batch_stats[u_path][...],
                  new_stats["seq/layers_0/kernel/u"], "u")
    _assert_close(nnx_model.norm_layer.batch_stats[sigma_path][...],
                  new_stats["seq/layers_0/kernel/sigma"], "sigma")
    # added: the BatchNorm's running statistics (updated only when update_stats)
    bn_stats = linen_state["batch_stats"]["seq"]["layers_2"]
    _assert_close(nnx_model.seq.layers[2].mean[...], bn_stats["mean"], "mean")
    _assert_close(nnx_model.seq.layers[2].var[...], bn_stats["var"], "var")
