"""Smoke tests of the benchmark harness: tiny shapes, 1-2 repeats, structure only.

Speed is never asserted here (DESIGN.md section 4); these tests only check that the
harness runs every kind of group (stateless and stateful layers, fwd and fwd+bwd, bf16,
whitening with and without normzoo's functions) and that its outputs are well formed.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from benchmarks import backend, cli, layers, report, training, whitening
from benchmarks.harness import GroupResult, per_iteration, time_group

TINY = dict(repeats=2, target_s=1e-4, min_iters=2)


@pytest.fixture(scope="module")
def layer_results():
    groups = layers.build_groups(["ln"], ["bfloat16"], ["fwd"], quick=True, shapes={"ln": (8, 16)})
    groups += layers.build_groups(["bn"], ["float32"], ["fwd+bwd"], quick=True,
                                  shapes={"bn": (2, 3, 3, 8)}, impls=("normzoo", "flax_fast"))
    cache = {}
    return [time_group(g, cache=cache, **TINY) for g in groups]


@pytest.fixture(scope="module")
def whitening_results():
    groups, notes = whitening.build_groups(configs=[(4, 2)], samples=16, ops=("cov", "newton3"))
    return [time_group(g, **TINY) for g in groups], notes


def test_layer_groups_have_every_implementation_and_a_copy(layer_results):
    keys = [(r.meta["variant"], r.meta["pass"], r.meta["dtype"]) for r in layer_results]
    assert keys == [("ln", "fwd", "bfloat16"),
                    ("bn-train", "fwd+bwd", "float32"), ("bn-eval", "fwd+bwd", "float32")]
    assert set(layer_results[0].impls) == {*backend.columns(), "flax_fast", "flax_2pass",
                                           "jnp", "copy", "copy_twin"}
    assert layer_results[0].controls == ("copy_twin",)
    assert layer_results[0].control_ratio() > 0
    for r in layer_results[1:]:
        assert set(r.impls) == {"normzoo", "flax_fast", "copy", "copy_twin"}
    for r in layer_results:
        assert r.reference == "normzoo" and r.roofline == "copy"
        assert not r.notes, r.notes  # every implementation stayed finite
        for impl in r.impls.values():
            assert impl.iters >= 2  # its own trip count (runs of n and 2n iterations)
            assert len(impl.times_s) == 2 and all(t > 0 for t in impl.times_s)
            assert impl.compile_s > 0 and impl.finite


def test_ratios_copy_fractions_and_memory(layer_results):
    for r in layer_results:
        zoo, flax = r.impls["normzoo"], r.impls["flax_fast"]
        assert r.ratio("flax_fast") == pytest.approx(flax.median_s / zoo.median_s)
        assert r.copy_fraction("normzoo") == pytest.approx(r.impls["copy"].median_s / zoo.median_s)
        assert r.ratio("missing") is None
        # temporary bytes and XLA's bytes-accessed estimate of one compiled step
        assert isinstance(zoo.temp_bytes, int) and isinstance(flax.temp_bytes, int)
        assert zoo.bytes_accessed is None or zoo.bytes_accessed > 0
        assert r.meta["x_bytes"] > 0


def test_one_iteration_check_matches_flax(layer_results):
    # Same layer, same settings: normzoo and flax agree to the dtype's precision.
    for r in layer_results:
        tol = 5e-2 if r.meta["dtype"] == "bfloat16" else 1e-4
        for name, impl in r.impls.items():
            if name not in ("copy", "copy_twin"):
                assert impl.check_rel is not None and impl.check_rel < tol, (r.meta, name)


def test_whitening_rows(whitening_results):
    results, notes = whitening_results
    (r,) = results
    assert r.meta["kind"] == "whitening" and r.meta["G"] == 4 and r.reference == "matmul"
    assert {"matmul", "cov", "newton3"} <= set(r.impls)
    assert "zca_eigh" not in r.impls and "cholesky" not in r.impls  # filtered out by ops
    assert all(r.ratio(name) > 0 for name in r.impls)
    assert all(impl.finite for impl in r.impls.values())
    if not notes:  # normzoo's functions were found: timed alongside
        assert {"nz_cov", "nz_newton3"} <= set(r.impls)


def test_whitening_skips_missing_normzoo_functions(monkeypatch):
    import normzoo.functional

    monkeypatch.delattr(normzoo.functional, "whitening_matrix", raising=False)
    monkeypatch.delattr(normzoo.functional, "covariance", raising=False)
    ops, notes = whitening.normzoo_ops()
    assert ops == {} and len(notes) == 2 and all("missing" in n for n in notes)
    groups, notes = whitening.build_groups(configs=[(4, 1)], samples=8, ops=("newton3",))
    assert set(groups[0].loops) == {"matmul", "newton3"} and notes


def test_whitening_notes_a_failing_signature(monkeypatch):
    import normzoo.functional

    def broken(*args, **kwargs):
        raise TypeError("unexpected signature")

    monkeypatch.setattr(normzoo.functional, "whitening_matrix", broken)
    ops, notes = whitening.normzoo_ops()
    assert not any(name.startswith("newton") for name in ops)
    assert any("unexpected signature" in n for n in notes)


def test_reports(layer_results, whitening_results):
    results = layer_results + whitening_results[0]
    text = report.markdown(results, ["a note"])
    for heading in ("### Layers", "### Per implementation", "### Whitening", "### Layer-row targets",
                    "- a note"):
        assert heading in text
    assert text.count("| LayerNorm | fwd |") == 1 + 6  # timing table, a cost row per impl
    checks = report.targets(results)
    assert checks and all(set(c) == {"target", "row", "value", "threshold", "ok", "tie"}
                          for c in checks)
    meta = {**report.machine_info(), "command": "python -m benchmarks --quick",
            "load_average_end": None}
    payload = json.loads(json.dumps(report.to_json(results, meta)))
    assert len(payload["groups"]) == len(results)
    group = payload["groups"][0]
    assert set(group["impls"]["normzoo"]) >= {"median_s", "times_s", "iters", "compile_s",
                                             "temp_bytes", "check_rel"}
    assert set(group["ratios_vs_reference"]) == {*backend.columns(), "flax_fast", "flax_2pass",
                                                 "jnp"} - {"normzoo"}
    assert np.isfinite(group["copy_fraction"]["normzoo"])
    md = report.results_markdown(results, meta, [], {"repeats": 2})
    assert "python -m benchmarks --quick" in md and meta["jax"] in md


def test_ties_are_judged_against_the_runs_identical_program_spread(layer_results):
    floor = report.noise_floor(layer_results)
    assert floor is not None and floor >= 0.0
    inside = 1.0 / (1.0 + floor) + 1e-9 if floor > 0 else 1.0
    table = report.targets_table([
        {"target": "never slower than flax", "row": "a", "value": 0.5, "threshold": 1.0,
         "ok": False, "tie": False},
        {"target": "never slower than flax", "row": "b", "value": inside, "threshold": 1.0,
         "ok": False, "tie": True},
    ])
    assert "| a | 0.50 | 1.00 | **no** |" in table
    assert "tie (within noise)" in table


def test_cli_end_to_end(tmp_path, capsys):
    out_json, out_md = tmp_path / "r.json", tmp_path / "R.md"
    code = cli.main(["--quick", "--rows", "layers", "--layers", "rms", "--passes", "fwd",
                     "--dtype", "float32",
                     "--repeats", "1", "--target-ms", "0.1", "--json", str(out_json),
                     "--write-results", str(out_md)])
    assert code == 0
    assert "| RMSNorm | fwd | float32 |" in capsys.readouterr().out
    payload = json.loads(out_json.read_text())
    assert payload["meta"]["settings"]["repeats"] == 1
    assert [g["meta"]["variant"] for g in payload["groups"]] == ["rms"]
    assert "--layers rms" in out_md.read_text()


@pytest.mark.parametrize("argv", [["--layers", "bn,nope"], ["--dtype", "float16"],
                                  ["--passes", "bwd"]])
def test_cli_rejects_bad_lists(argv):
    with pytest.raises(SystemExit):
        cli.parser().parse_args(argv)


def test_group_result_without_reference():
    result = GroupResult({"kind": "layer"}, {}, None, None)
    assert result.ratio("x") is None and result.copy_fraction("x") is None


@pytest.mark.parametrize("key, name", [("bn-train", "proto_vjp"), ("gn", "proto_nhwc")])
def test_prototypes_match_flax(key, name):
    # The prototypes must compute the same layer (values and gradients) to be worth timing.
    import jax

    from benchmarks import prototypes

    variant = {v.key: v for v in layers.variants(["bn", "gn"])}[key]
    x, dys, params, stats = layers._inputs(variant, (2, 3, 3, 64), np.float32)
    flax = layers.implementations(variant, np.float32)["flax_2pass"]
    proto = prototypes.extra_impls()[key][name](np.float32)
    np.testing.assert_allclose(proto(params, stats, x)[0], flax(params, stats, x)[0],
                               rtol=1e-4, atol=1e-4)
    want = jax.jit(layers.grad_step(flax))(params, stats, x, dys[0])
    got = jax.jit(layers.grad_step(proto))(params, stats, x, dys[0])
    for a, b in zip(jax.tree_util.tree_leaves(got[:2]), jax.tree_util.tree_leaves(want[:2])):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)


def test_per_iteration_is_the_slope_without_the_per_call_cost():
    # 17 ms per call + 5 ms per iteration: n = 4 and 8 iterations take 37 and 57 ms.
    assert per_iteration(0.037, 0.057, 4) == pytest.approx(0.005)
    # Noise made the longer run no slower: the plain average of the longer run.
    assert per_iteration(0.050, 0.049, 4) == pytest.approx(0.049 / 8)


def test_bounds_output_half_and_quick_run(capsys):
    # The output half is the layer's affine with the given statistics; the quick run times
    # it, the copy and normzoo for each layer and dtype (6 rows of positive times).
    from benchmarks import bounds

    variant = layers.Variant("ln")
    x, _, params, _ = layers._inputs(variant, (4, 8), np.float32)
    y, _ = bounds.output_given_stats(variant, (4, 8))(np.float32)(params, {}, x)
    expected = ((np.asarray(x) - 0.01) * (0.999 * np.asarray(params["scale"]))
                + np.asarray(params["bias"]))
    np.testing.assert_allclose(y, expected, rtol=1e-6, atol=1e-6)
    assert bounds.main(["--quick"]) == 0
    xla_part, _, floors_part = capsys.readouterr().out.partition("C++ floors")
    rows = [ln for ln in xla_part.splitlines()
            if ln.startswith("| ") and not ln.startswith("| layer")]
    assert len(rows) == 6
    assert floors_part.count("| row_") == 4 and "| batch_two_pass |" in floors_part
    for row in rows:
        times = [float(v) for v in row.strip("| ").split(" | ")[3:6]]
        assert all(t > 0 for t in times), row


def test_floors_probe_times_every_kernel_and_does_layernorms_arithmetic():
    # The C++ floors (benchmarks/floors.cc) on tiny shapes: every probe timed beside its
    # copy, and the LayerNorm replica's output checked against float64 inside the probe.
    from benchmarks import floors

    found = floors.measure(quick=True, workers=2)
    assert found.threads == 2 and found.repeats == 1
    assert set(found.probes) == set(floors.PROBES)
    (rows, cols), (batch_rows, channels) = floors.QUICK["row"], floors.QUICK["batch"]
    for name, probe in found.probes.items():
        assert probe["us"] > 0, name
        want = (batch_rows, channels) if name.startswith("batch") else (rows, cols)
        assert (probe["rows"], probe["cols"]) == want, name
    assert 0 < found.layernorm_max_error < 1e-5
    assert found.fraction("row_layernorm") == pytest.approx(
        found.probes["copy"]["us"] / found.probes["row_layernorm"]["us"])
    assert found.fraction("batch_two_pass") == pytest.approx(
        found.probes["batch_copy"]["us"] / found.probes["batch_two_pass"]["us"])
    text = "\n".join(report.floors_section(found))
    assert text.count("\n| ") == 1 + 6  # the header and a row per probe but the copies
    meta = {**report.machine_info(), "command": "x", "load_average_end": None}
    payload = json.loads(json.dumps(report.to_json([], meta, [], found)))
    assert payload["floors"]["probes"]["row_two_pass"]["us"] > 0


@pytest.mark.parametrize("argv, message", [
    (["64", "100", "512", "128", "2", "1"], "multiples of 64"),
    (["3", "256", "512", "128", "2", "1"], "ROWS >= 2 THREADS"),
    (["64", "256"], "usage"),
])
def test_floors_probe_rejects_bad_arguments(argv, message):
    import subprocess

    from benchmarks import floors

    done = subprocess.run([str(floors.build()), *argv], capture_output=True, text=True)
    assert done.returncode == 2 and message in done.stderr and not done.stdout


def test_floors_run_only_where_they_explain_a_row():
    args = cli.parser().parse_args([])
    assert cli.wants_floors(args, ["float32"])
    assert not cli.wants_floors(args, ["bfloat16"])
    assert not cli.wants_floors(cli.parser().parse_args(["--no-floors"]), ["float32"])
    assert not cli.wants_floors(cli.parser().parse_args(["--layers", "gn,in"]), ["float32"])
    assert not cli.wants_floors(cli.parser().parse_args(["--passes", "fwd+bwd"]), ["float32"])


# ------------------------------------------------- rows that look like training


@pytest.fixture(scope="module")
def loss_results():
    groups = training.loss_groups(["ln", "bn"], ["float32"], quick=True,
                                  shapes={"ln": (8, 16), "bn": (2, 3, 3, 8)})
    cache = {}
    return [time_group(g, cache=cache, memory=False, **TINY) for g in groups]


@pytest.fixture(scope="module")
def train_results():
    groups = training.train_groups(["mlp"], ["float32"], quick=True,
                                   sizes={"mlp": dict(batch=4, width=8, features=12)},
                                   norms={"mlp": ("bn", "ln")})
    return [time_group(g, memory=False, **TINY) for g in groups]


def test_loss_rows_cover_every_variant_and_mode(loss_results):
    keys = [(r.meta["variant"], r.meta["mode"]) for r in loss_results]
    assert keys == [("ln", "x+params"), ("ln", "x only"), ("bn-train", "x+params"),
                    ("bn-train", "x only"), ("bn-eval", "x+params"), ("bn-eval", "x only")]
    for r in loss_results:
        assert r.meta["kind"] == "loss" and r.reference == "normzoo" and r.roofline == "copy"
        assert set(r.impls) == {"flax", *backend.columns(), "copy", "copy_twin"}
        assert not r.notes, r.notes  # every implementation stayed finite
        assert r.ratio("flax") > 0 and r.control_ratio() > 0
        for name, impl in r.impls.items():
            assert len(impl.times_s) == 2 and all(t > 0 for t in impl.times_s)
            if name not in ("copy", "copy_twin"):  # dx (and dparams) match flax's
                assert impl.check_rel is not None and impl.check_rel < 1e-4, (r.meta, name)


def test_loss_loop_follows_the_gradient_of_the_loss():
    # One step with lr = 1 of the frozen loop is x - dloss/dx, dloss/dy = y + c.
    import jax
    import jax.numpy as jnp

    variant = layers.Variant("ln")
    x, _, params, _ = layers._inputs(variant, (4, 8), np.float32)
    c = jnp.linspace(-1.0, 1.0, 32).reshape(4, 8)
    apply = layers.linen_apply(layers.make_module(layers.nn, variant, jnp.float32, True), variant)
    x1, _ = training.loss_loop(apply, "x only")(1, jnp.float32(1.0), x, params, {}, c)
    y_of = lambda x: apply(params, {}, x)[0]  # noqa: E731
    y, vjp = jax.vjp(y_of, x)
    np.testing.assert_allclose(x - x1, vjp(y + c)[0], rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="mode"):
        training.loss_loop(apply, "params only")


def test_train_rows_check_first_step_and_have_a_twin(train_results):
    labels = [(r.meta["label"], r.meta["dtype"]) for r in train_results]
    assert labels == [("mlp BatchNorm", "float32"), ("mlp LayerNorm", "float32")]
    for r in train_results:
        assert r.meta["kind"] == "train" and r.controls == ("flax_twin",)
        assert set(r.impls) == {"flax", *backend.columns(), "flax_twin"}
        assert not r.notes, r.notes
        for name in backend.columns():
            assert r.impls[name].check_rel is not None and r.impls[name].check_rel < 1e-4
        assert report.row_noise(r) is not None and report.row_noise(r) >= 0


def test_first_step_check_stops_on_a_different_loss():
    check = training.FirstStepCheck("row", 1e-4)
    out = lambda loss: (None, None, None, np.float32(loss))  # noqa: E731
    assert check(out(2.0), ()) == [np.float32(2.0)]
    check(out(2.0001), ())
    with pytest.raises(AssertionError, match="first-step loss"):
        check(out(2.01), ())


@pytest.mark.parametrize("model", ["resnet", "transformer", "mlp"])
def test_models_declare_the_same_variables_in_both_libraries(model):
    # Structure only (jax.eval_shape: nothing is compiled): the flax and normzoo models of
    # every spec take the same variables, filled identically.
    import flax.linen as nn
    import jax
    import jax.numpy as jnp

    import normzoo

    specs = training.model_specs([model], quick=True, norms=training.NORMS)
    assert [s.norm for s in specs] == list(training.NORMS[model])
    assert len(training.model_specs([model], quick=True)) == 1  # --quick: the first norm
    for spec in specs:
        x = jnp.zeros(spec.input_shape, jnp.bfloat16)
        flax_model = spec.build(training.norm_class(nn, spec.norm), jnp.bfloat16)
        zoo_model = spec.build(training.norm_class(normzoo, spec.norm), jnp.bfloat16)
        variables = training.init_variables(flax_model, zoo_model, x, row=spec.label)
        assert all(leaf.dtype == jnp.float32 for leaf in jax.tree_util.tree_leaves(variables))
        assert ("batch_stats" in variables) == (spec.norm == "bn")
        logits = jax.eval_shape(
            lambda v: flax_model.apply(v, x, train=False), variables)
        assert logits.shape[-1] == spec.num_classes


def test_training_tables_verdicts_and_results_file(loss_results, train_results, tmp_path):
    results = loss_results + train_results
    text = report.markdown(results)
    assert "### Layer loops whose loss depends on y" in text and "### Whole train steps" in text
    verdicts = report.training_verdicts(results)
    assert len(verdicts) == len(results)
    for v in verdicts:
        assert v["default"] in ("yes", "tie", "**no**")
        assert v["cpu_kernels"] == ("n/a" if not backend.kernels_available() else v["cpu_kernels"])
    assert report.verdict(0.95, 0.1) == "tie" and report.verdict(0.8, 0.1) == "**no**"
    assert report.verdict(1.0, None) == "yes"
    # RESULTS.md: each part is replaced by a run of its rows, the other part kept.
    path = tmp_path / "RESULTS.md"
    path.write_text("# normzoo benchmark results\n\nlayer rows of an earlier run\n")
    meta = {**report.machine_info(), "command": "python -m benchmarks --rows loss,training",
            "load_average_end": None}
    for _ in range(2):
        report.write_results(str(path), results, meta, [], {"quick": True})
        written = path.read_text()
        assert "layer rows of an earlier run" in written
        assert written.count(report.BEGIN_TRAINING) == 1
        assert "`python -m benchmarks --rows loss,training`" in written


def test_cli_parses_rows_models_and_modes():
    args = cli.parser().parse_args(["--rows", "loss,training", "--models", "mlp",
                                    "--modes", "x only"])
    assert args.rows == ["loss", "training"] and args.models == ["mlp"]
    assert args.modes == ["x only"]
    assert not cli.wants_floors(args, ["float32"])  # no layer rows: no floors
    with pytest.raises(SystemExit):
        cli.parser().parse_args(["--rows", "everything"])
