"""Training engine: determinism, divergence, resume from a checkpoint, sharded batches, and one
claim checked for real (BN vs none at a tiny init std)."""
from __future__ import annotations

import functools
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments.data import load_dataset
from experiments.models import build_model, norm_overrides_for
from experiments.train import Run, TrainSpec, batch_order, final, init_states, make_train_step, train_job

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def tiny():
    return load_dataset("digits", train_size=240, val_fraction=0.25)


@functools.lru_cache(maxsize=None)
def _mlp(norm="bn", **kw):
    """One model instance per configuration, so tests share compiled functions."""
    return build_model("mlp", num_classes=10, width=16, depth=2, norm=norm,
                       norm_overrides=norm_overrides_for(norm, stateful={"momentum": 0.9}), **kw)


SPEC = TrainSpec(optimizer="sgd", batch_size=30, epochs=2)


def test_same_seed_same_numbers_and_finite(tiny):
    runs = [Run(seed=0, lr=0.1), Run(seed=1, lr=0.1)]
    a = train_job(_mlp(), SPEC, tiny, runs)
    b = train_job(_mlp(), SPEC, tiny, runs)
    assert [r["history"] for r in a.records] == [r["history"] for r in b.records]
    h = a.records[0]["history"]
    assert len(h) == SPEC.epochs + 1 and all(np.isfinite(x["train_acc"]) for x in h)
    assert a.records[0]["history"] != a.records[1]["history"]  # different seeds differ
    assert not a.records[0]["diverged"]


def test_runs_do_not_depend_on_their_job_mates(tiny):
    alone = train_job(_mlp(), SPEC, tiny, [Run(seed=3, lr=0.1)])
    grouped = train_job(_mlp(), SPEC, tiny, [Run(seed=5, lr=0.5), Run(seed=3, lr=0.1)])
    np.testing.assert_allclose(final(alone.records[0], "train_loss"), final(grouped.records[1], "train_loss"), rtol=1e-4)


def test_nan_is_recorded_as_diverged(tiny):
    res = train_job(_mlp(), SPEC, tiny, [Run(seed=0, lr=1e30), Run(seed=0, lr=0.1)])
    bad, good = res.records
    assert bad["diverged"] and bad["diverged_epoch"] == 1
    assert not good["diverged"]


def test_interrupted_job_resumes_from_checkpoint(tiny, tmp_path):
    spec = TrainSpec(optimizer="sgd", batch_size=30, epochs=3)
    runs = [Run(seed=0, lr=0.1), Run(seed=1, lr=0.1)]  # same shapes as above: compiled code is reused
    model = _mlp()
    full = train_job(model, spec, tiny, runs)

    def stop(epoch):
        if epoch == 2:
            raise KeyboardInterrupt

    ckpt = tmp_path / "job.msgpack"
    with pytest.raises(KeyboardInterrupt):
        train_job(model, spec, tiny, runs, checkpoint=ckpt, checkpoint_every=0, on_epoch=stop)
    assert ckpt.is_file()
    resumed = train_job(model, spec, tiny, runs, checkpoint=ckpt, checkpoint_every=0)
    assert resumed.records[0]["history"] == full.records[0]["history"]
    assert not ckpt.exists()


def test_claim_bn_beats_none_at_tiny_init_std():
    """DLFS fig. 6-19 at small scale: with weight std 0.01 a 5x100 ReLU MLP without BN does not
    train in 10 epochs (activations vanish); with BN it does."""
    data = load_dataset("digits", train_size=1000)
    spec = TrainSpec(optimizer="sgd", batch_size=100, epochs=10, init="std")
    acc = {}
    for norm in ("none", "bn"):
        model = build_model("mlp", num_classes=10, width=100, depth=5, norm=norm,
                            norm_overrides=norm_overrides_for(norm, stateful={"momentum": 0.9}))
        res = train_job(model, spec, data, [Run(seed=0, lr=0.01, init_std=0.01)])
        acc[norm] = final(res.records[0], "train_acc")
    assert acc["none"] < 0.3
    assert acc["bn"] > acc["none"] + 0.5


def test_train_step_accepts_a_batch_sharded_over_a_mesh(tiny):
    mesh = jax.sharding.Mesh(np.array(jax.devices()), ("data",))
    sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
    model = _mlp()
    state = jax.tree_util.tree_map(lambda a: a[0], init_states(model, SPEC, tiny.x_train[:2], [Run(seed=0, lr=0.1)]))
    idx = batch_order(0, 1, len(tiny.y_train), 8 * jax.device_count())[0]
    x, y = jnp.asarray(tiny.x_train[idx]), jnp.asarray(tiny.y_train[idx])
    step = jax.jit(make_train_step())
    s1, m1 = step(state, (x, y))
    s2, m2 = step(state, (jax.device_put(x, sharding), jax.device_put(y, sharding)))
    np.testing.assert_allclose(m1["loss"], m2["loss"], rtol=1e-5)
    for a, b in zip(jax.tree_util.tree_leaves(s1.batch_stats), jax.tree_util.tree_leaves(s2.batch_stats)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_train_step_sharded_over_four_cpu_devices():
    """Same check with 4 forced host devices, in a subprocess (XLA flags must precede jax import)."""
    code = textwrap.dedent(
        """
        import jax, jax.numpy as jnp, numpy as np
        from experiments.data import load_dataset
        from experiments.models import build_model
        from experiments.train import Run, TrainSpec, init_states, make_train_step
        assert jax.device_count() == 4
        d = load_dataset("digits", train_size=100)
        model = build_model("mlp", num_classes=10, width=16, depth=2, norm="bn")
        st = jax.tree_util.tree_map(lambda a: a[0], init_states(model, TrainSpec(), d.x_train[:2], [Run()]))
        x, y = jnp.asarray(d.x_train[:32]), jnp.asarray(d.y_train[:32])
        sh = jax.sharding.NamedSharding(jax.sharding.Mesh(np.array(jax.devices()), ("data",)),
                                        jax.sharding.PartitionSpec("data"))
        step = jax.jit(make_train_step())
        a, ma = step(st, (x, y))
        b, mb = step(st, (jax.device_put(x, sh), jax.device_put(y, sh)))
        np.testing.assert_allclose(ma["loss"], mb["loss"], rtol=1e-5)
        for u, v in zip(jax.tree_util.tree_leaves(a.params), jax.tree_util.tree_leaves(b.params)):
            np.testing.assert_allclose(u, v, rtol=1e-4, atol=1e-6)
        print("ok")
        """
    )
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=4", "JAX_PLATFORMS": "cpu"}
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "ok" in out.stdout
