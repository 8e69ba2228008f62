"""Channels-last propagation (engine.layout): a ResNet/attention-shaped graph gives onnxruntime's
results, and the MAX graph has fewer permutes than with a permute pair around every Conv."""

from __future__ import annotations

import re

import numpy as np
import onnx
import pytest
from max.graph import DeviceRef
from onnx import TensorProto, helper, numpy_helper

from sdsecure.engine import create_session, layout
from sdsecure.engine.importer import build_graph
from sdsecure.engine.runtime import prepare_graph

C, H = 8, 8


def _f32(name: str, shape) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, TensorProto.FLOAT, shape)


def _block_model() -> tuple[onnx.ModelProto, dict[str, np.ndarray]]:
    """GroupNorm (legacy export pattern) -> SiLU -> Conv -> + time embedding -> GroupNorm -> + skip -> 2x nearest
    Resize -> Conv -> Concat with the upsampled skip -> transformer-style Transpose/Reshape/MatMul and
    back -> 1x1 Conv. Outputs: the result and an intermediate value read in NCHW by the caller."""
    rng = np.random.default_rng(0)

    def w(name, *shape, scale=0.2):
        return numpy_helper.from_array((rng.standard_normal(shape) * scale).astype(np.float32), name)

    inits = [
        numpy_helper.from_array(np.array([1, 4, -1], np.int64), "gshape"),
        numpy_helper.from_array(np.array([1, C, H, H], np.int64), "xshape"),
        numpy_helper.from_array(np.ones(4, np.float32), "ones4"),
        numpy_helper.from_array(np.zeros(4, np.float32), "zeros4"),
        w("gamma", C, 1, 1), w("beta", C, 1, 1), w("k1", C, C, 3, 3), w("b1", C), w("temb", 1, C, 1, 1),
        numpy_helper.from_array(np.array([1, 1, 2, 2], np.float32), "scales"),
        numpy_helper.from_array(np.zeros(0, np.float32), "roi"),
        w("k2", C, C, 3, 3), w("b2", C),
        numpy_helper.from_array(np.array([1, 4 * H * H, 2 * C], np.int64), "tokens"),
        w("proj", 2 * C, 2 * C),
        numpy_helper.from_array(np.array([1, 2 * H, 2 * H, 2 * C], np.int64), "grid"),
        w("k3", C, 2 * C, 1, 1), w("b3", C),
    ]
    N = helper.make_node
    nodes = [
        N("Reshape", ["x", "gshape"], ["g0"]), N("InstanceNormalization", ["g0", "ones4", "zeros4"], ["g1"], epsilon=1e-5),
        N("Reshape", ["g1", "xshape"], ["g2"]), N("Mul", ["g2", "gamma"], ["g3"]), N("Add", ["g3", "beta"], ["gn"]),
        N("Sigmoid", ["gn"], ["sg"]), N("Mul", ["gn", "sg"], ["silu"]),
        N("Conv", ["silu", "k1", "b1"], ["c1"], pads=[1, 1, 1, 1]),
        N("Add", ["c1", "temb"], ["t1"]),
        # a second GroupNorm, on a value that is channels-last by now
        N("Reshape", ["t1", "gshape"], ["h0"]), N("InstanceNormalization", ["h0", "ones4", "zeros4"], ["h1"], epsilon=1e-5),
        N("Reshape", ["h1", "xshape"], ["h2"]), N("Mul", ["h2", "gamma"], ["h3"]), N("Add", ["h3", "beta"], ["gn2"]),
        N("Add", ["gn2", "x"], ["res"]),
        N("Resize", ["res", "roi", "scales"], ["up"], mode="nearest"),
        N("Conv", ["up", "k2", "b2"], ["c2"], pads=[1, 1, 1, 1]),
        N("Resize", ["x", "roi", "scales"], ["xup"], mode="nearest"),
        N("Concat", ["c2", "xup"], ["cat"], axis=1),
        N("Transpose", ["cat"], ["nhwc"], perm=[0, 2, 3, 1]), N("Reshape", ["nhwc", "tokens"], ["tok"]),
        N("MatMul", ["tok", "proj"], ["mm"]), N("Reshape", ["mm", "grid"], ["grid4"]),
        N("Transpose", ["grid4"], ["back"], perm=[0, 3, 1, 2]),
        N("Conv", ["back", "k3", "b3"], ["y"]),
    ]
    graph = helper.make_graph(nodes, "block", [_f32("x", [1, C, H, H])], [_f32("y", None), _f32("res", None)], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    return model, {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}


def _graph_text(model, weights, enabled: bool, monkeypatch) -> str:
    monkeypatch.setattr(layout, "ENABLED", enabled)
    folded = prepare_graph(model, weights, {"x": [1, C, H, H]})
    graph, _ = build_graph(folded, DeviceRef.CPU(), graph_name="layout_count")
    return str(graph)


def _permutes(model, weights, enabled: bool, monkeypatch) -> int:
    return len(re.findall(r"mo\.transpose", _graph_text(model, weights, enabled, monkeypatch)))


def test_channels_last_removes_permutes_between_convs(monkeypatch) -> None:
    model, weights = _block_model()
    plain = _permutes(model, weights, False, monkeypatch)
    channels_last = _permutes(model, weights, True, monkeypatch)
    # NCHW: a pair per Conv (6) + the graph's 2 Transposes. Channels-last: x in; the outputs res and
    # the concat handed to Reshape out; the 1x1 conv's result out; x's upsampling reads x in NHWC.
    assert plain == 8
    assert channels_last < plain
    assert channels_last <= 4
    # the second GroupNorm runs channels-last (reductions), the first (on the NCHW input) as layer_norm
    text = _graph_text(model, weights, True, monkeypatch)
    assert len(re.findall(r"mo\.reduce\.layer_norm|mo\.layer_norm", text)) == 1
    assert len(re.findall(r"mo\.reduce\.mean", text)) == 6      # (W, H, group) x (mean, variance)


@pytest.mark.parametrize("enabled", [True, False])
def test_channels_last_matches_onnxruntime(enabled, monkeypatch) -> None:
    monkeypatch.setattr(layout, "ENABLED", enabled)
    model, weights = _block_model()
    x = np.random.default_rng(1).standard_normal((1, C, H, H)).astype(np.float32) * 2 + 1
    ref = create_session(model, weights, {"x": x.shape}, backend="onnxruntime").run({"x": x})
    out = create_session(model, weights, {"x": x.shape}, backend="max").run({"x": x})
    for name in ("y", "res"):
        np.testing.assert_allclose(out[name], ref[name], rtol=1e-4, atol=1e-5, err_msg=name)
