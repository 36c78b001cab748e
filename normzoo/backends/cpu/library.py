"""Compile, cache, check and load the CPU kernels' shared library.

The source is compiled with the system's C++ compiler (``$CXX``, else ``g++``, ``c++`` or
``clang++``) for this machine (``-march=native``, plus ``$NORMZOO_NATIVE_CFLAGS``) into
``$NORMZOO_CACHE_DIR`` (default ``~/.cache/normzoo``), under a name hashed from the source,
the flags, the compiler's version, jaxlib's version and the CPU.

Guarantees:

* a library is loaded only if its size and sha256 match the record written when it was built
  (``<name>.sha256``), so a partial or corrupt file (a killed build, a full disk, a truncated
  copy) is rebuilt, never mapped into the process;
* a build writes to a temporary file in the cache and renames it into place (atomic), so a
  reader sees a whole file or none; temporary files left by a killed build are never loaded
  and are removed by the next build;
* concurrent first uses, from threads or processes, share one build: builders take an
  exclusive ``fcntl`` lock on ``<name>.lock`` and check the cache again once they hold it;
* a build prints one line to stderr, saying that it compiles and how long that may take.

Nothing here runs unless the kernels are enabled (:func:`normzoo.backends.cpu.enable`).
"""

from __future__ import annotations

import ctypes
import fcntl
import hashlib
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
from pathlib import Path
from typing import Sequence

import jax

SOURCE = Path(__file__).with_name("normzoo_cpu.cc")
#: FFI target name -> the handler symbol in the compiled library.
TARGETS = {
    "normzoo_row_norm": "NormzooRowNorm",
    "normzoo_grouped_norm": "NormzooGroupedNorm",
    "normzoo_channel_affine": "NormzooChannelAffine",
    "normzoo_row_norm_backward": "NormzooRowNormBackward",
    "normzoo_grouped_norm_backward": "NormzooGroupedNormBackward",
}

_lock = threading.Lock()
_loaded: bool | None = None  # None: not tried yet
_failure: str | None = None


def compiler() -> str | None:
    return os.environ.get("CXX") or next(
        (c for c in ("g++", "c++", "clang++") if shutil.which(c)), None
    )


def flags() -> list[str]:
    """Compiler flags; ``$NORMZOO_NATIVE_CFLAGS`` is appended (e.g. ``-march=x86-64-v3`` for
    a cache shared by different machines, ``-mno-avx512bf16`` to test the generic code)."""
    extra = os.environ.get("NORMZOO_NATIVE_CFLAGS", "").split()
    return [
        "-O3", "-march=native", "-std=c++17", "-shared", "-fPIC", "-DNZ_LANES=16",
        f"-I{jax.ffi.include_dir()}", *extra,
    ]


def _cpu_signature() -> str:
    """What ``-march=native`` depends on: the CPU's model and feature flags."""
    try:
        with open("/proc/cpuinfo") as f:
            lines = [ln for ln in f if ln.startswith(("model name", "flags", "Features"))]
        return "".join(sorted(set(lines)))
    except OSError:
        return platform.processor() + platform.machine()


def cache_dir() -> Path:
    root = os.environ.get("NORMZOO_CACHE_DIR")
    if root:
        return Path(root)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "normzoo"


def cached_path(source: Path, flags: Sequence[str], stem: str, suffix: str) -> Path:
    """Where :func:`cached_build` puts ``source`` compiled with ``flags``: a name keyed by
    the source, the flags, the compiler's version, jaxlib's version and the CPU."""
    import jaxlib

    cxx = compiler() or "none"
    try:
        version = subprocess.run([cxx, "--version"], capture_output=True, text=True,
                                 timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        version = ""
    key = hashlib.sha256()
    for part in (source.read_bytes(), " ".join(flags).encode(), version.encode(),
                 jaxlib.__version__.encode(), _cpu_signature().encode()):
        key.update(part)
    return cache_dir() / f"{stem}-{key.hexdigest()[:16]}{suffix}"


def _record_path(target: Path) -> Path:
    return target.with_name(target.name + ".sha256")


def _digest(path: Path) -> tuple[int, str]:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return path.stat().st_size, h.hexdigest()


def is_intact(target: Path) -> bool:
    """Whether ``target`` exists and its size and sha256 are those recorded by its build."""
    try:
        size, digest = _record_path(target).read_text().split()
        return _digest(target) == (int(size), digest)
    except (OSError, ValueError):
        return False


def _write_atomically(path: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def cached_build(source: Path, flags: Sequence[str], stem: str, suffix: str) -> Path:
    """Compiles ``source`` with this machine's C++ compiler and ``flags`` into normzoo's
    cache (once: an intact cached output is reused) and returns the output's path.

    An output whose size or sha256 differs from its build record is rebuilt. Builders of one
    output serialize on a file lock, so concurrent callers (threads or processes) wait for
    the first one's build and then reuse it.
    """
    target = cached_path(source, flags, stem, suffix)
    if is_intact(target):
        return target
    cxx = compiler()
    if cxx is None:
        raise RuntimeError("no C++ compiler found (set CXX, or install g++ or clang++)")
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target.with_name(target.name + ".lock"), "a+") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
        if is_intact(target):  # built by another thread or process while we waited
            return target
        # Holding the lock, no build of this target is running: any temporary file of
        # one is left over from a build that was killed.
        for stale in target.parent.glob(f".{target.name}.*.tmp"):
            stale.unlink(missing_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
        os.close(fd)
        try:
            cmd = [cxx, *flags, str(source), "-o", tmp]
            print(f"normzoo: compiling {source.name} with {Path(cxx).name} into {target.parent} "
                  f"(once per machine and version; this can take a minute or two)",
                  file=sys.stderr, flush=True)
            done = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
            if done.returncode != 0:
                raise RuntimeError(f"{' '.join(cmd)} failed:\n{done.stderr[-4000:]}")
            os.chmod(tmp, 0o755)
            size, digest = _digest(Path(tmp))
            if size == 0:
                raise RuntimeError(f"{' '.join(cmd)} wrote an empty file")
            _write_atomically(_record_path(target), f"{size} {digest}\n".encode())
            os.replace(tmp, target)  # atomic: readers see the whole file or the old one
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    return target


def library_path() -> Path:
    """Where the compiled kernels for this source, compiler, jaxlib and CPU live."""
    return cached_path(SOURCE, flags(), "normzoo_cpu", ".so")


def build() -> Path:
    """Compiles the kernels (if no intact build is cached) and returns the library's path."""
    return cached_build(SOURCE, flags(), "normzoo_cpu", ".so")


def load() -> bool:
    """Builds (if needed), checks, loads and registers the kernels as XLA FFI targets, once
    per process; False (and :func:`failure` says why) where that is not possible."""
    global _loaded, _failure
    with _lock:
        if _loaded is None:
            try:
                path = build()
                if not is_intact(path):  # changed between its build and now: never map it
                    raise RuntimeError(f"{path} does not match its build record")
                library = ctypes.cdll.LoadLibrary(str(path))
                for name, symbol in TARGETS.items():
                    jax.ffi.register_ffi_target(
                        name, jax.ffi.pycapsule(getattr(library, symbol)), platform="cpu"
                    )
                _loaded = True
            except Exception as error:  # no compiler, headers or loader: the XLA path serves
                _loaded, _failure = False, f"{type(error).__name__}: {error}"
    return bool(_loaded)


def loaded() -> bool | None:
    """True / False once :func:`load` ran, None before (nothing built or loaded yet)."""
    return _loaded


def failure() -> str | None:
    """Why the kernels could not be built or loaded, if they could not."""
    return _failure
