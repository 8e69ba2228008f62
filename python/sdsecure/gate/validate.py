"""Orchestration of the gate (placeholder until the gate issue lands; see gate/__init__.py)."""

from __future__ import annotations

from sdsecure.gate.verified import VerifiedModel


def validate(ref: str, policy: str = "default", *, revision: str | None = None, progress: bool = True) -> VerifiedModel:
    raise NotImplementedError


def audit(ref: str, policy: str = "default", *, revision: str | None = None, progress: bool = True) -> VerifiedModel:
    raise NotImplementedError


def load_unverified(ref: str, *, revision: str | None = None, progress: bool = True) -> VerifiedModel:
    raise NotImplementedError
