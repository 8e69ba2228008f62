#!/usr/bin/env python3
"""Where the text encoder's time goes: matmul kernels at its shapes, MAX against onnxruntime and our own.

MAX 26.7's `ops.matmul` on CPU packs tiles of the weight on every call; onnxruntime (MLAS) packs its
weights once when the session is created. The custom ops in benchmarks/packed_matmul/packed_matmul.mojo
measure what packing ahead of time gains inside MAX, with MAX's own kernel and with ours.

Each graph chains LAYERS matmuls (weights alternating [K, N] and [N, K], so one needs the other, as in
a network: independent matmuls would run side by side and flatter the numbers). For each [M, K] x [K, N]
(M = 2 x 77 tokens for the text encoder) it prints ms per matmul and GFLOP/s for:
  - max:    `ops.matmul` with the weight as a graph weight (as the engine runs it, with MAX's helper
            thread demoted: engine.helper_threads);
  - packed: the weight packed once by MAX's `pack_b_ndbuffer`, multiplied by MAX's kernel (b_packed);
  - own:    the weight packed once into 32-column panels, multiplied by our kernel (bench_gemm_panels);
  - ort:    onnxruntime's MatMul (MLAS, weights packed at session creation);
  - numpy:  numpy's sgemm;
all with every core, and own and ort again with one thread (own on one MAX worker), which compares
the kernels without their threading. Errors are against a float64 product. It needs this
environment's `mojo` and compiles the ops and each graph (a few minutes cold, seconds cached).

    python benchmarks/bench_matmul.py [--shapes 154x768x768,154x768x3072] [--repeat 30]
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "python"))
from sdsecure.engine import helper_threads  # noqa: E402
DEFAULT_SHAPES = "154x768x768,154x768x3072,128x1280x1280,2048x320x1280"
LAYERS = 4          # matmuls per graph, chained (alternating [K, N] and [N, K] weights)


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


def chain(m: int, k: int, n: int) -> tuple[np.ndarray, list[np.ndarray], np.ndarray]:
    """An input and LAYERS weights that alternate [k, n] and [n, k]: each matmul needs the previous one,
    as in a network, so no two of them can run at the same time. Also the float64 result. The same for
    the same shape, in any process."""
    rng = np.random.default_rng([m, k, n])
    weights = [(rng.standard_normal((k, n) if i % 2 == 0 else (n, k)) / np.sqrt(k if i % 2 == 0 else n))
               .astype(np.float32) for i in range(LAYERS)]
    x = rng.standard_normal((m, k)).astype(np.float32)
    want = x.astype(np.float64)
    for w in weights:
        want = want @ w.astype(np.float64)
    return x, weights, want


def panels(w: np.ndarray) -> np.ndarray:
    """[K, N] -> [N / 32, K, 32], 64-byte aligned: the layout bench_gemm_panels reads."""
    k, n = w.shape
    return aligned(w.reshape(k, n // 32, 32).transpose(1, 0, 2))


def ort_session(weights: list[np.ndarray], m: int, threads: int):
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    nodes = [helper.make_node("MatMul", [f"x{i}", f"w{i}"], [f"x{i + 1}"]) for i in range(len(weights))]
    graph = helper.make_graph(nodes, "chain", [helper.make_tensor_value_info("x0", TensorProto.FLOAT, [m, weights[0].shape[0]])],
                              [helper.make_tensor_value_info(f"x{len(weights)}", TensorProto.FLOAT, None)],
                              [numpy_helper.from_array(w, f"w{i}") for i, w in enumerate(weights)])
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    return ort.InferenceSession(helper.make_model(graph).SerializeToString(), opts, providers=["CPUExecutionProvider"])


def timed_call(fn, repeat: int) -> float:
    for _ in range(3):
        fn()
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def reference_times(m: int, k: int, n: int, repeat: int) -> dict:
    """onnxruntime (all threads, one thread) and numpy on the same chain. Run in a process of its own:
    next to MAX's runtime, onnxruntime measured up to a third slower."""
    x, weights, want = chain(m, k, n)
    result = {}
    for variant, threads in (("ort", 0), ("ort1", 1)):
        ort = ort_session(weights, m, threads)
        got = ort.run(None, {"x0": x})[0]
        result[f"{variant}_err"] = float(np.abs(got - want).max() / np.abs(want).max())
        result[f"{variant}_s"] = timed_call(lambda: ort.run(None, {"x0": x}), repeat) / LAYERS
        del ort

    def numpy_chain():
        y = x
        for w in weights:
            y = y @ w
    result["numpy_s"] = timed_call(numpy_chain, repeat) / LAYERS
    return result


def run_shape(session, ext: Path, m: int, k: int, n: int, repeat: int) -> dict:
    from max.driver import Buffer
    from max.dtype import DType
    from max.graph import DeviceRef, Graph, TensorType, Weight, ops

    dev = DeviceRef.CPU()
    f32 = DType.float32
    x, weights, want = chain(m, k, n)

    def one_op(name: str, op: str, w: np.ndarray, out: TensorType):
        with Graph(name, input_types=[TensorType(f32, list(w.shape), dev)], custom_extensions=[ext]) as g:
            g.output(ops.custom(op, device=dev, values=[g.inputs[0]], out_types=[out], parameters={"m": m})[0])
        return session.load(g).execute(Buffer.from_numpy(w))[0].to_numpy()

    def mab_packed(w: np.ndarray) -> np.ndarray:
        kk, nn = w.shape
        shape = [int(v) for v in one_op(f"shape_{m}_{kk}_{nn}", "bench_packed_b_shape", w, TensorType(DType.int64, [2], dev))]
        return aligned(one_op(f"pack_{m}_{kk}_{nn}", "bench_pack_b", w, TensorType(f32, shape, dev)))

    own_ok = k % 32 == 0 and n % 32 == 0
    variants = {"max": weights, "packed": [mab_packed(w) for w in weights]}
    if own_ok:
        variants["own"] = variants["own1"] = [panels(w) for w in weights]

    result = {"shape": f"[{m},{k}]x[{k},{n}]", "gflop": 2 * m * k * n / 1e9}
    for variant, arrays in variants.items():
        registry = {}
        with Graph(f"mm_{variant}_{m}_{k}_{n}", input_types=[TensorType(f32, [m, k], dev)],
                   custom_extensions=[ext]) as g:
            y = g.inputs[0]
            for i, arr in enumerate(arrays):
                registry[f"w{i}"] = arr
                w = g.add_weight(Weight(f"w{i}", f32, list(arr.shape), dev))
                cols = weights[i].shape[1]
                if variant == "max":
                    y = ops.matmul(y, w)
                elif variant == "packed":
                    y = ops.custom("bench_matmul_packed_b", device=dev, values=[y, w],
                                   out_types=[TensorType(f32, [m, cols], dev)], parameters={"m": m})[0]
                else:
                    y = ops.custom("bench_gemm_panels", device=dev, values=[y, w],
                                   out_types=[TensorType(f32, [m, cols], dev)],
                                   parameters={"tasks": 1 if variant == "own1" else os.cpu_count() or 1})[0]
            g.output(y)
        model = session.init(session.compile(g), weights_registry=registry)
        feed = [Buffer.from_numpy(x)]
        before = helper_threads.native_threads()
        got = model.execute(*feed)[0].to_numpy()
        helper_threads.demote_new_helpers(before)      # as the engine does (engine.helper_threads)
        result[f"{variant}_err"] = float(np.abs(got - want).max() / np.abs(want).max())
        result[f"{variant}_s"] = timed_call(lambda: model.execute(*feed), repeat) / LAYERS
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
        print("| shape | ms per matmul: max / packed / own / ort | GFLOP/s: max / packed / own / ort / numpy "
              "| one thread GFLOP/s: own / ort | own / max | own / ort | max rel err |")
        print("|---|---|---|---|---|---|---|")
        for m, k, n in shapes:
            r = run_shape(session, ext, m, k, n, args.repeat)
            with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
                r.update(pool.submit(reference_times, m, k, n, args.repeat).result())
            g = r["gflop"]

            def ms(v: str) -> str:
                return f"{r[v + '_s'] * 1e3:.2f}" if v + "_s" in r else "-"

            def gf(v: str) -> str:
                return f"{g / r[v + '_s']:.0f}" if v + "_s" in r else "-"

            def ratio(a: str, b: str) -> str:
                return f"{r[a + '_s'] / r[b + '_s']:.2f}" if a + "_s" in r else "-"
            errs = ", ".join(f"{v} {r[v + '_err']:.0e}" for v in ("max", "packed", "own", "ort") if v + "_err" in r)
            print(f"| {r['shape']} | {ms('max')} / {ms('packed')} / {ms('own')} / {ms('ort')} | "
                  f"{gf('max')} / {gf('packed')} / {gf('own')} / {gf('ort')} / {gf('numpy')} | "
                  f"{gf('own1')} / {gf('ort1')} | {ratio('own', 'max')} | {ratio('own', 'ort')} | {errs} |", flush=True)

if __name__ == "__main__":
    main()
