"""Kernels on vs off where the opt-in CPU kernels could have a cliff (docs/performance.md).

    python -m benchmarks.cpu_kernel_cliffs            # single device
    python -m benchmarks.cpu_kernel_cliffs --sharded  # jit with the batch over 8 devices

Prints time(off) / time(on) per row (> 1: the kernels are faster), medians of interleaved
repeats, and an identical twin of the "off" program as the noise control.
"""

from __future__ import annotations

import os
import statistics
import sys
import time

if "--sharded" in sys.argv:
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                               + " --xla_force_host_platform_device_count=8").strip()

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax import lax  # noqa: E402

import normzoo  # noqa: E402
import normzoo.backends.cpu as cpu_kernels  # noqa: E402

STEPS, REPEATS = 5, 15


def _timed(fn, *args):
    jax.block_until_ready(fn(*args))  # compile
    def once():
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        return time.perf_counter() - start
    return once


def _compare(name, build, *args, multi_device=False):
    """``build()`` traced with the kernels off, off again (twin) and on; interleaved."""
    with cpu_kernels.enabled(False):
        off = _timed(jax.jit(build()), *args)
        twin = _timed(jax.jit(build()), *args)
    with cpu_kernels.enabled(True, multi_device=multi_device):
        fn = jax.jit(build())
        custom = "normzoo_" in fn.lower(*args).as_text()
        on = _timed(fn, *args)
    times = {"off": [], "twin": [], "on": []}
    runs = [("off", off), ("twin", twin), ("on", on)]
    for i in range(REPEATS):  # interleaved, each program first in turn
        for key, run in runs[i % 3:] + runs[:i % 3]:
            times[key].append(run())
    m = {k: statistics.median(v) for k, v in times.items()}
    print(f"| {name} | {m['off'] / m['on']:.2f} | {m['off'] / m['twin']:.2f} | "
          f"{'yes' if custom else 'no'} |", flush=True)


def _loss_loop(layer, x, variables, params_used: bool, kind: str):
    """A loop of fwd+bwd with ``0.5 sum(y^2) + sum(y c)``, ``x <- x - lr dx`` (and the
    params' update where they are used), in ``fori_loop`` or ``scan``."""
    c = jnp.asarray(np.random.default_rng(1).standard_normal(x.shape), x.dtype)

    def build():
        def loss(params, x):
            y = layer.apply({**variables, "params": params}, x)
            return 0.5 * jnp.sum(y * y) + jnp.sum(y * c)

        def step(carry):
            params, x = carry
            if params_used:
                gp, gx = jax.grad(loss, argnums=(0, 1))(params, x)
                params = jax.tree.map(lambda p, g: p - 1e-3 * g, params, gp)
            else:
                gx = jax.grad(loss, argnums=1)(params, x)
            return params, x - 1e-3 * gx

        def run(params, x):
            if kind == "fori":
                return lax.fori_loop(0, STEPS, lambda i, c: step(c), (params, x))
            return lax.scan(lambda c, _: (step(c), None), (params, x), None, length=STEPS)[0]

        return run

    return build, (variables["params"], x)


def single_device():
    rng = np.random.default_rng(0)
    ln_x = jnp.asarray(rng.standard_normal((2048, 1024)), jnp.float32)
    img = jnp.asarray(rng.standard_normal((32, 28, 28, 128)), jnp.float32)
    bn_x = jnp.asarray(rng.standard_normal((32, 32, 32, 64)), jnp.float32)
    rows = [("LayerNorm (2048, 1024)", normzoo.LayerNorm(), ln_x),
            ("GroupNorm (32, 28, 28, 128)", normzoo.GroupNorm(num_groups=32), img),
            ("BatchNorm train (32, 28, 28, 128)", normzoo.BatchNorm(use_running_average=False),
             img),
            ("BatchNorm inference (32, 32, 32, 64)", normzoo.BatchNorm(use_running_average=True),
             bn_x)]
    print("| row | time(off) / time(on) | twin (noise) | custom call |")
    print("|---|---|---|---|")
    for name, layer, x in rows:
        variables = layer.init(jax.random.key(0), x)
        if "train" in name:  # a layer whose batch_stats are updated: apply with mutable
            base = layer
            layer = type("Train", (), {"apply": staticmethod(
                lambda v, x: base.apply(v, x, mutable=["batch_stats"])[0])})
        _compare(f"{name}, forward", lambda: (lambda x: layer.apply(variables, x)), x)
        for kind in ("fori", "scan"):
            for used in (True, False):
                build, args = _loss_loop(layer, x, variables, used, kind)
                what = "all grads" if used else "only dx (frozen params)"
                _compare(f"{name}, {kind} loop, {what}", build, *args)
    # vmap: the kernels run once per member (vmap_method="sequential").
    xs = jnp.asarray(rng.standard_normal((8, 256, 1024)), jnp.float32)
    layer = normzoo.LayerNorm()
    v = layer.init(jax.random.key(0), xs[0])
    _compare("LayerNorm vmap over 8 x (256, 1024), forward",
             lambda: jax.vmap(lambda x: layer.apply(v, x)), xs)
    _compare("LayerNorm vmap over 8 x (256, 1024), grad",
             lambda: jax.vmap(jax.grad(lambda x: jnp.sum(layer.apply(v, x) ** 2))), xs)
    xs = jnp.asarray(rng.standard_normal((4, 2048, 1024)), jnp.float32)
    _compare("LayerNorm vmap over 4 x (2048, 1024), grad",
             lambda: jax.vmap(jax.grad(lambda x: jnp.sum(layer.apply(v, x) ** 2))), xs)


def sharded():
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

    mesh = Mesh(np.array(jax.devices()), ("data",))
    rng = np.random.default_rng(0)
    print("| row (batch over 8 devices) | time(off) / time(on) | twin (noise) | custom call |")
    print("|---|---|---|---|")
    for name, layer, shape in (
            ("LayerNorm (2048, 1024)", normzoo.LayerNorm(), (2048, 1024)),
            ("GroupNorm (32, 28, 28, 128)", normzoo.GroupNorm(num_groups=32), (32, 28, 28, 128)),
            ("BatchNorm inference (32, 32, 32, 64)", normzoo.BatchNorm(use_running_average=True),
             (32, 32, 32, 64))):
        x = jax.device_put(jnp.asarray(rng.standard_normal(shape), jnp.float32),
                           NamedSharding(mesh, P("data")))
        v = layer.init(jax.random.key(0), x)
        for multi in (False, True):
            label = "enable()" if not multi else "enable(multi_device=True)"
            _compare(f"{name}, forward, {label}", lambda: (lambda x: layer.apply(v, x)), x,
                     multi_device=multi)
        with cpu_kernels.enabled(True, multi_device=True):
            y = jax.jit(lambda x: layer.apply(v, x))(x)
        with cpu_kernels.enabled(True):
            y_default = jax.jit(lambda x: layer.apply(v, x))(x)
        print(f"|   output sharding: enable() {y_default.sharding.spec}, "
              f"multi_device=True {y.sharding.spec} | | | |", flush=True)


if __name__ == "__main__":
    assert cpu_kernels.available(), cpu_kernels.failure()
    print(f"jax {jax.__version__}, {os.cpu_count()} CPUs, {jax.device_count()} devices")
    sharded() if "--sharded" in sys.argv else single_device()
