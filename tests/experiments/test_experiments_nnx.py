"""``--api nnx``: the experiment models built in Flax NNX give the Linen models' numbers per seed.

A tiny run of each API (same data, seed and settings) must give equal metrics: losses to float32
rounding, accuracies exactly; for the MLP and CNN, with BatchNorm (running statistics) and a
stateless normalizer (LayerNorm / GroupNorm), with dropout (same masks); a suite through the
command line (MLP with BatchNorm); and the command line's error for an unknown API.
"""
from __future__ import annotations

import csv

import jax
import numpy as np
import pytest

from experiments import cli
from experiments.data import load_dataset
from experiments.models import build_model, norm_overrides_for
from experiments.nnx_models import NNXModel
from experiments.suites import SUITES
from experiments.train import Run, TrainSpec, train_job

RTOL = 1e-5
SPEC = TrainSpec(optimizer="momentum", batch_size=24, epochs=1, eval_chunk=128)
# runs of one job: another seed with weight decay; the first seed with dropout (dropout=True models)
RUNS = [Run(seed=0, lr=0.05), Run(seed=1, lr=0.05, weight_decay=1e-3), Run(seed=0, lr=0.05, dropout=0.2)]


@pytest.fixture(scope="module")
def tiny():
    return load_dataset("digits", train_size=96, test_size=64, val_fraction=0.25)  # 3 steps per epoch


def _model(api, kind, norm, dropout=False):
    return build_model(kind, num_classes=10, width=4, depth=2, norm=norm, dropout=dropout, api=api,
                       norm_overrides=norm_overrides_for(norm, stateful={"momentum": 0.9}))


def assert_same_history(linen_records, nnx_records):
    for a, b in zip(linen_records, nnx_records, strict=True):
        assert len(a["history"]) == len(b["history"]) == SPEC.epochs + 1
        for ha, hb in zip(a["history"], b["history"]):
            assert ha.keys() == hb.keys()
            for key in ha:
                if key.endswith("_acc") or key == "epoch":
                    assert ha[key] == hb[key], (key, ha, hb)
                else:
                    np.testing.assert_allclose(hb[key], ha[key], rtol=RTOL, err_msg=key)


@pytest.mark.parametrize(
    "kind,norm,dropout",
    [("mlp", "ln", True), ("cnn", "bn", False), ("cnn", "gn", True)],  # MLP + BN: the CLI test below
)
def test_nnx_training_gives_the_linen_numbers(tiny, kind, norm, dropout):
    linen, nnx_model = _model("linen", kind, norm, dropout), _model("nnx", kind, norm, dropout)
    assert isinstance(nnx_model, NNXModel)
    a = train_job(linen, SPEC, tiny, RUNS)
    b = train_job(nnx_model, SPEC, tiny, RUNS)
    assert_same_history(a.records, b.records)
    # the trained states agree too: same tree (NNX attribute names are the Linen submodule names)
    assert jax.tree_util.tree_structure(a.states.params) == jax.tree_util.tree_structure(b.states.params)
    assert jax.tree_util.tree_structure(a.states.batch_stats) == jax.tree_util.tree_structure(b.states.batch_stats)
    for u, v in zip(jax.tree_util.tree_leaves((a.states.params, a.states.batch_stats)),
                    jax.tree_util.tree_leaves((b.states.params, b.states.batch_stats))):
        np.testing.assert_allclose(v, u, rtol=1e-4, atol=1e-6)
    if dropout:  # the dropout run really dropped units (and still matched)
        assert a.records[2]["history"][1]["train_loss"] != a.records[0]["history"][1]["train_loss"]


def test_nnx_model_is_built_from_normzoo_nnx_layers():
    from flax import nnx

    import normzoo.nnx as znnx

    model = nnx.eval_shape(lambda: _model("nnx", "cnn", "gn").module((8, 8, 1)))  # structure, no compute
    assert isinstance(model, nnx.Module)
    assert isinstance(model.conv_0, nnx.Conv) and isinstance(model.head, nnx.Linear)
    assert isinstance(model.GroupNorm_0, znnx.GroupNorm) and isinstance(model.GroupNorm_1, znnx.GroupNorm)
    bn = nnx.eval_shape(lambda: _model("nnx", "mlp", "bn").module((64,)))
    assert isinstance(bn.BatchNorm_1, znnx.BatchNorm) and bn.BatchNorm_1.momentum == 0.9


def _metrics(path):
    with open(path) as f:
        return list(csv.DictReader(f))


def test_cli_suite_with_api_nnx_matches_linen(tmp_path, monkeypatch):
    """``python -m experiments lr-robustness --api nnx``: an MLP with BatchNorm, one job of two runs."""
    monkeypatch.setitem(SUITES["lr-robustness"].QUICK, "lrs", [0.05, 1.0])
    common = ["lr-robustness", "--quick", "--epochs", "1", "--seeds", "1", "--width", "8", "--depth", "2",
              "--train-size", "120", "--batch-size", "24", "--norms", "bn", "--no-progress", "--compile-cache", "none"]
    assert cli.main([*common, "--out", str(tmp_path / "linen")]) == 0
    assert cli.main([*common, "--api", "nnx", "--out", str(tmp_path / "nnx")]) == 0
    rows_l, rows_n = _metrics(tmp_path / "linen" / "metrics.csv"), _metrics(tmp_path / "nnx" / "metrics.csv")
    assert len(rows_l) == len(rows_n) > 0
    for rl, rn in zip(rows_l, rows_n):
        assert rl.keys() == rn.keys()
        for key, vl in rl.items():
            if key.endswith("_loss") and vl not in ("", "nan"):
                np.testing.assert_allclose(float(rn[key]), float(vl), rtol=RTOL, err_msg=key)
            else:
                assert rn[key] == vl, key
    assert '"api": "nnx"' in (tmp_path / "nnx" / "config.json").read_text()
    # separate cache entries: the NNX run trained its own jobs
    assert not set(p.name for p in (tmp_path / "linen" / "runs").glob("*.json")) & set(
        p.name for p in (tmp_path / "nnx" / "runs").glob("*.json"))


def test_cli_rejects_an_unknown_api(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["hparam-search", "--api", "flax"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "--api" in err and "invalid choice: 'flax'" in err and "linen" in err and "nnx" in err


def test_cli_help_documents_api(capsys):
    with pytest.raises(SystemExit):
        cli.main(["--help"])
    assert "--api {linen,nnx}" in capsys.readouterr().out


def test_build_model_rejects_an_unknown_api():
    with pytest.raises(ValueError, match="api='flax'"):
        build_model("mlp", num_classes=10, api="flax")


@pytest.mark.slow  # a few more seconds of compilation; the MLP and CNN above run by default
def test_resnet_nnx_starts_from_and_computes_the_linen_values(tiny):
    """The ResNet (stem, blocks with a projection, auto-named normalizers): same initial state and
    the same logits, in training (batch statistics) and inference mode."""
    from experiments.train import forward, init_states

    linen, nnx_model = _model("linen", "resnet", "bn"), _model("nnx", "resnet", "bn")
    sa, sb = (jax.tree_util.tree_map(lambda v: v[0], init_states(m, SPEC, tiny.x_train[:2], RUNS[:1]))
              for m in (linen, nnx_model))
    assert jax.tree_util.tree_structure(sa.params) == jax.tree_util.tree_structure(sb.params)
    assert "block1_proj" in sb.params and "BatchNorm_4" in sb.batch_stats
    for u, v in zip(jax.tree_util.tree_leaves((sa.params, sa.batch_stats)),
                    jax.tree_util.tree_leaves((sb.params, sb.batch_stats))):
        np.testing.assert_array_equal(v, u)
    x = tiny.x_train[:16]
    for mode in (False, True):
        fn = jax.jit(lambda s, x: forward(s, x, batch_stats_mode=mode))
        np.testing.assert_allclose(fn(sb, x), fn(sa, x), rtol=RTOL, atol=1e-6)
