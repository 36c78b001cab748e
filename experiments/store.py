"""Atomic file writes and the on-disk cache of finished jobs (what makes a sweep resumable).

Every file is written to a temporary sibling and moved into place with ``os.replace``, so a
crash never leaves a half-written result. Every file the experiments write goes through
:func:`atomic_write_bytes`; in a multi-process run only process 0 writes (:func:`set_writes`). A job's result is stored under ``runs/<job_id>.json``
where ``job_id`` hashes the job's full configuration: re-running a suite skips finished jobs and
reruns anything whose configuration changed.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import tempfile
from pathlib import Path
from typing import Any


_UMASK = os.umask(0)
os.umask(_UMASK)
_WRITES = True


def set_writes(enabled: bool) -> None:
    """Whether this process writes files (``False`` on processes other than 0 of a multi-process
    run: :func:`atomic_write_bytes` then writes nothing, so results, checkpoints, metrics, plots
    and reports come from process 0 alone)."""
    global _WRITES
    _WRITES = bool(enabled)


def writes_enabled() -> bool:
    """Whether this process writes files (see :func:`set_writes`)."""
    return _WRITES


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (temporary file in the same folder + rename); nothing
    on a process that does not write (:func:`set_writes`)."""
    if not _WRITES:
        return
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp creates 0600; give the file normal permissions
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def strict(obj: Any) -> Any:
    """Replace non-finite floats (NaN, inf) by ``None`` recursively, for strict JSON readers."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: strict(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [strict(v) for v in obj]
    return obj


def atomic_write_json(path: str | Path, obj: Any, *, strict_json: bool = False) -> None:
    """Write ``obj`` as indented JSON; with ``strict_json`` NaN/inf become ``null``."""
    text = json.dumps(strict(obj) if strict_json else obj, indent=1, sort_keys=False, default=str)
    atomic_write_text(path, text + "\n")


def read_json(path: str | Path) -> Any:
    return json.loads(Path(path).read_text())


def config_hash(obj: Any) -> str:
    """A short stable hash of a JSON-serialisable configuration."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


class JobStore:
    """Finished jobs and in-progress checkpoints of one suite, under ``root``."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)

    def result_path(self, job_id: str) -> Path:
        return self.root / "runs" / f"{job_id}.json"

    def checkpoint_path(self, job_id: str) -> Path:
        return self.root / "checkpoints" / f"{job_id}.msgpack"

    def load(self, job_id: str) -> dict[str, Any] | None:
        path = self.result_path(job_id)
        if not path.is_file():
            return None
        try:
            return read_json(path)
        except json.JSONDecodeError:
            return None

    def save(self, job_id: str, result: dict[str, Any]) -> None:
        atomic_write_json(self.result_path(job_id), result)
