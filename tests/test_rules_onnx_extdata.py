"""ONNX-EXTDATA-*: external data locations, ranges and keys, and regression tests for ONNX's own
external-data CVEs run through the whole gate (`audit()` on a folder: the file walker plus the rules).

Each CVE test builds the malicious model folder itself, with a secret file *outside* it, and asserts
that the gate (a) flags the model so that the default policy blocks it and (b) never opens the
escaped path: every file descriptor the process opens during the audit is resolved through
/proc/self/fd and compared with the secret's inode.
"""

from __future__ import annotations

import builtins
import os
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, numpy_helper

from samples import (benign_mlp, by_rule, external_tensor, model_with_initializer, save_with_external_data,
                     scan_folder, scan_model, sd_pipeline_folder)
from sdsecure.gate import audit
from sdsecure.gate.report import Severity
from sdsecure.gate.rules.onnx_extdata import classify_location

SECRET = b"TOP-SECRET-API-KEY-0123456789abcdef"


# ------------------------------------------------------------------------------------------------
# unit tests on locations, ranges and keys (rules only)
# ------------------------------------------------------------------------------------------------

def ext(location: str = "weights.bin", *, offset="0", length="16", extra=None, data: bytes = b"\0" * 16,
        model_path: str = "model.onnx", files: dict | None = None):
    m = model_with_initializer(external_tensor("w", location, offset=offset, length=length, extra=extra))
    folder = model_path.rsplit("/", 1)[0] + "/" if "/" in model_path else ""
    extra_files = {folder + "weights.bin": data} if files is None else files
    return by_rule(scan_model(m, model_path, extra=extra_files), "ONNX-EXTDATA")


@pytest.mark.parametrize("location,rule", [
    ("../weights.bin", "ONNX-EXTDATA-TRAVERSAL"),
    ("sub/../../weights.bin", "ONNX-EXTDATA-TRAVERSAL"),
    ("..\\..\\weights.bin", "ONNX-EXTDATA-TRAVERSAL"),
    ("weights.bin\x00../../x", "ONNX-EXTDATA-TRAVERSAL"),
    ("/etc/passwd", "ONNX-EXTDATA-ABSOLUTE"),
    ("C:\\Users\\me\\.ssh\\id_rsa", "ONNX-EXTDATA-ABSOLUTE"),
    ("c:secrets.bin", "ONNX-EXTDATA-ABSOLUTE"),
    ("\\\\server\\share\\w.bin", "ONNX-EXTDATA-ABSOLUTE"),
    ("file:///etc/passwd", "ONNX-EXTDATA-ABSOLUTE"),
    ("", "ONNX-EXTDATA-MISSING"),
])
def test_location_strings(location, rule):
    assert classify_location(location)[0] == rule
    found = ext(location)
    assert found[rule][0].severity == Severity.CRITICAL


def test_plain_locations_in_the_folder_or_below_pass():
    for loc in ("weights.bin", "data/weights.bin", "./weights.bin"):
        assert classify_location(loc) == (None, "")
    assert ext("data/weights.bin", files={"data/weights.bin": b"\0" * 16}) == {}
    # a location relative to a model in a subfolder resolves inside that subfolder
    assert ext("weights.bin", model_path="unet/model.onnx") == {}


def test_traversal_that_stays_in_the_snapshot_still_escapes_the_model_folder():
    f = ext("../text_encoder/weights.bin", model_path="unet/model.onnx",
            files={"text_encoder/weights.bin": b"\0" * 16})["ONNX-EXTDATA-TRAVERSAL"][0]
    assert f.evidence["escapes_model_folder"] and not f.evidence["escapes_snapshot"]


def test_missing_file_is_one_finding_per_file():
    m = model_with_initializer(external_tensor("w", "gone.bin"))
    m.graph.initializer.append(external_tensor("w2", "gone.bin", offset="16"))
    found = by_rule(scan_model(m), "ONNX-EXTDATA-MISSING")["ONNX-EXTDATA-MISSING"]
    assert len(found) == 1 and found[0].evidence["count"] == 2


@pytest.mark.parametrize("offset,length,size", [("8", "16", 16), ("32", None, 16), ("0", "99", 16)])
def test_range_beyond_the_file(offset, length, size):
    found = ext(offset=offset, length=length, data=b"\0" * size)
    assert found["ONNX-EXTDATA-RANGE"][0].severity == Severity.HIGH


@pytest.mark.parametrize("offset,length", [("-4", "16"), ("0x10", "16"), ("0", "1e3"), ("0", " 16")])
def test_non_integer_or_negative_values(offset, length):
    assert "ONNX-EXTDATA-RANGE" in ext(offset=offset, length=length)


def test_length_not_matching_dims_times_dtype():
    f = ext(length="12", data=b"\0" * 64)["ONNX-EXTDATA-LENGTH"][0]
    assert f.evidence["expected"] == 16
    # no length: the rest of the file is read, which must then be exactly the tensor
    assert "ONNX-EXTDATA-LENGTH" in ext(length=None, data=b"\0" * 20)
    assert ext(length=None, data=b"\0" * 16) == {}


def test_unknown_duplicate_and_injected_keys():
    assert ext(extra={"comment": "hi"})["ONNX-EXTDATA-KEYS"][0].severity == Severity.MEDIUM
    m = model_with_initializer(external_tensor("w", "weights.bin"))
    e = m.graph.initializer[0].external_data.add()
    e.key, e.value = "location", "../../etc/passwd"          # a second location: which one wins?
    found = by_rule(scan_model(m, extra={"weights.bin": b"\0" * 16}), "ONNX-EXTDATA-KEYS")["ONNX-EXTDATA-KEYS"]
    assert found[0].severity == Severity.HIGH and found[0].evidence["duplicate_keys"] == ["location"]


def test_cve_2026_34445_external_data_attribute_injection():
    """CVE-2026-34445: onnx < 1.21 set every external_data key as an attribute of ExternalDataInfo
    (setattr), so keys like '__class__' or '_offset' corrupted the object. Such keys are high."""
    found = ext(extra={"__class__": "x", "_basepath": "/"})["ONNX-EXTDATA-KEYS"]
    assert found[0].severity == Severity.HIGH and found[0].evidence["dunder_keys"] == ["__class__", "_basepath"]


def test_overlapping_ranges_are_info():
    m = model_with_initializer(external_tensor("w", "weights.bin", offset="0", length="16"))
    m.graph.initializer.append(external_tensor("w2", "weights.bin", offset="8", length="16"))
    f = by_rule(scan_model(m, extra={"weights.bin": b"\0" * 32}), "ONNX-EXTDATA")["ONNX-EXTDATA-OVERLAP"][0]
    assert f.severity == Severity.INFO


def test_external_data_in_subgraph_and_constant_attributes_is_checked():
    t = external_tensor("cw", "../../secret.bin")
    m = model_with_initializer(numpy_helper.from_array(np.ones(4, np.float32), "w"))
    m.graph.node.insert(0, onnx.helper.make_node("Constant", [], ["unused"], name="const_ext", value=t))
    f = by_rule(scan_model(m), "ONNX-EXTDATA-TRAVERSAL")["ONNX-EXTDATA-TRAVERSAL"][0]
    assert f.where == "main/const_ext (Constant).value"


def test_benign_external_data_models_pass(tmp_path):
    save_with_external_data(benign_mlp(), tmp_path / "m")
    assert by_rule(scan_folder(tmp_path / "m"), "ONNX-") == {}
    for kind in ("legacy", "dynamo"):
        assert by_rule(scan_folder(sd_pipeline_folder(kind)), "ONNX-EXTDATA") == {}, kind


# ------------------------------------------------------------------------------------------------
# CVE regression tests through the whole gate
# ------------------------------------------------------------------------------------------------

class OpenSpy:
    """Records the (device, inode) of every file the process opens (os.open and builtins.open)."""

    def __init__(self, monkeypatch):
        self.opened: list[tuple[int, int, str]] = []
        self.writes: list[str] = []
        real_os_open, real_open = os.open, builtins.open

        def note(fd: int) -> None:
            st = os.fstat(fd)
            try:
                target = os.readlink(f"/proc/self/fd/{fd}")
            except OSError:
                target = "?"
            self.opened.append((st.st_dev, st.st_ino, target))

        def os_open(path, flags, *a, **k):
            fd = real_os_open(path, flags, *a, **k)
            note(fd)
            if flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT):
                self.writes.append(os.readlink(f"/proc/self/fd/{fd}"))
            return fd

        def b_open(file, mode="r", *a, **k):
            f = real_open(file, mode, *a, **k)
            if hasattr(f, "fileno"):
                try:
                    note(f.fileno())
                except (OSError, ValueError):
                    pass
            if any(c in mode for c in "wax+"):
                self.writes.append(str(file))
            return f

        monkeypatch.setattr(os, "open", os_open)
        monkeypatch.setattr(builtins, "open", b_open)

    def touched(self, path: Path) -> bool:
        st = os.stat(path)
        return any((d, i) == (st.st_dev, st.st_ino) for d, i, _ in self.opened)


def secret_outside(tmp_path: Path) -> Path:
    outside = tmp_path / "outside"
    outside.mkdir()
    secret = outside / "secret.bin"
    secret.write_bytes(SECRET)
    return secret


def model_reading(folder: Path, location: str, *, raw: bytes | None = None) -> Path:
    """A model whose initializer 'w' ([len(SECRET)] uint8) is read from `location`: its output is
    the file's bytes, i.e. the exfiltration a vulnerable loader would perform."""
    folder.mkdir(parents=True, exist_ok=True)
    t = external_tensor("w", location, dims=(len(SECRET),), dtype=TensorProto.UINT8, offset="0",
                        length=str(len(SECRET)))
    if raw is not None:
        t.raw_data = raw
    m = onnx.helper.make_model(
        onnx.helper.make_graph([onnx.helper.make_node("Identity", ["w"], ["leak"], name="leak")], "g", [],
                               [onnx.helper.make_tensor_value_info("leak", TensorProto.UINT8, [len(SECRET)])], [t]),
        opset_imports=[onnx.helper.make_opsetid("", 17)])
    m.ir_version = 8
    path = folder / "model.onnx"
    path.write_bytes(m.SerializeToString())
    return path


def gate(folder: Path, monkeypatch) -> tuple[dict, OpenSpy, object]:
    spy = OpenSpy(monkeypatch)
    vm = audit(str(folder), "default", progress=False)
    monkeypatch.undo()
    assert spy.touched(folder / "model.onnx")               # the spy sees the gate's reads
    assert all(SECRET not in b.bytes() for b in vm.files.values())
    return by_rule(vm.report.findings), spy, vm


def test_cve_2022_25882_dotdot_location_reads_outside_the_model_folder(tmp_path, monkeypatch):
    """CVE-2022-25882 (onnx < 1.13): external_data.location '../../secret' was joined to the model
    folder unchecked, so loading the model read any file into a weight."""
    secret = secret_outside(tmp_path)
    model_reading(tmp_path / "model", "../outside/secret.bin")
    found, spy, vm = gate(tmp_path / "model", monkeypatch)
    f = found["ONNX-EXTDATA-TRAVERSAL"][0]
    assert f.severity == Severity.CRITICAL and f.evidence["escapes_snapshot"]
    assert vm.report.verdict == "blocked"
    assert not spy.touched(secret)


def test_cve_2024_27318_traversal_that_does_not_start_with_dotdot(tmp_path, monkeypatch):
    """CVE-2024-27318 (onnx < 1.16): the 2022 fix only rejected locations *starting* with '../';
    'subdir/../../secret' normalises outside the folder and bypassed it (also with backslashes)."""
    secret = secret_outside(tmp_path)
    (tmp_path / "model" / "subdir").mkdir(parents=True)
    for loc in ("subdir/../../outside/secret.bin", "subdir\\..\\..\\outside\\secret.bin"):
        model_reading(tmp_path / "model", loc)
        found, spy, vm = gate(tmp_path / "model", monkeypatch)
        assert found["ONNX-EXTDATA-TRAVERSAL"][0].evidence["normalised"] == "../outside/secret.bin", loc
        assert vm.report.verdict == "blocked"
        assert not spy.touched(secret)


def test_cve_2025_51480_save_external_data_writes_outside_the_folder(tmp_path, monkeypatch):
    """CVE-2025-51480 (onnx < 1.19.1, fixed by onnx PR #7627): save_external_data wrote a tensor's inline
    raw_data to os.path.join(base, location) for a tensor marked EXTERNAL, so a model whose location is
    '../../target' overwrote an arbitrary file when a victim re-saved it. The gate flags the location
    and the inline-plus-external data, and writes nothing."""
    target = tmp_path / "outside" / "victim.txt"
    target.parent.mkdir()
    target.write_bytes(b"original")
    model_reading(tmp_path / "model", "../outside/victim.txt", raw=b"OVERWRITE" + b"\0" * (len(SECRET) - 9))
    found, spy, vm = gate(tmp_path / "model", monkeypatch)
    assert found["ONNX-EXTDATA-TRAVERSAL"][0].severity == Severity.CRITICAL
    assert found["ONNX-TENSOR-DUAL-DATA"][0].evidence["fields"].keys() == {"raw_data", "external"}
    assert vm.report.verdict == "blocked"
    assert target.read_bytes() == b"original" and not spy.writes
    assert not spy.touched(target)


def test_cve_2026_27489_symlinked_parent_directory(tmp_path, monkeypatch):
    """CVE-2026-27489 (onnx < 1.21): the symlink check only looked at the last path component, so
    'linkdir/secret.bin' with linkdir -> a folder outside the model read that folder's files."""
    secret = secret_outside(tmp_path)
    folder = tmp_path / "model"
    model_reading(folder, "linkdir/secret.bin")
    os.symlink(secret.parent, folder / "linkdir")
    found, spy, vm = gate(folder, monkeypatch)
    f = found["ONNX-EXTDATA-MISSING"][0]
    assert f.severity == Severity.CRITICAL and f.evidence["resolved"] == "linkdir/secret.bin"
    assert vm.report.verdict == "blocked"
    assert not spy.touched(secret)


def test_cve_2026_34446_hardlink_to_a_file_outside(tmp_path, monkeypatch):
    """CVE-2026-34446 (onnx < 1.21): onnx.load rejected symlinks but not hardlinks; a hard link in
    the model folder to a private file looks like a regular file and was read as weights."""
    secret = secret_outside(tmp_path)
    folder = tmp_path / "model"
    model_reading(folder, "weights.bin")
    os.link(secret, folder / "weights.bin")
    found, spy, vm = gate(folder, monkeypatch)
    assert found["ONNX-EXTDATA-MISSING"][0].severity == Severity.CRITICAL
    assert "FILE-HARDLINK-ESCAPE" in found                  # the walker's own finding
    assert "weights.bin" not in vm.files
    assert vm.report.verdict == "blocked"
    # the walker may fstat a candidate it then refuses; it must never read it (checked in gate())


def test_cve_2026_34447_symlink_as_the_external_data_file(tmp_path, monkeypatch):
    """CVE-2026-34447 (onnx < 1.21, GHSA-p433-9wv8-28xj): symlink traversal in external data loading.
    The public advisory says only "symlink traversal ... allows reading files outside the model
    directory"; this test reproduces the documented final-component case: weights.bin -> /outside/secret.
    (The parent-directory variant is CVE-2026-27489 above.)"""
    secret = secret_outside(tmp_path)
    folder = tmp_path / "model"
    model_reading(folder, "weights.bin")
    os.symlink(secret, folder / "weights.bin")
    found, spy, vm = gate(folder, monkeypatch)
    assert found["ONNX-EXTDATA-MISSING"][0].severity == Severity.CRITICAL
    assert "FILE-SYMLINK-ESCAPE" in found
    assert vm.report.verdict == "blocked"
    assert not spy.touched(secret)


def test_benign_external_data_model_is_allowed_by_the_gate(tmp_path, monkeypatch):
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "weights.bin").write_bytes(SECRET)             # the same bytes, as a real file inside
    model_reading(folder, "weights.bin")
    vm = audit(str(folder), "strict", progress=False)
    assert vm.report.verdict == "allowed"
    assert vm.files["weights.bin"].bytes() == SECRET
    assert by_rule(vm.report.findings, "ONNX-") == {}
