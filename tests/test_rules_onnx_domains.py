"""ONNX-DOMAIN-UNKNOWN and ONNX-DOMAIN-HOSTCODE."""

from __future__ import annotations

from onnx import TensorProto, helper

from samples import benign_mlp, by_rule, make_model, scan_model, vi
from sdsecure.gate.report import Severity

X, Y = vi("x", TensorProto.FLOAT, [1, 4]), vi("y", TensorProto.FLOAT, [1, 4])


def one_node(op: str, domain: str, **kw):
    node = helper.make_node(op, ["x"], ["y"], name="n", domain=domain, **kw)
    return make_model([node], [X], [Y], extra_opsets=[(domain, 1)] if domain else ())


def test_unknown_domain_is_high():
    found = by_rule(scan_model(one_node("Backdoor", "evil.custom")), "ONNX-DOMAIN")
    f = found["ONNX-DOMAIN-UNKNOWN"][0]
    assert f.severity == Severity.HIGH
    assert f.evidence["domain"] == "evil.custom" and f.evidence["op_type"] == "Backdoor"
    assert f.where == "main/n (Backdoor)"


def test_vendor_op_outside_the_allowlist_is_unknown_but_allowlisted_ones_pass():
    assert "ONNX-DOMAIN-UNKNOWN" in by_rule(scan_model(one_node("BeamSearch", "com.microsoft")))
    assert by_rule(scan_model(one_node("FastGelu", "com.microsoft")), "ONNX-DOMAIN") == {}


def test_contrib_domain_runs_host_code_whatever_the_op_is_called():
    for op in ("ToUpper", "Relu", "StringRegexReplace"):
        found = by_rule(scan_model(one_node(op, "ai.onnx.contrib")), "ONNX-DOMAIN")
        assert [f.severity for f in found["ONNX-DOMAIN-HOSTCODE"]] == [Severity.CRITICAL]
        assert "ONNX-DOMAIN-UNKNOWN" not in found


def test_python_op_types_are_host_code_in_any_domain():
    for op, dom in (("PyOp", "custom.ops"), ("PythonOp", "com.microsoft"), ("pyop", "")):
        found = by_rule(scan_model(one_node(op, dom)), "ONNX-DOMAIN-HOSTCODE")
        assert found["ONNX-DOMAIN-HOSTCODE"][0].severity == Severity.CRITICAL, (op, dom)


def test_standard_domains_pass():
    m = make_model([helper.make_node("Relu", ["x"], ["h"], name="r", domain="ai.onnx"),
                    helper.make_node("Normalizer", ["h"], ["y"], name="n", domain="ai.onnx.ml", norm="L2")],
                   [X], [Y], extra_opsets=[("ai.onnx.ml", 3)])
    assert by_rule(scan_model(m), "ONNX-DOMAIN") == {}
    assert by_rule(scan_model(benign_mlp()), "ONNX-DOMAIN") == {}


def _function(domain: str, body_domain: str = "", body_op: str = "Relu"):
    body = [helper.make_node(body_op, ["a"], ["b"], name="inner", domain=body_domain)]
    opsets = [helper.make_opsetid("", 17)] + ([helper.make_opsetid(body_domain, 1)] if body_domain else [])
    fn = helper.make_function(domain, "MyAct", ["a"], ["b"], body, opsets)
    call = helper.make_node("MyAct", ["x"], ["y"], name="call", domain=domain)
    extra = [(domain, 1)] + ([(body_domain, 1)] if body_domain else [])
    return make_model([call], [X], [Y], functions=[fn], extra_opsets=extra)


def test_calling_a_local_function_with_a_benign_body_is_fine():
    assert by_rule(scan_model(_function("my.local.fns")), "ONNX-") == {}


def test_local_function_bodies_are_analysed():
    found = by_rule(scan_model(_function("my.local.fns", "ai.onnx.contrib", "PyOp")), "ONNX-DOMAIN")
    f = found["ONNX-DOMAIN-HOSTCODE"][0]
    assert f.where.startswith("function:my.local.fns:MyAct/")
    found = by_rule(scan_model(_function("my.local.fns", "evil.ops", "Steal")), "ONNX-DOMAIN")
    assert found["ONNX-DOMAIN-UNKNOWN"][0].where == "function:my.local.fns:MyAct/inner (Steal)"


def test_nodes_inside_if_branches_are_analysed():
    then_g = helper.make_graph([helper.make_node("PyOp", ["x"], ["t"], name="py", domain="ai.onnx.contrib")],
                               "then", [], [vi("t", TensorProto.FLOAT, [1, 4])])
    else_g = helper.make_graph([helper.make_node("Identity", ["x"], ["e"], name="id")],
                               "else", [], [vi("e", TensorProto.FLOAT, [1, 4])])
    m = make_model([helper.make_node("Constant", [], ["c"], name="c", value=helper.make_tensor("v", TensorProto.BOOL, [], [True])),
                    helper.make_node("If", ["c"], ["y"], name="if0", then_branch=then_g, else_branch=else_g)],
                   [X], [Y], extra_opsets=[("ai.onnx.contrib", 1)])
    f = by_rule(scan_model(m), "ONNX-DOMAIN-HOSTCODE")["ONNX-DOMAIN-HOSTCODE"][0]
    assert f.where == "main/if0.then_branch/py (PyOp)"


def test_declared_but_unused_host_code_domain_is_medium():
    m = benign_mlp()
    m.opset_import.append(helper.make_opsetid("ai.onnx.contrib", 1))
    found = by_rule(scan_model(m), "ONNX-DOMAIN-HOSTCODE")["ONNX-DOMAIN-HOSTCODE"]
    assert [f.severity for f in found] == [Severity.MEDIUM]
