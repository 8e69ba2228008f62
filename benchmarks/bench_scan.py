#!/usr/bin/env python3
"""How close the gate gets to the hashing limit, and how much memory it needs.

For the tiny embedded pipeline and for a full-size SD 1.5 export (>= 3 GB of external weights, made
by `python tools/export_full_sd.py` into generated/full-sd15/), prints:

  - openssl: `openssl dgst -sha256` over the same files (one process, warm page cache): the limit,
    since every byte must be hashed;
  - gate:    wall time of `sdsecure.gate.audit(model)` (read once + sha256 + sealed copy + every rule),
             and of the read+hash step alone (walk_snapshot), each in a fresh subprocess;
  - ratio:   gate / openssl (target <= 1.3x) and the gate process's peak RSS (target < 1 GiB).

Best of --repeat runs (after one warm-up run that fills the page cache). Usage:

    python benchmarks/bench_scan.py [--full generated/full-sd15] [--repeat 3] [--only tiny|full]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
GiB = 1 << 30
TARGET_RATIO = 1.3

CHILD = r"""
import json, resource, sys, time
sys.path.insert(0, {python_dir!r})
mode, ref = sys.argv[1], sys.argv[2]
import sdsecure.gate.validate, sdsecure.gate.rules as R   # imports are not part of the timed gate call
R.load_families()
ru0 = resource.getrusage(resource.RUSAGE_SELF)
cpu0 = ru0.ru_utime + ru0.ru_stime
from sdsecure.gate import audit
from sdsecure.gate.files import walk_snapshot
from sdsecure.refs import parse_ref
t0 = time.perf_counter()
if mode == "gate":
    vm = audit(ref, "default", progress=False)
    extra = {{"verdict": vm.report.verdict, "counts": vm.report.counts(), "files": len(vm.files)}}
else:
    res = walk_snapshot(parse_ref(ref).path, progress=False)
    extra = {{"files": len(res.files), "findings": len(res.findings)}}
dt = time.perf_counter() - t0
ru = resource.getrusage(resource.RUSAGE_SELF)
print(json.dumps({{"seconds": dt, "cpu": ru.ru_utime + ru.ru_stime - cpu0, "maxrss_kib": ru.ru_maxrss, **extra}}))
"""


def model_files(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file() and not p.is_symlink())


def time_openssl(files: list[Path]) -> tuple[float, float]:
    """(wall seconds, CPU seconds) of one `openssl dgst -sha256` over all files."""
    import resource

    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    subprocess.run(["openssl", "dgst", "-sha256", *map(str, files)], check=True, stdout=subprocess.DEVNULL)
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return wall, (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)


def run_child(mode: str, ref: str) -> dict:
    code = CHILD.format(python_dir=str(REPO / "python"))
    out = subprocess.run([sys.executable, "-c", code, mode, ref], check=True, capture_output=True, text=True,
                         env={**os.environ, "HF_HUB_OFFLINE": "1"})
    return json.loads(out.stdout.strip().splitlines()[-1])


def bench(name: str, ref: str, root: Path, repeat: int) -> bool:
    files = model_files(root)
    total = sum(p.stat().st_size for p in files)
    print(f"\n== {name}: {root}  ({len(files)} files, {total / 1e9:.3f} GB)")
    time_openssl(files)                                   # warm the page cache
    run_child("walk", ref)
    ossl, ossl_cpu = min(time_openssl(files) for _ in range(repeat))
    walks = [run_child("walk", ref) for _ in range(repeat)]
    gates = [run_child("gate", ref) for _ in range(repeat)]
    walk = min(walks, key=lambda r: r["seconds"])
    gate = min(gates, key=lambda r: r["seconds"])
    rss = max(r["maxrss_kib"] for r in gates) * 1024
    walk_rss = max(r["maxrss_kib"] for r in walks) * 1024
    ratio = gate["seconds"] / ossl
    print(f"                           wall        CPU (user+sys)")
    print(f"openssl dgst -sha256     {ossl:7.3f} s   {ossl_cpu:7.3f} s   ({total / ossl / 1e9:.2f} GB/s)")
    print(f"gate read+hash only      {walk['seconds']:7.3f} s   {walk['cpu']:7.3f} s   "
          f"({walk['seconds'] / ossl:.2f}x openssl wall, {walk['cpu'] / max(ossl_cpu, 1e-9):.2f}x CPU)")
    print(f"gate audit() (all rules) {gate['seconds']:7.3f} s   {gate['cpu']:7.3f} s   "
          f"({ratio:.2f}x openssl wall, {gate['cpu'] / max(ossl_cpu, 1e-9):.2f}x CPU)   verdict {gate['verdict']} "
          f"{ {k: v for k, v in gate['counts'].items() if v} }")
    print(f"peak RSS: read+hash {walk_rss / 2**20:.0f} MiB, audit() {rss / 2**20:.0f} MiB "
          "(whole process, imports included)")
    ok_ratio, ok_rss = ratio <= TARGET_RATIO, rss < GiB
    print(f"targets: ratio <= {TARGET_RATIO}x: {'PASS' if ok_ratio else 'FAIL'};  RSS < 1 GiB: {'PASS' if ok_rss else 'FAIL'}"
          + ("   (tiny model: fixed costs of the rules dominate; the ratio target is about large weights)"
             if total < 100e6 else ""))
    return ok_ratio and ok_rss


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--full", type=Path, default=REPO / "generated" / "full-sd15")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--only", choices=["tiny", "full"])
    args = ap.parse_args(argv)
    if not shutil.which("openssl"):
        print("openssl not found on PATH", file=sys.stderr)
        return 2
    sys.path.insert(0, str(REPO / "python"))
    from sdsecure.refs import embedded_path

    print(f"python {sys.version.split()[0]}, {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f}")
    ok = True
    if args.only in (None, "tiny"):
        bench("tiny embedded pipeline", "embedded", embedded_path(), args.repeat)
    if args.only in (None, "full"):
        full = args.full
        weights = sum(p.stat().st_size for p in model_files(full)) if full.is_dir() else 0
        if weights < 3 * GiB * 0.93:
            print(f"\n== full-size pipeline: not found at {full} (need >= 3 GB of weights).\n"
                  f"   Make it with:  python tools/export_full_sd.py {full}   "
                  "(random weights, ~4.3 GB, ~70 s, needs the `fixtures` extra)")
            return 2
        ok = bench("full-size SD 1.5 (random weights)", str(full), full, args.repeat) and ok
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
