"""Run ONNX's own backend node test cases (`onnx.backend.test.case.node`) through the MAX importer.

Each case is a small model, its inputs and the expected outputs. Compiling one MAX graph per case
would take hours on a small machine, so the cases are *batched*: every supported case becomes a
separate subgraph of one MAX graph (own inputs, own outputs) and the graph is compiled once. A batch
that fails to compile is split in halves until the culprit is isolated.

Inputs that an op needs as compile-time constants (Reshape's shape, Slice's starts, ...; `const_inputs`
in the registry) are turned into initializers, as they are after folding in a real model. A case
whose every input is then constant is evaluated by the folder, not by MAX: it is reported as "folded".

Used by tools/onnx_node_cases.py (the table) and tests/test_engine_node_cases.py (the assertions).
"""

from __future__ import annotations

import hashlib
import logging
import re
import time
import zlib
from dataclasses import dataclass, field
from typing import Iterable

import numpy as np
import onnx
from onnx import helper, numpy_helper

from sdsecure.engine.fold import FoldedGraph, SpecializeError, specialize
from sdsecure.engine.importer import Emitter, ImporterBug, find_problems, input_types
from sdsecure.engine.ops import resolve
from sdsecure.engine.runtime import contiguous
from sdsecure.errors import UserError

log = logging.getLogger(__name__)

PASS, FAIL, UNSUPPORTED, FOLDED, ERROR = "pass", "fail", "unsupported", "folded", "error"


@dataclass
class Case:
    name: str
    op: str                       # op type of a single-node case, else "expanded:<first op>"
    model: onnx.ModelProto
    inputs: list[np.ndarray]
    expected: list[np.ndarray]
    rtol: float
    atol: float
    status: str = ""
    reason: str = ""
    folded: FoldedGraph | None = field(default=None, repr=False)


def load_cases(pattern: str | None = None) -> list[Case]:
    """Every node test case (one per data set), optionally filtered by a regex on the name."""
    import warnings

    from onnx.backend.test.case.node import collect_testcases

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        raw = collect_testcases()
    out = []
    for tc in sorted(raw, key=lambda t: t.name):
        if pattern and not re.search(pattern, tc.name):
            continue
        nodes = tc.model.graph.node
        op = nodes[0].op_type if len(nodes) == 1 else f"expanded:{_expanded_op(tc.name)}"
        for i, (inputs, outputs) in enumerate(tc.data_sets or []):
            name = tc.name if len(tc.data_sets) == 1 else f"{tc.name}[{i}]"
            out.append(Case(name, op, tc.model, list(inputs), list(outputs), tc.rtol, tc.atol))
    return out


def _expanded_op(name: str) -> str:
    return re.sub(r"^test_", "", name).split("_expanded")[0]


def _array(value):
    """Test data comes as numpy arrays, numpy scalars or TensorProtos (exotic element types)."""
    if isinstance(value, np.generic):
        return np.asarray(value)
    if isinstance(value, onnx.TensorProto):
        try:
            return numpy_helper.to_array(value)
        except Exception:
            return value
    return value


def prepare(case: Case) -> None:
    """Specialise the case and decide whether MAX can run it (sets status/reason/folded)."""
    model = onnx.ModelProto()
    model.CopyFrom(case.model)
    graph = model.graph
    case.inputs = [_array(v) for v in case.inputs]
    case.expected = [_array(v) for v in case.expected]
    if any(not isinstance(v, np.ndarray) for v in case.inputs) or \
            any(not isinstance(v, np.ndarray) for v in case.expected):
        case.status, case.reason = UNSUPPORTED, "sequence/optional values"
        return
    # Inputs the converters want as constants become initializers.
    const_inputs: set[str] = set()
    opsets = {(o.domain or ""): o.version for o in model.opset_import}
    for node in graph.node:
        opdef, _, _ = resolve(node, opsets)
        if opdef is not None:
            wanted = opdef.const_inputs + opdef.type_only
            const_inputs.update(node.input[i] for i in wanted if i < len(node.input) and node.input[i])
    shapes, weights = {}, {}
    keep_inputs = []
    for vi, value in zip(graph.input, case.inputs):
        if vi.name in const_inputs:
            graph.initializer.append(numpy_helper.from_array(value, vi.name))
            weights[vi.name] = value
        else:
            keep_inputs.append(vi)
            shapes[vi.name] = value.shape
    del graph.input[:]
    graph.input.extend(keep_inputs)
    try:
        folded = specialize(model, weights, shapes, name=case.name)
    except (UserError, SpecializeError) as e:
        case.status, case.reason = UNSUPPORTED, f"specialise: {e}"
        return
    case.folded = folded
    if not folded.nodes and all(folded.resolve(o) in folded.consts for o in folded.outputs):
        compare(case, [np.asarray(folded.consts[folded.resolve(o)]) for o in folded.outputs])
        if case.status == PASS:
            case.status, case.reason = FOLDED, "evaluated by the constant folder"
        return
    problems = find_problems(folded)
    if problems:
        case.status, case.reason = UNSUPPORTED, "; ".join(str(p) for p in problems)
        return
    for exp, out in zip(case.expected, folded.outputs):
        info = folded.infos[folded.resolve(out)]
        if tuple(exp.shape) != info.shape:
            case.status, case.reason = FAIL, f"shape inference gave {list(info.shape)}, expected {list(exp.shape)}"
            return


def _feeds(case: Case) -> list[np.ndarray]:
    model_inputs = [vi.name for vi in case.model.graph.input]
    values = dict(zip(model_inputs, case.inputs))
    return [contiguous(values[n]) for n in case.folded.inputs]


def compare(case: Case, outputs: list[np.ndarray]) -> None:
    for i, (got, exp) in enumerate(zip(outputs, case.expected)):
        if got.dtype != exp.dtype or got.shape != exp.shape:
            case.status, case.reason = FAIL, f"output {i}: got {got.dtype}{list(got.shape)}, " \
                                             f"expected {exp.dtype}{list(exp.shape)}"
            return
        try:
            if exp.dtype.kind in "fc":
                np.testing.assert_allclose(got, exp, rtol=case.rtol, atol=case.atol, equal_nan=True)
            else:
                np.testing.assert_array_equal(got, exp)
        except AssertionError as e:
            lines = [line.strip() for line in str(e).splitlines() if line.strip()]
            case.status, case.reason = FAIL, f"output {i}: " + " ".join(lines[1:4])
            return
    case.status, case.reason = PASS, ""


def _build(cases: list[Case], graph_name: str, traced: bool = False):
    """One MAX graph holding every case (own inputs, own outputs). With `traced`, each case is emitted
    through a trampoline whose file name is `<nodecase:NAME>`, so MAX's source tracebacks name the case
    that an op which fails to compile belongs to."""
    from max.graph import DeviceRef, Graph

    dev = DeviceRef.CPU()
    all_types, spans = [], []
    for c in cases:
        types = input_types(c.folded, dev)
        spans.append((len(all_types), len(types)))
        all_types.extend(types)
    weights: dict[str, np.ndarray] = {}
    built: list[tuple[Case, int, int]] = []   # case, first output, number of outputs
    n_out = 0
    with Graph(graph_name, input_types=all_types) as graph:
        outs = []
        for k, (c, (first, count)) in enumerate(zip(cases, spans)):
            emitter = Emitter(c.folded, dev, prefix=f"c{k}.")
            inputs = [graph.inputs[first + j].tensor for j in range(count)]
            try:
                if traced:
                    scope: dict = {}
                    exec(compile("def emit(f, x):\n    return f(x)\n", f"<nodecase:{c.name}>", "exec"), scope)
                    values = scope["emit"](emitter.emit, inputs)
                else:
                    values = emitter.emit(inputs)
            except Exception as e:  # a converter bug is this case's failure
                c.status, c.reason = ERROR, f"build: {str(e).splitlines()[0] if str(e) else type(e).__name__}"
                continue
            weights.update(emitter.weights)
            built.append((c, n_out, len(values)))
            outs.extend(values)
            n_out += len(values)
        graph.output(*outs)
    return graph, weights, built


def _culprits(cases: list[Case], graph_name: str) -> list[Case]:
    """Recompile with source tracebacks to find which cases hold the ops that fail to compile."""
    from max.graph import Graph

    from sdsecure.engine.runtime import _inference_session

    old = Graph.debug.source_tracebacks
    Graph.debug.source_tracebacks = True
    try:
        graph, _, built = _build(cases, graph_name + "_traced", traced=True)
        try:
            _inference_session("cpu").compile(graph)
            return []
        except Exception as e:
            text = str(e) + " " + str(e.__cause__ or "")
    finally:
        Graph.debug.source_tracebacks = old
    names = set(re.findall(r"<nodecase:([^>]+)>", text))
    found = [c for c, _, _ in built if c.name in names]
    errors = re.findall(r"error: [^\n]{0,300}", text)
    for c in found:
        c.status, c.reason = ERROR, "compile: " + (errors[0] if errors else _first_line(RuntimeError(text)))
    return found


def run_batch(cases: list[Case], graph_name: str = "onnx_node_cases") -> None:
    """Build the prepared cases into one MAX graph, compile once, run, compare. When the batch fails to
    compile, the failing cases are identified (source tracebacks, else bisection) and the rest rerun."""
    from max.driver import Buffer

    from sdsecure.engine.runtime import _inference_session

    cases = [c for c in cases if c.folded is not None and not c.status]
    if not cases:
        return
    graph, weights, built = _build(cases, graph_name)
    if not built:
        return
    session = _inference_session("cpu")
    t0 = time.perf_counter()
    try:
        compiled = session.compile(graph)
    except Exception as e:
        live = [c for c, _, _ in built]
        if len(live) == 1:
            live[0].status, live[0].reason = ERROR, f"compile: {_first_line(e)}"
            return
        log.warning("batch of %d cases failed to compile; looking for the cause", len(live))
        bad = _culprits(live, graph_name)
        if bad:
            log.warning("failing to compile: %s", ", ".join(c.name for c in bad))
            run_batch([c for c in live if c not in bad], graph_name + "_r")
            return
        half = len(live) // 2
        run_batch(live[:half], graph_name + "_a")
        run_batch(live[half:], graph_name + "_b")
        return
    log.info("compiled %d cases in %.1f s", len(built), time.perf_counter() - t0)
    model = session.init(compiled, weights_registry=weights)
    feeds = [Buffer.from_numpy(a) for c in cases for a in _feeds(c)]   # failed builds keep their inputs
    try:
        results = model.execute(*feeds)
    except Exception as e:
        for c, _, _ in built:
            c.status, c.reason = ERROR, f"execute: {_first_line(e)}"
        return
    for c, first, count in built:
        compare(c, [r.to_numpy() for r in results[first:first + count]])


def _first_line(e: Exception) -> str:
    msg = str(e) or type(e).__name__
    cause = e.__cause__
    if cause is not None and str(cause):
        msg += " / " + str(cause)
    return " ".join(msg.split())[:600]


def batches(cases: list[Case], buckets: int = 8) -> list[list[Case]]:
    """Cases split into `buckets` batches by a hash of their op: an op's cases stay together, and adding
    or changing one op recompiles only its batch (the others stay in MAX's cache)."""
    out: list[list[Case]] = [[] for _ in range(buckets)]
    for c in cases:
        out[zlib.crc32(c.op.encode()) % buckets].append(c)
    return [b for b in out if b]


def run_cases(cases: Iterable[Case], buckets: int = 8) -> list[Case]:
    """Prepare every case, then compile and run the runnable ones in batches (deterministic, so a
    second run finds every batch in MAX's cache)."""
    cases = list(cases)
    for c in cases:
        prepare(c)
    runnable = [c for c in cases if c.folded is not None and not c.status]
    single = [c for c in runnable if not c.op.startswith("expanded:")]
    expanded = [c for c in runnable if c.op.startswith("expanded:")]
    for i, batch in enumerate(batches(single, buckets) + batches(expanded, 2)):
        log.info("batch %d: %d cases (%s .. %s)", i, len(batch), batch[0].op, batch[-1].op)
        run_batch(batch, f"onnx_node_cases_{fingerprint(batch)}")
    return cases


def fingerprint(cases: Iterable[Case]) -> str:
    h = hashlib.sha256()
    for c in cases:
        h.update(c.name.encode())
    return h.hexdigest()[:12]


def table(cases: list[Case]) -> list[tuple[str, dict[str, int]]]:
    rows: dict[str, dict[str, int]] = {}
    for c in cases:
        rows.setdefault(c.op, {}).setdefault(c.status, 0)
        rows[c.op][c.status] += 1
    return sorted(rows.items())
