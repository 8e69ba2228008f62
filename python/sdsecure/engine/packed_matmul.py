"""MatMul on a weight packed once, in the layout MAX's own CPU matmul kernel works in.

MAX 26.7's CPU matmul copies panels of B into its working layout on every call; onnxruntime packs its
weights once, when the session is created. MAX's built-in matmul also takes a B that is already in that
layout: a weight whose tensor type carries the layout attribute "KNkni". It stays MAX's own op, which
the graph compiler treats as any matmul (the custom ops in benchmarks/packed_matmul lost MAX's fusions
and ran slower). Measured on 2 cores, [154,768]x[768,3072]: 217 GFLOP/s against 192-197 unpacked; the
full-size text encoder 0.127-0.140 s against 0.140-0.150 s, in alternating processes.

The layout: K is cut into tiles of at most TILE_K rows; each tile holds N/64 panels of [rows, 64], one
after the other. MAX chooses its tiles at run time from M, K, N and the machine (here it lays B out
otherwise for 10 or 32 rows, and this way for 128 to 2048), so a layout computed here is used only once
a probe has shown that MAX multiplies it correctly for that (M, K, N) on this machine with this MAX: one
small graph for all of a model's new shapes, compiled and run in a child process (MAX keeps a compile's
memory, about 1 GB, until the process ends), its verdicts remembered in the cache. A shape that fails
the probe (or a probe that fails to run) keeps the plain MatMul.

MAX 26.7's Python `TensorType` reads back only conv filter layouts (FilterLayout); `_MatmulLayout` and
the fallback in `_read_layout` let a value typed with a matmul layout pass through the graph API.
"""

from __future__ import annotations

import json
import logging
import os
import platform
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

import numpy as np

from sdsecure.errors import UserError

log = logging.getLogger(__name__)

ENABLED = os.environ.get("SDSECURE_PACKED_MATMUL", "1") != "0"   # 0: plain MatMul (for comparisons)
PANEL = 64                  # columns per panel (4 AVX-512 registers of float32)
TILE_K = 2048               # rows of K per tile
MIN_WEIGHT_ELEMENTS = 1 << 16   # smaller weights: packing them on each call costs nothing worth saving
# More rows amortise MAX's own packing over more work: the full UNet step at 32x32 latents ran 4% slower
# with all of its matmuls packed (128 to 2048 rows: 1.64-1.69 s against 1.58-1.62 s), and still 2.5%
# with those of 256 rows or fewer (sd15.PACKED_MATMUL_COMPONENTS leaves the UNet to MAX).
MAX_ROWS = 256
LAYOUT = "KNkni"
_LOCK = threading.Lock()


def candidate(m: int, k: int, n: int, dtype: np.dtype) -> bool:
    """Whether a [m, k] x [k, n] MatMul could use a packed weight (before the probe)."""
    return ENABLED and dtype == np.float32 and 0 < m <= MAX_ROWS and n % PANEL == 0 and k * n >= MIN_WEIGHT_ELEMENTS


def pack(w: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """`w` [K, N] in the packed layout (same shape, elements reordered); into `out` if given."""
    k, n = w.shape
    if out is None:
        out = np.empty((k, n), np.float32)
    flat = out.reshape(-1)
    for k0 in range(0, k, TILE_K):
        rows = min(TILE_K, k - k0)
        tile = flat[k0 * n:(k0 + rows) * n].reshape(n // PANEL, rows, PANEL)
        tile[...] = w[k0:k0 + rows].reshape(rows, n // PANEL, PANEL).transpose(1, 0, 2)
    return out


class _MatmulLayout:
    """A tensor layout attribute that MAX's FilterLayout enum does not list."""

    def __init__(self, name: str):
        self.name = name

    def to_mlir(self):
        from max._core.dialects import mo
        return mo.LayoutAttr(format_str=self.name)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, _MatmulLayout) and other.name == self.name

    def __hash__(self) -> int:
        return hash(self.name)


def _allow_matmul_layouts() -> None:
    from max.graph.type import FilterLayout

    if getattr(FilterLayout.from_mlir, "_sdsecure", False):
        return
    original = FilterLayout.from_mlir

    def _read_layout(attr):
        try:
            return original(attr)
        except ValueError:
            if attr.format.value != LAYOUT:
                raise
            return _MatmulLayout(LAYOUT)

    _read_layout._sdsecure = True
    FilterLayout.from_mlir = staticmethod(_read_layout)


def packed_weight(weight):
    """The graph value `weight` ([K, N], holding packed data) typed with the packed layout."""
    from max.graph import ops

    _allow_matmul_layouts()
    return ops.rebind(weight, shape=list(weight.shape), layout=_MatmulLayout(LAYOUT))


def matmul(x, weight):
    """x [..., K] times a packed weight [K, N]: MAX's matmul on the rows of x flattened."""
    from max.graph import ops

    lead = [int(d) for d in x.shape[:-1]]
    k, n = (int(d) for d in weight.shape)
    y = ops.matmul(ops.reshape(x, [int(np.prod(lead)), k]), packed_weight(weight))
    return ops.reshape(y, lead + [n])


# -- the probe -------------------------------------------------------------------------------------
def _verdict_file() -> Path:
    from sdsecure.engine.mef_cache import cache_dir

    return cache_dir() / "packed-matmul.json"


def _machine_key() -> str:
    """What MAX's choice of layout may depend on: the MAX build and the CPU's features (as for a MEF), the
    CPU model (its caches) and the number of cores."""
    from sdsecure.engine.mef_cache import _target

    model = platform.processor()
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as f:
            model = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), model)
    except OSError:
        pass
    return f"{_target()};cpu={model};cores={os.cpu_count()}"


def _load_verdicts(path: Path, machine: str) -> dict[str, bool]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    if not isinstance(data, dict) or data.get("machine") != machine or not isinstance(data.get("shapes"), dict):
        return {}
    return {k: v for k, v in data["shapes"].items() if isinstance(v, bool)}


def _save_verdicts(path: Path, machine: str, verdicts: dict[str, bool]) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".packed-matmul.")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump({"machine": machine, "shapes": verdicts}, f, indent=0, sort_keys=True)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def _key(shape: tuple[int, int, int]) -> str:
    return "x".join(str(d) for d in shape)


def verified(shapes: set[tuple[int, int, int]]) -> set[tuple[int, int, int]]:
    """The (M, K, N) of `shapes` whose packed layout MAX multiplies correctly on this machine (probed
    once, then read from the cache)."""
    if not shapes:
        return set()
    with _LOCK:
        machine = _machine_key()
        try:
            path = _verdict_file()
        except UserError as e:   # an unusable cache dir: probe, remember nothing
            log.debug("packed matmul verdicts not cached: %s", e)
            path = None
        verdicts = _load_verdicts(path, machine) if path else {}
        new = sorted(s for s in shapes if _key(s) not in verdicts)
        found = _probe_in_child(new) if new else None
        if found is not None:           # a probe that failed to run is tried again next time
            verdicts.update(found)
            if path:
                try:
                    _save_verdicts(path, machine, verdicts)
                except OSError as e:
                    log.debug("packed matmul verdicts not saved: %s", e)
        return {s for s in shapes if verdicts.get(_key(s))}


def _probe_in_child(shapes: list[tuple[int, int, int]]) -> dict[str, bool] | None:
    """probe(shapes), run in a child process; None if the child fails."""
    from sdsecure.engine.mef_cache import child_env
    from sdsecure.engine.runtime import compile_notice

    with compile_notice("the packed matmul probe"):
        proc = subprocess.run([sys.executable, "-m", "sdsecure.engine.packed_matmul", *map(_key, shapes)],
                              env=child_env(), capture_output=True, text=True, check=False)
    try:
        if proc.returncode != 0:
            raise ValueError(f"exit {proc.returncode}")
        verdicts = json.loads(proc.stdout.strip().splitlines()[-1])
        if not isinstance(verdicts, dict) or set(verdicts) != set(map(_key, shapes)):
            raise ValueError(f"unexpected output {proc.stdout[-200:]!r}")
    except (ValueError, IndexError) as e:
        tail = "\n".join((proc.stderr or "").strip().splitlines()[-5:])
        log.warning("packed matmul probe failed (%s), using plain matmuls:\n%s", e, tail)
        return None
    return {k: v is True for k, v in verdicts.items()}


def probe(shapes: list[tuple[int, int, int]], pack_fn=None) -> dict[str, bool]:
    """Multiply random [m, k] x [k, n] on MAX with the weight packed by `pack_fn` (default: pack) and
    compare with numpy: {"MxKxN": correct}. MAX's errors propagate: the child running this then fails,
    and _probe_in_child reports a probe that could not run (not remembered, unlike a wrong result)."""
    from max._mlir_context import ensure_default_mlir_context
    from max.driver import CPU, Buffer
    from max.dtype import DType
    from max.engine import InferenceSession
    from max.graph import DeviceRef, Graph, TensorType, Weight

    pack_fn = pack_fn or pack
    rng = np.random.default_rng(0)
    dev = DeviceRef.CPU()
    xs = [rng.standard_normal((m, k)).astype(np.float32) for m, k, _ in shapes]
    ws = [rng.standard_normal((k, n)).astype(np.float32) for _, k, n in shapes]
    with ensure_default_mlir_context():
        name = "sdsecure_packed_probe_" + "_".join(_key(s) for s in shapes)
        with Graph(name, input_types=[TensorType(DType.float32, list(x.shape), dev) for x in xs]) as g:
            outs = []
            for i, (x, w) in enumerate(zip(g.inputs, ws)):
                weight = g.add_weight(Weight(f"w{i}", DType.float32, list(w.shape), dev))
                outs.append(matmul(x.tensor, weight))
            g.output(*outs)
        session = InferenceSession(devices=[CPU()])
        registry = {f"w{i}": pack_fn(w, out=aligned_empty(w.shape)) for i, w in enumerate(ws)}
        results = session.load(g, weights_registry=registry).execute(*[Buffer.from_numpy(x) for x in xs])
        got = [r.to_numpy() for r in results]
    verdicts = {}
    for s, x, w, y in zip(shapes, xs, ws, got):
        ref = x.astype(np.float64) @ w.astype(np.float64)
        err = float(np.abs(y - ref).max() / max(np.abs(ref).max(), 1e-30))
        verdicts[_key(s)] = bool(err < 1e-4)
        log.debug("packed matmul probe %s: relative error %.1e", _key(s), err)
    return verdicts


def aligned_empty(shape: tuple[int, ...]) -> np.ndarray:
    """float32 array whose data starts on a 64-byte boundary (MAX loads packed panels aligned)."""
    count = int(np.prod(shape))
    raw = np.empty(count * 4 + 64, np.uint8)
    start = -raw.ctypes.data % 64
    return raw[start:start + count * 4].view(np.float32).reshape(shape)


def main(argv: list[str]) -> int:
    """`python -m sdsecure.engine.packed_matmul 154x768x768 ...`: print the probe's verdicts as JSON."""
    shapes = [tuple(int(d) for d in arg.split("x")) for arg in argv]
    print(json.dumps(probe([s for s in shapes if len(s) == 3])))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
