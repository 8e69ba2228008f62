"""ONNX-SHAPE-BOMB: tensors whose size, at the pipeline's real input shapes, is absurd.

Computed statically, never by running anything: the graph inputs are fixed to the shapes the
pipeline will feed (ScanContext.input_shapes; SD defaults: batch 2, 77 tokens, 64x64 latents; other
models: 1 for every dynamic dim), onnx shape inference (with data propagation) runs on a structural
copy without weights, and the remaining size arguments (ConstantOfShape shapes, Expand targets, Tile
repeats, Resize sizes/scales, Range bounds, Pad amounts) are folded with numpy from small constant
subexpressions such as Shape -> Gather -> Concat chains. No large tensor is ever materialised.
"""

from __future__ import annotations

import math
from typing import Iterator

import numpy as np
import onnx

from sdsecure.gate.blob import Blob
from sdsecure.gate.onnx_graph import (GRAPH_OPS, MAIN, ConstFolder, FlatGraph, StructuralCopyError, cached_index,
                                      flatten, node_name, num_elements, pipeline_input_shapes, structural_bytes,
                                      walk_graphs)
from sdsecure.gate.report import Finding, Severity
from sdsecure.gate.rules import ScanContext, declare, file_rule

# 2**31 elements = 8 GiB of float32. The largest activation of SD 1.5 at 512x512 and batch 2 is the
# attention score tensor, 2 x 8 x 4096 x 4096 = 2**28 elements; 768x768 stays under 2**31 as well.
ELEMENT_CAP = 1 << 31

BOMB = declare(
    "ONNX-SHAPE-BOMB", Severity.HIGH,
    "Declared or computed tensor size is absurd (memory bomb)",
    why=("Ops such as ConstantOfShape, Expand, Tile, Resize, Range and Pad allocate outputs whose size "
         "comes from data. A few bytes of model can demand terabytes at run time and take the host down "
         "(or, with sizes near integer limits, trigger overflows in runtimes). Absurd dims declared on "
         "graph values and initializers do the same at load time. The gate computes these sizes at the "
         "pipeline's input shapes and refuses anything above 2**31 elements."),
    fix=("Re-export the model. If the op is legitimate, check the shapes you export with: no SD 1.5 "
         "component needs a tensor anywhere near this size."),
)

def _static(vi: onnx.ValueInfoProto) -> tuple[int, ...] | None:
    if not vi.type.HasField("tensor_type") or not vi.type.tensor_type.HasField("shape"):
        return None
    dims = []
    for d in vi.type.tensor_type.shape.dim:
        if not d.HasField("dim_value") or d.dim_value < 0:
            return None
        dims.append(d.dim_value)
    return tuple(dims)


class Shapes:
    """Static shapes by flat tensor id, read lazily from the shape-inferred structural copy."""

    def __init__(self, infos: dict[str, object]) -> None:
        self.infos, self.memo = infos, {}

    def get(self, tid: str | None) -> tuple[int, ...] | None:
        if tid is None:
            return None
        if tid not in self.memo:
            info = self.infos.get(tid)
            if info is None:
                self.memo[tid] = None
            elif isinstance(info, onnx.TensorProto):
                self.memo[tid] = tuple(info.dims)
            else:
                self.memo[tid] = _static(info)
        return self.memo[tid]


def inferred_shapes(ctx: ScanContext, path: str, model: onnx.ModelProto) -> Shapes:
    """Static shapes after shape inference at the pipeline's input shapes (cached per file)."""
    key = ("onnx-inferred-shapes", path)
    if key in ctx.cache:
        return ctx.cache[key]
    infos: dict[str, object] = {}

    def collect(graph: onnx.GraphProto, gpath: str) -> None:
        prefix = "" if gpath == MAIN else gpath + "::"
        for t in graph.initializer:
            infos[prefix + t.name] = t
        for vis in (graph.input, graph.value_info, graph.output):
            for vi in vis:
                infos[prefix + vi.name] = vi
        for i, node in enumerate(graph.node):
            if node.op_type in GRAPH_OPS or node.domain not in ("", "ai.onnx"):
                for attr in node.attribute:
                    if attr.type == onnx.AttributeProto.GRAPH:
                        collect(attr.g, f"{gpath}/{node_name(node, i)}.{attr.name}")

    try:
        inferred = onnx.shape_inference.infer_shapes(structural_bytes(ctx, path, model), check_type=False,
                                                     strict_mode=False, data_prop=True)
        collect(inferred.graph, MAIN)
    except (StructuralCopyError, Exception):  # noqa: BLE001 - inference failure: fold what we can
        pass
    ctx.cache[key] = shapes = Shapes(infos)
    return shapes


def flat_graph(ctx: ScanContext, path: str, model: onnx.ModelProto) -> FlatGraph:
    key = ("onnx-flat", path)
    if key not in ctx.cache:
        ctx.cache[key] = flatten(model)
    return ctx.cache[key]


def _declared(ix) -> Iterator[tuple[str, str, list]]:
    for gpath, graph in walk_graphs(ix):
        for kind, vis in (("input", graph.input), ("output", graph.output), ("value_info", graph.value_info)):
            for vi in vis:
                if vi.type.HasField("tensor_type") and vi.type.tensor_type.HasField("shape"):
                    dims = [d.dim_value for d in vi.type.tensor_type.shape.dim if d.HasField("dim_value")]
                    yield f"{gpath}/{kind} '{vi.name}'", vi.name, dims
        for t in graph.initializer:
            yield f"{gpath}/initializer '{t.name}'", t.name, list(t.dims)


def _bcast(a: tuple[int, ...], b: list[int]) -> list[int] | None:
    n = max(len(a), len(b))
    a2, b2 = [1] * (n - len(a)) + list(a), [1] * (n - len(b)) + list(b)
    out = []
    for x, y in zip(a2, b2):
        if x != y and x != 1 and y != 1:
            return None
        out.append(max(x, y))
    return out


def _ints(v) -> list[int] | None:
    if v is None:
        return None
    try:
        return [int(x) for x in np.asarray(v).ravel()]
    except (TypeError, ValueError, OverflowError):
        return None


def output_size(node, fold: ConstFolder, shape_of) -> tuple[int | None, dict]:
    """(elements of the node's first output, how it was computed) for the size-producing ops."""
    op, ins = node.op, node.inputs
    val = lambda i: fold.value(ins[i]) if len(ins) > i and ins[i] is not None else None  # noqa: E731
    shp = lambda i: shape_of(ins[i]) if len(ins) > i and ins[i] is not None else None  # noqa: E731
    if op == "ConstantOfShape":
        s = _ints(val(0))
        return (None, {}) if s is None else (_prod(s), {"shape": s})
    if op == "Expand":
        s, x = _ints(val(1)), shp(0)
        if s is None:
            return None, {}
        out = _bcast(x if x is not None else (), s)
        return (None, {}) if out is None else (_prod(out), {"input_shape": list(x or ()), "target": s, "output_shape": out})
    if op == "Tile":
        r, x = _ints(val(1)), shp(0)
        if r is None or x is None or len(r) != len(x):
            return None, {}
        out = [a * b for a, b in zip(x, r)]
        return _prod(out), {"input_shape": list(x), "repeats": r, "output_shape": out}
    if op in ("Resize", "Upsample"):
        x = shp(0)
        sizes = _ints(val(3)) if op == "Resize" else None
        if sizes:
            return _prod(sizes), {"sizes": sizes}
        scales = val(2) if op == "Resize" else (val(1) if len(ins) > 1 else None)
        if scales is None and node.proto is not None:
            scales = next((list(a.floats) for a in node.proto.attribute if a.name == "scales"), None)
        if scales is None or x is None:
            return None, {}
        sc = [float(s) for s in np.asarray(scales).ravel()]
        if len(sc) != len(x) or not all(math.isfinite(s) for s in sc):
            return None, {}
        out = [int(math.floor(a * s)) for a, s in zip(x, sc)]
        return _prod(out), {"input_shape": list(x), "scales": sc, "output_shape": out}
    if op == "Range":
        vs = [val(i) for i in range(3)]
        if any(v is None for v in vs):
            return None, {}
        start, limit, delta = (float(np.asarray(v).ravel()[0]) for v in vs)
        if delta == 0 or not all(math.isfinite(v) for v in (start, limit, delta)):
            return None, {}
        n = max(math.ceil((limit - start) / delta), 0)
        return n, {"start": start, "limit": limit, "delta": delta}
    if op == "Pad":
        x = shp(0)
        pads = _ints(val(1)) if len(ins) > 1 else None
        if pads is None and node.proto is not None:
            pads = next((list(a.ints) for a in node.proto.attribute if a.name in ("pads", "paddings")), None)
        if x is None or pads is None:
            return None, {}
        axes = _ints(val(3)) if len(ins) > 3 else None
        axes = axes if axes else list(range(len(x)))
        if len(pads) != 2 * len(axes):
            return None, {}
        out = list(x)
        for k, a in enumerate(axes):
            out[a] += pads[k] + pads[k + len(axes)]
        return _prod(out), {"input_shape": list(x), "pads": pads, "output_shape": out}
    return None, {}


def _prod(dims: list[int]) -> int:
    n = 1
    for d in dims:
        n *= max(int(d), 0)
    return n


SIZE_OPS = frozenset({"ConstantOfShape", "Expand", "Tile", "Resize", "Upsample", "Range", "Pad"})


@file_rule("*.onnx")
def check_bombs(ctx: ScanContext, path: str, blob: Blob) -> Iterator[Finding]:
    model = ctx.onnx(path)
    if model is None:
        return
    ix = cached_index(ctx, path, model)
    for where, name, dims in _declared(ix):
        if any(d < 0 for d in dims) or num_elements(dims) > ELEMENT_CAP:
            yield Finding(BOMB.id, BOMB.severity, path, where,
                          f"{name!r} declares dims {dims} ({num_elements(dims):.3g} elements, cap {ELEMENT_CAP})",
                          {"tensor": name, "dims": dims, "elements": num_elements(dims), "cap": ELEMENT_CAP})
    if not any(loc.node.op_type in SIZE_OPS for loc in ix.nodes):
        return
    shapes = inferred_shapes(ctx, path, model)
    fg = flat_graph(ctx, path, model)
    fold = ConstFolder(fg, static_shape=shapes.get)
    inputs = pipeline_input_shapes(ctx, path, model)
    for node in fg.nodes:
        if node.op not in SIZE_OPS or not node.outputs:
            continue
        inferred = shapes.get(node.outputs[0])
        n, how = output_size(node, fold, shapes.get)
        if n is None and inferred is not None:
            n, how = num_elements(inferred), {"inferred_shape": list(inferred)}
        if n is not None and n > ELEMENT_CAP:
            yield Finding(BOMB.id, BOMB.severity, path, node.where,
                          f"{node.op} output has {n:.3g} elements at the pipeline's input shapes (cap {ELEMENT_CAP})",
                          {"node": node.name, "op_type": node.op, "elements": n, "cap": ELEMENT_CAP,
                           **{k: v for k, v in how.items()}, "input_shapes": {k: list(v) for k, v in inputs.items()}})
