"""Exceptions shared by every layer. A UserError is printed as one line, never a traceback."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from sdsecure.gate.report import Report


class UserError(Exception):
    """Something the user can fix (bad flag, missing file, unreachable model). Exit code 2."""

    exit_code = 2


class SecurityError(Exception):
    """The gate blocked the model under the active policy. Carries the full report. Exit code 1."""

    exit_code = 1

    def __init__(self, report: "Report"):
        self.report = report
        blocking = report.blocking_findings()
        first = blocking[0] if blocking else None
        summary = f"{first.rule} in {first.file} at {first.where}: {first.message}" if first else "blocked"
        super().__init__(f"model {report.model_ref!r} blocked by {report.policy} policy "
                         f"({len(blocking)} blocking finding(s)); first: {summary}")


class UnsupportedOpError(UserError):
    """The engine cannot import an ONNX node. Raised before anything is compiled."""
