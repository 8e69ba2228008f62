"""Wide 3x3 convs run as Winograd F(2x2, 3x3) (engine.winograd, rewritten by engine.fuse): the transform
algebra is checked in numpy, the rewrite only takes the convs it is meant for, and MAX's result matches
onnxruntime's direct conv."""

from __future__ import annotations

import re

import numpy as np
import pytest
from max.graph import DeviceRef
from onnx import TensorProto, helper, numpy_helper

from sdsecure.engine import create_session, fuse, layout, winograd
from sdsecure.engine.fuse import WINOGRAD_MIN_BLOCKS, WINOGRAD_MIN_WIDTH
from sdsecure.engine.importer import build_graph
from sdsecure.engine.runtime import prepare_graph
from tests.test_engine_upsample import _conv3x3_reference


def _winograd_numpy(x: np.ndarray, u: np.ndarray) -> np.ndarray:
    """What conv3x3_nhwc builds, in float64 numpy, on x [N, C, H, W]: tiles, Bt d B, products, At M A."""
    n, c, h, w = x.shape
    p = np.pad(x.astype(np.float64), ((0, 0), (0, 0), (1, 1), (1, 1)))
    bt, at = winograd.BT.astype(np.float64), winograd.AT.astype(np.float64)
    out = np.zeros((n, u.shape[2], h, w))
    for i in range(h // 2):
        for j in range(w // 2):
            d = p[:, :, 2 * i:2 * i + 4, 2 * j:2 * j + 4]                       # [N, C, 4, 4]
            v = np.einsum("rk,nckl,sl->nrsc", bt, d, bt).reshape(n, 16, c)
            m = np.einsum("ntc,tcf->ntf", v, u.astype(np.float64)).reshape(n, 4, 4, -1)
            out[:, :, 2 * i:2 * i + 2, 2 * j:2 * j + 2] = np.einsum("ar,nrsf,bs->nfab", at, m, at)
    return out


def test_the_transformed_filter_and_tiles_compute_the_3x3_conv() -> None:
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 3, 6, 4))
    w = rng.standard_normal((5, 3, 3, 3)).astype(np.float32)
    u = winograd.filters(w)
    assert u.shape == (16, 3, 5) and u.flags.c_contiguous
    np.testing.assert_allclose(_winograd_numpy(x, u), _conv3x3_reference(x, w), rtol=1e-5, atol=1e-5)


def test_a_filter_with_one_tap_transforms_to_the_outer_product_of_a_column_of_g() -> None:
    w = np.zeros((1, 1, 3, 3), np.float32)
    w[0, 0, 1, 2] = 1.0                        # only tap (row 1, column 2)
    u = winograd.filters(w)[:, 0, 0].reshape(4, 4)
    np.testing.assert_array_equal(u, np.outer(winograd.G[:, 1], winograd.G[:, 2]))


WIDE = 2 * WINOGRAD_MIN_WIDTH      # C = F = 320: C*F / (C+F) = 160, just wide enough


def _model(*, channels=WIDE, out_channels=None, size=(16, 16), batch=2, conv_attrs=None,
           kernel=3, group=1, bias=True):
    rng = np.random.default_rng(1)
    f = out_channels or channels
    inits = [numpy_helper.from_array((rng.standard_normal((f, channels // group, kernel, kernel)) * 0.1).astype(np.float32),
                                     "k"),
             numpy_helper.from_array(rng.standard_normal(f).astype(np.float32), "b")]
    attrs = {"pads": [kernel // 2] * 4} if conv_attrs is None else conv_attrs
    if group != 1:
        attrs["group"] = group
    node = helper.make_node("Conv", ["x", "k", "b"] if bias else ["x", "k"], ["y"], name="conv", **attrs)
    shape = [batch, channels, *size]
    graph = helper.make_graph([node], "conv", [helper.make_tensor_value_info("x", TensorProto.FLOAT, shape)],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    return model, {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}, shape


def _fused(model, weights, shape) -> bool:
    ops_ = [n.op_type for n in prepare_graph(model, weights, {"x": shape}).nodes]
    return ops_ == ["WinogradConv3x3"]


def test_the_smallest_conv_taken_has_enough_blocks_and_channels() -> None:
    # 2 x (8/2) x (8/2) = 32 output blocks; 320 channels in and out; and 512 -> 256 (width 171)
    assert 2 * 4 * 4 == WINOGRAD_MIN_BLOCKS
    assert _fused(*_model(size=(8, 8)))
    assert _fused(*_model(channels=512, out_channels=256))
    assert _fused(*_model()) and _fused(*_model(bias=False))


@pytest.mark.parametrize("case, kwargs", [
    ("too few blocks", {"batch": 1, "size": (8, 8)}),
    ("256 channels (width 128)", {"channels": 256}),
    ("320 -> 256 channels (width 142)", {"out_channels": 256}),
    ("many channels in, few out", {"channels": 2048, "out_channels": 128}),
    ("odd height", {"size": (17, 16)}),
    ("odd width", {"size": (16, 17)}),
    ("stride 2", {"conv_attrs": {"pads": [1, 1, 1, 1], "strides": [2, 2]}}),
    ("no padding", {"conv_attrs": {}}),
    ("dilation 2", {"conv_attrs": {"pads": [2, 2, 2, 2], "dilations": [2, 2]}}),
    ("grouped", {"group": 2}),
    ("1x1 filter", {"kernel": 1}),
])
def test_other_convs_are_left_as_they_are(case, kwargs) -> None:
    assert not _fused(*_model(**kwargs)), case


@pytest.mark.parametrize("channels_last, bias, size", [
    (True, True, (16, 20)), (True, False, (16, 20)), (False, True, (16, 20)), (False, False, (16, 20)),
    (True, True, (8, 8)),        # the fewest blocks taken (32)
])
def test_winograd_conv_matches_onnxruntime(channels_last, bias, size, monkeypatch) -> None:
    monkeypatch.setattr(layout, "ENABLED", channels_last)
    model, weights, shape = _model(bias=bias, out_channels=336, size=size)
    assert _fused(model, weights, shape)
    x = np.random.default_rng(2).standard_normal(shape).astype(np.float32)
    ref = create_session(model, weights, {"x": shape}, backend="onnxruntime").run({"x": x})["y"]
    out = create_session(model, weights, {"x": shape}, backend="max").run({"x": x})["y"]
    assert out.shape == (2, 336, *size)
    # sums of 2880 products: float32 rounding of either backend is about 1e-6 of the output's range
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5 * np.abs(ref).max())


def _chain_model():
    """conv -> Relu -> conv, both Winograd-sized: [2, 320, 16, 16]."""
    model, weights, shape = _model()
    rng = np.random.default_rng(3)
    k2 = (rng.standard_normal((WIDE, WIDE, 3, 3)) * 0.05).astype(np.float32)
    graph = model.graph
    graph.initializer.append(numpy_helper.from_array(k2, "k2"))
    graph.node[0].output[0] = "c1"
    graph.node.extend([helper.make_node("Relu", ["c1"], ["r"], name="relu"),
                       helper.make_node("Conv", ["r", "k2"], ["y"], name="conv2", pads=[1, 1, 1, 1])])
    weights["k2"] = k2
    return model, weights, shape


@pytest.mark.parametrize("channels_last, transposes", [(True, 2), (False, 4)])
def test_winograd_convs_keep_values_channels_last_between_them(channels_last, transposes, monkeypatch) -> None:
    monkeypatch.setattr(layout, "ENABLED", channels_last)
    model, weights, shape = _chain_model()
    folded = prepare_graph(model, weights, {"x": shape})
    assert [n.op_type for n in folded.nodes] == ["WinogradConv3x3", "Relu", "WinogradConv3x3"]
    graph, _ = build_graph(folded, DeviceRef.CPU(), graph_name="winograd_chain")
    # channels-last: x in and y out only; NCHW: a pair around each conv
    assert len(re.findall(r"mo\.transpose", str(graph))) == transposes


def test_a_chain_of_winograd_convs_matches_onnxruntime() -> None:
    model, weights, shape = _chain_model()
    x = np.random.default_rng(4).standard_normal(shape).astype(np.float32)
    ref = create_session(model, weights, {"x": shape}, backend="onnxruntime").run({"x": x})["y"]
    out = create_session(model, weights, {"x": shape}, backend="max").run({"x": x})["y"]
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5 * np.abs(ref).max())


def test_sdsecure_winograd_0_keeps_direct_convs(monkeypatch) -> None:
    monkeypatch.setattr(fuse, "WINOGRAD_ENABLED", False)
    model, weights, shape = _model()
    assert [n.op_type for n in prepare_graph(model, weights, {"x": shape}).nodes] == ["Conv"]
