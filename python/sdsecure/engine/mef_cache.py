"""Compiled graphs on disk (MEF files), compiled in a child process when missing.

Used for large models (see runtime.ISOLATE_MIN_WEIGHT_BYTES): the compile then never shares a
process with the weights, and its memory is returned to the system when the child exits.

The key is the sha256 of the graph text (every op, shape, attribute and literal; weight values are
bound later) together with the MAX version and the CPU's instruction-set flags, since a MEF holds
machine code for this CPU. The directory is created private to the user (0700): a MEF is native
code that this process will run, so it is trusted exactly like MAX's own cache in ~/.cache/modular.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import platform
import subprocess
import sys
import tempfile
import time
from functools import lru_cache
from pathlib import Path

from sdsecure.errors import UserError

log = logging.getLogger(__name__)


class CompileError(RuntimeError):
    """MAX failed to compile a graph that the importer built (a bug or a MAX limit, not user input)."""


def cache_dir() -> Path:
    root = os.environ.get("SDSECURE_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "sdsecure")
    path = Path(root) / "max-mef"
    try:
        path.mkdir(parents=True, exist_ok=True, mode=0o700)
        st = path.stat()
    except OSError as e:
        raise UserError(f"cannot use the compiled-graph cache {path}: {e.strerror or e}") from None
    if st.st_uid != os.getuid() or st.st_mode & 0o022:
        # a MEF is native code that this process runs: nobody else may be able to put one there
        raise UserError(f"compiled-graph cache {path} must be owned by you and not writable by group or others "
                        f"(mode {st.st_mode & 0o777:o}); fix it with: chmod 700 {path}")
    return path


@lru_cache(maxsize=1)
def _target() -> str:
    """What a compiled artifact depends on besides the graph: the MAX build and this CPU's features."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        max_version = version("max")
    except PackageNotFoundError:
        max_version = "unknown"
    flags = ""
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as f:
            flags = next((line for line in f if line.startswith("flags")), "")
    except OSError:
        pass
    return f"max={max_version};machine={platform.machine()};flags={hashlib.sha256(flags.encode()).hexdigest()}"


def mef_key(graph_text: str, device: str) -> str:
    return hashlib.sha256(f"{_target()};device={device}\n{graph_text}".encode()).hexdigest()


def cached_mef(key: str) -> Path | None:
    path = cache_dir() / f"{key}.mef"
    return path if path.is_file() else None


def child_env() -> dict[str, str]:
    """This process's environment for a child `python -m sdsecure...` (which must find this package)."""
    env = dict(os.environ)
    package_root = str(Path(__file__).resolve().parents[2])   # the directory holding `sdsecure`
    env["PYTHONPATH"] = package_root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return env


def compile_in_child(graph_text: str, key: str, *, label: str) -> tuple[Path, dict]:
    """Compile `graph_text` in a child process into the cache; returns the MEF path and the child's
    stats ({"peak_rss_mib", "compile_s"})."""
    directory = cache_dir()
    dst = directory / f"{key}.mef"
    env = child_env()
    with tempfile.TemporaryDirectory(prefix="compile-", dir=directory) as tmp:
        src = Path(tmp) / "sdsecure_onnx.mlir"
        src.write_text(graph_text, encoding="utf-8")
        t0 = time.perf_counter()
        proc = subprocess.run([sys.executable, "-m", "sdsecure.engine.compile_worker", str(src), str(dst)],
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    if proc.returncode != 0 or not dst.is_file():
        tail = "\n".join((proc.stderr or "").strip().splitlines()[-15:])
        raise CompileError(f"{label}: MAX compile failed in a child process (exit {proc.returncode}):\n{tail}")
    try:
        stats = json.loads(proc.stdout.strip().splitlines()[-1])
    except (ValueError, IndexError):
        stats = {}
    stats.setdefault("compile_s", round(time.perf_counter() - t0, 2))
    log.info("%s compiled in a child process in %.0f s (peak %s MiB)", label, stats["compile_s"],
             stats.get("peak_rss_mib", "?"))
    return dst, stats
