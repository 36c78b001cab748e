"""Smoke test of ``python -m benchmarks --devices``, and of the collective counter it uses.

The counter reads compiled HLO text; it is checked on programs whose collectives are known
(a sharded BatchNorm: all-reduces of C floats; a replicated output of a sharded input: an
all-gather). The CLI runs ``--devices 1,2`` at tiny size in a fresh process (its workers are
fresh processes too: the device count is fixed when jax is imported). Speed is never
asserted (DESIGN.md section 4); the structure and the collectives are.
"""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys
import tempfile

import jax
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

import background
import normzoo
from benchmarks import cli, devices

ROOT = pathlib.Path(__file__).resolve().parents[2]
SMOKE = ("--devices", "1,2", "--quick", "--models", "mlp", "--repeats", "1", "--target-ms", "1")


def _mesh(n: int = 8) -> jax.sharding.Mesh:
    if len(jax.devices()) < n:
        pytest.skip(f"needs {n} devices")
    return jax.sharding.Mesh(np.array(jax.devices()[:n]), ("data",))


def test_collectives_of_a_sharded_batch_norm_are_all_reduces_of_the_moments():
    mesh = _mesh()
    x = jax.device_put(np.random.default_rng(0).normal(size=(32, 12)).astype(np.float32),
                       NamedSharding(mesh, P("data")))
    layer = normzoo.BatchNorm(use_running_average=False)
    variables = layer.init(jax.random.key(0), x)
    text = jax.jit(lambda v, x: layer.apply(v, x, mutable=["batch_stats"])).lower(
        variables, x).compile().as_text()
    found = devices.collectives(text)
    assert set(found) == set(devices.COLLECTIVES)
    assert found["all-reduce"]["count"] >= 1
    assert found["all-reduce"]["max_elements"] == 12  # per-feature moments, not activations
    assert all(found[op]["count"] == 0 for op in devices.COLLECTIVES if op != "all-reduce")


def test_collectives_counts_a_gather():
    # The counter can see what the benchmark asserts is absent.
    mesh = _mesh()
    x = jax.device_put(np.ones((32, 12), np.float32), NamedSharding(mesh, P("data")))
    gather = jax.jit(lambda x: x * 2, out_shardings=NamedSharding(mesh, P()))
    found = devices.collectives(gather.lower(x).compile().as_text())
    assert found["all-gather"]["count"] >= 1 and found["all-gather"]["max_elements"] == 32 * 12


def test_devices_flag_parses_counts():
    assert cli.parser().parse_args(["--devices", "1,2,4,8"]).devices == [1, 2, 4, 8]
    with pytest.raises(SystemExit):
        cli.parser().parse_args(["--devices", "0,2"])
    env = devices.child_env(4, "cpu")
    assert env["XLA_FLAGS"].split().count("--xla_force_host_platform_device_count=4") == 1
    assert "device_count=8" not in env["XLA_FLAGS"]


def _run_cli(environ: dict) -> tuple[subprocess.CompletedProcess, dict | None]:
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "devices.json")
        env = dict(environ, JAX_PLATFORMS="cpu")
        run = subprocess.run([sys.executable, "-m", "benchmarks", *SMOKE, "--json", path],
                             cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
        rows = json.load(open(path)) if os.path.exists(path) else None
    return run, rows


def background_jobs(items):
    """The CLI run, started when collection ends (tests/background.py)."""
    if any(item.name == "test_devices_cli_smoke" for item in items):
        yield ("benchmarks-devices",), _run_cli, (dict(os.environ),)


@pytest.mark.slow  # a fresh process timing four device counts; the parsing and HLO checks above stay in CI
def test_devices_cli_smoke():
    run, out = background.result(("benchmarks-devices",), _run_cli, dict(os.environ))
    assert run.returncode == 0, run.stderr[-4000:]
    rows = out["rows"]
    assert [r["devices"] for r in rows] == [1, 2]
    one, two = rows
    assert one["global_batch"] == two["global_batch"] == 2 * two["per_device_batch"]
    assert one["norm_layers"] == two["norm_layers"] == 5  # the MLP's five BatchNorms
    assert all(one["collectives"][op]["count"] == 0 for op in devices.COLLECTIVES)
    # data parallel: the moments and the gradients all-reduced, no activations gathered
    assert two["forward_collectives"]["all-reduce"]["count"] >= two["norm_layers"]
    assert two["forward_collectives"]["all-reduce"]["max_elements"] <= 16  # width-16 moments
    for op in ("all-gather", "all-to-all", "reduce-scatter"):
        assert two["collectives"][op]["count"] == 0, (op, two["collectives"])
    assert all(r["median_s"] > 0 for r in rows)
    # the markdown table on stdout, with the CPU caveat
    assert "| mlp BatchNorm | 2 |" in run.stdout and "not a speed-up" in run.stdout
