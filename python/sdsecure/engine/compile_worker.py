"""Compile one MAX graph, given as MLIR text, into a MEF file, in a process of its own.

    python -m sdsecure.engine.compile_worker GRAPH.mlir OUT.mef

MAX's compiler keeps most of the memory it peaked at until the process ends (7.5 of 8.3 GiB for the
full UNet). Compiling in a child returns it to the system before the weights are bound, so the
process that runs the model never holds both. The MEF is written to a temporary name and renamed:
a reader sees a whole file or none. Prints {"peak_rss_mib": ..., "compile_s": ...} on success.
"""

from __future__ import annotations

import json
import os
import resource
import sys
import time
from pathlib import Path


def peak_rss_mib() -> int:
    """This process's own peak RSS. Not getrusage: Linux carries ru_maxrss across exec, so a worker
    started by a big parent would report the parent's size."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) // 1024
    except (OSError, ValueError, IndexError):
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print("usage: python -m sdsecure.engine.compile_worker GRAPH.mlir OUT.mef", file=sys.stderr)
        return 2
    src, dst = Path(argv[0]), Path(argv[1])
    from max import engine
    from max.driver import CPU
    from max.graph import Graph

    t0 = time.perf_counter()
    graph = Graph(src.stem, path=src)
    compiled = engine.InferenceSession(devices=[CPU()]).compile(graph)
    tmp = dst.with_name(f".{dst.name}.{os.getpid()}.tmp")
    try:
        compiled.export_mef(tmp)
        os.replace(tmp, dst)
    finally:
        tmp.unlink(missing_ok=True)
    print(json.dumps({"peak_rss_mib": peak_rss_mib(), "compile_s": round(time.perf_counter() - t0, 2)}))
    return 0


if __name__ == "__main__":
    code = main(sys.argv[1:])
    sys.stdout.flush()
    sys.stderr.flush()
    # Leave without tearing MAX down: now and then its exit path aborts the process ("terminate called
    # without an active exception", seen in about 1 test run in 4) after the MEF was written and reported.
    os._exit(code)
