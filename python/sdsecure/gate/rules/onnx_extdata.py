"""ONNX-EXTDATA-*: tensors whose bytes live in another file (TensorProto.external_data).

The rules only look at the location *string* and at the verified snapshot (ctx.files): the referenced
file must be a regular file of the snapshot in the model's folder or below. The gate's file walker
never follows links (symlinks, hardlinks and special files are rejected when the snapshot is read),
so a location that names one is simply not in ctx.files. Nothing here opens a path or reads
external bytes: offsets and lengths are checked against the blob sizes.
"""

from __future__ import annotations

import posixpath
import re
from typing import Iterator

from sdsecure.gate.blob import Blob
from sdsecure.gate.onnx_graph import cached_index, elem_bits, num_elements, type_name, uses_external, walk_tensors
from sdsecure.gate.report import Finding, Severity
from sdsecure.gate.rules import ScanContext, declare, file_rule

_FIX_PATH = ("Keep external data next to the model: a plain relative file name (e.g. 'weights.pb' or "
             "'model.onnx_data') in the model's folder or a subfolder, saved with onnx.save_model("
             "..., save_as_external_data=True, location='weights.pb').")

TRAVERSAL = declare(
    "ONNX-EXTDATA-TRAVERSAL", Severity.CRITICAL,
    "External data location escapes the model's folder ('..' or NUL)",
    why=("A tensor's external_data.location is joined to the model's folder by every loader. A location "
         "with '..' components (e.g. '../../../home/user/.ssh/id_rsa' or 'a/../../secret', the bypass of "
         "CVE-2022-25882's fix, CVE-2024-27318) makes a loader read an arbitrary file into a weight that "
         "the graph can return as output; on save (onnx's save_external_data, CVE-2025-51480) it "
         "overwrites an arbitrary file. A NUL byte truncates the path in C/C++ loaders."),
    fix=_FIX_PATH,
)
ABSOLUTE = declare(
    "ONNX-EXTDATA-ABSOLUTE", Severity.CRITICAL,
    "External data location is an absolute path, drive, UNC path or URL",
    why=("An absolute location ('/etc/passwd', 'C:\\\\Users\\\\...', '\\\\\\\\server\\\\share\\\\x', "
         "'file:///...') points outside the model whatever folder it is loaded from: loaders that accept "
         "it read host files into the model's weights (arbitrary file read) or write to them on save."),
    fix=_FIX_PATH,
)
MISSING = declare(
    "ONNX-EXTDATA-MISSING", Severity.CRITICAL,
    "External data file is not a regular file of the verified snapshot",
    why=("The location names no regular file in the snapshot the gate hashed: the file is absent, or it "
         "is a symlink, a file under a symlinked folder, a hardlink or a special file that the gate "
         "refused to read (CVE-2026-27489, CVE-2026-34446, CVE-2026-34447: onnx followed such links out of "
         "the model folder). The weights this graph would run with are then not the bytes that were "
         "verified, and another loader pointed at the same folder would read whatever the link names. "
         "It blocks by default: nothing about such a model can be vouched for."),
    fix=("Ship the external data file itself (a regular file, not a link) next to the model, and "
         "re-lock the snapshot. If the Hub download was partial, fetch it again."),
)
RANGE = declare(
    "ONNX-EXTDATA-RANGE", Severity.HIGH,
    "External data offset/length invalid or beyond the end of the file",
    why=("offset and length must be non-negative decimal integers that stay inside the data file. "
         "Out-of-range, negative or non-numeric values crash loaders, make them read past the end of a "
         "mapping, or are parsed differently by different runtimes (one sees weights, another sees "
         "garbage)."),
    fix="Re-save the model with onnx.save_model(..., save_as_external_data=True); it writes exact offsets.",
)
LENGTH = declare(
    "ONNX-EXTDATA-LENGTH", Severity.HIGH,
    "External data length does not match the tensor's dims x dtype",
    why=("A tensor of shape dims and element type T has exactly prod(dims) x sizeof(T) bytes. A different "
         "length (explicit, or implied by 'read to the end of the file') means loaders either read "
         "bytes that belong to something else or reject the model, and checkers and runtimes may "
         "disagree on what the weights are."),
    fix="Re-save the model with onnx's external data helpers; do not edit external_data entries by hand.",
)
KEYS = declare(
    "ONNX-EXTDATA-KEYS", Severity.MEDIUM,
    "Unknown, duplicate or injected external_data keys",
    why=("The ONNX IR defines the keys location, offset, length and checksum. onnx < 1.21 copied every "
         "key onto a Python object with setattr (CVE-2026-34445: attribute injection, e.g. '__class__' "
         "or a huge 'offset'); duplicate keys are read first-wins by one loader and last-wins by "
         "another. Unknown keys have no meaning and are a sign of tampering."),
    fix="Remove the extra keys (re-save with onnx's external data helpers).",
)
OVERLAP = declare(
    "ONNX-EXTDATA-OVERLAP", Severity.INFO,
    "Two external tensors share bytes of the same file",
    why=("Exporters write each tensor to its own byte range. Overlapping ranges are legal but unusual "
         "(weight sharing by aliasing) and worth knowing about when reviewing weights."),
    fix="Nothing to do if the sharing is intended; otherwise re-save the model.",
)

_KNOWN_KEYS = ("location", "offset", "length", "checksum")
_DRIVE = re.compile(r"^[A-Za-z]:")
_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")
_UINT = re.compile(r"^[0-9]+$")


def classify_location(location: str) -> tuple[str | None, str]:
    """(rule id or None, reason) for a location string, before looking at the snapshot."""
    if location == "":
        return MISSING.id, "empty location"
    if "\x00" in location:
        return TRAVERSAL.id, "location contains a NUL byte (path truncation in C/C++ loaders)"
    if _SCHEME.match(location):
        return ABSOLUTE.id, "location is a URL"
    unified = location.replace("\\", "/")
    if unified.startswith("/"):
        return ABSOLUTE.id, ("location is a UNC path" if unified.startswith("//") else "location is an absolute path")
    if _DRIVE.match(unified):
        return ABSOLUTE.id, "location starts with a Windows drive"
    parts = unified.split("/")
    if ".." in parts:
        return TRAVERSAL.id, "location has '..' components"
    return None, ""


def resolve(model_path: str, location: str) -> str:
    folder = posixpath.dirname(model_path)
    return posixpath.normpath(posixpath.join(folder, location.replace("\\", "/")))


def _escape_note(model_path: str, location: str) -> dict:
    target = resolve(model_path, location)
    folder = posixpath.dirname(model_path)
    escapes_root = target == ".." or target.startswith("../") or target.startswith("/")
    return {"normalised": target,
            "escapes_model_folder": not (folder == "" or target.startswith(folder + "/")) or escapes_root,
            "escapes_snapshot": escapes_root}


@file_rule("*.onnx")
def check_external_data(ctx: ScanContext, path: str, blob: Blob) -> Iterator[Finding]:
    model = ctx.onnx(path)
    if model is None:
        return
    folder = posixpath.dirname(path)
    ranges: dict[str, list[tuple[int, int, str]]] = {}
    missing: dict[str, list[tuple[str, str, str]]] = {}     # resolved path -> [(where, tensor, location)]
    for tl in walk_tensors(cached_index(ctx, path, model)):
        t = tl.tensor
        entries = list(t.external_data)
        if not uses_external(t):
            if entries:
                yield Finding(KEYS.id, Severity.LOW, path, tl.where,
                              f"tensor {t.name!r} carries external_data entries but is not marked EXTERNAL",
                              {"tensor": t.name, "keys": [e.key for e in entries][:20]})
            continue
        ev_base = {"tensor": t.name, "dtype": type_name(t.data_type), "dims": list(t.dims)}
        # --- keys ------------------------------------------------------------------------------
        info: dict[str, str] = {}
        dups, unknown, injected = [], [], []
        for e in entries:
            if e.key in info:
                dups.append(e.key)
            info.setdefault(e.key, e.value)
            if e.key.startswith("_"):
                injected.append(e.key[:80])
            elif e.key not in _KNOWN_KEYS and not (e.key == "basepath" and e.value == ""):
                unknown.append(e.key[:80])
        if dups or injected:
            yield Finding(KEYS.id, Severity.HIGH, path, tl.where,
                          f"tensor {t.name!r}: " + ("duplicate external_data keys " + repr(sorted(set(dups))) if dups
                                                     else "external_data keys that target object attributes " + repr(injected)),
                          {**ev_base, "duplicate_keys": sorted(set(dups)), "dunder_keys": injected})
        if unknown:
            yield Finding(KEYS.id, KEYS.severity, path, tl.where,
                          f"tensor {t.name!r}: unknown external_data keys {unknown[:5]!r}",
                          {**ev_base, "unknown_keys": unknown[:50]})
        # --- location --------------------------------------------------------------------------
        location = info.get("location")
        if location is None:
            yield Finding(MISSING.id, MISSING.severity, path, tl.where,
                          f"tensor {t.name!r} is EXTERNAL but has no location", ev_base)
            continue
        ev = {**ev_base, "location": location}
        rule, reason = classify_location(location)
        if rule == TRAVERSAL.id:
            yield Finding(TRAVERSAL.id, TRAVERSAL.severity, path, tl.where,
                          f"tensor {t.name!r}: {reason}: {location!r}", {**ev, **_escape_note(path, location)})
            continue
        if rule == ABSOLUTE.id:
            yield Finding(ABSOLUTE.id, ABSOLUTE.severity, path, tl.where,
                          f"tensor {t.name!r}: {reason}: {location!r}", ev)
            continue
        if rule == MISSING.id:
            yield Finding(MISSING.id, MISSING.severity, path, tl.where, f"tensor {t.name!r}: {reason}", ev)
            continue
        target = resolve(path, location)
        data = ctx.files.get(target)
        if data is None:
            missing.setdefault(target, []).append((tl.where, t.name, location))
            continue
        # --- offset / length -------------------------------------------------------------------
        off_s, len_s = info.get("offset"), info.get("length")
        bad = [f"{k}={v!r}" for k, v in (("offset", off_s), ("length", len_s))
               if v is not None and not _UINT.match(v)]
        if bad:
            yield Finding(RANGE.id, RANGE.severity, path, tl.where,
                          f"tensor {t.name!r}: {', '.join(bad)} is not a non-negative integer",
                          {**ev, "resolved": target, "file_size": data.size})
            continue
        offset = int(off_s) if off_s is not None else 0
        if offset > data.size:
            yield Finding(RANGE.id, RANGE.severity, path, tl.where,
                          f"tensor {t.name!r}: offset {offset} is beyond the end of {target} ({data.size} bytes)",
                          {**ev, "resolved": target, "offset": offset, "file_size": data.size})
            continue
        length = int(len_s) if len_s is not None else data.size - offset
        if offset + length > data.size:
            yield Finding(RANGE.id, RANGE.severity, path, tl.where,
                          f"tensor {t.name!r}: bytes {offset}..{offset + length} exceed {target} ({data.size} bytes)",
                          {**ev, "resolved": target, "offset": offset, "length": length, "file_size": data.size})
            continue
        bits = elem_bits(t.data_type)
        if bits is not None and all(d >= 0 for d in t.dims):
            expected = (num_elements(t.dims) * bits + 7) // 8
            if expected != length:
                yield Finding(LENGTH.id, LENGTH.severity, path, tl.where,
                              f"tensor {t.name!r}: {length} bytes of external data for {type_name(t.data_type)}"
                              f"{list(t.dims)} ({expected} bytes expected)",
                              {**ev, "resolved": target, "offset": offset, "length": length,
                               "length_given": len_s is not None, "expected": expected})
        ranges.setdefault(target, []).append((offset, offset + length, tl.where))
    for target, uses in missing.items():
        where, tensor, location = uses[0]
        yield Finding(MISSING.id, MISSING.severity, path, where,
                      f"external data file {target!r} ({len(uses)} tensor{'s' if len(uses) != 1 else ''}, e.g. "
                      f"{tensor!r}) is not a regular file of the verified snapshot (absent, or a link the gate "
                      "refused to read)",
                      {"resolved": target, "location": location, "model_folder": folder or ".",
                       "tensors": [u[1] for u in uses[:20]], "count": len(uses)})
    # --- overlapping ranges (info) -----------------------------------------------------------------
    for target, rs in ranges.items():
        rs.sort()
        pairs = []
        end, end_where = -1, ""
        for s, e, w in rs:
            if s < end and e > s:
                pairs.append([end_where, w])
            if e > end:
                end, end_where = e, w
        if pairs:
            yield Finding(OVERLAP.id, OVERLAP.severity, path, pairs[0][1],
                          f"{len(pairs)} external tensor range(s) overlap in {target}",
                          {"file": target, "overlapping": pairs[:20]})
