"""MatMuls by constant weights run on weights packed once into MAX's own matmul layout
(engine.packed_matmul, rewritten by engine.fuse): the layout is checked against its definition, the probe
tells MAX's layout from another, the rewrite takes the MatMuls it is meant for (siblings as one weight),
and MAX's results match onnxruntime's."""

from __future__ import annotations

import json

import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper
from sdsecure.engine import create_session, packed_matmul
from sdsecure.engine.packed_matmul import PANEL, TILE_K
from sdsecure.engine.runtime import prepare_graph

HIDDEN = 256          # 256 x 256 float32 weights: 65,536 elements, the smallest that gets packed
TOKENS = 64
ROWS = 2 * TOKENS     # x [2, 64, 256]: matmuls of 128 rows (MAX uses another layout for a few rows)


def test_pack_stores_each_k_tile_as_64_column_panels_one_after_the_other() -> None:
    k, n = TILE_K + 3, 2 * PANEL                       # two K tiles: 2048 rows, then 3
    w = np.arange(k * n, dtype=np.float32).reshape(k, n)
    flat = packed_matmul.pack(w).reshape(-1)
    r, c = np.meshgrid(np.arange(k), np.arange(n), indexing="ij")
    tile, row = r // TILE_K, r % TILE_K
    rows = np.minimum(TILE_K, k - tile * TILE_K)
    where = tile * TILE_K * n + (c // PANEL) * rows * PANEL + row * PANEL + c % PANEL
    np.testing.assert_array_equal(flat[where], w)
    out = packed_matmul.aligned_empty((k, n))
    assert out.ctypes.data % 64 == 0
    assert packed_matmul.pack(w, out=out) is out
    np.testing.assert_array_equal(out.reshape(-1), flat)


def test_the_probe_accepts_the_layout_max_multiplies_and_rejects_another() -> None:
    shapes = [(ROWS, HIDDEN, 2 * PANEL)]
    assert packed_matmul.probe(shapes) == {"128x256x128": True}

    def unpacked(w, out):        # the weight as it is: not MAX's layout once N holds two panels
        out[...] = w
        return out

    assert packed_matmul.probe(shapes, pack_fn=unpacked) == {"128x256x128": False}
    # MAX 26.7 lays B out otherwise for a matmul of few rows (on this 2-core AVX-512 machine: 10 and
    # 32 rows): the reason each shape is probed before its weight is packed
    assert packed_matmul.probe([(10, HIDDEN, 2 * PANEL)]) == {"10x256x128": False}


def test_the_probe_runs_in_a_child_process_and_a_failed_child_means_plain_matmuls(monkeypatch, caplog) -> None:
    assert packed_matmul._probe_in_child([(ROWS, HIDDEN, 2 * PANEL)]) == {"128x256x128": True}
    monkeypatch.setattr(packed_matmul.sys, "executable", "/bin/false")
    with caplog.at_level("WARNING", logger="sdsecure.engine.packed_matmul"):
        assert packed_matmul._probe_in_child([(ROWS, HIDDEN, 2 * PANEL)]) is None
    assert "packed matmul probe failed (" in caplog.text


def test_a_probe_that_max_or_packing_cannot_run_is_a_failed_child_not_a_verdict(caplog) -> None:
    # N = 100 is not a whole number of 64-column panels: packing raises in the child, which exits non-zero
    with caplog.at_level("WARNING", logger="sdsecure.engine.packed_matmul"):
        assert packed_matmul._probe_in_child([(ROWS, HIDDEN, 100)]) is None
    assert "exit 1" in caplog.text


def test_verdicts_are_probed_once_per_machine_and_then_read_from_the_cache(tmp_path, monkeypatch) -> None:
    calls = []

    def fake_probe(shapes):
        calls.append(list(shapes))
        return {packed_matmul._key(s): s[0] != 3 for s in shapes}

    monkeypatch.setattr(packed_matmul, "_probe_in_child", fake_probe)
    monkeypatch.setattr(packed_matmul, "_verdict_file", lambda: tmp_path / "packed-matmul.json")
    shapes = {(2, 256, 256), (3, 256, 256)}
    assert packed_matmul.verified(shapes) == {(2, 256, 256)}
    assert packed_matmul.verified(shapes) == {(2, 256, 256)}
    assert calls == [[(2, 256, 256), (3, 256, 256)]]            # the second answer came from the file
    assert packed_matmul.verified(shapes | {(4, 256, 256)}) == {(2, 256, 256), (4, 256, 256)}
    assert calls[1:] == [[(4, 256, 256)]]                        # only the new shape was probed
    monkeypatch.setattr(packed_matmul, "_machine_key", lambda: "another machine")
    packed_matmul.verified(shapes)
    assert calls[2:] == [[(2, 256, 256), (3, 256, 256)]]         # verdicts of another machine do not count
    (tmp_path / "packed-matmul.json").write_text("{not json")
    packed_matmul.verified({(2, 256, 256)})
    assert calls[3:] == [[(2, 256, 256)]]
    assert json.loads((tmp_path / "packed-matmul.json").read_text())["shapes"] == {"2x256x256": True}
    # a probe that could not run packs nothing, and is not remembered: the next session probes again
    monkeypatch.setattr(packed_matmul, "_probe_in_child", lambda shapes: calls.append(list(shapes)))
    assert packed_matmul.verified({(5, 256, 256)}) == set()
    assert packed_matmul.verified({(5, 256, 256)}) == set()
    assert calls[4:] == [[(5, 256, 256)], [(5, 256, 256)]]


def _model(*, v_out: int = HIDDEN // 2, plain_sibling: bool = False, tokens: int = TOKENS):
    """x [2, 64, 256] -> q, k, v (three MatMuls of x, v [256, v_out]); o = Relu(q) x Wo [256, 256].
    plain_sibling: a fourth MatMul of x by the graph input y [256, 64] (not a constant)."""
    rng = np.random.default_rng(3)
    shapes = {"wq": (HIDDEN, HIDDEN), "wk": (HIDDEN, HIDDEN), "wv": (HIDDEN, v_out), "wo": (HIDDEN, HIDDEN)}
    weights = {k: (rng.standard_normal(s) / np.sqrt(s[0])).astype(np.float32) for k, s in shapes.items()}
    nodes = [helper.make_node("MatMul", ["x", "wq"], ["q"], name="q"),
             helper.make_node("MatMul", ["x", "wk"], ["k"], name="k"),
             helper.make_node("MatMul", ["x", "wv"], ["v"], name="v"),
             helper.make_node("Relu", ["q"], ["h"], name="relu"),
             helper.make_node("MatMul", ["h", "wo"], ["o"], name="o")]
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, tokens, HIDDEN])]
    outputs = [helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in ("k", "v", "o")]
    if plain_sibling:
        nodes.append(helper.make_node("MatMul", ["x", "y"], ["z"], name="z"))
        inputs.append(helper.make_tensor_value_info("y", TensorProto.FLOAT, [HIDDEN, 64]))
        outputs.append(helper.make_tensor_value_info("z", TensorProto.FLOAT, None))
    graph = helper.make_graph(nodes, "mm", inputs, outputs,
                              [numpy_helper.from_array(v, k) for k, v in weights.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    shapes_in = {"x": [2, tokens, HIDDEN]} | ({"y": [HIDDEN, 64]} if plain_sibling else {})
    return model, weights, shapes_in


def _ops(model, weights, shapes, pack_matmuls: bool = True) -> list[str]:
    return [n.op_type for n in prepare_graph(model, weights, shapes, pack_matmuls=pack_matmuls).nodes]


def test_siblings_become_one_packed_matmul_and_a_lone_matmul_another() -> None:
    model, weights, shapes = _model()
    folded = prepare_graph(model, weights, shapes, pack_matmuls=True)
    assert [n.op_type for n in folded.nodes] == ["PackedMatMul", "Relu", "PackedMatMul"]
    qkv, _, o = folded.nodes
    assert list(qkv.output) == ["q", "k", "v"] and qkv.input[0] == "x"
    assert [a.ints for a in qkv.attribute if a.name == "splits"] == [[HIDDEN, HIDDEN, HIDDEN // 2]]
    packed = folded.consts[qkv.input[1]]
    folded.wait_filled()
    joined = np.concatenate([weights["wq"], weights["wk"], weights["wv"]], axis=1)
    np.testing.assert_array_equal(packed, packed_matmul.pack(joined))
    assert not any(a.name == "splits" for a in o.attribute)


def test_matmuls_stay_plain_when_a_sibling_cannot_pack_or_the_probe_says_no(monkeypatch) -> None:
    # MAX would merge a packed weight with a plain sibling's: all of x's MatMuls stay plain
    assert _ops(*_model(plain_sibling=True)) == ["MatMul", "MatMul", "MatMul", "Relu", "PackedMatMul", "MatMul"]
    assert _ops(*_model(v_out=HIDDEN // 2 + 1)) == ["MatMul", "MatMul", "MatMul", "Relu", "PackedMatMul"]
    assert _ops(*_model(), pack_matmuls=False) == ["MatMul", "MatMul", "MatMul", "Relu", "MatMul"]
    assert 2 * 129 > packed_matmul.MAX_ROWS         # more rows: left to MAX
    assert _ops(*_model(tokens=129)) == ["MatMul", "MatMul", "MatMul", "Relu", "MatMul"]
    monkeypatch.setattr(packed_matmul, "verified", lambda shapes: set())
    assert _ops(*_model()) == ["MatMul", "MatMul", "MatMul", "Relu", "MatMul"]
    monkeypatch.setattr(packed_matmul, "ENABLED", False)
    monkeypatch.setattr(packed_matmul, "verified", lambda shapes: set(shapes))
    assert _ops(*_model()) == ["MatMul", "MatMul", "MatMul", "Relu", "MatMul"]


@pytest.mark.parametrize("plain_sibling", [False, True])
def test_packed_matmuls_match_onnxruntime(plain_sibling) -> None:
    model, weights, shapes = _model(plain_sibling=plain_sibling)
    assert "PackedMatMul" in _ops(model, weights, shapes)
    rng = np.random.default_rng(4)
    feeds = {name: rng.standard_normal(shape).astype(np.float32) for name, shape in shapes.items()}
    ref = create_session(model, weights, shapes, backend="onnxruntime").run(feeds)
    out = create_session(model, weights, shapes, backend="max", pack_matmuls=True).run(feeds)
    assert set(out) == set(ref)
    for name in ref:
        assert out[name].shape == ref[name].shape
        # sums of 256 products of unit-scale values: float32 rounding is about 1e-6 of the range
        np.testing.assert_allclose(out[name], ref[name], rtol=1e-5, atol=1e-5 * np.abs(ref[name]).max())


def test_the_pipeline_packs_the_text_encoders_matmuls_and_leaves_the_others_to_max(monkeypatch) -> None:
    import sdsecure.engine
    from sdsecure.pipeline.sd15 import StableDiffusion15

    from tests.pipeline_helpers import verified_from_dir
    from tests.test_pipeline import EMBEDDED_DIR, SIZE

    asked: dict[str, bool] = {}
    real_prepare = sdsecure.engine.prepare

    def prepare(model, weights, shapes, *, name="", pack_matmuls=False):
        asked[name] = pack_matmuls
        return real_prepare(model, weights, shapes, name=name, pack_matmuls=pack_matmuls)

    class Stop(Exception):
        pass

    def create_session(*args, **kwargs):
        raise Stop                                 # nothing compiled: what prepare was asked is the point

    monkeypatch.setattr(sdsecure.engine, "prepare", prepare)
    monkeypatch.setattr(sdsecure.engine, "create_session", create_session)
    with pytest.raises(Stop):
        StableDiffusion15(verified_from_dir(EMBEDDED_DIR, "embedded"), backend="max", height=SIZE, width=SIZE)
    assert asked == {"text_encoder": True, "unet": False, "vae_decoder": False}
