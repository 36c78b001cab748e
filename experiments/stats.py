"""Seed statistics and verdict rules shared by every suite.

Every number a suite reports is a mean over seeds with its standard error, and every verdict is
decided from *paired* differences: two normalizers compared with the same seed share their
initial draws and their batch order (:mod:`experiments.train`), so the per-seed difference
``a_s - b_s`` removes the noise both runs share, and its spread across seeds is the noise that
remains. The rules are fixed here, before any run, and each prints itself beside its verdict.

Rules (``k = 2`` standard errors, about a 95% interval for the mean of a normal difference;
with few seeds a t-interval would be wider, so the rule is, if anything, generous):

* ``better`` ("A beats B", difference ``d = A - B``): **supported** when ``mean(d) - k SE > margin``;
  **not supported** when ``mean(d) + k SE < margin`` (the measurement excludes the claimed effect);
  **inconclusive** otherwise, or with fewer than two seeds.
* ``not_worse`` ("A is at least as good as B, within ``margin``"): **supported** when
  ``mean(d) - k SE > -margin``; **not supported** when ``mean(d) + k SE < -margin``; inconclusive
  otherwise.

``margin`` is stated by the claim (0 unless the claim itself names a size) and printed in the rule.
"""
from __future__ import annotations

import dataclasses
import math
import warnings
from typing import Iterable, Sequence

import numpy as np

SUPPORTED, NOT_SUPPORTED, INCONCLUSIVE = "supported", "not supported", "inconclusive"
K_SE = 2.0


@dataclasses.dataclass(frozen=True)
class Estimate:
    """Mean of ``n`` per-seed values with its standard error ``se`` (``nan`` when ``n < 2``)."""

    mean: float
    se: float
    n: int

    @property
    def lo(self) -> float:
        return self.mean - K_SE * self.se

    @property
    def hi(self) -> float:
        return self.mean + K_SE * self.se

    def fmt(self, digits: int = 3, scale: float = 1.0, unit: str = "") -> str:
        """``"0.912 ± 0.004"`` (mean ± standard error; ``± ?`` with one seed)."""
        if not math.isfinite(self.mean):
            return "nan"
        spread = f"{scale * self.se:.{digits}f}" if math.isfinite(self.se) else "?"
        return f"{scale * self.mean:.{digits}f} ± {spread}{unit}"

    def pct(self, digits: int = 1) -> str:
        """As a percentage: ``"91.2 ± 0.4%"``."""
        return self.fmt(digits, 100.0, "%")


def estimate(values: Iterable[float]) -> Estimate:
    """Mean and standard error (``std(ddof=1) / sqrt(n)``) of the finite ``values``."""
    v = np.asarray([float(x) for x in values if x is not None and math.isfinite(float(x))], float)
    if v.size == 0:
        return Estimate(float("nan"), float("nan"), 0)
    se = float(v.std(ddof=1) / math.sqrt(v.size)) if v.size > 1 else float("nan")
    return Estimate(float(v.mean()), se, int(v.size))


def paired(a: dict[int, float], b: dict[int, float]) -> Estimate:
    """Estimate of ``a - b`` over the seeds both have (``{seed: value}`` maps)."""
    return estimate(a[s] - b[s] for s in sorted(set(a) & set(b)))


def verdict(diff: Estimate, kind: str = "better", margin: float = 0.0) -> str:
    """The verdict of the rule ``kind`` (module docstring) for a paired difference ``diff``."""
    if kind not in ("better", "not_worse"):
        raise ValueError(f"kind={kind!r}; expected 'better' or 'not_worse'")
    if diff.n < 2 or not (math.isfinite(diff.mean) and math.isfinite(diff.se)):
        return INCONCLUSIVE
    bound = margin if kind == "better" else -margin
    if diff.lo > bound:
        return SUPPORTED
    if diff.hi < bound:
        return NOT_SUPPORTED
    return INCONCLUSIVE


def rule(kind: str = "better", margin: float = 0.0, what: str = "A - B") -> str:
    """The printed form of the rule ``kind`` for the paired difference ``what``."""
    k = f"{K_SE:g} SE"
    if kind == "better":
        m = f" > {margin:g}" if margin else " > 0"
        return (f"paired over seeds, d = {what}: supported if mean(d) - {k}{m}; not supported if "
                f"mean(d) + {k}{m.replace('>', '<')}; else inconclusive")
    return (f"paired over seeds, d = {what}: supported if mean(d) - {k} > -{margin:g}; not supported if "
            f"mean(d) + {k} < -{margin:g}; else inconclusive")


def per_seed_final(records: Sequence[dict], key: str) -> dict[int, float]:
    """``{seed: last-epoch value of key}`` for run records (``rec["run"]["seed"]``)."""
    out: dict[int, float] = {}
    for r in records:
        v = r["history"][-1].get(key)
        if v is not None:
            out[int(r["run"]["seed"])] = float(v)
    return out


def curve_band(records: Sequence[dict], key: str) -> tuple[np.ndarray, np.ndarray]:
    """Per-epoch mean and standard error over runs of metric ``key``: two ``(epochs + 1,)`` arrays
    (the standard error is 0 with one run, so a band is drawn only where there is a spread)."""
    arr = np.asarray([[np.nan if h.get(key) is None else h[key] for h in r["history"]] for r in records], float)
    if arr.size == 0:
        return np.zeros(0), np.zeros(0)
    n = np.sum(np.isfinite(arr), axis=0)
    with np.errstate(invalid="ignore", divide="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        mean = np.nanmean(arr, axis=0)
        sd = np.nanstd(arr, axis=0, ddof=1) if len(arr) > 1 else np.zeros(arr.shape[1])
    se = np.where(n > 1, np.nan_to_num(sd) / np.sqrt(np.maximum(n, 1)), 0.0)
    return mean, se
