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

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import numpy as np
import onnx
from onnx import AttributeProto, GraphProto, ModelProto, NodeProto, TensorProto

from sdsecure.gate.onnx_wire import Initializers, initializer_raw_lengths, read_initializers

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


GRAPH_OPS = frozenset({"If", "Loop", "Scan", "SequenceMap"})   # standard ops with graph attributes


def _subgraphs(node: NodeProto) -> list[tuple[str, GraphProto]]:
    """Graph-valued attributes of a node. Standard ops other than If/Loop/Scan/SequenceMap have none
    (runtimes ignore any), so their attribute lists are not scanned here."""
    if node.domain in ("", "ai.onnx") and node.op_type not in GRAPH_OPS:
        return []
    out = []
    for attr in node.attribute:
        if attr.type == AttributeProto.GRAPH:
            out.append((attr.name, attr.g))
        elif attr.type == AttributeProto.GRAPHS:
            out.extend((f"{attr.name}[{i}]", g) for i, g in enumerate(attr.graphs))
    return out


@dataclass(frozen=True)
class TensorLoc:
    where: str               # human location, e.g. "main/initializer 'w'", "main/Const_3 (Constant).value"
    tensor: TensorProto
    graph_path: str
    kind: str = "attribute"  # "initializer" | "sparse" | "attribute" | "function-attribute"
    raw_len: int | None = None   # len(tensor.raw_data) when known without copying it (see onnx_wire)


@dataclass
class ModelIndex:
    """Everything the walkers yield, collected in one pass over the model (every attribute of every
    node is looked at once, whatever its op: attackers put tensors and strings where they like)."""
    nodes: list[NodeLoc] = field(default_factory=list)
    graphs: list[tuple[str, GraphProto]] = field(default_factory=list)
    tensors: list[TensorLoc] = field(default_factory=list)
    sparse: list[tuple[str, onnx.SparseTensorProto]] = field(default_factory=list)
    string_attrs: list[tuple[str, str]] = field(default_factory=list)   # (where, text)
    # raw_data length of each main-graph initializer, in order (None entries: no raw_data), when the
    # serialized bytes were available to read them from (onnx_wire); None otherwise
    init_raw_len: list[int | None] | None = None


def index_model(model: ModelProto) -> ModelIndex:
    ix = ModelIndex()
    G, GS = AttributeProto.GRAPH, AttributeProto.GRAPHS
    T, TS = AttributeProto.TENSOR, AttributeProto.TENSORS
    ST, STS = AttributeProto.SPARSE_TENSOR, AttributeProto.SPARSE_TENSORS
    S, SS = AttributeProto.STRING, AttributeProto.STRINGS

    def graph(g: GraphProto, path: str, in_fn: bool) -> None:
        ix.graphs.append((path, g))
        for t in g.initializer:
            ix.tensors.append(TensorLoc(f"{path}/initializer '{t.name}'", t, path, "initializer"))
        for st in g.sparse_initializer:
            w = f"{path}/sparse_initializer '{st.values.name}'"
            ix.sparse.append((w, st))
            ix.tensors.append(TensorLoc(w + ".values", st.values, path, "sparse"))
            ix.tensors.append(TensorLoc(w + ".indices", st.indices, path, "sparse"))
        nodes(g.node, path, in_fn)

    def nodes(seq, path: str, in_fn: bool) -> None:
        for i, node in enumerate(seq):
            loc = NodeLoc(path, i, node, in_fn)
            ix.nodes.append(loc)
            if not node.attribute:
                continue
            base = None
            for attr in node.attribute:
                at = attr.type
                if at == G or at == GS:
                    subs = [(attr.name, attr.g)] if at == G else \
                        [(f"{attr.name}[{k}]", g) for k, g in enumerate(attr.graphs)]
                    for aname, sub in subs:
                        graph(sub, f"{path}/{loc.name}.{aname}", in_fn)
                    continue
                if at not in (T, TS, ST, STS, S, SS):
                    continue
                base = base or loc.where
                if at == T:
                    ix.tensors.append(TensorLoc(f"{base}.{attr.name}", attr.t, path))
                elif at == TS:
                    ix.tensors.extend(TensorLoc(f"{base}.{attr.name}[{k}]", t, path) for k, t in enumerate(attr.tensors))
                elif at == ST or at == STS:
                    sts = [("", attr.sparse_tensor)] if at == ST else \
                        [(f"[{k}]", st) for k, st in enumerate(attr.sparse_tensors)]
                    for suffix, st in sts:
                        w = f"{base}.{attr.name}{suffix}"
                        ix.sparse.append((w, st))
                        ix.tensors.append(TensorLoc(w + ".values", st.values, path))
                        ix.tensors.append(TensorLoc(w + ".indices", st.indices, path))
                elif at == S:
                    ix.string_attrs.append((f"{base}.{attr.name}", _decode(attr.s)))
                else:
                    ix.string_attrs.extend((f"{base}.{attr.name}[{k}]", _decode(x)) for k, x in enumerate(attr.strings))

    graph(model.graph, MAIN, False)
    for fn in model.functions:
        fp = function_path(fn)
        nodes(fn.node, fp, True)
        for attr in fn.attribute_proto:
            if attr.type == T:
                ix.tensors.append(TensorLoc(f"{fp}.attribute {attr.name}", attr.t, fp, "function-attribute"))
    return ix


def walk_nodes(model: ModelProto | ModelIndex) -> list[NodeLoc]:
    """Every node of the model: main graph, nested graphs (any depth) and local function bodies."""
    return (model if isinstance(model, ModelIndex) else index_model(model)).nodes


def walk_graphs(model: ModelProto | ModelIndex) -> list[tuple[str, GraphProto]]:
    """(path, graph) for the main graph and every nested graph (also those inside functions)."""
    return (model if isinstance(model, ModelIndex) else index_model(model)).graphs


def walk_tensors(model: ModelProto | ModelIndex) -> list[TensorLoc]:
    """Every TensorProto: initializers and sparse initializers of every graph, tensor-valued node
    attributes (Constant values, ...) everywhere, function attribute defaults."""
    return (model if isinstance(model, ModelIndex) else index_model(model)).tensors


def walk_sparse(model: ModelProto | ModelIndex) -> list[tuple[str, onnx.SparseTensorProto]]:
    """Every SparseTensorProto (initializers and attributes), with its location."""
    return (model if isinstance(model, ModelIndex) else index_model(model)).sparse


def cached_index(ctx: Any, path: str, model: ModelProto) -> ModelIndex:
    """The ModelIndex of ctx's file `path`, built once per scan (ScanContext.cache)."""
    key = ("onnx-index", path)
    if key not in ctx.cache:
        ix = index_model(model)
        blob = ctx.files.get(path)
        key_lengths = ("onnx-raw-lengths", path)                   # checked by ctx.onnx when it parsed
        if key_lengths in ctx.cache:
            lengths = ctx.cache[key_lengths]
        else:
            lengths = initializer_raw_lengths(blob.view(), model) if blob is not None else None
        if lengths is not None:
            ix.init_raw_len = lengths
            mains = [k for k, tl in enumerate(ix.tensors) if tl.graph_path == MAIN and tl.kind == "initializer"]
            for k, n in zip(mains, lengths):
                if n is not None:
                    ix.tensors[k] = dataclasses.replace(ix.tensors[k], raw_len=n)
        ctx.cache[key] = ix
    return ctx.cache[key]


@dataclass(frozen=True)
class StringLoc:
    where: str               # location of the string
    kind: str                # "doc_string", "metadata", "attribute", "string tensor", ...
    text: str


def _decode(b: bytes) -> str:
    return b.decode("utf-8", errors="replace")


def walk_strings(model: ModelProto, index: ModelIndex | None = None,
                 max_tensor_strings: int = 100_000) -> Iterator[StringLoc]:
    """Every free-text string an attacker can put in a model: doc strings (model, graphs, nodes,
    functions, value infos, tensors), metadata_props (model, graphs, nodes, functions), string
    attributes and string tensors."""
    ix = index or index_model(model)
    if model.doc_string:
        yield StringLoc("model.doc_string", "doc_string", model.doc_string)
    for p in model.metadata_props:
        yield StringLoc(f"model.metadata_props[{p.key!r}]", "metadata", f"{p.key}\n{p.value}" if p.key else p.value)
    for fld in ("producer_name", "producer_version", "domain"):
        v = getattr(model, fld)
        if v:
            yield StringLoc(f"model.{fld}", "model field", v)
    for path, graph in ix.graphs:
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
    for loc in ix.nodes:
        node = loc.node
        if node.doc_string:
            yield StringLoc(f"{loc.where}.doc_string", "doc_string", node.doc_string)
        for p in node.metadata_props:
            yield StringLoc(f"{loc.where}.metadata_props[{p.key!r}]", "metadata", p.value)
    for where, text in ix.string_attrs:
        yield StringLoc(where, "attribute", text)
    count = 0
    for tl in ix.tensors:
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


def raw_data_len(t: TensorProto) -> int:
    """len(t.raw_data). (upb copies the bytes on access; deriving the length from ByteSize() was
    measured slower, as upb encodes to size a message.)"""
    return len(t.raw_data) if t.HasField("raw_data") else 0


def tensor_payload_bytes(t: TensorProto, raw_len: int | None = None) -> int:
    """An estimate of the bytes a tensor carries inline (0 for external data); `raw_len`, when
    known, is len(t.raw_data)."""
    if uses_external(t):
        return 0
    if t.HasField("raw_data"):
        return raw_len if raw_len is not None else raw_data_len(t)
    n = num_elements(t.dims)
    bits = elem_bits(t.data_type) or 64
    return n * bits // 8


def value_info_for(t: TensorProto) -> onnx.ValueInfoProto:
    return onnx.helper.make_tensor_value_info(t.name, t.data_type, list(t.dims))


def _copy_fields(src: Any, dst: Any, skip: tuple[str, ...]) -> None:
    for fd, value in src.ListFields():
        if fd.name in skip:
            continue
        if hasattr(value, "extend") and not isinstance(value, (str, bytes)):     # repeated field
            getattr(dst, fd.name).extend(value)
        elif hasattr(value, "CopyFrom"):                                       # message field
            getattr(dst, fd.name).CopyFrom(value)
        else:
            setattr(dst, fd.name, value)


class StructuralCopyError(Exception):
    """The model has tensor payloads that cannot be left out of a structural copy."""


def structural_copy(model: ModelProto, keep_bytes: int = 1 << 16, index: ModelIndex | None = None) -> ModelProto:
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
    lengths = index.init_raw_len if index is not None and index.init_raw_len is not None else None
    for k, t in enumerate(src.initializer):
        if uses_external(t) or tensor_payload_bytes(t, lengths[k] if lengths else None) > keep_bytes:
            if t.name not in declared:
                g.input.append(value_info_for(t))
                declared.add(t.name)
        else:
            g.initializer.append(t)
    # external tensors anywhere else cannot be dropped without changing the model's meaning
    for tl in (index or index_model(model)).tensors:
        if not (tl.graph_path == MAIN and tl.kind == "initializer"):
            if uses_external(tl.tensor):
                raise StructuralCopyError(f"external tensor outside the main graph's initializers: {tl.where}")
    return out


# ----------------------------------------------------------------------------------------------
# the pipeline's input shapes, and the structural copy shared by the checker and shape inference
# ----------------------------------------------------------------------------------------------

SD_INPUTS = {"input_ids": (2, 77), "sample": (2, 4, 64, 64), "latent_sample": (2, 4, 64, 64)}


def pipeline_input_shapes(ctx: Any, path: str, model: ModelProto) -> dict[str, tuple[int, ...]]:
    """Concrete shapes of the graph inputs: ctx.input_shapes, else SD defaults, else 1 per dynamic dim."""
    given = ctx.input_shapes.get(path, {})
    init = {t.name for t in model.graph.initializer}
    out: dict[str, tuple[int, ...]] = {}
    for vi in model.graph.input:
        if vi.name in init or not vi.type.HasField("tensor_type"):
            continue
        dims = [d.dim_value if d.HasField("dim_value") else None for d in vi.type.tensor_type.shape.dim]
        if vi.name in given:
            out[vi.name] = tuple(int(x) for x in given[vi.name])
            continue
        if ctx.is_sd_repo:
            if vi.name in SD_INPUTS and len(dims) == len(SD_INPUTS[vi.name]):
                out[vi.name] = tuple(d if d is not None else s for d, s in zip(dims, SD_INPUTS[vi.name]))
                continue
            if vi.name == "encoder_hidden_states" and len(dims) == 3:
                out[vi.name] = (dims[0] or 2, dims[1] or 77, dims[2] or 768)
                continue
            if vi.name == "timestep":
                out[vi.name] = tuple(d if d is not None else 2 for d in dims)
                continue
        out[vi.name] = tuple(d if d is not None else 1 for d in dims)
    return out


def _fix_inputs(model: ModelProto, shapes: dict[str, tuple[int, ...]]) -> None:
    for vi in model.graph.input:
        if vi.name not in shapes or not vi.type.HasField("tensor_type"):
            continue
        shp = vi.type.tensor_type.shape
        shp.ClearField("dim")
        for d in shapes[vi.name]:
            shp.dim.add().dim_value = int(d)


STRUCTURAL_KEEP_BYTES = 4096


def structural_bytes(ctx: Any, path: str, model: ModelProto) -> bytes:
    """The serialized structural copy of ctx's file `path`, with its graph inputs fixed to the
    pipeline's shapes (cached per scan; used by onnx.checker and by shape inference).
    Raises StructuralCopyError (also cached) when no such copy can be made."""
    key = ("onnx-structural", path)
    if key not in ctx.cache:
        try:
            copy = structural_copy(model, STRUCTURAL_KEEP_BYTES, index=cached_index(ctx, path, model))
            _fix_inputs(copy, pipeline_input_shapes(ctx, path, model))
            ctx.cache[key] = copy.SerializeToString()
        except StructuralCopyError as exc:
            ctx.cache[key] = exc
    value = ctx.cache[key]
    if isinstance(value, StructuralCopyError):
        raise value
    return value


# ----------------------------------------------------------------------------------------------
# flattened dataflow over graph + subgraphs + inlined local functions
# ----------------------------------------------------------------------------------------------

@dataclass
class FlatNode:
    index: int
    op: str                          # op type ("If", "Add", ...) or a pseudo op ("<enter>", "<return>")
    domain: str
    name: str                        # node name (or "#i")
    path: str                        # graph path of the node, e.g. "main/If_3.then_branch"
    inputs: list[str | None]         # tensor ids (None for an omitted optional input)
    outputs: list[str]               # tensor ids
    proto: NodeProto | None          # None for pseudo nodes
    # deps[i]: the input positions output i depends on (None: every input)
    deps: list[tuple[int, ...]] | None = None
    control: tuple[int, ...] = ()    # input positions that select/steer (If cond, Loop M/cond)
    suffix: str = ""                 # for pseudo nodes: " [body inputs]", " [returns y]"
    feedback: int = 0                # trailing inputs that are loop-carried feedback (not ordering edges)

    @property
    def where(self) -> str:
        """"main/If_3.then_branch/Where_7 (Where)" (pseudo nodes name the node they belong to)."""
        shown = self.proto.op_type if self.proto is not None else self.op
        if self.op in ("<enter>", "<return>"):
            shown = self.name_op
        return f"{self.path}/{self.name} ({shown}){self.suffix}"

    name_op: str = ""                # op type of the owning node, for pseudo nodes


@dataclass
class FlatGraph:
    nodes: list[FlatNode] = field(default_factory=list)
    producer: dict[str, int] = field(default_factory=dict)       # tensor id -> node index
    inputs: list[str] = field(default_factory=list)               # main graph inputs (not initializers)
    outputs: list[str] = field(default_factory=list)              # main graph outputs
    initializers: dict[str, TensorProto] = field(default_factory=dict)  # id -> tensor (all graphs)
    display: dict[str, str] = field(default_factory=dict)         # id -> name as in the file

    _consumers: dict[str, list[int]] | None = None

    def add(self, node: FlatNode) -> None:
        self.nodes.append(node)
        for t in node.outputs:
            self.producer[t] = node.index

    @property
    def consumers(self) -> dict[str, list[int]]:
        """tensor id -> indices of the nodes that read it (built on first use)."""
        if self._consumers is None:
            cons: dict[str, list[int]] = {}
            for node in self.nodes:
                for t in node.inputs:
                    if t is not None:
                        cons.setdefault(t, []).append(node.index)
            self._consumers = cons
        return self._consumers

    def name_of(self, tid: str) -> str:
        return self.display.get(tid, tid)

    def topological_order(self) -> list[int]:
        """Node indices in dependency order. Emission order already is one for well-formed models;
        graphs whose nodes are out of order (runtimes sort them, so an attacker may rely on that)
        are sorted here. Nodes on a cycle (malformed) come last, in emission order."""
        n = len(self.nodes)
        preds: list[set[int]] = [set() for _ in range(n)]
        for node in self.nodes:
            ins = node.inputs[: len(node.inputs) - node.feedback] if node.feedback else node.inputs
            for t in ins:
                p = self.producer.get(t) if t is not None else None
                if p is not None and p != node.index:
                    preds[node.index].add(p)
        if all(all(p < i for p in ps) for i, ps in enumerate(preds)):
            return list(range(n))
        succ: list[list[int]] = [[] for _ in range(n)]
        indeg = [len(ps) for ps in preds]
        for i, ps in enumerate(preds):
            for p in ps:
                succ[p].append(i)
        import heapq

        ready = [i for i in range(n) if indeg[i] == 0]
        heapq.heapify(ready)
        order: list[int] = []
        while ready:
            i = heapq.heappop(ready)
            order.append(i)
            for j in succ[i]:
                indeg[j] -= 1
                if indeg[j] == 0:
                    heapq.heappush(ready, j)
        placed = set(order)
        order.extend(i for i in range(n) if i not in placed)
        return order


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

    def emit(op: str, domain: str, name: str, path: str, inputs: list[str | None], outputs: list[str],
             proto: NodeProto | None, deps=None, control: tuple[int, ...] = (), suffix: str = "",
             name_op: str = "") -> None:
        fg.add(FlatNode(len(fg.nodes), op, domain, name, path, inputs, outputs, proto, deps, control,
                        suffix=suffix, name_op=name_op))

    def graph_body(graph: GraphProto, scope: _Scope, path: str, depth: int) -> None:
        for t in graph.initializer:
            tid = scope.define(t.name)
            fg.initializers[tid] = t
            fg.display[tid] = t.name
        for st in graph.sparse_initializer:
            tid = scope.define(st.values.name)
            fg.display[tid] = st.values.name
            emit("<sparse>", "", f"sparse_initializer '{st.values.name}'", path, [], [tid], None)
        for i, node in enumerate(graph.node):
            one_node(node, i, scope, path, depth)

    def one_node(node: NodeProto, i: int, scope: _Scope, path: str, depth: int) -> None:
        name = node.name or f"#{i}"
        ins = [scope.resolve(x) if x else None for x in node.input]
        fn = functions.get((node.domain, node.op_type)) if functions else None
        if fn is not None and depth < MAX_INLINE_DEPTH:
            inline_function(fn, node, name, ins, scope, path, depth)
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
            emit("If", node.domain, name, path, all_in, outs, node, deps, control=(0,))
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
            emit("<enter>", "", name, path, list(ins), body_in, None, None, suffix=" [body inputs]",
                 name_op=node.op_type)
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
                        enter.feedback += 1
                        enter.deps[2 + k] = enter.deps[2 + k] + (len(enter.inputs) - 1,)
                all_in = list(ins) + body_out
                deps = [(0, 1, len(ins) + 1 + k) for k in range(len(outs))]
                emit("Loop", node.domain, name, path, all_in, outs, node, deps, control=(0, 1))
            else:
                all_in = list(ins) + body_out
                deps = [tuple(range(len(ins))) + (len(ins) + k,) for k in range(len(outs))]
                emit("Scan", node.domain, name, path, all_in, outs, node, deps)
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
        emit(node.op_type, node.domain, name, path, ins, outs, node)

    def inline_function(fn: onnx.FunctionProto, node: NodeProto, name: str,
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
            emit("<return>", "", name, path, [fscope.resolve(formal)], [actual], None,
                 suffix=f" [returns {formal}]", name_op=node.op_type)

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


LIGHT_COPY_MIN_BYTES = 1 << 20


def _payload_droppable(dims: list[int], data_type: int, length: int) -> bool:
    """Whether the rules can do without an initializer's raw_data bytes: large, consistent with its
    dims and type, and above the size whose values any rule ever reads (small_tensor_value)."""
    bits = elem_bits(data_type)
    if bits is None or length < LIGHT_COPY_MIN_BYTES:
        return False
    n = num_elements(dims)
    return n > MAX_FOLD_ELEMENTS and (n * bits + 7) // 8 == length


def wire_initializers(data: Any) -> Initializers | None:
    """One walk of the serialized model: its main-graph initializers' raw_data lengths and, when it
    has large initializers inline, a light copy without their payloads (onnx_wire.read_initializers)."""
    return read_initializers(data, _payload_droppable)


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
