"""Test-only helpers of the pipeline tests: a VerifiedModel straight from a folder (no gate, no rules),
for exercising the pipeline in isolation. Production code always gets its VerifiedModel from
sdsecure.gate.validate / load_unverified."""

from __future__ import annotations

from pathlib import Path

from sdsecure.gate.blob import Blob
from sdsecure.gate.report import Report
from sdsecure.gate.verified import VerifiedModel

REPO_ROOT = Path(__file__).resolve().parent.parent
EMBEDDED_DIR = REPO_ROOT / "python" / "sdsecure" / "embedded" / "tiny-sd15"


def verified_from_dir(root: Path, ref: str = "test-model", *, skip: tuple[str, ...] = (),
                      replace: dict[str, bytes] | None = None) -> VerifiedModel:
    """Every file under `root` as a Blob (minus `skip`, with `replace`d contents)."""
    assert root.is_dir(), f"model folder {root} is missing"
    files: dict[str, Blob] = {}
    for p in sorted(root.rglob("*")):
        rel = p.relative_to(root).as_posix()
        if p.is_file() and rel not in skip:
            files[rel] = Blob.from_bytes(p.read_bytes())
    for rel, data in (replace or {}).items():
        files[rel] = Blob.from_bytes(data)
    return VerifiedModel(ref, None, files, Report(ref, None, "default"))
