"""Shared test setup.

Eight simulated CPU devices for the ``shard_map`` / ``pmap`` tests: the flag must be in
``XLA_FLAGS`` before jax is first imported, so it is set here, at conftest import time,
appended to whatever the user already has. Nothing else is enabled globally: a float64
test asks for the ``x64`` fixture, which enables 64-bit types for that test only.

When collection ends, the checks that run in fresh processes start beside the in-process
tests (tests/background.py; a module opts in with ``background_jobs(items)``).
"""

import os

_DEVICE_FLAG = "--xla_force_host_platform_device_count=8"
_flags = os.environ.get("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in _flags:
    os.environ["XLA_FLAGS"] = (_flags + " " + _DEVICE_FLAG).strip()
else:  # keep the user's own setting (setdefault semantics)
    os.environ.setdefault("XLA_FLAGS", _DEVICE_FLAG)

import numpy as np  # noqa: E402
import pytest  # noqa: E402

import background  # noqa: E402


def pytest_collection_finish(session):
    """Starts the selected tests' fresh-process checks (tests/background.py): each test
    module's ``background_jobs(items)``, given its selected items, yields
    ``(key, function, args)``."""
    if session.config.option.collectonly or hasattr(session.config, "workerinput"):
        return  # nothing runs (or an xdist worker: it runs only a share of the items)
    modules = {}
    for item in session.items:
        module = getattr(item, "module", None)
        if module is not None:
            modules.setdefault(module, []).append(item)
    for module, items in modules.items():
        jobs = getattr(module, "background_jobs", None)
        for key, fn, args in jobs(items) if callable(jobs) else ():
            background.submit(key, fn, *args)


def pytest_sessionfinish(session):
    background.shutdown()


@pytest.fixture
def rng():
    """A fresh, seeded numpy Generator per test."""
    return np.random.default_rng(0)


@pytest.fixture(params=[False, True], ids=["kernels_off", "kernels_on"])
def cpu_kernels(request):
    """Runs a test with normzoo's opt-in CPU kernels off and on (normzoo.backends.cpu).

    On: enabled for this test only (also with this process's 8 simulated devices, for
    unsharded inputs), disabled after; skipped where the kernels are not available.
    Yields whether they are on.
    """
    if not request.param:
        yield False
        return
    kernels = pytest.importorskip("normzoo.backends.cpu")
    if not kernels.available():
        pytest.skip(f"CPU kernels unavailable: {kernels.failure()}")
    with kernels.enabled(True, multi_device=True):
        yield True


@pytest.fixture
def x64():
    """float64 for one test: ``jax_enable_x64`` on while it runs, restored after.

    ``jax.enable_x64`` is a context manager: the setting is restored even when the test
    fails, so 64-bit types never leak into the next test.
    """
    import jax

    with jax.enable_x64(True):
        yield
