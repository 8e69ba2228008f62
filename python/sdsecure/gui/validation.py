"""Validation in the GUI: the same `sdsecure.gate.validate` every entry point calls.

A `Validation` remembers what it validated (`ModelKey`: ref, revision, policy). Generation is allowed
only while the current inputs equal that key and the verdict is "allowed": changing the model id,
revision or strict toggle after validating disables generation until the model is validated again.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from sdsecure.errors import SecurityError, UserError

if TYPE_CHECKING:
    from sdsecure.gate.report import Report
    from sdsecure.gate.verified import VerifiedModel

DEFAULT_MODEL = "embedded"


@dataclass(frozen=True)
class ModelKey:
    ref: str
    revision: str | None
    policy: str          # "default" | "strict"

    @classmethod
    def from_inputs(cls, ref: str, revision: str, strict: bool) -> "ModelKey":
        return cls(ref.strip() or DEFAULT_MODEL, revision.strip() or None, "strict" if strict else "default")


@dataclass
class Validation:
    key: ModelKey
    verdict: str                          # "allowed" | "blocked" | "error"
    report: "Report | None" = None
    model: "VerifiedModel | None" = None  # only when allowed: the exact bytes the gate checked
    error: str | None = None              # one-line message when the gate could not complete


def validate_model(key: ModelKey) -> Validation:
    """Run the gate. A blocked model is a result (with its report), not an exception."""
    from sdsecure.gate import validate

    try:
        model = validate(key.ref, key.policy, revision=key.revision, progress=False)
    except SecurityError as exc:
        return Validation(key, "blocked", report=exc.report)
    except UserError as exc:
        return Validation(key, "error", error=str(exc))
    return Validation(key, "allowed", report=model.report, model=model)


def generation_gate(validation: Validation | None, current: ModelKey) -> tuple[bool, str]:
    """(may generate, why not). The GUI disables its Generate button unless the first is True."""
    if validation is None:
        return False, "Validate the model first: generation stays disabled until the gate allows it."
    if validation.key != current:
        return False, "The model settings changed since the last validation: validate again."
    if validation.verdict == "blocked":
        return False, "The gate BLOCKED this model: generation is disabled."
    if validation.verdict == "error":
        return False, f"The model could not be checked: {validation.error}"
    return True, ""


def _ordered(findings: list) -> list:
    return sorted(findings, key=lambda f: (-int(f.severity), f.rule, f.file, f.where))


def _row(f) -> dict[str, str]:
    return {"severity": str(f.severity), "rule": f.rule, "file": f.file or "(model)",
            "node / where": f.where or ("(whole file)" if f.file else "-"), "message": f.message}


def finding_rows(report: "Report") -> list[dict[str, str]]:
    """One row per finding, most severe first: severity, rule, file, node/where, message."""
    return [_row(f) for f in _ordered(report.findings)]


def blocking_rows(validation: Validation) -> list[dict[str, str]]:
    """The findings that made the policy block (empty unless blocked)."""
    if validation.report is None or validation.verdict != "blocked":
        return []
    return [_row(f) for f in _ordered(validation.report.blocking_findings())]


def file_rows(report: "Report") -> list[dict[str, Any]]:
    return [{"file": r.path, "size (bytes)": r.size, "sha256": r.sha256} for r in report.files]


def verdict_line(validation: Validation) -> str:
    """One line for the banner, e.g. 'Verdict: BLOCKED for org/name @ <sha> (policy default; 1 critical, 4 info)'."""
    if validation.verdict == "error" or validation.report is None:
        return f"Verdict: COULD NOT CHECK ({validation.error})"
    report = validation.report
    counts = ", ".join(f"{n} {sev}" for sev, n in reversed(report.counts().items()) if n) or "no findings"
    revision = report.revision or "local"
    return (f"Verdict: {validation.verdict.upper()} for {report.model_ref} @ {revision} "
            f"(policy {report.policy}; {counts})")
