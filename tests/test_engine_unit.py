"""Engine behaviour that needs no MAX compile: folding caps, unsupported-op reports, input checks,
deterministic graphs (the compile cache key), and the onnxruntime backend never reading from disk."""

from __future__ import annotations

import re
import subprocess
import sys
import textwrap

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from sdsecure.engine import create_session
from sdsecure.engine.fold import FoldLimitError, SpecializeError, specialize
from sdsecure.engine.importer import build_graph, check_supported
from sdsecure.engine.runtime import graph_sha256
from sdsecure.errors import UnsupportedOpError, UserError


def _model(nodes, inputs, outputs, initializers=(), opset=17, name="m") -> onnx.ModelProto:
    graph = helper.make_graph(nodes, name, inputs, outputs, list(initializers))
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])


def _weights(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    return {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}


def _f32(name: str, shape) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, TensorProto.FLOAT, shape)


# -- folding -------------------------------------------------------------------------------------
def test_constant_of_shape_bomb_is_refused_before_allocating() -> None:
    shape = numpy_helper.from_array(np.array([200_000, 200_000], np.int64), "shape")
    m = _model([helper.make_node("ConstantOfShape", ["shape"], ["big"], name="bomb"),
                helper.make_node("Add", ["x", "big"], ["y"])],
               [_f32("x", [1])], [_f32("y", None)], [shape])
    with pytest.raises(FoldLimitError, match="bomb") as e:
        specialize(m, _weights(m), {"x": [1]})
    assert isinstance(e.value, UserError)


def test_expand_bomb_over_the_fold_cap_is_refused() -> None:
    one = numpy_helper.from_array(np.ones((1, 1), np.float32), "one")
    shape = numpy_helper.from_array(np.array([8192, 8192], np.int64), "shape")  # 256 MiB from 4 bytes
    m = _model([helper.make_node("Expand", ["one", "shape"], ["big"], name="expand_bomb"),
                helper.make_node("Mul", ["x", "big"], ["y"])],
               [_f32("x", [1, 1])], [_f32("y", None)], [one, shape])
    with pytest.raises(FoldLimitError, match="expand_bomb.*cap"):
        specialize(m, _weights(m), {"x": [1, 1]})


def test_any_tensor_over_the_tensor_cap_is_refused() -> None:
    m = _model([helper.make_node("Relu", ["x"], ["y"])], [_f32("x", ["n", "m"])], [_f32("y", None)])
    with pytest.raises(FoldLimitError):
        specialize(m, {}, {"x": [1 << 16, 1 << 16]}, tensor_cap_bytes=1 << 30)


def test_folding_removes_shape_arithmetic_and_keeps_values() -> None:
    # y = Reshape(x, Concat(Shape(x)[0], -1)): the shape chain folds, the Reshape stays
    nodes = [helper.make_node("Shape", ["x"], ["s"]),
             helper.make_node("Gather", ["s", "zero"], ["b"], axis=0),
             helper.make_node("Unsqueeze", ["b", "axes"], ["b1"]),
             helper.make_node("Concat", ["b1", "minus1"], ["target"], axis=0),
             helper.make_node("Reshape", ["x", "target"], ["y"])]
    inits = [numpy_helper.from_array(np.array(0, np.int64), "zero"),
             numpy_helper.from_array(np.array([0], np.int64), "axes"),
             numpy_helper.from_array(np.array([-1], np.int64), "minus1")]
    m = _model(nodes, [_f32("x", ["b", 3, 4])], [_f32("y", None)], inits)
    folded = specialize(m, _weights(m), {"x": [2, 3, 4]})
    assert [n.op_type for n in folded.nodes] == ["Reshape"]
    assert folded.consts["target"].tolist() == [2, -1]
    assert folded.infos["y"].shape == (2, 12)


def test_large_weight_transform_is_left_to_the_runtime_not_copied() -> None:
    w = numpy_helper.from_array(np.ones((1025, 1024), np.float32), "w")   # 4 MiB, over a 1 MiB cap
    m = _model([helper.make_node("Transpose", ["w"], ["wt"], perm=[1, 0]),
                helper.make_node("MatMul", ["x", "wt"], ["y"])],
               [_f32("x", [1, 1024])], [_f32("y", None)], [w])
    folded = specialize(m, _weights(m), {"x": [1, 1024]}, fold_cap_bytes=1 << 20)
    assert [n.op_type for n in folded.nodes] == ["Transpose", "MatMul"]
    assert "wt" not in folded.consts


def test_missing_input_shape_and_unknown_input_are_user_errors() -> None:
    m = _model([helper.make_node("Relu", ["x"], ["y"])], [_f32("x", ["n"])], [_f32("y", None)])
    with pytest.raises(SpecializeError, match="no shape given for input 'x'"):
        specialize(m, {}, {})
    with pytest.raises(SpecializeError, match="no graph input named 'z'"):
        specialize(m, {}, {"x": [2], "z": [1]})
    fixed = _model([helper.make_node("Relu", ["x"], ["y"])], [_f32("x", [3])], [_f32("y", None)])
    with pytest.raises(SpecializeError, match="fixed"):
        specialize(fixed, {}, {"x": [2]})


def test_weights_must_match_the_declared_initializers() -> None:
    w = numpy_helper.from_array(np.ones((2, 2), np.float32), "w")
    m = _model([helper.make_node("MatMul", ["x", "w"], ["y"])], [_f32("x", [1, 2])], [_f32("y", None)], [w])
    with pytest.raises(SpecializeError, match="initializer 'w'"):
        specialize(m, {"w": np.ones((3, 2), np.float32)}, {"x": [1, 2]})


# -- unsupported ops -----------------------------------------------------------------------------
def test_every_unsupported_node_is_listed_before_any_compile(monkeypatch) -> None:
    import sdsecure.engine.runtime as runtime

    def no_compile(*_a, **_k):
        raise AssertionError("compiled despite unsupported ops")

    monkeypatch.setattr(runtime, "_inference_session", no_compile)
    nodes = [helper.make_node("Relu", ["x"], ["a"], name="fine"),
             helper.make_node("NonZero", ["a"], ["nz"], name="dyn_shape"),
             helper.make_node("Evil", ["a"], ["b"], name="custom_op", domain="com.attacker"),
             helper.make_node("Resize", ["a", "", "", "sizes"], ["c"], name="resize_policy",
                              keep_aspect_ratio_policy="not_larger"),
             helper.make_node("Conv", ["x5", "w5"], ["d"], name="conv3d")]
    sizes = numpy_helper.from_array(np.array([1, 1, 4, 4], np.int64), "sizes")
    w5 = numpy_helper.from_array(np.ones((1, 1, 1, 1, 1), np.float32), "w5")
    graph = helper.make_graph(nodes, "g", [_f32("x", [1, 1, 2, 2]), _f32("x5", [1, 1, 2, 2, 2])],
                              [_f32("nz", None), _f32("b", None), _f32("c", None), _f32("d", None)], [sizes, w5])
    m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 19), helper.make_opsetid("com.attacker", 1)])
    with pytest.raises(UnsupportedOpError) as e:
        create_session(m, _weights(m), {"x": [1, 1, 2, 2], "x5": [1, 1, 2, 2, 2]}, name="unet")
    msg = str(e.value)
    for part in ("'unet'", "4 node(s)", "NonZero", "dyn_shape", "com.attacker.Evil", "custom_op",
                 "keep_aspect_ratio_policy", "resize_policy", "3-D convolution", "conv3d"):
        assert part in msg, part
    assert "fine" not in msg
    assert "\n" not in msg


def test_unsupported_attribute_is_reported_not_ignored() -> None:
    m = _model([helper.make_node("ArgMax", ["x"], ["y"], name="am", keepdims=0, axis=0),
                helper.make_node("Gelu", ["x"], ["g"], name="gelu_fast", approximate="fast")],
               [_f32("x", [3])], [helper.make_tensor_value_info("y", TensorProto.INT64, None), _f32("g", None)],
               opset=20)
    with pytest.raises(UnsupportedOpError, match="gelu_fast.*approximate='fast'"):
        check_supported(specialize(m, {}, {"x": [3]}))


def test_input_needed_as_constant_is_reported() -> None:
    m = _model([helper.make_node("Reshape", ["x", "shape"], ["y"], name="dyn_reshape"),
                helper.make_node("Relu", ["y"], ["z"], name="after")],
               [_f32("x", [4]), helper.make_tensor_value_info("shape", TensorProto.INT64, [2])], [_f32("z", None)])
    with pytest.raises(UnsupportedOpError, match="dyn_reshape.*must be constant") as e:
        check_supported(specialize(m, {}, {"x": [4], "shape": [2]}))
    assert "1 node(s)" in str(e.value)   # the Relu downstream is a consequence, not listed


# -- determinism: the compile cache key ----------------------------------------------------------
def _small_model() -> onnx.ModelProto:
    w = numpy_helper.from_array(np.arange(12, dtype=np.float32).reshape(3, 4), "w")
    eps = numpy_helper.from_array(np.array(1e-5, np.float32), "eps")
    return _model([helper.make_node("MatMul", ["x", "w"], ["h"]),
                   helper.make_node("Add", ["h", "eps"], ["y"])],
                  [_f32("x", ["b", 3])], [_f32("y", None)], [w, eps], name="small")


def test_graph_text_is_deterministic_across_processes() -> None:
    from max.graph import DeviceRef

    m = _small_model()
    g, weights = build_graph(specialize(m, _weights(m), {"x": [2, 3]}), DeviceRef.CPU(), "sdsecure_small")
    assert set(weights) == {"w"}
    code = textwrap.dedent(f"""
        import numpy as np, onnx
        from onnx import numpy_helper
        from max.graph import DeviceRef
        from sdsecure.engine.fold import specialize
        from sdsecure.engine.importer import build_graph
        from sdsecure.engine.runtime import graph_sha256
        m = onnx.load_model_from_string(bytes.fromhex({m.SerializeToString().hex()!r}))
        w = {{t.name: numpy_helper.to_array(t) for t in m.graph.initializer}}
        g, _ = build_graph(specialize(m, w, {{"x": [2, 3]}}), DeviceRef.CPU(), "sdsecure_small")
        print(graph_sha256(g))
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={"PYTHONHASHSEED": "12345", **_env()})
    assert out.stdout.strip() == graph_sha256(g)
    other, _ = build_graph(specialize(m, _weights(m), {"x": [5, 3]}), DeviceRef.CPU(), "sdsecure_small")
    assert graph_sha256(other) != graph_sha256(g)  # shapes are part of the key


def _env() -> dict[str, str]:
    import os

    return {k: v for k, v in os.environ.items() if k != "PYTHONHASHSEED"}


def test_rank0_constants_stay_rank0_in_the_graph() -> None:
    """max_notes G5: a 0-d ONNX constant must not become a [1] tensor (breaks fused layer norm)."""
    from max.graph import DeviceRef

    m = _small_model()
    g, _ = build_graph(specialize(m, _weights(m), {"x": [2, 3]}), DeviceRef.CPU(), "sdsecure_small")
    text = str(g)
    assert "tensor<[], f32>" in text
    assert not re.search(r"tensor<\[1\],\s*f32>", text)


# -- sessions: input checks, onnxruntime without files -------------------------------------------
def test_onnxruntime_backend_reads_external_weights_from_memory_only(tmp_path) -> None:
    w = np.arange(12, dtype=np.float32).reshape(3, 4)
    m = _model([helper.make_node("MatMul", ["x", "w"], ["y"])], [_f32("x", ["b", 3])], [_f32("y", None)],
               [numpy_helper.from_array(w, "w")])
    onnx.save_model(m, tmp_path / "model.onnx", save_as_external_data=True, all_tensors_to_one_file=True,
                    location="weights.pb", size_threshold=0)
    (tmp_path / "weights.pb").unlink()          # nothing on disk to read
    proto = onnx.load(tmp_path / "model.onnx", load_external_data=False)
    view = np.frombuffer(w.tobytes(), np.float32).reshape(3, 4)   # read-only, like the gate's views
    sess = create_session(proto, {"w": view}, {"x": [2, 3]}, backend="onnxruntime")
    x = np.ones((2, 3), np.float32)
    np.testing.assert_allclose(sess.run({"x": x})["y"], x @ w)


def test_run_rejects_wrong_inputs() -> None:
    m = _model([helper.make_node("Relu", ["x"], ["y"])], [_f32("x", ["n"])], [_f32("y", None)])
    sess = create_session(m, {}, {"x": [3]}, backend="onnxruntime")
    with pytest.raises(UserError, match="shape"):
        sess.run({"x": np.ones(4, np.float32)})
    with pytest.raises(UserError, match="do not match"):
        sess.run({"z": np.ones(3, np.float32)})
    with pytest.raises(UserError, match="float32"):
        sess.run({"x": np.ones(3, np.complex64)})
    np.testing.assert_array_equal(sess.run({"x": np.array([-1, 0, 2], np.float64)})["y"], [0, 0, 2])


def test_unknown_backend() -> None:
    with pytest.raises(UserError, match="unknown backend"):
        create_session(_small_model(), {}, {"x": [1, 3]}, backend="tpu")
