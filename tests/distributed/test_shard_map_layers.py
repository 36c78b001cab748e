"""shard_map with ``axis_name`` on 8 simulated CPU devices (tests/conftest.py), Linen and NNX.

* Synchronized statistics (``axis_name='data'``): every layer with batch statistics gives the
  single-device numbers of the global batch (output, grads of x and params, running
  statistics), to float32 rounding.
* Per-device statistics are the explicit other choice (no ``axis_name``): each device then
  normalizes with its own shard's statistics, which is ghost batch normalization with one
  ghost batch per device; the running statistics stay per device.
* Uneven shards, padded and masked: the count-weighted combination is exact (equal to the
  single-device masked run; flax's mean of means is not).
* NNX layers inside shard_map through ``nnx.split`` / ``nnx.merge``, and ``nnx.shard_map``.
* ``axis_index_groups`` under pmap, Linen and NNX: each group of devices is its own global
  batch (what shard_map does with it: tests/distributed/test_axis_index_groups_errors.py).
* The opt-in CPU kernels (normzoo.backends.cpu) inside shard_map: each device runs the kernel
  on its own shard; no gather.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax import lax
from jax.sharding import PartitionSpec as P

import normzoo
import normzoo.nnx as znnx
import reference
from benchmarks.devices import collectives
from dist_helpers import (LAYERS, NDEV, STATELESS, close, data, linen_layer, mesh as make_mesh,
                          nnx_layer, perturbed_params, shard_map)

SHAPE = (4 * NDEV, 2, 2, 8)  # 4 samples per device: ghost BN's chunk of 4 is one shard
LOCAL = SHAPE[0] // NDEV
#: See test_jit_sharded_layers.py: matrix functions amplify the covariance's rounding.
LOOSER = {"ZCAWhitening": 1e-4, "PCAWhitening": 1e-4, "CholeskyWhitening": 1e-4,
          "IterNorm": 1e-4, "DecorrelatedBatchNorm": 1e-4, "GroupWhitening": 1e-4}
#: Layers with an ``axis_name`` field (GroupWhitening's statistics are per sample).
SYNCABLE = [n for n in LAYERS if n not in STATELESS]


@pytest.fixture(scope="module")
def mesh():
    return make_mesh()


def _kw(name: str, synced: bool) -> dict[str, Any]:
    return {"axis_name": "data"} if synced and name not in STATELESS else {}


# ---------------------------------------------------------------- steps
def linen_local(layer: Any, reduce_loss: bool) -> Callable:
    """``(variables, x, w) -> (y, new batch_stats, dparams, dx)`` of ``sum(y * w)``; with
    ``reduce_loss`` the loss is ``psum``'d over 'data' (the per-device body of shard_map)."""

    def step(variables, x, w):
        def loss(params, x):
            y, updates = layer.apply({**variables, "params": params}, x, mutable=["batch_stats"])
            value = jnp.sum(y * w)
            return (lax.psum(value, "data") if reduce_loss else value), (
                y, dict(updates).get("batch_stats", {}))

        (_, (y, stats)), (dparams, dx) = jax.value_and_grad(
            loss, argnums=(0, 1), has_aux=True)(variables["params"], x)
        return y, stats, dparams, dx

    return step


def nnx_local(graphdef: Any, reduce_loss: bool) -> Callable:
    """As :func:`linen_local` for an NNX layer split into ``(graphdef, params, stats)``:
    merged inside the traced step, differentiated with ``nnx.value_and_grad`` (grads of the
    ``nnx.Param``s), the updated ``nnx.BatchStat``s read back with ``nnx.state``."""

    def step(params, stats, x, w):
        model = nnx.merge(graphdef, params, stats)

        def loss(model, x):
            y = model(x)
            value = jnp.sum(y * w)
            return (lax.psum(value, "data") if reduce_loss else value), y

        (_, y), (dparams, dx) = nnx.value_and_grad(loss, argnums=(0, 1), has_aux=True)(model, x)
        return y, nnx.state(model, nnx.BatchStat), dparams, dx

    return step


def build(api: str, name: str, synced: bool) -> tuple[Callable, Callable, tuple]:
    """(sharded step, single-device step of the same layer without axis_name, arguments)."""
    x, w = data(SHAPE), data(SHAPE, seed=2, loc=0.0)
    if api == "linen":
        layer, plain = linen_layer(name, **_kw(name, synced)), linen_layer(name)
        variables = dict(jax.jit(plain.init)(jax.random.key(0), x))
        variables["params"] = perturbed_params(variables["params"])
        return linen_local(layer, True), jax.jit(linen_local(plain, False)), (variables, x, w)
    model = nnx_layer(name, SHAPE[-1], **_kw(name, synced))
    graphdef, params, stats = nnx.split(model, nnx.Param, nnx.BatchStat)
    plain_graphdef = nnx.split(nnx_layer(name, SHAPE[-1]), nnx.Param, nnx.BatchStat)[0]
    return (nnx_local(graphdef, True), jax.jit(nnx_local(plain_graphdef, False)),
            (perturbed_params(params), stats, x, w))


# ---------------------------------------------------------------- synchronized
@pytest.mark.parametrize("name", list(LAYERS))
@pytest.mark.parametrize("api", ["linen", "nnx"])
def test_synchronized_statistics_equal_the_global_batch(mesh, api, name):
    local, single, args = build(api, name, synced=True)
    n_vars = len(args) - 2
    sharded = shard_map(local, mesh, in_specs=(P(),) * n_vars + (P("data"), P("data")),
                        out_specs=(P("data"), P(), P(), P("data")))
    y, stats, dparams, dx = sharded(*args)
    y1, stats1, dparams1, dx1 = single(*args)
    rtol = LOOSER.get(name, 2e-5)
    close(y, y1, rtol, f"{api} {name}: y")
    close(dx, dx1, rtol, f"{api} {name}: dx")
    close(dparams, dparams1, rtol, f"{api} {name}: dparams")
    close(stats, stats1, rtol, f"{api} {name}: running statistics")
    if name not in STATELESS:
        assert jax.tree_util.tree_leaves(stats1), name


# ---------------------------------------------------------------- per device
@pytest.mark.parametrize("api", ["linen", "nnx"])
def test_per_device_statistics_are_ghost_batches_of_one_shard(mesh, api):
    # No axis_name: each device normalizes with its own shard's statistics. That is ghost
    # BN on the global batch with one ghost batch per shard; the per-device running
    # statistics average to ghost BN's.
    local, _, args = build(api, "BatchNorm", synced=False)
    n_vars = len(args) - 2

    def per_device(*a):
        y, stats, dparams, dx = local(*a)
        # the statistics differ per device: one row each
        return y, jax.tree_util.tree_map(lambda s: s[None], stats), dx

    y, stats, dx = shard_map(per_device, mesh, in_specs=(P(),) * n_vars + (P("data"),) * 2,
                             out_specs=(P("data"), P("data"), P("data")))(*args)
    _, ghost_single, _ = build(api, "ghost BN", synced=False)  # virtual_batch_size=4=LOCAL
    y_ghost, stats_ghost, _, _ = ghost_single(*args)
    close(y, y_ghost, what=f"{api}: per-device y vs ghost BN")
    close(jax.tree_util.tree_map(lambda s: jnp.mean(s, axis=0), stats), stats_ghost,
          what=f"{api}: mean of per-device running statistics vs ghost BN")
    # each device's own shard, alone on one device
    if api == "linen":
        variables, x, w = args
        single = jax.jit(linen_local(linen_layer("BatchNorm"), False))
        for d in (0, NDEV - 1):
            part = slice(d * LOCAL, (d + 1) * LOCAL)
            y_d, stats_d, _, dx_d = single(variables, x[part], w[part])
            close(y[part], y_d, what=f"device {d}: y")
            close(dx[part], dx_d, what=f"device {d}: dx")
            close(jax.tree_util.tree_map(lambda s: s[d], stats), stats_d,
                  what=f"device {d}: running statistics")
    # and not the synchronized numbers
    _, single_global, _ = build(api, "BatchNorm", synced=True)
    y_global = single_global(*args)[0]
    assert np.max(np.abs(np.asarray(y) - np.asarray(y_global))) > 1e-2


# ---------------------------------------------------------------- masked, uneven shards
KEPT = [1, 2, 3, 4, 4, 3, 2, 1]  # rows kept per device (of LOCAL = 4)
MASKABLE = ["BatchNorm", "Centering", "ZCAWhitening", "SwitchableNorm"]


def _mask() -> np.ndarray:
    mask = np.zeros((SHAPE[0], 1, 1, 1), bool)
    for d, n in enumerate(KEPT):
        mask[d * LOCAL: d * LOCAL + n] = True
    return mask


@pytest.mark.parametrize("name", MASKABLE)
@pytest.mark.parametrize("api", ["linen", "nnx"])
def test_masked_uneven_shards_are_exact(mesh, api, name):
    # Uneven shards as they arrive in practice: padded to equal shapes, the padding masked.
    # The padding holds garbage (1e3) that must not leak into any statistic.
    mask = _mask()
    x = np.where(mask, data(SHAPE), 1e3).astype(np.float32)
    if api == "linen":
        layer, plain = linen_layer(name, axis_name="data"), linen_layer(name)
        variables = dict(jax.jit(plain.init)(jax.random.key(0), x))

        state = variables

        def local(variables, x, m):
            y, upd = layer.apply(variables, x, mask=m, mutable=["batch_stats"])
            return y, upd["batch_stats"]

        def single(variables, x, m):
            y, upd = plain.apply(variables, x, mask=m, mutable=["batch_stats"])
            return y, upd["batch_stats"]
    else:
        # The state goes in as an argument: NNX variables are merged inside the trace.
        graphdef, state = nnx.split(nnx_layer(name, SHAPE[-1], axis_name="data"))
        plain_graphdef, _ = nnx.split(nnx_layer(name, SHAPE[-1]))

        def run(graphdef, state, x, m):
            model = nnx.merge(graphdef, state)
            return model(x, mask=m), nnx.state(model, nnx.BatchStat)

        local = lambda state, x, m: run(graphdef, state, x, m)  # noqa: E731
        single = lambda state, x, m: run(plain_graphdef, state, x, m)  # noqa: E731

    y, stats = shard_map(local, mesh, in_specs=(P(), P("data"), P("data")),
                         out_specs=(P("data"), P()))(state, x, mask)
    y1, stats1 = jax.jit(single)(state, x, mask)
    rtol = LOOSER.get(name, 2e-5)
    kept = np.broadcast_to(mask, SHAPE)
    close(np.asarray(y)[kept], np.asarray(y1)[kept], rtol, f"{api} {name}: kept outputs")
    close(stats, stats1, rtol, f"{api} {name}: running statistics")
    if name == "BatchNorm":  # and against the float64 reference of the kept rows only
        mean, var = reference.moments(x.reshape(-1, SHAPE[-1]), (0,),
                                      np.broadcast_to(mask, SHAPE[:-1] + (1,)).reshape(-1, 1))
        momentum = LAYERS[name][1]["momentum"]
        running = stats["mean"] if api == "linen" else stats["mean"][...]
        close(running, (1 - momentum) * mean.ravel(), what="running mean vs float64 reference")


# ---------------------------------------------------------------- nnx.shard_map
def test_nnx_shard_map_updates_synchronized_batch_stats(mesh):
    if not hasattr(nnx, "shard_map"):
        pytest.skip("this flax has no nnx.shard_map")
    x = data(SHAPE)
    model = znnx.BatchNorm(SHAPE[-1], momentum=0.5, axis_name="data", rngs=nnx.Rngs(0))
    reference_model = znnx.BatchNorm(SHAPE[-1], momentum=0.5, rngs=nnx.Rngs(0))

    @nnx.jit
    def step(model, x):
        f = nnx.shard_map(lambda model, x: model(x), mesh=mesh, in_specs=(P(), P("data")),
                          out_specs=P("data"))
        return f(model, x)

    y = step(model, x)
    y1 = nnx.jit(lambda m, x: m(x))(reference_model, x)
    close(y, y1, what="nnx.shard_map y")
    close((model.mean[...], model.var[...]), (reference_model.mean[...], reference_model.var[...]),
          what="nnx.shard_map: the module's updated batch stats")
    assert not np.allclose(model.mean[...], 0.0)  # the update really reached the module


# ---------------------------------------------------------------- axis_index_groups
GROUPS = [[0, 1, 2, 3], [4, 5, 6, 7]]


@pytest.mark.parametrize("name", ["BatchNorm", "SwitchableNorm", "EvoNormB0", "ZCAWhitening"])
@pytest.mark.parametrize("api", ["linen", "nnx"])
def test_pmap_axis_index_groups_equal_each_group_alone(api, name):
    if len(jax.devices()) < NDEV:
        pytest.skip("needs 8 devices")
    x = data((NDEV, LOCAL) + SHAPE[1:])  # pmap: a leading device axis
    kw = dict(axis_name="data", axis_index_groups=GROUPS)
    if api == "linen":
        layer, plain = linen_layer(name, **kw), linen_layer(name)
        state = jax.jit(plain.init)(jax.random.key(0), x[0])

        def local(variables, x):
            y, upd = layer.apply(variables, x, mutable=["batch_stats"])
            return y, upd["batch_stats"]

        def single(variables, x):
            y, upd = plain.apply(variables, x, mutable=["batch_stats"])
            return y, upd["batch_stats"]
    else:
        graphdef, state = nnx.split(nnx_layer(name, SHAPE[-1], **kw))
        plain_graphdef, _ = nnx.split(nnx_layer(name, SHAPE[-1]))

        def run(graphdef, state, x):
            model = nnx.merge(graphdef, state)
            return model(x), nnx.state(model, nnx.BatchStat)

        local = lambda state, x: run(graphdef, state, x)  # noqa: E731
        single = lambda state, x: run(plain_graphdef, state, x)  # noqa: E731

    y, stats = jax.pmap(local, axis_name="data", in_axes=(None, 0))(state, x)
    rtol = LOOSER.get(name, 2e-5)
    for group in GROUPS:  # each group is its own global batch of 16 samples
        y1, stats1 = jax.jit(single)(state, x[group].reshape((-1,) + SHAPE[1:]))
        close(np.asarray(y)[group].reshape(y1.shape), y1, rtol, f"{api} {name} {group}: y")
        for d in group:
            close(jax.tree_util.tree_map(lambda s: s[d], stats), stats1, rtol,
                  f"{api} {name} device {d}: running statistics")
    first = jax.tree_util.tree_leaves(stats)[0]
    assert not np.allclose(first[0], first[NDEV - 1])  # the two groups really differ


# ---------------------------------------------------------------- CPU kernels
def test_cpu_kernels_inside_shard_map_run_per_shard_without_a_gather(mesh):
    kernels = pytest.importorskip("normzoo.backends.cpu")
    if not kernels.available():
        pytest.skip(f"CPU kernels unavailable: {kernels.failure()}")
    from normzoo.backends.cpu import plan

    features = 64
    rows = NDEV * -(-plan.MIN_SIZE["forward"] // features)  # each shard above the size floor
    x = (1.0 + 2.0 * np.random.default_rng(5).standard_normal((rows, features))).astype(np.float32)
    layer = normzoo.BatchNorm(use_running_average=False, axis_name="data", momentum=0.8)
    ln = normzoo.LayerNorm()
    variables = layer.init(jax.random.key(0), x)
    v_ln = ln.init(jax.random.key(0), x)

    def local(x):
        y, upd = layer.apply(variables, ln.apply(v_ln, x), mutable=["batch_stats"])
        return y, upd["batch_stats"]

    def build_and_run():
        f = shard_map(local, mesh, in_specs=P("data"), out_specs=(P("data"), P()))
        return f(x), f.lower(x).compile().as_text()

    (y_ref, s_ref), _ = build_and_run()
    with kernels.enabled(True):
        (y, s), text = build_and_run()
    assert "custom-call" in text, "the kernels stepped aside inside shard_map"
    found = collectives(text)
    assert found["all-gather"]["count"] == 0 and found["all-to-all"]["count"] == 0, found
    assert found["all-reduce"]["count"] >= 1  # the moments, combined across devices
    assert found["all-reduce"]["max_elements"] < x.size // NDEV, found  # not activations
    close((y, s), (y_ref, s_ref), what="kernels on vs off inside shard_map")
