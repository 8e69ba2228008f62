"""Shape specialisation and constant folding of an ONNX graph, with caps that refuse bombs.

`specialize(model, weights, input_shapes)` walks the (topologically sorted) main graph once:

* every tensor gets a concrete type (`TensorInfo`): graph inputs from `input_shapes`, initializers from
  `weights`, node outputs from ONNX's own per-node shape inference (fed the values of small constants);
* `Identity`/`Dropout` become aliases, `Shape`/`Size` of a statically shaped tensor become constants;
* a deterministic standard-domain node whose inputs are all constant is evaluated with ONNX's reference
  implementation (`onnx.reference`) and disappears. Its output size is known *before* it is evaluated,
  so a node that would create more than `fold_cap_bytes` from smaller inputs (ConstantOfShape, Expand,
  Tile, Range, ... bombs) raises `FoldLimitError` without allocating anything. Large results that are no
  bigger than their inputs (a Transpose of a weight) are not folded but left to the runtime.
* any tensor larger than `tensor_cap_bytes` (folded or computed at run time) raises `FoldLimitError`.

What remains (`FoldedGraph.nodes`) is what the importer maps to MAX ops.
"""

from __future__ import annotations

import logging
import math
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Mapping, Sequence

import numpy as np
import onnx
from onnx import helper, numpy_helper
from onnx.external_data_helper import uses_external_data

from sdsecure.errors import UserError

log = logging.getLogger(__name__)

FOLD_CAP_BYTES = 64 << 20          # one folded tensor that is bigger than its inputs
FOLD_TOTAL_CAP_BYTES = 512 << 20   # all folded tensors together
TENSOR_CAP_BYTES = 4 << 30         # any tensor of the specialised graph
_DATA_FOR_INFERENCE = 1 << 16      # constants up to this many elements are shown to shape inference

STANDARD_DOMAINS = ("", "ai.onnx")
# Never folded: the value must differ between runs.
NONDETERMINISTIC = {"RandomNormal", "RandomUniform", "RandomNormalLike", "RandomUniformLike",
                    "Bernoulli", "Multinomial"}
# Output can be far bigger than the inputs; folding them needs a size known beforehand.
AMPLIFYING = {"ConstantOfShape", "Expand", "Tile", "Range", "Resize", "Upsample", "Pad", "OneHot",
              "EyeLike", "MatMul", "Gemm", "Einsum", "CenterCropPad", "Col2Im"}
ALIASES = {"Identity"}
# Output type = input type (first input); typed without calling ONNX shape inference (a hot path).
_SAME_TYPE = {"Abs", "Neg", "Exp", "Log", "Sqrt", "Reciprocal", "Sin", "Cos", "Tanh", "Sigmoid", "Erf", "Floor",
              "Ceil", "Relu", "Softmax", "LogSoftmax", "Gelu", "LeakyRelu", "Elu", "Softplus", "HardSigmoid"}
_BROADCAST = {"Add": None, "Sub": None, "Mul": None, "Div": None, "Pow": None,
              "Equal": np.bool_, "Less": np.bool_, "Greater": np.bool_, "LessOrEqual": np.bool_,
              "GreaterOrEqual": np.bool_, "And": np.bool_, "Or": np.bool_}


class FoldLimitError(UserError):
    """A tensor of the specialised graph is over a size cap (a decompression/shape bomb)."""


class SpecializeError(UserError):
    """The graph cannot be specialised to the given input shapes (malformed, missing inputs...)."""


@dataclass(frozen=True)
class TensorInfo:
    shape: tuple[int, ...]
    dtype: np.dtype

    @property
    def size(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.size * self.dtype.itemsize


@dataclass
class FoldedGraph:
    name: str
    opsets: dict[str, int]
    inputs: list[str]                          # dynamic graph inputs, in model order
    outputs: list[str]                         # graph output names (user facing)
    nodes: list[onnx.NodeProto]                # what is left to compute, topologically sorted
    consts: dict[str, np.ndarray]              # every known value: initializers and folded results
    infos: dict[str, TensorInfo]               # the type of every tensor
    initializers: set[str] = field(default_factory=set)   # names in `consts` that are model weights
    alias: dict[str, str] = field(default_factory=dict)   # Identity output -> source tensor
    untyped: set[str] = field(default_factory=set)        # outputs of nodes that could not be typed
    filling: dict[str, Future] = field(default_factory=dict)   # consts still being computed (engine.fuse)

    def wait_filled(self) -> None:
        """Return once every constant of this graph has its value (engine.fuse computes new filters in the
        background; their shapes are known before). A piece (engine.partition) waits for its own only.
        Raises what a computation raised."""
        for name, future in self.filling.items():
            if name in self.consts:
                future.result()

    def resolve(self, name: str) -> str:
        while name in self.alias:
            name = self.alias[name]
        return name


def onnx_np_dtype(elem_type: int) -> np.dtype:
    try:
        return np.dtype(helper.tensor_dtype_to_np_dtype(elem_type))
    except (KeyError, TypeError, ValueError):
        raise SpecializeError(f"unsupported ONNX element type {elem_type}") from None


_TYPE_PROTOS: dict[TensorInfo, onnx.TypeProto] = {}


def _type_proto(info: TensorInfo) -> onnx.TypeProto:
    tp = _TYPE_PROTOS.get(info)
    if tp is None:
        tp = helper.make_tensor_type_proto(helper.np_dtype_to_tensor_dtype(info.dtype), list(info.shape))
        if len(_TYPE_PROTOS) < 100_000:
            _TYPE_PROTOS[info] = tp
    return tp


def _info_from_type(tp: onnx.TypeProto, what: str) -> TensorInfo:
    if not tp.HasField("tensor_type"):
        raise SpecializeError(f"{what}: only tensor values are supported")
    tt = tp.tensor_type
    dims = []
    for d in tt.shape.dim:
        if not d.HasField("dim_value"):
            raise SpecializeError(f"{what}: shape inference left a symbolic dimension")
        dims.append(int(d.dim_value))
    if not tt.HasField("shape"):
        raise SpecializeError(f"{what}: shape inference gave no shape")
    return TensorInfo(tuple(dims), onnx_np_dtype(tt.elem_type))


def _has_subgraph(node: onnx.NodeProto) -> bool:
    return any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for a in node.attribute)


def node_label(node: onnx.NodeProto) -> str:
    return f"{node.op_type} node {node.name or '(unnamed)'!r}"


class _Folder:
    def __init__(self, model: onnx.ModelProto, weights: Mapping[str, np.ndarray],
                 input_shapes: Mapping[str, Sequence[int]], name: str,
                 fold_cap_bytes: int, tensor_cap_bytes: int, fold_total_cap_bytes: int):
        self.model = model
        self.graph = model.graph
        self.name = name or model.graph.name or "model"
        self.opsets = {(o.domain or ""): int(o.version) for o in model.opset_import}
        self.opsets.setdefault("", self.opsets.get("ai.onnx", 1))
        self.fold_cap = fold_cap_bytes
        self.tensor_cap = tensor_cap_bytes
        self.fold_total_cap = fold_total_cap_bytes
        self.folded_bytes = 0
        self.consts: dict[str, np.ndarray] = {}
        self.infos: dict[str, TensorInfo] = {}
        self.alias: dict[str, str] = {}
        self.initializers: set[str] = set()
        self.untyped: set[str] = set()
        self._load_inputs(weights, input_shapes)

    # -- graph inputs and initializers ---------------------------------------------------------
    def _load_inputs(self, weights: Mapping[str, np.ndarray], input_shapes: Mapping[str, Sequence[int]]) -> None:
        init_names = {t.name for t in self.graph.initializer}
        for t in self.graph.initializer:
            arr = weights.get(t.name)
            if arr is None:
                if uses_external_data(t):
                    raise SpecializeError(f"{self.name}: no data for external initializer {t.name!r}")
                arr = numpy_helper.to_array(t)
            expected = TensorInfo(tuple(int(d) for d in t.dims), onnx_np_dtype(t.data_type))
            if tuple(arr.shape) != expected.shape or arr.dtype != expected.dtype:
                raise SpecializeError(f"{self.name}: initializer {t.name!r} is {arr.dtype}{list(arr.shape)}, "
                                      f"the graph declares {expected.dtype}{list(expected.shape)}")
            self._check_cap(t.name, expected, "initializer")
            self.consts[t.name] = arr
            self.infos[t.name] = expected
            self.initializers.add(t.name)

        self.inputs: list[str] = []
        graph_inputs = [i.name for i in self.graph.input]
        unknown = sorted(set(input_shapes) - set(graph_inputs))
        if unknown:
            raise SpecializeError(f"{self.name}: no graph input named {', '.join(map(repr, unknown))} "
                                  f"(inputs: {', '.join(graph_inputs)})")
        for vi in self.graph.input:
            if vi.name in init_names and vi.name not in input_shapes:
                continue  # an old-style input with a default value: it stays a constant
            if vi.name not in input_shapes:
                raise SpecializeError(f"{self.name}: no shape given for input {vi.name!r}")
            if not vi.type.HasField("tensor_type"):
                raise SpecializeError(f"{self.name}: input {vi.name!r} is not a tensor")
            shape = tuple(int(d) for d in input_shapes[vi.name])
            if any(d < 0 for d in shape):
                raise SpecializeError(f"{self.name}: input {vi.name!r}: negative dimension in {list(shape)}")
            declared = vi.type.tensor_type.shape.dim if vi.type.tensor_type.HasField("shape") else None
            if declared is not None:
                if len(declared) != len(shape):
                    raise SpecializeError(f"{self.name}: input {vi.name!r} has rank {len(declared)}, "
                                          f"got shape {list(shape)}")
                for d, s in zip(declared, shape):
                    if d.HasField("dim_value") and d.dim_value != s:
                        raise SpecializeError(f"{self.name}: input {vi.name!r} is fixed to "
                                              f"{[x.dim_value or x.dim_param for x in declared]}, got {list(shape)}")
            info = TensorInfo(shape, onnx_np_dtype(vi.type.tensor_type.elem_type))
            self._check_cap(vi.name, info, "input")
            self.consts.pop(vi.name, None)
            self.initializers.discard(vi.name)
            self.infos[vi.name] = info
            self.inputs.append(vi.name)

    def _check_cap(self, name: str, info: TensorInfo, what: str) -> None:
        if info.nbytes > self.tensor_cap:
            raise FoldLimitError(f"{self.name}: {what} {name!r} would be {info.nbytes:,} bytes "
                                 f"({list(info.shape)} {info.dtype}); the cap is {self.tensor_cap:,} bytes")

    def resolve(self, name: str) -> str:
        while name in self.alias:
            name = self.alias[name]
        return name

    # -- the walk -----------------------------------------------------------------------------
    def run(self) -> FoldedGraph:
        kept: list[onnx.NodeProto] = []
        for node in self.graph.node:
            node = self._rewired(node)
            missing = [i for i in node.input if i and i not in self.infos and i not in self.untyped]
            if missing:
                raise SpecializeError(f"{self.name}: {node_label(node)} reads {missing[0]!r}, which no earlier "
                                      f"node produces (graph not topologically sorted or malformed)")
            if any(i in self.untyped for i in node.input):
                self.untyped.update(o for o in node.output if o)   # downstream of an untyped value
                kept.append(node)
            elif not self._fold(node):
                kept.append(node)
                self.untyped.update(o for o in node.output if o and o not in self.infos)
        outputs = [o.name for o in self.graph.output]
        for o in outputs:
            if self.resolve(o) not in self.infos and self.resolve(o) not in self.untyped:
                raise SpecializeError(f"{self.name}: graph output {o!r} is never produced")
        used = {self.resolve(o) for o in outputs}
        for n in kept:
            used.update(i for i in n.input if i)
        consts = {k: v for k, v in self.consts.items() if k in used}
        return FoldedGraph(self.name, self.opsets, self.inputs, outputs, self._prune(kept, outputs), consts,
                           self.infos, self.initializers & set(consts), self.alias, self.untyped)

    def _prune(self, nodes: list[onnx.NodeProto], outputs: list[str]) -> list[onnx.NodeProto]:
        """Drop nodes whose results nobody reads (folding leaves many)."""
        live = {self.resolve(o) for o in outputs}
        keep = []
        for n in reversed(nodes):
            if any(o in live for o in n.output if o):
                keep.append(n)
                live.update(i for i in n.input if i)
        return keep[::-1]

    def _rewired(self, node: onnx.NodeProto) -> onnx.NodeProto:
        if not any(i in self.alias for i in node.input):
            return node
        new = onnx.NodeProto()
        new.CopyFrom(node)
        del new.input[:]
        new.input.extend(self.resolve(i) if i else "" for i in node.input)
        return new

    def _fold(self, node: onnx.NodeProto) -> bool:
        """Record the node's output types; fold it when possible. Returns True when folded away."""
        op, domain = node.op_type, node.domain or ""
        standard = domain in STANDARD_DOMAINS
        inference_dropout = op == "Dropout" and len(node.output) == 1 and (len(node.input) < 3 or not node.input[2])
        if standard and (op in ALIASES or inference_dropout) and node.input:
            self.alias[node.output[0]] = node.input[0]
            return True
        if not standard or _has_subgraph(node):
            return False  # cannot be typed or evaluated here; the importer reports it as unsupported
        if op == "Shape":
            self._set_const(node.output[0], self._shape_value(node), node)
            return True
        if op == "Size":
            self._set_const(node.output[0], np.array(self.infos[node.input[0]].size, np.int64), node)
            return True
        if op == "Constant" and len(node.attribute) == 1 and node.attribute[0].name == "value":
            self._set_const(node.output[0], numpy_helper.to_array(node.attribute[0].t), node)
            return True

        out_infos = self._infer(node)
        for name, info in out_infos.items():
            self._check_cap(name, info, f"output of {node_label(node)}")
        all_const = all(i == "" or i in self.consts for i in node.input)
        if not all_const or op in NONDETERMINISTIC:
            self.infos.update(out_infos)
            return False
        in_bytes = sum(self.consts[i].nbytes for i in node.input if i)
        if len(out_infos) == len([o for o in node.output if o]):
            out_bytes = sum(i.nbytes for i in out_infos.values())
            if out_bytes > self.fold_cap and op != "Constant":
                if out_bytes > in_bytes:
                    raise FoldLimitError(
                        f"{self.name}: folding {node_label(node)} would create {out_bytes:,} bytes from "
                        f"{in_bytes:,} bytes of constants; the cap is {self.fold_cap:,} bytes")
                self.infos.update(out_infos)
                return False  # e.g. a transform of a large weight: computed at run time, not copied here
        elif op == "Range" and len(node.input) == 3:
            start, limit, delta = (float(np.asarray(self.consts[i]).reshape(())) for i in node.input)
            count = max(int(np.ceil((limit - start) / delta)), 0) if delta else 0
            if count * self.consts[node.input[0]].itemsize > self.fold_cap:
                raise FoldLimitError(f"{self.name}: folding {node_label(node)} would create {count:,} elements; "
                                     f"the cap is {self.fold_cap:,} bytes")
        elif op in AMPLIFYING:
            raise FoldLimitError(f"{self.name}: cannot bound the size of {node_label(node)}; refusing to fold it")
        values = self._evaluate(node)
        for name, value in zip([o for o in node.output if o], values):
            self._set_const(name, value, node)
        return True

    def _shape_value(self, node: onnx.NodeProto) -> np.ndarray:
        shape = self.infos[node.input[0]].shape
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        start, end = int(attrs.get("start", 0)), attrs.get("end")
        return np.array(shape[slice(start, None if end is None else int(end))], dtype=np.int64)

    def _fast_infer(self, node: onnx.NodeProto) -> dict[str, TensorInfo] | None:
        op = node.op_type
        if len(node.output) != 1 or not node.output[0] or any(not i for i in node.input):
            return None
        if op in _SAME_TYPE and len(node.input) == 1:
            return {node.output[0]: self.infos[node.input[0]]}
        if op in _BROADCAST and len(node.input) == 2:
            a, b = self.infos[node.input[0]], self.infos[node.input[1]]
            if op != "Pow" and a.dtype != b.dtype:
                return None  # malformed: let ONNX's inference say so
            try:
                shape = tuple(int(d) for d in np.broadcast_shapes(a.shape, b.shape))
            except ValueError:
                return None
            return {node.output[0]: TensorInfo(shape, np.dtype(_BROADCAST[op] or a.dtype))}
        return None

    def _infer(self, node: onnx.NodeProto) -> dict[str, TensorInfo]:
        if (node.domain or "") in STANDARD_DOMAINS:
            fast = self._fast_infer(node)
            if fast is not None:
                return fast
        try:
            schema = onnx.defs.get_schema(node.op_type, self.opsets.get(node.domain or "", self.opsets[""]),
                                          node.domain or "")
        except onnx.defs.SchemaError:
            return {}  # unknown op: reported by the importer
        types = {i: _type_proto(self.infos[i]) for i in node.input if i}
        data = {i: numpy_helper.from_array(np.asarray(self.consts[i]), i) for i in node.input
                if i in self.consts and self.consts[i].size <= _DATA_FOR_INFERENCE}
        opset_imports = [helper.make_opsetid(d, v) for d, v in self.opsets.items()]
        try:
            inferred = onnx.shape_inference.infer_node_outputs(schema, node, types, data, opset_imports=opset_imports)
        except Exception as e:  # onnx raises several types (InferenceError, ValidationError, RuntimeError)
            raise SpecializeError(f"{self.name}: {node_label(node)}: shape inference failed: "
                                  f"{str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
        out = {}
        for o in node.output:
            if o and o in inferred:
                try:
                    out[o] = _info_from_type(inferred[o], f"{node_label(node)} output {o!r}")
                except SpecializeError:
                    pass  # e.g. a data-dependent shape: left untyped, reported by the importer
        return out

    def _evaluate(self, node: onnx.NodeProto) -> list[np.ndarray]:
        from onnx.reference import ReferenceEvaluator

        inputs = {i: self.consts[i] for i in node.input if i}
        try:
            ev = ReferenceEvaluator(node, opsets=dict(self.opsets))
            return [np.asarray(v) for v in ev.run(None, inputs)]
        except Exception as e:
            raise SpecializeError(f"{self.name}: {node_label(node)}: constant folding failed: "
                                  f"{str(e).splitlines()[0] if str(e) else type(e).__name__}") from None

    def _set_const(self, name: str, value: np.ndarray, node: onnx.NodeProto) -> None:
        value = np.asarray(value)
        info = TensorInfo(tuple(int(d) for d in value.shape), value.dtype)
        known = self.infos.get(name)
        if known is not None and known != info:
            raise SpecializeError(f"{self.name}: {node_label(node)}: folded {name!r} to {info}, inferred {known}")
        self._check_cap(name, info, f"output of {node_label(node)}")
        if node.op_type != "Constant":
            self.folded_bytes += value.nbytes
            if self.folded_bytes > self.fold_total_cap:
                raise FoldLimitError(f"{self.name}: constant folding produced over {self.fold_total_cap:,} bytes "
                                     f"(at {node_label(node)})")
        self.consts[name] = value
        self.infos[name] = info


def specialize(model: onnx.ModelProto, weights: Mapping[str, np.ndarray], input_shapes: Mapping[str, Sequence[int]],
               *, name: str = "", fold_cap_bytes: int = FOLD_CAP_BYTES, tensor_cap_bytes: int = TENSOR_CAP_BYTES,
               fold_total_cap_bytes: int = FOLD_TOTAL_CAP_BYTES) -> FoldedGraph:
    """Specialise `model` to `input_shapes` and fold every constant subgraph (see the module doc)."""
    return _Folder(model, weights, input_shapes, name, fold_cap_bytes, tensor_cap_bytes, fold_total_cap_bytes).run()
