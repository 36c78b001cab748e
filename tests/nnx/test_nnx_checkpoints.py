"""Checkpoints of normzoo.nnx models: orbax round trips and Linen <-> NNX conversion.

* orbax: ``nnx.state(model)`` saved with ``orbax.checkpoint.StandardCheckpointer`` and
  restored into an abstract model (``nnx.eval_shape``) gives the same outputs (train and
  eval) and the same statistics, through ``nnx.merge`` and through ``nnx.update``.
* ``linen_to_nnx``: a flax.linen model built from normzoo.linen layers, and one built from
  flax.linen's own BatchNorm / LayerNorm, load into the matching NNX model (normzoo.nnx
  layers, or flax.nnx's own) and compute the same numbers; ``nnx_to_linen`` gives the Linen
  trees back; mismatches raise KeyError / ValueError naming the variables; ``rename=``.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import normzoo.linen as zl
import normzoo.nnx as znnx
from normzoo.nnx import linen_path, linen_to_nnx, nnx_to_linen

ocp = pytest.importorskip("orbax.checkpoint")

TOL = dict(rtol=1e-6, atol=1e-6)
NNX_LAYERS = {"normzoo": (znnx.BatchNorm, znnx.LayerNorm), "flax": (nnx.BatchNorm, nnx.LayerNorm)}
LINEN_LAYERS = {"normzoo": (zl.BatchNorm, zl.LayerNorm), "flax": (nn.BatchNorm, nn.LayerNorm)}


def _x(shape, seed=0, loc=0.5):
    r = np.random.default_rng(seed)
    return (loc + 1.5 * r.standard_normal(shape)).astype(np.float32)


def _assert_trees_equal(a, b, **tol):
    """Same structure, shapes, dtypes; values equal (or close with ``tol``)."""
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for u, v in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        assert np.shape(u) == np.shape(v) and jnp.asarray(u).dtype == jnp.asarray(v).dtype
        if tol:
            np.testing.assert_allclose(u, v, **tol)
        else:
            np.testing.assert_array_equal(u, v)


def _pure(model, kind=...):
    return jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(model, kind)))


# ------------------------------------------------------------------ models
class Net(nnx.Module):
    """Linear -> BatchNorm -> LayerNorm -> relu -> Linear (the NNX side)."""

    def __init__(self, rngs, impl="normzoo"):
        BN, LN = NNX_LAYERS[impl]
        self.linear = nnx.Linear(3, 4, rngs=rngs)
        self.bn = BN(4, momentum=0.5, rngs=rngs)
        self.ln = LN(4, rngs=rngs)
        self.head = nnx.Linear(4, 2, rngs=rngs)

    def __call__(self, x, use_running_average=None):
        h = self.bn(self.linear(x), use_running_average=use_running_average)
        return self.head(nnx.relu(self.ln(h)))


class LinenNet(nn.Module):
    """The Linen twin of :class:`Net`, submodules named like Net's attributes."""

    impl: str = "normzoo"

    @nn.compact
    def __call__(self, x, train: bool):
        BN, LN = LINEN_LAYERS[self.impl]
        h = nn.Dense(4, name="linear")(x)
        h = BN(use_running_average=not train, momentum=0.5, name="bn")(h)
        return nn.Dense(2, name="head")(nn.relu(LN(name="ln")(h)))


class CkptNet(nnx.Module):
    """Net plus a whitening layer in groups (matrix-shaped BatchStats) and an RMSNorm."""

    def __init__(self, rngs):
        self.linear = nnx.Linear(3, 4, rngs=rngs)
        self.bn = znnx.BatchNorm(4, momentum=0.5, rngs=rngs)
        self.dbn = znnx.DecorrelatedBatchNorm(4, group_size=2, momentum=0.5,
                                              recovery="coloring", rngs=rngs)
        self.rms = znnx.RMSNorm(4, rngs=rngs)
        self.head = nnx.Linear(4, 2, rngs=rngs)

    def __call__(self, x, use_running_average=None):
        h = self.bn(self.linear(x), use_running_average)
        h = self.dbn(h, use_running_average)
        return self.head(self.rms(h))


def _perturb(variables, seed=1):
    """Random params (numpy: no compilation), so a param that did not load shows."""
    r = np.random.default_rng(seed)
    return jax.tree.map(lambda v: (np.asarray(v) + 0.3 * r.standard_normal(np.shape(v)))
                        .astype(np.asarray(v).dtype), variables)


# ------------------------------------------------------------------ orbax
def _trained_ckpt_net():
    model = CkptNet(nnx.Rngs(0))
    r = np.random.default_rng(2)
    nnx.update(model, jax.tree.map(  # random params, coloring near the identity
        lambda v: (np.asarray(v) + 0.1 * r.standard_normal(v.shape)).astype(np.float32),
        nnx.state(model, nnx.Param)))
    for seed in range(2):
        model(_x((8, 3), seed=seed, loc=seed))
    return model


def test_orbax_round_trip(tmp_path):
    model = _trained_ckpt_net()
    assert model.dbn.whitening_matrix.shape == (2, 2, 2)
    assert model.dbn.coloring.shape == (2, 2, 2)
    init = CkptNet(nnx.Rngs(0))
    assert not np.allclose(model.dbn.whitening_matrix[...], init.dbn.whitening_matrix[...])
    assert not np.allclose(model.bn.var[...], init.bn.var[...])
    checkpointer = ocp.StandardCheckpointer()
    path = tmp_path / "state"
    checkpointer.save(path, nnx.state(model))
    checkpointer.wait_until_finished()

    abstract = nnx.eval_shape(lambda: CkptNet(nnx.Rngs(1)))
    graphdef, abstract_state = nnx.split(abstract)
    assert all(isinstance(a, jax.ShapeDtypeStruct) for a in jax.tree.leaves(abstract_state))
    restored = checkpointer.restore(path, abstract_state)
    merged = nnx.merge(graphdef, restored)
    _assert_trees_equal(_pure(merged), _pure(model))

    # the same state through nnx.update into a concrete model of another seed
    updated = CkptNet(nnx.Rngs(7))
    assert not np.allclose(updated.linear.kernel[...], model.linear.kernel[...])
    nnx.update(updated, checkpointer.restore(path, nnx.state(
        nnx.eval_shape(lambda: CkptNet(nnx.Rngs(3))))))
    _assert_trees_equal(_pure(updated), _pure(model))

    x = _x((8, 3), seed=5, loc=-0.5)
    for other in (merged, updated):
        np.testing.assert_array_equal(other(x, True), model(x, True))  # eval
    reference = nnx.clone(model)
    y = reference(x)  # train: batch statistics, running ones updated
    for other in (merged, updated):
        np.testing.assert_allclose(other(x), y, **TOL)
        _assert_trees_equal(_pure(other, nnx.BatchStat), _pure(reference, nnx.BatchStat),
                            **TOL)
    assert not np.allclose(_pure(reference, nnx.BatchStat)["bn"]["mean"],
                           _pure(model, nnx.BatchStat)["bn"]["mean"])
    checkpointer.close()


def test_orbax_restores_into_linen_layout(tmp_path):
    """A restored NNX checkpoint converts to the Linen model's variables (and back)."""
    model = Net(nnx.Rngs(0))
    model(_x((6, 3)))
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(tmp_path / "net", nnx.state(model))
    checkpointer.wait_until_finished()
    graphdef, abstract_state = nnx.split(nnx.eval_shape(lambda: Net(nnx.Rngs(1))))
    restored = nnx.merge(graphdef, checkpointer.restore(tmp_path / "net", abstract_state))
    variables = nnx_to_linen(restored)
    x = _x((6, 3), seed=4)
    y_linen = LinenNet().apply(variables, x, train=False)
    np.testing.assert_allclose(y_linen, model(x, True), **TOL)
    checkpointer.close()


# ------------------------------------------------------------------ Linen -> NNX
@pytest.mark.parametrize("nnx_impl", ["normzoo", "flax"])
@pytest.mark.parametrize("linen_impl", ["normzoo", "flax"])
def test_linen_checkpoint_loads(linen_impl, nnx_impl):
    """normzoo.linen or flax.linen variables into a normzoo.nnx or flax.nnx model."""
    linen_model = LinenNet(linen_impl)
    x = _x((6, 3))
    variables = linen_model.init(jax.random.key(0), x, train=False)
    variables = {"params": _perturb(variables["params"]),
                 "batch_stats": variables["batch_stats"]}
    _, upd = linen_model.apply(variables, _x((6, 3), seed=1), train=True,
                               mutable=["batch_stats"])
    variables = {**variables, **upd}  # non-trivial running statistics
    model = Net(nnx.Rngs(1), nnx_impl)
    assert linen_to_nnx(variables, model) is model
    # the same trees back, bit for bit
    _assert_trees_equal(nnx_to_linen(model), variables)
    tol = TOL if linen_impl == nnx_impl else dict(rtol=1e-5, atol=1e-5)
    x2 = _x((6, 3), seed=2, loc=-0.4)
    np.testing.assert_allclose(model(x2, True), linen_model.apply(variables, x2, train=False),
                               **tol)
    y_ref, upd = linen_model.apply(variables, x2, train=True, mutable=["batch_stats"])
    np.testing.assert_allclose(model(x2, False), y_ref, **tol)
    _assert_trees_equal(nnx_to_linen(model), {**variables, **upd}, **tol)
    assert not np.allclose(upd["batch_stats"]["bn"]["mean"],
                           variables["batch_stats"]["bn"]["mean"])


def test_linen_several_feature_axes_reshaped():
    """Linen keeps (2, 4) per feature axes, NNX (8,): loaded and given back reshaped."""

    class Linen(nn.Module):
        @nn.compact
        def __call__(self, x, train):
            x = zl.BatchNorm(use_running_average=not train, axis=(-2, -1), name="bn")(x)
            return zl.LayerNorm(feature_axes=(-2, -1), reduction_axes=(-2, -1), name="ln")(x)

    class NNX(nnx.Module):
        def __init__(self, rngs):
            self.bn = znnx.BatchNorm(8, axis=(-2, -1), rngs=rngs)
            self.ln = znnx.LayerNorm(8, feature_axes=(-2, -1), reduction_axes=(-2, -1),
                                     rngs=rngs)

        def __call__(self, x, use_running_average=None):
            return self.ln(self.bn(x, use_running_average))

    x = _x((5, 2, 4))
    variables = Linen().init(jax.random.key(0), x, train=True)
    variables = {"params": _perturb(variables["params"]),
                 "batch_stats": variables["batch_stats"]}
    assert variables["params"]["bn"]["scale"].shape == (2, 4)
    model = linen_to_nnx(variables, NNX(nnx.Rngs(0)))
    assert model.bn.scale.shape == (8,)
    y_ref, upd = Linen().apply(variables, x, train=True, mutable=["batch_stats"])
    np.testing.assert_allclose(model(x), y_ref, **TOL)
    shapes = jax.eval_shape(lambda: variables)
    _assert_trees_equal(nnx_to_linen(model, shapes=shapes), {**variables, **upd}, **TOL)


def test_linen_list_of_blocks_and_rename():
    """A Linen ``setup`` list ``blocks_0, blocks_1`` is an NNX ``nnx.List`` ``blocks[0]``;
    ``rename=`` maps an NNX prefix to the Linen auto name."""

    class LinenBlocks(nn.Module):
        def setup(self):
            self.blocks = [zl.LayerNorm(), zl.RMSNorm()]
            self.norm = zl.BatchNorm(use_running_average=True)

        def __call__(self, x):
            return self.norm(self.blocks[1](self.blocks[0](x)))

    class LinenAuto(nn.Module):
        @nn.compact
        def __call__(self, x):
            return zl.BatchNorm(use_running_average=True)(x)  # named BatchNorm_0

    class NNXBlocks(nnx.Module):
        def __init__(self, rngs):
            self.blocks = nnx.List([znnx.LayerNorm(4, rngs=rngs), znnx.RMSNorm(4, rngs=rngs)])
            self.norm = znnx.BatchNorm(4, use_running_average=True, rngs=rngs)

        def __call__(self, x):
            return self.norm(self.blocks[1](self.blocks[0](x)))

    x = _x((6, 4))
    variables = LinenBlocks().init(jax.random.key(0), x)
    variables = {"params": _perturb(variables["params"]),
                 "batch_stats": _perturb(variables["batch_stats"], seed=2)}
    assert set(variables["params"]) == {"blocks_0", "blocks_1", "norm"}
    variables["batch_stats"]["norm"]["var"] = np.abs(variables["batch_stats"]["norm"]["var"])
    model = linen_to_nnx(variables, NNXBlocks(nnx.Rngs(0)))
    np.testing.assert_allclose(model(x), LinenBlocks().apply(variables, x), **TOL)
    _assert_trees_equal(nnx_to_linen(model), variables)
    assert linen_path(("blocks", 0, "scale")) == ("blocks_0", "scale")

    # rename: NNX attribute "norm" is Linen's "BatchNorm_0"
    auto = {c: {"BatchNorm_0": variables[c]["norm"]} for c in ("params", "batch_stats")}
    bn = nnx.Dict(norm=znnx.BatchNorm(4, use_running_average=True, rngs=nnx.Rngs(0)))
    with pytest.raises(KeyError, match="BatchNorm_0"):
        linen_to_nnx(auto, bn)
    rename = {("norm",): ("BatchNorm_0",)}
    linen_to_nnx(auto, bn, rename=rename)
    np.testing.assert_allclose(bn["norm"](x), LinenAuto().apply(auto, x), **TOL)
    _assert_trees_equal(nnx_to_linen(bn, rename=rename), auto)
    assert linen_path(("norm", "mean"), rename) == ("BatchNorm_0", "mean")


# ------------------------------------------------------------------ mismatches
def _variables():
    linen_model = LinenNet()
    v = linen_model.init(jax.random.key(0), _x((6, 3)), train=False)
    return {c: jax.tree.map(np.asarray, v[c]) for c in ("params", "batch_stats")}


def test_missing_and_extra_variables_raise_key_error():
    v = _variables()
    del v["params"]["bn"]["bias"]
    with pytest.raises(KeyError, match="params/bn/bias") as err:
        linen_to_nnx(v, Net(nnx.Rngs(0)))
    assert "missing" in str(err.value)

    v = _variables()
    v["batch_stats"]["bn"]["count"] = np.zeros(())
    v["params"]["extra"] = {"kernel": np.zeros((2, 2), np.float32)}
    with pytest.raises(KeyError) as err:
        linen_to_nnx(v, Net(nnx.Rngs(0)))
    assert "batch_stats/bn/count" in str(err.value) and "params/extra/kernel" in str(err.value)

    v = _variables()  # both at once: every name listed
    del v["batch_stats"]["bn"]["var"]
    del v["params"]["head"]
    v["params"]["bogus"] = {"scale": np.ones(4, np.float32)}
    with pytest.raises(KeyError) as err:
        linen_to_nnx(v, Net(nnx.Rngs(0)))
    for name in ("batch_stats/bn/var", "params/head/kernel", "params/head/bias",
                 "params/bogus/scale"):
        assert name in str(err.value), name

    # a Linen model of flax's BatchNorm into a model with a whitening layer: names differ
    with pytest.raises(KeyError, match="covariance"):
        linen_to_nnx(_variables(), nnx.Dict(bn=znnx.Whitening(4, rngs=nnx.Rngs(0))))


def test_size_mismatch_raises_value_error():
    v = _variables()
    v["params"]["bn"]["scale"] = np.ones(5, np.float32)
    with pytest.raises(ValueError, match="params/bn/scale"):
        linen_to_nnx(v, Net(nnx.Rngs(0)))
    v = _variables()
    v["params"]["linear"]["kernel"] = np.ones((4, 4), np.float32)
    with pytest.raises(ValueError, match="params/linear/kernel"):
        linen_to_nnx(v, Net(nnx.Rngs(0)))
    # same size, other shape: reshaped (a feature-axes layout), values kept in order
    v = _variables()
    v["params"]["bn"]["scale"] = np.arange(4, dtype=np.float32).reshape(2, 2)
    model = linen_to_nnx(v, Net(nnx.Rngs(0)))
    np.testing.assert_array_equal(model.bn.scale[...], np.arange(4, dtype=np.float32))


def test_failed_load_leaves_model_unchanged():
    """A load that raises must not leave the model half-loaded: every check before any
    write (a caller that catches the error keeps its own, intact, model)."""
    for corrupt in ("missing", "size"):
        v = jax.tree.map(lambda a: a + 1.0, _variables())
        if corrupt == "missing":
            del v["params"]["head"]["bias"]
            error = KeyError
        else:
            v["params"]["head"]["kernel"] = np.ones((3, 2), np.float32)
            error = ValueError
        model = Net(nnx.Rngs(0))
        before = _pure(model)
        with pytest.raises(error):
            linen_to_nnx(v, model)
        _assert_trees_equal(_pure(model), before)
