"""3x3 convs with few output pixels and big filters run as one matmul per tap (engine.tap_conv, rewritten
by engine.fuse): the tap layout is checked in numpy, the rewrite takes only the convs it is meant for, and
MAX's result matches onnxruntime's direct conv."""

from __future__ import annotations

import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper

from sdsecure.engine import create_session, fuse, layout, tap_conv
from sdsecure.engine.fuse import TAP_CONV_MAX_PIXELS, TAP_CONV_MIN_FILTER_BYTES
from sdsecure.engine.runtime import prepare_graph
from tests.test_engine_upsample import _conv3x3_reference
from tests.test_engine_winograd import _model as _conv_model

WIDE = 192            # 192 x 192 x 3 x 3 float32 = 1.3 MB: just over TAP_CONV_MIN_FILTER_BYTES


def _taps_numpy(x: np.ndarray, taps: np.ndarray) -> np.ndarray:
    """What conv_nhwc builds, in float64 numpy, on x [N, C, H, W]: sum over taps of shifted x times T[t],
    i.e. the 3x3 conv by the filter w[f, c, r, s] = T[3r + s, c, f]."""
    return _conv3x3_reference(x, taps.reshape(3, 3, *taps.shape[1:]).transpose(3, 2, 0, 1))


def test_the_taps_are_the_filter_columns_and_compute_the_conv() -> None:
    rng = np.random.default_rng(0)
    w = rng.standard_normal((5, 3, 3, 3)).astype(np.float32)
    taps = tap_conv.filters(w)
    assert taps.shape == (9, 3, 5) and taps.flags.c_contiguous
    np.testing.assert_array_equal(taps[5], w[:, :, 1, 2].T)      # row 1, column 2
    x = rng.standard_normal((2, 3, 4, 6))
    np.testing.assert_allclose(_taps_numpy(x, taps), _conv3x3_reference(x, w), rtol=1e-6, atol=1e-6)


def _model(**kwargs):
    """One Conv (bias b, pads 1) on [batch, channels, *size]: test_engine_winograd's model, 4x4 by default."""
    return _conv_model(**{"channels": WIDE, "size": (4, 4), **kwargs})


def _ops(model, weights, shape) -> list[str]:
    return [n.op_type for n in prepare_graph(model, weights, {"x": shape}).nodes]


def test_the_largest_output_taken_has_32_pixels_and_a_filter_of_1_mib() -> None:
    assert 2 * 4 * 4 == TAP_CONV_MAX_PIXELS and WIDE * WIDE * 9 * 4 >= TAP_CONV_MIN_FILTER_BYTES
    assert _ops(*_model()) == ["TapConv"]
    assert _ops(*_model(bias=False)) == ["TapConv"]
    assert _ops(*_model(batch=1, size=(2, 8), channels=1280, out_channels=320)) == ["TapConv"]


@pytest.mark.parametrize("case, kwargs", [
    ("64 output pixels", {"batch": 4}),
    ("filter under 1 MiB (160 x 160)", {"channels": 160}),
    ("stride 2", {"conv_attrs": {"pads": [1, 1, 1, 1], "strides": [2, 2]}}),
    ("no padding", {"conv_attrs": {}}),
    ("dilation 2", {"conv_attrs": {"pads": [2, 2, 2, 2], "dilations": [2, 2]}}),
    ("grouped", {"group": 2, "channels": 384}),
    ("1x1 filter", {"kernel": 1, "channels": 640}),
])
def test_other_convs_are_left_as_they_are(case, kwargs) -> None:
    assert _ops(*_model(**kwargs)) == ["Conv"], case


def test_sdsecure_tap_conv_0_keeps_direct_convs(monkeypatch) -> None:
    monkeypatch.setattr(fuse, "TAP_CONV_ENABLED", False)
    assert _ops(*_model()) == ["Conv"]


@pytest.mark.parametrize("channels_last, bias", [(True, True), (False, False)])
def test_tap_conv_matches_onnxruntime(channels_last, bias, monkeypatch) -> None:
    monkeypatch.setattr(layout, "ENABLED", channels_last)
    model, weights, shape = _model(bias=bias, out_channels=200, size=(4, 4))
    assert _ops(model, weights, shape) == ["TapConv"]
    x = np.random.default_rng(2).standard_normal(shape).astype(np.float32)
    ref = create_session(model, weights, {"x": shape}, backend="onnxruntime").run({"x": x})["y"]
    out = create_session(model, weights, {"x": shape}, backend="max").run({"x": x})["y"]
    assert out.shape == (2, 200, 4, 4)
    # sums of 1728 products: float32 rounding of either backend is about 1e-6 of the output's range
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5 * np.abs(ref).max())


def _upsample_model(*, channels=WIDE, size=(4, 4)):
    """Resize (nearest x2) -> Conv 3x3 pad 1, which engine.fuse turns into UpsampleConv2x."""
    rng = np.random.default_rng(5)
    inits = [numpy_helper.from_array((rng.standard_normal((channels, channels, 3, 3)) * 0.05).astype(np.float32), "k"),
             numpy_helper.from_array(rng.standard_normal(channels).astype(np.float32), "b"),
             numpy_helper.from_array(np.array([1, 1, 2, 2], np.float32), "scales"),
             numpy_helper.from_array(np.zeros(0, np.float32), "roi")]
    nodes = [helper.make_node("Resize", ["x", "roi", "scales"], ["up"], name="up", mode="nearest"),
             helper.make_node("Conv", ["up", "k", "b"], ["y"], name="conv", pads=[1, 1, 1, 1])]
    shape = [2, channels, *size]
    graph = helper.make_graph(nodes, "upsample", [helper.make_tensor_value_info("x", TensorProto.FLOAT, shape)],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    return model, {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}, shape


@pytest.mark.parametrize("kwargs, taps", [({}, True), ({"size": (4, 6)}, False), ({"channels": 160}, False)])
def test_an_upsampler_on_few_source_pixels_runs_its_phases_as_taps(kwargs, taps) -> None:
    model, weights, shape = _upsample_model(**kwargs)
    folded = prepare_graph(model, weights, {"x": shape})
    [node] = folded.nodes
    assert node.op_type == "UpsampleConv2x"
    assert any(a.name == "taps" and a.i == 1 for a in node.attribute) == taps
    c = shape[1]
    assert [folded.consts[i].shape for i in node.input[1:5]] == [(4, c, c) if taps else (c, c, 2, 2)] * 4


def test_an_upsampler_as_taps_matches_onnxruntime() -> None:
    model, weights, shape = _upsample_model()
    x = np.random.default_rng(6).standard_normal(shape).astype(np.float32)
    ref = create_session(model, weights, {"x": shape}, backend="onnxruntime").run({"x": x})["y"]
    out = create_session(model, weights, {"x": shape}, backend="max").run({"x": x})["y"]
    assert out.shape == (2, WIDE, 8, 8)
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5 * np.abs(ref).max())


def test_phase_taps_are_the_phase_filters_laid_out_as_taps() -> None:
    w = np.random.default_rng(7).standard_normal((300, 140, 3, 3)).astype(np.float32)   # 140: two channel chunks
    for as_taps, filt in zip(fuse.phase_taps(w), fuse.phase_filters(w)):
        np.testing.assert_allclose(as_taps, tap_conv.filters(filt), rtol=1e-6, atol=1e-6)


def test_new_filters_are_filled_in_the_background_with_the_right_values() -> None:
    model, weights, shape = _model()
    folded = prepare_graph(model, weights, {"x": shape})
    [node] = folded.nodes
    taps = folded.consts[node.input[1]]
    assert len(folded.filling) == 1 and taps.dtype == np.float32 and taps.flags.c_contiguous and taps.flags.writeable
    folded.wait_filled()
    np.testing.assert_array_equal(taps, tap_conv.filters(weights["k"]))


def test_a_failing_filter_computation_fails_the_session_not_the_process(monkeypatch) -> None:
    def broken(*args, **kwargs):
        raise MemoryError("no room for the taps")
    monkeypatch.setattr(tap_conv, "filters", broken)
    model, weights, shape = _model()
    with pytest.raises(MemoryError, match="no room for the taps"):
        create_session(model, weights, {"x": shape}, backend="max")
