"""safetensors header rules, parsed by hand (the header is a few KB of JSON; no package needed).

Layout: 8 bytes little-endian u64 N, then N bytes of UTF-8 JSON (optionally padded with spaces),
then the data buffer. The header maps tensor names to {"dtype", "shape", "data_offsets": [begin,
end]} (offsets relative to the data buffer) plus an optional "__metadata__" of str -> str. The
format requires the tensors to tile the data buffer exactly: no overlaps, no holes, nothing after
the last tensor. Loaders that trust a broken header read out of bounds, or two tensors share bytes
(what one tool checks is not what another runs), or bytes hide in holes.
"""

from __future__ import annotations

import json
from typing import Any

from sdsecure.gate.blob import Blob
from sdsecure.gate.report import Finding, Severity
from sdsecure.gate.rules import ScanContext, declare, file_rule

HEADER_CAP = 100_000_000      # the safetensors library refuses larger headers too
MAX_FINDINGS_PER_RULE = 20

#: dtype -> size in bits (the safetensors Dtype enum, including the 8/6/4-bit float formats)
DTYPE_BITS: dict[str, int] = {
    "BOOL": 8, "U8": 8, "I8": 8, "F8_E5M2": 8, "F8_E4M3": 8, "F8_E8M0": 8, "I16": 16, "U16": 16,
    "F16": 16, "BF16": 16, "I32": 32, "U32": 32, "F32": 32, "I64": 64, "U64": 64, "F64": 64,
    "C64": 64, "F4": 4, "F6_E2M3": 6, "F6_E3M2": 6,
}

HEADER = declare(
    "SAFETENSORS-HEADER", Severity.HIGH,
    "safetensors header cannot be parsed or has an invalid structure",
    "The header length, its JSON and each tensor entry (dtype, shape, data_offsets) are what every "
    "loader trusts to slice the file. A header longer than the file or than the 100 MB cap, invalid "
    "UTF-8/JSON, duplicate keys (parsers disagree on which wins), or entries of the wrong type are "
    "crafted inputs aimed at parser bugs, or simply a corrupt download.",
    "Re-download the file and compare its sha256 with the publisher's; regenerate it with the "
    "safetensors library.")
DTYPE = declare(
    "SAFETENSORS-DTYPE", Severity.HIGH,
    "safetensors tensor with an unknown dtype",
    "Only the dtypes of the safetensors specification can be sized correctly; an unknown dtype makes "
    "byte-range checks meaningless and loaders disagree on how to handle it.",
    "Regenerate the file with a standard dtype.")
SIZE = declare(
    "SAFETENSORS-SIZE-MISMATCH", Severity.HIGH,
    "safetensors tensor whose byte range does not match shape x dtype",
    "If data_offsets cover more or fewer bytes than the shape needs, a loader either reads past the "
    "tensor (into its neighbour or out of the file) or silently truncates it.",
    "Regenerate the file with the safetensors library.")
BOUNDS = declare(
    "SAFETENSORS-OUT-OF-BOUNDS", Severity.HIGH,
    "safetensors tensor offsets outside the data buffer",
    "Offsets that end after the file (or begin after they end) make loaders read memory they "
    "should not, or crash: a classic parser-attack input.",
    "Do not load the file; re-download it from a trusted source.")
OVERLAP = declare(
    "SAFETENSORS-OVERLAP", Severity.HIGH,
    "Two safetensors tensors share the same bytes",
    "Overlapping ranges let one byte region be two tensors at once: edits to one silently change "
    "the other, and checks done on one tensor do not describe the other. The format forbids it.",
    "Regenerate the file; treat the source as untrusted.")
GAP = declare(
    "SAFETENSORS-HIDDEN-BYTES", Severity.MEDIUM,
    "safetensors data buffer has holes or trailing bytes no tensor covers",
    "The format requires tensors to cover the data buffer exactly. Bytes that belong to no tensor "
    "are invisible to every tool that lists tensors: room for a hidden payload (a pickle, a second "
    "model) that another loader could pick up.",
    "Regenerate the file with the safetensors library; inspect the uncovered bytes.")
METADATA = declare(
    "SAFETENSORS-METADATA", Severity.MEDIUM,
    "safetensors __metadata__ is not a flat str -> str map",
    "The specification allows only string keys and string values. Nested objects or other types are "
    "not produced by any standard writer and break strict loaders.",
    "Regenerate the file, keeping metadata as plain strings.")


class _Dup(ValueError):
    pass


def _no_dups(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in pairs:
        if k in out:
            raise _Dup(k)
        out[k] = v
    return out


def _reject_constant(name: str) -> Any:
    raise ValueError(f"non-standard JSON constant {name}")


def _is_uint(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0


def scan_safetensors(path: str, data: Any) -> list[Finding]:
    """Findings for one safetensors file (`data`: bytes or mmap)."""
    out: list[Finding] = []
    per_rule: dict[str, int] = {}

    def add(info: Any, where: str, message: str, severity: Severity | None = None, **ev: Any) -> None:
        per_rule[info.id] = per_rule.get(info.id, 0) + 1
        if per_rule[info.id] <= MAX_FINDINGS_PER_RULE:
            out.append(Finding(info.id, severity or info.severity, path, where, message, ev))

    size = len(data)
    if size < 8:
        add(HEADER, "", f"file is {size} bytes: too short for the 8-byte header length")
        return out
    n = int.from_bytes(bytes(data[:8]), "little")
    if n > HEADER_CAP:
        add(HEADER, "header", f"header length {n} exceeds the {HEADER_CAP}-byte cap", header_length=n)
        return out
    if 8 + n > size:
        add(HEADER, "header", f"header length {n} runs past the end of the {size}-byte file",
            header_length=n, file_size=size)
        return out
    raw = bytes(data[8:8 + n])
    try:
        text = raw.decode("utf-8")
        if not text.startswith("{"):
            raise ValueError("header does not start with '{'")
        header = json.loads(text, object_pairs_hook=_no_dups, parse_constant=_reject_constant)
    except _Dup as exc:
        add(HEADER, f"header key {exc}", f"duplicate key {exc} in the header (parsers disagree on "
            f"which one wins)", key=str(exc))
        return out
    except (ValueError, RecursionError) as exc:
        add(HEADER, "header", f"header is not valid JSON: {str(exc)[:200]}", error=str(exc)[:500])
        return out
    if not isinstance(header, dict):
        add(HEADER, "header", "header is not a JSON object")
        return out

    meta = header.pop("__metadata__", None)
    if meta is not None and not (isinstance(meta, dict)
                                 and all(isinstance(v, str) for v in meta.values())):
        bad = ([k for k, v in meta.items() if not isinstance(v, str)][:10]
               if isinstance(meta, dict) else [type(meta).__name__])
        add(METADATA, "__metadata__", f"__metadata__ must map strings to strings; offending: {bad}",
            offending=bad)

    data_len = size - 8 - n
    ranges: list[tuple[int, int, str]] = []
    for name, entry in header.items():
        where = f"tensor {name}"
        if not isinstance(entry, dict) or set(entry) - {"dtype", "shape", "data_offsets"} or \
                not {"dtype", "shape", "data_offsets"} <= set(entry):
            add(HEADER, where, f"tensor {name!r}: entry must have exactly dtype, shape and data_offsets",
                entry=str(entry)[:200])
            continue
        dtype, shape, offs = entry["dtype"], entry["shape"], entry["data_offsets"]
        if not (isinstance(shape, list) and all(_is_uint(d) for d in shape)):
            add(HEADER, where, f"tensor {name!r}: shape must be a list of non-negative integers",
                shape=str(shape)[:200])
            continue
        if not (isinstance(offs, list) and len(offs) == 2 and all(_is_uint(o) for o in offs)):
            add(HEADER, where, f"tensor {name!r}: data_offsets must be two non-negative integers",
                data_offsets=str(offs)[:200])
            continue
        begin, end = offs
        if begin > end or end > data_len:
            add(BOUNDS, where, f"tensor {name!r}: data_offsets [{begin}, {end}] outside the "
                f"{data_len}-byte data buffer", data_offsets=offs, data_length=data_len)
            continue
        ranges.append((begin, end, name))
        if dtype not in DTYPE_BITS:
            add(DTYPE, where, f"tensor {name!r}: unknown dtype {str(dtype)[:40]!r}", dtype=str(dtype)[:40])
            continue
        count = 1
        for d in shape:
            count *= d
        bits = count * DTYPE_BITS[dtype]
        if bits % 8 or bits // 8 != end - begin:
            add(SIZE, where, f"tensor {name!r}: {dtype}{shape} needs {bits / 8:g} bytes, "
                f"data_offsets give {end - begin}", dtype=dtype, shape=shape, data_offsets=offs,
                expected_bytes=bits / 8)

    complete = len(ranges) == len(header)     # holes are meaningless when some entries are broken
    pos, prev = 0, None
    for begin, end, name in sorted(ranges):
        if begin < pos:
            add(OVERLAP, f"tensor {name}", f"tensor {name!r} [{begin}, {end}] overlaps tensor "
                f"{prev!r} (ends at {pos})", tensors=[prev, name], data_offsets=[begin, end])
        elif begin > pos and complete:
            add(GAP, f"tensor {name}", f"{begin - pos} bytes before tensor {name!r} belong to no tensor",
                hole=[pos, begin])
        if end >= pos:
            pos, prev = end, name
    if pos < data_len and complete:
        add(GAP, "after last tensor", f"{data_len - pos} bytes after the last tensor belong to no tensor",
            trailing=[pos, data_len])
    return out


@file_rule("*.safetensors")
def safetensors_rule(ctx: ScanContext, path: str, blob: Blob) -> list[Finding]:
    return scan_safetensors(path, blob.data)
