"""The MAX backend: specialise -> check -> build -> compile (cached) -> run.

Compiled models are cached in this process by (sha256 of the built graph text, device); the
graph text embeds every op, attribute, literal constant and shape, while weight *values* are bound at
load time, so two models that differ only in weights share one compile. Across processes MAX's own
cache (~/.cache/modular) recognises the same graph: building is deterministic (same ONNX, same shapes ->
byte-identical graph text), so a second process pays seconds, not minutes.

Large models (ISOLATE_MIN_WEIGHT_BYTES of weights and more: the SD 1.5 UNet) are compiled in child
processes instead, in pieces (engine.partition), each kept as a MEF file (engine.mef_cache): the
compiler's memory never adds to the weights', and no single compile sees the whole graph. Given the
`source` of its bytes, such a session also stores a build plan (engine.plan_cache), and the next
process with the same verified files binds the MEFs without building the graph at all.
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from typing import Iterator, Mapping, Sequence

import numpy as np
import onnx

from sdsecure.engine.fold import FoldedGraph, specialize
from sdsecure.engine.fuse import fuse
from sdsecure.engine import helper_threads, mef_cache, plan_cache
from sdsecure.engine.importer import build_graph, check_supported, output_infos
from sdsecure.engine.partition import split
from sdsecure.errors import UserError

log = logging.getLogger(__name__)
# What a person waiting should see (the CLI shows this log on stderr without -v): a compile still running
# after COMPILE_NOTICE_S is a cold one, which takes minutes; a cached one is done before and says nothing.
progress = logging.getLogger("sdsecure.progress")
COMPILE_NOTICE_S = 5.0

GRAPH_NAME = "sdsecure_onnx"
_LOCK = threading.RLock()         # re-entered by _compile through _compiled_mef
_COMPILED: dict[tuple, object] = {}      # (graph sha256, device) or ("mef", MEF key, device) -> compiled model
_SESSIONS: dict[str, object] = {}
_SESSIONS_LOCK = threading.Lock()

# Models with this many bytes of weights are compiled in child processes, in pieces of at most
# PIECE_NODES nodes: the full SD 1.5 UNet compiled whole peaks above 8 GiB and MAX keeps most of it
# until the process ends (see mef_cache). Small models compile whole, in process.
ISOLATE_MIN_WEIGHT_BYTES = 256 << 20
PIECE_NODES = 700          # the UNet (1,805 nodes once folded) in 3 pieces; SDSECURE_PIECE_NODES overrides


def piece_nodes() -> int:
    raw = os.environ.get("SDSECURE_PIECE_NODES")
    if raw is None:
        return PIECE_NODES
    try:
        value = int(raw)
    except ValueError:
        value = 0
    if value <= 0:
        raise UserError(f"SDSECURE_PIECE_NODES={raw!r}: expected a positive number of nodes per compiled piece")
    return value


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
        self.fill_wait_s = 0.0   # init waiting for engine.fuse's filters (computed while the graph is built)
        self.cache = ""          # "memory" (this process), "mef" (sdsecure's disk cache) or "compiled"
        self.planned = False     # bound from a stored build plan (engine.plan_cache): nothing was built
        self.child_peak_rss_mib = 0

    def note(self, how: str) -> None:
        """Record how one compiled unit was obtained (a split session lists each kind once)."""
        if how not in self.cache.split("+"):
            self.cache = f"{self.cache}+{how}" if self.cache else how


def prepare_graph(model: onnx.ModelProto, weights: Mapping[str, np.ndarray],
                  input_shapes: Mapping[str, Sequence[int]], *, name: str = "",
                  pack_matmuls: bool = False) -> FoldedGraph:
    """Specialise, fold and fuse; raise UnsupportedOpError before anything is built or compiled. The
    filters that fuse derives are still being computed when this returns (see FoldedGraph.wait_filled)."""
    folded = fuse(specialize(model, weights, input_shapes, name=name or model.graph.name or "model"),
                  pack_matmuls=pack_matmuls)
    check_supported(folded)
    return folded


class _Piece:
    """One compiled unit of a session: its MAX model and the values it reads and hands on."""

    def __init__(self, model, inputs: list[str], outputs: list[str], weights: dict[str, np.ndarray]):
        self.model, self.inputs, self.outputs = model, inputs, outputs
        self.weights = weights          # the arrays MAX reads: kept alive as long as the model


class MaxSession:
    def __init__(self, model: onnx.ModelProto, weights: Mapping[str, np.ndarray],
                 input_shapes: Mapping[str, Sequence[int]], *, name: str = "", device: str = "cpu",
                 prepared: FoldedGraph | None = None, isolate: bool | None = None, source: str | None = None,
                 pack_matmuls: bool = False):
        # MAX's MLIR context is thread-local and entered only on the thread that imported max.graph;
        # streamlit runs each script run on another thread, where building a graph then fails with
        # "No active MLIR context". MAX's own helper enters its default context when none is active.
        from max._mlir_context import ensure_default_mlir_context

        with ensure_default_mlir_context():
            self._load(model, weights, input_shapes, name, device, prepared, isolate, source, pack_matmuls)

    def _load(self, model: onnx.ModelProto, weights: Mapping[str, np.ndarray],
              input_shapes: Mapping[str, Sequence[int]], name: str, device: str,
              prepared: FoldedGraph | None, isolate: bool | None, source: str | None,
              pack_matmuls: bool = False) -> None:
        from max.graph import DeviceRef

        self.name = name or model.graph.name or "model"
        self.stats = CompileStats()
        t0 = time.perf_counter()
        folded = prepared if prepared is not None else prepare_graph(model, weights, input_shapes, name=self.name,
                                                                     pack_matmuls=pack_matmuls)
        self._folded: FoldedGraph = folded
        self.input_names = list(folded.inputs)
        self.output_names = list(folded.outputs)
        self._input_infos = [folded.infos[n] for n in folded.inputs]
        self._output_infos = output_infos(folded)
        if isolate is None:
            isolate = weight_bytes(folded) >= ISOLATE_MIN_WEIGHT_BYTES
        self.isolated = isolate
        pieces = split(folded, math.ceil(len(folded.nodes) / piece_nodes())) if isolate else [folded]
        self.stats.build_s = time.perf_counter() - t0
        session = _inference_session(device)
        key = plan_cache.plan_key(folded, source, len(pieces), device) if isolate and source else None
        planned = self._planned(session, pieces, key, device) if key else None
        # MAX initialises a model (binding weights, repacking conv filters) on one thread, without the
        # GIL: a piece initialises in the background, once its own new filters are filled (engine.fuse),
        # while the next piece is built and compiled, the heaviest first (it holds most of the UNet's
        # conv filters). A planned start builds nothing: pieces initialise in graph order, the order in
        # which their filters are filled.
        order = range(len(pieces)) if planned else sorted(range(len(pieces)), key=lambda k: -weight_bytes(pieces[k]))
        models: dict[int, tuple[dict[str, np.ndarray], Future]] = {}
        plans: list[plan_cache.PiecePlan | None] = [None] * len(pieces)
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="max-init") as initializer:
            for k in order:
                if planned:
                    compiled, piece_weights = planned[k]
                else:
                    label = self.name if len(pieces) == 1 else f"{self.name} piece {k + 1}/{len(pieces)}"
                    t1 = time.perf_counter()
                    # The graph name is part of the graph text (and so of MAX's cache key): keep it independent
                    # of the caller's label so that the same model at the same shapes always hits the same entry.
                    graph, piece_weights = build_graph(pieces[k], DeviceRef.CPU(), graph_name=GRAPH_NAME)
                    t2 = time.perf_counter()
                    self.stats.build_s += t2 - t1
                    compiled, mef_key = self._compile(session, graph, str(graph), device, label, isolate)
                    self.stats.compile_s += time.perf_counter() - t2
                    if key and mef_key:
                        plans[k] = plan_cache.piece_plan(mef_key, pieces[k], piece_weights)
                models[k] = (piece_weights, initializer.submit(self._init, session, compiled, piece_weights, pieces[k]))
            self._pieces: list[_Piece] = [_Piece(models[k][1].result(), list(piece.inputs), list(piece.outputs),
                                                 models[k][0]) for k, piece in enumerate(pieces)]
        if key and not planned and all(p is not None for p in plans):
            plan_cache.save(key, plans)
        self._last_reader = _last_readers(self._pieces, set(self.output_names) |
                                          {folded.resolve(o) for o in self.output_names})
        self._ran = False
        log.info("%s ready: build %.1f s%s, compile %.1f s (%s), init %.1f s", self.name, self.stats.build_s,
                 " (planned)" if planned else "", self.stats.compile_s, self.stats.cache, self.stats.init_s)

    def _planned(self, session, pieces: list[FoldedGraph], key: str, device: str):
        """Each piece's compiled model and weights from the stored build plan, or None (no plan, or one
        that does not fit: it is removed, and the caller builds)."""
        plans = plan_cache.load(key)
        if plans is None:
            return None
        try:
            if len(plans) != len(pieces):
                raise plan_cache.PlanMismatch(f"{len(plans)} pieces planned, {len(pieces)} wanted")
            out = []
            for plan, piece in zip(plans, pieces):
                weights = plan_cache.bind(plan, piece)
                t = time.perf_counter()
                compiled = self._compiled_mef(session, plan.mef_key, device)
                self.stats.compile_s += time.perf_counter() - t
                if compiled is None:
                    raise plan_cache.PlanMismatch(f"MEF {plan.mef_key[:12]} is no longer cached")
                out.append((compiled, weights))
        except plan_cache.PlanMismatch as e:
            log.warning("%s: stored build plan unusable (%s); building the graph", self.name, e)
            plan_cache.discard(key)
            return None
        self.stats.planned = True
        return out

    def _init(self, session, compiled, weights: dict[str, np.ndarray], piece: FoldedGraph):
        t = time.perf_counter()
        piece.wait_filled()                  # engine.fuse may still be computing this piece's new filters
        self.stats.fill_wait_s += time.perf_counter() - t
        t = time.perf_counter()
        model = session.init(compiled, weights_registry=weights)
        self.stats.init_s += time.perf_counter() - t
        return model

    def _compiled_mef(self, session, mef_key: str, device: str):
        """The compiled model of a cached MEF, from this process's memory or the disk cache; None if gone."""
        with _LOCK:
            compiled = _COMPILED.get(("mef", mef_key, device))
            if compiled is not None:
                self.stats.note("memory")
                return compiled
            compiled = _load_mef(session, mef_cache.cached_mef(mef_key))
            if compiled is not None:
                self.stats.note("mef")
                _COMPILED[("mef", mef_key, device)] = compiled
            return compiled

    def _compile(self, session, graph, text: str, device: str, label: str, isolate: bool):
        """The compiled form of one graph (`text` is str(graph)) and, isolated, its MEF key: from this
        process's memory or the MEF cache, else from a child-process compile; not isolated, from memory
        or from MAX in this process (MAX's own disk cache)."""
        if isolate:
            mef_key = mef_cache.mef_key(text, device)
            with _LOCK:
                compiled = self._compiled_mef(session, mef_key, device)
                if compiled is not None:
                    return compiled, mef_key
                log.info("compiling %s with MAX in a child process (cold: minutes)", label)
                with compile_notice(label):
                    path, child = mef_cache.compile_in_child(text, mef_key, label=label)
                self.stats.child_peak_rss_mib = max(self.stats.child_peak_rss_mib, child.get("peak_rss_mib", 0))
                compiled = _load_mef(session, path)
                if compiled is None:
                    raise mef_cache.CompileError(f"{label}: MAX cannot load the MEF it just wrote ({path})")
                self.stats.note("compiled")
                _COMPILED[("mef", mef_key, device)] = compiled
                return compiled, mef_key
        key = (hashlib.sha256(text.encode()).hexdigest(), device)
        with _LOCK:
            compiled = _COMPILED.get(key)
            if compiled is not None:
                self.stats.note("memory")
                return compiled, None
            log.info("compiling %s with MAX (a cold compile can take minutes; cached ones take seconds)", label)
            with compile_notice(label):
                compiled = session.compile(graph)
            self.stats.note("compiled")
            _COMPILED[key] = compiled
            return compiled, None

    @property
    def pieces(self) -> int:
        return len(self._pieces)

    def run(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        from max.driver import Buffer

        arrays = prepare_feeds(self.name, feeds, self.input_names,
                               {n: i.shape for n, i in zip(self.input_names, self._input_infos)},
                               {n: i.dtype for n, i in zip(self.input_names, self._input_infos)})
        values = {n: Buffer.from_numpy(a) for n, a in zip(self.input_names, arrays)}
        before = None if self._ran else helper_threads.native_threads()
        for k, piece in enumerate(self._pieces):
            outs = piece.model.execute(*[values[n] for n in piece.inputs])
            values.update(zip(piece.outputs, outs))
            for n in self._last_reader.get(k, ()):   # intermediate values nobody reads any more
                values.pop(n, None)
        if before is not None:         # MAX starts its helper thread on a first execute
            self._ran = True
            helper_threads.demote_new_helpers(before)
        result = {}
        for name in self.output_names:
            src = name if name in values else self._folded.resolve(name)
            result[name] = values[src].to_numpy() if src in values else np.array(self._folded.consts[src])
        return result


@contextmanager
def compile_notice(label: str) -> Iterator[None]:
    """Tell the progress log that `label` is compiling if it still is after COMPILE_NOTICE_S, and then how
    long it took (nothing for a compile that finishes sooner: a cache hit)."""
    t0 = time.perf_counter()
    told = threading.Event()

    def tell() -> None:
        told.set()
        progress.info("compiling %s with MAX: a cold compile takes minutes on a few cores; later runs reuse it",
                      label)

    timer = threading.Timer(COMPILE_NOTICE_S, tell)
    timer.daemon = True
    timer.start()
    try:
        yield
    finally:
        timer.cancel()
        timer.join()                     # a notice being written now is whole before the time is
        if told.is_set():
            progress.info("%s compiled in %.0f s", label, time.perf_counter() - t0)


def _last_readers(pieces: list[_Piece], keep: set[str]) -> dict[int, list[str]]:
    """For piece k, the values it is the last to read (freed after it runs), except those in `keep`."""
    last: dict[str, int] = {}
    for k, piece in enumerate(pieces):
        for n in piece.inputs:
            last[n] = k
    out: dict[int, list[str]] = {}
    for n, k in last.items():
        if n not in keep:
            out.setdefault(k, []).append(n)
    return out


def _load_mef(session, path):
    """MAX's handle on a cached MEF; None (and the file removed) when MAX cannot read it."""
    if path is None:
        return None
    try:
        return session.compile(str(path))
    except Exception as e:  # a truncated or stale artifact: compile again rather than fail
        log.warning("cached MEF %s unusable (%s); compiling again", path, e)
        try:
            path.unlink()
        except OSError:
            pass
        return None


def weight_bytes(folded: FoldedGraph) -> int:
    return sum(int(folded.consts[n].nbytes) for n in folded.initializers if n in folded.consts)


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
