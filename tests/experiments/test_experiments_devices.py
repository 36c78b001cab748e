"""Experiments over devices and hosts (experiments.distributed): 8 simulated CPU devices against
one, synchronized against per-device statistics, the flags' errors, and two jax.distributed
processes on 127.0.0.1 against a single-process run.

The conftest gives this process 8 CPU devices. Long runs drift apart by float32 rounding alone
(chaotic training), so the comparisons cover the first epochs only.
"""
from __future__ import annotations

import csv
import functools
import os
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import background
from experiments import cli, distributed
from experiments.common import Context, Job, Options
from experiments.data import load_dataset
from experiments.models import build_model, norm_overrides_for
from experiments.suites import SUITES
from experiments.train import Run, TrainSpec, batch_order, init_states, iter_metric, make_parallel_epoch_fn, train_job

ROOT = Path(__file__).resolve().parents[2]
RTOL = 2e-5  # float32 summation order over the first epochs
METRICS = ("train_loss", "train_acc", "val_loss", "val_acc", "test_loss", "test_acc")


@pytest.fixture(scope="module")
def tiny():
    return load_dataset("digits", train_size=240, val_fraction=0.25)


@functools.lru_cache(maxsize=None)
def _mlp(norm="bn"):
    return build_model("mlp", num_classes=10, width=16, depth=2, norm=norm,
                       norm_overrides=norm_overrides_for(norm, stateful={"momentum": 0.9}))


RUNS = (Run(seed=0, lr=0.1), Run(seed=1, lr=0.05, init_std=0.1))


def _close(a, b, epochs=None):
    for key in METRICS:
        u, v = iter_metric(a.records, key), iter_metric(b.records, key)
        if epochs is not None:
            u, v = u[:, : epochs + 1], v[:, : epochs + 1]
        np.testing.assert_allclose(v, u, rtol=RTOL, atol=1e-6, err_msg=key)


@pytest.mark.slow  # the default run has the CLI's version: test_cli_devices_eight_matches_one
@pytest.mark.parametrize("batch", [24, 20], ids=["divides", "padded"])
def test_eight_devices_synchronized_equal_one_device(tiny, batch):
    """20 rows over 8 devices: padded to 24 for the transfer and masked, statistics exact."""
    assert jax.device_count() == 8
    spec = TrainSpec(batch_size=batch, epochs=3, init="std")
    one = train_job(_mlp(), spec, tiny, RUNS)
    eight = train_job(_mlp(), spec, tiny, RUNS, parallel=distributed.data_parallel(8, sync=True))
    _close(one, eight)
    assert eight.states.params["dense_0"]["kernel"].sharding.device_set == {jax.local_devices()[0]}


def _one_step(data, norm, sync):
    """States before and after one step of batch 24 over 4 devices (K=1, steps=1)."""
    dp = distributed.data_parallel(4, sync=sync)
    states = init_states(_mlp(norm), TrainSpec(batch_size=24, epochs=1), data.x_train[:2], [RUNS[0]])
    idx = batch_order(0, 1, len(data.y_train), 24)[None, :1]  # (K=1, steps=1, B=24)
    after, _ = make_parallel_epoch_fn(dp, 24)(dp.replicate(states), *dp.batches(data.x_train, data.y_train, idx))
    return states, after, idx[0, 0]


def _leaves(state):
    return [np.asarray(a) for a in jax.tree_util.tree_leaves((state.params, state.batch_stats))]


def test_per_device_statistics_are_ghost_batches(tiny):
    """--no-bn-sync: one step equals the mean over 4 ghost batches of the single-device step."""
    states, got, rows = _one_step(tiny, "bn", sync=False)
    x, y = jnp.asarray(tiny.x_train[rows]), jnp.asarray(tiny.y_train[rows])
    st = jax.tree_util.tree_map(lambda a: a[0], states)

    @jax.jit
    def ghost_step(st, x, y):
        def ghost_loss(params, xg, yg):
            logits, upd = st.apply_fn({"params": params, "batch_stats": st.batch_stats}, xg, train=True,
                                      dropout_rate=0.0, rngs={"dropout": st.dropout_key}, mutable=["batch_stats"])
            return optax.softmax_cross_entropy_with_integer_labels(logits, yg).mean(), upd["batch_stats"]

        grads, stats = jax.vmap(jax.grad(ghost_loss, has_aux=True), in_axes=(None, 0, 0))(
            st.params, x.reshape(4, 6, -1), y.reshape(4, 6))
        mean = functools.partial(jax.tree_util.tree_map, lambda a: a.mean(0))
        return st.apply_gradients(grads=mean(grads), batch_stats=mean(stats))

    want = ghost_step(st, x, y)
    for a, b in zip(_leaves(want), _leaves(got)):
        np.testing.assert_allclose(b[0], a, rtol=1e-5, atol=1e-6)


def test_per_device_statistics_differ_only_for_batch_statistics(tiny):
    """BN sees 6-row ghost batches and steps differently; LayerNorm (per sample) does not care."""
    for norm, same in (("ln", True), ("bn", False)):
        _, sync, _ = _one_step(tiny, norm, sync=True)
        _, ghost, _ = _one_step(tiny, norm, sync=False)
        diff = max(float(np.max(np.abs(a - b))) for a, b in zip(_leaves(sync), _leaves(ghost)))
        assert (diff < 1e-5) == same, (norm, diff)


def test_per_device_statistics_refuse_a_batch_that_does_not_divide(tiny):
    with pytest.raises(distributed.DeviceError, match=r"batch 20, 8 devices"):
        train_job(_mlp(), TrainSpec(batch_size=20, epochs=1), tiny, RUNS[:1],
                  parallel=distributed.data_parallel(8, sync=False))


def test_job_ids_keep_their_one_device_keys(tmp_path):
    data = load_dataset("digits", train_size=100)
    job = Job(name="bn", model={"kind": "mlp"}, spec=TrainSpec(), runs=[Run()])
    ids = {}
    for devices, sync in ((1, True), (1, False), (8, True), (8, False)):
        ctx = Context("init-scale", Options(out=tmp_path, devices=devices, bn_sync=sync))
        ids[devices, sync] = ctx.job_id(job, data)
        assert (ctx.parallel is None) == (devices == 1)
    assert ids[1, True] == ids[1, False]  # one device: the flag does nothing, the key is unchanged
    assert len({ids[1, True], ids[8, True], ids[8, False]}) == 3


@pytest.mark.slow
def test_init_scale_quick_on_eight_devices_matches_one(tmp_path):
    """The acceptance run: ``init-scale --quick`` (batch 100 over 8 devices: padded to 104 and
    masked), 32 runs of 20 epochs, against one device. The first 3 epochs agree to float32
    rounding; later epochs of the chaotic runs (tiny init std with BN) drift apart by rounding."""
    common = ["init-scale", "--quick", "--no-progress", "--compile-cache", "none"]
    assert cli.main([*common, "--devices", "1", "--out", str(tmp_path / "one")]) == 0
    assert cli.main([*common, "--devices", "8", "--out", str(tmp_path / "eight")]) == 0
    _assert_same_metrics(_metrics(tmp_path / "one" / "metrics.csv"), _metrics(tmp_path / "eight" / "metrics.csv"), 3)


def _metrics(path):
    with open(path) as f:
        return list(csv.DictReader(f))


def _assert_same_metrics(ref, got, max_epoch):
    assert len(ref) == len(got) > 0
    for r, g in zip(ref, got):
        if int(r["epoch"]) > max_epoch:
            continue
        for key in METRICS:
            if r.get(key) not in (None, "", "nan"):
                np.testing.assert_allclose(float(g[key]), float(r[key]), rtol=RTOL, atol=1e-6, err_msg=key)


TINY_CLI = ["init-scale", "--quick", "--epochs", "2", "--seeds", "1", "--width", "8", "--depth", "2",
            "--train-size", "200", "--batch-size", "18", "--norms", "bn", "--no-progress", "--compile-cache", "none"]


def test_cli_devices_eight_matches_one(tmp_path, monkeypatch):
    """``--devices 8`` (batch 18: padded to 24 and masked) against ``--devices 1``."""
    monkeypatch.setitem(SUITES["init-scale"].QUICK, "stds", [1.0, 0.01])
    assert cli.main([*TINY_CLI, "--devices", "1", "--out", str(tmp_path / "one")]) == 0
    assert cli.main([*TINY_CLI, "--devices", "8", "--out", str(tmp_path / "eight")]) == 0
    _assert_same_metrics(_metrics(tmp_path / "one" / "metrics.csv"), _metrics(tmp_path / "eight" / "metrics.csv"), 2)
    assert not {p.name for p in (tmp_path / "one" / "runs").glob("*.json")} & {
        p.name for p in (tmp_path / "eight" / "runs").glob("*.json")}  # separate cache entries


@pytest.mark.parametrize("flags, message", [
    (["--devices", "0"], "--devices 0: expected 1 to 8"),
    (["--devices", "99"], "--devices 99: expected 1 to 8"),
    (["--devices", "8", "--no-bn-sync"], "batch 18, 8 devices"),
    (["--num-processes", "2", "--process-id", "2"], "--process-id 2 with --num-processes 2"),
])
def test_cli_refuses_bad_device_flags_in_one_line(tmp_path, monkeypatch, capsys, flags, message):
    monkeypatch.setitem(SUITES["init-scale"].QUICK, "stds", [1.0])
    assert cli.main([*TINY_CLI, *flags, "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and message in err[0], err


# -- two processes ---------------------------------------------------------------------------------

TWO_PROCESS_DRIVER = """
import sys
from experiments.suites import SUITES
SUITES["init-scale"].QUICK["stds"] = [1.0, 0.01]
from experiments import cli
raise SystemExit(cli.main(sys.argv[1:]))
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _two_processes(tmp: str) -> list[tuple[int, str]]:
    """Process 0 and 1 of one jax.distributed run, 2 CPU devices each (a 4-device mesh); returns
    (exit code, log) per process. Each writes to its own --out, so process 1's must stay empty."""
    port = _free_port()
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": "--xla_force_host_platform_device_count=2"}
    procs = []
    for i in range(2):
        args = [*TINY_CLI, "--coordinator", f"127.0.0.1:{port}", "--num-processes", "2", "--process-id", str(i),
                "--out", str(Path(tmp) / f"p{i}")]
        procs.append(subprocess.Popen([sys.executable, "-c", TWO_PROCESS_DRIVER, *args], cwd=ROOT, env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    out = []
    for p in procs:
        try:
            log, _ = p.communicate(timeout=500)
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            raise
        out.append((p.returncode, log))
    return out


_TMP = tempfile.mkdtemp(prefix="normzoo-two-processes-")


def background_jobs(items):
    """The two-process run, started when collection ends (tests/background.py)."""
    if any(item.name == "test_two_processes_match_one" for item in items):
        yield "two_processes", _two_processes, (_TMP,)


def test_two_processes_match_one(tmp_path, monkeypatch):
    """jax.distributed over 2 processes on 127.0.0.1 (gloo), each feeding its own 2 devices:
    the same metrics as one process on one device; only process 0 writes."""
    results = background.result("two_processes", _two_processes, _TMP)
    for code, log in results:
        assert code == 0, log[-3000:]
    monkeypatch.setitem(SUITES["init-scale"].QUICK, "stds", [1.0, 0.01])
    assert cli.main([*TINY_CLI, "--devices", "1", "--out", str(tmp_path / "ref")]) == 0
    _assert_same_metrics(_metrics(tmp_path / "ref" / "metrics.csv"), _metrics(Path(_TMP) / "p0" / "metrics.csv"), 2)
    assert (Path(_TMP) / "p0" / "report.md").is_file()
    assert not (Path(_TMP) / "p1").exists()  # process 1 wrote nothing
