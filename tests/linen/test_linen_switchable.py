"""normzoo.linen.switchable.SwitchableNorm and the per-sample whitening presets of
normzoo.linen.whitening (GroupWhitening, InstanceWhitening) as flax.linen modules.

SwitchableNorm: its variables, training / inference against the functional core (itself
checked against the float64 reference in tests/functional/test_f_switchable.py), the limits
where one source dominates against normzoo's InstanceNorm / LayerNorm / BatchNorm layers,
masks, a named axis and errors. The whitening presets: against the float64
references of tests/reference.py (group_whiten, whiten), finite-difference gradients, masks,
bfloat16 and errors.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import normzoo
import reference
from linen_helpers import jit_apply, jit_init
from normzoo.functional.switchable import switchable_norm
from normzoo.linen.switchable import SwitchableNorm
from normzoo.linen.whitening import GroupWhitening, InstanceWhitening

TOL = dict(rtol=2e-5, atol=2e-5)
SHAPE = (3, 2, 3, 4)  # (N, H, W, C)
KEY = jax.random.key(0)
#: The functional core, compiled once per signature.
sn_f = jax.jit(switchable_norm, static_argnames=("train", "momentum"))


def _x(seed=0, shape=SHAPE, loc=0.5, scale=1.5, dtype=np.float32):
    r = np.random.default_rng(seed)
    return (loc + scale * r.standard_normal(shape)).astype(dtype)


def _params(c=4, seed=1):
    """Random SwitchableNorm params (numpy: nothing to compile)."""
    r = np.random.default_rng(seed)
    return {"scale": (1 + 0.3 * r.standard_normal(c)).astype(np.float32),
            "bias": (0.3 * r.standard_normal(c)).astype(np.float32),
            "mean_weight": r.standard_normal(3).astype(np.float32),
            "var_weight": r.standard_normal(3).astype(np.float32)}


def _stats(c=4, seed=2):
    r = np.random.default_rng(seed)
    return {"mean": (0.2 * r.standard_normal(c)).astype(np.float32),
            "var": (0.5 + r.random(c)).astype(np.float32)}


def _args(p):
    return p["scale"], p["bias"], p["mean_weight"], p["var_weight"]


def _train(layer, variables, x, **kw):
    y, upd = layer.apply(variables, x, use_running_average=False, mutable=["batch_stats"], **kw)
    return y, upd["batch_stats"]


# ---------------------------------------------------------------- SwitchableNorm
def test_variables_names_shapes_dtypes_and_initial_values():
    variables = jit_init(SwitchableNorm(), KEY, _x(), use_running_average=False)
    assert jax.tree.map(np.shape, variables) == {
        "params": {"scale": (4,), "bias": (4,), "mean_weight": (3,), "var_weight": (3,)},
        "batch_stats": {"mean": (4,), "var": (4,)}}
    p, s = variables["params"], variables["batch_stats"]
    np.testing.assert_array_equal(p["scale"], np.ones(4))
    np.testing.assert_array_equal(p["bias"], np.zeros(4))
    np.testing.assert_array_equal(p["mean_weight"], np.zeros(3))
    np.testing.assert_array_equal(p["var_weight"], np.zeros(3))
    np.testing.assert_array_equal(s["mean"], np.zeros(4))
    np.testing.assert_array_equal(s["var"], np.ones(4))
    assert all(v.dtype == jnp.float32 for v in jax.tree.leaves(variables))
    # params in param_dtype, statistics float32; no scale / bias when asked
    layer = SwitchableNorm(param_dtype=jnp.bfloat16, use_bias=False, use_scale=False)
    variables = jax.eval_shape(lambda: layer.init(KEY, _x(), use_running_average=False))
    assert set(variables["params"]) == {"mean_weight", "var_weight"}
    assert variables["params"]["mean_weight"].dtype == jnp.bfloat16
    assert variables["batch_stats"]["var"].dtype == jnp.float32


def test_train_and_eval_equal_the_functional_core():
    layer = SwitchableNorm(momentum=0.8)
    fixed = SwitchableNorm(use_running_average=True, momentum=0.8)  # the field, as BatchNorm's
    x, x2 = _x(), _x(2, loc=-1.0)
    params, stats = _params(), _stats()

    @jax.jit
    def run(x, x2):
        y, new = _train(layer, {"params": params, "batch_stats": stats}, x)
        trained = {"params": params, "batch_stats": new}
        y_eval = layer.apply(trained, x2, use_running_average=True)
        y_fixed, same = fixed.apply(trained, x2, mutable=["batch_stats"])
        return y, new, y_eval, y_fixed, same["batch_stats"]

    y, new, y_eval, y_fixed, same = run(x, x2)
    y_f, new_f = sn_f(x, stats, *_args(params), train=True, momentum=0.8)
    np.testing.assert_allclose(y, y_f, **TOL)
    for k in stats:
        np.testing.assert_allclose(new[k], new_f[k], **TOL)
        np.testing.assert_array_equal(same[k], new[k])  # inference updates nothing
    y_eval_f, _ = sn_f(x2, new_f, *_args(params), train=False, momentum=0.8)
    np.testing.assert_allclose(y_eval, y_eval_f, **TOL)
    np.testing.assert_allclose(y_fixed, y_eval, **TOL)
    assert not np.allclose(y_eval, sn_f(x2, new_f, *_args(params), train=True,
                                        momentum=0.8)[0], atol=1e-3)
    with pytest.raises(ValueError, match="use_running_average"):
        jax.eval_shape(lambda: SwitchableNorm().init(KEY, x))


def test_one_dominant_source_equals_that_layer():
    """mean_weight = var_weight = 20 e_k: InstanceNorm (k = 0), LayerNorm over every non-batch
    axis (k = 1), BatchNorm (k = 2; training and inference) with the same params."""
    x = _x(3)
    sn = SwitchableNorm(momentum=0.9)
    params, stats = _params(), _stats()
    affine = {"params": {"scale": params["scale"], "bias": params["bias"]}}
    layers = [normzoo.InstanceNorm(epsilon=1e-5),
              normzoo.LayerNorm(epsilon=1e-5, reduction_axes=(1, 2, 3), feature_axes=-1)]
    bn = normzoo.BatchNorm(momentum=0.9)

    @jax.jit
    def run(x):
        out = []
        for k in range(3):
            w = 20.0 * jnp.eye(3)[k]
            v = {"params": {**params, "mean_weight": w, "var_weight": w}, "batch_stats": stats}
            out.append((_train(sn, v, x), sn.apply(v, x, use_running_average=True)))
        refs = [layer.apply(affine, x) for layer in layers]
        bn_vars = {**affine, "batch_stats": stats}
        refs.append((_train(bn, bn_vars, x), bn.apply(bn_vars, x, use_running_average=True)))
        return out, refs

    out, refs = run(x)
    tol = dict(rtol=1e-5, atol=1e-5)
    for k in range(2):  # per-sample sources: the same in training and inference
        (y_train, _), y_eval = out[k]
        np.testing.assert_allclose(y_train, refs[k], **tol)
        np.testing.assert_allclose(y_eval, refs[k], **tol)
    ((y_train, new), y_eval), ((bn_train, bn_new), bn_eval) = out[2], refs[2]
    np.testing.assert_allclose(y_train, bn_train, **tol)
    np.testing.assert_allclose(y_eval, bn_eval, **tol)
    for k in stats:
        np.testing.assert_allclose(new[k], bn_new[k], **tol)


def test_mask_and_axis_name():
    """The mask reaches the functional core; under vmap with axis_name, BN's statistics span
    the 'devices' (init included, as flax.linen.BatchNorm). (bfloat16: tests/nnx.)"""
    x = _x(4, (4, 2, 3, 4))
    mask = np.ones((4, 2, 3, 1), bool)
    mask[0, 1] = False
    layer = SwitchableNorm(momentum=0.5)
    shared = SwitchableNorm(momentum=0.5, axis_name="d")
    params, stats = _params(), _stats()
    variables = {"params": params, "batch_stats": stats}

    @jax.jit
    def run(x, mask):
        def one(xs):
            v = shared.init(KEY, xs, use_running_average=False)
            return _train(shared, {**v, "params": params}, xs)

        on_devices = jax.vmap(one, axis_name="d")(x.reshape((2, 2) + x.shape[1:]))
        return (_train(layer, variables, x, mask=mask), on_devices,
                sn_f(x, stats, *_args(params), mask=mask, momentum=0.5),
                sn_f(x, {k: jnp.ones(4) * (k == "var") for k in stats}, *_args(params),
                     momentum=0.5))

    (y, new), (ys, upd), (y_f, new_f), (y_all, new_all) = run(x, mask)
    np.testing.assert_allclose(y, y_f, **TOL)
    np.testing.assert_allclose(new["var"], new_f["var"], **TOL)
    np.testing.assert_allclose(ys.reshape(x.shape), y_all, **TOL)
    np.testing.assert_allclose(upd["var"][1], new_all["var"], **TOL)  # fresh init: 0, 1


@pytest.mark.parametrize("kwargs, match", [
    (dict(epsilon=-1e-3), "epsilon"),
    (dict(momentum=2.0), "momentum"),
    (dict(axis=5), "axis=5"),
    (dict(axis=0), "batch axis"),
])
def test_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        jax.eval_shape(lambda: SwitchableNorm(**kwargs).init(KEY, _x(), use_running_average=False))


# ---------------------------------------------------------------- GroupWhitening
def _affine(c, seed=3):
    p = _params(c, seed)
    return {"scale": p["scale"], "bias": p["bias"]}


def test_group_whitening_matches_reference():
    """zca and newton against tests/reference.py's group_whiten; the variables; whitened group
    rows of identity covariance."""
    x = _x(7, (3, 4, 4, 8))
    variables = jax.eval_shape(lambda: GroupWhitening(num_groups=4).init(KEY, x))
    assert jax.tree.map(np.shape, variables) == {"params": {"scale": (8,), "bias": (8,)}}
    params = _affine(8)
    methods = ("zca", "newton")
    bare = GroupWhitening(num_groups=4, use_scale=False, use_bias=False)

    @jax.jit
    def run(x):
        return ([GroupWhitening(num_groups=4, method=m).apply({"params": params}, x)
                 for m in methods], bare.apply({}, x))

    ys, y = run(x)
    for method, got in zip(methods, ys, strict=True):
        expected = reference.affine(reference.group_whiten(x, 4, method), params["scale"],
                                    params["bias"])
        np.testing.assert_allclose(got, expected, rtol=2e-4, atol=2e-4, err_msg=method)
    rows = np.moveaxis(np.asarray(y, np.float64).reshape(3, 16, 4, 2), 2, 1).reshape(3, 4, -1)
    for r in rows:
        np.testing.assert_allclose(r @ r.T / r.shape[1], np.eye(4), atol=1e-3)


def test_group_whitening_num_groups_default_and_errors():
    """Default 64 groups, reduced to C when there are fewer channels (the official code);
    otherwise num_groups must divide C."""
    x = _x(8, (2, 3, 3, 8))
    assert GroupWhitening().num_groups == 64
    y = jit_apply(GroupWhitening(use_scale=False, use_bias=False), {}, x)
    np.testing.assert_allclose(y, reference.group_whiten(x, 8), rtol=2e-4, atol=2e-4)
    for kwargs, match in ((dict(num_groups=3), "num_groups=3"), (dict(method="svd"), "method"),
                          (dict(epsilon=-1.0), "epsilon")):
        with pytest.raises(ValueError, match=match):
            jax.eval_shape(lambda kwargs=kwargs: GroupWhitening(**kwargs).init(KEY, x))


def test_group_whitening_gradients_match_finite_differences(x64):
    x = _x(9, (2, 2, 2, 4)).astype(np.float64)
    c = np.random.default_rng(10).standard_normal(x.shape)
    layer = GroupWhitening(num_groups=2, use_scale=False, use_bias=False)
    grad = jax.jit(jax.grad(lambda x: jnp.sum(c * layer.apply({}, x)) ** 2))(jnp.asarray(x))
    assert grad.dtype == jnp.float64

    def loss_ref(x):
        return np.sum(c * reference.group_whiten(x, 2)) ** 2

    h, fd = 1e-6, np.empty(x.size)
    for j in range(x.size):
        e = np.zeros(x.size)
        e[j] = h
        fd[j] = (loss_ref(x + e.reshape(x.shape)) - loss_ref(x - e.reshape(x.shape))) / (2 * h)
    np.testing.assert_allclose(grad, fd.reshape(x.shape), rtol=1e-5, atol=1e-6)


def test_group_whitening_bfloat16():
    """bf16 input: float32 statistics, output promoted with the float32 params (flax.linen's
    rule); ``dtype=bfloat16`` gives a bf16 output."""
    x = _x(11, (2, 4, 4, 8))
    variables = {"params": {"scale": np.ones(8, np.float32), "bias": np.zeros(8, np.float32)}}

    @jax.jit
    def run(x):
        return (GroupWhitening(num_groups=4).apply(variables, x.astype(jnp.bfloat16)),
                GroupWhitening(num_groups=4, dtype=jnp.bfloat16).apply(variables, x))

    y, y16 = run(x)
    assert y.dtype == jnp.float32 and y16.dtype == jnp.bfloat16
    expected = reference.group_whiten(x, 4)
    np.testing.assert_allclose(np.asarray(y16, np.float32), expected, rtol=3e-2, atol=3e-2)
    np.testing.assert_allclose(y, expected, rtol=3e-2, atol=3e-2)


# ---------------------------------------------------------------- InstanceWhitening
def _instance_ref(x, group_size=None, method="zca", iterations=5, mask=None):
    """Per sample: reference.whiten of its positions (rows) x channels."""
    c = x.shape[-1]
    out = []
    for i in range(x.shape[0]):
        rows = reference.as64(x[i]).reshape(-1, c)
        m = None if mask is None else np.asarray(mask[i]).reshape(-1)
        out.append(reference.whiten(rows, method, group_size, iterations=iterations,
                                    mask=m).reshape(x.shape[1:]))
    return np.stack(out)


def test_instance_whitening_matches_reference():
    """Default (16 per group: one group of 8 channels), groups of 4 by Cholesky, Newton with 7
    iterations; per sample, over its positions."""
    x = _x(12, (2, 4, 5, 8))
    variables = jax.eval_shape(lambda: InstanceWhitening().init(KEY, x))
    assert jax.tree.map(np.shape, variables) == {"params": {"scale": (8,), "bias": (8,)}}
    params = _affine(8)
    cases = [({}, dict()), (dict(group_size=4, method="cholesky"),
                            dict(group_size=4, method="cholesky")),
             (dict(group_size=None, method="newton", iterations=7),
              dict(method="newton", iterations=7))]

    @jax.jit
    def run(x):
        return [InstanceWhitening(**kw).apply({"params": params}, x) for kw, _ in cases]

    for got, (_, ref_kw) in zip(run(x), cases, strict=True):
        expected = reference.affine(_instance_ref(x, **ref_kw), params["scale"], params["bias"])
        np.testing.assert_allclose(got, expected, rtol=2e-4, atol=2e-4, err_msg=str(ref_kw))


def test_instance_whitening_mask_and_errors():
    x = _x(13, (2, 4, 5, 8))
    mask = np.ones((2, 4, 5, 1), bool)
    mask[0, :2] = False  # padding positions of sample 0
    layer = InstanceWhitening(use_scale=False, use_bias=False)
    y = jit_apply(layer, {}, x, mask=mask)
    np.testing.assert_allclose(y, _instance_ref(x, mask=mask), rtol=2e-4, atol=2e-4)
    for bad, shape, match in (
            (layer, (4, 8), "feature_axes"),  # (N, C): no positions to whiten over
            (InstanceWhitening(feature_axes=0), x.shape, "batch axis"),
            (InstanceWhitening(group_size=0), x.shape, "group_size=0")):
        with pytest.raises(ValueError, match=match):
            jax.eval_shape(lambda bad=bad, shape=shape: bad.init(KEY, jnp.zeros(shape)))
