"""First and second derivatives of every layer, in training and inference, at every size.

For a loss ``L(y) = sum(c y) + 0.5 sum(d y^2)`` of each layer's output (c, d fixed, random):

* small float64 inputs: ``grad L`` against central differences of the float64 NumPy reference
  (tests/reference.py), and ``jax.hessian``, ``jax.jvp(jax.grad(L))`` and
  ``jax.grad(lambda x: vdot(g, g))`` (``g = grad L``) against the reference's Hessian by second
  central differences (``H v`` and ``2 H g``); ``check_grads(order=2)`` on top;
* the linen layers through ``model.apply`` (chex variants: with and without jit), w.r.t. x and
  the params;
* one size above every CPU-kernel threshold (2^21 elements), with the kernels off and on: the
  second derivatives run, are finite and equal those of the plain float32 formula in jnp.
"""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from absl.testing import parameterized
from jax.test_util import check_grads

import normzoo
import normzoo.functional as F
import reference

C = 4


# ---------------------------------------------------------------- losses and finite differences
def _loss(y, c, d, xp=jnp):
    return xp.sum(c * y) + 0.5 * xp.sum(d * y * y)


def fd_grad(fun, x, h=1e-5):
    """Central differences of a scalar NumPy function: (n,) for x of n entries."""
    x = np.asarray(x, np.float64)
    g = np.empty(x.size)
    for i in range(x.size):
        e = np.zeros(x.size)
        e[i] = h
        e = e.reshape(x.shape)
        g[i] = (fun(x + e) - fun(x - e)) / (2 * h)
    return g


def fd_hessian(fun, x, h=1e-3):
    """Second central differences of a scalar NumPy function: (n, n), symmetric."""
    x = np.asarray(x, np.float64)
    n = x.size
    eye = np.eye(n).reshape((n,) + x.shape) * h
    hess = np.empty((n, n))
    for i in range(n):
        for j in range(i, n):
            a, b = eye[i], eye[j]
            hess[i, j] = hess[j, i] = (fun(x + a + b) - fun(x + a - b) - fun(x - a + b)
                                       + fun(x - a - b)) / (4 * h * h)
    return hess


# ---------------------------------------------------------------- the functional cases
def _params(shape, seed=1):
    r = np.random.default_rng(seed)
    c = shape[-1]
    p = dict(gamma=1.0 + 0.3 * r.standard_normal(c), beta=0.2 * r.standard_normal(c),
             mean=0.3 * r.standard_normal(c), var=0.5 + r.random(c),
             mean_square=0.8 + r.random(c))
    a = r.standard_normal((c, c))
    p["covariance"] = (a @ a.T / c + 0.5 * np.eye(c))[None]
    return p


def _whiten_eval_ref(x, p, method):
    phi = reference.whitening_matrix(p["covariance"][0], method, 1e-5)
    return reference.affine((x - p["mean"]) @ phi.T, p["gamma"], p["beta"])


def _case(name, p):
    """(normzoo function of x, float64 NumPy reference of x) for the case ``name``."""
    g, b = p["gamma"], p["beta"]
    bn_stats = dict(mean=p["mean"], var=p["var"])
    wstats = dict(mean=p["mean"], covariance=p["covariance"])
    kind, _, mode = name.partition("/")
    train = mode != "eval"
    if kind == "batch_norm":
        ref_stats = {} if train else bn_stats
        return (lambda x: F.batch_norm(x, bn_stats, g, b, train=train)[0],
                lambda x: reference.batch_norm(x, g, b, eps=1e-5, **ref_stats))
    if kind == "layer_norm":
        return (lambda x: F.layer_norm(x, g, b),
                lambda x: reference.layer_norm(x, g, b, eps=1e-6))
    if kind == "rms_norm":
        return lambda x: F.rms_norm(x, g), lambda x: reference.rms_norm(x, g, eps=1e-6)
    if kind == "group_norm":
        return (lambda x: F.group_norm(x, g, b, num_groups=2),
                lambda x: reference.group_norm(x, 2, g, b, eps=1e-6))
    if kind == "instance_norm":
        return (lambda x: F.instance_norm(x, g, b),
                lambda x: reference.instance_norm(x, g, b, eps=1e-6))
    if kind in ("center_batch", "scale_batch"):
        op = kind.split("_")[0]
        key = "mean" if op == "center" else "mean_square"
        stats = {key: p[key]}
        nz = lambda x: F.normalize(x, stats, area="batch", operation=op, train=train)[0]  # noqa: E731
        if op == "center":
            return nz, (lambda x: reference.center(x, 0)) if train else (lambda x: x - p["mean"])
        if train:
            return nz, lambda x: reference.scale(x, 0, 1e-5)
        return nz, lambda x: x / np.sqrt(p["mean_square"] + 1e-5)
    if kind in ("center_layer", "scale_layer"):
        op = kind.split("_")[0]
        nz = lambda x: F.normalize(x, area="layer", operation=op)[0]  # noqa: E731
        if op == "center":
            return nz, lambda x: reference.center(x, -1)
        return nz, lambda x: reference.scale(x, -1, 1e-5)
    if kind.startswith("whiten_"):
        method = kind.split("_")[1]
        nz = lambda x: F.whiten(x, wstats, g, b, method=method, train=train)[0]  # noqa: E731
        if train:
            return nz, lambda x: reference.affine(reference.whiten(x, method, eps=1e-5), g, b)
        return nz, functools.partial(_whiten_eval_ref, p=p, method=method)
    raise ValueError(name)


SHAPES = {"group_norm": (2, 3, C), "instance_norm": (2, 3, C), "batch_norm": (5, C),
          "center_batch": (5, C), "scale_batch": (5, C), "whiten_zca": (6, C),
          "whiten_cholesky": (6, C), "whiten_newton": (6, C)}
CASES = (["batch_norm/train", "batch_norm/eval", "layer_norm", "rms_norm", "group_norm",
          "instance_norm", "center_layer", "scale_layer"]
         + [f"{k}/{m}" for k in ("center_batch", "scale_batch", "whiten_zca", "whiten_cholesky",
                                 "whiten_newton") for m in ("train", "eval")])


def _inputs(name):
    shape = SHAPES.get(name.partition("/")[0], (3, C))
    r = np.random.default_rng(0)
    x = 0.5 + r.standard_normal(shape)
    return x, r.standard_normal(shape), 0.5 + r.random(shape), r.standard_normal(shape)


@functools.partial(jax.jit, static_argnames="fun")
def _derivatives(x, v, c, d, *, fun):
    loss = lambda x: _loss(fun(x), c, d)  # noqa: E731
    grad = jax.grad(loss)
    return dict(
        y=fun(x), grad=grad(x), hessian=jax.hessian(loss)(x),
        jvp_grad=jax.jvp(grad, (x,), (v,))[1],
        grad_norm=jax.grad(lambda x: jnp.vdot(grad(x), grad(x)))(x),
    )


@pytest.mark.parametrize("name", CASES)
def test_second_derivatives_equal_the_reference(name, x64):
    x, v, d, c = _inputs(name)
    nz, ref = _case(name, _params(x.shape))
    ref_loss = lambda x: _loss(ref(x), c, d, np)  # noqa: E731
    h_ref = fd_hessian(ref_loss, x)
    g_ref = fd_grad(ref_loss, x)
    out = {k: np.asarray(a) for k, a in _derivatives(x, v, c, d, fun=nz).items()}
    assert out["hessian"].dtype == np.float64
    n = x.size
    np.testing.assert_allclose(out["y"], ref(x), rtol=1e-10, atol=1e-10)
    np.testing.assert_allclose(out["grad"].ravel(), g_ref, rtol=1e-6, atol=1e-6)
    tol = dict(rtol=1e-4, atol=1e-4 * max(1.0, np.abs(h_ref).max()))
    np.testing.assert_allclose(out["hessian"].reshape(n, n), h_ref, **tol)
    np.testing.assert_allclose(out["jvp_grad"].ravel(), h_ref @ v.ravel(), **tol)
    np.testing.assert_allclose(out["grad_norm"].ravel(), 2 * h_ref @ g_ref, **tol)
    assert np.abs(h_ref).max() > 1e-3  # the loss has curvature to get wrong


@pytest.mark.parametrize("name", CASES)
def test_forward_mode_equals_the_reference(name, x64):
    # jax.jvp / jacfwd of the layer itself (the Hessians above are forward-over-reverse)
    x, v, d, c = _inputs(name)
    nz, ref = _case(name, _params(x.shape))
    g_ref = fd_grad(lambda x: _loss(ref(x), c, d, np), x)
    _, tangent = jax.jit(lambda x, v: jax.jvp(lambda x: _loss(nz(x), c, d), (x,), (v,)))(x, v)
    np.testing.assert_allclose(tangent, g_ref @ v.ravel(), rtol=1e-6, atol=1e-6)


CHECK_GRADS = ["batch_norm/train", "scale_batch/eval", "whiten_cholesky/train"]


@pytest.mark.parametrize("name", CHECK_GRADS)
def test_check_grads_order_2(name, x64):
    x, _, d, c = _inputs(name)
    nz, _ = _case(name, _params(x.shape))
    # reverse over reverse; the forward modes are checked above against the reference
    check_grads(jax.jit(lambda x: _loss(nz(x), c, d)), (x,), order=2, modes=("rev",),
                atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------- linen layers via model.apply
# name: (layer, its fields, float64 reference of (x, variables))
def _bn_ref(train):
    def ref(x, v):
        stats = {} if train else dict(mean=v["batch_stats"]["mean"], var=v["batch_stats"]["var"])
        return reference.batch_norm(x, v["params"]["scale"], v["params"]["bias"], eps=1e-5,
                                    **stats)
    return ref


LINEN = {
    "BatchNorm_train": (normzoo.BatchNorm, dict(use_running_average=False), _bn_ref(True)),
    "BatchNorm_eval": (normzoo.BatchNorm, dict(use_running_average=True), _bn_ref(False)),
    "LayerNorm": (normzoo.LayerNorm, {}, lambda x, v: reference.layer_norm(
        x, v["params"]["scale"], v["params"]["bias"])),
    "RMSNorm": (normzoo.RMSNorm, {}, lambda x, v: reference.rms_norm(x, v["params"]["scale"])),
    "GroupNorm": (normzoo.GroupNorm, dict(num_groups=2), lambda x, v: reference.group_norm(
        x, 2, v["params"]["scale"], v["params"]["bias"])),
    "InstanceNorm": (normzoo.InstanceNorm, {}, lambda x, v: reference.instance_norm(
        x, v["params"]["scale"], v["params"]["bias"])),
}


def _linen_case(name):
    """(loss of (x, params) through model.apply, float64 NumPy loss of (x, variables), x, v,
    d, params, float64 variables) for the linen case ``name``; call under x64."""
    cls, kw, ref = LINEN[name]
    shape = (2, 3, C) if name in ("GroupNorm", "InstanceNorm") else (5, C)
    x, v, d, c = (np.random.default_rng(i).standard_normal(shape) for i in range(4))
    x, d = x + 0.5, 0.5 + np.abs(d)
    model = cls(param_dtype=jnp.float64, **kw)
    variables = jax.jit(model.init)(jax.random.key(0), x)  # (setup: one program, not eager)
    p = _params(shape)  # non-trivial params and running statistics
    params = {k: jnp.asarray(p["gamma" if k == "scale" else "beta"]) for k in variables["params"]}
    rest = {}
    if "batch_stats" in variables:  # float32, as the layer keeps them
        rest["batch_stats"] = {k: jnp.asarray(p[k], jnp.float32) for k in ("mean", "var")}
    mutable = ["batch_stats"] if name == "BatchNorm_train" else False

    def loss(x, params):
        out = model.apply({"params": params, **rest}, x, mutable=mutable)
        return _loss(out[0] if mutable else out, c, d)

    vars64 = {"params": params, **jax.tree.map(lambda a: np.asarray(a, np.float64), rest)}
    return loss, lambda x, v: _loss(ref(x, v), c, d, np), x, v, d, params, vars64


class LinenGradientsTest(chex.TestCase):
    """First derivatives of the linen layers through ``model.apply``, jitted and not, w.r.t. x
    and the params, against central differences of the float64 reference."""

    @chex.variants(with_jit=True, without_jit=True)
    @parameterized.named_parameters(*[(k, k) for k in LINEN])
    def test_gradients(self, name):
        self.enter_context(jax.enable_x64(True))
        loss, ref_loss, x, _, _, params, vars64 = _linen_case(name)
        grads = self.variant(jax.grad(loss, argnums=(0, 1)))(x, params)

        def ref_of(key):  # the reference loss as a function of one param
            return lambda a: ref_loss(x, {**vars64, "params": {**vars64["params"], key: a}})

        want = (fd_grad(lambda x: ref_loss(x, vars64), x).reshape(x.shape),
                {k: fd_grad(ref_of(k), np.asarray(a)) for k, a in params.items()})
        chex.assert_trees_all_close(grads, want, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("name", list(LINEN))
def test_linen_second_derivatives(name, x64):
    loss, ref_loss, x, v, d, params, vars64 = _linen_case(name)

    @jax.jit
    def derivatives(x, params):
        grad_x = jax.grad(loss)
        return (jax.hessian(loss)(x, params),
                jax.jvp(lambda x: grad_x(x, params), (x,), (v,))[1],
                jax.grad(lambda x: jnp.vdot(grad_x(x, params), grad_x(x, params)))(x),
                jax.hessian(loss, argnums=1)(x, params))

    h, hv, gg, h_params = derivatives(x, params)
    h_ref = fd_hessian(lambda x: ref_loss(x, vars64), x)
    g_ref = fd_grad(lambda x: ref_loss(x, vars64), x)
    tol = dict(rtol=1e-4, atol=1e-4 * max(1.0, np.abs(h_ref).max()))
    n = x.size
    np.testing.assert_allclose(np.asarray(h).reshape(n, n), h_ref, **tol)
    np.testing.assert_allclose(np.asarray(hv).ravel(), h_ref @ v.ravel(), **tol)
    np.testing.assert_allclose(np.asarray(gg).ravel(), 2 * h_ref @ g_ref, **tol)
    # y = scale * xhat + bias: d^2 L / d scale_k^2 = sum(d * xhat_k^2), cross terms 0
    unit = {"scale": np.ones(C), "bias": np.zeros(C)}
    xhat = LINEN[name][2](x, {**vars64, "params": unit})
    want = np.diag(np.sum(d * xhat**2, axis=tuple(range(x.ndim - 1))))
    chex.assert_tree_all_finite(h_params)
    np.testing.assert_allclose(h_params["scale"]["scale"], want, rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("name, modes", [("BatchNorm_train", ("rev",)),
                                         ("BatchNorm_eval", ("fwd", "rev"))])
def test_linen_check_grads_order_2(name, modes, x64):
    loss, _, x, _, _, params, _ = _linen_case(name)
    check_grads(jax.jit(loss), (x, params), order=2, modes=modes, atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------- above every kernel threshold
def _ln_formula(x, scale, bias, eps=1e-6):
    mean = jnp.mean(x, -1, keepdims=True)
    var = jnp.mean(jnp.square(x - mean), -1, keepdims=True)
    return (x - mean) * jax.lax.rsqrt(var + eps) * scale + bias


def _rms_formula(x, scale, eps=1e-6):
    return x * jax.lax.rsqrt(jnp.mean(jnp.square(x), -1, keepdims=True) + eps) * scale


def _gn_formula(x, scale, bias, groups=32, eps=1e-6):
    xg = x.reshape(x.shape[:-1] + (groups, x.shape[-1] // groups))
    axes = tuple(range(1, x.ndim - 1)) + (x.ndim,)
    mean = jnp.mean(xg, axes, keepdims=True)
    var = jnp.mean(jnp.square(xg - mean), axes, keepdims=True)
    return ((xg - mean) * jax.lax.rsqrt(var + eps)).reshape(x.shape) * scale + bias


def _bn_eval_formula(x, mean, var, scale, bias, eps=1e-5):
    return (x - mean) * jax.lax.rsqrt(var + eps) * scale + bias


BIG = {
    "layer_norm": ((2048, 1024), lambda x, p: F.layer_norm(x, p["gamma"], p["beta"]),
                   lambda x, p: _ln_formula(x, p["gamma"], p["beta"])),
    "rms_norm": ((2048, 1024), lambda x, p: F.rms_norm(x, p["gamma"]),
                 lambda x, p: _rms_formula(x, p["gamma"])),
    "group_norm": ((32, 16, 16, 256), lambda x, p: F.group_norm(x, p["gamma"], p["beta"]),
                   lambda x, p: _gn_formula(x, p["gamma"], p["beta"])),
    "batch_norm_eval": ((32, 32, 32, 64),
                        lambda x, p: F.batch_norm(x, dict(mean=p["mean"], var=p["var"]),
                                                  p["gamma"], p["beta"], train=False)[0],
                        lambda x, p: _bn_eval_formula(x, p["mean"], p["var"], p["gamma"],
                                                      p["beta"])),
}


def _second_orders(fun, x, v, c, p):
    loss = lambda x: _loss(fun(x, p), c, 1.0)  # noqa: E731
    grad = jax.grad(loss)
    return (grad(x), jax.jvp(grad, (x,), (v,))[1],
            jax.grad(lambda x: jnp.vdot(grad(x), grad(x)))(x))


def _big_inputs(name):
    shape = BIG[name][0]
    key = jax.random.split(jax.random.key(0), 3)
    x = 0.5 + 2.0 * jax.random.normal(key[0], shape)
    p = {k: jnp.asarray(a, jnp.float32) for k, a in _params(shape).items()}
    return x, jax.random.normal(key[1], shape), jax.random.normal(key[2], shape), p


@functools.lru_cache(maxsize=1)
def _big_formula(name):
    """The plain jnp formula's derivatives, shared by the kernels-off and -on runs of
    ``name`` (which run one after the other: see the parametrization below)."""
    out = jax.jit(lambda *a: _second_orders(BIG[name][2], *a))(*_big_inputs(name))
    return tuple(np.asarray(a) for a in out)


# The kernel switch varies fastest, so the kernels-off and -on runs of a layer are
# neighbours and share one _big_formula (the conftest fixture's params, made explicit).
@pytest.mark.parametrize("cpu_kernels", [False, True], ids=["kernels_off", "kernels_on"],
                         indirect=True)
@pytest.mark.parametrize("name", list(BIG))
def test_second_derivatives_above_kernel_thresholds(name, cpu_kernels):
    assert np.prod(BIG[name][0]) >= 2**21
    # a fresh jitted function: the kernel switch is read at trace time
    got = jax.jit(lambda *a: _second_orders(BIG[name][1], *a))(*_big_inputs(name))
    for what, a, b in zip(("grad", "jvp(grad)", "grad(vdot(grad, grad))"), got, _big_formula(name)):
        a = np.asarray(a)
        assert np.isfinite(a).all(), what
        scale = np.abs(b).max()
        assert scale > 0
        np.testing.assert_allclose(a, b, rtol=1e-3, atol=2e-4 * scale, err_msg=what)
