"""The seed statistics and verdict rules of experiments.stats, against hand-computed numbers."""
import math

import numpy as np
import pytest

from experiments import stats


def test_estimate_matches_numpy():
    v = [0.9, 0.92, 0.95, 0.91]
    e = stats.estimate(v)
    assert e.n == 4
    assert e.mean == pytest.approx(np.mean(v))
    assert e.se == pytest.approx(np.std(v, ddof=1) / 2.0)
    assert e.fmt(3) == f"{np.mean(v):.3f} ± {np.std(v, ddof=1) / 2:.3f}"
    assert e.pct().endswith("%")


def test_estimate_one_value_has_no_spread():
    e = stats.estimate([0.5, float("nan")])
    assert e.n == 1 and math.isnan(e.se)
    assert stats.verdict(e) == stats.INCONCLUSIVE
    assert "± ?" in e.fmt()


def test_paired_uses_common_seeds_only():
    d = stats.paired({0: 1.0, 1: 2.0, 2: 3.0}, {1: 1.5, 2: 2.0, 5: 9.0})
    assert d.n == 2 and d.mean == pytest.approx(0.75)


@pytest.mark.parametrize("diffs, kind, margin, expected", [
    ([0.10, 0.11, 0.09], "better", 0.0, stats.SUPPORTED),
    ([-0.10, -0.11, -0.09], "better", 0.0, stats.NOT_SUPPORTED),
    ([0.10, -0.10, 0.01], "better", 0.0, stats.INCONCLUSIVE),
    ([0.01, 0.011, 0.009], "better", 0.05, stats.NOT_SUPPORTED),
    ([-0.01, -0.011, -0.009], "not_worse", 0.02, stats.SUPPORTED),
    ([-0.05, -0.051, -0.049], "not_worse", 0.02, stats.NOT_SUPPORTED),
])
def test_verdict_rules(diffs, kind, margin, expected):
    assert stats.verdict(stats.estimate(diffs), kind, margin) == expected


def test_rule_text_names_the_spread():
    assert "2 SE" in stats.rule("better") and "-0.02" in stats.rule("not_worse", 0.02)
    with pytest.raises(ValueError, match="kind"):
        stats.verdict(stats.estimate([1, 2]), "sometimes")


def test_curve_band():
    recs = [{"history": [{"a": 0.0}, {"a": 1.0}]}, {"history": [{"a": 2.0}, {"a": 1.0}]}]
    mean, se = stats.curve_band(recs, "a")
    np.testing.assert_allclose(mean, [1.0, 1.0])
    np.testing.assert_allclose(se, [np.std([0, 2], ddof=1) / math.sqrt(2), 0.0])
    mean1, se1 = stats.curve_band(recs[:1], "a")
    np.testing.assert_allclose(se1, [0.0, 0.0])
