"""Checks that run in fresh processes, started beside the in-process tests.

The in-process tests keep about one core busy (jax traces and XLA compiles on one thread),
so the checks that run in a fresh process (README blocks, the default path, the CPU
kernels' variant builds) are started as soon as collection ends (tests/conftest.py calls
each test module's ``background_jobs(items)`` with its selected items) on a few worker
threads, and run on the other cores while the in-process tests go on. Each test then waits
for its own job's result and asserts on it exactly as it did on a run of its own.

A job is keyed: the test asks :func:`result` for the same key, with the same function, and
gets the job started at collection, or, where none was (a test module imported some other
way; ``pytest --collect-only`` starts nothing), starts it then and waits. A job's exception
is the test's.
"""

from __future__ import annotations

import concurrent.futures
import os
import threading
from typing import Any, Callable, Hashable

#: Worker threads (each mostly waits on one subprocess): one core is the in-process tests'.
WORKERS = min(4, max(2, (os.cpu_count() or 2) - 1))

_lock = threading.Lock()
_pool: concurrent.futures.ThreadPoolExecutor | None = None
_jobs: dict[Hashable, concurrent.futures.Future] = {}


def submit(key: Hashable, fn: Callable[..., Any], *args: Any) -> concurrent.futures.Future:
    """Starts ``fn(*args)`` on a worker thread unless the job ``key`` exists already."""
    global _pool
    with _lock:
        if key not in _jobs:
            if _pool is None:
                _pool = concurrent.futures.ThreadPoolExecutor(
                    max_workers=WORKERS, thread_name_prefix="background-check")
            _jobs[key] = _pool.submit(fn, *args)
        return _jobs[key]


def result(key: Hashable, fn: Callable[..., Any], *args: Any) -> Any:
    """The job ``key``'s return value (its exception re-raised), started now if it was not."""
    return submit(key, fn, *args).result()


def shutdown() -> None:
    """Drops the jobs not yet started and waits for the running ones (each has a timeout)."""
    global _pool
    with _lock:
        pool, _pool = _pool, None
        _jobs.clear()
    if pool is not None:
        pool.shutdown(wait=True, cancel_futures=True)
