"""normzoo.functional.switchable (Switchable Normalization, Luo et al. ICLR 2019) against a
float64 NumPy reference written from the paper's equations, by value (training, masks,
running statistics, inference), by finite-difference gradients, under jit / vmap / a named
axis, in bfloat16, and every error message. The limits where one source's weight dominates
(IN, LN, BN) are checked against normzoo's layers in tests/linen/test_linen_switchable.py.

Reference (x of shape (N, H, W, C)): ``mu_k``, ``var_k`` (biased) over the spatial axes of
each sample and channel (IN), the spatial axes and channels of each sample (LN), and the
batch and spatial axes of each channel (BN; the running averages at inference);
``mu = sum_k softmax(mean_weight)_k mu_k``, ``var = sum_k softmax(var_weight)_k var_k``,
``y = (x - mu) / sqrt(var + eps) * g + b``. The reference reduces x directly for each source
(normzoo pools IN's moments), so it also checks that pooling.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import reference
from normzoo.functional.switchable import init_switchable_norm_stats, switchable_norm

TOL = dict(rtol=2e-5, atol=2e-5)
C = 4
SHAPE = (3, 2, 3, C)  # (N, H, W, C)
EPS = 1e-5


# ---------------------------------------------------------------- float64 reference
def _softmax(a):
    a = np.asarray(a, np.float64)
    e = np.exp(a - a.max())
    return e / e.sum()


def sn_ref(x, g=None, b=None, mw=(0.0, 0.0, 0.0), vw=(0.0, 0.0, 0.0), *, eps=EPS, mask=None,
           running=None):
    """``(y, mean_bn, var_bn)``: Switchable Norm of x (N, ..., C), channels last; ``running``
    (mean, var) replaces BN's batch statistics (inference)."""
    x = reference.as64(x)
    spatial = tuple(range(1, x.ndim - 1))
    mu_in, var_in = reference.moments(x, spatial, mask)
    mu_ln, var_ln = reference.moments(x, tuple(range(1, x.ndim)), mask)
    if running is None:
        mu_bn, var_bn = reference.moments(x, tuple(range(x.ndim - 1)), mask)
    else:
        shape = (1,) * (x.ndim - 1) + (x.shape[-1],)
        mu_bn, var_bn = (reference.as64(r).reshape(shape) for r in running)
    w, wv = _softmax(mw), _softmax(vw)
    mu = w[0] * mu_in + w[1] * mu_ln + w[2] * mu_bn
    var = wv[0] * var_in + wv[1] * var_ln + wv[2] * var_bn
    y = reference.affine((x - mu) / np.sqrt(var + eps), g, b)
    return y, mu_bn.ravel(), var_bn.ravel()


# ---------------------------------------------------------------- data
def _x(rng, shape=SHAPE, loc=0.3, scale=1.5, dtype=np.float32):
    return (loc + scale * rng.standard_normal(shape)).astype(dtype)


def _p(rng, n=C, loc=1.0, spread=0.3):
    return (loc + spread * rng.standard_normal(n)).astype(np.float32)


def _stats(rng, n=C):
    return {"mean": (0.2 * rng.standard_normal(n)).astype(np.float32),
            "var": (0.5 + rng.random(n)).astype(np.float32)}


sn = jax.jit(switchable_norm,
             static_argnames=("train", "momentum", "epsilon", "axis", "dtype"))


# ---------------------------------------------------------------- values
# Most calls share one signature (x of SHAPE, every param given, momentum 0.8): one compile.
MOMENTUM = 0.8


def _args(rng):
    """x, stats, g, b, mean_weight, var_weight."""
    return (_x(rng), _stats(rng), _p(rng), _p(rng, loc=0.0), _p(rng, 3, 0.0, 1.0),
            _p(rng, 3, 0.0, 1.0))


def test_init_stats():
    stats = init_switchable_norm_stats((C,))
    assert set(stats) == {"mean", "var"}
    np.testing.assert_array_equal(stats["mean"], np.zeros(C))
    np.testing.assert_array_equal(stats["var"], np.ones(C))
    assert stats["mean"].dtype == stats["var"].dtype == jnp.float32


@pytest.mark.parametrize("masked", [False, True], ids=["plain", "mask"])
def test_train_matches_paper_and_updates_running_statistics(rng, masked):
    x, stats, g, b, mw, vw = _args(rng)
    mask = None
    if masked:  # positions masked per sample (every sample and channel keeps some)
        mask = np.ones(SHAPE[:-1] + (1,), bool)
        mask[0, 0, :2] = False
        mask[2, 1, 1:] = False
    y, new = sn(x, stats, g, b, mw, vw, train=True, momentum=MOMENTUM, mask=mask)
    y_ref, mu_b, var_b = sn_ref(x, g, b, mw, vw, mask=mask)
    np.testing.assert_allclose(y, y_ref, **TOL)
    np.testing.assert_allclose(new["mean"], reference.ema(stats["mean"], mu_b, MOMENTUM), **TOL)
    np.testing.assert_allclose(new["var"], reference.ema(stats["var"], var_b, MOMENTUM), **TOL)
    assert y.dtype == jnp.float32 and y.shape == x.shape
    assert new["mean"].dtype == new["var"].dtype == jnp.float32


def test_inference_uses_running_statistics_for_bn_only(rng):
    x, stats, g, b, mw, vw = _args(rng)
    y, same = sn(x, stats, g, b, mw, vw, train=False, momentum=MOMENTUM)
    y_ref, _, _ = sn_ref(x, g, b, mw, vw, running=(stats["mean"], stats["var"]))
    np.testing.assert_allclose(y, y_ref, **TOL)
    for k in stats:
        np.testing.assert_array_equal(same[k], stats[k])


def test_weights_are_softmax_normalized(rng):
    """Logits shifted by a constant give the same output (equal logits: equal weights)."""
    x, stats, g, b, _, _ = _args(rng)
    y, _ = sn(x, stats, g, b, np.zeros(3, np.float32), np.full(3, 7.0, np.float32),
              train=True, momentum=MOMENTUM)
    np.testing.assert_allclose(y, sn_ref(x, g, b)[0], **TOL)


def test_feature_axis_first(rng):
    """``axis=1`` (channels first, NCHW): the same numbers as channels last."""
    x, stats, g, b, mw, vw = _args(rng)
    y, new = sn(x, stats, g, b, mw, vw, train=True, momentum=MOMENTUM)
    y1, new1 = sn(np.moveaxis(x, -1, 1), stats, g, b, mw, vw, train=True, momentum=MOMENTUM,
                  axis=1)
    np.testing.assert_allclose(np.moveaxis(y1, 1, -1), y, **TOL)
    for k in stats:
        np.testing.assert_allclose(new1[k], new[k], **TOL)


def test_no_spatial_axes_in_is_the_elements(rng):
    """x (N, C): IN's statistics are the elements (mean x, variance 0), as InstanceNorm."""
    _, stats, g, b, mw, vw = _args(rng)
    x = _x(rng, (5, C))
    y, _ = sn(x, stats, g, b, mw, vw, train=True, momentum=MOMENTUM)
    x64 = x.astype(np.float64)
    w, wv = _softmax(mw), _softmax(vw)
    mu = w[0] * x64 + w[1] * x64.mean(1, keepdims=True) + w[2] * x64.mean(0)
    var = wv[1] * x64.var(1, keepdims=True) + wv[2] * x64.var(0)
    np.testing.assert_allclose(y, (x64 - mu) / np.sqrt(var + EPS) * g + b, **TOL)


def test_accurate_when_mean_is_large(rng):
    """x = 1e4 + N(0, 1) in float32: the pooled variances have no cancellation."""
    _, stats, g, b, mw, vw = _args(rng)
    x = _x(rng, loc=1e4, scale=1.0)
    y, new = sn(x, stats, g, b, mw, vw, train=True, momentum=MOMENTUM)
    y_ref, _, var_b = sn_ref(x, g, b, mw, vw)
    np.testing.assert_allclose(y, y_ref, rtol=2e-3, atol=2e-3)
    np.testing.assert_allclose(new["var"], reference.ema(stats["var"], var_b, MOMENTUM),
                               rtol=1e-4)


def test_empty_batch_keeps_statistics(rng):
    stats = _stats(rng)
    y, new = switchable_norm(np.zeros((0, 2, 3, C), np.float32), stats)
    assert y.shape == (0, 2, 3, C)
    assert new is stats


# ---------------------------------------------------------------- transforms and devices
def _fd(fun, args, h=1e-6):
    """Central differences of scalar ``fun(*args)`` w.r.t. every entry of every arg."""
    grads = []
    for i, a in enumerate(args):
        a = np.asarray(a, np.float64)
        g = np.empty(a.size)
        for j in range(a.size):
            e = np.zeros(a.size)
            e[j] = h
            plus = [*args[:i], a + e.reshape(a.shape), *args[i + 1:]]
            minus = [*args[:i], a - e.reshape(a.shape), *args[i + 1:]]
            g[j] = (fun(*plus) - fun(*minus)) / (2 * h)
        grads.append(g.reshape(a.shape))
    return grads


def test_gradients_match_finite_differences(rng, x64):
    """jax.grad of training-mode SN (float64, with a mask) w.r.t. x, g, b, mean_weight and
    var_weight == central differences of the float64 reference."""
    x = _x(rng, (2, 2, 2, 3)).astype(np.float64)
    args = [x, _p(rng, 3), _p(rng, 3, 0.0), _p(rng, 3, 0.0, 1.0), _p(rng, 3, 0.0, 1.0)]
    args = [np.asarray(a, np.float64) for a in args]
    c = rng.standard_normal(x.shape)
    mask = np.ones(x.shape[:-1] + (1,), bool)
    mask[1, 0, 0] = False
    stats = {k: jnp.asarray(v, jnp.float64) for k, v in init_switchable_norm_stats((3,)).items()}

    def loss(x, g, b, mw, vw):
        y, _ = switchable_norm(x, stats, g, b, mw, vw, mask=mask)
        return jnp.sum(c * y) + 0.1 * jnp.sum(y**3)

    def loss_ref(x, g, b, mw, vw):
        y = sn_ref(x, g, b, mw, vw, mask=mask)[0]
        return np.sum(c * y) + 0.1 * np.sum(y**3)

    grads = jax.jit(jax.grad(loss, argnums=tuple(range(5))))(*map(jnp.asarray, args))
    for got, want in zip(grads, _fd(loss_ref, args), strict=True):
        assert got.dtype == jnp.float64
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)


def test_vmap(rng):
    _, stats, g, b, mw, vw = _args(rng)
    xs = np.stack([_x(rng), _x(rng, loc=-1.0)])
    f = jax.jit(jax.vmap(lambda x: switchable_norm(x, stats, g, b, mw, vw)))
    ys, news = f(xs)
    for i in range(2):
        y_ref, _, var_b = sn_ref(xs[i], g, b, mw, vw)
        np.testing.assert_allclose(ys[i], y_ref, **TOL)
        np.testing.assert_allclose(news["var"][i], reference.ema(stats["var"], var_b, 0.99),
                                   **TOL)


def test_axis_name_bn_statistics_span_devices_exactly(rng):
    """Two 'devices' with uneven (masked) shards: BN's statistics equal the whole batch's, IN
    and LN stay per sample."""
    _, stats, g, b, mw, vw = _args(rng)
    x = _x(rng, (4, 2, 3, C))
    mask = np.ones((4, 2, 3, 1), bool)
    mask[3, 1] = False  # uneven counts between the shards
    shards = lambda a: a.reshape((2, 2) + a.shape[1:])  # noqa: E731
    f = jax.jit(jax.vmap(
        lambda x, m: switchable_norm(x, stats, g, b, mw, vw, mask=m, axis_name="d"),
        axis_name="d"))
    ys, news = f(shards(x), shards(mask))
    y_ref, mu_b, var_b = sn_ref(x, g, b, mw, vw, mask=mask)
    np.testing.assert_allclose(ys.reshape(x.shape), y_ref, **TOL)
    for d in range(2):
        np.testing.assert_allclose(news["mean"][d], reference.ema(stats["mean"], mu_b, 0.99),
                                   **TOL)
        np.testing.assert_allclose(news["var"][d], reference.ema(stats["var"], var_b, 0.99),
                                   **TOL)


def test_bfloat16_input_float32_statistics(rng):
    """bf16 x: bf16 output, float32 statistics; ``dtype=bfloat16`` forces a bf16 output. No
    params and no weights here: equal weights."""
    x, stats, g, b, _, _ = _args(rng)
    xb = jnp.asarray(x, jnp.bfloat16)
    f = jax.jit(lambda xb, x: (switchable_norm(xb, stats),
                               switchable_norm(x, stats, g, b, dtype=jnp.bfloat16)[0]))
    (y, new), y16 = f(xb, x)
    assert y.dtype == y16.dtype == jnp.bfloat16
    assert new["mean"].dtype == new["var"].dtype == jnp.float32
    y_ref, _, var_b = sn_ref(np.asarray(xb, np.float32))
    np.testing.assert_allclose(np.asarray(y, np.float32), y_ref, rtol=2e-2, atol=2e-2)
    np.testing.assert_allclose(new["var"], reference.ema(stats["var"], var_b, 0.99), rtol=1e-5)
    np.testing.assert_allclose(np.asarray(y16, np.float32), sn_ref(x, g, b)[0], rtol=2e-2,
                               atol=2e-2)


# ---------------------------------------------------------------- errors
@pytest.mark.parametrize("kwargs, error, match", [
    (dict(axis=4), ValueError, r"axis=4 is out of range"),
    (dict(axis=0), ValueError, r"axis=0 contains the batch axis"),
    (dict(scale=np.ones(3, np.float32)), ValueError, r"scale has shape \(3,\)"),
    (dict(mean_weight=np.zeros(2, np.float32)), ValueError, r"mean_weight has shape \(2,\)"),
    (dict(var_weight=np.zeros((3, 1), np.float32)), ValueError, r"var_weight has shape"),
    (dict(stats={"mean": np.zeros(C)}), ValueError, r"stats has keys \['mean'\]"),
    (dict(stats={"mean": np.zeros(3), "var": np.ones(3)}), ValueError,
     r"stats\['mean'\] has shape \(3,\); expected \(4,\)"),
    (dict(mask=np.ones((3, 2), bool)), ValueError, r"mask has shape \(3, 2\)"),
    (dict(momentum=1.5), ValueError, r"momentum=1.5"),
    (dict(epsilon=-1.0), ValueError, r"epsilon=-1.0"),
])
def test_errors_name_the_argument(rng, kwargs, error, match):
    args = dict(x=_x(rng), stats=init_switchable_norm_stats((C,)))
    args.update(kwargs)
    with pytest.raises(error, match=match):
        switchable_norm(**args)


def test_input_errors():
    stats = init_switchable_norm_stats((C,))
    with pytest.raises(TypeError, match="floating"):
        switchable_norm(np.ones(SHAPE, np.int32), stats)
    with pytest.raises(TypeError, match="real"):
        switchable_norm(np.ones(SHAPE, np.complex64), stats)
    with pytest.raises(ValueError, match="rank >= 2"):
        switchable_norm(np.ones((C,), np.float32), stats)
    with pytest.raises(ValueError, match="hold no elements"):
        switchable_norm(np.ones((2, 0, C), np.float32), stats)
