"""Reputation: the Hub's scan status (through our Hub server), local advisories, offline cache."""

from __future__ import annotations

import datetime as dt
import shutil

import pytest
from hubserver import HubServer, hub_env, hub_server, make_plain_model  # noqa: F401 - fixtures

from sdsecure.gate import audit
from sdsecure.gate import reputation as rep
from sdsecure.gate.blob import Blob
from sdsecure.gate.report import Severity
from sdsecure.refs import embedded_path

# The shape the Hub answers with (fields beyond scansDone / filesWithIssues[*].path are optional).
FLAGGED = {
    "scansDone": True,
    "filesWithIssues": [
        {"path": "unet/model.onnx", "level": "suspicious",
         "protectAiScan": {"status": "unsafe", "message": "PAIT-ONNX-200 architectural backdoor"},
         "avScan": {"status": "safe"}, "pickleImportScan": {"status": "unscanned"}},
        {"path": "safety_checker/model.onnx", "level": "suspicious"},
    ],
}
CLEAN = {"scansDone": True, "filesWithIssues": []}
FILES = {"unet/model.onnx": Blob.from_bytes(b"graph"), "model_index.json": Blob.from_bytes(b"{}")}


def by_rule(findings) -> dict[str, list]:
    out: dict[str, list] = {}
    for f in findings:
        out.setdefault(f.rule, []).append(f)
    return out


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("SDSECURE_CACHE", str(tmp_path / "sdsecure-cache"))
    return tmp_path / "sdsecure-cache"


# -- parsing ------------------------------------------------------------------------------------------

def test_parse_flagged_payload():
    s = rep.parse_security_status(FLAGGED)
    assert s["state"] == "flagged" and s["scans_done"] is True
    first = s["files_with_issues"][0]
    assert first["path"] == "unet/model.onnx" and first["level"] == "suspicious"
    assert first["scanners"]["protectAiScan"].startswith("unsafe: PAIT-ONNX-200")


@pytest.mark.parametrize("raw,state", [
    (CLEAN, "scanned-clean"),
    ({"scansDone": False, "filesWithIssues": []}, "unknown"),       # scans pending: not clean
    ({"scansDone": True}, "unknown"),                               # no list: cannot say clean
    ({"filesWithIssues": [{"path": "a.onnx"}]}, "flagged"),
    ({"filesWithIssues": ["a.onnx", 3, {"nopath": 1}]}, "flagged"),  # odd items are skipped, not fatal
    (None, "unknown"), ([], "unknown"), ("safe", "unknown"), ({"scansDone": "yes"}, "unknown"),
])
def test_parse_is_defensive(raw, state):
    assert rep.parse_security_status(raw)["state"] == state


# -- assessment ---------------------------------------------------------------------------------------

def test_flagged_file_is_medium_and_unused_file_is_info(cache):
    info, found = rep.assess(repo_id="org/x", revision="a" * 40, files=FILES, live_status=FLAGGED, live=True,
                             fetched_at="2026-11-27T00:00:00+00:00")
    flags = by_rule(found)["REPUTATION-HUB-FLAGGED"]
    assert [(f.file, f.severity) for f in flags] == [("unet/model.onnx", Severity.MEDIUM),
                                                     ("safety_checker/model.onnx", Severity.INFO)]
    assert "own analysis decides" in flags[0].message and "PAIT-ONNX-200" in flags[0].message
    assert info["hub"]["state"] == "flagged" and info["hub"]["source"] == "live"


def test_clean_status_is_info_only(cache):
    info, found = rep.assess(repo_id="org/x", revision=None, files=FILES, live_status=CLEAN, live=True,
                             fetched_at="t")
    assert [(f.rule, f.severity) for f in found] == [("REPUTATION-HUB-CLEAN", Severity.INFO)]
    assert "not a guarantee" in found[0].message


def test_unknown_is_reported_as_unknown_never_as_safe(cache):
    info, found = rep.assess(repo_id="org/x", revision=None, files=FILES, live_status=None, live=True)
    assert info["hub"]["state"] == "unknown"
    assert [(f.rule, f.severity) for f in found] == [("REPUTATION-UNKNOWN", Severity.LOW)]
    info, found = rep.assess(repo_id="org/x", revision=None, files=FILES, live=False)   # offline, no cache
    assert info["hub"]["state"] == "unknown" and info["hub"]["source"] == "none"
    assert "unknown is not safe" in found[0].message


def test_last_known_status_is_cached_and_shown_offline_with_its_date(cache):
    rep.assess(repo_id="org/x", revision="a" * 40, files=FILES, live_status=FLAGGED, live=True,
               fetched_at="2026-11-01T10:00:00+00:00")
    info, found = rep.assess(repo_id="org/x", revision="a" * 40, files=FILES, live=False)
    assert info["hub"]["source"] == "cache" and info["hub"]["as_of"] == "2026-11-01T10:00:00+00:00"
    flags = by_rule(found)["REPUTATION-HUB-FLAGGED"]
    assert "cached" in flags[0].message and "2026-11-01" in flags[0].message
    # a later online answer without status does not erase what was known
    info, _ = rep.assess(repo_id="org/x", revision=None, files=FILES, live_status=None, live=True)
    assert info["hub"]["state"] == "flagged" and info["hub"]["source"] == "cache"


def test_local_models_have_no_hub_status(cache):
    info, found = rep.assess(repo_id=None, revision=None, files=FILES)
    assert info == {"hub": {"state": "not-applicable", "source": "none"}, "advisories": []} and found == []


# -- advisories -----------------------------------------------------------------------------------------

def test_advisory_list_is_dated_and_sourced():
    advs = rep.load_advisories()
    repos = {a["repo"] for a in advs}
    assert {"modularai/stable-diffusion-1.5-onnx", "stabilityai/stable-diffusion-xl-base-1.0"} <= repos
    for a in advs:
        dt.date.fromisoformat(a["recorded"])
        assert a["sources"] and all(isinstance(s, str) and s for s in a["sources"])
        assert a["rule"] == "PAIT-ONNX-200"
    modular = next(a for a in advs if a["repo"] == "modularai/stable-diffusion-1.5-onnx")
    assert "stable-diffusion-xl-base-1.0" in modular["note"]


def test_advisory_matches_repo_case_insensitively(cache):
    info, found = rep.assess(repo_id="ModularAI/Stable-Diffusion-1.5-ONNX", revision="b" * 40, files=FILES,
                             live_status=CLEAN, live=True)
    adv = by_rule(found)["REPUTATION-ADVISORY"]
    assert len(adv) == 1 and adv[0].severity == Severity.MEDIUM and "PAIT-ONNX-200" in adv[0].message
    assert info["advisories"][0]["matched_by"] == "repo" and info["advisories"][0]["sources"]
    _, found = rep.assess(repo_id="org/other", revision=None, files=FILES, live_status=CLEAN, live=True)
    assert "REPUTATION-ADVISORY" not in by_rule(found)


def test_advisory_matches_a_file_hash_anywhere(cache, monkeypatch):
    bad = Blob.from_bytes(b"known bad weights")
    monkeypatch.setattr(rep, "load_advisories", lambda: [
        {"id": "T-1", "title": "known bad file", "sha256": [bad.sha256], "recorded": "2026-01-01",
         "sources": ["test"]}])
    info, found = rep.assess(repo_id=None, revision=None, files={**FILES, "w/renamed.pb": bad})
    assert [(f.rule, f.file) for f in found] == [("REPUTATION-ADVISORY", "w/renamed.pb")]
    _, found = rep.assess(repo_id=None, revision=None, files=FILES)
    assert found == []


def test_advisory_limited_to_revisions(cache, monkeypatch):
    monkeypatch.setattr(rep, "load_advisories", lambda: [
        {"id": "T-2", "repo": "org/x", "revisions": ["a" * 40], "recorded": "2026-01-01", "sources": ["t"]}])
    assert by_rule(rep.assess(repo_id="org/x", revision="a" * 40, files=FILES)[1]).get("REPUTATION-ADVISORY")
    assert not by_rule(rep.assess(repo_id="org/x", revision="c" * 40, files=FILES)[1]).get("REPUTATION-ADVISORY")


# -- through the gate and the Hub server -------------------------------------------------------------

@pytest.fixture(scope="module")
def flagged_repo(hub_server: HubServer, tmp_path_factory):
    src = tmp_path_factory.mktemp("r") / "sd"
    shutil.copytree(embedded_path(), src)
    (src / "safety_checker").mkdir()
    (src / "safety_checker" / "model.onnx").write_bytes(b"unused")
    hub_server.add_repo("modularai/stable-diffusion-1.5-onnx", src, security_status=FLAGGED)
    hub_server.add_repo("org/no-status", make_plain_model(tmp_path_factory.mktemp("p") / "p"))
    return "modularai/stable-diffusion-1.5-onnx"


def test_hub_flag_and_advisory_are_reported_not_decisive(hub_env, flagged_repo, monkeypatch):
    vm = audit(flagged_repo, progress=False)
    found = by_rule(vm.report.findings)
    assert [(f.file, f.severity) for f in found["REPUTATION-HUB-FLAGGED"]] == [
        ("unet/model.onnx", Severity.MEDIUM), ("safety_checker/model.onnx", Severity.INFO)]
    assert [f.severity for f in found["REPUTATION-ADVISORY"]] == [Severity.MEDIUM]
    hub_rep = vm.report.reputation["hub"]
    assert hub_rep["state"] == "flagged" and hub_rep["source"] == "live" and hub_rep["revision"] == vm.revision
    # reputation alone never blocks the default policy (medium); strict blocks medium and above
    assert not [f for f in vm.report.blocking_findings() if f.rule.startswith("REPUTATION-")]
    strict = audit(flagged_repo, "strict", progress=False)
    assert any(f.rule == "REPUTATION-HUB-FLAGGED" for f in strict.report.blocking_findings())
    # offline: the cached status is shown with its date
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    off = audit(flagged_repo, progress=False)
    assert off.report.reputation["hub"]["source"] == "cache"
    assert off.report.reputation["hub"]["as_of"] == strict.report.reputation["hub"]["as_of"]
    assert by_rule(off.report.findings)["REPUTATION-ADVISORY"]


def test_hub_without_security_status_is_unknown(hub_env, flagged_repo):
    vm = audit("org/no-status", progress=False)
    found = by_rule(vm.report.findings)
    assert "REPUTATION-UNKNOWN" in found and "REPUTATION-HUB-CLEAN" not in found
    assert vm.report.reputation["hub"]["state"] == "unknown"
