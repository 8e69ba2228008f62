"""Reports: text for people, JSON for machines, SARIF 2.1.0 validated against the official schema
(vendored in tests/data, see its README)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import jsonschema
import pytest

from sdsecure import __version__
from sdsecure.gate.render import node_from_where, render, render_json, render_sarif, render_text
from sdsecure.gate.report import FileRecord, Finding, Report, Severity
from sdsecure.gate.rules import RULES, load_families

SCHEMA_PATH = Path(__file__).parent / "data" / "sarif-schema-2.1.0.json"
SCHEMA_SHA256 = "c3b4bb2d6093897483348925aaa73af03b3e3f4bd4ca38cef26dcb4212a2682e"


def sarif_validator() -> jsonschema.Draft4Validator:
    schema = json.loads(SCHEMA_PATH.read_text(encoding="utf-8"))
    return jsonschema.Draft4Validator(schema, format_checker=jsonschema.FormatChecker())


def sample_report(policy: str = "default") -> Report:
    return Report(
        model_ref="org/model", revision="0123456789abcdef0123456789abcdef01234567", policy=policy,
        files=[FileRecord("unet/model.onnx", 1234, "a" * 64), FileRecord("my weights/x.pkl", 99, "b" * 64)],
        findings=[
            Finding("SD-CROSS-ATTN-DIM", Severity.HIGH, "unet/model.onnx",
                    "main//down/attn2/to_k/MatMul (MatMul)", "UNet expects width 12, text encoder produces 8",
                    {"unet_width": 12, "text_hidden": 8, "nodes": ["/down/attn2/to_k/MatMul"]}),
            Finding("PICKLE-DANGEROUS-GLOBAL", Severity.CRITICAL, "my weights/x.pkl", "byte 2",
                    "pickle imports and calls dangerous global posix.system (REDUCE at byte 20)",
                    {"global": "posix.system", "call_args": ["id"], "long": "z" * 500}),
            Finding("CONFIG-SCHEDULER-CLASS", Severity.INFO, "scheduler/scheduler_config.json", "_class_name",
                    "LMSDiscreteScheduler is not implemented here", {"class": "LMSDiscreteScheduler"}),
            Finding("ONNX-BACKDOOR-EXPLAINED", Severity.INFO, "text_encoder/model.onnx",
                    "main/ArgMax_12 (ArgMax)", "CLIP pooled output: ArgMax over input_ids then Gather",
                    {"explained": True}),
            Finding("GATE-INTERNAL-ERROR", Severity.MEDIUM, "", "", "something repo-wide", {}),
            Finding("UNDECLARED-RULE", Severity.LOW, "a b/c#d.json", "key", "a rule nobody declared", {}),
        ],
        reputation={"hub": {"state": "flagged", "source": "live", "as_of": "2026-01-01T00:00:00Z",
                            "files_with_issues": ["unet/model.onnx"]},
                    "advisories": [{"id": "SDSEC-2026-001", "summary": "PAIT-ONNX-200 flag on the Hub"}]},
        lockfile={"path": "sdsecure.lock.json", "sha256": "c" * 64, "status": "verified"},
    )


# --- text ----------------------------------------------------------------------------------------------

def test_text_report_verdict_first_then_counts():
    text = render_text(sample_report())
    lines = text.splitlines()
    assert lines[0].startswith("VERDICT: BLOCKED") and "default policy: blocks critical" in lines[0]
    assert "org/model" in lines[1] and "0123456789abcdef" in lines[1]
    assert lines[2].startswith("findings: 1 critical, 1 high, 1 medium, 1 low, 2 info") and "blocking: 1" in lines[2]
    assert "explained benign patterns: 1" in lines[2]


def test_text_findings_sorted_by_severity_with_location_and_evidence():
    text = render_text(sample_report())
    order = [text.index(r) for r in ("PICKLE-DANGEROUS-GLOBAL", "SD-CROSS-ATTN-DIM", "GATE-INTERNAL-ERROR",
                                     "UNDECLARED-RULE", "CONFIG-SCHEDULER-CLASS")]
    assert order == sorted(order)
    assert "[CRITICAL] PICKLE-DANGEROUS-GLOBAL  BLOCKS" in text
    assert "[HIGH    ] SD-CROSS-ATTN-DIM\n" in text                 # high does not block by default
    assert "my weights/x.pkl @ byte 2" in text
    assert 'evidence: global=posix.system, call_args=["id"]' in text
    assert "z" * 100 not in text                                   # evidence is summarised
    assert "(repository)" in text                                  # finding without a file


def test_text_explained_patterns_listed_apart():
    text = render_text(sample_report())
    findings_part, rest = text.split("Explained benign patterns", 1)
    assert "ONNX-BACKDOOR-EXPLAINED" not in findings_part
    assert "ONNX-BACKDOOR-EXPLAINED" in rest.split("Reputation")[0]


def test_text_reputation_lockfile_and_files():
    text = render_text(sample_report())
    assert "Hub scan status: flagged (source: live, as_of: 2026-01-01T00:00:00Z)" in text
    assert "flagged by the Hub: unet/model.onnx" in text
    assert "advisory SDSEC-2026-001: PAIT-ONNX-200 flag on the Hub" in text
    assert "Lockfile: verified | sdsecure.lock.json | sha256 " + "c" * 64 in text
    assert "Files hashed: 2 (1.3 KB), sha256:" in text
    assert f"{'a' * 64}          1234  unet/model.onnx" in text


def test_text_strict_policy_marks_more_as_blocking():
    text = render_text(sample_report("strict"))
    assert "strict policy: blocks medium and above" in text.splitlines()[0]
    assert "SD-CROSS-ATTN-DIM  BLOCKS" in text and "GATE-INTERNAL-ERROR  BLOCKS" in text
    assert "UNDECLARED-RULE  BLOCKS" not in text


def test_text_allowed_report():
    rep = Report("embedded", None, "audit", files=[], findings=[])
    text = render_text(rep)
    assert text.startswith("VERDICT: ALLOWED  (audit policy: never blocks)")
    assert "Findings: none" in text and "Lockfile: not checked" in text and "not assessed" in text


# --- JSON ----------------------------------------------------------------------------------------------

def test_json_is_report_to_dict_plus_tool():
    rep = sample_report()
    doc = json.loads(render_json(rep))
    assert doc["tool"] == {"name": "sdsecure", "version": __version__}
    del doc["tool"]
    assert doc == json.loads(json.dumps(rep.to_dict()))
    assert doc["verdict"] == "blocked" and doc["findings"][1]["severity"] == "critical"


# --- SARIF ---------------------------------------------------------------------------------------------

def test_vendored_schema_is_the_recorded_one():
    assert hashlib.sha256(SCHEMA_PATH.read_bytes()).hexdigest() == SCHEMA_SHA256


def test_sarif_validates_against_the_official_schema():
    doc = json.loads(render_sarif(sample_report()))
    sarif_validator().validate(doc)
    assert doc["version"] == "2.1.0"


def test_schema_validation_really_rejects_bad_sarif():
    doc = json.loads(render_sarif(sample_report()))
    doc["runs"][0]["results"][0]["level"] = "fatal"
    with pytest.raises(jsonschema.ValidationError):
        sarif_validator().validate(doc)


def test_sarif_rules_come_from_the_registry_with_help():
    load_families()
    doc = json.loads(render_sarif(sample_report()))
    driver = doc["runs"][0]["tool"]["driver"]
    assert driver["name"] == "sdsecure" and driver["version"] == __version__
    ids = [r["id"] for r in driver["rules"]]
    assert set(RULES) <= set(ids) and "UNDECLARED-RULE" in ids
    pickle_rule = next(r for r in driver["rules"] if r["id"] == "PICKLE-DANGEROUS-GLOBAL")
    assert RULES["PICKLE-DANGEROUS-GLOBAL"].why in pickle_rule["help"]["text"]
    assert RULES["PICKLE-DANGEROUS-GLOBAL"].fix in pickle_rule["help"]["markdown"]
    assert pickle_rule["defaultConfiguration"]["level"] == "error"
    assert pickle_rule["properties"]["security-severity"] == "9.5"


def test_sarif_results_levels_locations_and_properties():
    doc = json.loads(render_sarif(sample_report()))
    run = doc["runs"][0]
    rules = run["tool"]["driver"]["rules"]
    by_rule = {r["ruleId"]: r for r in run["results"]}
    for r in run["results"]:
        assert rules[r["ruleIndex"]]["id"] == r["ruleId"]
    assert {k: v["level"] for k, v in by_rule.items()} == {
        "PICKLE-DANGEROUS-GLOBAL": "error", "SD-CROSS-ATTN-DIM": "error", "GATE-INTERNAL-ERROR": "warning",
        "UNDECLARED-RULE": "note", "CONFIG-SCHEDULER-CLASS": "note", "ONNX-BACKDOOR-EXPLAINED": "note"}
    cross = by_rule["SD-CROSS-ATTN-DIM"]
    loc = cross["locations"][0]
    assert loc["physicalLocation"]["artifactLocation"]["uri"] == "unet/model.onnx"
    assert loc["logicalLocations"][0]["name"] == "/down/attn2/to_k/MatMul"
    assert cross["properties"]["severity"] == "high" and cross["properties"]["evidence"]["unet_width"] == 12
    assert by_rule["PICKLE-DANGEROUS-GLOBAL"]["locations"][0]["physicalLocation"]["artifactLocation"]["uri"] \
        == "my%20weights/x.pkl"
    assert by_rule["UNDECLARED-RULE"]["locations"][0]["physicalLocation"]["artifactLocation"]["uri"] \
        == "a%20b/c%23d.json"
    assert "locations" not in by_rule["GATE-INTERNAL-ERROR"]
    assert run["properties"]["verdict"] == "blocked"
    assert run["artifacts"][0]["hashes"]["sha-256"] == "a" * 64


@pytest.mark.parametrize("where,node", [
    ("main//model/unet/Where_7 (Where)", "/model/unet/Where_7"),
    ("main/If_3.then_branch/Where_7 (Where)", "If_3.then_branch/Where_7"),
    ("byte 12", None), ("archive/data.pkl @ byte 3", None), ("_class_name", None),
])
def test_node_from_where(where, node):
    assert node_from_where(where) == node


def test_render_dispatch():
    rep = sample_report()
    assert render(rep, "text") == render_text(rep)
    assert json.loads(render(rep, "sarif"))["version"] == "2.1.0"
    with pytest.raises(ValueError):
        render(rep, "xml")
