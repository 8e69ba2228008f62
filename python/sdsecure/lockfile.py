"""sdsecure.lock.json: the pinned revision and the sha256 and size of every file of a model.

    {"format": 1, "repo": "org/name" | "embedded" | path, "revision": "<commit sha>" | null,
     "files": {"unet/model.onnx": {"sha256": "...", "size": 123}, ...}}

Created by `model_security.py lock` (write_lockfile), verified on every run when present (inside the
model folder, or passed explicitly): any difference blocks (LOCK-MISMATCH, critical).
"""

from __future__ import annotations

import fnmatch
import json
import os
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Mapping

from sdsecure.errors import UserError
from sdsecure.gate.blob import Blob
from sdsecure.gate.files import safe_relpath
from sdsecure.gate.report import Finding, Severity
from sdsecure.gate.rules import declare

if TYPE_CHECKING:
    from sdsecure.gate.verified import VerifiedModel

LOCKFILE_NAME = "sdsecure.lock.json"
FORMAT = 1
MAX_LOCKFILE_BYTES = 4 << 20
_SHA256_RE = re.compile(r"^[0-9a-f]{64}$")

# Files whose presence without a lock entry does not change what runs (documentation, images).
INERT_PATTERNS = ("*.md", "LICENSE*", "LICENCE*", "NOTICE*", ".gitattributes", ".gitignore",
                  "*.png", "*.jpg", "*.jpeg", "*.gif", "*.webp")

declare("LOCK-MISMATCH", Severity.CRITICAL, "Model differs from its lockfile",
        "The lockfile pins the exact bytes that were reviewed. A changed, missing or extra model file, or "
        "another revision, means what would run is not what was locked.",
        "Find out why the files changed. If the change is intended, audit the model again and re-create "
        "the lockfile with `model_security.py lock`.")
declare("LOCK-INVALID", Severity.CRITICAL, "Lockfile cannot be used",
        "A lockfile that does not parse, has another format or names unsafe paths pins nothing; a "
        "damaged pin must not silently pass.",
        "Re-create the lockfile with `model_security.py lock`.")
declare("LOCK-REPO-DIFFERS", Severity.LOW, "Lockfile was made for another repo name",
        "The hashes match, but the lockfile names another repo (a fork, a rename or a copy).",
        "Re-create the lockfile if the model moved.")
declare("LOCK-EXTRA-FILE", Severity.INFO, "Unlocked documentation file",
        "A file not in the lockfile that does not take part in inference (README, images).",
        "Nothing to do; re-create the lockfile to include it.")


@dataclass(frozen=True)
class LockedFile:
    sha256: str
    size: int


@dataclass(frozen=True)
class Lock:
    repo: str | None
    revision: str | None
    files: dict[str, LockedFile]
    source: str                # where it came from ("sdsecure.lock.json" inside the model, or a path)
    sha256: str                # of the lockfile's own bytes


class LockError(ValueError):
    """The lockfile is malformed."""


def parse_lockfile(data: bytes, source: str = LOCKFILE_NAME) -> Lock:
    """Parse and validate lockfile bytes; LockError when malformed."""
    import hashlib

    if len(data) > MAX_LOCKFILE_BYTES:
        raise LockError(f"lockfile is larger than {MAX_LOCKFILE_BYTES} bytes")
    try:
        doc = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise LockError(f"not valid JSON: {exc}") from None
    if not isinstance(doc, dict):
        raise LockError("top level is not an object")
    fmt = doc.get("format", FORMAT)
    if fmt != FORMAT:
        raise LockError(f"unsupported lockfile format {fmt!r} (expected {FORMAT})")
    files = doc.get("files")
    if not isinstance(files, dict) or not files:
        raise LockError("'files' is missing or empty")
    out: dict[str, LockedFile] = {}
    for path, entry in files.items():
        try:
            norm = safe_relpath(path)
        except ValueError as exc:
            raise LockError(f"unsafe path in lockfile: {exc}") from None
        if norm != path:
            raise LockError(f"path {path!r} is not in normal form ({norm!r})")
        if not isinstance(entry, dict):
            raise LockError(f"entry for {path!r} is not an object")
        sha, size = entry.get("sha256"), entry.get("size")
        if not isinstance(sha, str) or not _SHA256_RE.match(sha):
            raise LockError(f"entry for {path!r} has no valid sha256")
        if not isinstance(size, int) or isinstance(size, bool) or size < 0:
            raise LockError(f"entry for {path!r} has no valid size")
        out[path] = LockedFile(sha, size)
    repo, revision = doc.get("repo"), doc.get("revision")
    if repo is not None and not isinstance(repo, str):
        raise LockError("'repo' is not a string")
    if revision is not None and not isinstance(revision, str):
        raise LockError("'revision' is not a string")
    return Lock(repo, revision, out, source, hashlib.sha256(data).hexdigest())


def _inert(path: str) -> bool:
    base = path.rsplit("/", 1)[-1]
    return any(fnmatch.fnmatch(base, p) for p in INERT_PATTERNS)


def check_lockfile(files: Mapping[str, Blob], lock: Lock | Mapping[str, Any] | bytes, *,
                   revision: str | None = None, repo: str | None = None,
                   source: str = LOCKFILE_NAME, scope: Callable[[str], bool] | None = None) -> list[Finding]:
    """Compare the files read by the gate with a lockfile. `lock` is a parsed Lock, the lockfile's
    JSON object, or its raw bytes. `revision`/`repo`: what was fetched (None for local models).
    `scope(path)`: which locked files were meant to be read (a Hub fetch downloads only what the
    pipeline uses); locked files outside it are not required."""
    if isinstance(lock, (bytes, bytearray)):
        try:
            lock = parse_lockfile(bytes(lock), source)
        except LockError as exc:
            return [Finding("LOCK-INVALID", Severity.CRITICAL, source, "", f"lockfile is invalid: {exc}", {})]
    elif not isinstance(lock, Lock):
        try:
            lock = parse_lockfile(json.dumps(lock).encode(), source)
        except (LockError, TypeError, ValueError) as exc:
            return [Finding("LOCK-INVALID", Severity.CRITICAL, source, "", f"lockfile is invalid: {exc}", {})]

    findings: list[Finding] = []
    src = lock.source

    def mismatch(file: str, message: str, **evidence: Any) -> None:
        findings.append(Finding("LOCK-MISMATCH", Severity.CRITICAL, file, f"lockfile {src}", message,
                                {"lockfile": src, **evidence}))

    if lock.revision and revision and lock.revision != revision:
        mismatch("", f"revision {revision} is not the locked revision {lock.revision}",
                 expected=lock.revision, actual=revision)
    if lock.repo and repo and lock.repo != repo and not findings:
        findings.append(Finding("LOCK-REPO-DIFFERS", Severity.LOW, "", f"lockfile {src}",
                                f"lockfile was made for {lock.repo!r}, the model is {repo!r}",
                                {"lockfile": src, "locked_repo": lock.repo, "repo": repo}))
    for path, want in sorted(lock.files.items()):
        if scope is not None and not scope(path):
            continue
        blob = files.get(path)
        if blob is None:
            mismatch(path, "locked file is missing", expected_sha256=want.sha256, expected_size=want.size)
        elif blob.size != want.size or blob.sha256 != want.sha256:
            mismatch(path, "file differs from the lockfile", expected_sha256=want.sha256,
                     actual_sha256=blob.sha256, expected_size=want.size, actual_size=blob.size)
    for path in sorted(set(files) - set(lock.files)):
        if path == LOCKFILE_NAME or path.endswith("/" + LOCKFILE_NAME):
            continue
        if _inert(path):
            findings.append(Finding("LOCK-EXTRA-FILE", Severity.INFO, path, f"lockfile {src}",
                                    "documentation file not in the lockfile", {"lockfile": src}))
        else:
            mismatch(path, "file is not in the lockfile", actual_sha256=files[path].sha256,
                     actual_size=files[path].size)
    return findings


def lock_document(vm: "VerifiedModel") -> dict[str, Any]:
    files = {p: {"sha256": b.sha256, "size": b.size} for p, b in sorted(vm.files.items())
             if p != LOCKFILE_NAME}
    repo = getattr(vm.report, "model_ref", None) or vm.ref
    return {"format": FORMAT, "repo": repo, "revision": vm.revision, "files": files}


def write_lockfile(vm: "VerifiedModel", path: str | os.PathLike) -> str:
    """Write the lockfile of a verified model atomically; returns the lockfile's sha256."""
    import hashlib

    if not vm.verified:
        raise UserError("refusing to lock a model that was not validated (--skip-validation)")
    if vm.report.verdict == "blocked":
        raise UserError(f"refusing to lock {vm.ref!r}: the gate blocked it under the {vm.report.policy} policy")
    data = (json.dumps(lock_document(vm), indent=2, sort_keys=False) + "\n").encode()
    dest = Path(path)
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".sdsecure-lock-", dir=dest.parent)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, dest)
        except BaseException:
            if os.path.exists(tmp):
                os.unlink(tmp)
            raise
    except OSError as exc:
        raise UserError(f"cannot write lockfile {str(path)!r}: {exc.strerror or exc}") from None
    return hashlib.sha256(data).hexdigest()
