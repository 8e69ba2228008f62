"""A specialised ONNX graph (`fold.FoldedGraph`) -> a `max.graph.Graph`.

`check_supported` looks at every remaining node before anything is built and raises one
`UnsupportedOpError` that lists all the problems. `build_graph` then maps each node through the op
registry (`sdsecure.engine.ops`). Large constants become `max.graph.Weight`s whose arrays are handed
to MAX at load time (`weights_registry`, no copies); small ones are literals, rank-0 ones stay rank 0
(max_notes G5). Every converted value is checked against the type shape inference gave it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import onnx
from max.driver import Buffer
from max.dtype import DType
from max.graph import DeviceRef, Graph, TensorType, TensorValue, Weight, ops

from sdsecure.engine import layout
from sdsecure.engine.fold import FoldedGraph, TensorInfo
from sdsecure.engine.ops import Node, resolve, attributes
from sdsecure.errors import UnsupportedOpError

WEIGHT_MIN_ELEMENTS = 64   # constants this big (and every initializer with a dimension) become Weights

_NP_TO_MAX = {np.dtype(k): v for k, v in {
    np.float32: DType.float32, np.float64: DType.float64, np.float16: DType.float16,
    np.int8: DType.int8, np.int16: DType.int16, np.int32: DType.int32, np.int64: DType.int64,
    np.uint8: DType.uint8, np.uint16: DType.uint16, np.uint32: DType.uint32, np.uint64: DType.uint64,
    np.bool_: DType.bool}.items()}


def max_dtype(dt: np.dtype) -> DType:
    try:
        return _NP_TO_MAX[np.dtype(dt)]
    except (KeyError, TypeError):
        raise TypeError(f"element type {dt} is not supported by the MAX backend") from None


@dataclass(frozen=True)
class Problem:
    op_type: str
    node: str
    reason: str

    def __str__(self) -> str:
        return f"{self.op_type} (node {self.node or '(unnamed)'!r}): {self.reason}"


def _node_view(folded: FoldedGraph, node: onnx.NodeProto, emitter: Any = None) -> Node:
    domain = "" if node.domain in ("", "ai.onnx") else node.domain
    in_infos = [folded.infos.get(i) if i else None for i in node.input]
    out_infos = [folded.infos.get(o) if o else None for o in node.output]
    consts = [folded.consts.get(i) if i else None for i in node.input]
    return Node(node, folded.opsets.get(domain, 0), in_infos, out_infos, consts, emitter)


def find_problems(folded: FoldedGraph) -> list[Problem]:
    problems: list[Problem] = []
    for node in folded.nodes:
        def bad(reason: str) -> None:
            problems.append(Problem(node.op_type if not node.domain else f"{node.domain}.{node.op_type}",
                                    node.name, reason))
        opdef, schema, reason = resolve(node, folded.opsets)
        if opdef is None:
            bad(reason)
            continue
        if any(i in folded.untyped for i in node.input):
            continue  # a consequence of an earlier problem, which is reported
        kwargs, bad_attrs = attributes(node, schema, opdef)
        if bad_attrs:
            bad(f"attribute {', '.join(bad_attrs)} not supported")
            continue
        view = _node_view(folded, node)
        names = [i for i in node.input]
        missing = [f"input {i} ({names[i]!r})" for i in opdef.const_inputs
                   if i < len(names) and names[i] and names[i] not in folded.consts]
        if missing:
            bad(f"{', '.join(missing)} must be constant after folding")
            continue
        infos = [i for i in view.in_infos + view.out_infos if i is not None]
        if any(o and o not in folded.infos for o in node.output):
            bad("output shape could not be inferred (data-dependent shape?)")
            continue
        try:
            for info in infos:
                max_dtype(info.dtype)
        except TypeError as e:
            bad(str(e))
            continue
        dynamic = [i for k, (i, name) in enumerate(zip(view.in_infos, node.input))
                   if i is not None and name not in folded.consts and k not in opdef.type_only]
        if any(info.size == 0 for info in dynamic + [i for i in view.out_infos if i is not None]):
            bad("empty tensor")
            continue
        if opdef.check is not None:
            reason = opdef.check(view, **kwargs)
            if reason:
                bad(reason)
    for name in folded.inputs + folded.outputs:
        info = folded.infos.get(folded.resolve(name))
        if info is not None:
            try:
                max_dtype(info.dtype)
            except TypeError as e:
                problems.append(Problem("graph", name, str(e)))
    return problems


def check_supported(folded: FoldedGraph) -> None:
    """Raise UnsupportedOpError naming every node the MAX backend cannot import."""
    problems = find_problems(folded)
    if problems:
        shown = "; ".join(str(p) for p in problems[:20])
        more = f"; and {len(problems) - 20} more" if len(problems) > 20 else ""
        ops_list = ", ".join(sorted({p.op_type for p in problems}))
        raise UnsupportedOpError(f"model {folded.name!r}: the MAX backend cannot import {len(problems)} node(s) "
                                 f"[{ops_list}]: {shown}{more}")


class ImporterBug(RuntimeError):
    """A converter produced a value whose type disagrees with ONNX shape inference."""


class Emitter:
    """Builds one folded graph's nodes into the current max.graph.Graph."""

    def __init__(self, folded: FoldedGraph, device: DeviceRef, prefix: str = ""):
        self.folded = folded
        self.device = device
        self.prefix = prefix
        self.values: dict[str, TensorValue] = {}    # ONNX (logical) layout
        self.nhwc: dict[str, TensorValue] = {}      # channels-last form of 4-D NCHW values (engine.layout)
        self.weights: dict[str, np.ndarray] = {}
        self._const_values: dict[str, TensorValue] = {}
        self._name_of = {id(v): k for k, v in folded.consts.items()}
        self._counter = 0
        self._filled: dict[tuple, TensorValue] = {}

    # -- constants ----------------------------------------------------------------------------
    def scalar(self, value: Any, dtype: Any) -> TensorValue:
        dt = dtype if isinstance(dtype, DType) else max_dtype(np.dtype(dtype))
        # A 0-d Buffer keeps rank 0 (a 0-d ndarray would become [1], max_notes G5) and is much faster
        # to stage than a Python scalar.
        if dt == DType.bool:  # Buffer.from_numpy cannot view a 0-d bool array
            return ops.constant(bool(value), dt, self.device)
        array = np.array(value, dtype=dt.to_numpy())
        if not dt.is_float() and array != value:
            raise ValueError(f"{value!r} does not fit {dt}")
        return ops.constant(Buffer.from_numpy(array), dt, self.device)

    def tensor(self, x: Any, dtype: Any = None, *, weight: bool = False) -> TensorValue:
        if isinstance(x, TensorValue):
            return x
        if not isinstance(x, np.ndarray):
            if dtype is None:
                raise TypeError("a Python scalar needs a dtype")
            return self.scalar(x, dtype)
        name = self._name_of.get(id(x))
        if name is not None and name in self._const_values:
            return self._const_values[name]
        value = self._constant(x, name, weight)
        if name is not None:
            self._const_values[name] = value
        return value

    def _constant(self, x: np.ndarray, name: str | None, weight: bool) -> TensorValue:
        dt = max_dtype(x.dtype)
        if x.ndim == 0:
            return self.scalar(x.item(), dt)
        as_weight = (weight or x.size >= WEIGHT_MIN_ELEMENTS or
                     (name is not None and name in self.folded.initializers and x.size > 1)) and dt != DType.bool
        if not as_weight:
            return ops.constant(np.ascontiguousarray(x), dt, self.device)
        if name is None:
            self._counter += 1
            name = f"derived.{self._counter}"
        wname = f"{self.prefix}{name}"
        arr = x if x.flags.c_contiguous else np.ascontiguousarray(x)
        self.weights[wname] = arr
        return Graph.current.add_weight(Weight(wname, dt, list(x.shape), self.device))

    def filled(self, value: float, length: int, dtype: DType) -> TensorValue:
        """A [length] tensor of `value` (shared by every user in this graph)."""
        key = (float(value), int(length), dtype)
        if key not in self._filled:
            self._filled[key] = self.tensor(np.full((length,), value, dtype=dtype.to_numpy()))
        return self._filled[key]

    # -- the two layouts of a value (engine.layout) ---------------------------------------------
    def logical(self, name: str) -> TensorValue:
        value = self.values.get(name)
        if value is None:
            value = self.values[name] = layout.permute(self.nhwc[name], layout.TO_NCHW)
        return value

    def channels_last(self, name: str, rank: int = 4) -> TensorValue:
        """The NHWC form of value `name`; a lower-rank value is first given leading 1s (broadcasting)."""
        value = self.nhwc.get(name)
        if value is None:
            logical = self.values[name]
            if rank < 4:
                logical = ops.reshape(logical, [1] * (4 - rank) + [int(d) for d in logical.shape])
            value = layout.permute(logical, layout.TO_NHWC)
            if rank == 4:
                self.nhwc[name] = value
        return value

    def store_channels_last(self, view: Node, name: str, value: TensorValue) -> None:
        info = self.folded.infos.get(name)
        if info is not None:
            self._check(view, name, value, layout.nhwc_shape(info.shape), info.dtype)
        self.nhwc[name] = value

    def store_logical(self, view: Node, name: str, value: TensorValue) -> None:
        self._verify(view, name, value)
        self.values[name] = value

    # -- nodes --------------------------------------------------------------------------------
    def emit(self, inputs: Sequence[TensorValue]) -> list[TensorValue]:
        folded = self.folded
        for name, value in zip(folded.inputs, inputs):
            self.values[name] = value
        for node in folded.nodes:
            self._emit_node(node)
        outs = []
        for name in folded.outputs:
            src = folded.resolve(name)
            if src in self.values or src in self.nhwc:
                outs.append(self.logical(src))
            else:
                outs.append(self.tensor(folded.consts[src]))
        return outs

    def _emit_node(self, node: onnx.NodeProto) -> None:
        folded = self.folded
        opdef, schema, reason = resolve(node, folded.opsets)
        if opdef is None:
            raise UnsupportedOpError(f"model {folded.name!r}: {node.op_type} node {node.name!r}: {reason}")
        kwargs, _ = attributes(node, schema, opdef)
        view = _node_view(folded, node, self)
        try:
            if layout.emit_channels_last(self, node, view, kwargs, opdef):
                return
        except (UnsupportedOpError, ImporterBug):
            raise
        except Exception as e:
            raise ImporterBug(f"model {folded.name!r}: converting {view.label} channels-last failed: "
                              f"{type(e).__name__}: {e}") from e
        args = []
        for name in node.input:
            if not name:
                args.append(None)
            elif name in folded.consts:
                args.append(folded.consts[name])
            else:
                args.append(self.logical(name))
        try:
            result = opdef.fn(view, *args, **kwargs)
        except UnsupportedOpError:
            raise
        except Exception as e:
            raise ImporterBug(f"model {folded.name!r}: converting {view.label} failed: {type(e).__name__}: {e}") from e
        results = result if isinstance(result, (tuple, list)) else (result,)
        outputs = [o for o in node.output]
        for out_name, value in zip(outputs, results):
            if not out_name:
                continue
            value = self.tensor(value) if not isinstance(value, TensorValue) else value
            self._verify(view, out_name, value)
            self.values[out_name] = value

    def _verify(self, view: Node, name: str, value: TensorValue) -> None:
        info = self.folded.infos.get(name)
        if info is not None:
            self._check(view, name, value, info.shape, info.dtype)

    def _check(self, view: Node, name: str, value: TensorValue, shape: tuple, dtype) -> None:
        got = tuple(int(d) for d in value.shape)
        if got != tuple(shape) or value.dtype != max_dtype(dtype):
            raise ImporterBug(f"model {self.folded.name!r}: {view.label} output {name!r} is {value.dtype}{list(got)}, "
                              f"expected {dtype}{list(shape)}")


def input_types(folded: FoldedGraph, device: DeviceRef) -> list[TensorType]:
    return [TensorType(max_dtype(folded.infos[n].dtype), list(folded.infos[n].shape), device) for n in folded.inputs]


def build_graph(folded: FoldedGraph, device: DeviceRef, graph_name: str) -> tuple[Graph, dict[str, np.ndarray]]:
    """The MAX graph of `folded` and the arrays of its weights (check_supported first)."""
    with Graph(graph_name, input_types=input_types(folded, device)) as graph:
        emitter = Emitter(folded, device)
        outs = emitter.emit([v.tensor for v in graph.inputs])
        graph.output(*outs)
    return graph, emitter.weights


def output_infos(folded: FoldedGraph) -> list[TensorInfo]:
    return [folded.infos[folded.resolve(o)] for o in folded.outputs]
