"""The command line refuses nonsense before any training (status 2, one line naming the argument,
the value and what is allowed) and stops cleanly on Ctrl-C (status 130, one line, no traceback)."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from experiments import cli

ROOT = Path(__file__).resolve().parents[2]

# (arguments, the argument named, the value named, what is allowed)
BAD = [
    (["--norms", "foo"], "--norms", "'foo'", "normzoo.registry"),
    (["--norms", "bn,foo"], "--norms", "'foo'", "bn, brn"),
    (["--norms", ","], "--norms", "','", "normzoo.registry"),
    (["--norm-overrides", '{"gn":{"num_grups":4}}'], "--norm-overrides", "'num_grups'", "num_groups"),
    (["--norm-overrides", '{"gnx":{"num_groups":4}}'], "--norm-overrides", "'gnx'", "bn, brn"),
    (["--norm-overrides", '{"gn":{"num_groups":4}'], "--norm-overrides", "not valid JSON", "num_groups"),
    (["--norm-overrides", '{"gn": 4}'], "--norm-overrides", "'{\"gn\": 4}'", "JSON object of objects"),
    (["--norm-overrides", '{"bn":{"use_running_average":true}}'], "--norm-overrides", "'use_running_average'",
     "momentum"),
    (["--epochs", "0"], "--epochs", "0", "integer > 0"),
    (["--epochs", "-3"], "--epochs", "-3", "integer > 0"),
    (["--epochs", "two"], "--epochs", "'two'", "integer > 0"),
    (["--batch-size", "0"], "--batch-size", "0", "integer > 0"),
    (["--lr", "-1"], "--lr", "-1", "number > 0"),
    (["--lr", "0"], "--lr", "0", "number > 0"),
    (["--lr", "inf"], "--lr", "inf", "number > 0"),
    (["--seeds", "0"], "--seeds", "'0'", "count >= 1"),
    (["--seeds", "-2"], "--seeds", "'-2'", "count >= 1"),
    (["--seeds", "0,-1"], "--seeds", "'0,-1'", "seeds >= 0"),
    (["--seeds", "3,3"], "--seeds", "'3,3'", "distinct"),
    (["--width", "0"], "--width", "0", "integer > 0"),
    (["--depth", "-1"], "--depth", "-1", "integer > 0"),
    (["--train-size", "0"], "--train-size", "0", "integer > 0"),
    (["--checkpoint-every", "-1"], "--checkpoint-every", "-1", "number >= 0"),
    (["--workers", "0"], "--workers", "0", "integer > 0"),
]


@pytest.mark.parametrize("suite", ["init-scale", "all"])
@pytest.mark.parametrize("argv,arg,value,allowed", BAD, ids=[" ".join(b[0]) for b in BAD])
def test_bad_argument_exits_2_with_one_line(suite, argv, arg, value, allowed, tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main([suite, *argv, "--out", str(tmp_path / "out"), "--no-progress", "--compile-cache", "none"])
    assert exc.value.code == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1, captured.err
    assert arg in lines[0] and value in lines[0] and allowed in lines[0], lines[0]
    assert captured.out == ""
    assert not (tmp_path / "out").exists()  # refused before anything was written or trained


def test_good_overrides_and_norms_parse():
    args = cli.build_parser().parse_args(
        ["init-scale", "--norms", "none,bn", "--norm-overrides", '{"gn": {"num_groups": 4}, "bn": {"momentum": 0.9}}',
         "--seeds", "0,5", "--lr", "1e-3", "--checkpoint-every", "0"])
    assert args.norms == ["none", "bn"] and args.seeds == [0, 5] and args.lr == 1e-3
    assert args.norm_overrides == {"gn": {"num_groups": 4}, "bn": {"momentum": 0.9}}


def test_layer_fields_are_the_linen_dataclass_fields():
    assert "num_groups" in cli.layer_fields("gn")
    assert "momentum" in cli.layer_fields("bn")
    assert not {"parent", "name", "use_running_average"} & set(cli.layer_fields("bn"))
    assert cli.layer_fields("none") == []


def _interrupt(argv, out: Path, started, timeout: float = 240.0):
    """Start ``python -m experiments argv`` in its own process group, wait until ``started(out)``,
    send SIGINT to the group (as a terminal's Ctrl-C does) and return (returncode, stderr)."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    # A pytest worker may run with SIGINT ignored, and an ignored signal stays ignored across
    # exec (Python then installs no KeyboardInterrupt handler). A terminal starts the command
    # with the default disposition: restore it, then run the CLI as `python -m experiments`.
    start = ("import runpy, signal, sys; signal.signal(signal.SIGINT, signal.default_int_handler); "
             "sys.argv[0] = 'experiments'; runpy.run_module('experiments', run_name='__main__', alter_sys=True)")
    proc = subprocess.Popen([sys.executable, "-c", start, *argv, "--out", str(out), "--no-progress",
                             "--compile-cache", "none", "--checkpoint-every", "0"],
                            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        t0 = time.monotonic()
        while not started(out):
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() - t0 < timeout, "training did not start"
            time.sleep(0.2)
        os.killpg(proc.pid, signal.SIGINT)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    return proc.returncode, err


def _check_interrupted(rc: int, err: str) -> None:
    assert rc == 130, err
    assert "Traceback" not in err, err
    lines = [ln for ln in err.strip().splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("interrupted:"), err
    assert "rerun the same command to resume" in lines[0]


def test_ctrl_c_stops_cleanly(tmp_path):
    # A checkpoint (written after every epoch with --checkpoint-every 0) proves training has
    # started; with many epochs the interrupt lands during training, not after the last epoch
    # (a job removes its checkpoint when it ends).
    rc, err = _interrupt(["init-scale", "--quick", "--epochs", "10000"], tmp_path / "o",
                         lambda o: any(o.glob("checkpoints/*.msgpack")))
    _check_interrupted(rc, err)
    assert str(tmp_path / "o") in err


@pytest.mark.slow
def test_ctrl_c_stops_all_and_its_workers_cleanly(tmp_path):
    rc, err = _interrupt(["all", "--quick", "--workers", "2"], tmp_path / "o",
                         lambda o: any(o.glob("*/checkpoints/*.msgpack")))
    _check_interrupted(rc, err)
