"""Kept for tests/functional/test_f_fused.py until it asks for the ``x64`` fixture of
tests/conftest.py; the float64 references live in tests/reference.py."""

import jax


def x64():
    """Context manager enabling float64 locally (the ``x64`` fixture is the shared spelling)."""
    return jax.enable_x64(True)
