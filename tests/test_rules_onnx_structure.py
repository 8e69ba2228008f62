"""ONNX-PARSE and ONNX-CHECKER."""

from __future__ import annotations

import os

from onnx import TensorProto, helper

from samples import (benign_mlp, raw_tensor, by_rule, external_tensor, make_model, model_with_initializer, pickle_payload,
                     save_with_external_data, scan_folder, scan_model, sd_pipeline_folder, vi)
from sdsecure.gate.report import Severity


def test_unparseable_file_is_a_finding_not_a_crash():
    found = by_rule(scan_model(b"\x08\x96\x01 this is not protobuf \xff\xff\xff"), "ONNX-")
    assert [f.severity for f in found["ONNX-PARSE"]] == [Severity.HIGH]
    # the other ONNX rules stay silent instead of crashing on a model that is not there
    assert set(found) == {"ONNX-PARSE"}


def test_pickle_renamed_to_onnx_is_reported_with_what_it_looks_like():
    found = by_rule(scan_model(pickle_payload()), "ONNX-PARSE")["ONNX-PARSE"]
    assert found and found[0].evidence.get("looks_like") == "pickle"


def test_benign_model_parses_and_passes_the_checker():
    assert by_rule(scan_model(benign_mlp()), "ONNX-") == {}


def test_checker_rejects_a_graph_that_reads_an_undefined_tensor():
    m = make_model([helper.make_node("Relu", ["nowhere"], ["y"], name="r")],
                   [vi("x", TensorProto.FLOAT, [1])], [vi("y", TensorProto.FLOAT, [1])])
    found = by_rule(scan_model(m), "ONNX-CHECKER")["ONNX-CHECKER"]
    assert found[0].severity == Severity.MEDIUM
    assert "nowhere" in found[0].evidence["checker"]


def test_checker_rejects_unknown_standard_op():
    m = make_model([helper.make_node("NotAnOnnxOp", ["x"], ["y"], name="n")],
                   [vi("x", TensorProto.FLOAT, [1])], [vi("y", TensorProto.FLOAT, [1])])
    assert "ONNX-CHECKER" in by_rule(scan_model(m))


def test_checker_runs_on_external_data_models_without_touching_the_files(tmp_path, monkeypatch):
    """onnx.checker on a proto resolves external locations against the *working directory*; the
    gate's structural copy must avoid that, and a benign external-data model must pass."""
    folder = tmp_path / "m"
    save_with_external_data(benign_mlp(), folder)
    elsewhere = tmp_path / "cwd"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    seen: list[str] = []
    real_stat = os.stat

    def spy(p, *a, **k):
        seen.append(str(p))
        return real_stat(p, *a, **k)

    monkeypatch.setattr(os, "stat", spy)
    findings = scan_folder(folder)
    assert by_rule(findings, "ONNX-") == {}
    assert not any(s.endswith("weights.pb") for s in seen)


def test_checker_does_not_resolve_a_malicious_location_relative_to_cwd(tmp_path, monkeypatch):
    # a file named like the location exists in the cwd: onnx's checker would stat it
    monkeypatch.chdir(tmp_path)
    (tmp_path / "weights.bin").write_bytes(b"\0" * 16)
    m = model_with_initializer(external_tensor("w", "weights.bin"))
    found = by_rule(scan_model(m, "sub/model.onnx"))
    assert "ONNX-CHECKER" not in found                       # the checker never saw the location
    assert found["ONNX-EXTDATA-MISSING"][0].evidence["resolved"] == "sub/weights.bin"


def test_fixture_pipelines_pass_the_checker():
    for kind in ("legacy", "dynamo"):
        found = by_rule(scan_folder(sd_pipeline_folder(kind)), "ONNX-")
        assert found == {}, (kind, found)


def test_checker_catches_too_short_initializer_data():
    t = raw_tensor("w", b"\0" * 8)
    found = by_rule(scan_model(model_with_initializer(t)))
    assert "ONNX-CHECKER" in found and "ONNX-TENSOR-SIZE-MISMATCH" in found
