"""ONNX-PARSE and ONNX-CHECKER: the file is a well-formed ONNX model.

A file that does not parse is a finding, never a crash. onnx's checker runs on a *structural copy*
of the model (see onnx_graph.structural_copy): external or large initializers become typed graph
inputs, so the checker never resolves external data paths (it would do so relative to the process's
working directory) and never serialises gigabytes of weights.
"""

from __future__ import annotations

from typing import Iterator

import onnx

from sdsecure.gate.blob import Blob
from sdsecure.gate.onnx_graph import StructuralCopyError, structural_bytes
from sdsecure.gate.report import Finding, Severity
from sdsecure.gate.rules import ScanContext, declare, file_rule

PARSE = declare(
    "ONNX-PARSE", Severity.HIGH,
    "File named .onnx is not a parseable ONNX model",
    why=("The gate can only vouch for what it can read. A file with an .onnx name that protobuf cannot "
         "parse, or that parses into something with no graph, is either corrupt or something else "
         "wearing an ONNX name (a pickle, a zip, a polyglot). Other tools may still open it in their own "
         "way, so it is reported instead of silently skipped."),
    fix=("Re-export the model with torch.onnx.export / optimum, or re-download the file and compare its "
         "sha256 with the one the publisher lists. Do not load it with other tools until it parses."),
)

CHECKER = declare(
    "ONNX-CHECKER", Severity.MEDIUM,
    "onnx.checker rejects the model",
    why=("onnx.checker.check_model verifies the IR rules every runtime relies on: topological order, "
         "known operators at the declared opsets, attribute types, tensor data sizes. A model that "
         "breaks them may behave differently in different runtimes (and the gate's own analyses assume "
         "a valid graph). The gate runs the checker on a structural copy without external weights, "
         "so it never touches files outside the snapshot."),
    fix=("Look at the checker message; re-export with a supported opset, or fix the graph with "
         "onnx.helper / onnxscript. Exports from torch.onnx pass the checker."),
)

MAGIC = {b"PK\x03\x04": "zip archive", b"\x80\x02": "pickle", b"\x80\x03": "pickle", b"\x80\x04": "pickle",
         b"\x80\x05": "pickle", b"\x7fELF": "ELF executable", b"MZ": "PE executable", b"#!": "script"}


def sniff(data: bytes) -> str | None:
    for magic, kind in MAGIC.items():
        if data.startswith(magic):
            return kind
    return None


@file_rule("*.onnx")
def check_parse(ctx: ScanContext, path: str, blob: Blob) -> Iterator[Finding]:
    model = ctx.onnx(path)
    head = bytes(blob.view()[:8])
    if model is None:
        err = ctx.cache.get(("onnx-error", path), "unknown error")
        ev = {"error": err, "size": blob.size}
        kind = sniff(head)
        if kind:
            ev["looks_like"] = kind
        yield Finding(PARSE.id, PARSE.severity, path, "", "file does not parse as an ONNX ModelProto", ev)
        return
    if not model.HasField("graph") and model.ir_version == 0:
        ev = {"size": blob.size}
        kind = sniff(head)
        if kind:
            ev["looks_like"] = kind
        yield Finding(PARSE.id, PARSE.severity, path, "",
                      "file parses as protobuf but holds no ONNX model (no graph, no ir_version)", ev)


@file_rule("*.onnx")
def check_checker(ctx: ScanContext, path: str, blob: Blob) -> Iterator[Finding]:
    model = ctx.onnx(path)
    if model is None or (not model.HasField("graph") and model.ir_version == 0):
        return
    try:
        copy = structural_bytes(ctx, path, model)
    except StructuralCopyError as exc:
        yield Finding(CHECKER.id, Severity.INFO, path, "",
                      f"onnx.checker not run: {exc}", {"reason": str(exc)})
        return
    try:
        onnx.checker.check_model(copy, full_check=False)
    except onnx.checker.ValidationError as exc:
        msg = str(exc).strip().splitlines()
        yield Finding(CHECKER.id, CHECKER.severity, path, "",
                      f"onnx.checker: {msg[0][:300] if msg else 'validation error'}",
                      {"checker": str(exc)[:2000], "onnx_version": onnx.__version__})
    except Exception as exc:  # noqa: BLE001 - e.g. a proto over 2 GB: reported, not a crash
        yield Finding(CHECKER.id, Severity.INFO, path, "",
                      f"onnx.checker could not run: {type(exc).__name__}: {str(exc)[:200]}",
                      {"error": f"{type(exc).__name__}: {exc}"[:2000]})
