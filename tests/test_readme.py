"""Every ```python block of README.md runs as written, standalone.

Each block runs in its own fresh Python process (jax on CPU, from the repository root), so a
block may use only the names it imports or defines itself; one test per block, named by the
line of its opening fence. The processes start when collection ends and run beside the
other tests (tests/background.py); each test checks its block's run.
"""

import os
import pathlib
import re
import subprocess
import sys

import pytest

import background

ROOT = pathlib.Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
_FENCE = re.compile(r"^```python[ \t]*\n(.*?)^```[ \t]*$", re.S | re.M)


def python_blocks(text):
    """``(line of the opening fence, code)`` of every ```python block."""
    return [(text.count("\n", 0, m.start()) + 1, m.group(1)) for m in _FENCE.finditer(text)]


BLOCKS = python_blocks(README.read_text())


def test_readme_has_python_blocks():
    assert BLOCKS, "README.md has no ```python block"


def _run_block(code, environ):
    env = dict(environ, JAX_PLATFORMS="cpu")
    env.pop("XLA_FLAGS", None)  # the suite's 8 simulated devices are not what a reader has
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=300)


def background_jobs(items):
    """Every selected block's run, started when collection ends (tests/background.py), in
    the environment of that moment (no test's monkeypatched variables)."""
    for item in items:
        code = getattr(item, "callspec", None) and item.callspec.params.get("code")
        if code:
            yield ("readme", code), _run_block, (code, dict(os.environ))


@pytest.mark.parametrize("code", [c for _, c in BLOCKS], ids=[f"line{n}" for n, _ in BLOCKS])
def test_readme_block_runs(code):
    run = background.result(("readme", code), _run_block, code, dict(os.environ))
    assert run.returncode == 0, f"exit {run.returncode}\n{run.stdout[-2000:]}\n{run.stderr[-4000:]}"
