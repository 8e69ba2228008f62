"""safetensors header rules: files written by the safetensors library pass; each crafted header is
caught by its rule."""

from __future__ import annotations

import json
import struct

import numpy as np
import pytest
from safetensors.numpy import save

from sdsecure.gate.blob import Blob
from sdsecure.gate.report import Severity
from sdsecure.gate.rules import _FILE_RULES, RULES, ScanContext
from sdsecure.gate.rules import safetensors as st
from sdsecure.gate.rules.safetensors import scan_safetensors


def build(header: dict | str | bytes, data: bytes = b"", *, length: int | None = None) -> bytes:
    raw = header if isinstance(header, bytes) else (
        header if isinstance(header, str) else json.dumps(header)).encode()
    return struct.pack("<Q", len(raw) if length is None else length) + raw + data


def entry(dtype: str, shape: list, begin: int, end: int) -> dict:
    return {"dtype": dtype, "shape": shape, "data_offsets": [begin, end]}


def rules(found) -> set[str]:
    return {f.rule for f in found}


# --- benign ------------------------------------------------------------------------------------------

def test_library_written_file_passes():
    data = save({"a": np.zeros((2, 3), np.float32), "b": np.ones(5, np.int64), "empty": np.zeros((0, 4), np.float16),
                 "flag": np.array([True, False]), "h": np.ones((3, 3), np.float16)},
                metadata={"format": "pt", "note": "hello"})
    assert scan_safetensors("model.safetensors", data) == []


def test_hand_built_file_with_padding_and_packed_dtypes_passes():
    header = {"x": entry("BF16", [2, 2], 0, 8), "q": entry("F4", [4], 8, 10), "__metadata__": {"k": "v"}}
    raw = json.dumps(header).encode() + b"    "           # writers pad the header with spaces
    assert scan_safetensors("m.safetensors", build(raw, bytes(10))) == []


# --- malicious / broken --------------------------------------------------------------------------------

def one(found, rule: str, severity: Severity):
    hits = [f for f in found if f.rule == rule]
    assert hits, f"{rule} not in {[(f.rule, f.message) for f in found]}"
    assert hits[0].severity == severity
    return hits[0]


def test_too_short():
    one(scan_safetensors("m.safetensors", b"\x01\x02"), "SAFETENSORS-HEADER", Severity.HIGH)


def test_header_length_over_cap():
    f = one(scan_safetensors("m.safetensors", build({}, length=st.HEADER_CAP + 1)), "SAFETENSORS-HEADER",
            Severity.HIGH)
    assert f.evidence["header_length"] == st.HEADER_CAP + 1


def test_header_length_past_end_of_file():
    one(scan_safetensors("m.safetensors", build({}, length=1000)), "SAFETENSORS-HEADER", Severity.HIGH)


@pytest.mark.parametrize("raw", [b"\xff\xfe{}", b"[1, 2]", b'{"a": ', b'{"a": NaN}', b"  {}",
                                 b"[" * 5000 + b"]" * 5000])
def test_invalid_header_json(raw):
    assert rules(scan_safetensors("m.safetensors", build(raw))) == {"SAFETENSORS-HEADER"}


def test_duplicate_keys():
    raw = '{"w": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}, ' \
          '"w": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]}}'
    f = one(scan_safetensors("m.safetensors", build(raw, bytes(8))), "SAFETENSORS-HEADER", Severity.HIGH)
    assert f.evidence["key"] == "w"


@pytest.mark.parametrize("bad", [
    {"dtype": "F32", "shape": [1]},                                             # no offsets
    {"dtype": "F32", "shape": [-1], "data_offsets": [0, 4]},                   # negative dim
    {"dtype": "F32", "shape": [True], "data_offsets": [0, 4]},                 # bool dim
    {"dtype": "F32", "shape": [1], "data_offsets": [0]},
    {"dtype": "F32", "shape": [1], "data_offsets": [0, 4], "extra": "x"},
    "not an object",
])
def test_bad_entries(bad):
    found = scan_safetensors("m.safetensors", build({"t": bad}, bytes(4)))
    assert rules(found) == {"SAFETENSORS-HEADER"}
    assert found[0].where == "tensor t"


def test_unknown_dtype():
    f = one(scan_safetensors("m.safetensors", build({"t": entry("F128", [1], 0, 16)}, bytes(16))),
            "SAFETENSORS-DTYPE", Severity.HIGH)
    assert f.evidence["dtype"] == "F128"


def test_size_mismatch():
    f = one(scan_safetensors("m.safetensors", build({"t": entry("F32", [2, 3], 0, 20)}, bytes(20))),
            "SAFETENSORS-SIZE-MISMATCH", Severity.HIGH)
    assert f.evidence["expected_bytes"] == 24


@pytest.mark.parametrize("offs", [(0, 400), (8, 4)])
def test_out_of_bounds(offs):
    found = scan_safetensors("m.safetensors", build({"t": entry("U8", [4], *offs)}, bytes(16)))
    one(found, "SAFETENSORS-OUT-OF-BOUNDS", Severity.HIGH)
    assert "SAFETENSORS-HIDDEN-BYTES" not in rules(found)      # no gap reports for a broken table


def test_overlap():
    header = {"a": entry("F32", [4], 0, 16), "b": entry("F32", [4], 8, 24)}
    f = one(scan_safetensors("m.safetensors", build(header, bytes(24))), "SAFETENSORS-OVERLAP", Severity.HIGH)
    assert set(f.evidence["tensors"]) == {"a", "b"}


def test_gap_between_tensors():
    header = {"a": entry("F32", [1], 0, 4), "b": entry("F32", [1], 12, 16)}
    f = one(scan_safetensors("m.safetensors", build(header, bytes(16))), "SAFETENSORS-HIDDEN-BYTES",
            Severity.MEDIUM)
    assert f.evidence["hole"] == [4, 12]


def test_trailing_bytes_after_last_tensor():
    data = save({"a": np.zeros(4, np.float32)}) + b"PK\x03\x04 hidden payload"
    f = one(scan_safetensors("m.safetensors", data), "SAFETENSORS-HIDDEN-BYTES", Severity.MEDIUM)
    assert f.where == "after last tensor"


@pytest.mark.parametrize("meta", [{"k": 1}, {"k": {"nested": "x"}}, ["a"]])
def test_metadata_must_be_str_to_str(meta):
    header = {"a": entry("U8", [1], 0, 1), "__metadata__": meta}
    one(scan_safetensors("m.safetensors", build(header, bytes(1))), "SAFETENSORS-METADATA", Severity.MEDIUM)


def test_findings_are_capped_per_rule():
    header = {f"t{i}": entry("F32", [1], 0, 8) for i in range(100)}
    found = scan_safetensors("m.safetensors", build(header, bytes(8)))
    assert sum(f.rule == "SAFETENSORS-SIZE-MISMATCH" for f in found) == st.MAX_FINDINGS_PER_RULE


def test_rule_registered_for_safetensors_files():
    assert any(fn is st.safetensors_rule and pats == ("*.safetensors",) for pats, fn in _FILE_RULES)
    blob = Blob.from_bytes(build({"t": entry("F32", [2], 0, 4)}, bytes(4)))
    found = st.safetensors_rule(ScanContext("x", {"unet/m.safetensors": blob}, False), "unet/m.safetensors", blob)
    assert found[0].file == "unet/m.safetensors"
    for rid in ("SAFETENSORS-HEADER", "SAFETENSORS-DTYPE", "SAFETENSORS-SIZE-MISMATCH", "SAFETENSORS-OUT-OF-BOUNDS",
                "SAFETENSORS-OVERLAP", "SAFETENSORS-HIDDEN-BYTES", "SAFETENSORS-METADATA"):
        assert len(RULES[rid].why) > 60 and RULES[rid].fix
