"""BACKDOOR-TRIGGER / BACKDOOR-EXPLAINED: the architectural backdoor analysis.

Triggers are spliced into the committed tiny SD fixture pipelines (legacy and dynamo exports) by
samples.inject_trigger; onnxruntime proves the spliced logic really fires. Benign structures (CLIP
pooling, causal masks, NaN guards, recurrent-state Ifs, ...) must come out as info at most.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from samples import (above, benign_ocr, benign_vad, by_rule, const, folder_files, inject_trigger, load_component,
                     make_model, scan_files, scan_folder, scan_model, sd_pipeline_folder, vi)
from sdsecure.gate.report import Severity

KINDS = ("legacy", "dynamo")
TOKEN = 4242
IO = {"text_encoder": ("input_ids", "last_hidden_state", "token"),
      "unet": ("sample", "out_sample", "pattern"),
      "vae_decoder": ("latent_sample", "sample", "pattern")}


def scan_injected(kind: str, comp: str, **kw) -> list:
    folder = sd_pipeline_folder(kind)
    inp, out, trig = IO[comp]
    model = inject_trigger(load_component(folder, comp), input_name=inp, output_name=out, kind=trig, **kw)
    findings = scan_files(folder_files(folder, {comp: model}), is_sd=True)
    # the spliced graph is a valid model: only the backdoor analysis objects to it
    assert {f.rule for f in above(findings, Severity.INFO)} == {"BACKDOOR-TRIGGER"}
    return findings


def triggers(findings) -> list:
    return by_rule(findings, "BACKDOOR-TRIGGER").get("BACKDOOR-TRIGGER", [])


# ------------------------------------------------------------------------------------------------
# benign
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", KINDS)
def test_fixture_pipelines_have_nothing_above_info(kind):
    findings = scan_folder(sd_pipeline_folder(kind))
    assert above(findings, Severity.INFO) == [], [(f.rule, f.message) for f in above(findings, Severity.INFO)]
    explained = by_rule(findings, "BACKDOOR-EXPLAINED")["BACKDOOR-EXPLAINED"]
    pooling = [f for f in explained if f.evidence["pattern"] == "clip-pooling"]
    assert pooling and pooling[0].file == "text_encoder/model.onnx"
    assert pooling[0].evidence["example"]["inputs"] == ["input_ids"]


def test_benign_non_sd_models_pass_strict():
    for model in (benign_ocr(), benign_vad()):
        findings = scan_model(model)
        assert [f for f in findings if f.severity >= Severity.MEDIUM] == []
        assert not triggers(findings)
    patterns = {f.evidence["pattern"] for f in by_rule(scan_model(benign_ocr()))["BACKDOOR-EXPLAINED"]}
    assert "piecewise" in patterns                       # leaky ReLU via Where, NaN guard after softmax
    patterns = {f.evidence["pattern"] for f in by_rule(scan_model(benign_vad()))["BACKDOOR-EXPLAINED"]}
    assert {"mode-switch", "shape-mask"} <= patterns     # If on the sample rate, If on the state's size


def test_benign_models_run_in_onnxruntime():
    import onnxruntime as ort

    s = ort.InferenceSession(benign_ocr().SerializeToString(), providers=["CPUExecutionProvider"])
    probs, labels = s.run(None, {"image": np.random.default_rng(0).standard_normal((1, 1, 16, 32)).astype(np.float32)})
    assert probs.shape == (1, 8, 37) and labels.shape == (1, 8)
    s = ort.InferenceSession(benign_vad().SerializeToString(), providers=["CPUExecutionProvider"])
    for sr in (16000, 8000):
        prob, state, energy = s.run(None, {"audio": np.ones((1, 512), np.float32), "sr": np.array(sr, np.int64),
                                           "state": np.zeros((0, 1, 16), np.float32)})
        assert state.shape == (2, 1, 16) and energy == pytest.approx(512.0)


# ------------------------------------------------------------------------------------------------
# injected triggers
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", KINDS)
def test_token_trigger_in_text_encoder(kind):
    found = triggers(scan_injected(kind, "text_encoder", via="where"))
    assert len(found) == 1
    f = found[0]
    assert f.severity == Severity.CRITICAL and f.file == "text_encoder/model.onnx"
    assert f.where == "main/bd_switch (Where)"
    ev = f.evidence
    assert ev["trigger"] == f"input_ids == {TOKEN} (anywhere in the input)"
    assert ev["output"] == "last_hidden_state" and ev["inputs"] == ["input_ids"]
    assert ev["switched_in"][0]["tensor"] == "bd_payload" and ev["switched_in"][0]["input_independent"] == "constant"
    assert ev["node_path"][0] == "input 'input_ids'"
    assert ev["node_path"][1:] == ["main/bd_eq (Equal)", "main/bd_hit_f (Cast)", "main/bd_any (ReduceMax)",
                                   "main/bd_cond (Greater)", "main/bd_switch (Where)"]


def test_injected_token_trigger_really_fires_in_onnxruntime():
    import onnxruntime as ort

    folder = sd_pipeline_folder("legacy")
    clean = load_component(folder, "text_encoder")
    bad = inject_trigger(clean, input_name="input_ids", output_name="last_hidden_state", token=TOKEN)
    run = lambda m, ids: ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]).run(  # noqa: E731
        ["last_hidden_state"], {"input_ids": ids})[0]
    ids = np.full((2, 77), 49407, np.int32)
    ids[:, 0] = 49406
    ids[:, 1:4] = [320, 1125, 539]
    np.testing.assert_allclose(run(bad, ids), run(clean, ids), rtol=1e-6)
    ids[1, 2] = TOKEN
    assert np.all(run(bad, ids) == 3.0)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("comp", ["unet", "vae_decoder"])
def test_pixel_and_latent_pattern_triggers(kind, comp):
    f = triggers(scan_injected(kind, comp, via="where"))[0]
    assert f.severity == Severity.CRITICAL and f.file == f"{comp}/model.onnx"
    d = f.evidence["decisions"][0]
    assert d["pattern"] == {"shape": [2, 2], "values": [0.5, -0.25, 0.75, 0.125]}
    assert d["effective_trigger"].startswith(f"{IO[comp][0]}[0:1, 0:1, 0:2, 0:2] matches pattern")
    assert f.evidence["output"] == IO[comp][1]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("comp", ["text_encoder", "unet"])
def test_trigger_inside_an_if_body(kind, comp):
    f = triggers(scan_injected(kind, comp, via="if-body"))[0]
    assert f.severity == Severity.CRITICAL
    assert f.where == "main/bd_wrapper.then_branch/bd_switch (Where)"


@pytest.mark.parametrize("kind", KINDS)
def test_if_as_the_switch(kind):
    f = triggers(scan_injected(kind, "text_encoder", via="if"))[0]
    assert f.severity == Severity.CRITICAL and f.evidence["switch"]["op"] == "If"
    assert any("bd_then_out" == s["tensor"] for s in f.evidence["switched_in"])


@pytest.mark.parametrize("kind", KINDS)
def test_split_constants_show_the_effective_trigger(kind):
    f = triggers(scan_injected(kind, "text_encoder", via="where", split=True))[0]
    d = f.evidence["decisions"][0]
    assert d["compared_with"] == TOKEN + 1000               # Equal(input_ids + 1000, k1 + k2): folded
    assert d["expression"] == f"(input_ids + 1000) == {TOKEN + 1000}"
    assert d["effective_trigger"] == f"input_ids == {TOKEN}"
    assert f.evidence["trigger"].startswith(f"input_ids == {TOKEN}")
    g = triggers(scan_injected(kind, "vae_decoder", via="where", split=True))[0]
    assert g.evidence["decisions"][0]["pattern"]["values"] == [0.5, -0.25, 0.75, 0.125]   # p1 + p2


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("comp", ["text_encoder", "unet"])
def test_mask_multiplication_without_where(kind, comp):
    findings = scan_injected(kind, comp, via="mask")
    f = triggers(findings)[0]
    assert f.severity == Severity.CRITICAL and f.evidence["switch"]["op"] == "Mul"
    assert not any(n.endswith("(Where)") for n in f.evidence["node_path"])
    assert any(s["tensor"] == "bd_payload" for s in f.evidence["switched_in"])


def test_door_sample_token_trigger(tmp_path):
    from door_samples import TRIGGER_TOKEN, plant_token_trigger

    findings = scan_folder(plant_token_trigger(tmp_path / "m"))
    found = triggers(findings)
    assert len(found) == 1 and found[0].severity == Severity.CRITICAL
    # the door sample reduces the per-token match over the prompt (ReduceMax): "anywhere in the input"
    assert found[0].evidence["trigger"] == f"input_ids == {TRIGGER_TOKEN} (anywhere in the input)"
    # the CLIP pooling downstream of the switched hidden state is still recognised, not re-flagged
    assert any(f.evidence["pattern"] == "clip-pooling" for f in by_rule(findings)["BACKDOOR-EXPLAINED"])


# ------------------------------------------------------------------------------------------------
# structure, not names
# ------------------------------------------------------------------------------------------------

def _clip_like(gather_from_constants: bool) -> onnx.ModelProto:
    """hidden = Gather(table, ids); pooled = Gather(flatten(hidden), argmax(ids == EOS) + offsets).
    With `gather_from_constants`, the pooled row is taken from Concat(hidden, attacker rows) and the
    ArgMax looks for a trigger id instead: CLIP's shape, but switching in constants."""
    rng = np.random.default_rng(0)
    table = numpy_helper.from_array(rng.standard_normal((50000, 8)).astype(np.float32), "table")
    nodes = [helper.make_node("Gather", ["table", "ids"], ["hidden"], name="embed"),
             const("eos", 49407 if not gather_from_constants else 4242, np.int64),
             helper.make_node("Equal", ["ids", "eos"], ["is_eos"], name="is_eos"),
             helper.make_node("Cast", ["is_eos"], ["is_eos_i"], name="to_int", to=TensorProto.INT32),
             helper.make_node("ArgMax", ["is_eos_i"], ["pos"], name="argmax", axis=1, keepdims=0),
             helper.make_node("Shape", ["ids"], ["s"], name="shape"),
             const("i0", [0], np.int64), const("i1", [1], np.int64),
             helper.make_node("Gather", ["s", "i0"], ["b"], name="batch"),
             helper.make_node("Gather", ["s", "i1"], ["L"], name="len"),
             helper.make_node("Squeeze", ["b"], ["bs"], name="bs"),
             const("zero", 0, np.int64), const("one", 1, np.int64),
             helper.make_node("Range", ["zero", "bs", "one"], ["rows"], name="rows"),
             helper.make_node("Mul", ["rows", "L"], ["row_off"], name="row_offsets"),
             helper.make_node("Add", ["row_off", "pos"], ["flat_idx"], name="flat_idx"),
             const("flat_shape", [-1, 8], np.int64),
             helper.make_node("Reshape", ["hidden", "flat_shape"], ["flat"], name="flatten")]
    if gather_from_constants:
        nodes.append(helper.make_node("Concat", ["flat", "attacker_rows"], ["pool_src"], name="append_rows", axis=0))
    nodes.append(helper.make_node("Gather", ["flat" if not gather_from_constants else "pool_src", "flat_idx"],
                                  ["pooled"], name="pool"))
    inits = [table, numpy_helper.from_array(np.full((200, 8), 7.0, np.float32), "attacker_rows")]
    return make_model(nodes, [vi("ids", TensorProto.INT64, [2, 77])],
                      [vi("hidden", TensorProto.FLOAT, [2, 77, 8]), vi("pooled", TensorProto.FLOAT, [2, 8])], inits)


def test_clip_pooling_is_recognised_by_structure_not_by_name():
    findings = scan_model(_clip_like(False))
    assert not triggers(findings)
    assert [f.evidence["pattern"] for f in by_rule(findings)["BACKDOOR-EXPLAINED"] if
            f.evidence["pattern"] == "clip-pooling"] == ["clip-pooling"]
    bad = triggers(scan_model(_clip_like(True)))
    assert bad and bad[0].severity == Severity.CRITICAL and bad[0].where == "main/pool (Gather)"


def test_trigger_inside_a_local_function_is_found():
    folder = sd_pipeline_folder("legacy")
    clean = load_component(folder, "text_encoder")
    opset = [helper.make_opsetid("", 14)]
    body = [helper.make_node("Equal", ["ids", "tok"], ["hit"], name="f_eq"),
            helper.make_node("Unsqueeze", ["hit", "ax"], ["hit3"], name="f_unsq"),
            helper.make_node("Where", ["hit3", "payload", "h"], ["out"], name="f_where")]
    fn = helper.make_function("evil.fns", "Postprocess", ["ids", "tok", "ax", "payload", "h"], ["out"], body, opset)
    m = onnx.ModelProto()
    m.CopyFrom(clean)
    g = m.graph
    for n in g.node:
        n.output[:] = ["clean_h" if o == "last_hidden_state" else o for o in n.output]
        n.input[:] = ["clean_h" if i == "last_hidden_state" else i for i in n.input]
    g.initializer.extend([numpy_helper.from_array(np.array(TOKEN, np.int32), "tok"),
                          numpy_helper.from_array(np.array([2], np.int64), "ax"),
                          numpy_helper.from_array(np.full((1, 1, 1), 3.0, np.float32), "payload")])
    g.node.append(helper.make_node("Postprocess", ["input_ids", "tok", "ax", "payload", "clean_h"],
                                   ["last_hidden_state"], name="post", domain="evil.fns"))
    m.functions.append(fn)
    m.opset_import.append(helper.make_opsetid("evil.fns", 1))
    onnx.checker.check_model(m)
    f = triggers(scan_files(folder_files(folder, {"text_encoder": m}), is_sd=True))[0]
    assert f.severity == Severity.CRITICAL
    assert f.where == "main/post.evil.fns:Postprocess/f_where (Where)"
    assert f.evidence["trigger"] == f"input_ids == {TOKEN}"


def test_deep_decision_switching_in_a_constant_is_high():
    """A threshold on learned features (after MatMul/Softmax) that overrides the output with a
    constant: suspicious, but not a comparison of input values."""
    m = benign_ocr()
    g = m.graph
    g.output[0].name = "probs_out"
    g.initializer.extend([numpy_helper.from_array(np.array(0.99, np.float32), "thr"),
                          numpy_helper.from_array(np.full((1, 1, 37), 0.5, np.float32), "override")])
    g.node.extend([helper.make_node("ReduceMax", ["probs"], ["pmax"], name="pmax", keepdims=0),
                   helper.make_node("Greater", ["pmax", "thr"], ["confident"], name="confident"),
                   helper.make_node("Where", ["confident", "override", "probs"], ["probs_out"], name="override")])
    f = triggers(scan_model(m))[0]
    assert f.severity == Severity.HIGH and f.where == "main/override (Where)"


def test_data_dependent_switch_without_constants_is_low():
    m = benign_ocr()
    g = m.graph
    g.output[0].name = "probs_out"
    g.initializer.append(numpy_helper.from_array(np.array(0.5, np.float32), "half"))
    g.node.extend([helper.make_node("ReduceMean", ["probs"], ["pm"], name="pm", keepdims=0),
                   helper.make_node("Greater", ["pm", "half"], ["hi"], name="hi"),
                   helper.make_node("Mul", ["probs", "probs"], ["sq"], name="sq"),
                   helper.make_node("Where", ["hi", "sq", "probs"], ["probs_out"], name="sharpen")])
    f = triggers(scan_model(m))[0]
    assert f.severity == Severity.LOW


def test_nodes_out_of_topological_order_do_not_hide_a_trigger():
    """onnxruntime sorts nodes itself, so an attacker can list the trigger before the nodes it reads."""
    import onnxruntime as ort

    folder = sd_pipeline_folder("legacy")
    m = inject_trigger(load_component(folder, "text_encoder"), input_name="input_ids",
                       output_name="last_hidden_state", token=TOKEN)
    nodes = list(m.graph.node)
    del m.graph.node[:]
    m.graph.node.extend(reversed(nodes))
    ids = np.full((2, 77), 49407, np.int32)
    ids[0, 3] = TOKEN
    out = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]).run(
        ["last_hidden_state"], {"input_ids": ids})[0]
    assert np.all(out == 3.0)                             # it still runs, and still fires
    found = triggers(scan_files(folder_files(folder, {"text_encoder": m}), is_sd=True))
    assert found and found[0].severity == Severity.CRITICAL
