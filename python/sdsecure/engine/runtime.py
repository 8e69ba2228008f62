"""The MAX backend: specialise -> check -> build -> compile (cached) -> run.

Compiled models are cached in this process by (sha256 of the built graph, input shapes, device); the
graph text embeds every op, attribute, literal constant and shape, while weight *values* are bound at
load time, so two models that differ only in weights share one compile. Across processes MAX's own
cache (~/.cache/modular) recognises the same graph: building is deterministic (same ONNX, same shapes ->
byte-identical graph text), so a second process pays seconds, not minutes.
"""

from __future__ import annotations

import hashlib
import logging
import threading
import time
from typing import Mapping, Sequence

import numpy as np
import onnx

from sdsecure.engine.fold import FoldedGraph, specialize
from sdsecure.engine.fuse import fuse
from sdsecure.engine.importer import build_graph, check_supported, output_infos
from sdsecure.errors import UserError

log = logging.getLogger(__name__)

GRAPH_NAME = "sdsecure_onnx"
_LOCK = threading.Lock()
_COMPILED: dict[tuple[str, tuple, str], object] = {}
_SESSIONS: dict[str, object] = {}
_SESSIONS_LOCK = threading.Lock()


def _inference_session(device: str):
    from max import engine
    from max.driver import CPU

    if device != "cpu":
        raise UserError(f"device {device!r} is not supported (cpu only)")
    with _SESSIONS_LOCK:                 # sessions may be created from several threads (the GUI)
        if device not in _SESSIONS:
            _SESSIONS[device] = engine.InferenceSession(devices=[CPU()])
        return _SESSIONS[device]


def graph_sha256(graph) -> str:
    return hashlib.sha256(str(graph).encode()).hexdigest()


class CompileStats:
    """How the last compile went (for benchmarks and logs)."""

    def __init__(self) -> None:
        self.build_s = 0.0
        self.compile_s = 0.0
        self.init_s = 0.0
        self.cache = ""          # "memory" (this process) or "compiled" (MAX: cold or its disk cache)


def prepare_graph(model: onnx.ModelProto, weights: Mapping[str, np.ndarray],
                  input_shapes: Mapping[str, Sequence[int]], *, name: str = "") -> FoldedGraph:
    """Specialise, fold and fuse; raise UnsupportedOpError before anything is built or compiled."""
    folded = fuse(specialize(model, weights, input_shapes, name=name or model.graph.name or "model"))
    check_supported(folded)
    return folded


class MaxSession:
    def __init__(self, model: onnx.ModelProto, weights: Mapping[str, np.ndarray],
                 input_shapes: Mapping[str, Sequence[int]], *, name: str = "", device: str = "cpu",
                 prepared: FoldedGraph | None = None):
        # MAX's MLIR context is thread-local and entered only on the thread that imported max.graph;
        # streamlit runs each script run on another thread, where building a graph then fails with
        # "No active MLIR context". MAX's own helper enters its default context when none is active.
        from max._mlir_context import ensure_default_mlir_context

        with ensure_default_mlir_context():
            self._load(model, weights, input_shapes, name, device, prepared)

    def _load(self, model: onnx.ModelProto, weights: Mapping[str, np.ndarray],
              input_shapes: Mapping[str, Sequence[int]], name: str, device: str,
              prepared: FoldedGraph | None) -> None:
        from max.graph import DeviceRef

        self.name = name or model.graph.name or "model"
        self.stats = CompileStats()
        t0 = time.perf_counter()
        folded = prepared if prepared is not None else prepare_graph(model, weights, input_shapes, name=self.name)
        self._folded: FoldedGraph = folded
        self.input_names = list(folded.inputs)
        self.output_names = list(folded.outputs)
        self._input_infos = [folded.infos[n] for n in folded.inputs]
        self._output_infos = output_infos(folded)
        dev = DeviceRef.CPU()
        # The graph name is part of the graph text (and so of MAX's cache key): keep it independent of
        # the caller's label so that the same model at the same shapes always hits the same entry.
        graph, self._weights = build_graph(folded, dev, graph_name=GRAPH_NAME)
        shapes = tuple((n, tuple(folded.infos[n].shape)) for n in folded.inputs)
        self.cache_key = (graph_sha256(graph), shapes, device)
        self.stats.build_s = time.perf_counter() - t0

        session = _inference_session(device)
        with _LOCK:
            compiled = _COMPILED.get(self.cache_key)
            t1 = time.perf_counter()
            if compiled is None:
                log.info("compiling %s with MAX (a cold compile can take minutes; cached ones take seconds)",
                         self.name)
                compiled = session.compile(graph)
                _COMPILED[self.cache_key] = compiled
                self.stats.cache = "compiled"
            else:
                self.stats.cache = "memory"
            self.stats.compile_s = time.perf_counter() - t1
        t2 = time.perf_counter()
        self._model = session.init(compiled, weights_registry=self._weights)
        self.stats.init_s = time.perf_counter() - t2
        log.info("%s ready: build %.1f s, compile %.1f s (%s), init %.1f s", self.name, self.stats.build_s,
                 self.stats.compile_s, self.stats.cache, self.stats.init_s)

    def run(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        from max.driver import Buffer

        arrays = prepare_feeds(self.name, feeds, self.input_names,
                               {n: i.shape for n, i in zip(self.input_names, self._input_infos)},
                               {n: i.dtype for n, i in zip(self.input_names, self._input_infos)})
        outs = self._model.execute(*[Buffer.from_numpy(a) for a in arrays])
        return {name: out.to_numpy() for name, out in zip(self.output_names, outs)}


def prepare_feeds(model_name: str, feeds: Mapping[str, np.ndarray], names: Sequence[str],
                  shapes: Mapping[str, Sequence[int]], dtypes: Mapping[str, np.dtype]) -> list[np.ndarray]:
    """Feeds in input order, contiguous, in the declared dtype; a wrong name or shape is a UserError."""
    extra = sorted(set(feeds) - set(names))
    missing = [n for n in names if n not in feeds]
    if extra or missing:
        raise UserError(f"{model_name}: inputs {sorted(feeds)} do not match the model's {list(names)}")
    out = []
    for n in names:
        a = np.asarray(feeds[n])
        if tuple(a.shape) != tuple(shapes[n]):
            raise UserError(f"{model_name}: input {n!r} has shape {list(a.shape)}, the session was built for "
                            f"{list(shapes[n])}")
        want = np.dtype(dtypes[n])
        if a.dtype != want:
            if not np.can_cast(a.dtype, want, casting="same_kind"):
                raise UserError(f"{model_name}: input {n!r} is {a.dtype}, the model takes {want}")
            a = a.astype(want)
        out.append(contiguous(a))
    return out


def contiguous(a: np.ndarray) -> np.ndarray:
    """`a` in C order without a copy when it already is; unlike np.ascontiguousarray, keeps rank 0."""
    return a if a.flags.c_contiguous else np.array(a, order="C")


def clear_memory_cache() -> None:
    with _LOCK:
        _COMPILED.clear()
