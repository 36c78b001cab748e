"""Every normzoo.nnx layer against its normzoo.linen twin, given the same variables.

For each layer of ``normzoo.nnx.TWINS`` (with per-layer configurations: areas, estimators,
whitening recoveries and running averages) the NNX layer and the Linen layer must declare
the same variables (names, shapes, dtypes, initial values), and, once the Linen variables
are copied into the NNX layer with ``linen_to_nnx``, compute the same outputs, the same
updated running statistics, the same eval outputs and the same gradients. Then: several
feature axes, bfloat16 inputs, masks, the errors, the registry's ``api="nnx"`` and
flax.nnx's constructor signatures.
"""

import inspect
import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import normzoo.linen as zl
import normzoo.nnx as znnx
import reference
from normzoo import registry
from normzoo.nnx import TWINS, linen_to_nnx, nnx_to_linen

TOL = dict(rtol=1e-6, atol=1e-6)
BF16_TOL = dict(rtol=2e-2, atol=2e-2)


# ------------------------------------------------------------------ configurations
def _case(cls, shape, case_id=None, **kwargs):
    """(linen class, kwargs, input shape); num_features is the input's last axis."""
    return pytest.param(cls, kwargs, shape, id=case_id or cls.__name__)


# Two input shapes only (eager JAX compiles each op once per shape): A for the batch-area
# and whitening layers, B (a spatial axis) for the per-sample areas and BatchNorm.
A, B = (8, 4), (4, 2, 4)

CASES = [
    _case(zl.BatchNorm, B),
    _case(zl.BatchNorm, A, "BatchNorm-nobias-m0.5", use_bias=False, momentum=0.5),
    _case(zl.BatchNorm, A, "BatchNorm-virtual_batch", virtual_batch_size=4, momentum=0.5),
    _case(zl.BatchRenorm, A, r_max=1.2, d_max=0.1, momentum=0.5),
    _case(zl.LayerNorm, B),
    _case(zl.RMSNorm, B),
    _case(zl.GroupNorm, B, num_groups=2),
    _case(zl.GroupNorm, B, "GroupNorm-group_size", num_groups=None, group_size=2),
    _case(zl.InstanceNorm, B),
    _case(zl.Centering, A, "Centering-batch", area="batch", momentum=0.5),
    _case(zl.Centering, B, "Centering-layer", area="layer"),
    _case(zl.Scaling, A, "Scaling-batch", area="batch", momentum=0.5),
    _case(zl.Scaling, B, "Scaling-layer", area="layer"),
    _case(zl.Standardization, A, "Standardization-batch", area="batch", momentum=0.5),
    _case(zl.Standardization, B, "Standardization-layer", area="layer"),
    _case(zl.Standardization, B, "Standardization-group", area="group", num_groups=2),
    _case(zl.Standardization, A, "Standardization-debiased_ema", area="batch",
          estimator="debiased_ema", momentum=0.5),
    _case(zl.Standardization, A, "Standardization-cumulative", area="batch",
          estimator="cumulative"),
    _case(zl.Whitening, A, momentum=0.5),
    _case(zl.Whitening, A, "Whitening-coloring", recovery="coloring", momentum=0.5),
    _case(zl.Whitening, A, "Whitening-whitening_matrix",
          running_average_of="whitening_matrix", momentum=0.5),
    _case(zl.Whitening, A, "Whitening-groups", group_size=2, momentum=0.5),
    _case(zl.ZCAWhitening, A, momentum=0.5),
    _case(zl.PCAWhitening, A, momentum=0.5),
    _case(zl.CholeskyWhitening, A, momentum=0.5),
    _case(zl.IterNorm, A, momentum=0.5),
    _case(zl.IterNorm, A, "IterNorm-coloring", recovery="coloring"),
    _case(zl.DecorrelatedBatchNorm, A, momentum=0.5),
    _case(zl.DecorrelatedBatchNorm, A, "DecorrelatedBatchNorm-groups", group_size=2),
    _case(zl.SwitchableNorm, B, momentum=0.5),
    _case(zl.SwitchableNorm, A, "SwitchableNorm-no_spatial", momentum=0.5),
    _case(zl.GroupWhitening, B, num_groups=2),
    _case(zl.InstanceWhitening, B, group_size=2),
]


def _subset(*ids):
    """The cases of these ids: one (at least) per layer, for the costlier checks."""
    by_id = {c.id: c for c in CASES}
    return [by_id[i] for i in ids]


#: Gradients and masks: every layer once (compiling each configuration costs ~0.3 s).
GRAD_CASES = _subset(
    "BatchNorm", "BatchRenorm", "LayerNorm", "RMSNorm", "GroupNorm", "InstanceNorm",
    "Centering-batch", "Scaling-layer", "Standardization-batch", "Whitening-coloring",
    "ZCAWhitening", "PCAWhitening", "CholeskyWhitening", "IterNorm", "DecorrelatedBatchNorm-groups",
    "SwitchableNorm", "GroupWhitening", "InstanceWhitening")
MASK_CASES = _subset(
    "BatchNorm", "BatchRenorm", "LayerNorm", "RMSNorm", "GroupNorm-group_size", "InstanceNorm",
    "Centering-layer", "Scaling-batch", "Standardization-layer", "Standardization-cumulative",
    "Whitening-whitening_matrix", "ZCAWhitening", "PCAWhitening", "CholeskyWhitening",
    "IterNorm-coloring", "DecorrelatedBatchNorm", "SwitchableNorm", "GroupWhitening",
    "InstanceWhitening")


@pytest.mark.parametrize("subset", [CASES, GRAD_CASES, MASK_CASES],
                         ids=["all", "grad", "mask"])
def test_cases_cover_every_twin(subset):
    covered = {c.values[0] for c in subset}
    assert set(TWINS) <= covered, set(TWINS) - covered


def _x(shape, seed=0, loc=0.5, scale=1.5, dtype=np.float32):
    r = np.random.default_rng(seed)
    return (loc + scale * r.standard_normal(shape)).astype(dtype)


def _running(cls):
    return issubclass(TWINS[cls], znnx.WithRunningAverage)


def _perturbed(variables, seed=1):
    """The Linen init variables with random params (coloring near the identity), so that a
    copy that dropped or misplaced a param changes the output."""
    r = np.random.default_rng(seed)

    def leaf(path, v):
        v = np.asarray(v)  # numpy: no compilation per shape
        noise = 0.2 if path[-1].key == "coloring" else 0.3
        return (v + noise * r.standard_normal(v.shape)).astype(v.dtype)

    out = dict(variables)
    out["params"] = jax.tree_util.tree_map_with_path(leaf, variables.get("params", {}))
    return out


def _linen_call(layer, variables, x, running, train=True, **kw):
    """(y, new variables) of a Linen layer; statistics updated when ``train``."""
    if running:
        y, upd = layer.apply(variables, x, use_running_average=not train,
                             mutable=["batch_stats"], **kw)
        return y, {**variables, **upd}
    return layer.apply(variables, x, **kw), variables


def _nnx_call(model, x, running, train=True, **kw):
    if running:
        return model(x, use_running_average=not train, **kw)
    return model(x, **kw)


def _init(cls, layer, x):
    """Linen init (training mode for the layers with a running-average switch)."""
    kw = {"use_running_average": False} if _running(cls) else {}
    return layer.init(jax.random.key(0), x, **kw)


def _build(cls, kwargs, shape, x=None):
    """(linen layer, perturbed linen variables, nnx model holding them)."""
    layer = cls(**kwargs)
    x = _x(shape) if x is None else x
    variables = _perturbed(_init(cls, layer, x))
    model = TWINS[cls](shape[-1], rngs=nnx.Rngs(0), **kwargs)
    linen_to_nnx(variables, model)
    return layer, variables, model


def _assert_tree_close(a, b, **tol):
    chex.assert_trees_all_equal_structs(a, b)
    chex.assert_trees_all_equal_shapes_and_dtypes(a, b)
    chex.assert_trees_all_close(a, b, **(tol or TOL))


# ------------------------------------------------------------------ one layer, both APIs
@pytest.mark.parametrize("cls, kwargs, shape", CASES)
def test_twin_variables(cls, kwargs, shape):
    """Fresh NNX init == Linen init (names, shapes, dtypes, values); variable types right."""
    x = _x(shape)
    layer = cls(**kwargs)
    ref = _init(cls, layer, x)
    model = TWINS[cls](shape[-1], rngs=nnx.Rngs(0), **kwargs)
    tree = nnx_to_linen(model)
    assert set(tree) == set(ref) - {"intermediates"}
    _assert_tree_close(tree, dict(ref))
    assert jax.tree.leaves(tree), "every configuration here has variables"
    for collection, kind in (("params", nnx.Param), ("batch_stats", nnx.BatchStat)):
        for name in tree.get(collection, {}):
            assert isinstance(getattr(model, name), kind), (collection, name)
    # after copying perturbed variables, the NNX model gives back exactly those
    variables = _perturbed(ref)
    linen_to_nnx(variables, model)
    chex.assert_trees_all_equal(nnx_to_linen(model), dict(variables))
    for name, value in ref["params"].items():
        assert not np.allclose(variables["params"][name], value), name


@pytest.mark.parametrize("cls, kwargs, shape", CASES)
def test_twin_train_eval(cls, kwargs, shape):
    """Same outputs, same updated statistics (two training calls), same eval outputs."""
    running = _running(cls)
    layer, variables, model = _build(cls, kwargs, shape)
    for step in range(2):
        x = _x(shape, seed=10 + step, loc=0.5 + step)
        y_ref, variables = _linen_call(layer, variables, x, running, train=True)
        y = _nnx_call(model, x, running, train=True)
        np.testing.assert_allclose(y, y_ref, **TOL)
        assert y.dtype == y_ref.dtype and y.shape == x.shape
        _assert_tree_close(nnx_to_linen(model), dict(variables))
    if "batch_stats" in variables:  # statistics moved away from their initial values
        init = _init(cls, layer, x)["batch_stats"]
        moved = [not np.allclose(a, b) for a, b in
                 zip(jax.tree.leaves(variables["batch_stats"]), jax.tree.leaves(init))]
        assert any(moved)
    x = _x(shape, seed=20, loc=-0.3)
    before = nnx_to_linen(model)
    y_ref, _ = _linen_call(layer, variables, x, running, train=False)
    y = _nnx_call(model, x, running, train=False)
    np.testing.assert_allclose(y, y_ref, **TOL)
    chex.assert_trees_all_equal(nnx_to_linen(model), before)  # eval updates nothing
    if running:  # eval mode by model.eval() equals the call argument
        model.eval()
        np.testing.assert_allclose(model(x), y, **TOL)
        chex.assert_trees_all_equal(nnx_to_linen(model), before)
        if "batch_stats" in variables:  # running stats differ from batch stats
            y_train, _ = _linen_call(layer, variables, x, running, train=True)
            assert not np.allclose(y_train, y, atol=1e-3)


@pytest.mark.parametrize("cls, kwargs, shape", MASK_CASES)
def test_twin_mask(cls, kwargs, shape):
    """The mask argument selects the same elements in both APIs (and does matter)."""
    running = _running(cls)
    layer, variables, model = _build(cls, kwargs, shape)
    x = _x(shape, seed=3)
    mask = np.ones(shape, bool)
    mask[0] = False  # drop the first sample (all areas keep elements of the others)
    mask[1, ..., 0] = False  # and one feature of the second
    if TWINS[cls] in (znnx.LayerNorm, znnx.RMSNorm, znnx.GroupNorm, znnx.InstanceNorm,
                      znnx.SwitchableNorm, znnx.GroupWhitening, znnx.InstanceWhitening) or (
            kwargs.get("area", "batch") != "batch"):
        mask[0] = True  # per-sample areas: sample 0 fully masked would be 0/0
        mask[0, ..., :2] = False
    y_ref, v_ref = _linen_call(layer, variables, x, running, train=True, mask=mask)
    y = _nnx_call(model, x, running, train=True, mask=mask)
    np.testing.assert_allclose(y, y_ref, **TOL)
    _assert_tree_close(nnx_to_linen(model), dict(v_ref))
    y_unmasked, _ = _linen_call(layer, variables, x, running, train=True)
    assert not np.allclose(y, y_unmasked, atol=1e-4), "the mask changed nothing"


@pytest.mark.parametrize("cls, kwargs, shape", GRAD_CASES)
def test_twin_grads(cls, kwargs, shape):
    """nnx.grad wrt the Params == jax.grad of the Linen apply wrt params (train mode)."""
    running = _running(cls)
    layer, variables, model = _build(cls, kwargs, shape)
    x = _x(shape, seed=4)
    w = _x(shape, seed=5, loc=0.0, scale=1.0)

    def linen_loss(params):
        y, _ = _linen_call(layer, {**variables, "params": params}, x, running, train=True)
        return jnp.sum(w * y) + 0.1 * jnp.sum(y ** 2)

    def nnx_loss(m):
        y = _nnx_call(m, x, running, train=True)
        return jnp.sum(w * y) + 0.1 * jnp.sum(y ** 2)

    g_ref = jax.jit(jax.grad(linen_loss))(variables["params"])
    grads = nnx.jit(nnx.grad(nnx_loss, argnums=nnx.DiffState(0, nnx.Param)))(model)
    g = nnx_to_linen(_as_module_grads(model, grads))["params"]
    _assert_tree_close(g, g_ref, rtol=1e-5, atol=1e-5)
    assert any(np.abs(v).max() > 1e-3 for v in jax.tree.leaves(g))


def _as_module_grads(model, grads):
    """A clone of ``model`` whose Params hold ``grads`` (so nnx_to_linen names them)."""
    clone = nnx.clone(model)
    nnx.update(clone, grads)
    return clone


# ------------------------------------------------------------------ float64 reference
REF_TOL = dict(rtol=2e-5, atol=2e-5)


def _set_params(model, seed=1):
    """Random scale / bias in ``model`` (numpy); returns them as float64 arrays."""
    r = np.random.default_rng(seed)
    out = {}
    for name in ("scale", "bias"):
        variable = getattr(model, name, None)
        if variable is not None:
            value = (np.asarray(variable[...]) + 0.3 * r.standard_normal(variable.shape))
            variable[...] = value.astype(np.float32)
            out[name] = value.astype(np.float32).astype(np.float64)
    return out


def test_against_float64_reference():
    """The NNX layers compute the papers' equations (tests/reference.py, float64), not only
    what their linen twins compute: outputs, running statistics, eval outputs."""
    x = _x(B, seed=11)
    bn = znnx.BatchNorm(4, momentum=0.5, rngs=nnx.Rngs(0))
    p = _set_params(bn)
    np.testing.assert_allclose(bn(x), reference.batch_norm(x, p["scale"], p["bias"]),
                               **REF_TOL)
    mu, var = reference.moments(x, (0, 1))
    np.testing.assert_allclose(bn.mean[...], reference.ema(0.0, mu.ravel(), 0.5), **REF_TOL)
    np.testing.assert_allclose(bn.var[...], reference.ema(1.0, var.ravel(), 0.5), **REF_TOL)
    x2 = _x(B, seed=12, loc=-1.0)
    bn.eval()
    np.testing.assert_allclose(
        bn(x2), reference.batch_norm(x2, p["scale"], p["bias"], mean=bn.mean[...],
                                     var=bn.var[...]), **REF_TOL)
    for layer, ref in [
        (znnx.LayerNorm(4, rngs=nnx.Rngs(0)), lambda p: reference.layer_norm(x, **p)),
        (znnx.RMSNorm(4, rngs=nnx.Rngs(0)), lambda p: reference.rms_norm(x, p["scale"])),
        (znnx.GroupNorm(4, 2, rngs=nnx.Rngs(0)), lambda p: reference.group_norm(x, 2, **p)),
        (znnx.InstanceNorm(4, rngs=nnx.Rngs(0)), lambda p: reference.instance_norm(x, **p)),
    ]:
        p = {("gamma" if k == "scale" else "beta"): v for k, v in _set_params(layer).items()}
        if isinstance(layer, znnx.RMSNorm):
            p = {"scale": p["gamma"]}
        np.testing.assert_allclose(layer(x), ref(p), **REF_TOL, err_msg=type(layer).__name__)
    xa = _x(A, seed=13)
    for layer, method, group_size in [
            (znnx.ZCAWhitening(4, use_scale=False, use_bias=False, rngs=nnx.Rngs(0)), "zca",
             None),
            (znnx.Whitening(4, method="cholesky", group_size=2, use_scale=False,
                            use_bias=False, rngs=nnx.Rngs(0)), "cholesky", 2)]:
        np.testing.assert_allclose(layer(xa), reference.whiten(xa, method, group_size),
                                   rtol=1e-4, atol=1e-4, err_msg=method)


# ------------------------------------------------------------------ several feature axes
@pytest.mark.parametrize("cls, kwargs", [
    (zl.LayerNorm, dict(feature_axes=(-2, -1), reduction_axes=(-2, -1))),
    (zl.BatchNorm, dict(axis=(-2, -1), momentum=0.5)),
    (zl.Standardization, dict(area="batch", feature_axes=(-2, -1), momentum=0.5)),
    (zl.RMSNorm, dict(feature_axes=(-2, -1), reduction_axes=(-2, -1))),
], ids=["LayerNorm", "BatchNorm", "Standardization", "RMSNorm"])
def test_several_feature_axes(cls, kwargs):
    shape = (5, 2, 4)
    running = _running(cls)
    layer = cls(**kwargs)
    x = _x(shape)
    variables = _perturbed(_init(cls, layer, x))
    assert jax.tree.leaves(variables["params"])[0].shape == (2, 4)
    model = TWINS[cls](8, rngs=nnx.Rngs(0), **kwargs)
    for v in jax.tree.leaves(nnx.state(model)):
        assert v.shape == (8,)  # stored flat, as flax.nnx
    linen_to_nnx(variables, model)
    y_ref, v_ref = _linen_call(layer, variables, x, running, train=True)
    y = _nnx_call(model, x, running, train=True)
    np.testing.assert_allclose(y, y_ref, **TOL)
    _assert_tree_close(nnx_to_linen(model, shapes=v_ref), dict(v_ref))
    # a flat tree without shapes= has the same elements
    flat = nnx_to_linen(model)
    for a, b in zip(jax.tree.leaves(flat), jax.tree.leaves(dict(v_ref))):
        np.testing.assert_array_equal(a, np.ravel(b))
    if running:
        x2 = _x(shape, seed=7)
        y_ref, _ = _linen_call(layer, v_ref, x2, running, train=False)
        np.testing.assert_allclose(_nnx_call(model, x2, running, train=False), y_ref, **TOL)
    with pytest.raises(ValueError, match="num_features"):
        _nnx_call(model, _x((5, 3, 4)), running)


# ------------------------------------------------------------------ bfloat16
@pytest.mark.parametrize("cls, kwargs, shape", [
    c for c in CASES if c.id in (
        "BatchNorm", "LayerNorm", "RMSNorm", "GroupNorm", "Standardization-batch",
        "Whitening", "IterNorm", "DecorrelatedBatchNorm")])
def test_bf16_input(cls, kwargs, shape):
    """bfloat16 input: float32 statistics; output dtype and values as linen (bf16 rounding)."""
    running = _running(cls)
    layer, variables, model = _build(cls, kwargs, shape)
    x = jnp.asarray(_x(shape, seed=6), jnp.bfloat16)
    y_ref, v_ref = _linen_call(layer, variables, x, running, train=True)
    y = _nnx_call(model, x, running, train=True)
    assert y.dtype == y_ref.dtype
    np.testing.assert_allclose(np.asarray(y, np.float32), np.asarray(y_ref, np.float32),
                               **BF16_TOL)
    for name in getattr(model, "stat_names", ()):
        assert getattr(model, name)[...].dtype == jnp.float32, name
    _assert_tree_close(nnx_to_linen(model), dict(v_ref), rtol=1e-5, atol=1e-5)
    # a bf16 layer (dtype=bfloat16): bf16 output, statistics still float32
    model16 = TWINS[cls](shape[-1], rngs=nnx.Rngs(0), **kwargs, dtype=jnp.bfloat16)
    layer16 = cls(**kwargs, dtype=jnp.bfloat16)
    linen_to_nnx(variables, model16)
    x32 = _x(shape, seed=6)
    y_ref, v_ref = _linen_call(layer16, variables, x32, running, train=True)
    y = _nnx_call(model16, x32, running, train=True)
    assert y.dtype == y_ref.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(y, np.float32), np.asarray(y_ref, np.float32),
                               **BF16_TOL)
    for name in getattr(model16, "stat_names", ()):
        assert getattr(model16, name)[...].dtype == jnp.float32, name


# ------------------------------------------------------------------ errors
FIRST_CASES = list({c.values[0]: c for c in reversed(CASES)}.values())[::-1]  # one per layer


@pytest.mark.parametrize("cls, kwargs, shape", FIRST_CASES)
def test_num_features_mismatch(cls, kwargs, shape):
    model = TWINS[cls](shape[-1], rngs=nnx.Rngs(0), **kwargs)
    wrong = shape[:-1] + (2 * shape[-1],)
    with pytest.raises(ValueError, match="num_features"):
        _nnx_call(model, _x(wrong), _running(cls))


@pytest.mark.parametrize("num_features", [0, -3, 2.0, True, "4", None])
@pytest.mark.parametrize("name", ["BatchNorm", "LayerNorm", "Whitening", "Standardization"])
def test_bad_num_features(name, num_features):
    with pytest.raises(ValueError, match="num_features"):
        getattr(znnx, name)(num_features, rngs=nnx.Rngs(0))


@pytest.mark.parametrize("nnx_cls", list(TWINS.values()), ids=lambda c: c.__name__)
def test_unknown_keyword_and_negative_epsilon(nnx_cls):
    extra = {"num_groups": 2} if nnx_cls is znnx.GroupNorm else {}
    with pytest.raises(TypeError, match="momentun"):
        nnx_cls(4, rngs=nnx.Rngs(0), momentun=0.9, **extra)
    with pytest.raises(ValueError, match="epsilon"):
        nnx_cls(4, rngs=nnx.Rngs(0), epsilon=-1e-3, **extra)
    nnx_cls(4, rngs=nnx.Rngs(0), epsilon=0.0, **extra)  # zero is allowed


RUNNING = [c for c in CASES if _running(c.values[0]) and (
    c.values[1].get("area", "batch") == "batch")]


@pytest.mark.parametrize("cls, kwargs, shape", RUNNING)
def test_use_running_average_none_everywhere(cls, kwargs, shape):
    model = TWINS[cls](shape[-1], rngs=nnx.Rngs(0), use_running_average=None, **kwargs)
    with pytest.raises(ValueError, match="use_running_average"):
        model(_x(shape))
    # linen raises too, so the two agree that None must be resolved somewhere
    layer = cls(**kwargs)
    with pytest.raises(ValueError, match="use_running_average"):
        layer.init(jax.random.key(0), _x(shape))
    # either place resolves it
    twin = nnx.clone(model)
    y = model(_x(shape), use_running_average=False)
    twin.train()
    assert twin.use_running_average is False
    np.testing.assert_allclose(twin(_x(shape)), y, **TOL)


def test_use_running_average_none_ignored_without_statistics():
    """A per-sample area has no running statistics: None is fine, as in linen."""
    model = znnx.Standardization(3, area="layer", use_running_average=None, rngs=nnx.Rngs(0))
    layer = zl.Standardization(area="layer")
    x = _x((4, 3))
    v = layer.init(jax.random.key(0), x)
    np.testing.assert_allclose(model(x), layer.apply(v, x), **TOL)


def test_group_norm_groups_must_divide_at_construction():
    with pytest.raises(ValueError, match="num_groups"):
        znnx.GroupNorm(6, num_groups=4, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="num_groups"):
        znnx.GroupNorm(6, 4, rngs=nnx.Rngs(0))  # positional, as flax.nnx
    assert znnx.GroupNorm(6, 3, rngs=nnx.Rngs(0)).num_groups == 3
    gn = znnx.GroupNorm(6, None, 2, rngs=nnx.Rngs(0))
    assert (gn.num_groups, gn.group_size) == (None, 2)
    with pytest.raises(ValueError, match="group_size"):
        znnx.GroupNorm(6, None, 4, rngs=nnx.Rngs(0))


def test_whitening_group_size_must_divide_at_construction():
    with pytest.raises(ValueError, match="group_size"):
        znnx.Whitening(6, group_size=4, rngs=nnx.Rngs(0))
    # the presets adapt it, as their linen twins (16 -> 8 for 24 features: 3 groups of 8)
    model = znnx.DecorrelatedBatchNorm(24, rngs=nnx.Rngs(0))
    assert model.whitening_matrix.shape == (3, 8, 8)
    assert znnx.IterNorm(24, rngs=nnx.Rngs(0)).whitening_matrix.shape == (1, 24, 24)


# ------------------------------------------------------------------ registry
REGISTRY_OVERRIDES = {"gn": {"num_groups": 2}, "evonorm_s0": {"num_groups": 2},
                      "gw": {"num_groups": 4}}


@pytest.mark.parametrize("name", registry.names())
def test_registry_nnx_matches_linen(name):
    overrides = REGISTRY_OVERRIDES.get(name, {})
    model = registry.make(name, api="nnx", num_features=8, rngs=nnx.Rngs(0), **overrides)
    layer = registry.make(name, api="linen", use_running_average=False, **overrides)
    x = _x((8, 8))
    stateful = registry.is_stateful(name)
    variables = layer.init(jax.random.key(0), x)
    variables = _perturbed(variables) if jax.tree.leaves(variables) else {}
    linen_to_nnx(variables, model)
    if stateful:  # the linen layer was built with use_running_average=False
        y_ref, v_ref = layer.apply(variables, x, mutable=["batch_stats"])
        v_ref = {**variables, **v_ref}
        assert model.use_running_average is False  # NNX default: training
    else:
        y_ref, v_ref = layer.apply(variables, x), variables
    y = model(x)
    np.testing.assert_allclose(y, y_ref, **TOL)
    _assert_tree_close(nnx_to_linen(model), dict(v_ref))
    if name == "none":
        np.testing.assert_array_equal(y, x)
    else:
        assert not np.allclose(y, x, atol=1e-2)
    if stateful:
        x2 = _x((8, 8), seed=9)
        model.eval()
        y_eval = registry.make(name, api="linen", use_running_average=True, **overrides).apply(
            v_ref, x2)
        np.testing.assert_allclose(model(x2), y_eval, **TOL)
        built = registry.make(name, api="nnx", num_features=8, rngs=nnx.Rngs(0),
                              use_running_average=True, **overrides)
        assert built.use_running_average is True


def test_registry_api_errors():
    with pytest.raises(ValueError, match="api"):
        registry.make("bn", api="bogus", num_features=8, rngs=nnx.Rngs(0))
    with pytest.raises(TypeError, match="num_features"):
        registry.make("bn", api="nnx", rngs=nnx.Rngs(0))
    with pytest.raises(TypeError, match="num_features"):
        registry.make("bn", api="linen", num_features=8)
    with pytest.raises(ValueError, match="unknown"):
        registry.make("bogus", api="nnx", num_features=8, rngs=nnx.Rngs(0))


# ------------------------------------------------------------------ flax.nnx signatures
@pytest.mark.parametrize("name", ["BatchNorm", "LayerNorm", "RMSNorm", "GroupNorm",
                                  "InstanceNorm"])
def test_signature_is_flax_nnx_superset(name):
    ours = inspect.signature(getattr(znnx, name)).parameters
    theirs = dict(inspect.signature(getattr(nnx, name).__init__).parameters)
    theirs.pop("self")
    assert set(theirs) <= set(ours), set(theirs) - set(ours)
    order = [p for p in ours if p in theirs]
    assert order == list(theirs)
    for key, p in theirs.items():
        assert ours[key].kind == p.kind, key
        assert ours[key].default is p.default or ours[key].default == p.default, key
    assert "force_float32_reductions" in ours
    # flax.nnx's positional call works here too
    if name == "GroupNorm":
        assert getattr(znnx, name)(8, 4, rngs=nnx.Rngs(0)).num_groups == 4
    layer = getattr(znnx, name)(**{"num_features": 8, "rngs": nnx.Rngs(0)},
                                **({"num_groups": 2} if name == "GroupNorm" else {}))
    assert layer.num_features == 8
    assert math.prod(layer.scale.shape) == 8
