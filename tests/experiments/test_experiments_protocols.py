"""Reports of every suite: a protocol table, verdict rules that decide from the seed spread (SE),
numbers with their spread (±), a headline accuracy per normalizer, seed bands in the curve
captions. Tiny configurations with 2 seeds (so the standard errors exist)."""
from __future__ import annotations

import pytest

from experiments.common import Context, Options
from experiments.report import write_reports
from experiments.stats import Estimate
from experiments.suites import SUITES

# each suite shrunk to a couple of small jobs; 2 seeds (searches) so every estimate has a spread.
# TINY_A: suites whose protocol table is built by a function; TINY_B: by a PROTOCOL constant.
TINY_A = {
    "init-scale": dict(stds=[1.0, 0.1]),
    "overfitting": dict(),
    "hparam-search": dict(trials=5, searches=2),
    "lr-robustness": dict(lrs=[0.01, 1.0], norms=["none", "bn"]),
    "batch-size": dict(batch_sizes=[4, 16], norms=["bn", "gn"], model="mlp", devices=2),
}
TINY_B = {
    "covariate-shift": dict(),
    "placement": dict(activations=["relu"]),
    "train-vs-eval": dict(momenta=[0.9, 0.999], batch_size=16),
    "small-batch": dict(batch_sizes=[4, 16], norms=["bn", "gn"]),
    "no-norm": dict(norms=["ln", "none"]),
    "whitening": dict(norms=["bn", "zca"], lrs=[0.1], probe_size=64, batch_size=32),
}
TINY = {**TINY_A, **TINY_B}
BANDLESS = {"hparam-search"}  # its curves are single trials; its spread is over searches, in the tables


@pytest.mark.parametrize("name", list(TINY_A))
def test_seed_counts_follow_the_rules(name):
    mod = SUITES[name]
    key = "searches" if name == "hparam-search" else "seeds"
    assert mod.QUICK.get(key, mod.DEFAULTS[key]) >= 3 and mod.DEFAULTS[key] >= 5


@pytest.mark.parametrize("name", list(TINY_B))
def test_protocol_rows_format_with_the_suite_settings(name):
    """Every protocol row's ``{setting}`` placeholders are filled from the suite's settings (no
    training: the full and the quick profile)."""
    mod = SUITES[name]
    for s in (dict(mod.DEFAULTS), {**mod.DEFAULTS, **mod.QUICK}):
        for setting, source, used, _why in mod.PROTOCOL:
            assert setting and source
            used.format(steps=1, **s)
    assert mod.QUICK.get("seeds", mod.DEFAULTS["seeds"]) >= 3 and mod.DEFAULTS["seeds"] >= 5


@pytest.mark.slow
@pytest.mark.parametrize("name", list(TINY))
def test_report_has_protocol_rules_with_se_and_numbers_with_spread(name, tmp_path, monkeypatch):
    for k, v in TINY[name].items():
        monkeypatch.setitem(SUITES[name].QUICK, k, v)
    opts = Options(out=tmp_path, quick=True, epochs=1, seeds=[0, 1], width=8, depth=2, train_size=200,
                   progress=False, checkpoint_every=1e9)
    report = SUITES[name].run(Context(name, opts))
    write_reports([report], tmp_path)
    assert report.protocol and all(p.setting and p.source and p.used for p in report.protocol)
    md = (tmp_path / "report.md").read_text()
    assert "**Protocol" in md
    if name in TINY_A:
        assert "**At paper scale.**" in md
        assert f"python -m experiments {name}" in report.reproduce
    assert report.claims
    for c in report.claims:
        assert "SE" in c.rule, c.rule
        assert "±" in c.measured, c.measured
    assert report.accuracy and report.accuracy_setting
    for est in report.accuracy.values():
        assert isinstance(est, Estimate) and est.n == 2
    if name not in BANDLESS:
        for caption, _ in report.figures:
            assert "standard error" in caption, caption
