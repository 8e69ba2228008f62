"""Nearest x2 upsampling followed by a 3x3 conv (the UNet's and the VAE's upsamplers) runs as four 2x2
convs of the small image (engine.fuse UpsampleConv2x): same result, 4/9 of the multiply-adds."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from sdsecure.engine import create_session, layout
from sdsecure.engine.fuse import phase_filters
from sdsecure.engine.runtime import prepare_graph


def _conv3x3_reference(u: np.ndarray, w: np.ndarray) -> np.ndarray:
    """Plain 3x3, pad 1, stride 1 convolution of u [N, C, H, W] by w [F, C, 3, 3], in float64."""
    n, c, h, wd = u.shape
    p = np.pad(u.astype(np.float64), ((0, 0), (0, 0), (1, 1), (1, 1)))
    out = np.zeros((n, w.shape[0], h, wd))
    for r in range(3):
        for s in range(3):
            out += np.einsum("nchw,fc->nfhw", p[:, :, r:r + h, s:s + wd], w[:, :, r, s].astype(np.float64))
    return out


def test_the_four_phase_filters_compute_the_conv_of_the_upsampled_image() -> None:
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 3, 4, 5))
    w = rng.standard_normal((6, 3, 3, 3)).astype(np.float32)
    want = _conv3x3_reference(x.repeat(2, axis=2).repeat(2, axis=3), w)
    phases = phase_filters(w)
    assert [f.shape for f in phases] == [(6, 3, 2, 2)] * 4
    got = np.zeros_like(want)
    for (a, b), f in zip(((0, 0), (0, 1), (1, 0), (1, 1)), phases):
        # phase (a, b) reads source rows i-1+a, i+a and columns j-1+b, j+b
        p = np.pad(x, ((0, 0), (0, 0), (1 - a, a), (1 - b, b)))
        acc = sum(np.einsum("nchw,fc->nfhw", p[:, :, r:r + 4, s:s + 5], f[:, :, r, s].astype(np.float64))
                  for r in range(2) for s in range(2))
        got[:, :, a::2, b::2] = acc
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def _model(*, conv_attrs=None, scales=(1, 1, 2, 2), mode="nearest", bias=True, extra_reader=False):
    rng = np.random.default_rng(1)
    inits = [numpy_helper.from_array((rng.standard_normal((5, 3, 3, 3)) * 0.3).astype(np.float32), "k"),
             numpy_helper.from_array(rng.standard_normal(5).astype(np.float32), "b"),
             numpy_helper.from_array(np.array(scales, np.float32), "scales"),
             numpy_helper.from_array(np.zeros(0, np.float32), "roi")]
    attrs = {"pads": [1, 1, 1, 1]} if conv_attrs is None else conv_attrs
    nodes = [helper.make_node("Resize", ["x", "roi", "scales"], ["up"], name="up", mode=mode),
             helper.make_node("Conv", ["up", "k", "b"] if bias else ["up", "k"], ["y"], name="conv", **attrs)]
    outputs = [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)]
    if extra_reader:
        nodes.append(helper.make_node("Relu", ["up"], ["r"], name="relu"))
        outputs.append(helper.make_tensor_value_info("r", TensorProto.FLOAT, None))
    graph = helper.make_graph(nodes, "upsample", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3, 4, 6])],
                              outputs, inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    return model, {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}


def _fused(model, weights) -> bool:
    ops_ = [n.op_type for n in prepare_graph(model, weights, {"x": [2, 3, 4, 6]}).nodes]
    return "UpsampleConv2x" in ops_ and "Resize" not in ops_


@pytest.mark.parametrize("case, kwargs", [
    ("stride 2", {"conv_attrs": {"pads": [1, 1, 1, 1], "strides": [2, 2]}}),
    ("no padding", {"conv_attrs": {}}),
    ("dilation 2", {"conv_attrs": {"pads": [2, 2, 2, 2], "dilations": [2, 2]}}),
    ("x3 upsampling", {"scales": (1, 1, 3, 3)}),
    ("x2 on H only", {"scales": (1, 1, 2, 1)}),
    ("linear upsampling", {"mode": "linear"}),
    ("upsampled image read twice", {"extra_reader": True}),
])
def test_only_the_exact_pattern_is_rewritten(case, kwargs) -> None:
    assert _fused(*_model()) and _fused(*_model(bias=False))
    assert not _fused(*_model(**kwargs)), case


@pytest.mark.parametrize("channels_last", [True, False])
@pytest.mark.parametrize("bias", [True, False])
def test_upsample_conv_matches_onnxruntime(channels_last, bias, monkeypatch) -> None:
    monkeypatch.setattr(layout, "ENABLED", channels_last)
    model, weights = _model(bias=bias)
    x = np.random.default_rng(2).standard_normal((2, 3, 4, 6)).astype(np.float32)
    ref = create_session(model, weights, {"x": x.shape}, backend="onnxruntime").run({"x": x})["y"]
    out = create_session(model, weights, {"x": x.shape}, backend="max").run({"x": x})["y"]
    assert out.shape == (2, 5, 8, 12)
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5)
