"""Model references: what the user names, before anything is fetched or read.

    "embedded"              the small SD pipeline shipped inside the package
    ./path/to/folder        a local model folder (SD layout or any folder of model files)
    ./model.onnx            a single local model file
    org/name[@revision]     a Hugging Face Hub repo, optionally at a branch, tag or commit sha

A local path wins over a Hub id when both could apply (like transformers' from_pretrained).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Literal

from sdsecure.errors import UserError

EMBEDDED = "embedded"
EMBEDDED_PACKAGE = "sdsecure.embedded"
EMBEDDED_MODEL = "tiny-sd15"

_NAME = r"[A-Za-z0-9](?:[A-Za-z0-9._-]{0,94}[A-Za-z0-9])?"
_REPO_RE = re.compile(rf"^{_NAME}/{_NAME}$")
# branch / tag / sha; refs/pr/N is a valid Hub revision too
_REV_RE = re.compile(r"^[A-Za-z0-9._][A-Za-z0-9._/+-]{0,254}$")
SHA_RE = re.compile(r"^[0-9a-f]{40}$")

Kind = Literal["embedded", "dir", "file", "hub"]


@dataclass(frozen=True)
class ModelRef:
    kind: Kind
    text: str                     # what the user asked for, normalised ("embedded", a path, "org/name")
    path: Path | None = None      # local folder or file (embedded, dir, file)
    repo_id: str | None = None    # hub
    revision: str | None = None   # hub: requested branch / tag / sha (None = default branch)

    @property
    def is_local(self) -> bool:
        return self.kind != "hub"

    def __str__(self) -> str:
        if self.kind == "hub" and self.revision:
            return f"{self.repo_id}@{self.revision}"
        return self.text


def embedded_path() -> Path:
    """Folder of the embedded model (package data), located with importlib.resources."""
    try:
        p = resources.files(EMBEDDED_PACKAGE) / EMBEDDED_MODEL
    except ModuleNotFoundError:  # pragma: no cover - broken install
        raise UserError("the embedded model is missing from this installation of sdsecure") from None
    path = Path(str(p))
    if not path.is_dir():
        raise UserError(f"the embedded model is missing from this installation of sdsecure ({path})")
    return path


def _check_revision(rev: str) -> str:
    if not _REV_RE.match(rev) or ".." in rev or rev.endswith(("/", ".lock")) or "//" in rev:
        raise UserError(f"invalid revision {rev!r}: expected a branch, a tag or a 40-hex commit sha")
    return rev


def parse_ref(ref: str, revision: str | None = None) -> ModelRef:
    """Turn what the user typed into a ModelRef, or raise a one-line UserError."""
    if not isinstance(ref, str) or not ref.strip():
        raise UserError("no model given: use 'embedded', a local folder or file, or a Hub id org/name")
    ref = ref.strip()
    if revision is not None:
        revision = revision.strip() or None

    if ref == EMBEDDED:
        if revision:
            raise UserError("--revision applies to Hub models only, not to the embedded model")
        return ModelRef("embedded", EMBEDDED, path=embedded_path())

    local = Path(os.path.expanduser(ref))
    if os.path.lexists(local):
        if revision:
            raise UserError(f"--revision applies to Hub models only; {ref!r} is a local path")
        if local.is_dir():
            return ModelRef("dir", ref, path=local)
        if local.is_file():
            return ModelRef("file", ref, path=local)
        raise UserError(f"{ref!r} is neither a folder nor a regular file")

    repo, at, rev_in_ref = ref.partition("@")
    if ref.startswith(("https://", "http://", "hf://")):
        raise UserError(f"give the Hub model as org/name (e.g. {_url_hint(ref)}), not as a URL")
    if _REPO_RE.match(repo) and "--" not in repo and ".." not in repo:
        if at:
            if not rev_in_ref:
                raise UserError(f"empty revision after '@' in {ref!r}")
            if revision and revision != rev_in_ref:
                raise UserError(f"two different revisions given: {rev_in_ref!r} in the model id and "
                                f"{revision!r} as --revision")
            revision = rev_in_ref
        return ModelRef("hub", repo, repo_id=repo, revision=_check_revision(revision) if revision else None)

    looks_like_path = ref.startswith((".", "/", "~")) or os.sep in ref or ref.endswith(
        (".onnx", ".pb", ".bin", ".safetensors", ".ckpt", ".pt", ".pth", ".pkl"))
    if looks_like_path:
        raise UserError(f"no such file or folder: {ref!r}")
    raise UserError(f"cannot understand model {ref!r}: use 'embedded', a local folder or file, "
                    "or a Hub id org/name[@revision]")


def _url_hint(url: str) -> str:
    m = re.search(r"(?:huggingface\.co/|hf://)(?:models/)?([^/@?#]+/[^/@?#]+)", url)
    return m.group(1) if m else "org/name"
