"""The opt-in CPU kernels' safety: the cache (size and hash checks, atomic builds, one build
for concurrent first uses), the trace-time switch, and derivatives of every order with the
kernels on at the default sizes. Every test skips where the kernels are not available."""

import os
import subprocess
import sys
import tempfile
import textwrap
import threading
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import background
import normzoo
import normzoo.backends.cpu as cpu_kernels
import normzoo.functional as F
from normzoo.backends.cpu import library

if not cpu_kernels.available():  # pragma: no cover - every CI machine has g++
    pytest.skip(f"CPU kernels unavailable here ({cpu_kernels.failure()})",
                allow_module_level=True)

ROOT = Path(__file__).resolve().parents[2]
TINY = "extern \"C\" int normzoo_tiny() { return 7; }\n"


@pytest.fixture
def kernels_on():
    with cpu_kernels.enabled(True, multi_device=True):
        yield


def _tiny_source(tmp_path) -> Path:
    source = tmp_path / "tiny.cc"
    source.write_text(TINY)
    return source


TINY_FLAGS = ["-O0", "-shared", "-fPIC"]


# ------------------------------------------------------------------------------ the cache


def test_a_corrupt_or_empty_cached_library_is_rebuilt_not_loaded(tmp_path, monkeypatch):
    monkeypatch.setenv("NORMZOO_CACHE_DIR", str(tmp_path))
    source = _tiny_source(tmp_path)
    target = library.cached_build(source, TINY_FLAGS, "tiny", ".so")
    assert library.is_intact(target)
    good = target.read_bytes()
    target.write_bytes(good[: len(good) // 3])  # truncated after its build
    assert not library.is_intact(target)
    assert library.cached_build(source, TINY_FLAGS, "tiny", ".so") == target
    assert target.read_bytes() == good and library.is_intact(target)
    target.write_bytes(b"")  # a 0-byte file where the library should be
    library.cached_build(source, TINY_FLAGS, "tiny", ".so")
    assert target.read_bytes() == good
    # A 0-byte temporary file of a killed build is never taken for the library, and the next
    # build removes it.
    stale = tmp_path / f".{target.name}.killed.tmp"
    stale.write_bytes(b"")
    library.cached_build(source, TINY_FLAGS, "tiny", ".so")
    target.unlink()
    library.cached_build(source, TINY_FLAGS, "tiny", ".so")
    assert not stale.exists() and library.is_intact(target)


def test_concurrent_first_uses_share_one_build(tmp_path, monkeypatch, capfd):
    monkeypatch.setenv("NORMZOO_CACHE_DIR", str(tmp_path / "threads"))
    source = _tiny_source(tmp_path)
    results = []
    threads = [threading.Thread(target=lambda: results.append(
        library.cached_build(source, TINY_FLAGS, "tiny", ".so"))) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(set(results)) == 1 and library.is_intact(results[0])
    err = capfd.readouterr().err
    assert err.count("normzoo: compiling") == 1, err  # one line, from one build
    # Processes: three at once on an empty cache, one build among them.
    script = textwrap.dedent(f"""
        from pathlib import Path
        from normzoo.backends.cpu import library
        library.cached_build(Path({str(source)!r}), {TINY_FLAGS!r}, "tiny", ".so")
    """)
    env = dict(os.environ, NORMZOO_CACHE_DIR=str(tmp_path / "processes"))
    procs = [subprocess.Popen([sys.executable, "-c", script], env=env, cwd=ROOT,
                              stderr=subprocess.PIPE, text=True) for _ in range(3)]
    errs = [p.communicate(timeout=300)[1] for p in procs]
    assert all(p.returncode == 0 for p in procs), errs
    assert sum(e.count("normzoo: compiling") for e in errs) == 1, errs


_TRUNCATED_SCRIPT = textwrap.dedent("""
    import jax, jax.numpy as jnp
    import normzoo.backends.cpu as cpu_kernels
    import normzoo.functional as F
    assert cpu_kernels.enable(multi_device=True), cpu_kernels.failure()
    x = jnp.ones((512, 256)) * jnp.arange(256.0)
    f = jax.jit(lambda x: F.layer_norm(x, jnp.ones(256), jnp.zeros(256)))
    assert "normzoo_row_norm" in f.lower(x).as_text()
    print("ok", float(f(x).sum()))
""")


def _truncated_library():
    """(file name, bytes, build record) of the kernels' own library built with -O0 (quicker
    to compile; a name of its own), truncated after an intact build: its record still says
    the whole size and hash. Read in the main thread, before the job runs (the names depend
    on settings some tests monkeypatch)."""
    flags = library.flags() + ["-O0"]
    name = library.cached_path(library.SOURCE, flags, "normzoo_cpu", ".so").name
    whole = cpu_kernels.library_path()
    size, digest = (whole.with_name(whole.name + ".sha256")).read_text().split()
    return name, whole.read_bytes()[: int(size) // 2], f"{size} {digest}\n"


def _truncated_run(truncated, environ):
    """That truncated library in a fresh cache, then a fresh process that uses the kernels:
    its run, and whether the library is intact after it."""
    name, data, record = truncated
    with tempfile.TemporaryDirectory() as tmp:
        target = Path(tmp) / name
        target.write_bytes(data)
        target.with_name(target.name + ".sha256").write_text(record)
        env = dict(environ, NORMZOO_CACHE_DIR=tmp, NORMZOO_NATIVE_CFLAGS="-O0")
        env.pop("NORMZOO_CPU_KERNELS", None)
        done = subprocess.run([sys.executable, "-c", _TRUNCATED_SCRIPT], env=env, cwd=ROOT,
                              capture_output=True, text=True, timeout=600)
        return done, library.is_intact(target)


_ENV_SCRIPT = ("import normzoo, sys; import normzoo.backends.cpu as k; "
               "print(k.is_enabled(), 'normzoo.backends.cpu' in sys.modules)")


def _env_run(value, environ):
    env = dict(environ, NORMZOO_CPU_KERNELS=value)
    return subprocess.run([sys.executable, "-c", _ENV_SCRIPT], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=300)


def background_jobs(items):
    """The fresh-process runs below, started when collection ends, beside the in-process
    tests (tests/background.py), in the environment of that moment."""
    names = {item.name for item in items}
    environ = dict(os.environ)
    if "test_truncated_cached_kernels_are_rebuilt_in_a_fresh_process" in names:
        yield "cpu_kernels_truncated", _truncated_run, (_truncated_library(), environ)
    if "test_environment_variable_enables_the_kernels_at_import" in names:
        for value in ("1", "0"):
            yield ("cpu_kernels_env", value), _env_run, (value, environ)


def test_truncated_cached_kernels_are_rebuilt_in_a_fresh_process():
    # The kernels' own library, truncated in the cache after an intact build (its record
    # still says the whole size and hash): a fresh process that uses the kernels rebuilds
    # it and runs, where mapping the truncated file would kill it with SIGBUS. Built with
    # -O0 into a fresh cache (quicker to compile; a name of its own).
    done, intact = background.result("cpu_kernels_truncated", _truncated_run,
                                     _truncated_library(), dict(os.environ))
    assert done.returncode == 0 and "ok" in done.stdout, done.stderr[-3000:]
    assert done.stderr.count("normzoo: compiling") == 1
    assert intact


# ----------------------------------------------------------------------------- the switch


def test_enable_and_disable_retrace_functions_jitted_before():
    traces = []
    x = jnp.asarray(np.random.default_rng(0).standard_normal((256, 512)), jnp.float32)
    scale, bias = jnp.ones(512), jnp.zeros(512)

    @jax.jit
    def f(x):
        traces.append(cpu_kernels.is_enabled())
        return F.layer_norm(x, scale, bias)

    cpu_kernels.disable()
    y_off = f(x)
    f(x)
    assert traces == [False]  # cached
    try:
        with cpu_kernels.min_size(0, 0):
            assert cpu_kernels.enable(multi_device=True)
            y_on = f(x)
            assert traces == [False, True]  # the call after the switch traced again
            assert "normzoo_row_norm" in f.lower(x).as_text()
            cpu_kernels.disable()
            f(x)
            assert traces == [False, True, False]
            assert "normzoo_" not in f.lower(x).as_text()
    finally:
        cpu_kernels.disable()
    np.testing.assert_allclose(y_on, y_off, rtol=1e-5, atol=1e-5)


def test_environment_variable_enables_the_kernels_at_import():
    for value, expected in (("1", "True True"), ("0", "False True")):
        done = background.result(("cpu_kernels_env", value), _env_run, value, dict(os.environ))
        assert done.stdout.strip() == expected, done.stderr[-2000:]


# ------------------------------------------------------------- derivatives with kernels on

# (function, shape): 2^21 elements, the native backward's default minimum size. GroupNorm
# also on (2048, 1024), whose statistics span no axis but the channels' (no kernel applies),
# and on (128, 16, 1024), which runs the grouped kernels. RMSNorm's linearization is not in
# the native backward plan (its forward kernel is).
NORMS = {
    "layer_norm": (lambda x, s, b: F.layer_norm(x, s, b), (2048, 1024)),
    "rms_norm": (lambda x, s, b: F.rms_norm(x, s), (2048, 1024)),
    "group_norm": (lambda x, s, b: F.group_norm(x, s, b, num_groups=32), (2048, 1024)),
    "group_norm_3d": (lambda x, s, b: F.group_norm(x, s, b, num_groups=32), (128, 16, 1024)),
}
NATIVE_BACKWARD = {"layer_norm", "group_norm_3d"}


@pytest.mark.parametrize("name", sorted(NORMS))
def test_second_derivatives_at_the_kernels_sizes(name, kernels_on):
    fn, shape = NORMS[name]
    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.standard_normal(shape), jnp.float32)
    c = jnp.asarray(rng.standard_normal(shape), jnp.float32)
    t = jnp.asarray(rng.standard_normal(shape), jnp.float32)
    s = jnp.asarray(rng.uniform(0.5, 1.5, shape[-1]), jnp.float32)
    b = jnp.asarray(rng.standard_normal(shape[-1]), jnp.float32)

    def loss(x, s, b):
        y = fn(x, s, b)
        return 0.5 * jnp.sum(y * y) + jnp.sum(y * c)

    # The params are differentiated too, so the first derivative runs the native backward
    # where the plan has it; the second derivatives are taken in x.
    dx = lambda x: jax.grad(loss, argnums=(0, 1, 2))(x, s, b)[0]  # noqa: E731

    def both(x, t):
        return jax.jvp(dx, (x,), (t,))[1], jax.grad(lambda x: jnp.vdot(dx(x), t))(x)

    lowered = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).lower(x, s, b).as_text()
    assert ("_backward" in lowered) == (name in NATIVE_BACKWARD)
    # With frozen params (only dx) the row kernels step aside: XLA drops the params' sums.
    frozen = jax.jit(jax.grad(loss)).lower(x, s, b).as_text()
    assert ("_backward" in frozen) == (name == "group_norm_3d")
    if name not in NATIVE_BACKWARD:
        # No native backward: the XLA derivatives, compared with the plain formula's at this
        # size with the kernels on in tests/functional/test_f_derivatives.py.
        return
    got = jax.jit(both)(x, t)
    with cpu_kernels.enabled(False):
        expected = jax.jit(both)(x, t)
    for a, e in zip(got, expected):
        top = float(jnp.max(jnp.abs(e)))
        np.testing.assert_allclose(np.asarray(a) / top, np.asarray(e) / top, atol=1e-4)


def test_batchnorm_at_inference_second_derivative(kernels_on):
    rng = np.random.default_rng(2)
    x = jnp.asarray(rng.standard_normal((32, 32, 32, 64)), jnp.float32)
    t = jnp.asarray(rng.standard_normal(x.shape), jnp.float32)
    layer = normzoo.BatchNorm(use_running_average=True)
    v = layer.init(jax.random.key(0), x)
    v = jax.tree.map(lambda p: p + 0.1 * jnp.arange(p.size).reshape(p.shape) / p.size, v)
    loss = lambda x: jnp.sum(jnp.sin(layer.apply(v, x)))  # noqa: E731
    assert "normzoo_channel_affine" in jax.jit(lambda x: layer.apply(v, x)).lower(x).as_text()
    assert "normzoo_" not in jax.jit(jax.grad(loss)).lower(x).as_text()

    def both(x, t):
        return (jax.jvp(jax.grad(loss), (x,), (t,))[1],
                jax.grad(lambda x: jnp.vdot(jax.grad(loss)(x), t))(x))

    got = jax.jit(both)(x, t)
    with cpu_kernels.enabled(False):
        expected = jax.jit(both)(x, t)
    for a, e in zip(got, expected):
        np.testing.assert_allclose(a, e, rtol=1e-5, atol=1e-5)
