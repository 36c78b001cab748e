"""The opt-in CPU kernels (normzoo.backends.cpu) against float64 numpy, against the
pure-JAX path through every layer, and their build and fallback. Every test here skips
where the kernels are not available (no C++ compiler)."""

import atexit
import dataclasses
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import background
import normzoo
import normzoo.backends.cpu as cpu_kernels
from normzoo.backends.cpu import ffi, library, linear, plan

if not cpu_kernels.available():  # pragma: no cover - every CI machine has g++
    pytest.skip(f"CPU kernels unavailable here ({cpu_kernels.failure()}): the pure-JAX "
                f"path serves", allow_module_level=True)


@pytest.fixture(scope="module")
def _kernels_for_every_size():
    with cpu_kernels.enabled(True, multi_device=True), cpu_kernels.min_size(0, 0):
        yield


@pytest.fixture(autouse=True)
def every_size(_kernels_for_every_size):
    """The kernels on, for tiny test arrays too (by default only x of MIN_SIZE on), also in
    this test process's 8 simulated devices (the inputs here are not sharded).

    Switched once for the module (each switch clears jax's caches, so every later eager op
    would compile again); a test that left another state behind (``test_switches``,
    ``test_failed_build_falls_back_with_a_warning``) gets it put back before the next one,
    with its caches cleared, as the switches themselves do.
    """
    if not (cpu_kernels.is_enabled() and plan.SETTINGS["multi_device"]
            and cpu_kernels.MIN_SIZE == {"forward": 0, "backward": 0}):
        assert cpu_kernels.enable(multi_device=True)
        cpu_kernels.MIN_SIZE.update(forward=0, backward=0)
        jax.clear_caches()
    yield


def test_minimum_sizes_pick_the_xla_path_for_small_arrays():
    before = dict(cpu_kernels.MIN_SIZE)
    layer = normzoo.LayerNorm()
    x = jnp.ones((4, 64))
    v = layer.init(jax.random.key(0), x)
    # A training step: params and x differentiated (with frozen params LayerNorm's
    # linearization always stays in XLA, tested in test_cpu_kernels_safety.py).
    grad_text = lambda: jax.jit(jax.grad(  # noqa: E731
        lambda v, x: jnp.sum(layer.apply(v, x) ** 2), argnums=(0, 1))).lower(v, x).as_text()
    with cpu_kernels.min_size(x.size + 1, x.size + 1):
        assert "normzoo_" not in jax.jit(lambda x: layer.apply(v, x)).lower(x).as_text()
        assert "normzoo_" not in grad_text()
    with cpu_kernels.min_size(x.size, x.size + 1):  # forward on the kernel, training step in XLA
        assert "normzoo_row_norm" in jax.jit(lambda x: layer.apply(v, x)).lower(x).as_text()
        assert "normzoo_" not in grad_text()
    with cpu_kernels.min_size(x.size, x.size):
        assert "normzoo_row_norm_backward" in grad_text()
    assert cpu_kernels.MIN_SIZE == before  # restored


def test_kernels_build_and_register_here():
    assert cpu_kernels.available(), cpu_kernels.failure()
    assert cpu_kernels.library_path().exists()
    assert library.is_intact(cpu_kernels.library_path())


def _np_rows(x, scale, bias, eps, centered):
    x = np.asarray(x, np.float64)
    mean = x.mean(-1, keepdims=True) if centered else np.zeros_like(x[:, :1])
    var = ((x - mean) ** 2).mean(-1, keepdims=True)
    y = (x - mean) / np.sqrt(var + eps) * scale + bias
    return y, mean[:, 0], var[:, 0]


def _np_grouped(x, scale, bias, k, eps, centered):
    x = np.asarray(x, np.float64)
    b, m, c = x.shape
    g = x.reshape(b, m, c // k, k)
    mean = g.mean((1, 3), keepdims=True) if centered else np.zeros((b, 1, c // k, 1))
    var = ((g - mean) ** 2).mean((1, 3), keepdims=True)
    y = ((g - mean) / np.sqrt(var + eps)).reshape(x.shape) * scale + bias
    return y, mean.reshape(b, c // k), var.reshape(b, c // k)


def _params(rng, n):
    return (jnp.asarray(rng.uniform(0.5, 1.5, n), jnp.float32),
            jnp.asarray(rng.standard_normal(n), jnp.float32))


@pytest.mark.parametrize("centered", [True, False])
@pytest.mark.parametrize("loc", [0.3, 1e4])
@pytest.mark.parametrize("rows,features", [(1, 5), (37, 16), (300, 1000), (3, 2051)])
def test_rows_match_float64(rows, features, loc, centered):
    # F below, at and off a multiple of the 16 vector lanes (the scalar tail); enough rows
    # to split over threads; |mean| >> std, where E[x^2] - E[x]^2 would cancel.
    rng = np.random.default_rng(rows + features)
    x = jnp.asarray(loc + rng.standard_normal((rows, features)), jnp.float32)
    scale, bias = _params(rng, features)
    y, mean, var = jax.jit(lambda x: ffi.row_normalize(
        x, scale, bias, epsilon=1e-6, centered=centered, out_dtype=jnp.float32))(x)
    ey, emean, evar = _np_rows(x, np.asarray(scale), np.asarray(bias), 1e-6, centered)
    # At 1e4 float32 holds x - mean to ~1e-3 absolute: that bounds y, not the kernel.
    tol = 2e-5 if loc < 1 or not centered else 2e-3
    np.testing.assert_allclose(y, ey, rtol=tol, atol=tol)
    np.testing.assert_allclose(mean, emean, rtol=1e-6, atol=1e-5)  # std 1-2: 1e-5 of it
    np.testing.assert_allclose(var, evar, rtol=1e-4 if centered else 1e-6)


def test_rows_whose_first_element_is_far_out_take_the_exact_pass():
    # The row kernel's one pass is shifted by each row's first element: with that element
    # 1000 std out in a row of 2^16, E[d^2] - E[d]^2 would lose ~3e-5 of the variance; the
    # guard (E[d]^2 > 64 var) recomputes such rows with two exact passes. Row 1 is ordinary.
    rng = np.random.default_rng(11)
    x = rng.standard_normal((2, 1 << 16)).astype(np.float32)
    x[0, 0] += 1000.0
    x = jnp.asarray(x)
    ones, zeros = jnp.ones(x.shape[1]), jnp.zeros(x.shape[1])
    y, mean, var = ffi.row_normalize(x, ones, zeros, epsilon=1e-6, centered=True,
                                        out_dtype=jnp.float32)
    ey, emean, evar = _np_rows(x, 1.0, 0.0, 1e-6, True)
    np.testing.assert_allclose(var, evar, rtol=3e-6)  # without the guard: 2.7e-5 off
    np.testing.assert_allclose(mean, emean, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(y, ey, rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("k", [1, 4])
def test_grouped_blocks_far_from_their_center_take_the_exact_passes(k):
    # The grouped kernel sums each block of 256 rows in one pass shifted by a center (the
    # mean of the block's first 8 rows, then the mean so far). Here those 8 rows lie 1000
    # std out: the first block's E[d^2] - E[d]^2 would lose ~3e-5 of the variance (y 2e-4
    # off) to cancellation; the guard (E[d]^2 > 16 var) sums that block again in two
    # exact passes.
    rng = np.random.default_rng(12)
    x = rng.standard_normal((2, 700, 16)).astype(np.float32)
    x[:, :8] += 1000.0
    x = jnp.asarray(x)
    ones, zeros = jnp.ones(16), jnp.zeros(16)
    y, mean, var = ffi.grouped_normalize(x, ones, zeros, group_size=k, epsilon=1e-5,
                                            centered=True, out_dtype=jnp.float32)
    ey, emean, evar = _np_grouped(x, 1.0, 0.0, k, 1e-5, True)
    np.testing.assert_allclose(var, evar, rtol=3e-6)  # without the guard: 4e-5 off
    np.testing.assert_allclose(mean, emean, rtol=0, atol=1e-5 * np.sqrt(evar).min())
    np.testing.assert_allclose(y, ey, rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("centered", [True, False])
@pytest.mark.parametrize("loc", [0.3, 1e4])
@pytest.mark.parametrize("batch,m,channels,k", [
    (1, 700, 128, 1),   # BatchNorm: blocks of 256 rows and a partial one, chunks over threads
    (2, 40, 300, 1),    # two tiles of 128 channels, then 2 vectors and 12 single channels
    (5, 33, 12, 1),     # InstanceNorm, C off the vector width
    (4, 20, 40, 8),     # GroupNorm, 5 groups of 8
    (2, 1, 3, 3),       # one row, one group
])
def test_grouped_match_float64(batch, m, channels, k, loc, centered):
    rng = np.random.default_rng(batch * m + channels)
    x = jnp.asarray(loc + 2.0 * rng.standard_normal((batch, m, channels)), jnp.float32)
    scale, bias = _params(rng, channels)
    y, mean, var = jax.jit(lambda x: ffi.grouped_normalize(
        x, scale, bias, group_size=k, epsilon=1e-5, centered=centered,
        out_dtype=jnp.float32))(x)
    ey, emean, evar = _np_grouped(x, np.asarray(scale), np.asarray(bias), k, 1e-5, centered)
    tol = 2e-5 if loc < 1 or not centered else 2e-3
    np.testing.assert_allclose(y, ey, rtol=tol, atol=tol)
    np.testing.assert_allclose(mean, emean, rtol=1e-6, atol=1e-5)  # std 1-2: 1e-5 of it
    np.testing.assert_allclose(var, evar, rtol=1e-4 if centered else 1e-6)


@pytest.mark.parametrize("out", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("kind", ["row", "grouped"])
def test_bfloat16_in_and_out(kind, out):
    # bfloat16 x is widened exactly; a bfloat16 y is rounded to nearest even (as XLA's
    # convert): compare with float64 rounded the same way by ml_dtypes.
    rng = np.random.default_rng(7)
    x = jnp.asarray(1.0 + rng.standard_normal((6, 40, 24)), jnp.bfloat16)
    scale, bias = _params(rng, 24)
    if kind == "row":
        x = x.reshape(-1, 24)
        y, _, _ = ffi.row_normalize(x, scale, bias, epsilon=1e-6, centered=True, out_dtype=out)
        expected, _, _ = _np_rows(x.astype(jnp.float32), np.asarray(scale), np.asarray(bias),
                                  1e-6, True)
    else:
        y, _, _ = ffi.grouped_normalize(x, scale, bias, group_size=4, epsilon=1e-6,
                                           centered=True, out_dtype=out)
        expected, _, _ = _np_grouped(x.astype(jnp.float32), np.asarray(scale),
                                     np.asarray(bias), 4, 1e-6, True)
    assert y.dtype == out
    rounded = np.asarray(jnp.asarray(expected, jnp.float32).astype(out), np.float64)
    ulp = 2.0 ** -7 if out == jnp.bfloat16 else 1e-5
    np.testing.assert_allclose(np.asarray(y, np.float64), rounded,
                               atol=ulp * np.abs(rounded).max())


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("m,channels", [(7, 5), (3000, 40), (90, 300)])
def test_channel_affine_matches_float64(m, channels, dtype):
    # Given statistics (BatchNorm at inference): y = (x - shift) * mul + bias per channel;
    # 3000 rows are several items of the thread pool, 300 channels two register tiles and a
    # remainder, 5 channels no full vector.
    rng = np.random.default_rng(m + channels)
    x = jnp.asarray(3.0 + rng.standard_normal((m, channels)), jnp.float32).astype(dtype)
    shift, mul, bias = (jnp.asarray(rng.standard_normal(channels), jnp.float32) for _ in range(3))
    y = jax.jit(lambda x: ffi.channel_affine(x, shift, mul, bias, out_dtype=dtype))(x)
    expected = ((np.asarray(x, np.float64) - np.asarray(shift, np.float64))
                * np.asarray(mul, np.float64) + np.asarray(bias, np.float64))
    tol = 1e-6 if dtype == jnp.float32 else 2 ** -8
    np.testing.assert_allclose(np.asarray(y, np.float64), expected, rtol=tol,
                               atol=tol * np.abs(expected).max())


def test_channel_affine_bad_vectors_raise():
    x = jnp.ones((4, 6))
    with pytest.raises(ValueError, match=r"channels=5 must divide x's size 24"):
        ffi.channel_affine(x, jnp.ones(5), jnp.ones(5), jnp.ones(5), out_dtype=jnp.float32,
                              channels=5)
    with pytest.raises(ValueError, match=r"mul has shape \(5,\); expected \(6,\)"):
        ffi.channel_affine(x, jnp.ones(6), jnp.ones(5), jnp.ones(6), out_dtype=jnp.float32)


@pytest.mark.parametrize("centered", [True, False])
@pytest.mark.parametrize("loc", [0.3, 300.0])
@pytest.mark.parametrize("features", [24, 1000, 3000])
def test_bfloat16_row_statistics_match_float64(features, loc, centered):
    # bfloat16 rows are summed by AVX512-BF16 dot products where the CPU has them (products
    # exact in float32, unshifted); rows with E[x]^2 > var (loc 300) take the shifted pass.
    # F: under one 64-element step, off it (a scalar tail), over a 2048-element chunk.
    rng = np.random.default_rng(features)
    x = jnp.asarray(loc + rng.standard_normal((37, features)), jnp.bfloat16)
    ones, zeros = jnp.ones(features), jnp.zeros(features)
    _, mean, var = ffi.row_normalize(x, ones, zeros, epsilon=1e-6, centered=centered,
                                        out_dtype=jnp.float32)
    _, emean, evar = _np_rows(x.astype(jnp.float32), 1.0, 0.0, 1e-6, centered)
    np.testing.assert_allclose(var, evar, rtol=2e-6)
    np.testing.assert_allclose(mean, emean, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("centered", [True, False])
@pytest.mark.parametrize("loc", [0.3, 300.0])
@pytest.mark.parametrize("batch,m,channels,k", [
    (1, 701, 128, 1),   # BatchNorm: an odd block of rows (the last row pairs with zeros)
    (2, 40, 300, 1),    # tiles of 128 and 32 channels, then 12 single ones
    (3, 50, 64, 4),     # GroupNorm
])
def test_bfloat16_grouped_statistics_match_float64(batch, m, channels, k, loc, centered):
    # bfloat16 blocks are summed by AVX512-BF16 dot products over pairs of rows where the
    # CPU has them; blocks whose statistics have sum E[x]^2 > 4 M2 / n (loc 300) take the
    # shifted pass.
    rng = np.random.default_rng(m + channels)
    x = jnp.asarray(loc + rng.standard_normal((batch, m, channels)), jnp.bfloat16)
    ones, zeros = jnp.ones(channels), jnp.zeros(channels)
    _, mean, var = ffi.grouped_normalize(x, ones, zeros, group_size=k, epsilon=1e-5,
                                            centered=centered, out_dtype=jnp.float32)
    _, emean, evar = _np_grouped(x.astype(jnp.float32), 1.0, 0.0, k, 1e-5, centered)
    np.testing.assert_allclose(var, evar, rtol=2e-6)
    np.testing.assert_allclose(mean, emean, rtol=1e-6, atol=1e-6)


def test_bfloat16_groups_judge_cancellation_by_the_group():
    # GroupNorm: channel means (-3, -1, 1, 3) std, 2 std out or more each, but a group's
    # M2 holds their spread, so its dot-product sums lose little: the group's statistics
    # still match float64 (and this data takes the dot-product path where the CPU has it).
    rng = np.random.default_rng(5)
    offsets = np.tile([-3.0, -1.0, 1.0, 3.0], 16)
    x = jnp.asarray(offsets + rng.standard_normal((2, 600, 64)), jnp.bfloat16)
    ones, zeros = jnp.ones(64), jnp.zeros(64)
    _, mean, var = ffi.grouped_normalize(x, ones, zeros, group_size=4, epsilon=1e-5,
                                            centered=True, out_dtype=jnp.float32)
    _, emean, evar = _np_grouped(x.astype(jnp.float32), 1.0, 0.0, 4, 1e-5, True)
    np.testing.assert_allclose(var, evar, rtol=2e-6)
    np.testing.assert_allclose(mean, emean, rtol=0, atol=1e-6)


@pytest.mark.parametrize("out", [jnp.float32, jnp.bfloat16])
def test_non_finite_rows_stay_non_finite(out):
    x = jnp.ones((4, 33), jnp.float32).at[1, 32].set(jnp.nan).at[2, 3].set(jnp.inf)
    x = x.at[0].set(jnp.arange(33.0))
    y, mean, _ = ffi.row_normalize(x, jnp.ones(33), jnp.zeros(33), epsilon=1e-6,
                                      centered=True, out_dtype=out)
    y = np.asarray(y, np.float32)
    assert np.isnan(y[1]).all() and np.isnan(mean[1])
    assert not np.isfinite(y[2]).any()
    assert np.isfinite(y[0]).all() and np.isfinite(y[3]).all()


LAYERS = {
    "LayerNorm": dict(),
    "LayerNorm_2axes": dict(reduction_axes=(2, 3), feature_axes=(2, 3)),
    "RMSNorm": dict(),
    "BatchNorm": dict(use_running_average=False),
    "BatchNorm_eval": dict(use_running_average=True),  # frozen statistics
    "GroupNorm": dict(num_groups=4),
    "InstanceNorm": dict(),
}


def _layer(name, dtype, rng, loc):
    """The layer, an input (4, 6, 5, 16) around ``loc`` and variables off their init."""
    layer = getattr(normzoo, name.split("_")[0])(dtype=dtype, **LAYERS[name])
    x = jnp.asarray(loc + rng.standard_normal((4, 6, 5, 16)), jnp.float32).astype(dtype)

    @jax.jit  # one program, not an eager op at a time (each compiled after a kernel switch)
    def init(key, x):
        return jax.tree.map(lambda p: p + 0.1 * jnp.arange(p.size).reshape(p.shape) / p.size,
                            layer.init(key, x))

    return layer, x, init(jax.random.key(0), x)


def _top(e):
    """max |e| in float32 (NumPy: no eager jax op to compile)."""
    return float(np.max(np.abs(np.asarray(e, np.float32))))


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("name", sorted(LAYERS))
def test_layers_native_and_xla_agree(name, dtype):
    # The same layer traced with the kernels on and off: every output, the running
    # statistics included, to rounding; and the native call is really in the program where
    # plan.NATIVE_PLAN lists the layout and dtype.
    layer, x, variables = _layer(name, dtype, np.random.default_rng(3), loc=5.0)

    def run(v, x):
        return layer.apply(v, x, mutable=["batch_stats"])

    with_native = jax.jit(run)
    lowered = with_native.lower(variables, x).as_text()
    with cpu_kernels.enabled(False):
        xla = jax.jit(lambda v, x: run(v, x))
        assert "normzoo_" not in xla.lower(variables, x).as_text()
        expected = xla(variables, x)
    got = with_native(variables, x)
    tol = 2e-5 if dtype == jnp.float32 else 2 ** -7 * 8
    for a, e in zip(jax.tree.leaves(got), jax.tree.leaves(expected)):
        np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(e, np.float32),
                                   rtol=tol, atol=tol)
    kind = "grouped" if name.startswith(("BatchNorm", "GroupNorm", "InstanceNorm")) else "row"
    kind = "frozen" if name == "BatchNorm_eval" else kind  # the channel_affine kernel
    assert ("normzoo_" in lowered) == ((kind, jnp.dtype(dtype).name) in plan.NATIVE_PLAN)


def test_layer_under_vmap_grad_and_forward_mode():
    # vmap runs the kernel once per member; derivatives use the XLA linearization, so
    # grad, jvp and second derivatives are those of the pure-XLA path.
    rng = np.random.default_rng(4)
    x = jnp.asarray(rng.standard_normal((3, 8, 40)), jnp.float32)
    layer = nn.LayerNorm()
    ours = normzoo.LayerNorm()
    v = layer.init(jax.random.key(0), x[0])
    per_member = jnp.stack([ours.apply(v, m) for m in x])
    np.testing.assert_allclose(jax.vmap(lambda m: ours.apply(v, m))(x), per_member,
                               rtol=1e-6, atol=1e-6)
    loss = lambda mod: lambda x: jnp.sum(jnp.sin(mod.apply(v, x)))  # noqa: E731
    np.testing.assert_allclose(jax.grad(loss(ours))(x[0]), jax.grad(loss(layer))(x[0]),
                               rtol=2e-5, atol=2e-5)
    small = x[0, :2, :5]
    v = layer.init(jax.random.key(0), small)
    hessian = lambda mod: jax.jit(jax.hessian(  # noqa: E731
        lambda x: jnp.sum(jnp.sin(mod.apply(v, x.reshape(2, 5))))))(small.reshape(-1))
    np.testing.assert_allclose(hessian(ours), hessian(layer), rtol=1e-3, atol=1e-4)


def test_failed_build_falls_back_with_a_warning(monkeypatch, tmp_path):
    cpu_kernels.disable()
    monkeypatch.setattr(library, "_loaded", None)
    monkeypatch.setattr(library, "_failure", None)
    monkeypatch.setenv("NORMZOO_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(library, "compiler", lambda: str(tmp_path / "no-such-compiler"))
    assert not cpu_kernels.available()
    with pytest.warns(RuntimeWarning, match="CPU kernels unavailable"):
        assert not cpu_kernels.enable()
    assert not cpu_kernels.is_enabled()
    assert "no-such-compiler" in cpu_kernels.failure()
    assert not list(tmp_path.glob("*.so"))


def test_switches():
    assert cpu_kernels.is_enabled()
    with cpu_kernels.enabled(False) as on:
        assert not on and not cpu_kernels.is_enabled()
        with cpu_kernels.enabled() as inner:
            assert inner and cpu_kernels.is_enabled()
        assert not cpu_kernels.is_enabled()
    assert cpu_kernels.is_enabled() and plan.SETTINGS["multi_device"]
    cpu_kernels.disable()
    assert not cpu_kernels.is_enabled()
    assert cpu_kernels.enable() and cpu_kernels.is_enabled()


def test_batch_sharded_jit_steps_aside_and_shard_map_runs_the_kernels():
    # A custom call has no sharding rule: under jit with a sharded x XLA would gather it and
    # return a replicated output. So in a process with several devices the kernels step
    # aside outside shard_map (the output keeps x's sharding), and inside shard_map each
    # device runs them on its own rows. Both equal the unsharded layer.
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

    if jax.device_count() < 2:
        pytest.skip("needs XLA_FLAGS=--xla_force_host_platform_device_count (conftest)")
    devices = np.array(jax.devices()[:2])
    mesh = Mesh(devices, ("data",))
    rng = np.random.default_rng(9)
    x = jnp.asarray(rng.standard_normal((8, 6, 40)), jnp.float32)
    layer = normzoo.LayerNorm()
    v = layer.init(jax.random.key(0), x)
    expected = layer.apply(v, x)
    sharded = jax.device_put(x, NamedSharding(mesh, P("data")))
    with cpu_kernels.enabled(True):  # multi_device=False: the default of enable()
        forward = jax.jit(layer.apply)
        assert "normzoo_" not in forward.lower(v, sharded).as_text()
        y = forward(v, sharded)
        np.testing.assert_allclose(y, expected, rtol=1e-6, atol=1e-6)
        assert y.sharding.spec[0] == "data"
        shard_map = getattr(jax, "shard_map", None)
        if shard_map is None:  # older jax
            from jax.experimental.shard_map import shard_map
        local = shard_map(lambda x: layer.apply(v, x), mesh=mesh, in_specs=P("data"),
                          out_specs=P("data"))
        assert "normzoo_row_norm" in jax.jit(local).lower(sharded).as_text()
        np.testing.assert_allclose(jax.jit(local)(sharded), expected, rtol=1e-6, atol=1e-6)


# ---------------------------------------------------------------- the native backward pass


BACKWARD_VIEWS = {
    "ln": (linear.View("row", 40, centered=True, epsilon=1e-6, stat_shape=(6, 1)), (6, 40)),
    "rms": (linear.View("row", 21, centered=False, epsilon=1e-6, stat_shape=(5, 1)), (5, 21)),
    # Over 4 rows per item of the thread pool's (at most 4 per thread, up to 64 threads):
    # the row backward's groups of 4 rows and a partial one.
    "ln_rows": (linear.View("row", 40, centered=True, epsilon=1e-6, stat_shape=(1301, 1)),
                (1301, 40)),
    "rms_rows": (linear.View("row", 21, centered=False, epsilon=1e-6, stat_shape=(1293,)),
                 (1293, 21)),
    "bn": (linear.View("grouped", 20, batch=1, epsilon=1e-5, stat_shape=(1, 20)), (1, 300, 20)),
    "gn": (linear.View("grouped", 24, batch=3, group_size=6, epsilon=1e-5, stat_shape=(3, 4)),
           (3, 7, 24)),
    "in": (linear.View("grouped", 16, batch=4, epsilon=1e-5, stat_shape=(4, 16)), (4, 9, 16)),
    # Statistics given (BatchNorm at inference): 1000 rows are two items of the thread pool,
    # each over blocks of 64 rows and a partial one; 20 channels, a vector and 4 more.
    "bn_frozen": (linear.View("grouped", 20, batch=1, epsilon=1e-5, stat_shape=(1, 20),
                              frozen=True), (1, 1000, 20)),
    "bn_frozen_rms": (linear.View("grouped", 20, batch=1, centered=False, epsilon=1e-5,
                                  stat_shape=(1, 20), frozen=True), (1, 1000, 20)),
}


def _backward_inputs(name, dtype=jnp.float32):
    view, shape = BACKWARD_VIEWS[name]
    rng = np.random.default_rng(len(name))
    x = jnp.asarray(2.0 + rng.standard_normal(shape), jnp.float32).astype(dtype)
    f = view.features
    scale = jnp.asarray(rng.uniform(0.5, 1.5, f), jnp.float32)
    bias = jnp.asarray(rng.standard_normal(f), jnp.float32)
    cts = (jnp.asarray(rng.standard_normal(shape), jnp.float32).astype(view.out_dtype),
           jnp.asarray(rng.standard_normal(view.stat_shape), jnp.float32),
           jnp.asarray(rng.standard_normal(view.stat_shape), jnp.float32))
    return view, x, scale, bias, cts


def _moments(view, x):
    if view.kind == "row":
        xs = x.astype(jnp.float32).reshape(-1, view.features)
        axes = (1,)
    else:
        xs = x.astype(jnp.float32).reshape(view.batch, -1, view.features // view.group_size,
                                           view.group_size)
        axes = (1, 3)
    mean = xs.mean(axes) if view.centered else jnp.zeros(view.stat_shape)
    second = ((xs - (xs.mean(axes, keepdims=True) if view.centered else 0.0)) ** 2).mean(axes)
    return mean.reshape(view.stat_shape), second.reshape(view.stat_shape)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("name", sorted(BACKWARD_VIEWS))
def test_backward_kernel_is_the_transpose_of_the_tangent(name, dtype):
    # The native backward (the cotangent primitive, lowered to the kernel on CPU) against
    # jax.linear_transpose of the jax.numpy tangent, with cotangents on y and on both
    # statistics (gradients through running averages).
    view, x, scale, _, cts = _backward_inputs(name, dtype)
    view = dataclasses.replace(view, out_dtype=jnp.dtype(dtype))
    cts = (cts[0].astype(dtype),) + cts[1:]
    mean, var = jax.jit(_moments, static_argnums=0)(view, x)
    got = jax.jit(lambda *a: linear.cotangent_p.bind(*a, view=view))(x, scale, mean, var, *cts)
    expected = jax.jit(linear._reference_cotangent, static_argnums=0)(
        view, x, scale, mean, var, *cts)
    tol = 1e-4 if dtype == jnp.float32 else 2e-2
    for a, e in zip(got, expected):
        scale_of = _top(e) + 1e-6
        np.testing.assert_allclose(np.asarray(a, np.float32) / scale_of,
                                   np.asarray(e, np.float32) / scale_of, atol=tol)


@pytest.mark.parametrize("name", sorted(BACKWARD_VIEWS))
def test_tangent_and_cotangent_are_adjoint(name):
    # <ct, T(t)> == <T'(ct), t> for the primitives as JAX runs them (jvp in XLA, transpose on
    # the kernel): the backward is exactly the transpose of the forward-mode derivative.
    view, x, scale, _, cts = _backward_inputs(name)
    mean, var = jax.jit(_moments, static_argnums=0)(view, x)
    rng = np.random.default_rng(1)
    t = (jnp.asarray(rng.standard_normal(x.shape), jnp.float32),
         jnp.asarray(rng.standard_normal(scale.shape), jnp.float32),
         jnp.asarray(rng.standard_normal(scale.shape), jnp.float32))
    forward = jax.jit(lambda *t: linear.tangent(x, scale, mean, var, *t, view=view))
    backward = jax.jit(lambda *c: linear.cotangent_p.bind(x, scale, mean, var, *c, view=view))
    lhs = sum(float(jnp.vdot(c, o)) for c, o in zip(cts, forward(*t)))
    rhs = sum(float(jnp.vdot(g, d)) for g, d in zip(backward(*cts), t))
    assert lhs == pytest.approx(rhs, rel=1e-4)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("name", sorted(LAYERS))
def test_layer_gradients_native_and_xla_agree(name, dtype):
    # grad of a loss through every output, the running statistics included, with the kernels
    # on and off; and the backward kernel is in the program where NATIVE_BACKWARD_PLAN says.
    rng = np.random.default_rng(5)
    layer, x, variables = _layer(name, dtype, rng, loc=1.0)
    weights = jax.tree.map(lambda p: jnp.asarray(rng.standard_normal(p.shape), jnp.float32),
                           jax.eval_shape(lambda v, x: layer.apply(v, x, mutable=["batch_stats"]),
                                          variables, x))

    def loss(params, x):
        out = layer.apply({**variables, "params": params}, x, mutable=["batch_stats"])
        return sum(jnp.sum(o.astype(jnp.float32) * w) for o, w in
                   zip(jax.tree.leaves(out), jax.tree.leaves(weights)))

    grad = jax.jit(jax.grad(loss, argnums=(0, 1)))
    lowered = grad.lower(variables["params"], x).as_text()
    got = grad(variables["params"], x)
    with cpu_kernels.enabled(False):
        expected = jax.jit(jax.grad(lambda p, x: loss(p, x), argnums=(0, 1)))(
            variables["params"], x)
    tol = 1e-4 if dtype == jnp.float32 else 3e-2
    for a, e in zip(jax.tree.leaves(got), jax.tree.leaves(expected)):
        top = _top(e)
        np.testing.assert_allclose(np.asarray(a, np.float32) / top,
                                   np.asarray(e, np.float32) / top, atol=tol)
    kind = "grouped" if name.startswith(("BatchNorm", "GroupNorm", "InstanceNorm")) else "row"
    variant = {"LayerNorm": "centered", "LayerNorm_2axes": "centered", "RMSNorm": "uncentered",
               "BatchNorm": "whole", "BatchNorm_eval": "frozen", "GroupNorm": "per_sample",
               "InstanceNorm": "per_sample"}
    planned = (kind, jnp.dtype(dtype).name, variant[name]) in plan.NATIVE_BACKWARD_PLAN
    assert ("backward" in lowered) == planned


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_batchnorm_at_inference_gradients_match_flax(dtype):
    # use_running_average=True: the forward pass on the channel_affine kernel, derivatives
    # from the plain formula: the gradients of params, input and running statistics are
    # flax.linen's autodiff, and forward mode with a tangent on the statistics too.
    rng = np.random.default_rng(8)
    x = jnp.asarray(3.0 + 2.0 * rng.standard_normal((4, 5, 6, 40)), jnp.float32).astype(dtype)
    w = jnp.asarray(rng.standard_normal(x.shape), jnp.float32)
    variables = {"params": {"scale": jnp.linspace(0.5, 1.5, 40), "bias": jnp.linspace(-1, 1, 40)},
                 "batch_stats": {"mean": jnp.linspace(2.0, 4.0, 40),
                                 "var": jnp.linspace(1.0, 5.0, 40)}}

    def loss(layer):
        return lambda v, x: jnp.sum(layer.apply(v, x).astype(jnp.float32) * w)

    ours = normzoo.BatchNorm(use_running_average=True, dtype=dtype)
    flax_bn = nn.BatchNorm(use_running_average=True, dtype=dtype)
    grad = jax.jit(jax.grad(loss(ours), argnums=(0, 1)))
    # Given statistics under differentiation: the plain formula's derivative, no custom call.
    assert "normzoo_" not in grad.lower(variables, x).as_text()
    assert "normzoo_channel_affine" in jax.jit(ours.apply).lower(variables, x).as_text()
    got, expected = grad(variables, x), jax.grad(loss(flax_bn), argnums=(0, 1))(variables, x)
    for a, e in zip(jax.tree.leaves(got), jax.tree.leaves(expected)):
        top = _top(e)
        np.testing.assert_allclose(np.asarray(a, np.float32) / top,
                                   np.asarray(e, np.float32) / top, atol=2e-6)
    tangent = jax.tree.map(lambda p: jnp.asarray(rng.standard_normal(p.shape), jnp.float32),
                           variables)
    _, t_ours = jax.jvp(lambda v: ours.apply(v, x), (variables,), (tangent,))
    _, t_flax = jax.jvp(lambda v: flax_bn.apply(v, x), (variables,), (tangent,))
    np.testing.assert_allclose(np.asarray(t_ours, np.float32), np.asarray(t_flax, np.float32),
                               rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("operation", ["standardize", "scale"])
def test_given_statistics_gradients_native_and_xla_agree(operation):
    # normalize(area="batch", train=False) with running statistics, with and without a mean
    # (scale: the mean square): gradients of x, params and statistics, kernels on and off.
    from normzoo import functional as F

    rng = np.random.default_rng(9)
    x = jnp.asarray(1.0 + rng.standard_normal((3, 7, 48)), jnp.float32)
    stats = {k: jnp.asarray(rng.uniform(0.5, 2.0, 48), jnp.float32)
             for k in F.init_batch_stats((48,), operation)}
    scale, bias = (jnp.asarray(rng.standard_normal(48), jnp.float32) for _ in range(2))
    w = jnp.asarray(rng.standard_normal(x.shape), jnp.float32)

    def loss(x, stats, scale, bias):
        y, _ = F.normalize(x, stats, scale, bias, area="batch", operation=operation,
                           train=False)
        return jnp.sum(y * w)

    grad = jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3)))
    assert "normzoo_" not in grad.lower(x, stats, scale, bias).as_text()
    got = grad(x, stats, scale, bias)
    with cpu_kernels.enabled(False):
        expected = jax.jit(jax.grad(lambda *a: loss(*a), argnums=(0, 1, 2, 3)))(
            x, stats, scale, bias)
    for a, e in zip(jax.tree.leaves(got), jax.tree.leaves(expected)):
        np.testing.assert_allclose(a, e, rtol=1e-5, atol=1e-5 * _top(e))


def test_native_backward_under_vmap_and_second_order():
    # vmap of grad uses the primitives' batching rules; hessian differentiates the tangent
    # primitive (and the native forward) through their jax.numpy references.
    rng = np.random.default_rng(6)
    x = jnp.asarray(rng.standard_normal((3, 4, 10)), jnp.float32)
    layer = normzoo.GroupNorm(num_groups=2)
    v = layer.init(jax.random.key(0), x[0, :, None, :])
    loss = lambda x: jnp.sum(jnp.sin(layer.apply(v, x[:, None, :])))  # noqa: E731
    # Jitted: eager, each of their many small ops would compile on its own. (Eager grad,
    # the primitives' own impl: test_layer_under_vmap_grad_and_forward_mode.)
    with cpu_kernels.enabled(False):
        grads_xla = jax.jit(jax.vmap(jax.grad(lambda x: loss(x))))(x)
        hess_xla = jax.jit(jax.hessian(lambda x: loss(x)))(x[0])
    np.testing.assert_allclose(jax.jit(jax.vmap(jax.grad(loss)))(x), grads_xla, rtol=1e-4,
                               atol=1e-5)
    assert "backward" in jax.jit(jax.grad(loss)).lower(x[0]).as_text()
    np.testing.assert_allclose(jax.jit(jax.hessian(loss))(x[0]), hess_xla, rtol=1e-3,
                               atol=1e-4)


# ------------------------------------------- builds with other flags, run in fresh processes

_ROUNDING_SCRIPT = textwrap.dedent("""
    import jax, jax.numpy as jnp, numpy as np
    from normzoo.backends.cpu import ffi, library
    assert library.load(), library.failure()
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((7, 37)) * 3 + 1, jnp.float32)
    x = x.at[2, 5].set(jnp.nan)
    y, _, _ = ffi.row_normalize(x, jnp.ones(37), jnp.zeros(37), epsilon=1e-6,
                                   centered=True, out_dtype=jnp.bfloat16)
    f, _, _ = ffi.row_normalize(x, jnp.ones(37), jnp.zeros(37), epsilon=1e-6,
                                   centered=True, out_dtype=jnp.float32)
    np.testing.assert_array_equal(np.asarray(y, np.float32),
                                  np.asarray(f.astype(jnp.bfloat16), np.float32))
    # Exact ties (to even), specials and overflow to inf, written by the output pass
    # with shift 0, mul 1, bias 0 (so y = x), in vector lanes and a scalar tail. (Not
    # denormals: XLA's threads flush them to zero in arithmetic, not only in rounding.)
    u = 2.0 ** -8
    special = [1 + u, 1 + 3 * u, -(1 + u), 2 + 2 * u, 3.4e38, -3.4e38, np.inf, -np.inf,
               np.nan, 1e-30, 7.0, 0.5 + u / 2, 1 + u / 2 + 2.0 ** -20]
    x = np.resize(np.asarray(special, np.float32), (4, 19))
    x[1] = -x[1]
    y = ffi.channel_affine(jnp.asarray(x), jnp.zeros(19), jnp.ones(19), jnp.zeros(19),
                              out_dtype=jnp.bfloat16, in_place=False)
    np.testing.assert_array_equal(np.asarray(y, np.float32),
                                  np.asarray(jnp.asarray(x).astype(jnp.bfloat16), np.float32))
    print("ok", library.library_path())
""")

_STREAM_SCRIPT = """
import dataclasses, sys
import jax, jax.numpy as jnp, numpy as np
from normzoo.backends.cpu import library
from normzoo.backends.cpu import ffi, linear
assert library.load(), library.failure()
rng = np.random.default_rng(0)
out = {}
for dt in (jnp.float32, jnp.bfloat16):
    name = jnp.dtype(dt).name
    # Rows of 64 features (row bytes a multiple of 64 in both dtypes), a fresh y.
    x = jnp.asarray(rng.standard_normal((300, 64)) * 2 + 1, jnp.float32).astype(dt)
    scale = jnp.asarray(rng.uniform(0.5, 1.5, 64), jnp.float32)
    bias = jnp.asarray(rng.standard_normal(64), jnp.float32)
    y, m, v = jax.jit(lambda x: ffi.row_normalize(
        x, scale, bias, epsilon=1e-6, centered=True, out_dtype=dt, in_place=False))(x)
    out[f"row_{name}"] = np.asarray(y, np.float32)
    view = linear.View("row", 64, centered=True, epsilon=1e-6, out_dtype=jnp.dtype(dt),
                       stat_shape=(300,))
    gy = jnp.asarray(rng.standard_normal(x.shape), jnp.float32).astype(dt)
    g = jax.jit(lambda *a: linear.cotangent_p.bind(*a, view=view))(
        x, scale, m, v, gy, jnp.ones(300), jnp.ones(300))
    out[f"row_bwd_{name}"] = np.asarray(g[0], np.float32)
    # Channels of 32: per-sample (B = 2), whole (B = 1) and frozen statistics.
    xg = jnp.asarray(rng.standard_normal((2, 150, 32)) * 2 + 1, jnp.float32).astype(dt)
    gyg = jnp.asarray(rng.standard_normal(xg.shape), jnp.float32).astype(dt)
    for batch, frozen in ((2, False), (1, False), (1, True)):
        xb = xg.reshape(batch, -1, 32)
        y, m, v = jax.jit(lambda x: ffi.grouped_normalize(
            x, scale[:32], bias[:32], group_size=1, epsilon=1e-5, centered=True,
            out_dtype=dt, in_place=False))(xb)
        out[f"grouped{batch}_{name}"] = np.asarray(y, np.float32)
        view = linear.View("grouped", 32, batch=batch, epsilon=1e-5, out_dtype=jnp.dtype(dt),
                           stat_shape=(batch, 32), frozen=frozen)
        g = jax.jit(lambda *a: linear.cotangent_p.bind(*a, view=view))(
            xb, scale[:32], m, v, gyg.reshape(xb.shape), jnp.ones((batch, 32)),
            jnp.ones((batch, 32)))
        out[f"grouped{batch}_bwd_{'frozen' if frozen else 'batch'}_{name}"] = np.asarray(
            g[0], np.float32)
    out[f"affine_{name}"] = np.asarray(jax.jit(lambda x: ffi.channel_affine(
        x, bias[:32], scale[:32], bias[32:], out_dtype=dt, in_place=False))(xg), np.float32)
np.savez(sys.argv[1], **out)
print("ok")
"""

_VARIANT_CACHE: list[Path] = []


def _variant_cache() -> Path:
    """One fresh normzoo cache (not this process's) for every variant build of the session:
    its names are keyed by the flags, so each variant is compiled once, however many of the
    tests below load it. Removed when the process exits."""
    if not _VARIANT_CACHE:
        path = Path(tempfile.mkdtemp(prefix="normzoo-variants-"))
        atexit.register(shutil.rmtree, path, True)
        _VARIANT_CACHE.append(path)
    return _VARIANT_CACHE[0]


def _rounding_run(flags: str, cache: Path, environ: dict):
    """_ROUNDING_SCRIPT's run in a fresh process on kernels built with ``flags``."""
    env = dict(environ, NORMZOO_CACHE_DIR=str(cache), NORMZOO_NATIVE_CFLAGS=flags)
    return subprocess.run([sys.executable, "-c", _ROUNDING_SCRIPT], env=env,
                          capture_output=True, text=True, timeout=600)


def _variant_outputs(cflags: str, cache: Path, environ: dict):
    """_STREAM_SCRIPT's run in a fresh process on kernels built with ``cflags``: the run,
    and its outputs (a dict) where it wrote them."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "outputs.npz"
        env = dict(environ, NORMZOO_CACHE_DIR=str(cache), NORMZOO_NATIVE_CFLAGS=cflags)
        done = subprocess.run([sys.executable, "-c", _STREAM_SCRIPT, str(out)], env=env,
                              capture_output=True, text=True, timeout=600)
        if not out.exists():
            return done, None
        with np.load(out) as outputs:
            return done, dict(outputs)


def _variant_job(kind: str, flags: str, environ: dict | None = None):
    """(key, function, args) of the fresh-process run ``kind`` ("rounding" or "outputs")
    on the build with ``flags``, in ``environ`` (default: this moment's)."""
    fn = _rounding_run if kind == "rounding" else _variant_outputs
    args = (flags, _variant_cache(), environ or dict(os.environ))
    return ("cpu_kernels", kind, flags), fn, args


def _variant_result(kind: str, flags: str):
    key, fn, args = _variant_job(kind, flags)
    return background.result(key, fn, *args)


#: The fresh-process runs (kind, flags) each test below asks for. They start in this order,
#: the two rounding runs first, so that runs started together build different variants
#: (a run whose variant another process is building waits for it on the build's lock).
_VARIANT_RUNS = {
    "test_bfloat16_rounding_without_avx512_bf16": [("rounding", "-mno-avx512bf16"),
                                                   ("rounding", "-mno-avx512f")],
    "test_streamed_outputs_are_the_plain_stores_values": [("outputs", "-DNZ_STREAM_BYTES=0")],
    "test_streamed_outputs_without_avx512_bf16": [
        ("outputs", "-DNZ_STREAM_BYTES=0 -mno-avx512bf16"), ("outputs", "-mno-avx512bf16")],
    "test_generic_vector_code_matches_the_avx512_build": [("outputs", "-mno-avx512f")],
}


def background_jobs(items):
    """The selected tests' fresh-process runs (each compiles its variant, or waits for its
    build), started when collection ends, beside the in-process tests (tests/background.py):
    their compilers and jax imports take most of these tests' time."""
    names = {getattr(item, "originalname", item.name) for item in items}
    runs = [run for name, rs in _VARIANT_RUNS.items() if name in names for run in rs]
    environ = dict(os.environ)
    for kind, flags in sorted(dict.fromkeys(runs), key=lambda r: r[0] != "rounding"):
        yield _variant_job(kind, flags, environ)


def _outputs_of(done, outputs):
    assert done.returncode == 0 and "ok" in done.stdout, done.stderr[-3000:]
    assert outputs is not None and len(outputs) == 16
    return outputs


@pytest.mark.parametrize("flags", ["-mno-avx512bf16", "-mno-avx512f"])
def test_bfloat16_rounding_without_avx512_bf16(flags):
    # Machines without AVX512-BF16 round in the kernels' own code (AVX-512F intrinsics, or
    # the portable vector code without AVX-512): load each variant, built into a cache of
    # its own, in a fresh process and compare its rounding with XLA's, bit for bit (a NaN
    # included).
    done = _variant_result("rounding", flags)
    assert done.returncode == 0 and "ok" in done.stdout, done.stderr[-3000:]
    # The library it loaded: this variant's, in the variant cache (not this process's).
    loaded = Path(done.stdout.split()[-1])
    assert loaded.parent == _variant_cache() and loaded.exists(), done.stdout
    assert loaded != cpu_kernels.library_path()


@pytest.fixture(scope="module")
def own_build_outputs(tmp_path_factory):
    """_STREAM_SCRIPT's 16 outputs (a dict) from this process's own build, computed once for
    the tests that compare a variant build with it (deterministic: one script and seed)."""
    import runpy

    tmp = tmp_path_factory.mktemp("own_build")
    script, out = tmp / "outputs.py", tmp / "outputs.npz"
    script.write_text(_STREAM_SCRIPT)
    argv = sys.argv
    try:
        sys.argv = [str(script), str(out)]
        runpy.run_path(str(script), run_name="__main__")
    finally:
        sys.argv = argv
    with np.load(out) as outputs:
        outputs = dict(outputs)
    assert len(outputs) == 16
    return outputs


def _check_streamed_outputs(flags: str, plain_outputs) -> None:
    # Outputs of at least NZ_STREAM_BYTES of traffic are written with non-temporal stores: a
    # build with the threshold at 0 streams every aligned output (forward into a fresh y,
    # every backward); its outputs must be bit for bit those of a build with the same flags
    # that streams nothing this small.
    streamed = _outputs_of(*_variant_result("outputs", f"-DNZ_STREAM_BYTES=0 {flags}".strip()))
    assert sorted(streamed) == sorted(plain_outputs)
    for key in plain_outputs:
        np.testing.assert_array_equal(streamed[key], plain_outputs[key], err_msg=key)


def test_streamed_outputs_are_the_plain_stores_values(own_build_outputs):
    _check_streamed_outputs("", own_build_outputs)


@pytest.mark.slow  # two more compiler runs; the same stores as above with AVX-512F's bfloat16 rounding
def test_streamed_outputs_without_avx512_bf16():
    _check_streamed_outputs("-mno-avx512bf16", _outputs_of(*_variant_result("outputs", "-mno-avx512bf16")))


def test_generic_vector_code_matches_the_avx512_build(own_build_outputs):
    # Machines without AVX-512 (most of them) run the kernels' generic vector code: the
    # bfloat16 widening and rounding, the float sums, no dot products, no streaming. A build
    # with -mno-avx512f computes the same 16 outputs as this process's AVX-512 build, to
    # float32 rounding (bfloat16 outputs to one bfloat16 rounding).
    generic = _outputs_of(*_variant_result("outputs", "-mno-avx512f"))
    avx512 = own_build_outputs
    assert sorted(generic) == sorted(avx512)
    for key in avx512:
        bf16 = key.endswith("bfloat16")
        np.testing.assert_allclose(generic[key], avx512[key], rtol=2**-7 if bf16 else 2e-5,
                                   atol=1e-2 if bf16 else 2e-5, err_msg=key)


@pytest.mark.parametrize("call,match", [
    (lambda x: ffi.row_normalize(x, jnp.ones(7), jnp.zeros(7), epsilon=1e-6, centered=True,
                                    out_dtype=jnp.float32, features=7),
     r"features=7 must divide x's size 24"),
    (lambda x: ffi.row_normalize(x, jnp.ones(4), jnp.zeros(4), epsilon=1e-6, centered=True,
                                    out_dtype=jnp.float32, stat_shape=(5,)),
     r"stat_shape \(5,\) must hold 6 values"),
    (lambda x: ffi.grouped_normalize(x, jnp.ones(4), jnp.zeros(4), group_size=1,
                                        epsilon=1e-5, centered=True, out_dtype=jnp.float32),
     r"give batch and channels, or a \(B, M, C\) x"),
    (lambda x: ffi.grouped_normalize(x, jnp.ones(5), jnp.zeros(5), group_size=1, batch=1,
                                        channels=5, epsilon=1e-5, centered=True,
                                        out_dtype=jnp.float32),
     r"batch=1 and channels=5 must divide x's size 24"),
    (lambda x: ffi.grouped_normalize(x, jnp.ones(4), jnp.zeros(4), group_size=3, batch=2,
                                        channels=4, epsilon=1e-5, centered=True,
                                        out_dtype=jnp.float32),
     r"group_size=3 must divide channels=4"),
    (lambda x: ffi.grouped_normalize(x, jnp.ones(4), jnp.zeros(4), group_size=2, batch=2,
                                        channels=4, epsilon=1e-5, centered=True,
                                        out_dtype=jnp.float32, stat_shape=(2, 4)),
     r"stat_shape \(2, 4\) must hold 4 values"),
])
def test_bad_views_raise_value_errors(call, match):
    with pytest.raises(ValueError, match=match):
        call(jnp.ones((6, 4)))


def test_calling_a_kernel_that_could_not_be_built_raises(monkeypatch):
    monkeypatch.setattr(library, "_loaded", False)
    monkeypatch.setattr(library, "_failure", "RuntimeError: no C++ compiler found")
    with pytest.raises(RuntimeError, match="CPU kernels unavailable: .*no C\\+\\+ compiler"):
        ffi.row_normalize(jnp.ones((2, 4)), jnp.ones(4), jnp.zeros(4), epsilon=1e-6,
                             centered=True, out_dtype=jnp.float32)
    with pytest.raises(RuntimeError, match="CPU kernels unavailable"):
        ffi.channel_affine(jnp.ones((2, 4)), jnp.zeros(4), jnp.ones(4), jnp.zeros(4),
                              out_dtype=jnp.float32)


def test_frozen_statistics_need_the_grouped_view():
    with pytest.raises(ValueError, match="frozen statistics need the grouped view, not 'row'"):
        linear.View("row", 8, frozen=True)
