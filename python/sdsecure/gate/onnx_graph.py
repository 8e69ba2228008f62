"""Read-only helpers over an ONNX ModelProto, shared by the ONNX rule families.

- `walk_nodes` / `walk_tensors` / `walk_strings`: every node, tensor and string of a model, in the
  main graph, in If/Loop/Scan bodies (any graph-valued attribute) and in local functions, each with
  a location a person can find in Netron: "main/If_3.then_branch/Where_7 (Where)".
- `structural_copy`: a copy of the model without big tensor payloads (onnx's checker and shape
  inference run on it: no external file is ever touched, no GB-sized proto is serialised).
- `flatten`: one dataflow graph over the main graph, its subgraphs and inlined local functions, with
  scope-resolved tensor ids (used by the backdoor analysis and the constant folder).
- `ConstFolder`: numpy evaluation of small constant subexpressions (Shape->Gather->Concat chains,
  split constants), with an element cap so that nothing big is ever materialised.

Nothing here reads external data.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import numpy as np
import onnx
from onnx import AttributeProto, GraphProto, ModelProto, NodeProto, TensorProto

MAIN = "main"

# numpy dtype and byte size per ONNX element type (None: no fixed-size numpy equivalent)
NP_DTYPE: dict[int, Any] = {
    TensorProto.FLOAT: np.float32, TensorProto.UINT8: np.uint8, TensorProto.INT8: np.int8,
    TensorProto.UINT16: np.uint16, TensorProto.INT16: np.int16, TensorProto.INT32: np.int32,
    TensorProto.INT64: np.int64, TensorProto.BOOL: np.bool_, TensorProto.FLOAT16: np.float16,
    TensorProto.DOUBLE: np.float64, TensorProto.UINT32: np.uint32, TensorProto.UINT64: np.uint64,
    TensorProto.COMPLEX64: np.complex64, TensorProto.COMPLEX128: np.complex128,
}


def elem_bits(data_type: int) -> int | None:
    """Bits per element of an ONNX tensor element type (None for STRING / unknown)."""
    if data_type in NP_DTYPE:
        return np.dtype(NP_DTYPE[data_type]).itemsize * 8
    name = TensorProto.DataType.Name(data_type) if data_type in TensorProto.DataType.values() else ""
    if name in ("BFLOAT16",):
        return 16
    if name.startswith("FLOAT8"):
        return 8
    if name in ("INT4", "UINT4", "FLOAT4E2M1"):
        return 4
    if name in ("INT2", "UINT2"):
        return 2
    return None


def type_name(data_type: int) -> str:
    try:
        return TensorProto.DataType.Name(data_type).lower()
    except ValueError:
        return f"type{data_type}"


def num_elements(dims: Any) -> int:
    n = 1
    for d in dims:
        n *= int(d)
    return n


def node_name(node: NodeProto, index: int) -> str:
    return node.name or f"#{index}"


def node_where(graph_path: str, node: NodeProto, index: int) -> str:
    return f"{graph_path}/{node_name(node, index)} ({node.op_type})"


# ----------------------------------------------------------------------------------------------
# walking
# ----------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class NodeLoc:
    graph_path: str          # "main", "main/If_3.then_branch", "function:pkg.custom:MyFn"
    index: int               # position in its graph
    node: NodeProto
    in_function: bool = False

    @property
    def name(self) -> str:
        return node_name(self.node, self.index)

    @property
    def where(self) -> str:
        return node_where(self.graph_path, self.node, self.index)


def function_path(fn: onnx.FunctionProto) -> str:
    return f"function:{fn.domain}:{fn.name}"


def _subgraphs(node: NodeProto) -> Iterator[tuple[str, GraphProto]]:
    for attr in node.attribute:
        if attr.type == AttributeProto.GRAPH:
            yield attr.name, attr.g
        elif attr.type == AttributeProto.GRAPHS:
            for i, g in enumerate(attr.graphs):
                yield f"{attr.name}[{i}]", g


def _walk_graph_nodes(graph: GraphProto, path: str, in_fn: bool) -> Iterator[NodeLoc]:
    for i, node in enumerate(graph.node):
        yield NodeLoc(path, i, node, in_fn)
        for aname, sub in _subgraphs(node):
            yield from _walk_graph_nodes(sub, f"{path}/{node_name(node, i)}.{aname}", in_fn)


def walk_nodes(model: ModelProto) -> Iterator[NodeLoc]:
    """Every node of the model: main graph, nested graphs (any depth) and local function bodies."""
    yield from _walk_graph_nodes(model.graph, MAIN, False)
    for fn in model.functions:
        path = function_path(fn)
        for i, node in enumerate(fn.node):
            yield NodeLoc(path, i, node, True)
            for aname, sub in _subgraphs(node):
                yield from _walk_graph_nodes(sub, f"{path}/{node_name(node, i)}.{aname}", True)


def walk_graphs(model: ModelProto) -> Iterator[tuple[str, GraphProto]]:
    """(path, graph) for the main graph and every nested graph (also those inside functions)."""
    yield MAIN, model.graph
    for loc in walk_nodes(model):
        for aname, sub in _subgraphs(loc.node):
            yield f"{loc.graph_path}/{loc.name}.{aname}", sub


@dataclass(frozen=True)
class TensorLoc:
    where: str               # human location, e.g. "main/initializer 'w'", "main/Const_3 (Constant).value"
    tensor: TensorProto
    graph_path: str


def _attr_tensors(loc: NodeLoc) -> Iterator[TensorLoc]:
    base = loc.where
    for attr in loc.node.attribute:
        if attr.type == AttributeProto.TENSOR:
            yield TensorLoc(f"{base}.{attr.name}", attr.t, loc.graph_path)
        elif attr.type == AttributeProto.TENSORS:
            for i, t in enumerate(attr.tensors):
                yield TensorLoc(f"{base}.{attr.name}[{i}]", t, loc.graph_path)
        elif attr.type == AttributeProto.SPARSE_TENSOR:
            yield TensorLoc(f"{base}.{attr.name}.values", attr.sparse_tensor.values, loc.graph_path)
            yield TensorLoc(f"{base}.{attr.name}.indices", attr.sparse_tensor.indices, loc.graph_path)
        elif attr.type == AttributeProto.SPARSE_TENSORS:
            for i, st in enumerate(attr.sparse_tensors):
                yield TensorLoc(f"{base}.{attr.name}[{i}].values", st.values, loc.graph_path)
                yield TensorLoc(f"{base}.{attr.name}[{i}].indices", st.indices, loc.graph_path)


def walk_tensors(model: ModelProto) -> Iterator[TensorLoc]:
    """Every TensorProto: initializers and sparse initializers of every graph, tensor-valued node
    attributes (Constant values, ...) everywhere, function attribute defaults."""
    for path, graph in walk_graphs(model):
        for t in graph.initializer:
            yield TensorLoc(f"{path}/initializer '{t.name}'", t, path)
        for st in graph.sparse_initializer:
            yield TensorLoc(f"{path}/sparse_initializer '{st.values.name}'.values", st.values, path)
            yield TensorLoc(f"{path}/sparse_initializer '{st.values.name}'.indices", st.indices, path)
    for loc in walk_nodes(model):
        yield from _attr_tensors(loc)
    for fn in model.functions:
        for attr in fn.attribute_proto:
            if attr.type == AttributeProto.TENSOR:
                yield TensorLoc(f"{function_path(fn)}.attribute {attr.name}", attr.t, function_path(fn))


def walk_sparse(model: ModelProto) -> Iterator[tuple[str, onnx.SparseTensorProto]]:
    """Every SparseTensorProto (initializers and attributes), with its location."""
    for path, graph in walk_graphs(model):
        for st in graph.sparse_initializer:
            yield f"{path}/sparse_initializer '{st.values.name}'", st
    for loc in walk_nodes(model):
        for attr in loc.node.attribute:
            if attr.type == AttributeProto.SPARSE_TENSOR:
                yield f"{loc.where}.{attr.name}", attr.sparse_tensor
            elif attr.type == AttributeProto.SPARSE_TENSORS:
                for i, st in enumerate(attr.sparse_tensors):
                    yield f"{loc.where}.{attr.name}[{i}]", st


@dataclass(frozen=True)
class StringLoc:
    where: str               # location of the string
    kind: str                # "doc_string", "metadata", "attribute", "string tensor", ...
    text: str


def _decode(b: bytes) -> str:
    return b.decode("utf-8", errors="replace")


def walk_strings(model: ModelProto, max_tensor_strings: int = 100_000) -> Iterator[StringLoc]:
    """Every free-text string an attacker can put in a model: doc strings (model, graphs, nodes,
    functions, value infos, tensors), metadata_props (model, graphs, nodes, functions), string
    attributes and string tensors."""
    if model.doc_string:
        yield StringLoc("model.doc_string", "doc_string", model.doc_string)
    for p in model.metadata_props:
        yield StringLoc(f"model.metadata_props[{p.key!r}]", "metadata", f"{p.key}\n{p.value}" if p.key else p.value)
    for fld in ("producer_name", "producer_version", "domain"):
        v = getattr(model, fld)
        if v:
            yield StringLoc(f"model.{fld}", "model field", v)
    for path, graph in walk_graphs(model):
        if graph.doc_string:
            yield StringLoc(f"{path}.doc_string", "doc_string", graph.doc_string)
        for p in graph.metadata_props:
            yield StringLoc(f"{path}.metadata_props[{p.key!r}]", "metadata", p.value)
        for vi in list(graph.input) + list(graph.output) + list(graph.value_info):
            if vi.doc_string:
                yield StringLoc(f"{path}/value '{vi.name}'.doc_string", "doc_string", vi.doc_string)
    for fn in model.functions:
        fp = function_path(fn)
        if fn.doc_string:
            yield StringLoc(f"{fp}.doc_string", "doc_string", fn.doc_string)
        for p in fn.metadata_props:
            yield StringLoc(f"{fp}.metadata_props[{p.key!r}]", "metadata", p.value)
    for loc in walk_nodes(model):
        node = loc.node
        if node.doc_string:
            yield StringLoc(f"{loc.where}.doc_string", "doc_string", node.doc_string)
        for p in node.metadata_props:
            yield StringLoc(f"{loc.where}.metadata_props[{p.key!r}]", "metadata", p.value)
        for attr in node.attribute:
            if attr.type == AttributeProto.STRING:
                yield StringLoc(f"{loc.where}.{attr.name}", "attribute", _decode(attr.s))
            elif attr.type == AttributeProto.STRINGS:
                for i, s in enumerate(attr.strings):
                    yield StringLoc(f"{loc.where}.{attr.name}[{i}]", "attribute", _decode(s))
    count = 0
    for tl in walk_tensors(model):
        t = tl.tensor
        if t.doc_string:
            yield StringLoc(f"{tl.where}.doc_string", "doc_string", t.doc_string)
        if t.data_type == TensorProto.STRING:
            for i, s in enumerate(t.string_data):
                count += 1
                if count > max_tensor_strings:
                    return
                yield StringLoc(f"{tl.where}[{i}]", "string tensor", _decode(s))


# ----------------------------------------------------------------------------------------------
# structural copy (for onnx.checker and shape inference)
# ----------------------------------------------------------------------------------------------

def uses_external(t: TensorProto) -> bool:
    return t.data_location == TensorProto.EXTERNAL


def tensor_payload_bytes(t: TensorProto) -> int:
    """An estimate of the bytes a tensor carries inline (0 for external data)."""
    if uses_external(t):
        return 0
    if t.raw_data:
        return len(t.raw_data)
    n = num_elements(t.dims)
    bits = elem_bits(t.data_type) or 64
    return n * bits // 8


def value_info_for(t: TensorProto) -> onnx.ValueInfoProto:
    return onnx.helper.make_tensor_value_info(t.name, t.data_type, list(t.dims))


def _copy_fields(src: Any, dst: Any, skip: tuple[str, ...]) -> None:
    for fd, value in src.ListFields():
        if fd.name in skip:
            continue
        if fd.label == fd.LABEL_REPEATED:
            getattr(dst, fd.name).extend(value)
        elif fd.type == fd.TYPE_MESSAGE:
            getattr(dst, fd.name).CopyFrom(value)
        else:
            setattr(dst, fd.name, value)


class StructuralCopyError(Exception):
    """The model has tensor payloads that cannot be left out of a structural copy."""


def structural_copy(model: ModelProto, keep_bytes: int = 1 << 16) -> ModelProto:
    """A copy of `model` whose main-graph initializers that are external or larger than
    `keep_bytes` are turned into typed graph inputs (same name, type and dims, no data).

    Everything else is copied as is. Raises StructuralCopyError when an external tensor lives
    where it cannot become a graph input (a subgraph, a Constant node, a function)."""
    out = ModelProto()
    _copy_fields(model, out, skip=("graph",))
    g, src = out.graph, model.graph
    _copy_fields(src, g, skip=("initializer", "input"))
    g.input.extend(src.input)
    declared = {vi.name for vi in src.input}
    for t in src.initializer:
        if uses_external(t) or tensor_payload_bytes(t) > keep_bytes:
            if t.name not in declared:
                g.input.append(value_info_for(t))
                declared.add(t.name)
        else:
            g.initializer.append(t)
    # external tensors anywhere else cannot be dropped without changing the model's meaning
    for path, graph in walk_graphs(out):
        if path == MAIN:
            continue
        if any(uses_external(t) for t in graph.initializer):
            raise StructuralCopyError(f"external initializer in subgraph {path}")
    for loc in walk_nodes(out):
        for tl in _attr_tensors(loc):
            if uses_external(tl.tensor):
                raise StructuralCopyError(f"external tensor in attribute {tl.where}")
    return out


# ----------------------------------------------------------------------------------------------
# flattened dataflow over graph + subgraphs + inlined local functions
# ----------------------------------------------------------------------------------------------

@dataclass
class FlatNode:
    index: int
    op: str                          # op type ("If", "Add", ...) or a pseudo op ("<enter>", "<return>")
    domain: str
    name: str                        # node name (or "#i")
    where: str                       # "main/If_3.then_branch/Where_7 (Where)"
    inputs: list[str | None]         # tensor ids (None for an omitted optional input)
    outputs: list[str]               # tensor ids
    proto: NodeProto | None          # None for pseudo nodes
    # deps[i]: the input positions output i depends on (None: every input)
    deps: list[tuple[int, ...]] | None = None
    control: tuple[int, ...] = ()    # input positions that select/steer (If cond, Loop M/cond)

    @property
    def label(self) -> str:
        return self.where


@dataclass
class FlatGraph:
    nodes: list[FlatNode] = field(default_factory=list)
    producer: dict[str, int] = field(default_factory=dict)       # tensor id -> node index
    consumers: dict[str, list[int]] = field(default_factory=dict)
    inputs: list[str] = field(default_factory=list)               # main graph inputs (not initializers)
    outputs: list[str] = field(default_factory=list)              # main graph outputs
    initializers: dict[str, TensorProto] = field(default_factory=dict)  # id -> tensor (all graphs)
    display: dict[str, str] = field(default_factory=dict)         # id -> name as in the file

    def add(self, node: FlatNode) -> None:
        self.nodes.append(node)
        for t in node.outputs:
            self.producer[t] = node.index
        for t in node.inputs:
            if t is not None:
                self.consumers.setdefault(t, []).append(node.index)

    def name_of(self, tid: str) -> str:
        return self.display.get(tid, tid)


class _Scope:
    def __init__(self, parent: "_Scope | None", prefix: str) -> None:
        self.parent, self.prefix, self.names = parent, prefix, {}

    def define(self, name: str) -> str:
        tid = name if not self.prefix else f"{self.prefix}::{name}"
        self.names[name] = tid
        return tid

    def alias(self, name: str, tid: str) -> None:
        self.names[name] = tid

    def resolve(self, name: str) -> str:
        s: _Scope | None = self
        while s is not None:
            if name in s.names:
                return s.names[name]
            s = s.parent
        # undefined name (malformed model): give it an id of its own so analysis still runs
        return self.define(name)


MAX_INLINE_DEPTH = 8


def flatten(model: ModelProto) -> FlatGraph:
    """Flatten the model into one dataflow graph in a valid evaluation order: subgraph bodies are
    emitted before the node that owns them; local functions are inlined at each call."""
    fg = FlatGraph()
    functions = {(f.domain, f.name): f for f in model.functions}
    root = _Scope(None, "")

    def emit(op: str, domain: str, name: str, where: str, inputs: list[str | None], outputs: list[str],
             proto: NodeProto | None, deps=None, control: tuple[int, ...] = ()) -> None:
        fg.add(FlatNode(len(fg.nodes), op, domain, name, where, inputs, outputs, proto, deps, control))

    def graph_body(graph: GraphProto, scope: _Scope, path: str, depth: int) -> None:
        for t in graph.initializer:
            tid = scope.define(t.name)
            fg.initializers[tid] = t
            fg.display[tid] = t.name
        for st in graph.sparse_initializer:
            tid = scope.define(st.values.name)
            fg.display[tid] = st.values.name
            emit("<sparse>", "", st.values.name, f"{path}/sparse_initializer '{st.values.name}'", [], [tid], None)
        for i, node in enumerate(graph.node):
            one_node(node, i, scope, path, depth)

    def one_node(node: NodeProto, i: int, scope: _Scope, path: str, depth: int) -> None:
        name = node_name(node, i)
        where = node_where(path, node, i)
        ins = [scope.resolve(x) if x else None for x in node.input]
        fn = functions.get((node.domain, node.op_type))
        if fn is not None and depth < MAX_INLINE_DEPTH:
            inline_function(fn, node, name, where, ins, scope, path, depth)
            return
        subs = list(_subgraphs(node))
        if node.op_type == "If" and subs:
            branch_outs: dict[str, list[str]] = {}
            for aname, sub in subs:
                sscope = _Scope(scope, f"{path}/{name}.{aname}")
                graph_body(sub, sscope, f"{path}/{name}.{aname}", depth)
                branch_outs[aname] = [sscope.resolve(o.name) for o in sub.output]
            then_o = branch_outs.get("then_branch", [])
            else_o = branch_outs.get("else_branch", [])
            outs = [scope.define(o) for o in node.output]
            for o, n in zip(outs, node.output):
                fg.display[o] = n
            all_in = ins[:1] + then_o + else_o
            deps = []
            for k in range(len(outs)):
                d = [0]
                if k < len(then_o):
                    d.append(1 + k)
                if k < len(else_o):
                    d.append(1 + len(then_o) + k)
                deps.append(tuple(d))
            emit("If", node.domain, name, where, all_in, outs, node, deps, control=(0,))
            return
        if node.op_type in ("Loop", "Scan") and subs:
            _aname, body = subs[0]
            bpath = f"{path}/{name}.body"
            bscope = _Scope(scope, bpath)
            body_in = [bscope.define(x.name) for x in body.input]
            for b, x in zip(body_in, body.input):
                fg.display[b] = x.name
            # the enter node maps the loop's inputs (and, via the fixpoint, the carried outputs)
            # onto the body's formal inputs
            enter_idx = len(fg.nodes)
            emit("<enter>", "", name, where + " [body inputs]", list(ins), body_in, None, None)
            graph_body(body, bscope, bpath, depth)
            body_out = [bscope.resolve(o.name) for o in body.output]
            outs = [scope.define(o) for o in node.output]
            for o, n in zip(outs, node.output):
                fg.display[o] = n
            if node.op_type == "Loop":
                # body: (iter, cond, carried...) -> (cond, carried..., scan outs...)
                n_carried = max(len(ins) - 2, 0)
                enter = fg.nodes[enter_idx]
                enter.deps = [()] + [(0, 1)] + [(0, 1, 2 + k) for k in range(n_carried)]
                # feedback: carried body outputs flow back into the carried body inputs
                for k in range(n_carried):
                    if 1 + k < len(body_out):
                        enter.inputs.append(body_out[1 + k])
                        enter.deps[2 + k] = enter.deps[2 + k] + (len(enter.inputs) - 1,)
                        fg.consumers.setdefault(body_out[1 + k], []).append(enter_idx)
                all_in = list(ins) + body_out
                deps = [(0, 1, len(ins) + 1 + k) for k in range(len(outs))]
                emit("Loop", node.domain, name, where, all_in, outs, node, deps, control=(0, 1))
            else:
                all_in = list(ins) + body_out
                n_state = len(body_out) - max(len(outs) - 0, 0)
                deps = [tuple(range(len(ins))) + (len(ins) + k,) for k in range(len(outs))]
                emit("Scan", node.domain, name, where, all_in, outs, node, deps)
            return
        # ordinary node (graph attributes of unknown ops are analysed as separate bodies)
        for aname, sub in subs:
            sscope = _Scope(scope, f"{path}/{name}.{aname}")
            graph_body(sub, sscope, f"{path}/{name}.{aname}", depth)
            extra = [sscope.resolve(o.name) for o in sub.output]
            ins = ins + extra
        outs = [scope.define(o) if o else f"{path}/{name}::<unused{k}>" for k, o in enumerate(node.output)]
        for o, n in zip(outs, node.output):
            fg.display[o] = n
        emit(node.op_type, node.domain, name, where, ins, outs, node)

    def inline_function(fn: onnx.FunctionProto, node: NodeProto, name: str, where: str,
                        ins: list[str | None], scope: _Scope, path: str, depth: int) -> None:
        fpath = f"{path}/{name}.{fn.domain}:{fn.name}"
        fscope = _Scope(None, fpath)   # functions see only their formal inputs
        for formal, actual in zip(fn.input, ins):
            if actual is not None:
                fscope.alias(formal, actual)
        for i, inner in enumerate(fn.node):
            one_node(inner, i, fscope, fpath, depth + 1)
        outs = [scope.define(o) for o in node.output]
        for o, n in zip(outs, node.output):
            fg.display[o] = n
        for formal, actual in zip(fn.output, outs):
            emit("<return>", "", name, where + f" [returns {formal}]", [fscope.resolve(formal)], [actual], None)

    for vi in model.graph.input:
        tid = root.define(vi.name)
        fg.display[tid] = vi.name
    init_names = {t.name for t in model.graph.initializer}
    fg.inputs = [vi.name for vi in model.graph.input if vi.name not in init_names]
    graph_body(model.graph, root, MAIN, 0)
    fg.outputs = [root.resolve(o.name) for o in model.graph.output]
    return fg


# ----------------------------------------------------------------------------------------------
# constant folding of small subexpressions
# ----------------------------------------------------------------------------------------------

MAX_FOLD_ELEMENTS = 1 << 16


def small_tensor_value(t: TensorProto, max_elements: int = MAX_FOLD_ELEMENTS) -> np.ndarray | None:
    """The value of an inline tensor with at most `max_elements` elements (never external data)."""
    if uses_external(t) or t.data_type not in NP_DTYPE or t.data_type == TensorProto.STRING:
        return None
    if num_elements(t.dims) > max_elements:
        return None
    try:
        return onnx.numpy_helper.to_array(t)
    except Exception:  # noqa: BLE001 - malformed tensors are other rules' business
        return None


def attr_value(node: NodeProto, name: str, default: Any = None) -> Any:
    for a in node.attribute:
        if a.name == name:
            if a.ref_attr_name:
                return default
            return onnx.helper.get_attribute_value(a)
    return default


def constant_node_value(node: NodeProto) -> np.ndarray | None:
    for a in node.attribute:
        if a.name == "value" and a.type == AttributeProto.TENSOR:
            return small_tensor_value(a.t)
        if a.name == "value_float":
            return np.array(a.f, np.float32)
        if a.name == "value_floats":
            return np.array(list(a.floats), np.float32)
        if a.name == "value_int":
            return np.array(a.i, np.int64)
        if a.name == "value_ints":
            return np.array(list(a.ints), np.int64)
    return None


def _axes(node: NodeProto, vals: list, pos: int) -> list[int] | None:
    ax = attr_value(node, "axes")
    if ax is None and len(vals) > pos and vals[pos] is not None:
        ax = [int(a) for a in np.asarray(vals[pos]).ravel()]
    return None if ax is None else list(ax)


_BINARY: dict[str, Callable[[Any, Any], Any]] = {
    "Add": np.add, "Sub": np.subtract, "Mul": np.multiply, "Equal": np.equal, "Less": np.less,
    "Greater": np.greater, "LessOrEqual": np.less_equal, "GreaterOrEqual": np.greater_equal,
    "And": np.logical_and, "Or": np.logical_or, "Xor": np.logical_xor, "Pow": np.power,
}
_UNARY: dict[str, Callable[[Any], Any]] = {
    "Neg": np.negative, "Abs": np.abs, "Not": np.logical_not, "Floor": np.floor, "Ceil": np.ceil,
    "Sqrt": np.sqrt, "Identity": lambda x: x, "Round": np.round, "Sign": np.sign, "Exp": np.exp,
    "Reciprocal": np.reciprocal,
}


_NO_FOLD = {"Shape", "Size", "If", "Loop", "Scan", "Constant", "<enter>", "<sparse>"}


class ConstFolder:
    """Evaluate small constant tensors of a FlatGraph with numpy.

    `static_shape(tid)` (optional) gives a tensor's fully known shape, so that Shape/Size of
    activations fold too (bomb sizing at the pipeline's input shapes)."""

    def __init__(self, fg: FlatGraph, static_shape: Callable[[str], tuple[int, ...] | None] | None = None,
                 max_elements: int = MAX_FOLD_ELEMENTS) -> None:
        self.fg, self.static_shape, self.max = fg, static_shape, max_elements
        self.memo: dict[str, np.ndarray | None] = {}

    def value(self, tid: str | None) -> np.ndarray | None:
        """The value of tensor `tid`, or None when it is not a small constant."""
        if tid is None:
            return None
        if tid in self.memo:
            return self.memo[tid]
        stack: list[tuple[str, bool]] = [(tid, False)]
        visiting: set[str] = set()
        while stack:                     # iterative post-order: no recursion limit on long chains
            cur, expanded = stack.pop()
            if cur in self.memo:
                continue
            if expanded:
                self.memo[cur] = self._eval(cur)
                continue
            if cur in visiting:          # a cycle (loop feedback): unknown
                self.memo[cur] = None
                continue
            visiting.add(cur)
            stack.append((cur, True))
            stack.extend((x, False) for x in self._deps(cur) if x not in self.memo)
        return self.memo[tid]

    def _deps(self, tid: str) -> list[str]:
        if tid in self.fg.initializers:
            return []
        idx = self.fg.producer.get(tid)
        if idx is None:
            return []
        node = self.fg.nodes[idx]
        if node.op in _NO_FOLD or (node.proto is None and node.op != "<return>"):
            return []
        return [x for x in node.inputs if x is not None]

    def _eval(self, tid: str) -> np.ndarray | None:
        t = self.fg.initializers.get(tid)
        if t is not None:
            return small_tensor_value(t, self.max)
        idx = self.fg.producer.get(tid)
        if idx is None:
            return None
        node = self.fg.nodes[idx]
        try:
            out = self._eval_node(node, node.outputs.index(tid))
        except Exception:  # noqa: BLE001 - anything odd: unknown value
            return None
        if out is None:
            return None
        out = np.asarray(out)
        if out.size > self.max:
            return None
        return out

    def _eval_node(self, node: FlatNode, k: int) -> np.ndarray | None:
        op, p = node.op, node.proto
        if op == "<return>":
            return self.memo.get(node.inputs[0])
        if p is None:
            return None
        if op == "Constant":
            return constant_node_value(p)
        if op in ("Shape", "Size"):
            if self.static_shape is None:
                return None
            shp = self.static_shape(node.inputs[0]) if node.inputs else None
            if shp is None:
                return None
            if op == "Size":
                return np.array(num_elements(shp), np.int64)
            start, end = attr_value(p, "start", 0), attr_value(p, "end", None)
            return np.array(shp[start:end], np.int64)
        vals = [self.memo.get(x) if x is not None else None for x in node.inputs]
        need_all = [v for v, x in zip(vals, node.inputs) if x is not None]
        if op in _UNARY:
            return None if vals[0] is None else _UNARY[op](vals[0])
        if op in _BINARY:
            if vals[0] is None or vals[1] is None:
                return None
            return _BINARY[op](vals[0], vals[1])
        if op == "Div":
            if vals[0] is None or vals[1] is None:
                return None
            a, b = vals
            if np.issubdtype(a.dtype, np.integer):
                return np.where(b != 0, np.floor_divide(a, np.where(b == 0, 1, b)), 0).astype(a.dtype)
            return a / b
        if op in ("Max", "Min", "Sum"):
            if any(v is None for v in need_all):
                return None
            f = {"Max": np.maximum, "Min": np.minimum, "Sum": np.add}[op]
            acc = need_all[0]
            for v in need_all[1:]:
                acc = f(acc, v)
            return acc
        if op == "Cast":
            to = attr_value(p, "to")
            if vals[0] is None or to not in NP_DTYPE:
                return None
            return vals[0].astype(NP_DTYPE[to])
        if op == "Concat":
            if any(v is None for v in need_all):
                return None
            return np.concatenate([np.atleast_1d(v) if v.ndim == 0 else v for v in need_all], axis=attr_value(p, "axis", 0))
        if op == "Unsqueeze":
            ax = _axes(p, vals, 1)
            if vals[0] is None or ax is None:
                return None
            out = vals[0]
            rank = out.ndim + len(ax)
            for a in sorted(a % rank for a in ax):
                out = np.expand_dims(out, a)
            return out
        if op == "Squeeze":
            ax = _axes(p, vals, 1)
            if vals[0] is None:
                return None
            return np.squeeze(vals[0], axis=None if ax is None else tuple(ax))
        if op in ("Reshape",):
            if vals[0] is None or vals[1] is None:
                return None
            shape = [int(s) for s in vals[1]]
            shape = [vals[0].shape[i] if s == 0 and not attr_value(p, "allowzero", 0) else s for i, s in enumerate(shape)]
            return vals[0].reshape(shape)
        if op == "Flatten":
            if vals[0] is None:
                return None
            ax = attr_value(p, "axis", 1) % max(vals[0].ndim, 1)
            return vals[0].reshape(int(np.prod(vals[0].shape[:ax])), -1)
        if op == "Gather":
            if vals[0] is None or vals[1] is None:
                return None
            return np.take(vals[0], vals[1].astype(np.int64), axis=attr_value(p, "axis", 0))
        if op == "Slice":
            return self._slice(p, vals)
        if op == "Range":
            if any(v is None for v in vals[:3]):
                return None
            start, limit, delta = (np.asarray(v).item() for v in vals[:3])
            if delta == 0:
                return None
            n = max(int(math.ceil((limit - start) / delta)), 0)
            if n > self.max:
                return None
            return np.arange(start, limit, delta, dtype=vals[0].dtype)
        if op == "ConstantOfShape":
            if vals[0] is None:
                return None
            shape = [int(s) for s in np.asarray(vals[0]).ravel()]
            if any(s < 0 for s in shape) or num_elements(shape) > self.max:
                return None
            v = attr_value(p, "value")
            fill = onnx.numpy_helper.to_array(v).ravel()[0] if v is not None else np.float32(0)
            return np.full(shape, fill)
        if op == "Where":
            if any(v is None for v in vals[:3]):
                return None
            return np.where(vals[0], vals[1], vals[2])
        if op == "Expand":
            if vals[0] is None or vals[1] is None:
                return None
            shape = [int(s) for s in vals[1]]
            target = np.broadcast_shapes(vals[0].shape, tuple(shape))
            if num_elements(target) > self.max:
                return None
            return np.broadcast_to(vals[0], target).copy()
        if op in ("ReduceProd", "ReduceSum", "ReduceMax", "ReduceMin", "ReduceMean"):
            if vals[0] is None:
                return None
            ax = _axes(p, vals, 1)
            keep = bool(attr_value(p, "keepdims", 1))
            f = {"ReduceProd": np.prod, "ReduceSum": np.sum, "ReduceMax": np.max, "ReduceMin": np.min,
                 "ReduceMean": np.mean}[op]
            return f(vals[0], axis=None if not ax else tuple(ax), keepdims=keep)
        if op == "Transpose":
            if vals[0] is None:
                return None
            return np.transpose(vals[0], attr_value(p, "perm"))
        if op == "Mod":
            if vals[0] is None or vals[1] is None:
                return None
            return np.fmod(vals[0], vals[1]) if attr_value(p, "fmod", 0) else np.mod(vals[0], vals[1])
        return None

    @staticmethod
    def _slice(p: NodeProto, vals: list) -> np.ndarray | None:
        data = vals[0]
        if data is None:
            return None
        if attr_value(p, "starts") is not None:        # opset < 10
            starts, ends = attr_value(p, "starts"), attr_value(p, "ends")
            axes = attr_value(p, "axes", list(range(len(starts))))
            steps = [1] * len(starts)
        else:
            if len(vals) < 3 or vals[1] is None or vals[2] is None:
                return None
            starts, ends = list(vals[1].ravel()), list(vals[2].ravel())
            axes = list(vals[3].ravel()) if len(vals) > 3 and vals[3] is not None else list(range(len(starts)))
            steps = list(vals[4].ravel()) if len(vals) > 4 and vals[4] is not None else [1] * len(starts)
        idx = [slice(None)] * data.ndim
        for s, e, a, st in zip(starts, ends, axes, steps):
            idx[int(a)] = slice(int(s), int(e), int(st))
        return data[tuple(idx)]


def describe_value(v: np.ndarray | None, limit: int = 16) -> Any:
    """A JSON-friendly rendering of a small array: scalars as numbers, small arrays as lists,
    big ones summarised."""
    if v is None:
        return None
    a = np.asarray(v)
    if a.dtype == np.bool_:
        a = a.astype(np.int64)
    if a.size == 1:
        x = a.reshape(()).item()
        return _num(x)
    if a.size <= limit:
        return [_num(x) for x in a.ravel().tolist()] if a.ndim == 1 else {"shape": list(a.shape), "values": [_num(x) for x in a.ravel().tolist()]}
    flat = a.ravel()
    return {"shape": list(a.shape), "first": [_num(x) for x in flat[:8].tolist()],
            "min": _num(flat.min().item()), "max": _num(flat.max().item())}


def _num(x: Any) -> Any:
    if isinstance(x, float):
        if math.isnan(x):
            return "nan"
        if math.isinf(x):
            return "inf" if x > 0 else "-inf"
        return float(f"{x:.7g}")
    if isinstance(x, complex):
        return str(x)
    return x
