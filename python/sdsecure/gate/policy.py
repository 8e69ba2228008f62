"""What blocks: default blocks critical; strict blocks medium and above; audit never blocks."""

from __future__ import annotations

from enum import Enum

from sdsecure.errors import UserError
from sdsecure.gate.report import Severity


class Policy(str, Enum):
    DEFAULT = "default"
    STRICT = "strict"
    AUDIT = "audit"

    @classmethod
    def parse(cls, text: "str | Policy") -> "Policy":
        try:
            return cls(text)
        except ValueError:
            raise UserError(f"unknown policy {text!r}: choose default, strict or audit") from None

    @property
    def threshold(self) -> Severity | None:
        return {Policy.DEFAULT: Severity.CRITICAL, Policy.STRICT: Severity.MEDIUM, Policy.AUDIT: None}[self]

    def blocks(self, severity: Severity) -> bool:
        t = self.threshold
        return t is not None and severity >= t

    def __str__(self) -> str:
        return self.value
