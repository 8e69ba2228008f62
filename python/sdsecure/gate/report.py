"""Findings and the report the gate produces. Pure data: rendering lives in render.py."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from enum import IntEnum
from typing import Any


class Severity(IntEnum):
    INFO = 0
    LOW = 1
    MEDIUM = 2
    HIGH = 3
    CRITICAL = 4

    def __str__(self) -> str:  # "critical", as reports print it
        return self.name.lower()

    @classmethod
    def parse(cls, text: str) -> "Severity":
        return cls[text.upper()]


@dataclass(frozen=True)
class Finding:
    """One observation. `where` is a location a person can find in Netron: node name, op type and
    the graph path into subgraphs, e.g. "graph/If_3.then_branch/Where_7 (Where)"."""

    rule: str                 # stable id, e.g. "ONNX-EXTDATA-TRAVERSAL"
    severity: Severity
    file: str                 # path relative to the model root, "/" separated
    where: str                # node / tensor / key location, "" when the whole file
    message: str              # one line
    evidence: dict[str, Any] = field(default_factory=dict)  # JSON-serialisable details

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["severity"] = str(self.severity)
        return d


@dataclass(frozen=True)
class FileRecord:
    path: str      # relative, "/" separated
    size: int
    sha256: str


@dataclass
class Report:
    model_ref: str                     # what the user asked for ("embedded", "org/name", a path)
    revision: str | None               # resolved commit sha for hub models, None for local
    policy: str                        # "default" | "strict" | "audit"
    files: list[FileRecord] = field(default_factory=list)
    findings: list[Finding] = field(default_factory=list)
    reputation: dict[str, Any] = field(default_factory=dict)  # Hub scan status + advisories
    lockfile: dict[str, Any] = field(default_factory=dict)    # {"path":..., "sha256":..., "status": "verified"|"absent"|"mismatch"}

    def add(self, finding: Finding) -> None:
        self.findings.append(finding)

    def blocking_findings(self) -> list[Finding]:
        from sdsecure.gate.policy import Policy

        pol = Policy.parse(self.policy)
        return [f for f in self.findings if pol.blocks(f.severity)]

    @property
    def verdict(self) -> str:
        return "blocked" if self.blocking_findings() else "allowed"

    @property
    def max_severity(self) -> Severity | None:
        return max((f.severity for f in self.findings), default=None)

    def counts(self) -> dict[str, int]:
        out = {str(s): 0 for s in Severity}
        for f in self.findings:
            out[str(f.severity)] += 1
        return out

    def to_dict(self) -> dict[str, Any]:
        return {
            "model_ref": self.model_ref,
            "revision": self.revision,
            "policy": self.policy,
            "verdict": self.verdict,
            "counts": self.counts(),
            "files": [dataclasses.asdict(f) for f in self.files],
            "findings": [f.to_dict() for f in self.findings],
            "reputation": self.reputation,
            "lockfile": self.lockfile,
        }
