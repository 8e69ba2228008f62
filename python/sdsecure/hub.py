"""Pinned fetch from the Hugging Face Hub with the real huggingface_hub client.

1. `model_info(repo, revision, securityStatus=True, files_metadata=True)` resolves the branch or tag
   to its commit sha (recorded) and lists every file with its size, git oid and LFS sha256.
2. `snapshot_download(repo, revision=<sha>)` fetches only what the SD ONNX pipeline needs (all files
   for other repos) into the Hub cache (HF_HOME / HF_HUB_CACHE), with huggingface_hub's progress bars.
3. After the gate has hashed the files, `check_remote()` compares them with what the Hub published:
   LFS sha256 for large files, git blob sha1 for the others. A mismatch is critical.

HF_HUB_OFFLINE=1 (read at call time): nothing leaves the machine; the snapshot must be in the cache,
and the Hub metadata recorded at the last online fetch is used for the comparison.
"""

from __future__ import annotations

import datetime as _dt
import fnmatch
import hashlib
import json
import logging
import os
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Mapping

from sdsecure.errors import UserError
from sdsecure.gate.blob import IN_MEMORY_LIMIT, Blob
from sdsecure.gate.report import Finding, Severity
from sdsecure.gate.rules import declare
from sdsecure.refs import SHA_RE, ModelRef

log = logging.getLogger(__name__)

# What the SD 1.5 ONNX pipeline reads (safety_checker, vae_encoder, feature_extractor are not used).
SD_PATTERNS = ["model_index.json", "text_encoder/*", "unet/*", "vae_decoder/*", "tokenizer/*",
               "scheduler/*", "sdsecure.lock.json"]
DEFAULT_REVISION = "main"

declare("HUB-LFS-MISMATCH", Severity.CRITICAL, "File differs from the Hub's LFS sha256",
        "The Hub publishes the sha256 of every LFS file at a commit. Bytes that hash differently were "
        "altered after publication: in the local cache, by a mirror (HF_ENDPOINT) or in transit.",
        "Delete the model from the Hub cache (`hf cache rm`) and download it again; check HF_ENDPOINT.")
declare("HUB-GIT-MISMATCH", Severity.CRITICAL, "File differs from the Hub's git object id",
        "Small files are stored in git; their git blob sha1 at the pinned commit is published. Different "
        "bytes were altered after publication.",
        "Delete the model from the Hub cache and download it again; check HF_ENDPOINT.")
declare("HUB-UNLISTED-FILE", Severity.HIGH, "File in the snapshot that the Hub does not list",
        "The local snapshot holds a file that the repo does not contain at the pinned commit: something "
        "was added to the cache.",
        "Delete the model from the Hub cache and download it again.")
declare("HUB-FILE-MISSING", Severity.HIGH, "File listed by the Hub is missing locally",
        "The snapshot is incomplete (an interrupted download or a file removed from the cache).",
        "Download the model again.")
declare("HUB-METADATA-UNAVAILABLE", Severity.INFO, "Hashes not compared with the Hub",
        "Offline, and no record of the Hub's file list from an earlier online fetch: the files could "
        "only be checked against a lockfile.",
        "Fetch once online, or pin the model with a lockfile.")
declare("HUB-OFFLINE", Severity.INFO, "Model served from the local Hub cache without contacting the Hub",
        "HF_HUB_OFFLINE is set (or the Hub was unreachable): the revision comes from the cache and the "
        "Hub metadata is the one recorded at the last online fetch.",
        "Nothing to do; run online to refresh the Hub's scan status.")


@dataclass(frozen=True)
class HubFile:
    path: str
    size: int | None = None
    blob_id: str | None = None        # git oid (sha1 of the git blob: of the content, or of the LFS pointer)
    lfs_sha256: str | None = None
    lfs_size: int | None = None


@dataclass
class FetchResult:
    repo_id: str
    requested_revision: str | None
    revision: str                               # resolved commit sha
    snapshot_dir: Path
    patterns: list[str] | None                  # allow patterns used (None: all files)
    remote_files: dict[str, HubFile] | None     # None when unknown (offline without record)
    security_status: dict[str, Any] | None = None   # raw securityRepoStatus (live fetch only)
    offline: bool = False
    offline_reason: str = ""
    fetched_at: str = ""                        # when the Hub metadata was obtained (ISO 8601, UTC)
    findings: list[Finding] = field(default_factory=list)

    def include(self, relpath: str) -> bool:
        return self.patterns is None or any(fnmatch.fnmatch(relpath, p) for p in self.patterns)


# -- settings, read at call time (huggingface_hub reads its environment once, at import) -----------

def _truthy(v: str | None) -> bool:
    return (v or "").strip().upper() in {"1", "ON", "YES", "TRUE"}


def is_offline() -> bool:
    return _truthy(os.environ.get("HF_HUB_OFFLINE")) or _truthy(os.environ.get("TRANSFORMERS_OFFLINE"))


def hf_home() -> Path:
    env = os.environ.get("HF_HOME")
    if env:
        return Path(os.path.expanduser(os.path.expandvars(env)))
    xdg = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(xdg) / "huggingface"


def hub_cache_dir() -> Path:
    env = os.environ.get("HF_HUB_CACHE") or os.environ.get("HUGGINGFACE_HUB_CACHE")
    if env:
        return Path(os.path.expanduser(os.path.expandvars(env)))
    return hf_home() / "hub"


def endpoint() -> str | None:
    ep = os.environ.get("HF_ENDPOINT")
    return ep.rstrip("/") if ep else None


def sdsecure_cache_dir() -> Path:
    """Our own small cache (Hub metadata records, last known scan status): SDSECURE_CACHE, else
    $HF_HOME/sdsecure when HF_HOME is set, else ~/.cache/sdsecure."""
    env = os.environ.get("SDSECURE_CACHE")
    if env:
        return Path(os.path.expanduser(env))
    if os.environ.get("HF_HOME"):
        return hf_home() / "sdsecure"
    xdg = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(xdg) / "sdsecure"


def repo_folder(repo_id: str) -> str:
    return "models--" + repo_id.replace("/", "--")


def now_iso() -> str:
    return _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0).isoformat()


def write_json_atomic(path: Path, doc: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(doc, f, indent=1, sort_keys=True)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


# -- fetch ------------------------------------------------------------------------------------------

def _quiet_tqdm():
    from tqdm.auto import tqdm

    class Quiet(tqdm):  # type: ignore[misc, valid-type]
        def __init__(self, *args, **kwargs):
            kwargs["disable"] = True
            super().__init__(*args, **kwargs)

    return Quiet


def _record_path(repo_id: str, sha: str) -> Path:
    return sdsecure_cache_dir() / "hub" / repo_folder(repo_id) / f"{sha}.json"


def _save_record(res: FetchResult) -> None:
    doc = {"repo": res.repo_id, "revision": res.revision, "fetched_at": res.fetched_at,
           "patterns": res.patterns,
           "files": {p: {k: v for k, v in asdict(f).items() if k != "path"} for p, f in (res.remote_files or {}).items()}}
    try:
        write_json_atomic(_record_path(res.repo_id, res.revision), doc)
    except OSError as exc:
        log.warning("could not record the Hub metadata of %s: %s", res.repo_id, exc)


def _load_record(repo_id: str, sha: str) -> dict[str, Any] | None:
    try:
        doc = json.loads(_record_path(repo_id, sha).read_text(encoding="utf-8"))
        files = {p: HubFile(p, **{k: v for k, v in f.items() if k in ("size", "blob_id", "lfs_sha256", "lfs_size")})
                 for p, f in doc["files"].items()}
        return {"files": files, "fetched_at": doc.get("fetched_at", ""), "patterns": doc.get("patterns")}
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None


def _write_ref(repo_id: str, ref: str, sha: str) -> None:
    """Record branch/tag -> sha in the Hub cache (what huggingface_hub does), so that an offline run
    naming the branch finds the snapshot. snapshot_download does not, as we pass it the sha."""
    if SHA_RE.match(ref):
        return
    path = hub_cache_dir() / repo_folder(repo_id) / "refs" / ref
    try:
        if path.is_file() and path.read_text().strip() == sha:
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=path.parent)
        with os.fdopen(fd, "w") as f:
            f.write(sha)
        os.replace(tmp, path)
    except OSError as exc:
        log.warning("could not record %s -> %s in the Hub cache: %s", ref, sha, exc)


def _remote_files_from_info(info) -> dict[str, HubFile] | None:
    sibs = getattr(info, "siblings", None)
    if sibs is None:
        return None
    out = {}
    for s in sibs:
        lfs = s.lfs
        out[s.rfilename] = HubFile(s.rfilename, s.size, s.blob_id,
                                   lfs.sha256 if lfs else None, lfs.size if lfs else None)
    return out


def _paths_info(api, repo_id: str, sha: str, paths: list[str]) -> dict[str, HubFile]:
    out = {}
    for f in api.get_paths_info(repo_id, paths, revision=sha):
        if getattr(f, "size", None) is None or not hasattr(f, "blob_id"):
            continue
        lfs = f.lfs
        out[f.path] = HubFile(f.path, f.size, f.blob_id, lfs.sha256 if lfs else None, lfs.size if lfs else None)
    return out


def fetch(ref: ModelRef, *, progress: bool = True) -> FetchResult:
    """Fetch a Hub model at a pinned commit into the Hub cache (or find it there when offline)."""
    assert ref.kind == "hub" and ref.repo_id
    if is_offline():
        return _from_cache(ref, "HF_HUB_OFFLINE is set")

    import httpx2
    from huggingface_hub import HfApi
    from huggingface_hub.errors import (GatedRepoError, HfHubHTTPError, OfflineModeIsEnabled,
                                        RepositoryNotFoundError, RevisionNotFoundError)

    ep = endpoint()
    api = HfApi(endpoint=ep, library_name="sdsecure")
    where = ep or "https://huggingface.co"
    try:
        info = api.model_info(ref.repo_id, revision=ref.revision, securityStatus=True, files_metadata=True)
    except GatedRepoError:
        raise UserError(f"{ref.repo_id} is gated on the Hub: accept its terms and log in (`hf auth login`)") from None
    except RepositoryNotFoundError:
        raise UserError(f"model {ref.repo_id!r} not found on the Hub ({where}); if it is private, log in "
                        "with `hf auth login`") from None
    except RevisionNotFoundError:
        raise UserError(f"revision {ref.revision!r} not found in {ref.repo_id}") from None
    except (httpx2.TransportError, OfflineModeIsEnabled) as exc:
        return _from_cache(ref, f"the Hub ({where}) could not be reached: {type(exc).__name__}")
    except HfHubHTTPError as exc:
        status = getattr(getattr(exc, "response", None), "status_code", 0) or 0
        if status >= 500 or status == 429:
            return _from_cache(ref, f"the Hub ({where}) is unavailable (HTTP {status})")
        raise UserError(f"the Hub refused model_info for {ref.repo_id}: {str(exc).splitlines()[0]}") from None

    sha = getattr(info, "sha", None)
    if not isinstance(sha, str) or not SHA_RE.match(sha):
        raise UserError(f"the Hub ({where}) returned no valid commit sha for {ref.repo_id}")
    fetched_at = now_iso()
    remote = _remote_files_from_info(info)
    names = set(remote or ())
    patterns = SD_PATTERNS if "model_index.json" in names else None
    if remote is not None and any(f.size is None for f in remote.values()):
        # model_info without per-file metadata: ask paths-info for the files we will download
        wanted = [p for p in remote if patterns is None or any(fnmatch.fnmatch(p, q) for q in patterns)]
        try:
            detailed = _paths_info(api, ref.repo_id, sha, wanted)
        except (HfHubHTTPError, httpx2.TransportError) as exc:
            log.warning("paths-info failed for %s: %s", ref.repo_id, exc)
            detailed = {}
        remote = {p: detailed.get(p, f) for p, f in remote.items()}

    from huggingface_hub import snapshot_download

    try:
        folder = snapshot_download(ref.repo_id, revision=sha, cache_dir=str(hub_cache_dir()), endpoint=ep,
                                   allow_patterns=patterns, library_name="sdsecure",
                                   tqdm_class=None if progress else _quiet_tqdm())
    except (RepositoryNotFoundError, RevisionNotFoundError, GatedRepoError) as exc:
        raise UserError(f"download of {ref.repo_id}@{sha} refused by the Hub: {str(exc).splitlines()[0]}") from None
    except (HfHubHTTPError, httpx2.HTTPError, OSError, ValueError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(f"download of {ref.repo_id}@{sha} failed: {first}") from None

    _write_ref(ref.repo_id, ref.revision or DEFAULT_REVISION, sha)
    res = FetchResult(ref.repo_id, ref.revision, sha, Path(folder), patterns, remote,
                      security_status=getattr(info, "security_repo_status", None), fetched_at=fetched_at)
    if remote is not None:
        _save_record(res)
    return res


def _from_cache(ref: ModelRef, reason: str) -> FetchResult:
    """Offline: resolve the revision and find the snapshot in the Hub cache, without any request."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    cache = hub_cache_dir()
    storage = cache / repo_folder(ref.repo_id)
    requested = ref.revision or DEFAULT_REVISION
    if SHA_RE.match(requested):
        sha = requested
    else:
        try:
            sha = (storage / "refs" / requested).read_text().strip()
        except OSError:
            raise UserError(f"{ref} is not in the local Hub cache ({cache}) and {reason}: "
                            "fetch it once online") from None
        if not SHA_RE.match(sha):
            raise UserError(f"the Hub cache entry for {ref} is damaged (refs/{requested})")
    record = _load_record(ref.repo_id, sha)
    patterns = record["patterns"] if record else None
    if not record and (storage / "snapshots" / sha / "model_index.json").exists():
        patterns = SD_PATTERNS
    try:
        folder = snapshot_download(ref.repo_id, revision=sha, cache_dir=str(cache), local_files_only=True,
                                   allow_patterns=patterns)
    except (LocalEntryNotFoundError, OSError, ValueError) as exc:
        raise UserError(f"{ref} (commit {sha}) is not complete in the local Hub cache ({cache}) and "
                        f"{reason}: fetch it once online ({type(exc).__name__})") from None
    res = FetchResult(ref.repo_id, ref.revision, sha, Path(folder), patterns,
                      record["files"] if record else None, offline=True, offline_reason=reason,
                      fetched_at=record["fetched_at"] if record else "")
    res.findings.append(Finding("HUB-OFFLINE", Severity.INFO, "", "",
                                f"served from the local Hub cache at commit {sha}: {reason}",
                                {"revision": sha, "reason": reason}))
    return res


# -- integrity against the Hub ------------------------------------------------------------------------

def git_blob_sha1(blob: Blob) -> str:
    h = hashlib.sha1(f"blob {blob.size}\0".encode(), usedforsecurity=False)
    h.update(blob.view())
    return h.hexdigest()


def check_remote(files: Mapping[str, Blob], res: FetchResult) -> list[Finding]:
    """Compare the bytes the gate read with what the Hub published at the pinned commit."""
    if res.remote_files is None:
        return [Finding("HUB-METADATA-UNAVAILABLE", Severity.INFO, "", "",
                        "no Hub file list is known for this commit (offline, never fetched online by "
                        "sdsecure): hashes not compared with the Hub", {"revision": res.revision})]
    findings: list[Finding] = []
    ev = {"revision": res.revision}
    for path, blob in sorted(files.items()):
        r = res.remote_files.get(path)
        if r is None:
            findings.append(Finding("HUB-UNLISTED-FILE", Severity.HIGH, path, "",
                                    f"the Hub does not list this file at commit {res.revision[:12]}",
                                    {**ev, "sha256": blob.sha256, "size": blob.size}))
        elif r.lfs_sha256:
            if r.lfs_sha256 != blob.sha256 or (r.lfs_size is not None and r.lfs_size != blob.size):
                findings.append(Finding("HUB-LFS-MISMATCH", Severity.CRITICAL, path, "",
                                        "sha256 of the local bytes differs from the Hub's LFS sha256",
                                        {**ev, "expected_sha256": r.lfs_sha256, "actual_sha256": blob.sha256,
                                         "expected_size": r.lfs_size, "actual_size": blob.size}))
        elif r.blob_id and blob.size <= IN_MEMORY_LIMIT:
            actual = git_blob_sha1(blob)
            if actual != r.blob_id:
                findings.append(Finding("HUB-GIT-MISMATCH", Severity.CRITICAL, path, "",
                                        "git object id of the local bytes differs from the Hub's",
                                        {**ev, "expected_oid": r.blob_id, "actual_oid": actual,
                                         "expected_size": r.size, "actual_size": blob.size}))
    for path in sorted(res.remote_files):
        if path not in files and res.include(path):
            findings.append(Finding("HUB-FILE-MISSING", Severity.HIGH, path, "",
                                    "listed by the Hub at the pinned commit but missing from the local snapshot", ev))
    return findings
