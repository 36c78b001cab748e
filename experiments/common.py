"""Shared machinery of the suites: options, resolved settings, cached jobs, metrics files, claims.

A suite is a function ``run(ctx) -> SuiteReport``. It resolves its settings (published defaults,
scaled for CPU, overridden by the command line), describes its training as a list of
:class:`Job` s, lets :meth:`Context.run_jobs` train (or load from the cache) every job, and turns
the numbers into :class:`Claim` rows whose verdicts are computed from the measurements.
"""
from __future__ import annotations

import csv
import dataclasses
import io
import json
import math
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from experiments.data import Dataset, load_dataset
from experiments.distributed import all_processes, data_parallel
from experiments.models import build_model, check_norm, freeze_overrides
from experiments.stats import INCONCLUSIVE, NOT_SUPPORTED, SUPPORTED, Estimate  # noqa: F401  (re-exported)
from experiments.store import JobStore, atomic_write_json, atomic_write_text, config_hash, strict, writes_enabled
from experiments.train import Probe, Run, TrainSpec, train_job

CACHE_VERSION = 1


@dataclasses.dataclass
class Options:
    """Command-line options shared by every suite. ``None`` means "the suite's default".

    ``api``: ``linen`` or ``nnx``, the Flax API every model of the suite is built in
    (:func:`experiments.models.build_model`); both give the same numbers for the same seed.

    ``devices``: train data-parallel over this many devices (``None``: all of them; ``1``, the
    default here: the single-device engine); ``bn_sync``: over several devices, normalize with the
    global batch's statistics (``True``) or each device's own (see :mod:`experiments.distributed`).
    """

    out: Path
    quick: bool = False
    dataset: str | None = None
    data_dir: Path | None = None
    norms: list[str] | None = None
    seeds: list[int] | None = None
    epochs: int | None = None
    batch_size: int | None = None
    lr: float | None = None
    optimizer: str | None = None
    model: str | None = None
    api: str = "linen"
    width: int | None = None
    depth: int | None = None
    train_size: int | None = None
    norm_overrides: dict[str, dict[str, Any]] = dataclasses.field(default_factory=dict)
    progress: bool = True
    force: bool = False
    checkpoint_every: float = 30.0
    devices: int | None = 1
    bn_sync: bool = True


@dataclasses.dataclass
class Job:
    """One vmapped training job: a model, static settings and the runs trained together.

    ``meta`` labels every run of the job in the metrics files (e.g. ``{"norm": "bn"}``);
    ``run_meta`` adds per-run labels. ``probe``/``after`` are optional hooks (see
    :func:`experiments.train.train_job`) named by ``hook_id`` in the cache key.
    """

    name: str
    model: dict[str, Any]
    spec: TrainSpec
    runs: list[Run]
    meta: dict[str, Any] = dataclasses.field(default_factory=dict)
    run_meta: list[dict[str, Any]] | None = None
    probe: Probe | None = None
    probe_x: np.ndarray | None = None
    after: Callable[..., list[dict[str, Any]]] | None = None
    hook_id: str = ""


@dataclasses.dataclass
class Claim:
    """One row of a suite's claim table."""

    claim: str
    source: str
    measured: str
    verdict: str
    rule: str


@dataclasses.dataclass
class ProtocolRow:
    """One row of a suite's protocol table: the source's setting next to the one used here."""

    setting: str
    source: str
    used: str
    why: str = ""

    @classmethod
    def table(cls, spec: Sequence[tuple[str, str, str, str]], **fields: Any) -> list["ProtocolRow"]:
        """Rows from ``(setting, source, used, why)`` tuples; ``used`` is a format string filled
        from ``fields`` (the suite's settings)."""
        return [cls(setting, source, used.format(**fields), why) for setting, source, used, why in spec]


@dataclasses.dataclass
class SuiteReport:
    """What a suite hands to the report.

    ``claims``, ``tables`` (markdown), ``figures`` and ``notes`` as before; ``protocol``: the
    protocol-fidelity table (source setting vs used, and why); ``accuracy``: final test accuracy
    per normalizer (``{label: Estimate}``) at the suite's headline setting, named by
    ``accuracy_setting``, for the comparison table at the top of the combined report;
    ``reproduce``: what the source measured, what it would take to measure it here (the full
    profile's command and its expected time), for claims that do not reproduce at this scale.
    """

    name: str
    title: str
    summary: str
    claims: list[Claim]
    settings: dict[str, Any]
    tables: list[tuple[str, list[str], list[list[str]]]] = dataclasses.field(default_factory=list)
    figures: list[tuple[str, Path]] = dataclasses.field(default_factory=list)
    notes: list[str] = dataclasses.field(default_factory=list)
    seconds: float = 0.0
    protocol: list[ProtocolRow] = dataclasses.field(default_factory=list)
    accuracy: dict[str, Estimate] = dataclasses.field(default_factory=dict)
    accuracy_setting: str = ""
    reproduce: str = ""


def compare(diff: float, margin: float) -> str:
    """Verdict for a claim "A beats B" measured as ``diff = A - B``: supported when
    ``diff >= margin``, not supported when ``diff <= 0``, inconclusive in between (or NaN)."""
    if not math.isfinite(diff):
        return INCONCLUSIVE
    if diff >= margin:
        return SUPPORTED
    if diff <= 0:
        return NOT_SUPPORTED
    return INCONCLUSIVE


def fmt(x: float, digits: int = 3) -> str:
    """Format a number for tables (``nan`` for missing)."""
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "nan"
    return f"{x:.{digits}f}"


def pct(x: float) -> str:
    return "nan" if not math.isfinite(x) else f"{100 * x:.1f}%"


class Context:
    """Where a suite runs: its options, output folder, job cache and progress bar."""

    def __init__(self, suite: str, options: Options) -> None:
        self.suite = suite
        self.options = options
        self.out = Path(options.out)
        if writes_enabled():  # in a multi-process run only process 0 writes
            self.out.mkdir(parents=True, exist_ok=True)
        self.store = JobStore(self.out)
        self.parallel = data_parallel(options.devices, options.bn_sync)  # None: one device
        self._data: dict[tuple[Any, ...], Dataset] = {}
        self.notes: list[str] = []

    # -- settings ------------------------------------------------------------------------
    def settings(self, defaults: dict[str, Any], quick: dict[str, Any] | None = None) -> dict[str, Any]:
        """Suite defaults, then the ``--quick`` reductions, then the command-line overrides."""
        s = dict(defaults)
        if self.options.quick and quick:
            s.update(quick)
        o = self.options
        cli = {
            "dataset": o.dataset,
            "norms": o.norms,
            "seeds": o.seeds,
            "epochs": o.epochs,
            "batch_size": o.batch_size,
            "lr": o.lr,
            "optimizer": o.optimizer,
            "model": o.model,
            "width": o.width,
            "depth": o.depth,
            "train_size": o.train_size,
        }
        for k, v in cli.items():
            if v is not None and k in s:
                s[k] = v
        s["quick"] = o.quick
        s["api"] = o.api
        return s

    def data(self, name: str, **kw: Any) -> Dataset:
        key = (name, tuple(sorted(kw.items())))
        if key not in self._data:
            self._data[key] = load_dataset(name, data_dir=self.options.data_dir, **kw)
        return self._data[key]

    def norm_overrides(self, name: str) -> dict[str, Any]:
        """User overrides (``--norm-overrides``) for normalizer ``name``."""
        return dict(self.options.norm_overrides.get(name, {}))

    def available(self, norms: Sequence[str], width: int, ndim: int) -> list[str]:
        """The subset of ``norms`` the registry can build; each skipped one adds a note."""
        ok = []
        for n in norms:
            reason = check_norm(n, width, ndim, freeze_overrides(self.norm_overrides(n)))
            if reason is None:
                ok.append(n)
            else:
                self.notes.append(f"skipped {reason}")
        return ok

    def write_config(self, settings: dict[str, Any]) -> None:
        atomic_write_json(self.out / "config.json", {"suite": self.suite, **settings}, strict_json=True)

    # -- jobs ---------------------------------------------------------------------------------
    def run_jobs(self, jobs: Sequence[Job], data: Dataset) -> list[dict[str, Any]]:
        """Train every job not already cached; return one result dict per job (``records`` etc.)."""
        results: list[dict[str, Any] | None] = []
        todo: list[tuple[int, Job, str]] = []
        for i, job in enumerate(jobs):
            job_id = self.job_id(job, data)
            cached = None if self.options.force else self.store.load(job_id)
            if self.parallel is not None and not all_processes(cached is not None):
                cached = None  # trained again unless every process can read it: all run the same steps
            results.append(cached)
            if cached is None:
                todo.append((i, job, job_id))
        bar = self._progress(sum(j.spec.epochs for _, j, _ in todo), len(jobs) - len(todo))
        try:
            for i, job, job_id in todo:
                if bar is not None:
                    bar.set_postfix_str(job.name)
                model = self.model(num_classes=data.num_classes, **job.model)
                res = train_job(
                    model,
                    job.spec,
                    data,
                    job.runs,
                    probe=job.probe,
                    probe_x=job.probe_x,
                    after=job.after,
                    checkpoint=self.store.checkpoint_path(job_id),
                    checkpoint_every=self.options.checkpoint_every,
                    on_epoch=(lambda _e: bar.update(1)) if bar is not None else None,
                    parallel=self.parallel,
                )
                result = {
                    "job_id": job_id,
                    "name": job.name,
                    "meta": job.meta,
                    "model": job.model,
                    "spec": dataclasses.asdict(job.spec),
                    "records": res.records,
                    "seconds": res.seconds,
                }
                for rec, extra in zip(result["records"], job.run_meta or [{}] * len(job.runs)):
                    rec["meta"] = {**job.meta, **extra}
                self.store.save(job_id, result)
                results[i] = result
        finally:
            if bar is not None:
                bar.close()
        for res, job in zip(results, jobs):
            assert res is not None
            for rec, extra in zip(res["records"], job.run_meta or [{}] * len(job.runs)):
                rec["meta"] = {**job.meta, **extra}
        self.write_metrics([r for r in results if r is not None])
        return [r for r in results if r is not None]

    def model(self, **kwargs: Any) -> Any:
        """:func:`cached_model` in this run's API (``--api``)."""
        return cached_model(api=self.options.api, **kwargs)

    def job_id(self, job: Job, data: Dataset) -> str:
        key = {
            "v": CACHE_VERSION,
            "suite": self.suite,
            "data": [data.name, data.sizes(), float(np.asarray(data.x_train[:64]).sum())],
            "model": job.model,
            "spec": dataclasses.asdict(job.spec),
            "runs": [dataclasses.asdict(r) for r in job.runs],
            "hook": job.hook_id,
        }
        if self.options.api != "linen":  # Linen jobs keep the keys they had before --api existed
            key["api"] = self.options.api
        if self.parallel is not None:  # one-device jobs keep the keys they had before --devices existed
            key.update(self.parallel.cache_key())
        return config_hash(key)

    def _progress(self, total: int, cached: int) -> Any:
        if not self.options.progress or total == 0 or not writes_enabled():
            return None
        try:
            from tqdm.auto import tqdm
        except ImportError:  # pragma: no cover
            return None
        desc = self.suite + (f" ({cached} cached)" if cached else "")
        return tqdm(total=total, desc=desc, unit="epoch", leave=False, dynamic_ncols=True)

    # -- outputs ------------------------------------------------------------------------------
    def write_metrics(self, results: Sequence[dict[str, Any]]) -> None:
        """Write ``metrics.csv`` and ``metrics.jsonl``: one row per (run, epoch), readable with
        ``pandas.read_csv`` / ``pandas.read_json(lines=True)``."""
        rows: list[dict[str, Any]] = []
        for res in results:
            for k, rec in enumerate(res["records"]):
                for h in rec["history"]:
                    rows.append(
                        {
                            "suite": self.suite,
                            "job": res["name"],
                            "run": k,
                            **{f"{key}": v for key, v in rec.get("meta", {}).items()},
                            **rec["run"],
                            **h,
                            "diverged": rec["diverged"],
                        }
                    )
        cols: list[str] = []
        for r in rows:
            for c in r:
                if c not in cols:
                    cols.append(c)
        buf = io.StringIO()
        w = csv.DictWriter(buf, fieldnames=cols, restval="")
        w.writeheader()
        for r in rows:
            w.writerow({k: (json.dumps(v) if isinstance(v, (list, dict)) else v) for k, v in r.items()})
        atomic_write_text(self.out / "metrics.csv", buf.getvalue())
        atomic_write_text(self.out / "metrics.jsonl", "".join(json.dumps(strict(r)) + "\n" for r in rows))


_MODELS: dict[str, Any] = {}


def cached_model(**kwargs: Any) -> Any:
    """:func:`build_model`, one instance per configuration, so jobs with the same model share
    compiled functions (jit caches key on the module instance held by the train state)."""
    key = json.dumps(kwargs, sort_keys=True, default=str)
    if key not in _MODELS:
        _MODELS[key] = build_model(**kwargs)
    return _MODELS[key]


def seed_list(s: dict[str, Any]) -> list[int]:
    seeds = s["seeds"]
    return list(range(seeds)) if isinstance(seeds, int) else list(seeds)


def by_meta(results: Sequence[dict[str, Any]], **match: Any) -> list[dict[str, Any]]:
    """All run records whose ``meta`` contains every ``key=value`` in ``match``."""
    out = []
    for res in results:
        for rec in res["records"]:
            if all(rec["meta"].get(k) == v for k, v in match.items()):
                out.append(rec)
    return out


def mean_final(records: Sequence[dict[str, Any]], key: str) -> float:
    """Mean over runs of the last-epoch value of ``key`` (NaN if there are no runs)."""
    vals = [r["history"][-1].get(key, float("nan")) for r in records]
    vals = [v for v in vals if v is not None]
    return float(np.mean(vals)) if vals else float("nan")


def mean_curve(records: Sequence[dict[str, Any]], key: str) -> np.ndarray:
    """``(epochs + 1,)`` mean over runs of metric ``key`` per epoch."""
    arr = np.asarray([[np.nan if h.get(key) is None else h[key] for h in r["history"]] for r in records], float)
    return np.nanmean(arr, axis=0) if len(arr) else np.zeros(0)
