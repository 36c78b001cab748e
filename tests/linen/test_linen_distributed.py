"""axis_name / axis_index_groups: jax.vmap(axis_name=...), shard_map on 8 simulated CPU
devices (tests/conftest.py sets XLA_FLAGS), pmap with axis_index_groups. Equal per-device
counts: normzoo == flax.linen == the un-sharded computation. Masked / uneven shards:
normzoo == the un-sharded masked computation (count-weighted; flax averages means)."""


import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

import normzoo
import reference
from linen_helpers import TOL, assert_trees_equal

NDEV = 8

def jjv(f, *args, **kwargs):
    """jax.jit(jax.vmap(...)): one compile instead of op-by-op batched dispatch."""
    return jax.jit(jax.vmap(f, *args, **kwargs))



def _x(rng, shape, loc=0.5, scale=1.5):
    return (loc + scale * rng.standard_normal(shape)).astype(np.float32)


def _mesh():
    if len(jax.devices()) < NDEV:
        pytest.skip("needs XLA_FLAGS=--xla_force_host_platform_device_count=8 before jax import")
    devices = np.array(jax.devices()[:NDEV])
    try:
        return jax.sharding.Mesh(devices, ("data",), axis_types=(jax.sharding.AxisType.Auto,))
    except (AttributeError, TypeError):  # older jax: Mesh has no axis_types, Auto is implied
        return jax.sharding.Mesh(devices, ("data",))


def _shard_map(f, mesh, in_specs, out_specs, **kw):
    sm = getattr(jax, "shard_map", None)
    if sm is None:
        from jax.experimental.shard_map import shard_map as sm
    return jax.jit(sm(f, mesh=mesh, in_specs=in_specs, out_specs=out_specs, **kw))


def _bn_vars(rng, layer, x):
    v = layer.init(jax.random.key(0), x)
    return {"params": {"scale": jnp.asarray(1 + 0.2 * rng.random(x.shape[-1]), jnp.float32),
                       "bias": jnp.asarray(0.1 * rng.standard_normal(x.shape[-1]), jnp.float32)},
            "batch_stats": v["batch_stats"]}


# ---------------------------------------------------------------- vmap(axis_name)
@pytest.mark.parametrize("cls", [nn.BatchNorm, normzoo.BatchNorm], ids=["flax", "normzoo"])
def test_vmap_per_example_batch_norm_equals_full_batch(rng, cls):
    x = _x(rng, (8, 6))
    layer = cls(use_running_average=False, axis_name="batch", momentum=0.8)
    v = _bn_vars(rng, layer, x)
    per_example = jjv(lambda xi: layer.apply(v, xi, mutable=["batch_stats"]),
                           axis_name="batch")
    y, upd = per_example(x)
    y_full, upd_full = cls(use_running_average=False, momentum=0.8).apply(v, x, mutable=["batch_stats"])
    np.testing.assert_allclose(y, y_full, **TOL)
    for k in ("mean", "var"):
        np.testing.assert_allclose(upd["batch_stats"][k], np.broadcast_to(upd_full["batch_stats"][k], (8, 6)), **TOL)


def test_vmap_sharded_batch_norm_matches_flax(rng):
    x = _x(rng, (4, 3, 2, 5))  # 4 "devices", each a (3, 2, 5) shard
    outs = []
    for cls in (nn.BatchNorm, normzoo.BatchNorm):
        layer = cls(use_running_average=False, axis_name="d")
        v = _bn_vars(rng if cls is nn.BatchNorm else np.random.default_rng(0), layer, x[0])
        outs.append((v, jjv(lambda xi: layer.apply(v, xi, mutable=["batch_stats"]), axis_name="d")))
    v = outs[0][0]
    y_ref, u_ref = outs[0][1](x)
    y_nz, u_nz = jjv(lambda xi: normzoo.BatchNorm(use_running_average=False, axis_name="d").apply(
        v, xi, mutable=["batch_stats"]), axis_name="d")(x)
    np.testing.assert_allclose(y_nz, y_ref, **TOL)
    assert_trees_equal(u_ref, u_nz, exact=False)
    # and equal to the un-sharded batch of 12 rows
    y_full, _ = normzoo.BatchNorm(use_running_average=False).apply(v, x.reshape(12, 2, 5), mutable=["batch_stats"])
    np.testing.assert_allclose(y_nz.reshape(12, 2, 5), y_full, **TOL)


@pytest.mark.parametrize("name,kw", [
    ("LayerNorm", dict(use_scale=False, use_bias=False)),
    ("RMSNorm", dict(use_scale=False)),
    ("GroupNorm", dict(num_groups=2, use_scale=False, use_bias=False)),
    ("InstanceNorm", dict(use_scale=False, use_bias=False)),
])
def test_vmap_axis_name_stateless_layers_match_flax(rng, name, kw):
    # statistics span a named axis (e.g. a sequence or feature shard split over devices)
    x = _x(rng, (4, 2, 3, 8))  # vmap over axis 0 of 4 shards; each shard (2, 3, 8)
    ref = getattr(nn, name)(axis_name="s", **kw)
    nz = getattr(normzoo, name)(axis_name="s", **kw)
    y_ref = jjv(lambda xi: ref.apply({}, xi), axis_name="s")(x)
    y_nz = jjv(lambda xi: nz.apply({}, xi), axis_name="s")(x)
    np.testing.assert_allclose(y_nz, y_ref, **TOL)


def test_vmap_layer_norm_feature_shards_equal_full_layer_norm(rng):
    x = _x(rng, (3, 16))
    shards = x.reshape(3, 4, 4).transpose(1, 0, 2)  # 4 feature shards of (3, 4)
    layer = normzoo.LayerNorm(axis_name="model", use_scale=False, use_bias=False)
    y = jjv(lambda xi: layer.apply({}, xi), axis_name="model")(shards)
    y_full = normzoo.LayerNorm(use_scale=False, use_bias=False).apply({}, x)
    np.testing.assert_allclose(y.transpose(1, 0, 2).reshape(3, 16), y_full, **TOL)


def test_vmap_masked_uneven_shards_are_exact(rng):
    # per-device kept rows 1, 4, 2, 3: count-weighted statistics equal the global ones
    x = _x(rng, (4, 4, 3), loc=3.0)
    mask = np.zeros((4, 4, 1), bool)
    for d, n in enumerate([1, 4, 2, 3]):
        mask[d, :n] = True
    xn = np.where(mask, x, np.nan).astype(np.float32)
    layer = normzoo.BatchNorm(use_running_average=False, axis_name="d", momentum=0.0)
    v = layer.init(jax.random.key(0), x[0])
    y, upd = jjv(lambda xi, mi: layer.apply(v, xi, mask=mi, mutable=["batch_stats"]),
                      axis_name="d")(xn, mask)
    fx, fm = x.reshape(16, 3), mask.reshape(16, 1)
    mean, var = reference.moments(fx, (0,), fm)
    for d in range(4):
        np.testing.assert_allclose(upd["batch_stats"]["mean"][d], mean.ravel(), **TOL)
        np.testing.assert_allclose(upd["batch_stats"]["var"][d], var.ravel(), **TOL)
    sel = np.broadcast_to(mask, x.shape)
    ref = reference.standardize(fx, (0,), 1e-5, fm).reshape(x.shape)
    np.testing.assert_allclose(np.asarray(y)[sel], ref[sel], **TOL)
    # the un-sharded masked module agrees too
    y_full, u_full = normzoo.BatchNorm(use_running_average=False, momentum=0.0).apply(
        v, np.nan_to_num(fx), mask=fm, mutable=["batch_stats"])
    np.testing.assert_allclose(np.asarray(y)[sel], np.asarray(y_full).reshape(x.shape)[sel], **TOL)
    # documentation only: flax's mean of per-device means is not the global mean here
    _, u_flax = jjv(lambda xi, mi: nn.BatchNorm(use_running_average=False, axis_name="d", momentum=0.0)
                         .apply(v, xi, mask=mi, mutable=["batch_stats"]), axis_name="d")(xn, mask)
    print("flax mean-of-means error:", np.abs(np.asarray(u_flax["batch_stats"]["mean"][0]) - mean.ravel()).max())


def test_vmap_masked_uneven_layer_norm(rng):
    # sequence split over 4 devices with padding: masked LayerNorm over the whole sequence
    x = _x(rng, (4, 2, 5))  # (devices, batch, local positions); reduce positions + devices
    mask = rng.random((4, 2, 5)) < 0.5
    mask[0, :, :2] = True
    layer = normzoo.LayerNorm(axis_name="seq", use_scale=False, use_bias=False)
    y = jjv(lambda xi, mi: layer.apply({}, xi, mask=mi), axis_name="seq")(x, mask)
    xt, mt = x.transpose(1, 0, 2).reshape(2, 20), mask.transpose(1, 0, 2).reshape(2, 20)
    ref = reference.standardize(xt, (1,), 1e-6, mt).reshape(2, 4, 5).transpose(1, 0, 2)
    np.testing.assert_allclose(np.asarray(y)[mask], ref[mask], **TOL)


# ---------------------------------------------------------------- shard_map, 8 devices
@pytest.fixture(scope="module")
def mesh():
    return _mesh()


def _bn_shard_step(cls, mesh, v, **kw):
    layer = cls(use_running_average=False, axis_name="data", **kw)

    def step(x):
        y, upd = layer.apply(v, x, mutable=["batch_stats"])
        return y, upd["batch_stats"]

    return _shard_map(step, mesh, in_specs=P("data"), out_specs=(P("data"), P()))


def test_shard_map_batch_norm_matches_flax_and_full_batch(rng, mesh):
    x = _x(rng, (16, 2, 6))
    v = _bn_vars(rng, nn.BatchNorm(use_running_average=False), x)
    y_ref, s_ref = _bn_shard_step(nn.BatchNorm, mesh, v, momentum=0.9)(x)
    y_nz, s_nz = _bn_shard_step(normzoo.BatchNorm, mesh, v, momentum=0.9)(x)
    np.testing.assert_allclose(y_nz, y_ref, **TOL)
    assert_trees_equal(s_ref, s_nz, exact=False)
    y_full, u_full = normzoo.BatchNorm(use_running_average=False, momentum=0.9).apply(v, x, mutable=["batch_stats"])
    np.testing.assert_allclose(y_nz, y_full, **TOL)
    assert_trees_equal(u_full["batch_stats"], s_nz, exact=False)


def test_shard_map_batch_norm_numbers_without_replication_check(rng, mesh):
    # the numbers alone (check_vma=False), so a replication-typing problem in the test
    # above does not hide whether the statistics themselves are right
    x = _x(rng, (16, 6))
    v = _bn_vars(rng, nn.BatchNorm(use_running_average=False), x)
    outs = []
    for cls in (nn.BatchNorm, normzoo.BatchNorm):
        layer = cls(use_running_average=False, axis_name="data", momentum=0.9)

        def step(x, layer=layer):
            y, upd = layer.apply(v, x, mutable=["batch_stats"])
            return y, upd["batch_stats"]

        outs.append(_shard_map(step, mesh, in_specs=P("data"), out_specs=(P("data"), P()),
                               check_vma=False)(x))
    np.testing.assert_allclose(outs[1][0], outs[0][0], **TOL)
    assert_trees_equal(outs[0][1], outs[1][1], exact=False)


def test_shard_map_batch_norm_gradients_match_flax(rng, mesh):
    x = _x(rng, (16, 4))
    w = rng.standard_normal((16, 4)).astype(np.float32)
    v = _bn_vars(rng, nn.BatchNorm(use_running_average=False), x)
    grads = []
    for cls in (nn.BatchNorm, normzoo.BatchNorm):
        layer = cls(use_running_average=False, axis_name="data")

        def local(params, x, w, layer=layer):
            y, _ = layer.apply({**v, "params": params}, x, mutable=["batch_stats"])
            return jax.lax.psum(jnp.sum(y * w), "data")

        f = _shard_map(jax.grad(local, argnums=(0, 1)), mesh, in_specs=(P(), P("data"), P("data")),
                       out_specs=(P(), P("data")))
        grads.append(f(v["params"], x, w))
    assert_trees_equal(grads[0], grads[1], exact=False, rtol=2e-5, atol=5e-5)


def test_shard_map_masked_uneven_batch_norm_is_exact(rng, mesh):
    x = _x(rng, (32, 3), loc=-2.0)
    mask = np.zeros((32, 1), bool)
    for d, n in enumerate([1, 2, 3, 4, 4, 3, 2, 1]):
        mask[4 * d: 4 * d + n] = True
    v = _bn_vars(rng, nn.BatchNorm(use_running_average=False), x)
    layer = normzoo.BatchNorm(use_running_average=False, axis_name="data", momentum=0.0)

    def step(x, m):
        y, upd = layer.apply(v, x, mask=m, mutable=["batch_stats"])
        return y, upd["batch_stats"]

    y, stats = _shard_map(step, mesh, in_specs=(P("data"), P("data")), out_specs=(P("data"), P()))(x, mask)
    y_full, u_full = normzoo.BatchNorm(use_running_average=False, momentum=0.0).apply(
        v, x, mask=mask, mutable=["batch_stats"])
    sel = np.broadcast_to(mask, x.shape)
    np.testing.assert_allclose(np.asarray(y)[sel], np.asarray(y_full)[sel], **TOL)
    mean, var = reference.moments(x, (0,), mask)
    np.testing.assert_allclose(stats["mean"], mean.ravel(), **TOL)
    np.testing.assert_allclose(stats["var"], var.ravel(), **TOL)


def test_shard_map_layer_norm_sequence_parallel(rng, mesh):
    # (batch, seq, feat) with seq split over 8 devices, statistics over seq and feat
    x = _x(rng, (2, 16, 3))
    layers = [cls(axis_name="data", reduction_axes=(1, 2), use_scale=False, use_bias=False)
              for cls in (nn.LayerNorm, normzoo.LayerNorm)]
    outs = [_shard_map(lambda xi, l=l: l.apply({}, xi), mesh, in_specs=P(None, "data"),
                       out_specs=P(None, "data"))(x) for l in layers]
    np.testing.assert_allclose(outs[1], outs[0], **TOL)
    np.testing.assert_allclose(outs[1], reference.standardize(x, (1, 2), 1e-6), **TOL)


def test_jit_with_sharded_input_needs_no_axis_name(rng, mesh):
    x = _x(rng, (16, 6))
    xs = jax.device_put(x, NamedSharding(mesh, P("data")))
    layer = normzoo.BatchNorm(use_running_average=False)
    v = layer.init(jax.random.key(0), x)
    f = jax.jit(lambda v, x: layer.apply(v, x, mutable=["batch_stats"]))
    (y1, u1), (y2, u2) = f(v, x), f(v, xs)
    np.testing.assert_allclose(y1, y2, **TOL)
    assert_trees_equal(u1, u2, exact=False)


# ---------------------------------------------------------------- pmap + axis_index_groups
GROUPS = [[0, 1, 2, 3], [4, 5, 6, 7]]


def _pmap_bn(cls, v, **kw):
    layer = cls(use_running_average=False, axis_name="data", axis_index_groups=GROUPS, **kw)

    def step(x, m):
        y, upd = layer.apply(v, x, mask=m, mutable=["batch_stats"])
        return y, upd["batch_stats"]

    return jax.pmap(step, axis_name="data")


def test_pmap_axis_index_groups_matches_flax_and_per_group(rng):
    if len(jax.devices()) < NDEV:
        pytest.skip("needs 8 devices")
    x = _x(rng, (8, 2, 5))
    mask = np.ones((8, 2, 1), bool)
    v = _bn_vars(rng, nn.BatchNorm(use_running_average=False), x[0])
    y_ref, s_ref = _pmap_bn(nn.BatchNorm, v)(x, mask)
    y_nz, s_nz = _pmap_bn(normzoo.BatchNorm, v)(x, mask)
    np.testing.assert_allclose(y_nz, y_ref, **TOL)
    assert_trees_equal(s_ref, s_nz, exact=False)
    for g in GROUPS:
        y_full, u_full = normzoo.BatchNorm(use_running_average=False).apply(
            v, x[g].reshape(8, 5), mutable=["batch_stats"])
        np.testing.assert_allclose(np.asarray(y_nz)[g].reshape(8, 5), y_full, **TOL)
        np.testing.assert_allclose(s_nz["var"][g[0]], u_full["batch_stats"]["var"], **TOL)
    assert not np.allclose(s_nz["mean"][0], s_nz["mean"][4])


def test_pmap_axis_index_groups_masked_uneven(rng):
    if len(jax.devices()) < NDEV:
        pytest.skip("needs 8 devices")
    x = _x(rng, (8, 3, 2), loc=1.0)
    mask = np.zeros((8, 3, 1), bool)
    for d, n in enumerate([1, 3, 2, 1, 3, 3, 1, 2]):
        mask[d, :n] = True
    v = _bn_vars(rng, nn.BatchNorm(use_running_average=False), x[0])
    y, s = _pmap_bn(normzoo.BatchNorm, v, momentum=0.0)(x, mask)
    for g in GROUPS:
        mean, var = reference.moments(x[g].reshape(12, 2), (0,), mask[g].reshape(12, 1))
        for d in g:
            np.testing.assert_allclose(s["mean"][d], mean.ravel(), **TOL)
            np.testing.assert_allclose(s["var"][d], var.ravel(), **TOL)
