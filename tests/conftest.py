"""Shared test setup.

Two XLA flags must be in ``XLA_FLAGS`` before jax is first imported, so they are set here,
at conftest import time, appended to whatever the user already has (a flag the user set
is kept as given); fresh processes started by tests inherit them, unless a test gives
its own ``XLA_FLAGS``:

- eight simulated CPU devices, for the ``shard_map`` / ``pmap`` tests;
- XLA:CPU's LLVM back end at optimization level 0. The tests check numbers and programs,
  never speed, on tiny shapes where compiling costs more than running. The level changes
  only how LLVM turns XLA's optimized HLO into machine code: the HLO passes, which decide
  the program the tests check, are the same, and results can differ from the optimized
  build at most in rounding (multiply-adds LLVM may fuse). It takes about a quarter off
  the suite's time. ``XLA_FLAGS=--xla_backend_optimization_level=3 pytest`` runs the
  tests on the code users run.

Nothing else is enabled globally: a float64 test asks for the ``x64`` fixture, which
enables 64-bit types for that test only.

When collection ends, the checks that run in fresh processes start beside the in-process
tests (tests/background.py; a module opts in with ``background_jobs(items)``).
"""

import os

_TEST_XLA_FLAGS = {
    "xla_force_host_platform_device_count": "8",
    "xla_backend_optimization_level": "0",
}
_flags = os.environ.get("XLA_FLAGS", "")
for _name, _value in _TEST_XLA_FLAGS.items():
    if _name not in _flags:  # keep the user's own setting
        _flags = f"{_flags} --{_name}={_value}".strip()
os.environ["XLA_FLAGS"] = _flags

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
