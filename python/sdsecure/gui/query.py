"""Query parameters that set the app up on load, so a link (or a headless browser) can open it with
a model already validated:

    http://127.0.0.1:8501/?model=embedded&validate=1
    http://127.0.0.1:8501/?model=org/name&revision=<sha>&strict=1&validate=1

Validation on load runs the same gate as the Validate button; it never generates anything.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

from sdsecure.gui.validation import DEFAULT_MODEL

_TRUE = {"1", "true", "yes", "on"}


@dataclass(frozen=True)
class LoadRequest:
    model: str = DEFAULT_MODEL
    revision: str = ""
    strict: bool = False
    validate: bool = False


def parse_query(params: Mapping[str, str]) -> LoadRequest:
    def flag(name: str) -> bool:
        return str(params.get(name, "")).strip().lower() in _TRUE

    return LoadRequest(
        model=str(params.get("model", "")).strip() or DEFAULT_MODEL,
        revision=str(params.get("revision", "")).strip(),
        strict=flag("strict"),
        validate=flag("validate"),
    )
