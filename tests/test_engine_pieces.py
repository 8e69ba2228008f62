"""Large models compile in child processes, in pieces, cached as MEF files (engine.partition,
engine.mef_cache): the split is exact, the chain computes what the whole graph computes, and the
cache survives a bad file and reports a failed compile."""

from __future__ import annotations

import logging
import time

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from sdsecure.engine import create_session, mef_cache, runtime
from sdsecure.engine.fold import specialize
from sdsecure.engine.partition import cut_points, live_bytes, split
from sdsecure.errors import UserError


def _f32(name: str, shape) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, TensorProto.FLOAT, shape)


def _skip_model() -> tuple[onnx.ModelProto, dict[str, np.ndarray]]:
    """x -> 6 matmul+tanh layers, with a skip from layer 1 to layer 5 and two outputs (one an
    Identity of an intermediate value, one an Identity of the input)."""
    rng = np.random.default_rng(0)
    inits, nodes = [], []
    cur = "x"
    for k in range(6):
        w = (rng.standard_normal((16, 16)) * 0.3).astype(np.float32)
        inits.append(numpy_helper.from_array(w, f"w{k}"))
        nodes.append(helper.make_node("MatMul", [cur, f"w{k}"], [f"m{k}"], name=f"mm{k}"))
        nodes.append(helper.make_node("Tanh", [f"m{k}"], [f"h{k}"], name=f"tanh{k}"))
        cur = f"h{k}"
        if k == 4:
            nodes.append(helper.make_node("Add", [cur, "h1"], ["skip"], name="skip_add"))
            cur = "skip"
    nodes.append(helper.make_node("Identity", ["h2"], ["mid"], name="mid_out"))
    nodes.append(helper.make_node("Identity", ["x"], ["echo"], name="echo"))
    graph = helper.make_graph(nodes, "skip", [_f32("x", ["n", 16])],
                              [_f32(cur, None), _f32("mid", None), _f32("echo", None)], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    return model, {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}


def _folded():
    model, weights = _skip_model()
    return specialize(model, weights, {"x": [4, 16]})


def test_split_is_exact_and_each_piece_reads_only_what_exists_before_it() -> None:
    folded = _folded()
    pieces = split(folded, 3)
    assert len(pieces) == 3
    assert [n.name for p in pieces for n in p.nodes] == [n.name for n in folded.nodes]   # every node once
    available = set(folded.inputs)
    for p in pieces:
        assert set(p.inputs) <= available, p.name                     # made by earlier pieces or fed
        made = {o for n in p.nodes for o in n.output}
        assert set(p.outputs) <= made
        assert all(i in made or i in p.inputs or i in p.consts for n in p.nodes for i in n.input if i)
        available |= set(p.outputs)
    # the skip value h1 is handed from the piece that makes it to the piece that adds it
    maker = next(p for p in pieces if any("h1" in n.output for n in p.nodes))
    reader = next(p for p in pieces if any(n.name == "skip_add" for n in p.nodes))
    if maker is not reader:
        assert "h1" in maker.outputs and "h1" in reader.inputs
    assert {folded.resolve(o) for o in folded.outputs} - set(folded.inputs) <= available


def test_cuts_go_where_fewest_bytes_are_alive() -> None:
    folded = _folded()
    live = live_bytes(folded)
    assert len(live) == len(folded.nodes)
    names = [n.name for n in folded.nodes]
    # between the skip's source (h1) and its use, the skip tensor is alive as well: more bytes
    assert live[names.index("mm3")] > live[names.index("mm1")]
    cuts = cut_points(folded, 2)
    assert len(cuts) == 1 and 0 < cuts[0] < len(names)
    assert live[cuts[0]] <= live[round(len(names) / 2)]               # never worse than the even split
    assert split(folded, 1) == [folded]
    assert len(split(folded, 10_000)) == len(folded.nodes)             # never an empty piece


@pytest.fixture()
def mef_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("SDSECURE_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(runtime, "PIECE_NODES", 5)
    monkeypatch.delenv("SDSECURE_PIECE_NODES", raising=False)
    runtime.clear_memory_cache()
    yield tmp_path / "cache" / "max-mef"
    runtime.clear_memory_cache()


def test_isolated_pieces_compute_what_the_whole_graph_computes(mef_dir, caplog, progress_messages,
                                                               monkeypatch) -> None:
    model, weights = _skip_model()
    x = np.random.default_rng(1).standard_normal((4, 16)).astype(np.float32)
    ref = create_session(model, weights, {"x": [4, 16]}, backend="onnxruntime").run({"x": x})

    whole = create_session(model, weights, {"x": [4, 16]}, backend="max")
    assert not whole.isolated and whole.pieces == 1                     # small weights: in process
    monkeypatch.setattr(runtime, "COMPILE_NOTICE_S", 0.0)               # every compile counts as slow here
    progress_messages.clear()
    pieced = runtime.MaxSession(model, weights, {"x": [4, 16]}, name="skip", isolate=True)
    assert pieced.pieces == 3                                           # 13 nodes, 5 per piece
    # each cold compile in a child process is announced, and timed when done
    announced = [m for m in progress_messages if m.startswith("compiling skip piece ")]
    finished = [m for m in progress_messages if " compiled in " in m]
    assert sorted(m.split()[3] for m in announced) == ["1/3", "2/3", "3/3"], progress_messages
    assert sorted(m.split()[2] for m in finished) == ["1/3", "2/3", "3/3"], progress_messages
    assert pieced.stats.cache == "compiled"
    assert 0 < pieced.stats.child_peak_rss_mib < 8 * 1024
    assert len(list(mef_dir.glob("*.mef"))) == 3
    assert not list(mef_dir.glob("*.tmp")) and not list(mef_dir.glob("compile-*"))   # nothing half-written

    for sess in (whole, pieced):
        out = sess.run({"x": x})
        assert set(out) == set(ref)
        for name in ref:
            np.testing.assert_allclose(out[name], ref[name], rtol=1e-5, atol=1e-6, err_msg=name)
    np.testing.assert_array_equal(pieced.run({"x": x})["echo"], x)

    # a new process would find the MEFs on disk: so does this one once its memory cache is gone
    runtime.clear_memory_cache()
    progress_messages.clear()
    again = runtime.MaxSession(model, weights, {"x": [4, 16]}, name="skip", isolate=True)
    assert again.stats.cache == "mef" and again.stats.child_peak_rss_mib == 0
    assert progress_messages == []                                      # nothing compiled: nothing to wait for

    # a damaged MEF is not trusted to load: it is removed and that piece compiled again
    victim = sorted(mef_dir.glob("*.mef"))[0]
    victim.write_bytes(b"not a MEF")
    runtime.clear_memory_cache()
    with caplog.at_level(logging.WARNING, logger="sdsecure.engine.runtime"):
        healed = runtime.MaxSession(model, weights, {"x": [4, 16]}, name="skip", isolate=True)
    assert "unusable" in caplog.text
    assert set(healed.stats.cache.split("+")) == {"mef", "compiled"}
    for name in ref:
        np.testing.assert_allclose(healed.run({"x": x})[name], ref[name], rtol=1e-5, atol=1e-6)


def test_a_compile_still_running_after_the_notice_delay_is_announced_and_timed(progress_messages,
                                                                            monkeypatch) -> None:
    monkeypatch.setattr(runtime, "COMPILE_NOTICE_S", 0.05)
    with runtime.compile_notice("unet piece 2/3"):
        time.sleep(1.2)                  # ample time for the notice, even on a busy machine
    assert len(progress_messages) == 2, progress_messages
    assert progress_messages[0].startswith("compiling unet piece 2/3 with MAX: a cold compile takes minutes")
    assert progress_messages[1] in ("unet piece 2/3 compiled in 1 s", "unet piece 2/3 compiled in 2 s")


def test_a_compile_done_before_the_notice_delay_says_nothing(progress_messages, monkeypatch) -> None:
    monkeypatch.setattr(runtime, "COMPILE_NOTICE_S", 0.2)
    with runtime.compile_notice("text_encoder"):
        pass
    time.sleep(0.4)                      # past the delay: the notice was cancelled, not just late
    assert progress_messages == []


def test_a_failed_child_compile_names_the_graph_and_says_why(mef_dir) -> None:
    with pytest.raises(mef_cache.CompileError, match=r"unet piece 2/5: MAX compile failed .*exit [1-9]"):
        mef_cache.compile_in_child("this is not MLIR", "0" * 64, label="unet piece 2/5")
    assert not list(mef_dir.glob("*"))                                  # no file left behind


@pytest.mark.parametrize("raw", ["many", "0", "-3"])
def test_a_bad_piece_size_is_a_one_line_user_error(raw, monkeypatch) -> None:
    monkeypatch.setenv("SDSECURE_PIECE_NODES", raw)
    with pytest.raises(UserError, match="SDSECURE_PIECE_NODES"):
        runtime.piece_nodes()
    monkeypatch.setenv("SDSECURE_PIECE_NODES", "250")
    assert runtime.piece_nodes() == 250


def test_a_cache_others_can_write_to_is_refused(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("SDSECURE_CACHE_DIR", str(tmp_path))
    assert mef_cache.cache_dir() == tmp_path / "max-mef"
    assert (tmp_path / "max-mef").stat().st_mode & 0o777 == 0o700
    (tmp_path / "max-mef").chmod(0o777)
    with pytest.raises(UserError, match="not writable by group or others .*chmod 700"):
        mef_cache.cache_dir()


def test_mef_key_depends_on_graph_and_device() -> None:
    a = mef_cache.mef_key("graph A", "cpu")
    assert a == mef_cache.mef_key("graph A", "cpu")
    assert a != mef_cache.mef_key("graph B", "cpu") and a != mef_cache.mef_key("graph A", "gpu")


# -- build plans (engine.plan_cache) -----------------------------------------------------------------
def _no_build(*_a, **_k):
    raise AssertionError("the graph was built although a build plan was stored")


def test_a_stored_build_plan_binds_the_mefs_without_building(mef_dir, monkeypatch) -> None:
    model, weights = _skip_model()
    x = np.random.default_rng(2).standard_normal((4, 16)).astype(np.float32)
    ref = create_session(model, weights, {"x": [4, 16]}, backend="onnxruntime").run({"x": x})

    first = runtime.MaxSession(model, weights, {"x": [4, 16]}, name="skip", isolate=True, source="files-A")
    assert not first.stats.planned
    assert len(list(mef_dir.glob("*.plan.npz"))) == 1
    assert not [p for p in mef_dir.iterdir() if p.name.startswith("plan-")]      # nothing half-written

    runtime.clear_memory_cache()                       # as in a new process
    monkeypatch.setattr(runtime, "build_graph", _no_build)
    again = runtime.MaxSession(model, weights, {"x": [4, 16]}, name="skip", isolate=True, source="files-A")
    assert again.stats.planned and again.stats.cache == "mef" and again.pieces == 3
    for name in ref:
        np.testing.assert_allclose(again.run({"x": x})[name], ref[name], rtol=1e-5, atol=1e-6, err_msg=name)

    # other verified bytes, other input shapes, or no source at all: no plan fits, so the graph is built
    for source, shape in (("files-B", [4, 16]), ("files-A", [2, 16]), (None, [4, 16])):
        with pytest.raises(AssertionError, match="was built"):
            runtime.MaxSession(model, weights, {"x": shape}, name="skip", isolate=True, source=source)


def test_a_plan_that_does_not_fit_is_dropped_and_the_graph_built(mef_dir, caplog) -> None:
    model, weights = _skip_model()
    x = np.random.default_rng(3).standard_normal((4, 16)).astype(np.float32)
    want = runtime.MaxSession(model, weights, {"x": [4, 16]}, name="skip", isolate=True, source="s").run({"x": x})
    (plan,) = mef_dir.glob("*.plan.npz")

    plan.write_bytes(b"not an npz")                    # damaged
    runtime.clear_memory_cache()
    with caplog.at_level(logging.WARNING, logger="sdsecure.engine.plan_cache"):
        built = runtime.MaxSession(model, weights, {"x": [4, 16]}, name="skip", isolate=True, source="s")
    assert "unusable" in caplog.text and not built.stats.planned
    assert plan.is_file() and plan.read_bytes()[:2] == b"PK"      # stored again, whole
    np.testing.assert_array_equal(built.run({"x": x})["mid"], want["mid"])

    for mef in mef_dir.glob("*.mef"):                  # the MEFs it names are gone: compiled again
        mef.unlink()
    runtime.clear_memory_cache()
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="sdsecure.engine.runtime"):
        rebuilt = runtime.MaxSession(model, weights, {"x": [4, 16]}, name="skip", isolate=True, source="s")
    assert "no longer cached" in caplog.text and not rebuilt.stats.planned
    assert rebuilt.stats.cache == "compiled" and len(list(mef_dir.glob("*.mef"))) == 3
    np.testing.assert_array_equal(rebuilt.run({"x": x})["mid"], want["mid"])


def test_plans_store_derived_weights_and_refuse_missing_constants(mef_dir) -> None:
    from sdsecure.engine import plan_cache

    folded = _folded()
    derived = np.arange(6, dtype=np.float32).reshape(2, 3)
    weights = {"w0": folded.consts["w0"], "derived.1": derived}
    plan = plan_cache.piece_plan("k" * 64, folded, weights)
    assert plan.named == ["w0"] and list(plan.derived) == ["derived.1"]
    plan_cache.save("abc", [plan])
    (loaded,) = plan_cache.load("abc")
    bound = plan_cache.bind(loaded, folded)
    assert bound["w0"] is folded.consts["w0"]                          # the graph's own array, no copy
    np.testing.assert_array_equal(bound["derived.1"], derived)
    del folded.consts["w0"]
    with pytest.raises(plan_cache.PlanMismatch, match="'w0'"):
        plan_cache.bind(loaded, folded)


def test_the_plan_key_follows_source_graph_pieces_and_engine_code(monkeypatch) -> None:
    from sdsecure.engine import plan_cache

    folded = _folded()
    key = plan_cache.plan_key(folded, "src", 3, "cpu")
    assert key == plan_cache.plan_key(_folded(), "src", 3, "cpu")
    assert key != plan_cache.plan_key(folded, "other", 3, "cpu")
    assert key != plan_cache.plan_key(folded, "src", 2, "cpu")
    smaller = specialize(*_skip_model(), {"x": [2, 16]})
    assert key != plan_cache.plan_key(smaller, "src", 3, "cpu")
    monkeypatch.setattr(plan_cache, "engine_fingerprint", lambda: "changed importer")
    assert key != plan_cache.plan_key(folded, "src", 3, "cpu")
