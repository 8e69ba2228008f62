"""GroupNorm as torch exports it (Reshape -> InstanceNormalization -> Reshape -> Mul -> Add), on MAX vs
onnxruntime, at spatial sizes where MAX's fused layer_norm epilogue goes wrong if the per-channel affine
is applied through a reshape (2x2, 3x5: a SIMD vector of a row spans channels) and where it is safe
(8x8). One graph holds every case, so this is one compile."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from sdsecure.engine import create_session
from sdsecure.engine.fold import specialize
from sdsecure.engine.fuse import fuse

CASES = [((2, 16, 2, 2), 4), ((2, 32, 2, 2), 8), ((1, 12, 3, 5), 3), ((2, 16, 8, 8), 4), ((1, 8, 4, 4), 2)]


def _model() -> tuple[onnx.ModelProto, dict[str, np.ndarray], dict[str, tuple[int, ...]]]:
    rng = np.random.default_rng(1)
    nodes, inputs, outputs, inits = [], [], [], []
    for k, (shape, groups) in enumerate(CASES):
        n, c = shape[:2]
        x, y = f"x{k}", f"y{k}"
        inputs.append(helper.make_tensor_value_info(x, TensorProto.FLOAT, list(shape)))
        outputs.append(helper.make_tensor_value_info(y, TensorProto.FLOAT, list(shape)))
        inits += [numpy_helper.from_array(np.array([n, groups, -1], np.int64), f"s{k}"),
                  numpy_helper.from_array(np.ones(groups, np.float32), f"one{k}"),
                  numpy_helper.from_array(np.zeros(groups, np.float32), f"zero{k}"),
                  numpy_helper.from_array(np.array(shape, np.int64), f"back{k}"),
                  numpy_helper.from_array(rng.uniform(0.5, 1.5, (c, 1, 1)).astype(np.float32), f"gamma{k}"),
                  numpy_helper.from_array(rng.uniform(-1, 1, (c, 1, 1)).astype(np.float32), f"beta{k}")]
        nodes += [helper.make_node("Reshape", [x, f"s{k}"], [f"r{k}"]),
                  helper.make_node("InstanceNormalization", [f"r{k}", f"one{k}", f"zero{k}"], [f"i{k}"],
                                   epsilon=1e-5, name=f"gn{k}"),
                  helper.make_node("Reshape", [f"i{k}", f"back{k}"], [f"b{k}"]),
                  helper.make_node("Mul", [f"b{k}", f"gamma{k}"], [f"m{k}"]),
                  helper.make_node("Add", [f"m{k}", f"beta{k}"], [y])]
    graph = helper.make_graph(nodes, "groupnorms", inputs, outputs, inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 14)])
    weights = {t.name: numpy_helper.to_array(t) for t in inits}
    return model, weights, {f"x{k}": shape for k, (shape, _) in enumerate(CASES)}


def test_the_pattern_is_fused() -> None:
    model, weights, shapes = _model()
    folded = fuse(specialize(model, weights, shapes))
    assert [n.op_type for n in folded.nodes] == ["GroupNorm"] * len(CASES)


def test_group_norm_matches_onnxruntime_at_every_spatial_size() -> None:
    model, weights, shapes = _model()
    rng = np.random.default_rng(2)
    feeds = {name: rng.standard_normal(shape).astype(np.float32) for name, shape in shapes.items()}
    got = create_session(model, weights, shapes, name="groupnorms").run(feeds)
    want = create_session(model, weights, shapes, backend="onnxruntime").run(feeds)
    for k, (shape, groups) in enumerate(CASES):
        diff = float(np.abs(got[f"y{k}"] - want[f"y{k}"]).max())
        assert diff < 1e-5, f"{shape} in {groups} groups: max abs diff {diff:.3g}"
