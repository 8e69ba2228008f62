"""Pinned fetch with the real huggingface_hub client against tests/hubserver.py (HF_ENDPOINT)."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
from hubserver import HubServer, hub_env, hub_server, make_plain_model  # noqa: F401 - fixtures

from sdsecure import hub
from sdsecure.errors import SecurityError, UserError
from sdsecure.gate import audit, load_unverified, validate
from sdsecure.gate.report import Severity
from sdsecure.lockfile import lock_document
from sdsecure.refs import embedded_path, parse_ref

MINE = ("HUB-", "LOCK-", "FILE-", "REPUTATION-")
SD_USED = {"model_index.json", "scheduler/scheduler_config.json", "sdsecure.lock.json", "text_encoder/model.onnx",
           "tokenizer/merges.txt", "tokenizer/special_tokens_map.json", "tokenizer/tokenizer_config.json",
           "tokenizer/vocab.json", "unet/model.onnx", "unet/weights.pb", "vae_decoder/model.onnx"}


def mine(report) -> list[tuple[str, str]]:
    """This module's findings (other rule families are tested elsewhere)."""
    return sorted((f.rule, f.file) for f in report.findings if f.rule.startswith(MINE))


def rules(report) -> set[str]:
    return {f.rule for f in report.findings}


@pytest.fixture(scope="module")
def repos(hub_server: HubServer, tmp_path_factory) -> dict[str, str]:
    """Publish the fixture repos once per module; returns {name: commit sha}."""
    base = tmp_path_factory.mktemp("repos")
    sd = base / "tiny-sd15"
    shutil.copytree(embedded_path(), sd)
    (sd / "safety_checker").mkdir()
    (sd / "safety_checker" / "model.onnx").write_bytes(b"not used by the pipeline")
    plain = make_plain_model(base / "plain")
    return {
        "sd": hub_server.add_repo("sdsecure/tiny-sd15", sd, security_status={"scansDone": True, "filesWithIssues": []}),
        "plain": hub_server.add_repo("org/plain", plain),
    }


def cache_snapshot(repo_id: str, sha: str) -> Path:
    return hub.hub_cache_dir() / hub.repo_folder(repo_id) / "snapshots" / sha


# -- pinned fetch ---------------------------------------------------------------------------------

def test_fetch_by_branch_resolves_to_sha_and_downloads_by_sha(hub_env, repos):
    vm = audit("sdsecure/tiny-sd15@main", progress=False)
    sha = repos["sd"]
    assert vm.revision == sha and vm.report.revision == sha
    assert vm.provenance()["sdsecure:revision"] == sha
    assert set(vm.files) == SD_USED                          # no safety_checker, no README
    downloads = [p for m, p in hub_env.requests if "/resolve/" in p]
    assert downloads and all(f"/resolve/{sha}/" in p for p in downloads)
    assert not any("safety_checker" in p or "README" in p for _, p in hub_env.requests if "/resolve/" in p)
    info = [p for m, p in hub_env.requests if p.startswith("/api/models/sdsecure/tiny-sd15/revision/main")]
    assert info and "securityStatus" in info[0] and "blobs" in info[0]
    # the branch is recorded in the cache (for offline runs), the snapshot is the HF layout
    refs = hub.hub_cache_dir() / hub.repo_folder("sdsecure/tiny-sd15") / "refs" / "main"
    assert refs.read_text() == sha
    assert os.path.islink(cache_snapshot("sdsecure/tiny-sd15", sha) / "unet" / "weights.pb")
    assert [r for r in mine(vm.report) if r[0] not in ("REPUTATION-HUB-CLEAN",)] == []
    assert vm.report.lockfile["status"] == "verified"          # the repo's own lockfile


def test_end_to_end_validate_of_the_tiny_pipeline_from_the_hub(hub_env, repos):
    vm = validate("sdsecure/tiny-sd15", progress=False)
    assert vm.verified and vm.report.verdict == "allowed" and vm.revision == repos["sd"]
    assert not [f for f in vm.report.findings if f.severity > Severity.INFO]


def test_separate_revision_argument_and_pinned_sha(hub_env, repos):
    vm = audit("org/plain", revision=repos["plain"], progress=False)
    assert vm.revision == repos["plain"]
    # a sha needs no resolution: the info call goes straight to the commit
    assert any(p.startswith(f"/api/models/org/plain/revision/{repos['plain']}") for _, p in hub_env.requests)
    assert set(vm.files) == {"README.md", "config.json", "model.onnx", "weights.pb"}    # non-SD: all files


def test_pin_survives_a_moving_branch(hub_env, repos, tmp_path):
    old = repos["plain"]
    newer = make_plain_model(tmp_path / "v2", seed=1)
    new = hub_env.add_repo("org/plain", newer, branch="next")
    try:
        assert audit("org/plain@next", progress=False).revision == new
        vm = audit(f"org/plain@{old}", progress=False)
        assert vm.revision == old
        assert vm.read_bytes("weights.pb") == (Path(cache_snapshot("org/plain", old)) / "weights.pb").read_bytes()
    finally:
        hub_env.repos["org/plain"].refs.pop("next")


def test_explicit_lockfile_pins_the_revision(hub_env, repos, tmp_path):
    vm = audit("org/plain", progress=False)
    lock = tmp_path / "plain.lock.json"
    lock.write_text(json.dumps(lock_document(vm)))       # what write_lockfile writes for an allowed model
    assert json.loads(lock.read_text())["revision"] == repos["plain"]
    moved = make_plain_model(tmp_path / "moved", seed=7)
    hub_env.add_repo("org/plain", moved, branch="main")          # main moves on
    try:
        vm = audit("org/plain", progress=False, lockfile=lock)
        locks = [f for f in vm.report.findings if f.rule == "LOCK-MISMATCH"]
        assert any(f.file == "" and "revision" in f.message for f in locks)
        assert "weights.pb" in {f.file for f in locks}          # model.onnx is the same graph
        assert vm.report.lockfile["status"] == "mismatch" and vm.report.verdict == "blocked"
    finally:
        hub_env.repos["org/plain"].refs["main"] = repos["plain"]


# -- integrity against the Hub's hashes --------------------------------------------------------------

def _tamper(hub_env: HubServer, repo_id: str, path: str, rev: str) -> None:
    commit = hub_env.repos[repo_id].resolve(rev)
    data = bytearray(commit.files[path])
    data[len(data) // 2] ^= 0xFF                        # same size: the client's size check passes
    hub_env.serve_instead(repo_id, path, bytes(data), rev)


def test_tampered_lfs_file_on_the_server_is_blocked(hub_env, repos):
    _tamper(hub_env, "org/plain", "weights.pb", repos["plain"])
    try:
        with pytest.raises(SecurityError) as exc:
            validate("org/plain", progress=False)
        blocking = exc.value.report.blocking_findings()
        lfs = [f for f in blocking if f.rule == "HUB-LFS-MISMATCH"]
        assert [f.file for f in lfs] == ["weights.pb"]
        assert lfs[0].evidence["expected_sha256"] != lfs[0].evidence["actual_sha256"]
    finally:
        hub_env.repos["org/plain"].resolve(repos["plain"]).served.clear()


def test_tampered_git_file_on_the_server_is_blocked(hub_env, repos):
    _tamper(hub_env, "org/plain", "config.json", repos["plain"])
    try:
        vm = audit("org/plain", progress=False)
        assert ("HUB-GIT-MISMATCH", "config.json") in mine(vm.report)
        assert vm.report.verdict == "blocked"
    finally:
        hub_env.repos["org/plain"].resolve(repos["plain"]).served.clear()


def test_truncated_download_is_a_clear_error(hub_env, repos):
    hub_env.serve_instead("org/plain", "weights.pb", b"short", repos["plain"])
    try:
        with pytest.raises(UserError, match="download of org/plain@.* failed"):
            audit("org/plain", progress=False)
    finally:
        hub_env.repos["org/plain"].resolve(repos["plain"]).served.clear()


def test_lfs_hashes_via_paths_info_when_model_info_has_no_file_metadata(hub_env, repos):
    repo = hub_env.repos["org/plain"]
    repo.siblings_metadata = False
    _tamper(hub_env, "org/plain", "weights.pb", repos["plain"])
    try:
        vm = audit("org/plain", progress=False)
        assert any(m == "POST" and "/paths-info/" in p for m, p in hub_env.requests)
        assert ("HUB-LFS-MISMATCH", "weights.pb") in mine(vm.report)
    finally:
        repo.siblings_metadata = True
        repo.resolve(repos["plain"]).served.clear()


def test_poisoned_cache_is_detected_on_the_next_run(hub_env, repos):
    audit("org/plain", progress=False)
    snap = cache_snapshot("org/plain", repos["plain"])
    blob = Path(os.path.realpath(snap / "weights.pb"))
    data = bytearray(blob.read_bytes())
    data[0] ^= 1
    blob.chmod(0o644)
    blob.write_bytes(bytes(data))
    (snap / "extra.onnx").write_bytes(b"dropped into the cache")
    vm = audit("org/plain", progress=False)
    assert ("HUB-LFS-MISMATCH", "weights.pb") in mine(vm.report)
    assert ("HUB-UNLISTED-FILE", "extra.onnx") in mine(vm.report)


def test_file_removed_from_the_cache(hub_env, repos):
    audit("org/plain", progress=False)
    (cache_snapshot("org/plain", repos["plain"]) / "config.json").unlink()
    hub_env.fail_all = True                     # Hub down: huggingface_hub itself refuses the partial snapshot
    with pytest.raises(UserError, match="not complete in the local Hub cache"):
        audit("org/plain", progress=False)
    hub_env.fail_all = False                    # online: the missing file is downloaded again
    vm = audit("org/plain", progress=False)
    assert "config.json" in vm.files and not [r for r in mine(vm.report) if r[0].startswith("HUB-")]


def test_check_remote_reports_missing_and_unlisted_files():
    from sdsecure.gate.blob import Blob

    remote = {"a.json": hub.HubFile("a.json", 2, "x"), "b.onnx": hub.HubFile("b.onnx", 1, "y", "0" * 64, 1),
              "safety_checker/model.onnx": hub.HubFile("safety_checker/model.onnx", 1, "z")}
    res = hub.FetchResult("o/n", "main", "a" * 40, Path("/x"), ["a.json", "b.onnx", "c.json"], remote)
    found = sorted((f.rule, f.file, f.severity) for f in hub.check_remote({"c.json": Blob.from_bytes(b"{}")}, res))
    assert found == [("HUB-FILE-MISSING", "a.json", Severity.HIGH), ("HUB-FILE-MISSING", "b.onnx", Severity.HIGH),
                     ("HUB-UNLISTED-FILE", "c.json", Severity.HIGH)]


# -- offline ---------------------------------------------------------------------------------------

def test_offline_mode_uses_the_cache_only(hub_env, repos, monkeypatch):
    online = audit("sdsecure/tiny-sd15", progress=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    hub_env.clear_log()
    vm = audit("sdsecure/tiny-sd15", progress=False)
    assert hub_env.requests == []                              # nothing left the machine
    assert vm.revision == online.revision
    assert {p: b.sha256 for p, b in vm.files.items()} == {p: b.sha256 for p, b in online.files.items()}
    found = dict(mine(vm.report))
    assert "HUB-OFFLINE" in found and "HUB-METADATA-UNAVAILABLE" not in found   # hashes checked from the record
    assert vm.report.reputation["hub"]["source"] == "cache" and vm.report.reputation["hub"]["as_of"]


def test_offline_without_cache_is_a_clear_error(hub_env, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(UserError, match="not in the local Hub cache.*HF_HUB_OFFLINE"):
        audit("org/plain", progress=False)
    assert hub_env.requests == []


def test_offline_with_unknown_branch_is_a_clear_error(hub_env, repos, monkeypatch):
    audit("org/plain", progress=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(UserError, match="not in the local Hub cache"):
        audit("org/plain@dev", progress=False)


def test_hub_down_falls_back_to_the_cache(hub_env, repos):
    audit("org/plain", progress=False)
    hub_env.fail_all = True
    vm = audit("org/plain", progress=False)
    offline = [f for f in vm.report.findings if f.rule == "HUB-OFFLINE"]
    assert offline and "unavailable" in offline[0].message and vm.revision == repos["plain"]


def test_hub_unreachable_and_nothing_cached(hub_env, monkeypatch):
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")      # discard port: connection refused
    with pytest.raises(UserError, match="could not be reached"):
        audit("org/plain", progress=False)


def test_offline_unverified_load(hub_env, repos, monkeypatch):
    audit("org/plain", progress=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    vm = load_unverified("org/plain", progress=False)
    assert vm.verified is False and vm.revision == repos["plain"] and "model.onnx" in vm.files


# -- errors -----------------------------------------------------------------------------------------

def test_unknown_repo_and_revision(hub_env, repos):
    with pytest.raises(UserError, match="not found on the Hub"):
        audit("org/missing", progress=False)
    with pytest.raises(UserError, match="revision 'nope' not found"):
        audit("org/plain@nope", progress=False)


def test_check_remote_without_metadata_says_so():
    res = hub.FetchResult("o/n", None, "a" * 40, Path("/nonexistent"), None, None)
    f = hub.check_remote({}, res)
    assert [x.rule for x in f] == ["HUB-METADATA-UNAVAILABLE"] and f[0].severity == Severity.INFO


def test_settings_are_read_at_call_time(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HOME", str(tmp_path / "h"))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.delenv("SDSECURE_CACHE", raising=False)
    assert hub.hub_cache_dir() == tmp_path / "h" / "hub"
    assert hub.sdsecure_cache_dir() == tmp_path / "h" / "sdsecure"
    monkeypatch.setenv("HF_HUB_OFFLINE", "true")
    assert hub.is_offline()
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    assert not hub.is_offline()
    assert parse_ref("org/name@v1").revision == "v1"


# -- more revisions, caches populated by others, the server itself ------------------------------------

def test_tags_and_pr_refs(hub_env, repos, tmp_path):
    hub_env.repos["org/plain"].refs.update({"v1.0": repos["plain"], "refs/pr/1": repos["plain"]})
    try:
        assert audit("org/plain@v1.0", progress=False).revision == repos["plain"]
        assert audit("org/plain", revision="refs/pr/1", progress=False).revision == repos["plain"]
        assert any("/revision/refs%2Fpr%2F1" in p for _, p in hub_env.requests)
        ref_file = hub.hub_cache_dir() / hub.repo_folder("org/plain") / "refs" / "refs" / "pr" / "1"
        assert ref_file.read_text() == repos["plain"]
    finally:
        for r in ("v1.0", "refs/pr/1"):
            hub_env.repos["org/plain"].refs.pop(r)


def test_hf_hub_cache_variable_wins(hub_env, repos, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "elsewhere"))
    vm = audit("org/plain", progress=False)
    assert (tmp_path / "elsewhere" / "models--org--plain" / "snapshots" / vm.revision / "model.onnx").exists()


def test_cache_filled_by_another_tool_offline_says_hashes_unchecked(hub_env, repos, monkeypatch):
    from huggingface_hub import snapshot_download

    snapshot_download("org/plain", cache_dir=str(hub.hub_cache_dir()), endpoint=hub_env.url)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    vm = audit("org/plain", progress=False)
    found = dict(mine(vm.report))
    assert "HUB-METADATA-UNAVAILABLE" in found and "HUB-OFFLINE" in found
    assert vm.report.reputation["hub"]["state"] == "unknown"                # never seen online by us


def test_server_speaks_the_real_client_protocol(hub_env, repos, tmp_path):
    import httpx2
    from huggingface_hub import HfApi, hf_hub_download

    api = HfApi(endpoint=hub_env.url)
    tree = {f.path: f for f in api.list_repo_tree("sdsecure/tiny-sd15", recursive=True, revision="main")}
    assert "unet" in tree and tree["unet/weights.pb"].lfs.sha256 and tree["model_index.json"].lfs is None
    top = {f.path for f in api.list_repo_tree("sdsecure/tiny-sd15", revision="main")}
    assert "unet" in top and "unet/weights.pb" not in top
    info = api.get_paths_info("sdsecure/tiny-sd15", ["unet/weights.pb", "tokenizer", "missing"], revision="main")
    assert sorted(type(i).__name__ for i in info) == ["RepoFile", "RepoFolder"]
    mi = api.model_info("sdsecure/tiny-sd15", files_metadata=True, securityStatus=True)
    assert mi.sha == repos["sd"] and mi.security_repo_status == {"scansDone": True, "filesWithIssues": []}
    lfs = {s.rfilename: s.lfs for s in mi.siblings}
    assert lfs["unet/weights.pb"].sha256 == tree["unet/weights.pb"].lfs.sha256
    path = hf_hub_download("sdsecure/tiny-sd15", "unet/weights.pb", revision=repos["sd"], endpoint=hub_env.url,
                           cache_dir=str(tmp_path / "c"))
    assert Path(path).read_bytes() == (embedded_path() / "unet" / "weights.pb").read_bytes()
    # LFS files are redirected to a "CDN" (another origin), which answers byte ranges
    r = httpx2.head(f"{hub_env.url}/sdsecure/tiny-sd15/resolve/main/unet/weights.pb")
    assert r.status_code == 302 and r.headers["X-Linked-Etag"].strip('"') == tree["unet/weights.pb"].lfs.sha256
    part = httpx2.get(r.headers["Location"], headers={"Range": "bytes=10-19"})
    assert part.status_code == 206 and part.content == (embedded_path() / "unet" / "weights.pb").read_bytes()[10:20]
    r = httpx2.head(f"{hub_env.url}/sdsecure/tiny-sd15/resolve/{repos['sd']}/model_index.json")
    assert r.status_code == 200 and r.headers["X-Repo-Commit"] == repos["sd"] and int(r.headers["Content-Length"]) > 0


def test_hub_snapshot_with_background_reads(hub_env, repos, monkeypatch):
    """Large files of a Hub snapshot (symlinks into the cache's blobs folder) are read in the background
    like local ones: same hashes, same verdict, tampering in the cache still caught."""
    from sdsecure.gate import blob as gb, files as gf
    plain = validate("sdsecure/tiny-sd15", progress=False)
    monkeypatch.setattr(gf, "IN_MEMORY_LIMIT", 100_000)
    monkeypatch.setattr(gb, "IN_MEMORY_LIMIT", 100_000)
    vm = validate("sdsecure/tiny-sd15", progress=False)
    assert any(b.deferred for b in vm.files.values())
    assert {p: b.sha256 for p, b in vm.files.items()} == {p: b.sha256 for p, b in plain.files.items()}
    assert vm.report.verdict == "allowed"
    snap = cache_snapshot("sdsecure/tiny-sd15", repos["sd"])
    target = Path(os.path.realpath(snap / "unet" / "weights.pb"))
    data = bytearray(target.read_bytes())
    data[-1] ^= 0xFF
    os.chmod(target, 0o644)
    target.write_bytes(bytes(data))
    tampered = audit("sdsecure/tiny-sd15", progress=False)
    assert ("HUB-LFS-MISMATCH", "unet/weights.pb") in mine(tampered.report)
    assert tampered.report.verdict == "blocked"
