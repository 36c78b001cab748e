"""normzoo.Centering / Scaling / Standardization against float64 numpy from the equations
(Huang et al. 2023 taxonomy), and Standardization(area=...) against the named layers."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import normzoo
import reference
from linen_helpers import TOL, assert_trees_equal

SHAPE = (4, 3, 2, 6)
AXES = {"batch": (0, 1, 2), "layer": (1, 2, 3), "instance": (1, 2)}


def _x(rng, shape=SHAPE, loc=0.8, scale=1.5):
    return (loc + scale * rng.standard_normal(shape)).astype(np.float32)


def _perturb(rng, v):
    return jax.tree_util.tree_map(
        lambda a: jnp.asarray(np.asarray(a) + 0.2 * rng.standard_normal(a.shape), a.dtype), v)


# ---------------------------------------------------------------- Centering
def test_centering_batch_variables_and_train(rng):
    x = _x(rng)
    layer = normzoo.Centering(momentum=0.75)
    v = layer.init(jax.random.key(0), x, use_running_average=False)
    assert jax.tree_util.tree_map(jnp.shape, v) == {"params": {"bias": (6,)}, "batch_stats": {"mean": (6,)}}
    assert v["batch_stats"]["mean"].dtype == jnp.float32
    np.testing.assert_array_equal(v["batch_stats"]["mean"], np.zeros(6))
    np.testing.assert_array_equal(v["params"]["bias"], np.zeros(6))
    v = {"params": {"bias": jnp.asarray(rng.standard_normal(6), jnp.float32)}, "batch_stats": v["batch_stats"]}
    y, upd = layer.apply(v, x, use_running_average=False, mutable=["batch_stats"])
    mean, _ = reference.moments(x, AXES["batch"])
    np.testing.assert_allclose(y, x - mean + np.asarray(v["params"]["bias"]), **TOL)
    np.testing.assert_allclose(upd["batch_stats"]["mean"], 0.25 * mean.ravel(), **TOL)


def test_centering_batch_eval_uses_running_mean(rng):
    x = _x(rng)
    layer = normzoo.Centering(use_running_average=True, use_bias=False)
    run = rng.standard_normal(6).astype(np.float32)
    y = layer.apply({"batch_stats": {"mean": run}}, x)
    np.testing.assert_allclose(y, x - run, **TOL)


def test_centering_layer_area_is_stateless(rng):
    x = _x(rng)
    layer = normzoo.Centering(area="layer", use_bias=False)
    v = layer.init(jax.random.key(0), x)
    assert "batch_stats" not in v
    y = layer.apply(v, x)
    np.testing.assert_allclose(y, x - reference.moments(x, AXES["layer"])[0], **TOL)


def test_centering_mask(rng):
    x = _x(rng)
    m = rng.random(SHAPE) < 0.6
    m[0, 0, 0] = True
    xn = np.where(m, x, np.nan).astype(np.float32)
    layer = normzoo.Centering(use_bias=False, momentum=0.0)
    v = layer.init(jax.random.key(0), x, use_running_average=False)
    y, upd = layer.apply(v, xn, use_running_average=False, mask=m, mutable=["batch_stats"])
    mean, _ = reference.moments(x, AXES["batch"], m)
    np.testing.assert_allclose(np.asarray(y)[m], (x - mean)[m], **TOL)
    np.testing.assert_allclose(upd["batch_stats"]["mean"], mean.ravel(), **TOL)


# ---------------------------------------------------------------- Scaling
def test_scaling_layer_default(rng):
    x = _x(rng)
    layer = normzoo.Scaling()
    v = layer.init(jax.random.key(0), x)
    assert jax.tree_util.tree_map(jnp.shape, v) == {"params": {"scale": (6,)}}
    v = _perturb(rng, v)
    y = layer.apply(v, x)
    ref = x / np.sqrt(reference.mean_square(x, AXES["layer"]) + 1e-6) * np.asarray(v["params"]["scale"])
    np.testing.assert_allclose(y, ref, **TOL)


def test_scaling_default_epsilon(rng):
    x = (1e-3 * rng.standard_normal((4, 8))).astype(np.float32)
    y = normzoo.Scaling(use_scale=False).apply({}, x)
    np.testing.assert_allclose(y, x / np.sqrt(reference.mean_square(x, (1,)) + 1e-6), rtol=1e-4)


def test_scaling_batch_area_running_mean_square(rng):
    x = _x(rng)
    layer = normzoo.Scaling(area="batch", use_scale=False, momentum=0.5)
    v = layer.init(jax.random.key(0), x, use_running_average=False)
    assert set(v["batch_stats"]) == {"mean_square"}
    np.testing.assert_array_equal(v["batch_stats"]["mean_square"], np.ones(6))
    y, upd = layer.apply(v, x, use_running_average=False, mutable=["batch_stats"])
    ms = reference.mean_square(x, AXES["batch"])
    np.testing.assert_allclose(y, x / np.sqrt(ms + 1e-6), **TOL)
    np.testing.assert_allclose(upd["batch_stats"]["mean_square"], 0.5 + 0.5 * ms.ravel(), **TOL)
    y_eval = layer.apply(upd, x, use_running_average=True)
    np.testing.assert_allclose(y_eval, x / np.sqrt(0.5 + 0.5 * ms + 1e-6), **TOL)


def test_scaling_layer_matches_rms_norm(rng):
    x = _x(rng)
    v = {"params": {"scale": jnp.asarray(1 + 0.1 * rng.standard_normal(6), jnp.float32)}}
    y = normzoo.Scaling(area="layer").apply(v, x)
    y_ref = nn.RMSNorm(reduction_axes=(1, 2, 3), feature_axes=-1).apply(v, x)
    np.testing.assert_allclose(y, y_ref, **TOL)


# ---------------------------------------------------------------- Standardization
@pytest.mark.parametrize("area", ["batch", "layer", "instance"])
def test_standardization_numpy(rng, area):
    x = _x(rng)
    kw = dict(use_running_average=False) if area == "batch" else {}
    layer = normzoo.Standardization(area=area, epsilon=1e-3, use_scale=False, use_bias=False)
    v = layer.init(jax.random.key(0), x, **kw)
    out = layer.apply(v, x, mutable=["batch_stats"], **kw)
    y = out[0]
    np.testing.assert_allclose(y, reference.standardize(x, AXES[area], 1e-3), **TOL)


def test_standardization_group_numpy(rng):
    x = _x(rng)
    y = normzoo.Standardization(area="group", num_groups=3, epsilon=1e-3, use_scale=False,
                                use_bias=False).apply({}, x)
    ref = reference.standardize(x.reshape(4, 3, 2, 3, 2), (1, 2, 4), 1e-3).reshape(SHAPE)
    np.testing.assert_allclose(y, ref, **TOL)


@pytest.mark.parametrize("kw", [dict(), dict(momentum=0.9, epsilon=1e-3), dict(feature_axes=(2, 3))])
def test_standardization_batch_equals_batch_norm(rng, kw):
    x = _x(rng)
    bn_kw = dict(kw)
    if "feature_axes" in bn_kw:
        bn_kw["axis"] = bn_kw.pop("feature_axes")
    std = normzoo.Standardization(area="batch", **kw)
    bn = normzoo.BatchNorm(**bn_kw)
    v1 = std.init(jax.random.key(3), x, use_running_average=False)
    v2 = bn.init(jax.random.key(3), x, use_running_average=False)
    assert_trees_equal(v1, v2, exact=True)
    v = _perturb(rng, v2)
    v["batch_stats"]["var"] = jnp.abs(v["batch_stats"]["var"])
    y1, u1 = std.apply(v, x, use_running_average=False, mutable=["batch_stats"])
    y2, u2 = bn.apply(v, x, use_running_average=False, mutable=["batch_stats"])
    np.testing.assert_allclose(y1, y2, **TOL)
    assert_trees_equal(u1, u2, exact=False)
    np.testing.assert_allclose(std.apply(v, x, use_running_average=True),
                               bn.apply(v, x, use_running_average=True), **TOL)
    # and the flax one as well
    y3, _ = nn.BatchNorm(**bn_kw).apply(v, x, use_running_average=False, mutable=["batch_stats"])
    np.testing.assert_allclose(y1, y3, **TOL)


@pytest.mark.parametrize("area,other", [
    ("layer", lambda: nn.LayerNorm(reduction_axes=(1, 2, 3), feature_axes=-1, epsilon=1e-5)),
    ("group", lambda: nn.GroupNorm(num_groups=2, epsilon=1e-5)),
    ("instance", lambda: nn.InstanceNorm(epsilon=1e-5)),
])
def test_standardization_areas_equal_named_layers(rng, area, other):
    x = _x(rng)
    kw = dict(num_groups=2) if area == "group" else {}
    std = normzoo.Standardization(area=area, **kw)
    ref = other()
    v1, v2 = std.init(jax.random.key(1), x), ref.init(jax.random.key(1), x)
    assert_trees_equal(v1, v2, exact=True)
    v = _perturb(rng, v2)
    np.testing.assert_allclose(std.apply(v, x), ref.apply(v, x), **TOL)


def test_standardization_layer_equals_normzoo_layer_norm(rng):
    x = _x(rng)
    v = _perturb(rng, normzoo.LayerNorm().init(jax.random.key(0), x))
    np.testing.assert_allclose(
        normzoo.Standardization(area="layer", epsilon=1e-6).apply(v, x),
        normzoo.LayerNorm(reduction_axes=(1, 2, 3), feature_axes=-1).apply(v, x), **TOL)


def test_taxonomy_layers_bad_area(rng):
    x = _x(rng)
    for cls in (normzoo.Centering, normzoo.Scaling, normzoo.Standardization):
        with pytest.raises(ValueError, match="area"):
            cls(area="positions").init(jax.random.key(0), x, use_running_average=False)


def test_taxonomy_layers_need_use_running_average_only_for_batch(rng):
    x = _x(rng)
    with pytest.raises(ValueError):
        normzoo.Standardization(area="batch").init(jax.random.key(0), x)
    normzoo.Standardization(area="layer").init(jax.random.key(0), x)  # no flag needed


@pytest.mark.parametrize("cls,kw", [(normzoo.Centering, dict(area="batch")),
                                    (normzoo.Scaling, dict(area="batch")),
                                    (normzoo.Standardization, dict(area="group", num_groups=2)),
                                    (normzoo.Scaling, dict(area="layer")),
                                    (normzoo.Standardization, dict(area="batch"))])
def test_taxonomy_layers_check_grads_float64(cls, kw, x64):
    from jax.test_util import check_grads

    x = jnp.asarray(0.5 + np.random.default_rng(0).standard_normal((5, 4)))
    layer = cls(param_dtype=jnp.float64, **kw)
    ura = dict(use_running_average=False) if kw["area"] == "batch" else {}
    v = layer.init(jax.random.key(0), x, **ura)

    @jax.jit
    def f(x, p):
        return layer.apply({**v, "params": p}, x, mutable=["batch_stats"], **ura)[0]

    assert f(x, v["params"]).dtype == jnp.float64
    check_grads(f, (x, v["params"]), order=1, modes=("rev",), atol=1e-5, rtol=1e-5)


def test_taxonomy_layers_jit_and_bf16(rng):
    x = jnp.asarray(_x(rng), jnp.bfloat16)
    for layer in (normzoo.Centering(use_running_average=False), normzoo.Scaling(area="batch", use_running_average=False),
                  normzoo.Standardization(area="batch", use_running_average=False)):
        v = layer.init(jax.random.key(0), x)
        y, upd = jax.jit(lambda v, x, layer=layer: layer.apply(v, x, mutable=["batch_stats"]))(v, x)
        for s in jax.tree_util.tree_leaves(upd):
            assert s.dtype == jnp.float32
        assert np.all(np.isfinite(np.asarray(y, np.float32)))
