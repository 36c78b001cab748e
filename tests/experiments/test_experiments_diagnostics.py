"""The covariate-shift and whitening suites measure with normzoo.diagnostics: their probes give
the numbers of the hand-written statistics they replaced, and the suites still run (tiny)."""
from __future__ import annotations

import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments.common import Context, Options
from experiments.models import build_model
from experiments.suites import covariate_shift, whitening
from experiments.train import forward


def old_percentiles(h):
    """covariate-shift's hand-written probe statistic, before normzoo.diagnostics."""
    return jnp.percentile(h, jnp.array([15.0, 50.0, 85.0]), axis=0).T


def old_log10_cond(h):
    """whitening's hand-written log10 condition number, before normzoo.diagnostics."""
    h = h.reshape(h.shape[0], -1).astype(jnp.float32)
    hc = h - h.mean(0)
    ev = jnp.linalg.eigvalsh(hc.T @ hc / h.shape[0])
    top = jnp.maximum(ev[-1], 1e-30)
    return jnp.log10(top / jnp.maximum(ev[0], top / whitening.COND_CAP))


def test_probes_give_the_numbers_of_the_hand_written_statistics():
    model = build_model("mlp", num_classes=10, width=12, depth=2, norm="bn", activation="relu")
    x = jax.random.uniform(jax.random.key(2), (40, 64))  # 40 digits-like samples
    variables = jax.jit(lambda key, x: model.init(key, x, train=False))(jax.random.key(0), x)
    state = types.SimpleNamespace(apply_fn=model.apply, params=variables["params"],
                                  batch_stats=variables["batch_stats"], dropout_key=jax.random.key(1))

    @jax.jit
    def both(x):
        _, inter = forward(state, x, batch_stats_mode=True, collect=True)
        last = inter["norm_out_1"][:, : covariate_shift.UNITS]
        old = {"pct": old_percentiles(last),
               "norm_out": jnp.stack([old_log10_cond(inter[f"norm_out_{i}"]) for i in range(2)]),
               "layer_in": jnp.stack([old_log10_cond(inter[f"layer_in_{i}"]) for i in (1, 2)]),
               "singular": old_log10_cond(inter["layer_in_1"][:6])}  # 6 samples of 12 features: capped
        new = covariate_shift.percentile_probe(state, x)
        return old, new, inter

    old, new, inter = both(x)
    # whitening's statistic is float64 NumPy on the collected intermediates (its after-hook)
    new = {**new, "norm_out": np.array([whitening.log10_cond(inter[f"norm_out_{i}"]) for i in range(2)]),
           "layer_in": np.array([whitening.log10_cond(inter[f"layer_in_{i}"]) for i in (1, 2)]),
           "singular": whitening.log10_cond(inter["layer_in_1"][:6])}
    assert new["pct"].shape == (covariate_shift.UNITS, 3) and new["norm_out"].shape == (2,)
    assert float(new["singular"]) > 5  # the cap, 1e8, or float32 noise above 1e5
    np.testing.assert_allclose(new["pct"], old["pct"], rtol=1e-6, atol=1e-6)
    for key in ("norm_out", "layer_in"):  # float64 vs the old float32: float32 rounding of the eigenvalues
        np.testing.assert_allclose(new[key], old[key], rtol=2e-3, atol=2e-3, err_msg=key)


# covariate-shift runs by default (about 3 s); whitening, which compiles the same engine around its
# own probe (checked above), with -m slow
@pytest.mark.parametrize("suite, quick", [
    (covariate_shift, dict(norms=["bn"])),
    pytest.param(whitening, dict(norms=["bn", "zca"], probe_size=32, batch_size=16), marks=pytest.mark.slow),
], ids=["covariate-shift", "whitening"])
def test_suite_runs_tiny(suite, quick, tmp_path, monkeypatch):
    for k, v in quick.items():
        monkeypatch.setitem(suite.QUICK, k, v)
    opts = Options(out=tmp_path, quick=True, epochs=1, seeds=[0], width=4, depth=1, train_size=100,
                   progress=False, checkpoint_every=1e9)
    report = suite.run(Context(suite.NAME, opts))
    assert (tmp_path / "metrics.jsonl").is_file() and list(tmp_path.glob("*.png"))
    rows = report.tables[0][2]
    assert rows and all("nan" not in cell for row in rows for cell in row), rows  # drift or conditioning, accuracies
