"""The default path: platform-neutral JAX, nothing the user did not ask for.

In a fresh process with default settings the layers start no compiler, leave normzoo's
cache untouched, import nothing from normzoo.backends and put no normzoo custom call into
any program; and no module of the library outside normzoo/backends imports a private JAX
module. (The fresh process starts when collection ends, beside the other tests:
tests/background.py.)
"""

import os
import re
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import background

ROOT = Path(__file__).resolve().parents[1]

SCRIPT = textwrap.dedent("""
    import subprocess, sys

    def refuse(*args, **kwargs):
        raise AssertionError(f"a subprocess was started: {args}")

    subprocess.Popen = refuse  # no compiler (nor anything else) may run

    import jax, jax.numpy as jnp
    import normzoo

    x = jnp.asarray(jax.random.normal(jax.random.key(0), (4, 6, 5, 16)))
    xs = x.reshape(-1, 16)

    def check(name, f, *args):
        text = jax.jit(f).lower(*args).as_text()
        assert not any(t in text for t in ("normzoo_", "custom_call_target=\\"normzoo")), name
        jax.block_until_ready(jax.jit(f)(*args))

    def layer(module, x, train):
        v = module.init(jax.random.key(1), x)

        def loss(params, x):
            out = module.apply({**v, "params": params}, x,
                               mutable=["batch_stats"] if train else False)
            y = out[0] if train else out
            return jnp.sum(y * y)

        check(type(module).__name__, lambda x: module.apply(v, x, mutable=True), x)
        check(type(module).__name__ + " grad", jax.grad(loss, argnums=(0, 1)), v["params"], x)

    layer(normzoo.LayerNorm(), x, False)
    layer(normzoo.BatchNorm(use_running_average=False), x, True)
    layer(normzoo.BatchNorm(use_running_average=True), x, False)
    layer(normzoo.GroupNorm(num_groups=4), x, False)
    layer(normzoo.ZCAWhitening(use_running_average=False), xs, True)
    assert not [m for m in sys.modules if m.startswith("normzoo.backends")], "backend imported"
    print("ok")
""")


def _run_script(environ):
    """SCRIPT's run in a fresh process with a fresh (absent) normzoo cache, and whether that
    cache exists after it."""
    with tempfile.TemporaryDirectory() as tmp:
        cache = Path(tmp) / "cache"
        env = dict(environ, NORMZOO_CACHE_DIR=str(cache), JAX_PLATFORMS="cpu")
        env.pop("NORMZOO_CPU_KERNELS", None)
        done = subprocess.run([sys.executable, "-c", SCRIPT], env=env, cwd=ROOT,
                              capture_output=True, text=True, timeout=600)
        return done, cache.exists()


def background_jobs(items):
    """The script's run, started when collection ends (tests/background.py)."""
    if any(item.name == "test_default_path_starts_no_compiler_and_places_no_custom_call"
           for item in items):
        yield "default_path", _run_script, (dict(os.environ),)


def test_default_path_starts_no_compiler_and_places_no_custom_call():
    done, cache_exists = background.result("default_path", _run_script, dict(os.environ))
    assert done.returncode == 0 and "ok" in done.stdout, done.stderr[-3000:]
    assert not cache_exists  # nothing compiled or cached
    assert "compiling" not in done.stderr


PRIVATE = re.compile(r"^\s*(from|import)\s+jax(\._src|\.interpreters)\b|"
                     r"jax\._src|jax\.interpreters", re.M)


def test_no_private_jax_module_outside_backends():
    package = ROOT / "normzoo"
    offenders = [str(p.relative_to(ROOT)) for p in package.rglob("*.py")
                 if "backends" not in p.relative_to(package).parts
                 and PRIVATE.search(p.read_text())]
    assert not offenders, offenders
