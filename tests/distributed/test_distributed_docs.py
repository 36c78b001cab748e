"""Every ```python block of docs/distributed.md runs as written, standalone.

Each block runs in its own fresh Python process (jax on CPU, from the repository root) with
the environment a reader has: no XLA_FLAGS of the test suite; each block asks for its own
simulated devices before it imports jax. The processes start when collection ends and run
beside the other tests (tests/background.py).
"""

import os
import pathlib
import subprocess
import sys

import pytest

import background
from test_readme import python_blocks

ROOT = pathlib.Path(__file__).resolve().parents[2]
DOC = ROOT / "docs" / "distributed.md"
BLOCKS = python_blocks(DOC.read_text())


def test_distributed_doc_has_python_blocks():
    assert len(BLOCKS) >= 4, "docs/distributed.md lost its examples"


def _run_block(code, environ):
    env = dict(environ, JAX_PLATFORMS="cpu")
    env.pop("XLA_FLAGS", None)
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=300)


def background_jobs(items):
    """Every selected block's run, started when collection ends."""
    for item in items:
        code = getattr(item, "callspec", None) and item.callspec.params.get("code")
        if code:
            yield ("distributed-doc", code), _run_block, (code, dict(os.environ))


@pytest.mark.parametrize("code", [c for _, c in BLOCKS], ids=[f"line{n}" for n, _ in BLOCKS])
def test_distributed_doc_block_runs(code):
    run = background.result(("distributed-doc", code), _run_block, code, dict(os.environ))
    assert run.returncode == 0, f"exit {run.returncode}\n{run.stdout[-2000:]}\n{run.stderr[-4000:]}"
