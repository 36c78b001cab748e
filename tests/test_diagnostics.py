"""normzoo.diagnostics: activation statistics against numpy float64, condition numbers against
numpy.linalg.eigvalsh, bf16 inputs, jit, errors; collecting sown statistics from a Linen model
and from its NNX twin (same keys, same numbers), without accumulation."""
from __future__ import annotations

import warnings

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import normzoo
import normzoo.nnx as znnx
from normzoo import diagnostics as diag

RTOL = 2e-5


def reference_stats(x, feature_axis=-1, percentiles=(1, 50, 99)):
    """activation_stats in numpy float64."""
    h = np.moveaxis(np.asarray(x, np.float64), feature_axis, -1)
    h = h.reshape(-1, h.shape[-1])
    f_mean, f_std = h.mean(0), h.std(0)
    out = {"mean": h.mean(), "std": h.std(), "min": h.min(), "max": h.max(),
           "feature_mean_abs": np.abs(f_mean).mean(), "feature_mean_abs_max": np.abs(f_mean).max(),
           "feature_std_mean": f_std.mean(), "feature_std_min": f_std.min(), "feature_std_max": f_std.max(),
           "zero_fraction": np.mean(h == 0), "dead_fraction": np.mean(np.all(h == 0, axis=0))}
    out.update({f"p{float(q):g}": np.percentile(h, q) for q in percentiles})
    return out


def reference_cond(x, feature_axis=-1):
    h = np.moveaxis(np.asarray(x, np.float64), feature_axis, -1)
    h = h.reshape(-1, h.shape[-1])
    hc = h - h.mean(0)
    ev = np.linalg.eigvalsh(hc.T @ hc / len(h))
    return ev[-1] / ev[0]


def assert_stats_close(got, want, rtol=RTOL, atol=1e-6):
    assert set(got) == set(want)
    for k in want:
        np.testing.assert_allclose(np.asarray(got[k], np.float64), want[k], rtol=rtol, atol=atol, err_msg=k)


@pytest.fixture
def relu_activation(rng):
    """(N, C, L) = (6, 5, 7) ReLU outputs, features on axis 1; feature 3 is dead (all zeros)."""
    x = rng.standard_normal((6, 5, 7)).astype(np.float32) + np.linspace(-1, 1, 5, dtype=np.float32)[:, None]
    x = np.maximum(x, 0)
    x[:, 3] = 0
    return x


# -- activation_stats ------------------------------------------------------------------------------


def test_activation_stats_match_numpy_float64(relu_activation):
    got = diag.activation_stats(relu_activation, feature_axis=1)
    assert_stats_close(got, reference_stats(relu_activation, 1))
    assert float(got["dead_fraction"]) == pytest.approx(0.2)  # 1 of 5 features
    assert 0.2 < float(got["zero_fraction"]) < 1
    assert all(v.shape == () and v.dtype == jnp.float32 for v in got.values())


def test_activation_stats_feature_axis_and_percentiles(rng):
    x = rng.standard_normal((4, 3, 9)).astype(np.float32) * 3 + 1
    for axis in (0, -1):
        assert_stats_close(diag.activation_stats(x, feature_axis=axis, percentiles=(0, 12.5, 99.9, 100)),
                           reference_stats(x, axis, (0, 12.5, 99.9, 100)))
    assert set(diag.activation_stats(x, percentiles=())) == set(reference_stats(x, percentiles=()))


def test_activation_stats_bfloat16_gives_float32(relu_activation):
    x = jnp.asarray(relu_activation, jnp.bfloat16)
    got = diag.activation_stats(x, feature_axis=1)
    assert all(v.dtype == jnp.float32 for v in got.values())
    # the statistics of the bf16 values themselves, not bf16-rounded statistics
    assert_stats_close(got, reference_stats(np.asarray(x.astype(jnp.float32)), 1))
    z = jnp.asarray(np.random.default_rng(1).standard_normal((64, 3)), jnp.bfloat16)
    cond = diag.covariance_condition_number(z)
    assert cond.dtype == jnp.float32
    np.testing.assert_allclose(cond, reference_cond(np.asarray(z.astype(jnp.float32))), rtol=1e-3)


def test_activation_stats_and_condition_number_jit(relu_activation):
    stats = jax.jit(lambda x: diag.activation_stats(x, feature_axis=1, percentiles=(5, 95)))(relu_activation)
    assert_stats_close(stats, reference_stats(relu_activation, 1, (5, 95)))
    x = np.random.default_rng(2).standard_normal((3, 50, 4)).astype(np.float32)
    batched = jax.jit(jax.vmap(diag.covariance_condition_number))(x)
    np.testing.assert_allclose(batched, [reference_cond(x[i]) for i in range(3)], rtol=1e-3)


# -- covariance_condition_number -------------------------------------------------------------------


def test_condition_number_matches_eigvalsh(rng):
    mix = rng.standard_normal((4, 4)) + 2 * np.eye(4)
    x = (rng.standard_normal((300, 4)) @ mix + 5).astype(np.float32)
    want = reference_cond(x)
    assert 3 < want < 1e4
    np.testing.assert_allclose(diag.covariance_condition_number(x), want, rtol=1e-3)
    xt = np.ascontiguousarray(np.moveaxis(x.reshape(30, 10, 4), -1, 1))  # (30, 4, 10): features on axis 1
    np.testing.assert_allclose(diag.covariance_condition_number(xt, feature_axis=1), want, rtol=1e-3)


def test_condition_number_of_whitened_features_is_one():
    hadamard = np.array([[1]])
    for _ in range(3):
        hadamard = np.block([[hadamard, hadamard], [hadamard, -hadamard]])
    x = hadamard[:, 1:5].astype(np.float32) * 3.0 - 2.0  # 8 samples, 4 orthogonal zero-mean columns
    np.testing.assert_allclose(diag.covariance_condition_number(x), 1.0, rtol=1e-6)


def test_singular_covariance_gives_a_large_finite_number(rng):
    x = rng.standard_normal((10, 3)).astype(np.float32)
    cases = {"duplicate feature": np.concatenate([x, x[:, :1]], 1),
             "dead feature": np.concatenate([x, np.zeros((10, 1), np.float32)], 1),
             "all constant": np.ones((10, 4), np.float32),
             "zero": np.zeros((10, 4), np.float32),
             "fewer samples than features": np.concatenate([x, x], 1)[:3]}  # 3 samples, 6 features
    for name, h in cases.items():
        cond = float(diag.covariance_condition_number(h))
        assert np.isfinite(cond) and 1e5 <= cond <= 1e8 * (1 + 1e-6), (name, cond)
        assert float(diag.covariance_condition_number(h, epsilon=1e-3)) == pytest.approx(1e3, rel=1e-5), name
    assert float(diag.covariance_condition_number(cases["zero"])) == pytest.approx(1e8)


# -- errors ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("fn", [diag.activation_stats, diag.covariance_condition_number])
def test_bad_inputs_raise_value_errors(fn):
    x = np.ones((4, 3), np.float32)
    with pytest.raises(ValueError, match="feature_axis=2 is out of range"):
        fn(x, feature_axis=2)
    with pytest.raises(ValueError, match="feature_axis=-3 is out of range"):
        fn(x, feature_axis=-3)
    for bad in (1.0, True, (0, 1)):
        with pytest.raises(ValueError, match="must be an int"):
            fn(x, feature_axis=bad)
    with pytest.raises(ValueError, match="scalar"):
        fn(np.float32(1.0))
    with pytest.raises(ValueError, match="empty"):
        fn(np.ones((0, 3), np.float32))


def test_errors_of_percentiles_samples_and_epsilon():
    x = np.ones((4, 3), np.float32)
    for bad in ((50, 101), (-1,), ("50",), (50, 50.0)):
        with pytest.raises(ValueError, match="percentiles"):
            diag.activation_stats(x, percentiles=bad)
    with pytest.raises(ValueError, match="1 sample"):
        diag.covariance_condition_number(np.ones((1, 3), np.float32))
    with pytest.raises(ValueError, match="1 sample"):
        diag.covariance_condition_number(np.ones((4, 1), np.float32), feature_axis=0)  # 4 features, 1 sample
    with pytest.raises(ValueError, match="1 sample"):
        diag.covariance_condition_number(np.ones(5, np.float32))  # a 1-D x is one sample of 5 features
    for bad in (0.0, -1e-3, 2.0):
        with pytest.raises(ValueError, match="epsilon"):
            diag.covariance_condition_number(x, epsilon=bad)


# -- Linen and NNX collection -----------------------------------------------------------------------


class LinenBlock(nn.Module):
    features: int

    @nn.compact
    def __call__(self, x):
        h = nn.Dense(self.features, name="dense")(x)
        diag.sow_stats(self, "pre", h, condition_number=True)
        return nn.relu(normzoo.BatchNorm(use_running_average=False, name="norm")(h))


class LinenNet(nn.Module):
    @nn.compact
    def __call__(self, x):
        h = LinenBlock(6, name="block_0")(x)
        h = LinenBlock(5, name="block_1")(h)
        diag.sow_stats(self, "out", h, percentiles=(10, 90))
        return h


class NNXBlock(nnx.Module):
    def __init__(self, din, dout, rngs):
        self.dense = nnx.Linear(din, dout, rngs=rngs)
        self.norm = znnx.BatchNorm(dout, rngs=rngs)

    def __call__(self, x):
        h = self.dense(x)
        diag.sow_stats_nnx(self, "pre", h, condition_number=True)
        return nnx.relu(self.norm(h))


class NNXNet(nnx.Module):
    def __init__(self, rngs):
        self.block_0 = NNXBlock(4, 6, rngs)
        self.block_1 = NNXBlock(6, 5, rngs)

    def __call__(self, x):
        h = self.block_1(self.block_0(x))
        diag.sow_stats_nnx(self, "out", h, percentiles=(10, 90))
        return h


KEYS = {"block_0/pre", "block_1/pre", "out"}


@pytest.fixture(scope="module")
def linen_setup():
    x = jax.random.normal(jax.random.key(0), (16, 4)) * 2 + 1
    variables = jax.jit(LinenNet().init)(jax.random.key(1), x)

    @jax.jit  # one compilation for every Linen check
    def collect(v, x):
        stats = diag.collect_linen(LinenNet().apply, v, x, mutable=["batch_stats"])
        # the output on request (a module for apply_fn; one mutable name)
        out, again = diag.collect_linen(LinenNet(), v, x, mutable="batch_stats", with_output=True)
        plain = LinenNet().apply(v, x, mutable=["batch_stats"])[1]
        return stats, (out, again, plain)

    stats, extra = collect(variables, x)
    return x, variables, stats, extra


def test_collect_linen(linen_setup):
    x, variables, stats, extra = linen_setup
    assert set(variables) == {"params", "batch_stats"}  # init sows nothing
    assert set(stats) == KEYS
    assert "condition_number" in stats["block_0/pre"] and "p90" in stats["out"] and "p50" not in stats["out"]
    # the statistics of the activations themselves
    params = variables["params"]["block_0"]["dense"]
    pre0 = x @ params["kernel"] + params["bias"]
    assert_stats_close({k: v for k, v in stats["block_0/pre"].items() if k != "condition_number"},
                       reference_stats(pre0), rtol=1e-4, atol=1e-5)
    cond = float(diag.covariance_condition_number(pre0))  # 6 features of 4 inputs: singular (1e8, or float32 noise)
    assert float(stats["block_0/pre"]["condition_number"]) == pytest.approx(cond, rel=1e-4)
    out, again, plain = extra  # the output on request; a plain apply sows nothing
    assert out.shape == (16, 5) and set(again) == KEYS and set(plain) == {"batch_stats"}
    np.testing.assert_allclose(again["out"]["mean"], stats["out"]["mean"], rtol=1e-5)


def test_collect_nnx_matches_the_linen_twin(linen_setup):
    x, variables, linen_stats, _ = linen_setup
    graphdef, abstract = nnx.split(nnx.eval_shape(lambda: NNXNet(nnx.Rngs(0))))  # built abstractly: faster
    blank = nnx.merge(graphdef, jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype), abstract))
    model = znnx.linen_to_nnx(variables, blank)
    collect = nnx.jit(lambda m, x: diag.collect_nnx(m, x))
    first = collect(model, x)
    second = collect(model, x)
    for stats in (first, second):  # no accumulation between calls
        assert set(stats) == KEYS
        for key in KEYS:
            assert_stats_close(stats[key], {k: np.asarray(v) for k, v in linen_stats[key].items()},
                               rtol=1e-4, atol=1e-5)
    assert not nnx.state(model, nnx.Intermediate)  # nothing left on the model

    @nnx.jit
    def plain_and_intermediates(m, x):
        m(x)  # a plain call: nothing computed or stored (no deprecated sow outside a capture)
        return nnx.capture(m, nnx.Intermediate)(x)[1]  # the experiment models' capture ignores them

    with warnings.catch_warnings():
        warnings.simplefilter("error", DeprecationWarning)
        assert not nnx.to_pure_dict(plain_and_intermediates(model, x))
    assert not nnx.state(model, nnx.Intermediate)


def test_a_name_sown_twice_gets_indexed_keys():
    class Twice(nnx.Module):
        def __call__(self, x):
            diag.sow_stats_nnx(self, "h", x)
            diag.sow_stats_nnx(self, "h", 2 * x)
            return x

    x = jnp.arange(6.0).reshape(3, 2)
    model = Twice()
    with warnings.catch_warnings():  # stale statistics sown outside a capture (deprecated) are popped
        warnings.simplefilter("ignore", DeprecationWarning)
        model.sow(diag.Diagnostics, "stale", {"mean": jnp.zeros(())})
    assert nnx.state(model, diag.Diagnostics)
    stats = diag.collect_nnx(model, x, call=lambda m, x: m(x))  # eagerly
    assert set(stats) == {"h/0", "h/1"} and not nnx.state(model, diag.Diagnostics)
    assert float(stats["h/1"]["mean"]) == pytest.approx(2 * float(stats["h/0"]["mean"]))

    class LinenTwice(nn.Module):
        @nn.compact
        def __call__(self, x):
            diag.sow_stats(self, "h", x)
            diag.sow_stats(self, "h", 2 * x)
            return x

    assert set(diag.collect_linen(LinenTwice().apply, {}, x)) == {"h/0", "h/1"}  # eagerly
