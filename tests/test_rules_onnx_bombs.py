"""ONNX-SHAPE-BOMB: sizes computed statically at the pipeline's input shapes."""

from __future__ import annotations

import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper

from samples import (benign_ocr, benign_size_ops, benign_vad, by_rule, const, make_model, scan_folder, scan_model,
                     sd_pipeline_folder, shape_bomb, vi)
from sdsecure.gate.report import Severity
from sdsecure.gate.rules.onnx_bombs import ELEMENT_CAP


@pytest.mark.parametrize("kind", ["constantofshape", "expand", "tile", "resize", "range", "pad"])
def test_size_producing_ops_over_the_cap(kind):
    found = by_rule(scan_model(shape_bomb(kind)), "ONNX-SHAPE-BOMB")["ONNX-SHAPE-BOMB"]
    f = found[0]
    assert f.severity == Severity.HIGH
    assert f.evidence["elements"] > ELEMENT_CAP
    assert f.where.startswith("main/bomb (")


def test_absurd_declared_dims():
    f = by_rule(scan_model(shape_bomb("declared")), "ONNX-SHAPE-BOMB")["ONNX-SHAPE-BOMB"][0]
    assert f.evidence["dims"] == [1 << 20, 1 << 20]


def test_size_computed_from_the_input_shape_depends_on_the_pipeline_shapes():
    """ConstantOfShape(Shape(x) * 4096): fine at batch 1 for a generic model, a bomb when the
    pipeline feeds x with 100000 rows."""
    nodes = [helper.make_node("Shape", ["x"], ["s"], name="shape"),
             const("k", [4096, 4096], np.int64),
             helper.make_node("Mul", ["s", "k"], ["s2"], name="scale"),
             helper.make_node("ConstantOfShape", ["s2"], ["z"], name="fill",
                              value=numpy_helper.from_array(np.array([0], np.float32))),
             helper.make_node("ReduceSum", ["z"], ["y"], name="sum", keepdims=0)]
    m = make_model(nodes, [vi("x", TensorProto.FLOAT, ["N", 16])], [vi("y", TensorProto.FLOAT, [])])
    assert "ONNX-SHAPE-BOMB" not in by_rule(scan_model(m))          # 1*4096 x 16*4096 = 2**28
    found = by_rule(scan_model(m, input_shapes={"model.onnx": {"x": (100000, 16)}}))
    assert found["ONNX-SHAPE-BOMB"][0].evidence["shape"] == [100000 * 4096, 16 * 4096]


def test_bomb_inside_a_loop_body_is_found():
    body = helper.make_graph([
        helper.make_node("Identity", ["c_in"], ["c_out"], name="keep"),
        const("huge", [1 << 20, 1 << 20], np.int64),
        helper.make_node("ConstantOfShape", ["huge"], ["z"], name="inner_bomb",
                         value=numpy_helper.from_array(np.array([0], np.float32))),
        helper.make_node("ReduceSum", ["z"], ["acc_out"], name="sum", keepdims=0),
    ], "body", [vi("i", TensorProto.INT64, []), vi("c_in", TensorProto.BOOL, []), vi("acc_in", TensorProto.FLOAT, [])],
        [vi("c_out", TensorProto.BOOL, []), vi("acc_out", TensorProto.FLOAT, [])])
    m = make_model([const("n", 2, np.int64), const("t", True, np.bool_), const("a0", 0.0, np.float32),
                    helper.make_node("Loop", ["n", "t", "a0"], ["y"], name="loop", body=body)],
                   [vi("x", TensorProto.FLOAT, [1])], [vi("y", TensorProto.FLOAT, [])])
    f = by_rule(scan_model(m), "ONNX-SHAPE-BOMB")["ONNX-SHAPE-BOMB"][0]
    assert f.where == "main/loop.body/inner_bomb (ConstantOfShape)"


def test_benign_sizes_pass():
    for m in (benign_size_ops(), benign_ocr(), benign_vad()):
        assert "ONNX-SHAPE-BOMB" not in by_rule(scan_model(m))


def test_fixture_pipelines_have_no_bombs_at_sd_shapes():
    for kind in ("legacy", "dynamo"):
        assert "ONNX-SHAPE-BOMB" not in by_rule(scan_folder(sd_pipeline_folder(kind))), kind
