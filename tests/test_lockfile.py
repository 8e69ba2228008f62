"""sdsecure.lock.json: parse, check (every mismatch blocks), write, and through the gate."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest

from sdsecure.errors import SecurityError, UserError
from sdsecure.gate import audit, load_unverified, validate
from sdsecure.gate.blob import Blob
from sdsecure.gate.report import Severity
from sdsecure.lockfile import LOCKFILE_NAME, LockError, check_lockfile, parse_lockfile, write_lockfile


def blobs(files: dict[str, bytes]) -> dict[str, Blob]:
    return {k: Blob.from_bytes(v) for k, v in files.items()}


def lock_for(files: dict[str, Blob], **extra) -> dict:
    return {"format": 1, "repo": "org/name", "revision": "a" * 40,
            "files": {p: {"sha256": b.sha256, "size": b.size} for p, b in files.items()}, **extra}


FILES = blobs({"model_index.json": b"{}", "unet/model.onnx": b"graph", "unet/weights.pb": b"w" * 100})


def rules(findings) -> list[str]:
    return sorted(f.rule for f in findings)


def test_matching_lockfile_has_no_findings():
    assert check_lockfile(FILES, lock_for(FILES), revision="a" * 40, repo="org/name") == []


def test_changed_file_blocks():
    lock = lock_for(FILES)
    tampered = dict(FILES, **{"unet/weights.pb": Blob.from_bytes(b"x" * 100)})
    f = check_lockfile(tampered, lock)
    assert rules(f) == ["LOCK-MISMATCH"] and f[0].file == "unet/weights.pb" and f[0].severity == Severity.CRITICAL
    assert f[0].evidence["expected_sha256"] == FILES["unet/weights.pb"].sha256


def test_size_only_difference_blocks():
    lock = lock_for(FILES)
    lock["files"]["unet/model.onnx"]["size"] += 1
    assert rules(check_lockfile(FILES, lock)) == ["LOCK-MISMATCH"]


def test_missing_file_blocks():
    lock = lock_for(FILES)
    less = {k: v for k, v in FILES.items() if k != "unet/model.onnx"}
    f = check_lockfile(less, lock)
    assert rules(f) == ["LOCK-MISMATCH"] and "missing" in f[0].message


def test_extra_model_file_blocks_but_docs_do_not():
    lock = lock_for(FILES)
    more = dict(FILES, **{"unet/extra.onnx_data": Blob.from_bytes(b"?"), "README.md": Blob.from_bytes(b"# hi"),
                          LOCKFILE_NAME: Blob.from_bytes(b"{}")})
    f = check_lockfile(more, lock)
    assert [(x.rule, x.file, x.severity) for x in f] == [
        ("LOCK-EXTRA-FILE", "README.md", Severity.INFO),
        ("LOCK-MISMATCH", "unet/extra.onnx_data", Severity.CRITICAL)]


def test_revision_mismatch_blocks_and_repo_rename_is_low():
    f = check_lockfile(FILES, lock_for(FILES), revision="b" * 40)
    assert rules(f) == ["LOCK-MISMATCH"] and f[0].evidence["expected"] == "a" * 40
    f = check_lockfile(FILES, lock_for(FILES), revision="a" * 40, repo="fork/name")
    assert [(x.rule, x.severity) for x in f] == [("LOCK-REPO-DIFFERS", Severity.LOW)]


@pytest.mark.parametrize("doc,msg", [
    (b"not json", "JSON"),
    (b"[]", "object"),
    (json.dumps({"format": 2, "files": {"a": {"sha256": "0" * 64, "size": 1}}}).encode(), "format"),
    (json.dumps({"files": {}}).encode(), "empty"),
    (json.dumps({"files": {"../etc/passwd": {"sha256": "0" * 64, "size": 1}}}).encode(), "unsafe"),
    (json.dumps({"files": {"/abs": {"sha256": "0" * 64, "size": 1}}}).encode(), "unsafe"),
    (json.dumps({"files": {"a//b": {"sha256": "0" * 64, "size": 1}}}).encode(), "normal form"),
    (json.dumps({"files": {"a": {"sha256": "xyz", "size": 1}}}).encode(), "sha256"),
    (json.dumps({"files": {"a": {"sha256": "0" * 64, "size": -1}}}).encode(), "size"),
    (json.dumps({"files": {"a": {"sha256": "0" * 64, "size": True}}}).encode(), "size"),
])
def test_malformed_lockfiles_are_invalid(doc, msg):
    with pytest.raises(LockError, match=msg):
        parse_lockfile(doc)
    f = check_lockfile(FILES, doc)
    assert rules(f) == ["LOCK-INVALID"] and f[0].severity == Severity.CRITICAL


def test_parse_records_own_sha256():
    data = json.dumps(lock_for(FILES)).encode()
    lock = parse_lockfile(data, "x.json")
    assert lock.sha256 == hashlib.sha256(data).hexdigest() and lock.revision == "a" * 40
    assert set(lock.files) == set(FILES)


# -- through the gate (a small non-SD folder, so the result only depends on files and lockfile) ------

@pytest.fixture
def folder(tmp_path: Path) -> Path:
    root = tmp_path / "m"
    (root / "sub").mkdir(parents=True)
    (root / "config.json").write_text('{"a": 1}')
    (root / "sub" / "data.txt").write_text("hello")
    return root


def test_write_then_verify_roundtrip(folder: Path, tmp_path: Path):
    vm = audit(str(folder), progress=False)
    assert vm.report.lockfile == {"status": "absent"} and vm.lockfile_sha256 is None
    out = tmp_path / "pins" / "my.lock.json"
    sha = write_lockfile(vm, out)
    doc = json.loads(out.read_text())
    assert doc["format"] == 1 and doc["revision"] is None and set(doc["files"]) == {"config.json", "sub/data.txt"}
    assert sha == hashlib.sha256(out.read_bytes()).hexdigest()

    vm2 = validate(str(folder), progress=False, lockfile=out)
    assert vm2.report.lockfile["status"] == "verified" and vm2.lockfile_sha256 == sha
    assert vm2.provenance()["sdsecure:lockfile_sha256"] == sha

    (folder / "sub" / "data.txt").write_text("hellO")
    with pytest.raises(SecurityError) as exc:
        validate(str(folder), progress=False, lockfile=out)
    assert exc.value.report.lockfile["status"] == "mismatch"
    assert [f.file for f in exc.value.report.blocking_findings()] == ["sub/data.txt"]


def test_lockfile_inside_the_folder_is_verified(folder: Path):
    vm = audit(str(folder), progress=False)
    write_lockfile(vm, folder / LOCKFILE_NAME)
    vm = validate(str(folder), progress=False)
    assert vm.report.lockfile["path"] == LOCKFILE_NAME and vm.report.lockfile["status"] == "verified"
    (folder / "new.onnx").write_bytes(b"unlocked model")
    with pytest.raises(SecurityError, match="LOCK-MISMATCH"):
        validate(str(folder), progress=False)


def test_unverified_load_reports_the_mismatch_but_does_not_block(folder: Path, tmp_path: Path):
    out = tmp_path / "l.json"
    write_lockfile(audit(str(folder), progress=False), out)
    (folder / "config.json").write_text('{"a": 2}')
    vm = load_unverified(str(folder), progress=False, lockfile=out)
    assert vm.verified is False and vm.report.verdict == "allowed"
    assert [f.rule for f in vm.report.findings] == ["LOCK-MISMATCH"]
    assert vm.provenance()["sdsecure:verdict"] == "unverified"
    with pytest.raises(UserError, match="not validated"):
        write_lockfile(vm, tmp_path / "x.json")


def test_invalid_lockfile_inside_the_folder_blocks(folder: Path):
    (folder / LOCKFILE_NAME).write_text("{broken")
    with pytest.raises(SecurityError, match="LOCK-INVALID"):
        validate(str(folder), progress=False)


def test_missing_explicit_lockfile_is_a_user_error(folder: Path, tmp_path: Path):
    with pytest.raises(UserError, match="cannot open"):
        validate(str(folder), progress=False, lockfile=tmp_path / "nope.json")


def test_embedded_model_lockfile_is_compatible(tmp_path: Path):
    from sdsecure.refs import embedded_path

    src = embedded_path()
    lock = parse_lockfile((src / LOCKFILE_NAME).read_bytes())
    copy = tmp_path / "tiny"
    shutil.copytree(src, copy)
    from sdsecure.gate.files import walk_snapshot

    files = walk_snapshot(copy, progress=False).files
    assert check_lockfile(files, lock) == []
    (copy / "unet" / "weights.pb").write_bytes(b"\0" * (copy / "unet" / "weights.pb").stat().st_size)
    files = walk_snapshot(copy, progress=False).files
    assert [f.file for f in check_lockfile(files, lock)] == ["unet/weights.pb"]
