"""normzoo.nnx layers under flax.nnx's modes and transforms.

A small model (``nnx.Linear`` + normzoo ``BatchNorm`` + ``LayerNorm`` + ``nnx.Linear``) through
``train()`` / ``eval()`` / ``nnx.view``, ``nnx.jit``, an optimizer step under
``nnx.value_and_grad``, ``nnx.vmap`` (an ensemble, and a broadcast model with ``axis_name``:
flax issue #4760), ``nnx.scan`` over stacked blocks, ``nnx.eval_shape`` (flax issue #4734),
``split`` / ``merge`` / ``state`` / ``update`` and ``nnx.remat``. Where flax.nnx's own layers
define the behaviour (views, vmap), the same test runs on both and they must agree.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import normzoo.nnx as znnx

TOL = dict(rtol=1e-6, atol=1e-6)
LAYERS = {"normzoo": (znnx.BatchNorm, znnx.LayerNorm), "flax": (nnx.BatchNorm, nnx.LayerNorm)}


class Net(nnx.Module):
    def __init__(self, rngs, impl="normzoo", **bn_kwargs):
        BN, LN = LAYERS[impl]
        self.linear = nnx.Linear(3, 4, rngs=rngs)
        self.bn = BN(4, momentum=0.5, rngs=rngs, **bn_kwargs)
        self.ln = LN(4, rngs=rngs)
        self.head = nnx.Linear(4, 2, rngs=rngs)

    def __call__(self, x, use_running_average=None):
        h = self.bn(self.linear(x), use_running_average=use_running_average)
        return self.head(nnx.relu(self.ln(h)))


class Block(nnx.Module):
    """Linear -> normzoo BatchNorm -> normzoo LayerNorm, width 4 (stackable)."""

    def __init__(self, rngs):
        self.linear = nnx.Linear(4, 4, rngs=rngs)
        self.bn = znnx.BatchNorm(4, momentum=0.5, rngs=rngs)
        self.ln = znnx.LayerNorm(4, rngs=rngs)

    def __call__(self, x):
        return nnx.relu(self.ln(self.bn(self.linear(x))))


def _x(shape, seed=0, loc=0.5):
    r = np.random.default_rng(seed)
    return (loc + 1.5 * r.standard_normal(shape)).astype(np.float32)


def _stats(model):
    """The BatchStats of ``model`` as a nested dict of numpy arrays."""
    return jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(model, nnx.BatchStat)))


def _params(model):
    return jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(model, nnx.Param)))


def _assert_trees_close(a, b, **tol):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for u, v in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_allclose(u, v, **(tol or TOL))


def _assert_trees_differ(a, b):
    assert any(not np.allclose(u, v) for u, v in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def _member(stacked, i):
    """Member ``i`` of a module created under nnx.vmap (its state sliced on axis 0)."""
    graphdef, state = nnx.split(stacked)
    return nnx.merge(graphdef, jax.tree.map(lambda a: a[i], state))


# ------------------------------------------------------------------ modes
@pytest.mark.parametrize("impl", ["normzoo", "flax"])
def test_train_eval_switch(impl):
    model = Net(nnx.Rngs(0), impl)
    ref = nnx.clone(model)
    x, x2 = _x((6, 3)), _x((6, 3), seed=1, loc=-1.0)
    init = _stats(model)
    assert model.bn.use_running_average is False  # flax.nnx's default: training
    y = model(x)
    np.testing.assert_allclose(y, ref(x, use_running_average=False), **TOL)
    _assert_trees_close(_stats(model), _stats(ref))
    _assert_trees_differ(_stats(model), init)

    model.eval()
    assert model.bn.use_running_average is True
    before = _stats(model)
    y_eval = model(x2)
    np.testing.assert_allclose(y_eval, ref(x2, use_running_average=True), **TOL)
    _assert_trees_close(_stats(model), before)  # eval does not touch the statistics
    _assert_trees_close(_stats(ref), before)
    assert not np.allclose(y_eval, nnx.clone(model)(x2, use_running_average=False), atol=1e-3)
    # the call argument overrides the mode
    y_over = model(x2, use_running_average=False)
    np.testing.assert_allclose(y_over, ref(x2, use_running_average=False), **TOL)
    _assert_trees_differ(_stats(model), before)
    _assert_trees_close(_stats(model), _stats(ref))

    model.train()
    assert model.bn.use_running_average is False
    np.testing.assert_allclose(model(x), ref(x, use_running_average=False), **TOL)
    _assert_trees_close(_stats(model), _stats(ref))


def _check_view(impl):
    """Checks nnx.view on ``impl``'s layers; returns whether a training view's update
    showed up in the original model."""
    model = Net(nnx.Rngs(0), impl)
    ref = nnx.clone(model)
    x = _x((6, 3))
    model(x)  # some statistics
    ref(x)
    view = nnx.view(model, use_running_average=True)
    assert view.bn.use_running_average is True
    assert model.bn.use_running_average is False  # the original keeps its mode
    before = _stats(model)
    x2 = _x((6, 3), seed=2)
    np.testing.assert_allclose(view(x2), ref(x2, use_running_average=True), **TOL)
    _assert_trees_close(_stats(view), before)
    _assert_trees_close(_stats(model), before)
    train_view = nnx.view(view, use_running_average=False)
    assert train_view.bn.use_running_average is False
    np.testing.assert_allclose(train_view(x2), ref(x2, use_running_average=False), **TOL)
    _assert_trees_close(_stats(train_view), _stats(ref))
    return np.allclose(_stats(model)["bn"]["mean"], _stats(ref)["bn"]["mean"])


def test_view():
    """Whether a training view updates its original is flax's business; normzoo's layer
    must do the same as flax.nnx.BatchNorm in a model that is otherwise the same."""
    assert _check_view("normzoo") == _check_view("flax")


# ------------------------------------------------------------------ jit
def test_jit_matches_eager():
    model = Net(nnx.Rngs(0))
    ref = nnx.clone(model)
    forward = nnx.jit(lambda m, x: m(x))
    for seed in range(2):
        x = _x((6, 3), seed=seed, loc=seed)
        np.testing.assert_allclose(forward(model, x), ref(x), rtol=1e-5, atol=1e-5)
        _assert_trees_close(_stats(model), _stats(ref), rtol=1e-5, atol=1e-5)
    _assert_trees_differ(_stats(model), _stats(Net(nnx.Rngs(0))))
    model.eval()  # a static attribute: nnx.jit retraces
    x = _x((6, 3), seed=5)
    before = _stats(model)
    np.testing.assert_allclose(forward(model, x), ref(x, use_running_average=True),
                               rtol=1e-5, atol=1e-5)
    _assert_trees_close(_stats(model), before)


def test_optimizer_step_under_jit():
    model = Net(nnx.Rngs(0))
    optimizer = nnx.Optimizer(model, optax.sgd(0.1), wrt=nnx.Param)
    x = _x((16, 3))
    target = np.stack([np.sin(x[:, 0]), x[:, 1] * x[:, 2]], axis=1).astype(np.float32)

    def loss_fn(m):
        return jnp.mean((m(x) - target) ** 2)

    @nnx.jit
    def step(m, opt):
        loss, grads = nnx.value_and_grad(loss_fn)(m)
        opt.update(m, grads)
        return loss

    # one step against an eager computation: p - lr * grad, statistics updated
    ref = nnx.clone(model)
    loss_ref, grads_ref = nnx.jit(nnx.value_and_grad(loss_fn))(ref)
    params0, stats0 = _params(model), _stats(model)
    loss0 = step(model, optimizer)
    np.testing.assert_allclose(loss0, loss_ref, rtol=1e-5)
    expected = jax.tree.map(lambda p, g: p - 0.1 * g, params0,
                            jax.tree.map(np.asarray, nnx.to_pure_dict(grads_ref)))
    _assert_trees_close(_params(model), expected, rtol=1e-5, atol=1e-6)
    assert np.abs(np.asarray(nnx.to_pure_dict(grads_ref)["bn"]["scale"])).max() > 1e-4
    _assert_trees_differ(_stats(model), stats0)
    _assert_trees_close(_stats(model), _stats(ref), rtol=1e-5, atol=1e-6)
    assert "mean" not in nnx.to_pure_dict(grads_ref)["bn"]  # BatchStats are not trained
    losses = [float(loss0)] + [float(step(model, optimizer)) for _ in range(30)]
    assert losses[-1] < 0.7 * losses[0], losses
    assert int(optimizer.step[...]) == 31


# ------------------------------------------------------------------ vmap
def test_vmap_ensemble_called_twice():
    """An ensemble created under nnx.vmap, each member with its own BatchNorm statistics,
    called twice (flax issue #4760 failed on the second call); == a loop over members."""

    @nnx.split_rngs(splits=3)
    @nnx.vmap(in_axes=(0,), out_axes=0)
    def create(rngs):
        return Net(rngs)

    ensemble = create(nnx.Rngs(0))
    assert ensemble.bn.mean.shape == (3, 4) and ensemble.linear.kernel.shape == (3, 3, 4)
    members = [_member(ensemble, i) for i in range(3)]
    _assert_trees_differ(_params(members[0]), _params(members[1]))
    forward = nnx.jit(nnx.vmap(lambda m, x: m(x), in_axes=(0, 0)))
    for call in range(2):
        xs = _x((3, 6, 3), seed=call, loc=call)
        ys = forward(ensemble, xs)
        for i, member in enumerate(members):
            np.testing.assert_allclose(ys[i], member(xs[i]), rtol=1e-5, atol=1e-5)
    for i, member in enumerate(members):
        got = jax.tree.map(lambda a: a[i], _stats(ensemble))
        _assert_trees_close(got, _stats(member), rtol=1e-5, atol=1e-6)
        _assert_trees_differ(got, _stats(Net(nnx.Rngs(0))))
    ensemble.eval()
    x = _x((6, 3), seed=7)
    ys = nnx.jit(nnx.vmap(lambda m, x: m(x), in_axes=(0, None)))(ensemble, x)
    for i, member in enumerate(members):
        np.testing.assert_allclose(ys[i], member(x, use_running_average=True),
                                   rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("impl", ["normzoo", "flax"])
def test_vmap_broadcast_model_with_axis_name(impl):
    """flax issue #4760: one model, data vmapped. With ``axis_name`` the statistics span the
    vmapped axis, are unbatched, and the second call works; == the model on all the rows."""
    model = Net(nnx.Rngs(0), impl, axis_name="batch")
    ref = Net(nnx.Rngs(0), impl)
    forward = nnx.jit(nnx.vmap(lambda m, x: m(x), in_axes=(None, 0), axis_name="batch"))
    for call in range(2):
        xs = _x((2, 3, 3), seed=call, loc=call)
        ys = forward(model, xs)
        np.testing.assert_allclose(ys.reshape(6, 2), ref(xs.reshape(6, 3)),
                                   rtol=1e-5, atol=1e-5)
        _assert_trees_close(_stats(model), _stats(ref), rtol=1e-5, atol=1e-6)
    _assert_trees_differ(_stats(model), _stats(Net(nnx.Rngs(0), impl)))


@pytest.mark.parametrize("impl", ["normzoo", "flax"])
def test_vmap_broadcast_model_without_axis_name(impl):
    """Without ``axis_name`` the per-lane statistics cannot go into one unbatched variable:
    a ValueError (flax 0.12's, the same for both), every time, and the model is left intact
    (no leaked tracer: flax issue #4760's UnexpectedTracerError)."""
    model = Net(nnx.Rngs(0), impl)
    before = _stats(model)
    forward = nnx.vmap(lambda m, x: m(x), in_axes=(None, 0))
    xs = _x((2, 6, 3))
    for _ in range(2):
        with pytest.raises(ValueError, match="batched"):
            forward(model, xs)
        with pytest.raises(ValueError, match="batched"):
            nnx.jit(forward)(model, xs)
    _assert_trees_close(_stats(model), before)
    for leaf in jax.tree.leaves(nnx.state(model)):
        assert isinstance(leaf, jax.Array) and not isinstance(leaf, jax.core.Tracer)
    np.testing.assert_allclose(model(xs[0]), Net(nnx.Rngs(0), impl)(xs[0]), **TOL)
    model.eval()  # no statistics written: fine
    ys = nnx.jit(forward)(model, xs)
    np.testing.assert_allclose(ys[1], model(xs[1]), rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------ scan
def test_scan_over_stacked_blocks():
    @nnx.split_rngs(splits=3)
    @nnx.vmap(in_axes=(0,), out_axes=0)
    def create(rngs):
        return Block(rngs)

    blocks = create(nnx.Rngs(0))
    members = [_member(blocks, i) for i in range(3)]

    @nnx.scan(in_axes=(nnx.Carry, 0), out_axes=nnx.Carry)
    def forward(x, block):
        return block(x)

    x = _x((6, 4))
    y = forward(x, blocks)
    h = x
    for member in members:
        h = member(h)
        assert not np.allclose(y, h, atol=1e-3) or member is members[-1]
    np.testing.assert_allclose(y, h, rtol=1e-5, atol=1e-5)
    for i, member in enumerate(members):  # statistics updated per block, through scan
        got = jax.tree.map(lambda a: a[i], _stats(blocks))
        _assert_trees_close(got, _stats(member), rtol=1e-5, atol=1e-6)
    _assert_trees_differ(_stats(blocks), _stats(create(nnx.Rngs(0))))


# ------------------------------------------------------------------ eval_shape
def test_eval_shape():
    """flax issue #4734: nnx.eval_shape of a model with BatchNorm and of its call."""
    abstract = nnx.eval_shape(lambda: Net(nnx.Rngs(0)))
    real = Net(nnx.Rngs(0))
    a_state, r_state = nnx.state(abstract), nnx.state(real)
    a_leaves, r_leaves = jax.tree.leaves(a_state), jax.tree.leaves(r_state)
    assert jax.tree.structure(a_state) == jax.tree.structure(r_state)
    assert a_leaves and all(isinstance(a, jax.ShapeDtypeStruct) for a in a_leaves)
    assert [(a.shape, a.dtype) for a in a_leaves] == [(r.shape, r.dtype) for r in r_leaves]
    assert abstract.bn.mean.shape == (4,) and abstract.bn.var.dtype == jnp.float32
    # the call, in training mode (it would update the statistics)
    before = _stats(real)
    out = nnx.eval_shape(lambda m, x: m(x), real, jnp.ones((6, 3)))
    assert isinstance(out, jax.ShapeDtypeStruct) and out.shape == (6, 2)
    assert out.dtype == jnp.float32
    for leaf in jax.tree.leaves(nnx.state(real)):  # still concrete arrays, unchanged
        assert isinstance(leaf, jax.Array)
    _assert_trees_close(_stats(real), before)
    x = _x((6, 3))
    np.testing.assert_allclose(real(x), Net(nnx.Rngs(0))(x), **TOL)


# ------------------------------------------------------------------ split / merge / update
def test_split_merge_state_update():
    model = Net(nnx.Rngs(0))
    x = _x((6, 3))
    model(x)
    graphdef, params, stats = nnx.split(model, nnx.Param, nnx.BatchStat)
    merged = nnx.merge(graphdef, params, stats)
    twin = nnx.clone(model)
    x2 = _x((6, 3), seed=3)
    np.testing.assert_allclose(merged(x2), twin(x2), **TOL)
    np.testing.assert_allclose(merged(x2, use_running_average=True),
                               twin(x2, use_running_average=True), **TOL)
    _assert_trees_close(_stats(merged), _stats(twin))

    other = Net(nnx.Rngs(1))
    assert not np.allclose(other(x2, True), twin(x2, True), atol=1e-3)
    nnx.update(other, nnx.state(twin))
    _assert_trees_close(_params(other), _params(twin))
    _assert_trees_close(_stats(other), _stats(twin))
    np.testing.assert_allclose(other(x2, True), twin(x2, True), **TOL)

    # functional style: a pure jax.jit step on (params, stats), state written back
    @jax.jit
    def pure_step(params, stats, x):
        m = nnx.merge(graphdef, params, stats)
        y = m(x)
        return y, nnx.state(m, nnx.BatchStat)

    graphdef, params, stats = nnx.split(twin, nnx.Param, nnx.BatchStat)
    ref = nnx.clone(twin)
    y, new_stats = pure_step(params, stats, x)
    np.testing.assert_allclose(y, ref(x), rtol=1e-5, atol=1e-5)
    nnx.update(twin, new_stats)
    _assert_trees_close(_stats(twin), _stats(ref), rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------ remat
def test_remat_same_grads():
    block = Block(nnx.Rngs(0))
    plain = nnx.clone(block)
    x = _x((6, 4))
    w = _x((6, 4), seed=1, loc=0.0)
    checkpointed = nnx.remat(lambda b, x: b(x))

    def loss_remat(b):
        return jnp.sum(w * checkpointed(b, x)) + jnp.sum(checkpointed(b, x) ** 2)

    def loss_plain(b):
        return jnp.sum(w * b(x)) + jnp.sum(b(x) ** 2)

    g_remat = nnx.jit(nnx.grad(loss_remat))(block)
    g_plain = nnx.jit(nnx.grad(loss_plain))(plain)
    g_remat, g_plain = (jax.tree.map(np.asarray, nnx.to_pure_dict(g)) for g in (g_remat, g_plain))
    _assert_trees_close(g_remat, g_plain, rtol=1e-5, atol=1e-5)
    assert np.abs(g_plain["bn"]["scale"]).max() > 1e-3
    # both ran the block twice in training mode: the same statistics
    _assert_trees_close(_stats(block), _stats(plain), rtol=1e-5, atol=1e-6)
    _assert_trees_differ(_stats(block), _stats(Block(nnx.Rngs(0))))
