"""Batch Renorm (Ioffe 2017) and ghost batches (Hoffer et al. 2017) against the float64 reference."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import normzoo
import normzoo.functional as F
import normzoo.nnx as znnx
import reference


def _x(rng, shape=(12, 5)):
    return (3.0 + 2.0 * rng.standard_normal(shape)).astype(np.float32)


def _running(rng, c=5):
    return {"mean": rng.standard_normal(c).astype(np.float32),
            "var": (0.5 + rng.random(c)).astype(np.float32),
            "count": jnp.asarray(7, jnp.int32)}


@pytest.mark.parametrize("r_max,d_max", [(1.5, 0.5), (3.0, 5.0), (1.0, 0.0)])
def test_batch_renorm_training_matches_the_paper(rng, r_max, d_max):
    x, stats = _x(rng), _running(rng)
    gamma, beta = rng.standard_normal(5).astype(np.float32), rng.standard_normal(5).astype(np.float32)
    y, new = F.batch_renorm(x, stats, gamma, beta, r_max=r_max, d_max=d_max, momentum=0.9)
    expected, r, d = reference.batch_renorm(x, stats["mean"], stats["var"], r_max, d_max, gamma, beta)
    np.testing.assert_allclose(y, expected, rtol=2e-5, atol=2e-5)
    if r_max > 1:  # the clip is active somewhere, or the test shows nothing
        assert np.any(np.abs(r - 1) > 1e-3) or np.any(np.abs(d) > 1e-3)
    # running statistics: BatchNorm's EMA of the batch statistics; the step counted
    np.testing.assert_allclose(new["mean"], 0.9 * stats["mean"] + 0.1 * x.mean(0), rtol=1e-5)
    np.testing.assert_allclose(new["var"], 0.9 * stats["var"] + 0.1 * x.var(0), rtol=1e-5)
    assert int(new["count"]) == 8


def test_batch_renorm_with_r_max_1_d_max_0_is_batch_norm(rng):
    x = _x(rng)
    variables = normzoo.BatchNorm(use_running_average=False).init(jax.random.key(0), x)
    bn = normzoo.BatchNorm(use_running_average=False, momentum=0.9)
    brn = normzoo.BatchRenorm(use_running_average=False, momentum=0.9, r_max=1.0, d_max=0.0)
    renorm_vars = brn.init(jax.random.key(0), x)
    y_bn, u_bn = bn.apply(variables, x, mutable=["batch_stats"])
    y_brn, u_brn = brn.apply(renorm_vars, x, mutable=["batch_stats"])
    np.testing.assert_allclose(y_brn, y_bn, rtol=1e-5, atol=1e-5)
    for key in ("mean", "var"):  # the batch statistics by another variance plan: rounding
        np.testing.assert_allclose(u_brn["batch_stats"][key], u_bn["batch_stats"][key],
                                   rtol=1e-6, atol=1e-7)
    assert int(u_brn["batch_stats"]["count"]) == 1
    y_eval = brn.clone(use_running_average=True).apply({**renorm_vars, **u_brn}, x)
    y_eval_bn = bn.clone(use_running_average=True).apply({**variables, **u_bn}, x)
    np.testing.assert_allclose(y_eval, y_eval_bn, rtol=1e-6, atol=1e-6)


def test_batch_renorm_gradient_holds_r_and_d_constant(rng, x64):
    x, stats = _x(rng, (6, 3)).astype(np.float64), _running(rng, 3)
    stats = {k: jnp.asarray(v, jnp.float64) if k != "count" else v for k, v in stats.items()}
    c = rng.standard_normal((6, 3))

    def loss(x):
        return jnp.sum(F.batch_renorm(x, stats, r_max=1.2, d_max=0.3)[0] * c)

    def loss_ref(x):  # finite differences of the paper's expression, r and d frozen at x0
        _, r, d = reference.batch_renorm(x0, stats["mean"], stats["var"], 1.2, 0.3)
        mu, sig = x.mean(0), np.sqrt(x.var(0) + 1e-5)
        return np.sum(((x - mu) / sig * r + d) * c)

    x0 = x
    grad = np.asarray(jax.grad(loss)(jnp.asarray(x)))
    h, numeric = 1e-6, np.zeros_like(x)
    for i in np.ndindex(x.shape):
        e = np.zeros_like(x)
        e[i] = h
        numeric[i] = (loss_ref(x + e) - loss_ref(x - e)) / (2 * h)
    np.testing.assert_allclose(grad, numeric, rtol=1e-6, atol=1e-7)


def test_renorm_warmup_is_the_papers_schedule():
    r_max = F.renorm_warmup(1.0, 3.0, 5000, 40000)
    d_max = F.renorm_warmup(0.0, 5.0, 5000, 25000)
    steps = jnp.asarray([0, 5000, 22500, 40000, 90000])
    np.testing.assert_allclose(r_max(steps), [1.0, 1.0, 2.0, 3.0, 3.0], rtol=1e-6)
    np.testing.assert_allclose(d_max(steps), [0.0, 0.0, 4.375, 5.0, 5.0], rtol=1e-6)
    # a schedule at step 0 (r_max 1, d_max 0) is BatchNorm; the step is the stats' count
    x = np.random.default_rng(1).standard_normal((8, 3)).astype(np.float32)
    stats = F.init_batch_renorm_stats(3)
    y, new = F.batch_renorm(x, stats, r_max=r_max, d_max=d_max)
    y_bn, _ = F.batch_norm(x, F.init_batch_stats(3))
    np.testing.assert_allclose(y, y_bn, rtol=1e-5, atol=1e-5)
    assert int(new["count"]) == 1


def test_batch_renorm_under_jit_counts_steps(rng):
    x = _x(rng)
    step = jax.jit(lambda s: F.batch_renorm(x, s, r_max=F.renorm_warmup(1, 3, 0, 4))[1])
    stats = F.init_batch_renorm_stats(5)
    for _ in range(3):
        stats = step(stats)
    assert int(stats["count"]) == 3


@pytest.mark.parametrize("bad", [0.5, -1.0, "3", True])
def test_batch_renorm_rejects_bad_bounds(bad):
    with pytest.raises(ValueError, match="r_max"):
        normzoo.functional.Renorm(r_max=bad)
    with pytest.raises(ValueError, match="d_max"):
        normzoo.functional.Renorm(d_max=-0.5 if bad == 0.5 else bad)


def test_ghost_batches_equal_batch_norm_per_chunk(rng):
    x = _x(rng, (12, 5))
    gamma = rng.standard_normal(5).astype(np.float32)
    stats = F.init_batch_stats(5)
    y, new = F.batch_norm(x, stats, gamma, virtual_batch_size=4, momentum=0.5)
    expected, mean, var = reference.ghost_batch_norm(x, 4, gamma)
    np.testing.assert_allclose(y, expected, rtol=2e-5, atol=2e-5)
    np.testing.assert_allclose(new["mean"], 0.5 * 0 + 0.5 * mean, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(new["var"], 0.5 * 1 + 0.5 * var, rtol=1e-5)
    # inference ignores the chunks
    y_eval, same = F.batch_norm(x, new, gamma, virtual_batch_size=4, train=False)
    np.testing.assert_allclose(y_eval, reference.batch_norm(x, gamma, mean=new["mean"],
                                                            var=new["var"]), rtol=1e-5, atol=1e-5)


def test_ghost_batches_on_images_and_on_batch_renorm(rng):
    x = _x(rng, (8, 3, 3, 4))
    y = normzoo.BatchNorm(use_running_average=False, virtual_batch_size=2)
    variables = y.init(jax.random.key(0), x)
    out, _ = y.apply(variables, x, mutable=["batch_stats"])
    expected = np.concatenate([reference.batch_norm(c) for c in x.reshape(4, 2, 3, 3, 4)])
    np.testing.assert_allclose(out, expected, rtol=3e-5, atol=3e-5)
    brn = normzoo.BatchRenorm(use_running_average=False, virtual_batch_size=2, r_max=1.0,
                              d_max=0.0)
    out_brn, _ = brn.apply(brn.init(jax.random.key(0), x), x, mutable=["batch_stats"])
    np.testing.assert_allclose(out_brn, expected, rtol=3e-5, atol=3e-5)


def test_ghost_batches_need_a_divisor(rng):
    with pytest.raises(ValueError, match="virtual_batch_size=5 must divide"):
        F.batch_norm(_x(rng, (12, 5)), F.init_batch_stats(5), virtual_batch_size=5)
    with pytest.raises(ValueError, match="virtual_batch_size"):
        F.area.Area("layer", virtual_batch_size=4)
    with pytest.raises(ValueError, match="positive int"):
        F.area.batch(virtual_batch_size=0)


def test_ghost_chunks_stay_per_device_running_stats_averaged(rng):
    x = _x(rng, (4, 8, 3))  # 4 devices x 8 samples
    devices = jax.devices()[:4]
    if len(devices) < 4:
        pytest.skip("needs 4 devices")

    def per_device(xd):
        return F.batch_norm(xd, F.init_batch_stats(3), virtual_batch_size=4, momentum=0.0,
                            axis_name="d")

    y, stats = jax.pmap(per_device, axis_name="d", devices=devices)(x)
    for i in range(4):
        expected, _, _ = reference.ghost_batch_norm(x[i], 4)
        np.testing.assert_allclose(y[i], expected, rtol=3e-5, atol=3e-5)
    chunks = x.reshape(4, 2, 4, 3)  # device, chunk, sample, channel
    np.testing.assert_allclose(stats["mean"][0], chunks.mean(2).mean((0, 1)), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(stats["var"][0], chunks.var(2).mean((0, 1)), rtol=1e-5)


def test_nnx_batch_renorm_matches_linen(rng):
    x = _x(rng)
    linen = normzoo.BatchRenorm(use_running_average=False, r_max=1.5, d_max=0.5)
    variables = linen.init(jax.random.key(0), x)
    variables = {"params": variables["params"],
                 "batch_stats": {**variables["batch_stats"], **{
                     k: v for k, v in _running(rng).items()}}}
    y, updates = linen.apply(variables, x, mutable=["batch_stats"])
    model = znnx.linen_to_nnx(variables, znnx.BatchRenorm(5, r_max=1.5, d_max=0.5,
                                                          rngs=nnx.Rngs(0)))
    np.testing.assert_allclose(model(x), y, rtol=1e-6, atol=1e-6)
    assert int(model.count[...]) == int(updates["batch_stats"]["count"]) == 8
    np.testing.assert_allclose(model.var[...], updates["batch_stats"]["var"], rtol=1e-6)


def test_unbiased_running_variance_is_pytorchs(rng):
    """PyTorch stores n / (n - 1) var_B; training still normalizes with the biased var_B."""
    x = _x(rng, (6, 2, 2, 3))  # n = 24 elements per channel
    biased = normzoo.BatchNorm(use_running_average=False, momentum=0.9)
    unbiased = normzoo.BatchNorm(use_running_average=False, momentum=0.9,
                                 unbiased_running_var=True)
    variables = biased.init(jax.random.key(0), x)
    y_b, u_b = biased.apply(variables, x, mutable=["batch_stats"])
    y_u, u_u = unbiased.apply(variables, x, mutable=["batch_stats"])
    np.testing.assert_array_equal(y_u, y_b)
    var = x.reshape(-1, 3).astype(np.float64).var(0, ddof=1)
    np.testing.assert_allclose(u_u["batch_stats"]["var"], 0.9 + 0.1 * var, rtol=1e-6)
    np.testing.assert_allclose(u_u["batch_stats"]["mean"], u_b["batch_stats"]["mean"])
    # in ghost batches n is the chunk's elements; with a mask it is refused
    ghost = normzoo.BatchNorm(use_running_average=False, momentum=0.0, virtual_batch_size=3,
                              unbiased_running_var=True)
    _, u_g = ghost.apply(variables, x, mutable=["batch_stats"])
    chunks = x.reshape(2, 12, 3).astype(np.float64)
    np.testing.assert_allclose(u_g["batch_stats"]["var"], chunks.var(1, ddof=1).mean(0),
                               rtol=1e-5)
    with pytest.raises(ValueError, match="unbiased"):
        unbiased.apply(variables, x, mask=np.ones(x.shape, bool), mutable=["batch_stats"])


@pytest.mark.parametrize("layer", ["BatchNorm", "ZCAWhitening"])
def test_batch_norm_and_whitening_take_every_estimator(rng, layer):
    """estimator='cumulative' (PyTorch's momentum=None) is the plain average of the batches;
    'debiased_ema' equals the first batch after one step; 'population' never updates."""
    batches = [_x(rng, (16, 3)) for _ in range(3)]
    cls = getattr(normzoo, layer)
    key = "var" if layer == "BatchNorm" else "covariance"
    for estimator in ("cumulative", "debiased_ema", "population"):
        module = cls(use_running_average=False, momentum=0.9, estimator=estimator)
        variables = module.init(jax.random.key(0), batches[0])
        initial = variables["batch_stats"][key]
        stats = []
        for x in batches:
            _, updates = module.apply(variables, x, mutable=["batch_stats"])
            variables = {**variables, **updates}
            stats.append(updates["batch_stats"])
        x64 = [b.astype(np.float64) for b in batches]
        second = [b.var(0) for b in x64] if layer == "BatchNorm" else [
            np.cov(b, rowvar=False, bias=True)[None] for b in x64]  # one group (1, C, C)
        if estimator == "cumulative":
            np.testing.assert_allclose(stats[-1][key], np.mean(second, 0), rtol=1e-5, atol=1e-6)
            np.testing.assert_allclose(stats[-1]["mean"], np.mean([b.mean(0) for b in x64], 0),
                                       rtol=1e-5, atol=1e-6)
            assert int(stats[-1]["count"]) == 3
        elif estimator == "debiased_ema":
            np.testing.assert_allclose(stats[0][key], second[0], rtol=1e-5, atol=1e-6)
        else:
            np.testing.assert_array_equal(stats[-1][key], initial)


def test_batch_renorm_estimator_is_ema_only(rng):
    with pytest.raises(ValueError, match="estimator='ema' only"):
        normzoo.BatchRenorm(use_running_average=False, estimator="cumulative").init(
            jax.random.key(0), _x(rng))
