"""onnx_wire: raw_data lengths read from the wire format must equal len(t.raw_data) as upb parses it,
and anything the walk cannot vouch for must give None (callers then use the exact path)."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from sdsecure.gate import onnx_wire
from sdsecure.gate.onnx_wire import _varint_bytes as _varint
from sdsecure.gate.onnx_wire import initializer_raw_lengths


def _model(inits) -> onnx.ModelProto:
    out = helper.make_tensor_value_info("y", TensorProto.FLOAT, None)
    node = helper.make_node("Identity", [inits[0].name], ["y"])
    return helper.make_model(helper.make_graph([node], "g", [], [out], inits))


def _parsed(data: bytes) -> onnx.ModelProto:
    m = onnx.ModelProto()
    m.ParseFromString(data)
    return m


def test_lengths_match_upb_for_raw_typed_and_empty_tensors() -> None:
    inits = [numpy_helper.from_array(np.arange(12, dtype=np.float32).reshape(3, 4), "raw"),
             helper.make_tensor("typed", TensorProto.FLOAT, [2], [1.0, 2.0]),
             helper.make_tensor("empty_raw", TensorProto.FLOAT, [0], b"", raw=True),
             numpy_helper.from_array(np.zeros(300_000, np.float32), "big")]
    data = _model(inits).SerializeToString()
    model = _parsed(data)
    got = initializer_raw_lengths(data, model)
    want = [len(t.raw_data) if t.HasField("raw_data") else None for t in model.graph.initializer]
    assert got == want == [48, None, 0, 1_200_000]


def test_repeated_raw_data_field_last_one_wins_like_upb() -> None:
    t = numpy_helper.from_array(np.ones(4, np.float32), "w")
    extra = TensorProto(raw_data=b"\x00" * 40)          # appended bytes merge into the same tensor
    t_bytes = t.SerializeToString() + extra.SerializeToString()
    graph = helper.make_graph([helper.make_node("Identity", ["w"], ["y"])], "g", [],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)])
    g_bytes = graph.SerializeToString() + b"\x2a" + _varint(len(t_bytes)) + t_bytes   # field 5, wire 2
    data = helper.make_model(helper.make_graph([], "x", [], [])).SerializeToString()
    data = _without_graph(data) + b"\x3a" + _varint(len(g_bytes)) + g_bytes          # field 7, wire 2
    model = _parsed(data)
    assert len(model.graph.initializer[0].raw_data) == 40
    assert initializer_raw_lengths(data, model) == [40]


def test_graph_given_twice_is_left_to_the_exact_path() -> None:
    data = _model([numpy_helper.from_array(np.ones(4, np.float32), "w")]).SerializeToString()
    extra = onnx.ModelProto(graph=helper.make_graph([], "more", [], [],
                                                    [numpy_helper.from_array(np.ones(2, np.float32), "v")]))
    data2 = data + extra.SerializeToString()            # protobuf merges both graph fields
    model = _parsed(data2)
    assert [t.name for t in model.graph.initializer] == ["w", "v"]
    assert initializer_raw_lengths(data2, model) is None


def test_disagreement_with_the_parsed_model_gives_none() -> None:
    data = _model([numpy_helper.from_array(np.ones(4, np.float32), "w")]).SerializeToString()
    other = _parsed(_model([numpy_helper.from_array(np.ones(4, np.float32), "v")]).SerializeToString())
    assert initializer_raw_lengths(data, other) is None
    assert initializer_raw_lengths(data[:-3], _parsed(data)) is None       # truncated: malformed


def test_work_is_bounded(monkeypatch) -> None:
    data = _model([numpy_helper.from_array(np.ones(4, np.float32), "w")]).SerializeToString()
    model = _parsed(data)
    assert initializer_raw_lengths(data, model) == [16]
    monkeypatch.setattr(onnx_wire, "_MAX_FIELDS", 3)
    assert initializer_raw_lengths(data, model) is None


def test_the_gate_uses_the_walk_and_still_finds_size_mismatches(tmp_path) -> None:
    """ONNX-TENSOR-SIZE-MISMATCH still fires with lengths taken from the wire walk."""
    from sdsecure.gate import audit
    from sdsecure.gate.onnx_graph import cached_index
    from sdsecure.gate.rules import ScanContext
    from sdsecure.gate.blob import Blob

    bad = numpy_helper.from_array(np.ones(4, np.float32), "w")
    bad.raw_data = b"\x00" * 12                          # 3 floats for dims [4]
    data = _model([bad]).SerializeToString()
    ctx = ScanContext("m", {"m.onnx": Blob.from_bytes(data)}, False)
    ix = cached_index(ctx, "m.onnx", ctx.onnx("m.onnx"))
    assert ix.init_raw_len == [12] and ix.tensors[0].raw_len == 12
    (tmp_path / "m.onnx").write_bytes(data)
    ids = {f.rule for f in audit(str(tmp_path / "m.onnx"), progress=False).report.findings}
    assert "ONNX-TENSOR-SIZE-MISMATCH" in ids


def _without_graph(data: bytes) -> bytes:
    m = onnx.ModelProto()
    m.ParseFromString(data)
    m.ClearField("graph")
    return m.SerializeToString()


# -- the light copy the rules parse ---------------------------------------------------------------------

def _big(name: str, n: int = 300_000) -> onnx.TensorProto:
    return numpy_helper.from_array(np.arange(n, dtype=np.float32), name)


def test_light_copy_drops_only_large_consistent_payloads() -> None:
    from sdsecure.gate.onnx_graph import wire_initializers

    inconsistent = _big("inconsistent")
    inconsistent.dims[0] = 10                             # 1.2 MB of raw_data for 10 floats: kept
    strings = helper.make_tensor("s", TensorProto.STRING, [1], [b"x" * (2 << 20)])
    inits = [_big("big"), numpy_helper.from_array(np.ones(4, np.float32), "small"), inconsistent,
             numpy_helper.from_array(np.ones(60_000, np.float32), "under_fold_cap"), strings]
    model = _model(inits)
    model.doc_string = "kept"
    data = model.SerializeToString()
    found = wire_initializers(data)
    light, lengths = found.light, found.lengths
    assert len(light) < len(data) - 1_000_000
    assert lengths == [1_200_000, 16, 1_200_000, 240_000, None]
    got = _parsed(light)
    want = _parsed(data)
    want.graph.initializer[0].raw_data = b""              # the only difference
    assert got == want
    assert got.graph.initializer[0].HasField("raw_data")


def test_light_copy_is_not_made_when_nothing_is_dropped_or_the_walk_fails() -> None:
    from sdsecure.gate.onnx_graph import wire_initializers

    small = _model([numpy_helper.from_array(np.ones(4, np.float32), "w")]).SerializeToString()
    assert wire_initializers(small).light is None
    data = _model([_big("big")]).SerializeToString()
    extra = onnx.ModelProto(graph=helper.make_graph([], "more", [], []))
    assert wire_initializers(data + extra.SerializeToString()) is None  # graph given twice
    assert wire_initializers(data[:-5]) is None                          # truncated


def test_rules_see_the_light_copy_with_the_true_lengths(tmp_path) -> None:
    """A large, consistent initializer: parsed without its bytes, no false finding; a large one whose
    raw_data is one float short: kept and flagged."""
    from sdsecure.gate import audit
    from sdsecure.gate.blob import Blob
    from sdsecure.gate.rules import ScanContext

    data = _model([_big("big")]).SerializeToString()
    ctx = ScanContext("m", {"m.onnx": Blob.from_bytes(data)}, False)
    assert ctx.onnx("m.onnx").graph.initializer[0].raw_data == b""
    assert ctx.cache[("onnx-raw-lengths", "m.onnx")] == [1_200_000]
    (tmp_path / "ok.onnx").write_bytes(data)
    findings = audit(str(tmp_path / "ok.onnx"), progress=False).report.findings
    assert not [f for f in findings if f.rule.startswith("ONNX-TENSOR")], findings

    short = _big("big")
    short.raw_data = short.raw_data[:-4]
    (tmp_path / "short.onnx").write_bytes(_model([short]).SerializeToString())
    ids = {f.rule for f in audit(str(tmp_path / "short.onnx"), progress=False).report.findings}
    assert "ONNX-TENSOR-SIZE-MISMATCH" in ids
