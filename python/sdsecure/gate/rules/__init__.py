"""Rule registry. One module per family; each rule is a small function with a stable id.

A *file rule* sees one file at a time; a *repo rule* sees the whole snapshot (e.g. the SD layout).
Every rule id is declared once with `declare()`, whose text feeds SARIF `help`, the text report and
SECURITY.md (ruff/bandit style: what it detects, why it matters, how to fix).
"""

from __future__ import annotations

import fnmatch
import importlib
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

from sdsecure.gate.blob import Blob
from sdsecure.gate.report import Finding, Severity


@dataclass(frozen=True)
class RuleInfo:
    id: str                 # e.g. "ONNX-EXTDATA-TRAVERSAL"
    severity: Severity      # default severity
    title: str              # short description
    why: str                # why it matters
    fix: str                # how to fix / what to do


@dataclass
class ScanContext:
    model_ref: str
    files: dict[str, Blob]                    # every file of the snapshot, relative path -> bytes
    is_sd_repo: bool                          # model_index.json present at the root
    # concrete input shapes per ONNX file, used to size shape bombs statically
    input_shapes: dict[str, dict[str, tuple[int, ...]]] = field(default_factory=dict)
    cache: dict[str, Any] = field(default_factory=dict)   # parsed artefacts shared by rules (parse once)

    def onnx(self, path: str):
        """The parsed ModelProto of `path` (no external data loaded), or None if it does not parse
        (the parse rule reports that).

        When the file holds large initializers inline, this is parsed from a light copy without their
        raw_data bytes (gate.onnx_graph.wire_initializers: no rule reads the values of such tensors; their
        lengths are kept in the cache), so that the scan's memory does not grow with the weights."""
        key = ("onnx", path)
        if key not in self.cache:
            import onnx

            from sdsecure.gate.onnx_graph import wire_initializers

            try:
                blob = self.files[path]
                wire = wire_initializers(blob.view())
                # parse the light copy, or straight from the verified bytes (no copy of a large
                # blob), then let the pages go from the resident set (they stay in the sealed memfd)
                data = wire.light if wire is not None and wire.light is not None else blob.view()
                model = onnx.ModelProto()
                used = model.ParseFromString(data)
                if used is not None and used != len(data):
                    raise ValueError(f"protobuf decoding consumed {used} of {len(data)} bytes")
                blob.release()
                agrees = wire is not None and wire.agree_with(model)
                if wire is not None and wire.light is not None and not agrees:
                    raise ValueError("the light copy does not match the model's initializers")  # fail closed
                self.cache[("onnx-raw-lengths", path)] = wire.lengths if agrees else None
                self.cache[key] = model
            except Exception as exc:  # noqa: BLE001 - any parse failure is a finding, not a crash
                self.cache[key] = None
                self.cache[("onnx-error", path)] = f"{type(exc).__name__}: {exc}"
        return self.cache[key]


FileRule = Callable[[ScanContext, str, Blob], Iterable[Finding]]
RepoRule = Callable[[ScanContext], Iterable[Finding]]

RULES: dict[str, RuleInfo] = {}
_FILE_RULES: list[tuple[tuple[str, ...], FileRule]] = []
_REPO_RULES: list[RepoRule] = []

# Rule family modules, imported for their registrations.
FAMILIES = [
    "sdsecure.gate.rules.onnx_structure",
    "sdsecure.gate.rules.onnx_domains",
    "sdsecure.gate.rules.onnx_extdata",
    "sdsecure.gate.rules.onnx_tensors",
    "sdsecure.gate.rules.onnx_bombs",
    "sdsecure.gate.rules.payloads",
    "sdsecure.gate.rules.backdoor",
    "sdsecure.gate.rules.pickles",
    "sdsecure.gate.rules.safetensors",
    "sdsecure.gate.rules.configs",
    "sdsecure.gate.rules.sd_repo",
]


def declare(id: str, severity: Severity, title: str, why: str, fix: str) -> RuleInfo:
    info = RuleInfo(id, severity, title, why, fix)
    RULES[id] = info
    return info


def file_rule(*patterns: str) -> Callable[[FileRule], FileRule]:
    """Register a rule for files whose basename matches any glob (e.g. "*.onnx"); "*" = every file."""

    def deco(fn: FileRule) -> FileRule:
        _FILE_RULES.append((patterns, fn))
        return fn

    return deco


def repo_rule(fn: RepoRule) -> RepoRule:
    _REPO_RULES.append(fn)
    return fn


def load_families() -> None:
    for mod in FAMILIES:
        try:
            importlib.import_module(mod)
        except ModuleNotFoundError as exc:
            if exc.name != mod:  # a real import error inside an existing family
                raise


def run_all(ctx: ScanContext) -> list[Finding]:
    load_families()
    findings: list[Finding] = []
    # files still being read in the background (large weights) come last, so the rules work on
    # everything else meanwhile; ONNX files are read first and needed by most rules
    order = sorted(ctx.files.items(), key=lambda pb: (pb[1].deferred and not pb[0].endswith(".onnx"), pb[0]))
    for path, blob in order:
        if not blob.wait():
            continue                    # could not be read: the walk reports why
        base = path.rsplit("/", 1)[-1]
        for patterns, fn in _FILE_RULES:
            if any(fnmatch.fnmatch(base, p) for p in patterns):
                findings.extend(fn(ctx, path, blob))
    for fn in _REPO_RULES:
        findings.extend(fn(ctx))
    return findings
