"""The engine: new points of the taxonomy in a few lines, estimators, bad batches and errors."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import normzoo
import normzoo.functional as F
from normzoo.functional import area
import reference

TOL = dict(rtol=1e-4, atol=1e-4)


def _x(rng, shape, loc=0.3, scale=1.5):
    return (loc + scale * rng.standard_normal(shape)).astype(np.float32)


# ------------------------------------------------------------ worked examples (docs/design.md)
def test_worked_example_group_whitening(rng):
    # Group whitening (Huang et al. CVPR 2021): group area + ZCA whitening, per sample.
    group_whitening = F.Normalizer(area.group(num_groups=4), F.Whiten("zca"))
    x = _x(rng, (3, 5, 5, 8))
    y, _ = group_whitening.apply(x)
    np.testing.assert_allclose(y, reference.group_whiten(x, 4, "zca"), rtol=2e-3, atol=2e-3)
    # Whitened: each sample's 4 group rows have identity covariance.
    rows = np.moveaxis(np.asarray(y, np.float64)[0].reshape(-1, 4, 2), 1, 0).reshape(4, -1)
    np.testing.assert_allclose(np.cov(rows, bias=True), np.eye(4), atol=2e-3)


def test_worked_example_layer_centering(rng):
    # Layer centering: layer area + center, no running statistics (mean-only LayerNorm).
    layer_centering = F.Normalizer(area.layer(), F.CENTER)
    x = _x(rng, (4, 6, 3))
    bias = rng.standard_normal(3).astype(np.float32)
    y, stats = layer_centering.apply(x, bias=bias)
    assert stats is None
    np.testing.assert_allclose(y, reference.center(x, (1, 2)) + bias, **TOL)


def test_position_area_equals_layer_norm_over_channels(rng):
    x = _x(rng, (2, 4, 4, 6))
    y, _ = F.Normalizer(area.position(), F.STANDARDIZE, reduction=F.Reduction(1e-6)).apply(x)
    np.testing.assert_allclose(y, F.layer_norm(x), **TOL)


def test_instance_whitening_per_sample(rng):
    x = _x(rng, (2, 16, 3))
    y, _ = F.Normalizer(area.instance(), F.Whiten("cholesky")).apply(x)
    for n in range(2):
        np.testing.assert_allclose(y[n], reference.whiten(x[n], "cholesky"), rtol=2e-3, atol=2e-3)


def test_running_estimator_needs_a_shared_area(rng):
    with pytest.raises(ValueError, match=r"estimator EMA keeps running statistics.*area='group'"):
        F.Normalizer(area.group(2), estimator=F.EMA(0.9)).init_stats((2, 4))


# ------------------------------------------------------------ estimators
def _run(estimator, batches, init=None):
    norm = F.Normalizer(area.batch(), F.STANDARDIZE, estimator=estimator)
    stats = norm.init_stats(batches[0].shape) if init is None else init
    for b in batches:
        _, stats = norm.apply(b, stats)
    return stats


@pytest.mark.parametrize("name", ["ema", "debiased_ema", "cumulative"])
def test_estimators_against_reference(rng, name):
    batches = [_x(rng, (16, 3), loc=2.0 + i) for i in range(4)]
    m = 0.8
    estimator = {"ema": F.EMA(m), "debiased_ema": F.DebiasedEMA(m), "cumulative": F.Cumulative()}[name]
    stats = _run(estimator, batches)
    update = {
        "ema": lambda r, b, t: reference.ema(r, b, m),
        "debiased_ema": lambda r, b, t: reference.debiased_ema(r, b, m, t),
        "cumulative": lambda r, b, t: reference.cumulative(r, b, t),
    }[name]
    means = [reference.moments(b, (0,))[0].ravel() for b in batches]
    variances = [reference.moments(b, (0,))[1].ravel() for b in batches]
    np.testing.assert_allclose(stats["mean"], reference.run_estimator(means, np.zeros(3), update),
                               **TOL)
    np.testing.assert_allclose(stats["var"], reference.run_estimator(variances, np.ones(3), update),
                               **TOL)
    if name != "ema":
        assert int(stats["count"]) == 4


def test_debiased_ema_is_the_first_batch_after_one_step(rng):
    b = _x(rng, (32, 3), loc=5.0)
    stats = _run(F.DebiasedEMA(0.99), [b])
    mean, var = reference.moments(b, (0,))
    np.testing.assert_allclose(stats["mean"], mean.ravel(), rtol=1e-5)
    np.testing.assert_allclose(stats["var"], var.ravel(), rtol=1e-4)


def test_population_estimator_normalizes_with_given_statistics_in_training(rng):
    x = _x(rng, (8, 3))
    stats = {"mean": jnp.full((3,), 0.5), "var": jnp.full((3,), 4.0)}
    norm = F.Normalizer(area.batch(), F.STANDARDIZE, estimator=F.Population())
    y, new = norm.apply(x, stats, train=True)
    np.testing.assert_allclose(y, (x - 0.5) / np.sqrt(4.0 + 1e-5), **TOL)
    assert new is stats


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_skip_nonfinite_keeps_running_statistics(rng, bad):
    x = _x(rng, (8, 3))
    x[2, 1] = bad
    stats = F.init_batch_stats((3,))
    stats = {"mean": stats["mean"] + 0.25, "var": stats["var"] * 2.0}
    _, kept = F.batch_norm(x, stats, skip_nonfinite=True, momentum=0.9)
    for k in stats:
        np.testing.assert_array_equal(kept[k], stats[k])
    _, poisoned = F.batch_norm(x, stats, momentum=0.9)  # default: as flax, the NaN goes in
    assert not np.isfinite(np.asarray(poisoned["mean"])).all()
    _, updated = F.batch_norm(np.nan_to_num(x, posinf=0.0), stats, skip_nonfinite=True,
                              momentum=0.9)
    assert not np.allclose(updated["mean"], stats["mean"])


def test_skip_nonfinite_on_the_linen_layer(rng):
    x = _x(rng, (8, 3))
    layer = normzoo.Standardization(area="batch", skip_nonfinite=True, momentum=0.9)
    variables = layer.init(jax.random.key(0), x, use_running_average=False)
    _, updates = layer.apply(variables, x * np.nan, use_running_average=False,
                             mutable=["batch_stats"])
    jax.tree.map(np.testing.assert_array_equal, updates["batch_stats"],
                 variables["batch_stats"])


@pytest.mark.parametrize("estimator", ["debiased_ema", "cumulative"])
def test_taxonomy_layer_estimators_keep_a_count(rng, estimator):
    x = _x(rng, (8, 3))
    layer = normzoo.Centering(estimator=estimator)
    variables = layer.init(jax.random.key(0), x, use_running_average=False)
    assert set(variables["batch_stats"]) == {"mean", "count"}
    _, updates = layer.apply(variables, x, use_running_average=False, mutable=["batch_stats"])
    assert int(updates["batch_stats"]["count"]) == 1
    np.testing.assert_allclose(updates["batch_stats"]["mean"], x.mean(0), **TOL)


def test_unknown_estimator_names_the_argument():
    with pytest.raises(ValueError, match=r"estimator='emaa' is unknown"):
        normzoo.Centering(estimator="emaa").init(jax.random.key(0), jnp.ones((4, 3)),
                                                 use_running_average=False)


# ------------------------------------------------------------ bad batches
LAYERS = [
    (normzoo.BatchNorm, nn.BatchNorm, dict(use_running_average=False)),
    (normzoo.LayerNorm, nn.LayerNorm, {}),
    (normzoo.GroupNorm, nn.GroupNorm, dict(num_groups=2)),
    (normzoo.InstanceNorm, nn.InstanceNorm, {}),
    (normzoo.RMSNorm, nn.RMSNorm, {}),
]


@pytest.mark.parametrize("ours, theirs, kw", LAYERS, ids=lambda v: getattr(v, "__name__", ""))
def test_empty_batch_gives_an_empty_output_and_keeps_statistics(rng, ours, theirs, kw):
    x = _x(rng, (3, 5, 4))
    empty = jnp.zeros((0, 5, 4))
    variables = ours(**kw).init(jax.random.key(0), x)
    y, updates = ours(**kw).apply(variables, empty, mutable=["batch_stats"])
    flax_y, _ = theirs(**kw).apply(theirs(**kw).init(jax.random.key(0), x), empty,
                                   mutable=["batch_stats"])
    assert y.shape == flax_y.shape == (0, 5, 4) and y.dtype == flax_y.dtype
    jax.tree.map(np.testing.assert_array_equal, dict(updates).get("batch_stats", {}),
                 dict(variables).get("batch_stats", {}))


@pytest.mark.parametrize("cls, kw", [
    (normzoo.Centering, dict(use_running_average=False)),
    (normzoo.ZCAWhitening, dict(use_running_average=False)),
])
def test_empty_batch_of_taxonomy_and_whitening_layers(rng, cls, kw):
    variables = cls().init(jax.random.key(0), _x(rng, (6, 4)), **kw)
    y, updates = cls().apply(variables, jnp.zeros((0, 4)), mutable=["batch_stats"], **kw)
    assert y.shape == (0, 4)
    jax.tree.map(np.testing.assert_array_equal, updates["batch_stats"], variables["batch_stats"])


def test_empty_batch_functional_center():
    y, stats = F.normalize(jnp.zeros((0, 4)), area="layer", operation="center")
    assert y.shape == (0, 4) and stats is None


def test_empty_reduction_area_names_axes_and_shape():
    with pytest.raises(ValueError, match=r"span axes \(1,\) of an input of shape \(3, 0\)"):
        F.layer_norm(jnp.zeros((3, 0)))


def test_moments_over_no_elements():
    with pytest.raises(ValueError, match=r"axes=\(0,\) of an input of shape \(0, 4\) hold no"):
        F.moments(jnp.zeros((0, 4)), 0)


# ------------------------------------------------------------ errors
NEGATIVE_EPSILON = [
    (normzoo.BatchNorm, dict(use_running_average=False)),
    (normzoo.LayerNorm, {}),
    (normzoo.GroupNorm, dict(num_groups=2)),
    (normzoo.InstanceNorm, {}),
    (normzoo.RMSNorm, {}),
    (normzoo.Centering, dict(use_running_average=False)),
    (normzoo.Scaling, {}),
    (normzoo.Standardization, dict(use_running_average=False)),
    (normzoo.ZCAWhitening, dict(use_running_average=False)),
    (normzoo.IterNorm, dict(use_running_average=False)),
]


@pytest.mark.parametrize("cls, kw", NEGATIVE_EPSILON, ids=lambda v: getattr(v, "__name__", ""))
def test_negative_epsilon_is_refused_by_every_layer(cls, kw):
    call = {k: v for k, v in kw.items() if k == "use_running_average"}
    fields = {k: v for k, v in kw.items() if k != "use_running_average"}
    with pytest.raises(ValueError, match=r"epsilon=-0.001 must be a float >= 0"):
        cls(epsilon=-1e-3, **fields).init(jax.random.key(0), jnp.ones((4, 4)), **call)


@pytest.mark.parametrize("fn", [F.layer_norm, F.rms_norm, F.instance_norm,
                                lambda x, epsilon: F.group_norm(x, num_groups=2, epsilon=epsilon)])
def test_negative_epsilon_is_refused_by_the_functions(fn):
    with pytest.raises(ValueError, match="epsilon=-1.0 must be"):
        fn(jnp.ones((4, 4)), epsilon=-1.0)


def test_instance_norm_batch_axis_error_has_flax_sentence():
    with pytest.raises(ValueError, match="The channel axes cannot include the leading dimension "
                       "as this is assumed to be the batch axis."):
        normzoo.InstanceNorm(feature_axes=(0, -1)).init(jax.random.key(0), jnp.ones((2, 3, 4)))


def test_params_of_the_wrong_shape_name_the_param(rng):
    with pytest.raises(ValueError, match=r"scale has shape \(3,\); expected \(4,\)"):
        F.layer_norm(_x(rng, (2, 4)), jnp.ones(3))


def test_stats_for_a_stateless_area_are_refused(rng):
    with pytest.raises(ValueError, match="stats must be None"):
        F.normalize(_x(rng, (2, 4)), F.init_batch_stats((4,)), area="layer")
