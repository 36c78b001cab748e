"""Shared test setup.

Eight simulated CPU devices for the ``shard_map`` / ``pmap`` tests: the flag must be in
``XLA_FLAGS`` before jax is first imported, so it is set here, at conftest import time,
appended to whatever the user already has. Nothing else is enabled globally: float64
checks use ``jax.experimental.enable_x64()`` locally.
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


@pytest.fixture
def rng():
    """A fresh, seeded numpy Generator per test."""
    return np.random.default_rng(0)
