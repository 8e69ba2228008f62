"""Malformed graphs are findings (or nothing), never a crash of the ONNX rules; every ONNX rule id is
documented and exercised by the tests."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
from onnx import TensorProto, helper

from samples import benign_vad, const, load_component, make_model, scan_model, sd_pipeline_folder, vi
from sdsecure.gate.rules import RULES, load_families

X, Y = vi("x", TensorProto.FLOAT, [1]), vi("y", TensorProto.FLOAT, [1])


def malformed_models():
    yield "if-without-branches", make_model([const("c", True, np.bool_), helper.make_node("If", ["c"], ["y"], name="if")], [X], [Y])
    yield "loop-without-body", make_model([helper.make_node("Loop", ["", ""], ["y"], name="loop")], [X], [Y])
    yield "scan-with-body", make_model([helper.make_node(
        "Scan", ["x"], ["y"], name="scan", num_scan_inputs=1,
        body=helper.make_graph([helper.make_node("Identity", ["a"], ["b"], name="id")], "b",
                               [vi("a", TensorProto.FLOAT, [])], [vi("b", TensorProto.FLOAT, [])]))], [X], [Y])
    yield "cycle", make_model([helper.make_node("Add", ["x", "z"], ["w"], name="a"),
                               helper.make_node("Relu", ["w"], ["z"], name="b"),
                               helper.make_node("Identity", ["z"], ["y"], name="c")], [X], [Y])
    yield "undefined-input", make_model([helper.make_node("Equal", ["x", "ghost"], ["e"], name="eq"),
                                         helper.make_node("Where", ["e", "x", "ghost2"], ["y"], name="w")], [X], [Y])
    yield "empty-names", make_model([helper.make_node("Relu", ["x"], [""], name=""),
                                     helper.make_node("Relu", ["x"], ["y"], name="")], [X], [Y])
    yield "recursive-function", make_model(
        [helper.make_node("F", ["x"], ["y"], name="call", domain="d")], [X], [Y],
        functions=[helper.make_function("d", "F", ["a"], ["b"], [helper.make_node("F", ["a"], ["b"], name="self", domain="d")],
                                        [helper.make_opsetid("", 17), helper.make_opsetid("d", 1)])],
        extra_opsets=[("d", 1)])
    yield "bad-attribute-values", make_model([helper.make_node("Slice", ["x", "x", "x"], ["y"], name="s"),
                                              helper.make_node("Resize", ["x", "", "x"], ["r"], name="r"),
                                              helper.make_node("ConstantOfShape", ["x"], ["c"], name="c")], [X], [Y])
    huge = TensorProto(name="h", data_type=TensorProto.FLOAT, dims=[-1, 3])
    yield "negative-dims", make_model([helper.make_node("Add", ["x", "h"], ["y"], name="a")], [X], [Y], [huge])
    yield "no-graph", helper.make_model(helper.make_graph([], "g", [], []))


@pytest.mark.parametrize("name,model", list(malformed_models()), ids=lambda v: v if isinstance(v, str) else "")
def test_malformed_models_do_not_crash(name, model):
    findings = scan_model(model)           # run_all raises if any rule crashes
    assert all(f.rule and f.message for f in findings)


def test_subgraph_heavy_model_is_analysed_without_crash():
    m = benign_vad()
    for node in m.graph.node:
        node.name = ""                      # nameless nodes are located by index ("#3")
    assert scan_model(m) is not None


def test_reused_fixture_graph_with_all_rules_is_stable():
    m = load_component(sd_pipeline_folder("legacy"), "text_encoder")
    first = [(f.rule, f.where, f.message) for f in scan_model(m, "text_encoder/model.onnx")]
    again = [(f.rule, f.where, f.message) for f in scan_model(m, "text_encoder/model.onnx")]
    assert first == again


ONNX_FAMILIES = ("onnx_structure", "onnx_domains", "onnx_extdata", "onnx_tensors", "onnx_bombs", "payloads", "backdoor")


def test_every_onnx_rule_is_documented_and_tested():
    load_families()
    mine = [r for r in RULES.values() if r.id.startswith(("ONNX-", "PAYLOAD-", "BACKDOOR-"))]
    assert len(mine) >= 20
    tests = "".join(p.read_text() for p in Path(__file__).parent.glob("test_*.py")
                    if p.name.startswith(("test_rules_onnx", "test_backdoor")))
    for r in mine:
        assert len(r.why) > 80 and len(r.fix) > 20 and r.title, r.id
        assert re.search(re.escape(r.id) + r"\b", tests), f"{r.id} is not exercised by a test"
