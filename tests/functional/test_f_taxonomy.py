"""normzoo.functional.normalize: area x operation, against float64 numpy from the table in
Huang et al. 2023 (arXiv 2009.12836), section 1 of REFERENCES.md."""

import jax.numpy as jnp
import numpy as np
import pytest

import normzoo.functional as F
import reference

TOL = dict(rtol=2e-5, atol=2e-5)
SHAPE = (4, 3, 2, 6)  # N, H, W, C
EPS = 1e-3
# reduction axes of each area for SHAPE with feature_axes=-1
AREA_AXES = {"batch": (0, 1, 2), "layer": (1, 2, 3), "instance": (1, 2)}


def _x(rng, shape=SHAPE):
    return (0.7 + 1.5 * rng.standard_normal(shape)).astype(np.float32)


def _stats(operation, fshape=(6,)):
    return {
        "center": {"mean": jnp.zeros(fshape)},
        "scale": {"mean_square": jnp.ones(fshape)},
        "standardize": {"mean": jnp.zeros(fshape), "var": jnp.ones(fshape)},
    }[operation]


REFS = {
    "center": lambda x, axes: reference.center(x, axes),
    "scale": lambda x, axes: reference.scale(x, axes, EPS),
    "standardize": lambda x, axes: reference.standardize(x, axes, EPS),
}


@pytest.mark.parametrize("operation", ["center", "scale", "standardize"])
@pytest.mark.parametrize("area", ["layer", "instance"])
def test_stateless_areas(rng, area, operation):
    x = _x(rng)
    y, stats = F.normalize(x, None, area=area, operation=operation, epsilon=EPS)
    assert stats is None
    np.testing.assert_allclose(y, REFS[operation](x, AREA_AXES[area]), **TOL)


@pytest.mark.parametrize("operation", ["center", "scale", "standardize"])
def test_group_area(rng, operation):
    x = _x(rng)
    y, stats = F.normalize(x, None, area="group", operation=operation, num_groups=3, epsilon=EPS)
    assert stats is None
    xg = x.reshape(4, 3, 2, 3, 2)
    ref = REFS[operation](xg, (1, 2, 4)).reshape(SHAPE)
    np.testing.assert_allclose(y, ref, **TOL)
    y2, _ = F.normalize(x, None, area="group", operation=operation, group_size=2, epsilon=EPS)
    np.testing.assert_allclose(y2, y, **TOL)


def test_group_standardize_equals_group_norm(rng):
    x = _x(rng)
    y, _ = F.normalize(x, area="group", operation="standardize", num_groups=2, epsilon=EPS)
    np.testing.assert_allclose(y, reference.group_norm(x, 2, eps=EPS), **TOL)
    np.testing.assert_allclose(y, F.group_norm(x, num_groups=2, epsilon=EPS), **TOL)


@pytest.mark.parametrize("operation", ["center", "scale", "standardize"])
def test_batch_area_train_updates_running_stats(rng, operation):
    x = _x(rng)
    stats = _stats(operation)
    y, new = F.normalize(x, stats, area="batch", operation=operation, train=True,
                         momentum=0.75, epsilon=EPS)
    np.testing.assert_allclose(y, REFS[operation](x, AREA_AXES["batch"]), **TOL)
    assert set(new) == set(stats)
    mean, var = reference.moments(x, (0, 1, 2))
    if "mean" in new:
        np.testing.assert_allclose(new["mean"], 0.25 * mean.ravel(), **TOL)
    if "var" in new:
        np.testing.assert_allclose(new["var"], 0.75 + 0.25 * var.ravel(), **TOL)
    if "mean_square" in new:
        ms = (x.astype(np.float64) ** 2).mean((0, 1, 2))
        np.testing.assert_allclose(new["mean_square"], 0.75 + 0.25 * ms, **TOL)
    for v in new.values():
        assert v.dtype == jnp.float32


@pytest.mark.parametrize("operation", ["center", "scale", "standardize"])
def test_batch_area_eval_uses_running_stats(rng, operation):
    x = _x(rng)
    fs = (6,)
    stats = {
        "center": {"mean": rng.standard_normal(fs).astype(np.float32)},
        "scale": {"mean_square": (0.5 + rng.random(fs)).astype(np.float32)},
        "standardize": {"mean": rng.standard_normal(fs).astype(np.float32),
                        "var": (0.5 + rng.random(fs)).astype(np.float32)},
    }[operation]
    y, new = F.normalize(x, stats, area="batch", operation=operation, train=False, epsilon=EPS)
    x64 = x.astype(np.float64)
    if operation == "center":
        ref = x64 - stats["mean"]
    elif operation == "scale":
        ref = x64 / np.sqrt(stats["mean_square"] + EPS)
    else:
        ref = (x64 - stats["mean"]) / np.sqrt(stats["var"] + EPS)
    np.testing.assert_allclose(y, ref, **TOL)
    for k in stats:
        np.testing.assert_array_equal(new[k], stats[k])


def test_batch_area_standardize_equals_batch_norm(rng):
    x = _x(rng)
    scale = (1 + 0.1 * rng.standard_normal(6)).astype(np.float32)
    bias = (0.1 * rng.standard_normal(6)).astype(np.float32)
    stats = F.init_batch_stats((6,))
    y1, s1 = F.normalize(x, stats, scale, bias, area="batch", operation="standardize", momentum=0.9)
    y2, s2 = F.batch_norm(x, stats, scale, bias, momentum=0.9)
    np.testing.assert_allclose(y1, y2, **TOL)
    np.testing.assert_allclose(s1["mean"], s2["mean"], **TOL)
    np.testing.assert_allclose(s1["var"], s2["var"], **TOL)


def test_layer_standardize_with_affine_equals_layer_norm(rng):
    x = _x(rng)
    scale = (1 + 0.1 * rng.standard_normal(6)).astype(np.float32)
    bias = (0.1 * rng.standard_normal(6)).astype(np.float32)
    y, _ = F.normalize(x, None, scale, bias, area="layer", operation="standardize", epsilon=1e-6)
    ref = F.layer_norm(x, scale, bias, reduction_axes=(1, 2, 3), feature_axes=-1, epsilon=1e-6)
    np.testing.assert_allclose(y, ref, **TOL)


def test_batch_area_multiple_feature_axes(rng):
    x = _x(rng)
    stats = {"mean": jnp.zeros((2, 6)), "var": jnp.ones((2, 6))}
    y, new = F.normalize(x, stats, area="batch", operation="standardize", feature_axes=(2, 3),
                         momentum=0.0, epsilon=EPS)
    np.testing.assert_allclose(y, reference.standardize(x, (0, 1), EPS), **TOL)
    np.testing.assert_allclose(new["var"], reference.moments(x, (0, 1))[1][0, 0], **TOL)


def test_masked_layer_area(rng):
    x = _x(rng)
    mask = rng.random(SHAPE) < 0.7
    mask[:, 0, 0, :2] = True
    xn = np.where(mask, x, np.nan).astype(np.float32)
    y, _ = F.normalize(xn, None, area="layer", operation="standardize", mask=mask, epsilon=EPS)
    ref = reference.standardize(x, (1, 2, 3), EPS, mask)
    np.testing.assert_allclose(np.asarray(y)[mask], ref[mask], **TOL)


@pytest.mark.parametrize("bad", ["positions", "Batch", "", "layers"])
def test_bad_area_names_the_argument(rng, bad):
    x = _x(rng)
    with pytest.raises(ValueError, match="area") as info:
        F.normalize(x, None, area=bad, operation="standardize")
    assert repr(bad) in str(info.value) or bad in str(info.value)


@pytest.mark.parametrize("bad", ["whiten_pca", "standardise", ""])
def test_bad_operation_names_the_argument(rng, bad):
    x = _x(rng)
    with pytest.raises(ValueError, match="operation") as info:
        F.normalize(x, None, area="layer", operation=bad)
    assert repr(bad) in str(info.value) or bad in str(info.value)
