"""normzoo.functional.covariance: per-group covariance against float64 numpy; masks; devices."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, PartitionSpec as P

import normzoo.functional as F
import reference

cov_jit = jax.jit(
    F.covariance,
    static_argnames=(
        "reduction_axes", "feature_axes", "group_size", "axis_name", "axis_index_groups"
    ),
)


@pytest.mark.parametrize("group_size", [None, 4])
def test_dense_features_match_numpy(rng, group_size):
    x = (3.0 + rng.standard_normal((50, 8)) @ rng.standard_normal((8, 8))).astype(np.float32)
    mean, cov = cov_jit(x, reduction_axes=(0,), group_size=group_size)
    ref_mean, _ = reference.covariance(x)
    g = 8 if group_size is None else group_size
    assert mean.shape == (8,) and cov.shape == (8 // g, g, g)
    assert mean.dtype == jnp.float32 and cov.dtype == jnp.float32
    np.testing.assert_allclose(mean, ref_mean, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(cov, reference.group_covariance(x, g)[1], rtol=1e-5, atol=1e-5)


def test_channels_last_conv_features(rng):
    x = rng.standard_normal((4, 3, 5, 6)).astype(np.float32)
    mean, cov = cov_jit(x, reduction_axes=(0, 1, 2), group_size=3)
    ref_mean, _ = reference.covariance(x.reshape(-1, 6))
    np.testing.assert_allclose(mean, ref_mean, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(cov, reference.group_covariance(x.reshape(-1, 6), 3)[1], rtol=1e-5,
                               atol=1e-6)


def test_kept_axes_give_one_covariance_each(rng):
    # instance whitening: reduce the spatial axes, keep the batch axis
    x = rng.standard_normal((3, 7, 5, 4)).astype(np.float32)
    mean, cov = cov_jit(x, reduction_axes=(1, 2), feature_axes=-1)
    assert mean.shape == (3, 4) and cov.shape == (3, 1, 4, 4)
    for n in range(3):
        ref_mean, ref_cov = reference.covariance(x[n].reshape(-1, 4))
        np.testing.assert_allclose(mean[n], ref_mean, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(cov[n, 0], ref_cov, rtol=1e-5, atol=1e-6)


def test_feature_axes_not_last_and_several(rng):
    x = rng.standard_normal((10, 2, 6, 3)).astype(np.float32)  # features: axes 1 and 3
    mean, cov = F.covariance(x, (0, 2), (1, 3))
    ref_mean, ref_cov = reference.covariance(np.moveaxis(x, 2, 1).reshape(60, 6))
    assert mean.shape == (2, 3) and cov.shape == (1, 6, 6)
    np.testing.assert_allclose(mean.reshape(-1), ref_mean, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(cov[0], ref_cov, rtol=1e-5, atol=1e-6)


def test_mask_selects_samples_and_ignores_nan_padding(rng):
    x = rng.standard_normal((12, 5, 4)).astype(np.float32)
    mask = rng.random((12, 5, 1)) < 0.6
    x_nan = np.where(mask, x, np.nan).astype(np.float32)
    mean, cov = cov_jit(x_nan, reduction_axes=(0, 1), mask=mask)
    ref_mean, ref_cov = reference.covariance(x.reshape(-1, 4), mask.reshape(-1))
    np.testing.assert_allclose(mean, ref_mean, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(cov[0], ref_cov, rtol=1e-5, atol=1e-6)


def test_accurate_when_mean_dwarfs_std(rng):
    x = (1e4 + rng.standard_normal((256, 4))).astype(np.float32)
    _, cov = F.covariance(x, 0)
    _, ref_cov = reference.covariance(x)  # of the float32 data, in float64
    np.testing.assert_allclose(cov[0], ref_cov, atol=2e-3)


def test_bf16_input_gives_float32_statistics(rng):
    x = rng.standard_normal((32, 4)).astype(jnp.bfloat16)
    mean, cov = F.covariance(x, 0)
    assert mean.dtype == jnp.float32 and cov.dtype == jnp.float32
    np.testing.assert_allclose(cov[0], reference.covariance(np.asarray(x, np.float32))[1], rtol=1e-5, atol=1e-6)


def test_axis_name_uneven_masked_shards_are_exact(rng):
    # 4 "devices" under vmap, each with a different number of valid samples
    x = rng.standard_normal((4, 9, 6)).astype(np.float32) + np.arange(4)[:, None, None]
    mask = np.zeros((4, 9, 1), bool)
    for d, n in enumerate([9, 2, 5, 1]):
        mask[d, :n] = True

    def f(xd, md):
        return F.covariance(xd, 0, group_size=3, mask=md, axis_name="dev")

    mean, cov = jax.jit(jax.vmap(f, axis_name="dev"))(x, mask)
    ref_mean, ref_cov = reference.group_covariance(x.reshape(-1, 6), 3, mask.reshape(-1))
    for d in range(4):  # every device gets the global statistics
        np.testing.assert_allclose(mean[d], ref_mean.ravel(), rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(cov[d], ref_cov, rtol=1e-5, atol=1e-5)


def test_pmap_with_axis_index_groups_uneven_masks(rng):
    if jax.device_count() < 4:
        pytest.skip("needs 4 devices (tests/conftest.py sets XLA_FLAGS)")
    x = rng.standard_normal((4, 6, 4)).astype(np.float32) + np.arange(4)[:, None, None]
    mask = np.zeros((4, 6, 1), bool)
    for d, n in enumerate([6, 2, 1, 4]):
        mask[d, :n] = True
    groups = [[0, 1], [2, 3]]

    def f(xs, ms):
        return F.covariance(xs, 0, mask=ms, axis_name="dev", axis_index_groups=groups)

    mean, cov = jax.pmap(f, axis_name="dev", devices=jax.devices()[:4])(x, mask)
    for d in range(4):
        rows = groups[d // 2]
        ref_mean, ref_cov = reference.covariance(x[rows].reshape(-1, 4), mask[rows].reshape(-1))
        np.testing.assert_allclose(mean[d], ref_mean, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(cov[d, 0], ref_cov, rtol=1e-5, atol=1e-5)


def test_shard_map_whiten_replicated_statistics(rng):
    # the new running statistics are identical on every device: out_specs P() (replicated)
    if jax.device_count() < 4:
        pytest.skip("needs 4 devices (tests/conftest.py sets XLA_FLAGS)")
    mesh = Mesh(np.array(jax.devices()[:4]), ("dev",))
    x = (5.0 + rng.standard_normal((4 * 8, 4))).astype(np.float32)
    stats = F.init_whitening_stats(4)

    def f(xs):
        return F.whiten(xs, stats, momentum=0.0, epsilon=1e-3, axis_name="dev")

    y, new = jax.jit(
        jax.shard_map(f, mesh=mesh, in_specs=P("dev"), out_specs=(P("dev"), P()))
    )(x)
    ref_mean, ref_cov = reference.covariance(x)
    np.testing.assert_allclose(new["mean"], ref_mean, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(new["covariance"][0], ref_cov, rtol=1e-4, atol=1e-5)
    y = np.asarray(y, np.float64)
    np.testing.assert_allclose(np.cov(y.T, bias=True), np.eye(4), atol=1e-2)


# ---------------------------------------------------------------- errors
def test_error_group_size_not_dividing():
    with pytest.raises(ValueError, match=r"group_size=3 must be a positive divisor of the 8"):
        F.covariance(jnp.ones((4, 8)), 0, group_size=3)


def test_error_overlapping_axes():
    match = r"reduction_axes=\(0, 1\) and feature_axes=\(1,\) overlap"
    with pytest.raises(ValueError, match=match):
        F.covariance(jnp.ones((4, 8)), (0, 1), 1)


def test_error_complex_input():
    with pytest.raises(TypeError, match="real inputs only"):
        F.covariance(jnp.ones((4, 2), jnp.complex64), 0)


def test_error_integer_input():
    with pytest.raises(TypeError, match="expected a floating dtype"):
        F.covariance(jnp.ones((4, 2), jnp.int32), 0)
