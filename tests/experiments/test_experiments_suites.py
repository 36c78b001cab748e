"""Every suite in a tiny configuration writes its files with finite numbers; reports, resume, CLI."""
from __future__ import annotations

import csv
import json
import math
import re

import pytest

from experiments import cli
from experiments.common import INCONCLUSIVE, NOT_SUPPORTED, SUPPORTED, Context, Options
from experiments.report import write_reports
from experiments.suites import SUITES

# Shrink each suite's --quick settings further (tests only): fewer jobs means fewer compilations.
TINY = {
    "init-scale": dict(stds=[1.0, 0.1, 0.01]),
    "overfitting": dict(),
    "hparam-search": dict(trials=6, searches=2),
    "batch-size": dict(batch_sizes=[4, 16], norms=["bn", "gn"], model="mlp", devices=2),  # the CNN: see test_models
    "whitening": dict(norms=["bn", "zca", "not-a-layer"], probe_size=64, batch_size=32, lrs=[0.1]),
    "covariate-shift": dict(),
    "placement": dict(activations=["sigmoid"]),
    "train-vs-eval": dict(momenta=[0.9], batch_size=16),
    "lr-robustness": dict(lrs=[0.01, 1.0], norms=["none", "bn"]),
    "small-batch": dict(batch_sizes=[4, 16], norms=["bn", "gn+ws", "not-a-layer"]),
    "no-norm": dict(norms=["ln", "dyt"]),
}


def run_tiny(name, out, monkeypatch):
    for k, v in TINY[name].items():
        monkeypatch.setitem(SUITES[name].QUICK, k, v)
    opts = Options(out=out, quick=True, epochs=1, seeds=[0], width=8, depth=2, train_size=200, progress=False,
                   checkpoint_every=1e9)
    report = SUITES[name].run(Context(name, opts))
    write_reports([report], out)
    return report


def _finite_metrics(path):
    with open(path) as f:
        rows = list(csv.DictReader(f))
    assert rows
    for r in rows:
        for key in ("train_acc", "val_acc", "test_acc"):
            if r.get(key):
                assert math.isfinite(float(r[key])), (key, r)
    return rows


# hparam-search (one vmapped job) runs by default; the others compile several models each, which
# costs 10-25 s per suite on 2 shared cores, so they run with ``-m slow``.
FAST = {"hparam-search"}


@pytest.mark.parametrize(
    "name", [n if n in FAST else pytest.param(n, marks=pytest.mark.slow) for n in SUITES]
)
def test_suite_tiny_run_writes_everything(name, tmp_path, monkeypatch):
    out = tmp_path / name
    report = run_tiny(name, out, monkeypatch)
    for f in ("config.json", "metrics.csv", "metrics.jsonl", "report.md", "report.html"):
        assert (out / f).is_file(), f
    assert list(out.glob("*.png"))
    _finite_metrics(out / "metrics.csv")
    for line in (out / "metrics.jsonl").read_text().splitlines():
        json.loads(line)  # strict JSON: NaN written as null
    assert report.claims
    assert {c.verdict for c in report.claims} <= {SUPPORTED, NOT_SUPPORTED, INCONCLUSIVE}
    md = (out / "report.md").read_text()
    assert all(c.claim in md for c in report.claims)
    html = (out / "report.html").read_text()
    assert "data:image/png;base64," in html and not re.search(r"<img src=['\"](?!data:)", html)
    config = json.loads((out / "config.json").read_text())
    assert config["suite"] == name and config["quick"] is True


def test_missing_normalizers_are_skipped_with_a_note(tmp_path):
    ctx = Context("whitening", Options(out=tmp_path))
    assert ctx.available(["bn", "not-a-layer"], 8, 2) == ["bn"]
    assert any("not-a-layer" in n for n in ctx.notes)


def test_rerun_resumes_and_reproduces(tmp_path, monkeypatch):
    run_tiny("lr-robustness", tmp_path, monkeypatch)
    first = (tmp_path / "metrics.csv").read_text()
    results = sorted((tmp_path / "runs").glob("*.json"))
    assert len(results) == 2
    stamp = results[0].stat().st_mtime_ns
    results[1].unlink()  # as if the sweep had been interrupted during the second job
    run_tiny("lr-robustness", tmp_path, monkeypatch)
    assert results[0].stat().st_mtime_ns == stamp  # finished job was not rerun
    assert results[1].is_file()
    assert (tmp_path / "metrics.csv").read_text() == first  # same seed, same numbers


def test_cli_help_lists_every_suite(capsys):
    with pytest.raises(SystemExit):
        cli.main(["--help"])
    text = capsys.readouterr().out
    for name in [*SUITES, "all", "--quick", "--norms", "--seeds", "--data-dir"]:
        assert name in text


def test_cli_reports_missing_data(tmp_path, capsys):
    assert cli.main(["init-scale", "--dataset", "mnist", "--data-dir", str(tmp_path), "--out", str(tmp_path / "o"),
                     "--no-progress", "--compile-cache", "none"]) == 2
    assert "train-images-idx3-ubyte.gz" in capsys.readouterr().err
