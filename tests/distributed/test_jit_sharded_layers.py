"""``jax.jit`` with the batch sharded over a mesh axis (``NamedSharding(mesh, P('data'))``).

Every layer with batch statistics, in Linen and NNX, is run twice by the same jitted
training step (forward, ``loss = sum(y * w)``, grads of x and params, updated running
statistics): once on an unsharded batch and once on the same batch split over 8 simulated
CPU devices (tests/conftest.py). XLA's SPMD partitioner inserts the collectives itself, so
the sharded run must give the single-device numbers of the global batch (to float32
rounding) with no ``axis_name``, and its output must stay sharded along the batch, never
gathered onto one device or replicated.

The opt-in CPU kernels (normzoo.backends.cpu) have no sharding rule: under a sharded
``jit`` they must step aside (no custom call, no all-gather in the compiled step).
"""

from __future__ import annotations

from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

import normzoo
import normzoo.nnx as znnx

from benchmarks.devices import collectives
from dist_helpers import LAYERS, NDEV, RTOL, STATELESS, close, data, linen_layer, nnx_layer
from dist_helpers import mesh as data_mesh, shard_map

NAMES = list(LAYERS)
#: Whitening goes through an eigendecomposition, a Cholesky factor or Newton iterations of the
#: covariance: the sharded all-reduce adds the same numbers in another order, and those
#: steps amplify that float32 rounding by up to the covariance's condition number.
WHITENING = {"ZCAWhitening", "PCAWhitening", "CholeskyWhitening", "IterNorm",
             "DecorrelatedBatchNorm", "GroupWhitening"}
WHITENING_RTOL = 1e-4
SHAPE = (2 * NDEV, 2, 2, 8)  # two samples per device: every shard's moments differ


@pytest.fixture(scope="module")
def mesh() -> jax.sharding.Mesh:
    return data_mesh()


def _inputs(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """x (SHAPE, correlated channels, per-channel offsets); w (SHAPE): the fixed upstream
    gradient of ``loss = sum(y * w)``."""
    x = data(SHAPE, seed) + np.linspace(-1.0, 2.0, SHAPE[-1], dtype=np.float32)
    w = np.random.default_rng(seed + 100).standard_normal(SHAPE).astype(np.float32)
    return x, w


def _perturb(tree: Any, seed: int) -> Any:
    """Every float leaf moved off its initial value (scales != 1, biases != 0, running
    statistics not the identity), so grads and statistics updates are not trivially equal."""
    rng = np.random.default_rng(seed)

    def move(leaf):
        leaf = np.asarray(leaf)
        if not np.issubdtype(leaf.dtype, np.floating):
            return jnp.asarray(leaf)
        return jnp.asarray(leaf + 0.05 * rng.standard_normal(leaf.shape), leaf.dtype)

    return jax.tree_util.tree_map(move, tree)


# ------------------------------------------------------------------ Linen
def _linen_step(layer: nn.Module) -> Callable:
    """``step(variables, x, w) -> (y, grads of params, grad of x, new batch_stats)``; the
    layer is in training mode (batch statistics), ``loss = sum(y * w)``."""

    def step(variables, x, w):
        def loss(params, x):
            y, updates = layer.apply({**variables, "params": params}, x,
                                     mutable=["batch_stats"])
            return jnp.sum(y * w), (y, updates.get("batch_stats", {}))

        (_, (y, stats)), (g_params, g_x) = jax.value_and_grad(
            loss, argnums=(0, 1), has_aux=True)(variables["params"], x)
        return y, g_params, g_x, stats

    return step


def _check_sharded(name: str, out: Any, ref: Any, before: Any, sharding: NamedSharding,
                   hlo_text: str) -> None:
    """The sharded step's results: y and dx still sharded along the batch; the compiled step
    communicates by all-reduces of per-feature statistics only (nothing activation-sized: no
    all-gather, all-to-all or reduce-scatter, no all-reduce of a batch's worth of elements);
    every number the single-device one; the running statistics really updated."""
    y, _, g_x, stats = out
    found = collectives(hlo_text)
    assert all(found[op]["count"] == 0 for op in ("all-gather", "all-to-all", "reduce-scatter",
                                                  "collective-permute")), (name, found)
    assert found["all-reduce"]["max_elements"] < y.size // 4, (name, found)
    assert y.sharding.is_equivalent_to(sharding, y.ndim), (
        f"{name}: the output is {y.sharding}, not sharded along the batch")
    assert g_x.sharding.is_equivalent_to(sharding, g_x.ndim), (
        f"{name}: the grad of x is {g_x.sharding}, not sharded along the batch")
    close(out, ref, rtol=WHITENING_RTOL if name in WHITENING else RTOL, what=name)
    if name in STATELESS:  # a per-sample area keeps no running statistics
        return
    after, old = jax.tree_util.tree_leaves(stats), jax.tree_util.tree_leaves(before)
    assert after and len(after) == len(old), f"{name}: running statistics missing"
    assert any(not np.allclose(a, b) for a, b in zip(after, old)), (
        f"{name}: the running statistics did not move")


@pytest.mark.parametrize("name", NAMES)
def test_linen_sharded_jit_equals_single_device(mesh, name):
    x, w = _inputs()
    layer = linen_layer(name)
    variables = _perturb(jax.jit(layer.init)(jax.random.key(0), x), 1)
    step = jax.jit(_linen_step(layer))
    ref = step(variables, x, w)
    sharding = NamedSharding(mesh, P("data"))
    args = (variables, jax.device_put(x, sharding), jax.device_put(w, sharding))
    compiled = step.lower(*args).compile()
    _check_sharded(name, compiled(*args), ref, variables.get("batch_stats", {}), sharding,
                   compiled.as_text())


# ------------------------------------------------------------------ NNX
def _nnx_step(graphdef: Any) -> Callable:
    """``step(params, rest, x, w) -> (y, grads of params, grad of x, new batch stats)`` over
    ``nnx.split`` state (``rest``: everything that is not an ``nnx.Param``)."""

    def step(params, rest, x, w):
        def loss(params, x):
            model = nnx.merge(graphdef, params, rest, copy=True)  # own Variables, this trace
            y = model(x)
            return jnp.sum(y * w), (y, nnx.state(model, nnx.BatchStat))

        (_, (y, stats)), (g_params, g_x) = jax.value_and_grad(
            loss, argnums=(0, 1), has_aux=True)(params, x)
        return y, g_params, g_x, stats

    return step


@pytest.mark.parametrize("name", NAMES)
def test_nnx_sharded_jit_equals_single_device(mesh, name):
    x, w = _inputs(1)
    graphdef, params, rest = nnx.split(nnx_layer(name, SHAPE[-1]), nnx.Param, ...)
    params, rest = _perturb(params, 2), _perturb(rest, 3)
    step = jax.jit(_nnx_step(graphdef))
    ref = step(params, rest, x, w)
    sharding = NamedSharding(mesh, P("data"))
    args = (params, rest, jax.device_put(x, sharding), jax.device_put(w, sharding))
    compiled = step.lower(*args).compile()
    before = nnx.state(nnx.merge(graphdef, params, rest), nnx.BatchStat)
    _check_sharded(name, compiled(*args), ref, before, sharding, compiled.as_text())


def test_nnx_jit_sharded_matches_linen(mesh):
    """The NNX and Linen BatchNorm give the same sharded numbers from the same values."""
    x, w = _inputs(2)
    sharding = NamedSharding(mesh, P("data"))
    xs, ws = jax.device_put(x, sharding), jax.device_put(w, sharding)
    linen = normzoo.BatchNorm(momentum=0.8, use_running_average=False)
    variables = _perturb(linen.init(jax.random.key(0), x), 4)
    y_l, gp_l, gx_l, s_l = jax.jit(_linen_step(linen))(variables, xs, ws)
    model = znnx.BatchNorm(SHAPE[-1], momentum=0.8, use_running_average=False,
                           rngs=nnx.Rngs(0))
    znnx.linen_to_nnx(variables, model)
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    y_n, gp_n, gx_n, s_n = jax.jit(_nnx_step(graphdef))(params, rest, xs, ws)
    close((y_n, gx_n, gp_n["scale"][...], s_n["mean"][...], s_n["var"][...]),
          (y_l, gx_l, gp_l["scale"], s_l["mean"], s_l["var"]), what="nnx vs linen")


def test_sharded_batch_norm_statistics_are_global_not_per_device(mesh):
    """A test that can fail: the global statistics differ from any one shard's."""
    x, _ = _inputs(3)
    layer = normzoo.BatchNorm(momentum=0.0)  # running = this batch's statistics
    variables = layer.init(jax.random.key(0), x, use_running_average=False)
    f = jax.jit(lambda v, x: layer.apply(v, x, use_running_average=False,
                                         mutable=["batch_stats"]))
    _, upd = f(variables, jax.device_put(x, NamedSharding(mesh, P("data"))))
    flat = x.reshape(-1, SHAPE[-1]).astype(np.float64)
    np.testing.assert_allclose(upd["batch_stats"]["mean"], flat.mean(0), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(upd["batch_stats"]["var"], flat.var(0), rtol=1e-5, atol=1e-6)
    first_shard = x[: SHAPE[0] // NDEV].reshape(-1, SHAPE[-1])
    assert not np.allclose(upd["batch_stats"]["mean"], first_shard.mean(0), atol=1e-3)


# ------------------------------------------------------------------ opt-in CPU kernels
def test_cpu_kernels_step_aside_under_sharded_jit(mesh):
    """The kernels (no sharding rule) step aside under a sharded jit: the compiled step has
    no custom call, no all-gather, its output stays sharded and its numbers are the
    pure-JAX ones. x is large enough that an unsharded single-device call would use them."""
    kernels = pytest.importorskip("normzoo.backends.cpu")
    if not kernels.available():
        pytest.skip(f"CPU kernels unavailable: {kernels.failure()}")
    from normzoo.backends.cpu import plan

    rows = max(NDEV, -(-plan.MIN_SIZE["forward"] // 64))
    x = np.random.default_rng(5).standard_normal((rows, 64)).astype(np.float32) * 2 + 1
    layer = normzoo.LayerNorm()
    bn = normzoo.BatchNorm(momentum=0.8)
    v_ln = layer.init(jax.random.key(0), x)
    v_bn = bn.init(jax.random.key(0), x, use_running_average=False)

    def f(v_ln, v_bn, x):
        y, upd = bn.apply(v_bn, layer.apply(v_ln, x), use_running_average=False,
                          mutable=["batch_stats"])
        return y, upd["batch_stats"]

    sharding = NamedSharding(mesh, P("data"))
    xs = jax.device_put(x, sharding)
    y_ref, s_ref = jax.jit(f)(v_ln, v_bn, x)
    with kernels.enabled(True):  # default: step aside outside shard_map with >1 device
        lowered = jax.jit(f).lower(v_ln, v_bn, xs)
        text = lowered.compile().as_text()
        y, s = jax.jit(f)(v_ln, v_bn, xs)
    assert "custom-call" not in text or "normzoo" not in text, "a kernel under sharded jit"
    assert collectives(text)["all-gather"]["count"] == 0
    assert y.sharding.is_equivalent_to(sharding, x.ndim), y.sharding
    close((y, s), (y_ref, s_ref), what="kernels on, sharded jit")


def test_cpu_kernels_inside_shard_map_run_per_shard_without_gather(mesh):
    """Inside ``shard_map`` every device runs the kernels on its own shard: the compiled
    program calls them, gathers nothing, and gives the pure-JAX numbers; a BatchNorm with
    ``axis_name`` still gets the global statistics (the kernels never see a partial sum)."""
    kernels = pytest.importorskip("normzoo.backends.cpu")
    if not kernels.available():
        pytest.skip(f"CPU kernels unavailable: {kernels.failure()}")
    from normzoo.backends.cpu import plan

    rows = NDEV * -(-plan.MIN_SIZE["forward"] // 64)  # every shard kernel-sized
    x = np.random.default_rng(6).standard_normal((rows, 64)).astype(np.float32) * 2 + 1
    ln = normzoo.LayerNorm()
    bn = normzoo.BatchNorm(momentum=0.8, use_running_average=False, axis_name="data")
    v_ln = ln.init(jax.random.key(0), x)
    v_bn = normzoo.BatchNorm(use_running_average=False).init(jax.random.key(0), x)

    def local(x):
        y, upd = bn.apply(v_bn, ln.apply(v_ln, x), mutable=["batch_stats"])
        return y, upd["batch_stats"]

    def build():
        return shard_map(local, mesh, in_specs=P("data"), out_specs=(P("data"), P()))

    y_ref, s_ref = build()(x)
    with kernels.enabled(True):
        f = build()
        text = f.lower(x).compile().as_text()
        y, s = f(x)
    assert "custom-call" in text and "normzoo" in text, "the kernels were not used per shard"
    assert collectives(text)["all-gather"]["count"] == 0
    close((y, s), (y_ref, s_ref), what="kernels on, inside shard_map")
    # and the statistics are the global batch's
    h = np.asarray(jax.jit(ln.apply)(v_ln, x), np.float64)
    np.testing.assert_allclose(s["mean"], 0.2 * h.mean(0), rtol=1e-4, atol=1e-6)
