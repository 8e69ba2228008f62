"""The gate's orchestration (gate/validate.py): validate / audit / load_unverified as documented."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
from hubserver import make_plain_model
from onnx import TensorProto, helper

from sdsecure.errors import SecurityError, UserError
from sdsecure.gate import audit, load_unverified, rules, validate
from sdsecure.gate.files import walk_snapshot
from sdsecure.gate.report import Severity
from sdsecure.gate.rules import ScanContext
from sdsecure.gate.validate import pipeline_input_shapes
from sdsecure.refs import embedded_path

REPO_ROOT = Path(__file__).resolve().parents[1]
DYNAMO = REPO_ROOT / "tests" / "fixtures" / "tiny-sd15-dynamo"


def shapes_of(root) -> dict:
    files = walk_snapshot(root, progress=False).files
    return pipeline_input_shapes(ScanContext("t", files, "model_index.json" in files))


# -- input shapes ------------------------------------------------------------------------------------

@pytest.mark.parametrize("root", [embedded_path(), DYNAMO], ids=["embedded", "dynamo"])
def test_sd_pipeline_shapes(root):
    s = shapes_of(root)
    hidden = 16                                    # the tiny pipelines' text hidden size
    assert s["text_encoder/model.onnx"] == {"input_ids": (2, 77)}
    assert s["unet/model.onnx"]["sample"] == (2, 4, 64, 64)
    assert s["unet/model.onnx"]["encoder_hidden_states"] == (2, 77, hidden)
    assert s["unet/model.onnx"]["timestep"] == (2,)              # declared [batch]
    assert s["vae_decoder/model.onnx"] == {"latent_sample": (1, 4, 64, 64)}


def _model(path: Path, inputs: list) -> None:
    nodes = [helper.make_node("Identity", [i.name], [i.name + "_out"]) for i in inputs]
    outs = [helper.make_tensor_value_info(i.name + "_out", TensorProto.FLOAT, None) for i in inputs]
    g = helper.make_graph(nodes, "g", inputs, outs)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save_model(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]), str(path))


def test_timestep_as_the_graph_declares_and_static_dims_win(tmp_path: Path):
    root = tmp_path / "sd"
    (root / "model_index.json").parent.mkdir(parents=True)
    (root / "model_index.json").write_text("{}")
    f = TensorProto.FLOAT
    _model(root / "unet" / "model.onnx", [
        helper.make_tensor_value_info("sample", f, ["b", 4, 32, "w"]),      # static H=32 kept
        helper.make_tensor_value_info("timestep", f, []),                   # scalar
        helper.make_tensor_value_info("encoder_hidden_states", f, ["b", "s", 1024])])
    _model(root / "vae_decoder" / "model.onnx", [helper.make_tensor_value_info("latent_sample", f, None)])
    s = shapes_of(root)
    assert s["unet/model.onnx"] == {"sample": (2, 4, 32, 64), "timestep": (), "encoder_hidden_states": (2, 77, 1024)}
    assert s["vae_decoder/model.onnx"] == {"latent_sample": (1, 4, 64, 64)}   # no declared shape: pipeline's


def test_unknown_models_get_batch_1_and_dims_1(tmp_path: Path):
    f = TensorProto.FLOAT
    _model(tmp_path / "m" / "ocr.onnx", [helper.make_tensor_value_info("image", f, ["N", 3, "H", "W"]),
                                         helper.make_tensor_value_info("state", f, [2, "N", 64])])
    assert shapes_of(tmp_path / "m") == {"ocr.onnx": {"image": (1, 3, 1, 1), "state": (2, 1, 64)}}
    plain = make_plain_model(tmp_path / "plain")
    assert shapes_of(plain) == {"model.onnx": {"x": (1, 16)}}        # initializers are not inputs


# -- audit / validate / load_unverified ------------------------------------------------------------------

def test_audit_of_the_embedded_model_reads_and_hashes_everything():
    vm = audit("embedded", progress=False)
    root = embedded_path()
    on_disk = {p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()}
    assert set(vm.files) == on_disk
    for rec in vm.report.files:
        assert rec.sha256 == hashlib.sha256((root / rec.path).read_bytes()).hexdigest()
    lock_sha = hashlib.sha256((root / "sdsecure.lock.json").read_bytes()).hexdigest()
    assert vm.report.lockfile["status"] == "verified" and vm.lockfile_sha256 == lock_sha
    assert vm.ref == "embedded" and vm.revision is None and vm.verified
    assert vm.report.reputation["hub"]["state"] == "not-applicable"
    # the engine's view: weights are zero-copy views of the verified bytes
    w = vm.onnx_weights("unet/model.onnx")
    assert w and all(isinstance(a, np.ndarray) for a in w.values())


def test_validate_embedded_is_allowed():
    vm = validate("embedded", progress=False)
    assert vm.report.verdict == "allowed"
    assert not [f for f in vm.report.findings if f.severity > Severity.INFO]


def test_blocked_model_raises_security_error_with_the_report(tmp_path: Path):
    root = tmp_path / "m"
    shutil.copytree(embedded_path(), root)
    secret = tmp_path / "secret"
    secret.write_text("key")
    (root / "unet" / "other.pb").symlink_to(secret)
    with pytest.raises(SecurityError) as exc:
        validate(str(root), progress=False)
    assert "FILE-SYMLINK-ESCAPE" in {f.rule for f in exc.value.report.blocking_findings()}
    assert "blocked by default policy" in str(exc.value)
    vm = audit(str(root), "audit", progress=False)                   # audit never raises
    assert vm.report.verdict == "allowed" and "unet/other.pb" not in vm.files


def test_rule_crash_fails_closed(monkeypatch):
    def boom(ctx):
        raise RuntimeError("rule exploded")

    monkeypatch.setattr(rules, "run_all", boom)
    vm = audit("embedded", progress=False)
    crit = [f for f in vm.report.findings if f.rule == "GATE-INTERNAL-ERROR"]
    assert crit and crit[0].severity == Severity.CRITICAL and "rule exploded" in crit[0].message
    with pytest.raises(SecurityError):
        validate("embedded", progress=False)


def test_rules_get_the_context(monkeypatch):
    seen = {}

    def spy(ctx):
        seen.update(ref=ctx.model_ref, sd=ctx.is_sd_repo, files=set(ctx.files), shapes=ctx.input_shapes)
        return []

    monkeypatch.setattr(rules, "run_all", spy)
    vm = validate("embedded", progress=False)
    assert seen["ref"] == "embedded" and seen["sd"] is True and seen["files"] == set(vm.files)
    assert seen["shapes"]["unet/model.onnx"]["sample"] == (2, 4, 64, 64)


def test_load_unverified_hashes_but_does_not_scan(monkeypatch):
    monkeypatch.setattr(rules, "run_all", lambda ctx: (_ for _ in ()).throw(AssertionError("rules ran")))
    vm = load_unverified("embedded", progress=False)
    assert vm.verified is False and vm.report.policy == "audit" and vm.report.verdict == "allowed"
    assert vm.report.lockfile["status"] == "verified" and len(vm.files) == 12
    assert vm.provenance()["sdsecure:verdict"] == "unverified"


def test_single_model_file_reads_it_and_its_external_data_only(tmp_path: Path):
    folder = tmp_path / "downloads"
    make_plain_model(folder)
    (folder / "unrelated.txt").write_text("private notes")
    (folder / "photos").mkdir()
    (folder / "photos" / "a.jpg").write_bytes(b"jpg")
    vm = audit(str(folder / "model.onnx"), progress=False)
    assert set(vm.files) == {"model.onnx", "weights.pb"}
    w = vm.onnx_weights("model.onnx")
    assert w["w"].shape == (16, 16)
    vm = audit(str(folder / "config.json"), progress=False)
    assert set(vm.files) == {"config.json"}


def test_single_file_with_escaping_external_data_does_not_read_it(tmp_path: Path):
    folder = tmp_path / "m"
    make_plain_model(folder)
    (tmp_path / "secret.bin").write_bytes(b"s" * 1088)
    model = onnx.load(str(folder / "model.onnx"), load_external_data=False)
    for t in model.graph.initializer:
        for e in t.external_data:
            if e.key == "location":
                e.value = "../secret.bin"
    onnx.save_model(model, str(folder / "model.onnx"))
    vm = audit(str(folder / "model.onnx"), progress=False)
    assert set(vm.files) == {"model.onnx"}


def test_errors_a_user_can_cause(tmp_path: Path):
    with pytest.raises(UserError, match="unknown policy"):
        validate("embedded", "paranoid", progress=False)
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="contains no files"):
        validate(str(tmp_path / "empty"), progress=False)
    with pytest.raises(UserError, match="no such file"):
        validate(str(tmp_path / "missing"), progress=False)


def test_report_is_json_serialisable():
    vm = audit("embedded", progress=False)
    doc = json.loads(json.dumps(vm.report.to_dict()))
    assert doc["lockfile"]["status"] == "verified" and len(doc["files"]) == 12


def test_progress_flag_controls_output(tmp_path: Path, capsys):
    audit("embedded", progress=True)             # small model: no progress noise
    assert capsys.readouterr().err == ""


def test_gate_does_not_read_files_twice(monkeypatch):
    """Each file is opened once by the walker (a symlinked alias shares the Blob)."""
    opened: list[str] = []
    real_open = os.open

    def counting_open(path, flags, *a, **k):
        if not flags & os.O_DIRECTORY:
            opened.append(str(path))
        return real_open(path, flags, *a, **k)

    monkeypatch.setattr(os, "open", counting_open)
    monkeypatch.setattr(rules, "run_all", lambda ctx: [])
    vm = audit("embedded", progress=False)
    assert sorted(opened) == sorted(p.rsplit("/", 1)[-1] for p in vm.files)


# -- large files read in the background while the rules run ------------------------------------------

SMALL_LIMIT = 100_000      # makes the tiny models' big files "large": text encoder, UNet weights, tokenizer


def _deferred_limit(monkeypatch, limit: int = SMALL_LIMIT) -> None:
    from sdsecure.gate import blob as gb, files as gf
    monkeypatch.setattr(gf, "IN_MEMORY_LIMIT", limit)
    monkeypatch.setattr(gb, "IN_MEMORY_LIMIT", limit)


def test_background_reads_give_the_same_report(monkeypatch):
    plain = audit(str(DYNAMO), progress=False).report.to_dict()
    _deferred_limit(monkeypatch)
    seen: list[bool] = []
    real = rules.run_all

    def spy(ctx):
        seen.extend(b.deferred for b in ctx.files.values())
        return real(ctx)

    monkeypatch.setattr(rules, "run_all", spy)
    report = audit(str(DYNAMO), progress=False).report.to_dict()
    assert any(seen), "no file was read in the background"
    assert report["files"] == plain["files"]
    key = lambda f: (f["rule"], f["file"], f["where"], f["message"])  # noqa: E731
    assert sorted(map(key, report["findings"])) == sorted(map(key, plain["findings"]))


def test_a_backgrounded_pickle_is_still_judged(tmp_path: Path, monkeypatch):
    from samples import pickle_payload
    _deferred_limit(monkeypatch, 1000)
    (tmp_path / "small.json").write_text("{}")
    (tmp_path / "model.bin").write_bytes(pickle_payload() + b"\0" * 4000)   # large: read in the background
    vm = audit(str(tmp_path), progress=False)
    assert vm.files["model.bin"].deferred
    hits = [f for f in vm.report.findings if f.file == "model.bin" and f.severity >= Severity.CRITICAL]
    assert hits and "system" in json.dumps([h.evidence for h in hits]) + " ".join(h.message for h in hits)
    assert vm.report.verdict == "blocked"


def test_a_file_that_changes_during_the_background_read_is_dropped_and_reported(tmp_path: Path, monkeypatch):
    from sdsecure.gate import files as gf
    root = tmp_path / "m"
    shutil.copytree(embedded_path(), root)
    _deferred_limit(monkeypatch)
    real_read_one = gf._read_one

    def shrink_then_read(e, *a, **k):
        if e.rel == "unet/weights.pb":                  # the file changes after it was listed
            with open(root / e.rel, "r+b") as f:
                f.truncate(e.st.st_size - 1)
        return real_read_one(e, *a, **k)

    monkeypatch.setattr(gf, "_read_one", shrink_then_read)
    vm = audit(str(root), progress=False)
    assert "unet/weights.pb" not in vm.files
    unreadable = [f for f in vm.report.findings if f.rule == "FILE-UNREADABLE"]
    assert [f.file for f in unreadable] == ["unet/weights.pb"] and "changed" in unreadable[0].message
    assert not [f for f in vm.report.findings if f.rule == "GATE-INTERNAL-ERROR"]
    assert "unet/weights.pb" not in [r["path"] for r in vm.report.to_dict()["files"]]
