"""ONNX-TENSOR-DUAL-DATA and ONNX-TENSOR-SIZE-MISMATCH."""

from __future__ import annotations

import numpy as np
from onnx import TensorProto, helper, numpy_helper

from samples import benign_mlp, by_rule, make_model, model_with_initializer, raw_tensor, scan_model, vi
from sdsecure.gate.report import Severity


def dual(name: str = "w") -> TensorProto:
    t = numpy_helper.from_array(np.ones(4, np.float32), name)      # raw_data: ones
    t.float_data.extend([9.0, 9.0, 9.0, 9.0])                       # typed data: nines
    return t


def test_raw_and_typed_data_is_high():
    f = by_rule(scan_model(model_with_initializer(dual())))["ONNX-TENSOR-DUAL-DATA"][0]
    assert f.severity == Severity.HIGH
    assert set(f.evidence["fields"]) == {"raw_data", "float_data"}


def test_dual_data_in_constant_attribute_and_subgraph_initializer():
    c = helper.make_node("Constant", [], ["w"], name="const_w", value=dual("v"))
    m = make_model([c, helper.make_node("Add", ["x", "w"], ["y"], name="add")],
                   [vi("x", TensorProto.FLOAT, [4])], [vi("y", TensorProto.FLOAT, [4])])
    f = by_rule(scan_model(m))["ONNX-TENSOR-DUAL-DATA"][0]
    assert f.where == "main/const_w (Constant).value"
    then_g = helper.make_graph([helper.make_node("Add", ["x", "sw"], ["t"], name="t")], "then", [],
                               [vi("t", TensorProto.FLOAT, [4])], [dual("sw")])
    else_g = helper.make_graph([helper.make_node("Identity", ["x"], ["e"], name="e")], "else", [],
                               [vi("e", TensorProto.FLOAT, [4])])
    m = make_model([helper.make_node("Constant", [], ["c"], name="c", value=helper.make_tensor("b", TensorProto.BOOL, [], [True])),
                    helper.make_node("If", ["c"], ["y"], name="if0", then_branch=then_g, else_branch=else_g)],
                   [vi("x", TensorProto.FLOAT, [4])], [vi("y", TensorProto.FLOAT, [4])])
    f = by_rule(scan_model(m))["ONNX-TENSOR-DUAL-DATA"][0]
    assert f.where == "main/if0.then_branch/initializer 'sw'"


def test_inline_and_external_data_at_once_is_dual():
    t = numpy_helper.from_array(np.ones(4, np.float32), "w")
    t.data_location = TensorProto.EXTERNAL
    e = t.external_data.add()
    e.key, e.value = "location", "weights.bin"
    f = by_rule(scan_model(model_with_initializer(t), extra={"weights.bin": b"\0" * 16}))["ONNX-TENSOR-DUAL-DATA"][0]
    assert "external" in f.evidence["fields"]


def test_raw_data_length_mismatch():
    for nbytes in (8, 20):
        t = raw_tensor("w", b"\0" * nbytes)
        f = by_rule(scan_model(model_with_initializer(t)))["ONNX-TENSOR-SIZE-MISMATCH"][0]
        assert f.evidence["expected_bytes"] == 16


def test_typed_data_count_mismatch_and_wrong_field():
    t = TensorProto(name="w", data_type=TensorProto.FLOAT, dims=[4])
    t.float_data.extend([1.0, 2.0, 3.0, 4.0, 5.0])
    assert "ONNX-TENSOR-SIZE-MISMATCH" in by_rule(scan_model(model_with_initializer(t)))
    t = TensorProto(name="w", data_type=TensorProto.FLOAT, dims=[4])
    t.int64_data.extend([1, 2, 3, 4])
    f = by_rule(scan_model(model_with_initializer(t)))["ONNX-TENSOR-SIZE-MISMATCH"][0]
    assert "int64_data" in f.message


def test_sparse_indices_out_of_range():
    values = numpy_helper.from_array(np.array([1.0, 2.0], np.float32), "sp")
    indices = numpy_helper.from_array(np.array([1, 999], np.int64), "sp_idx")
    sparse = helper.make_sparse_tensor(values, indices, [4])
    m = make_model([helper.make_node("Constant", [], ["w"], name="sparse_const", sparse_value=sparse),
                    helper.make_node("Add", ["x", "w"], ["y"], name="add")],
                   [vi("x", TensorProto.FLOAT, [4])], [vi("y", TensorProto.FLOAT, [4])])
    f = by_rule(scan_model(m))["ONNX-TENSOR-SIZE-MISMATCH"][0]
    assert f.evidence["first_bad_indices"] == [999]
    indices_ok = numpy_helper.from_array(np.array([1, 3], np.int64), "sp_idx")
    m.graph.node[0].attribute[0].sparse_tensor.indices.CopyFrom(indices_ok)
    assert "ONNX-TENSOR-SIZE-MISMATCH" not in by_rule(scan_model(m))


def test_consistent_tensors_pass():
    t = TensorProto(name="w", data_type=TensorProto.FLOAT16, dims=[4])
    t.int32_data.extend([0, 15360, 15360, 0])        # float16 values stored in int32_data
    assert by_rule(scan_model(model_with_initializer(t)), "ONNX-TENSOR") == {}
    assert by_rule(scan_model(benign_mlp()), "ONNX-TENSOR") == {}
