#!/usr/bin/env python3
"""MAX's matmul against the same kernel with its weight packed once, ahead of time, and numpy's sgemm.

MAX 26.7's `ops.matmul` on CPU packs tiles of the weight on every call; onnxruntime (MLAS) packs its
weights once when the session is created. This measures what packing ahead of time would gain, with
two custom ops (benchmarks/packed_matmul/packed_matmul.mojo) that call MAX's own packing routine and
matmul kernel, at the SD 1.5 text encoder's shapes (M = 2 x 77 tokens) and a few UNet ones.

For each [M, K] x [K, N] it prints ms per matmul and GFLOP/s for:
  - max:    `ops.matmul` with the weight as a graph weight (as the engine runs it);
  - packed: the weight packed once by MAX's `pack_b_ndbuffer`, multiplied by MAX's kernel with
            b_packed=True;
  - numpy:  numpy's sgemm with the same threads;
and the ratio packed / max, checking both MAX results against a float64 product. It needs the `mojo`
of this environment, and compiles the ops and each graph (a few minutes cold, seconds cached).

    python benchmarks/bench_matmul.py [--shapes 154x768x768,154x768x3072] [--repeat 30]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
DEFAULT_SHAPES = "154x768x768,154x768x3072,154x3072x768,128x1280x1280,2048x320x1280"
LAYERS = 4          # independent matmuls per graph, each with its own weight


def build_ops(out_dir: Path) -> Path:
    mojo = shutil.which("mojo") or str(Path(sys.executable).parent / "mojo")
    target = out_dir / "packed_matmul.mojoc"
    proc = subprocess.run([mojo, "precompile", str(HERE / "packed_matmul"), "-o", str(target)],
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if proc.returncode != 0:
        sys.exit(f"mojo precompile failed:\n{proc.stdout[-3000:]}")
    return target


def aligned(a: np.ndarray, alignment: int = 64) -> np.ndarray:
    """A copy of `a` whose data starts on an `alignment`-byte boundary (the packed kernel needs 64)."""
    raw = np.empty(a.nbytes + alignment, np.uint8)
    start = -raw.ctypes.data % alignment
    out = raw[start:start + a.nbytes].view(a.dtype).reshape(a.shape)
    out[...] = a
    return out


def timed(model, inputs, repeat: int) -> float:
    for _ in range(3):
        model.execute(*inputs)
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        model.execute(*inputs)
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def run_shape(session, ext: Path, m: int, k: int, n: int, repeat: int, rng) -> dict:
    from max.driver import Buffer
    from max.dtype import DType
    from max.graph import DeviceRef, Graph, TensorType, Weight, ops

    dev = DeviceRef.CPU()
    f32 = DType.float32
    weights = [(rng.standard_normal((k, n)) / np.sqrt(k)).astype(np.float32) for _ in range(LAYERS)]
    x = rng.standard_normal((m, k)).astype(np.float32)
    want = [x.astype(np.float64) @ w.astype(np.float64) for w in weights]

    def one_op(name: str, op: str, out: TensorType):
        with Graph(name, input_types=[TensorType(f32, [k, n], dev)], custom_extensions=[ext]) as g:
            g.output(ops.custom(op, device=dev, values=[g.inputs[0]], out_types=[out], parameters={"m": m})[0])
        return session.load(g)

    shape = [int(v) for v in one_op(f"shape_{m}_{k}_{n}", "bench_packed_b_shape", TensorType(DType.int64, [2], dev))
             .execute(Buffer.from_numpy(weights[0]))[0].to_numpy()]
    packer = one_op(f"pack_{m}_{k}_{n}", "bench_pack_b", TensorType(f32, shape, dev))
    packed = [aligned(packer.execute(Buffer.from_numpy(w))[0].to_numpy()) for w in weights]

    result = {"shape": f"[{m},{k}]x[{k},{n}]", "gflop": 2 * m * k * n / 1e9}
    for variant in ("max", "packed"):
        registry = {}
        with Graph(f"mm_{variant}_{m}_{k}_{n}", input_types=[TensorType(f32, [m, k], dev)],
                   custom_extensions=[ext]) as g:
            outs = []
            for i in range(LAYERS):
                arr = weights[i] if variant == "max" else packed[i]
                registry[f"w{i}"] = arr
                w = g.add_weight(Weight(f"w{i}", f32, list(arr.shape), dev))
                if variant == "max":
                    outs.append(ops.matmul(g.inputs[0], w))
                else:
                    outs.append(ops.custom("bench_matmul_packed_b", device=dev, values=[g.inputs[0], w],
                                           out_types=[TensorType(f32, [m, n], dev)], parameters={"m": m})[0])
            g.output(*outs)
        model = session.init(session.compile(g), weights_registry=registry)
        feed = [Buffer.from_numpy(x)]
        got = model.execute(*feed)
        result[f"{variant}_err"] = max(float(np.abs(r.to_numpy() - e).max() / np.abs(e).max()) for r, e in zip(got, want))
        result[f"{variant}_s"] = timed(model, feed, repeat) / LAYERS
    t = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        for w in weights:
            x @ w
        t.append((time.perf_counter() - t0) / LAYERS)
    result["numpy_s"] = statistics.median(t)
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", default=DEFAULT_SHAPES, help="MxKxN,... (default: %(default)s)")
    ap.add_argument("--repeat", type=int, default=30)
    args = ap.parse_args()
    try:
        shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")]
        if any(len(s) != 3 or min(s) <= 0 for s in shapes):
            raise ValueError
    except ValueError:
        sys.exit(f"--shapes {args.shapes!r}: expected MxKxN,... with positive sizes")

    from max import engine
    from max.driver import CPU

    with tempfile.TemporaryDirectory(prefix="bench-matmul-") as tmp:
        t = time.perf_counter()
        ext = build_ops(Path(tmp))
        print(f"custom ops built in {time.perf_counter() - t:.1f} s; {os.cpu_count()} CPUs", flush=True)
        session = engine.InferenceSession(devices=[CPU()], custom_extensions=[ext])
        rng = np.random.default_rng(0)
        print("| shape | max ms | packed ms | numpy ms | GFLOP/s max / packed / numpy | packed / max | rel err max, packed |")
        print("|---|---|---|---|---|---|---|")
        for m, k, n in shapes:
            r = run_shape(session, ext, m, k, n, args.repeat, rng)
            g = r["gflop"]
            print(f"| {r['shape']} | {r['max_s'] * 1e3:.2f} | {r['packed_s'] * 1e3:.2f} | {r['numpy_s'] * 1e3:.2f} | "
                  f"{g / r['max_s']:.0f} / {g / r['packed_s']:.0f} / {g / r['numpy_s']:.0f} | "
                  f"{r['packed_s'] / r['max_s']:.2f} | {r['max_err']:.1e}, {r['packed_err']:.1e} |", flush=True)


if __name__ == "__main__":
    main()
