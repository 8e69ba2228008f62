"""Orchestration of the gate (see gate/__init__.py for the contract):

    resolve ref -> fetch (pinned) -> walk and read every byte once -> hashes -> Hub hashes ->
    lockfile -> reputation -> rules.run_all(ScanContext) -> Report(policy) -> VerifiedModel
"""

from __future__ import annotations

import hashlib
import logging
import os
import posixpath
import time
from dataclasses import dataclass, field
from typing import Any

from sdsecure import hub, refs
from sdsecure.errors import SecurityError, UserError
from sdsecure.gate import reputation, rules
from sdsecure.gate.blob import Blob
from sdsecure.gate.files import safe_relpath, read_single_file, walk_snapshot
from sdsecure.gate.policy import Policy
from sdsecure.gate.report import FileRecord, Finding, Report, Severity
from sdsecure.gate.rules import ScanContext, declare
from sdsecure.gate.verified import COMPONENT_FILES, VerifiedModel
from sdsecure.lockfile import LOCKFILE_NAME, Lock, LockError, check_lockfile, parse_lockfile

log = logging.getLogger(__name__)

declare("GATE-INTERNAL-ERROR", Severity.CRITICAL, "The analysis could not complete",
        "A rule failed on this model, so the remaining checks did not run. A model that makes the scanner "
        "fail must not pass by default (fail closed).",
        "Report the error with the model; use `--policy audit` only to inspect the partial report.")

# SD 1.5 at 512x512 with classifier-free guidance (batch 2); the VAE decodes one image.
SD_BATCH, SD_TOKENS, SD_LATENT, SD_HIDDEN = 2, 77, 64, 768


def validate(ref: str, policy: str = "default", *, revision: str | None = None, progress: bool = True,
             lockfile: str | os.PathLike | None = None) -> VerifiedModel:
    """Fetch, read once, hash and scan; raise SecurityError when `policy` blocks the model."""
    vm = _run(ref, policy, revision=revision, progress=progress, lockfile=lockfile, scan=True)
    if vm.report.verdict == "blocked":
        raise SecurityError(vm.report)
    return vm


def audit(ref: str, policy: str = "default", *, revision: str | None = None, progress: bool = True,
          lockfile: str | os.PathLike | None = None) -> VerifiedModel:
    """Like validate() but never raises SecurityError: look at `.report.verdict`."""
    return _run(ref, policy, revision=revision, progress=progress, lockfile=lockfile, scan=True)


def load_unverified(ref: str, *, revision: str | None = None, progress: bool = True,
                    lockfile: str | os.PathLike | None = None) -> VerifiedModel:
    """--skip-validation: fetch, read once and hash (lockfile and Hub hashes still checked and
    reported), no rules, nothing blocks; `verified=False`."""
    return _run(ref, "audit", revision=revision, progress=progress, lockfile=lockfile, scan=False)


# -- steps ------------------------------------------------------------------------------------------

@dataclass
class _Lockfiles:
    info: dict[str, Any] = field(default_factory=lambda: {"status": "absent"})
    sha256: str | None = None
    findings: list[Finding] = field(default_factory=list)


def _run(ref: str, policy: str, *, revision: str | None, progress: bool,
         lockfile: str | os.PathLike | None, scan: bool) -> VerifiedModel:
    pol = Policy.parse(policy)
    t0 = time.perf_counter()
    mref = refs.parse_ref(ref, revision)
    findings: list[Finding] = []
    fetched: hub.FetchResult | None = None

    if mref.kind == "hub":
        fetched = hub.fetch(mref, progress=progress)
        findings += fetched.findings
        walk = walk_snapshot(fetched.snapshot_dir, include=fetched.include, progress=progress, defer_large=True)
    elif mref.kind == "file":
        assert mref.path is not None
        walk = walk_snapshot(mref.path.parent, only=[mref.path.name], progress=progress)
        extra = _external_data_names(mref.path.name, walk.files.get(mref.path.name))
        if extra:
            more = walk_snapshot(mref.path.parent, only=extra, progress=progress)
            walk.files.update(more.files)
            walk.findings += more.findings
    else:
        assert mref.path is not None
        # large files are read and hashed in the background (two at a time) while the rules look at the rest
        walk = walk_snapshot(mref.path, progress=progress, defer_large=True)
    try:
        findings += walk.findings
        files = walk.files
        if not files and not walk.findings:
            raise UserError(f"{mref} contains no files")
        rule_findings = _scan(mref, files) if scan else []
    finally:
        findings += walk.finish()               # every byte read and hashed from here on
    findings += rule_findings

    rev = fetched.revision if fetched else None
    repo_id = mref.repo_id
    if fetched:
        findings += hub.check_remote(files, fetched)
    locks = _check_locks(files, lockfile, revision=rev, repo=repo_id, scope=fetched.include if fetched else None)
    findings += locks.findings

    rep: dict[str, Any] = {}
    if scan:
        rep, rep_findings = reputation.assess(
            repo_id=repo_id, revision=rev, files=files,
            live_status=fetched.security_status if fetched else None,
            live=bool(fetched and not fetched.offline), fetched_at=fetched.fetched_at if fetched else "")
        findings += rep_findings

    report = Report(model_ref=mref.text, revision=rev, policy=str(pol),
                    files=[FileRecord(p, b.size, b.sha256) for p, b in sorted(files.items())],
                    findings=findings, reputation=rep, lockfile=locks.info)
    log.info("gate: %s (%d files, %.2f GB) %s in %.2f s", mref, len(files), walk.total_bytes / 1e9,
             report.verdict if scan else "hashed (unverified)", time.perf_counter() - t0)
    return VerifiedModel(ref=mref.text, revision=rev, files=files, report=report, verified=scan,
                         lockfile_sha256=locks.sha256)


def _scan(mref: refs.ModelRef, files: dict[str, Blob]) -> list[Finding]:
    """Every rule over the snapshot; a rule that fails makes the report fail closed."""
    ctx = ScanContext(model_ref=mref.text, files=files, is_sd_repo="model_index.json" in files)
    try:
        ctx.input_shapes = pipeline_input_shapes(ctx)
        return rules.run_all(ctx)
    except Exception as exc:  # noqa: BLE001 - fail closed, with the reason in the report
        log.exception("rule failure on %s", mref)
        return [Finding("GATE-INTERNAL-ERROR", Severity.CRITICAL, "", "",
                        f"a rule failed, the analysis is incomplete: {type(exc).__name__}: {exc}",
                        {"error": f"{type(exc).__name__}: {exc}"})]


def _external_data_names(name: str, blob: Blob | None) -> list[str]:
    """For a single .onnx file given alone: the files its tensors keep their data in (same folder or
    below). Unsafe locations are left out here; the external-data rules report them."""
    if blob is None or not name.endswith(".onnx"):
        return []
    try:
        import onnx
        from onnx.external_data_helper import _get_all_tensors  # noqa: PLC2701 - walks subgraphs too

        model = onnx.load_model_from_string(blob.bytes())
        out = set()
        for t in _get_all_tensors(model):
            if t.data_location == onnx.TensorProto.EXTERNAL:
                loc = {e.key: e.value for e in t.external_data}.get("location", "")
                try:
                    out.add(safe_relpath(posixpath.normpath(loc)) if loc else "")
                except ValueError:
                    continue
        return sorted(p for p in out if p and p != name)
    except Exception:  # noqa: BLE001 - an unparsable model is reported by the parse rule
        return []


def _check_locks(files: dict[str, Blob], explicit: str | os.PathLike | None, *, revision: str | None,
                 repo: str | None, scope=None) -> _Lockfiles:
    """The lockfile inside the model folder (its file hashes; its revision cannot name the commit that
    contains it) and an explicit one (hashes and revision). Every lockfile present is verified."""
    out = _Lockfiles()
    checked: list[dict[str, Any]] = []
    candidates: list[tuple[str, bytes, str | None]] = []
    if LOCKFILE_NAME in files:
        candidates.append((LOCKFILE_NAME, files[LOCKFILE_NAME].bytes(), None))
    if explicit is not None:
        blob, _real = read_single_file(explicit)
        candidates.append((str(explicit), blob.bytes(), revision))
    for source, data, rev in candidates:
        sha = hashlib.sha256(data).hexdigest()
        try:
            lock: Lock | None = parse_lockfile(data, source)
        except LockError as exc:
            lock = None
            out.findings.append(Finding("LOCK-INVALID", Severity.CRITICAL, source if source == LOCKFILE_NAME else "",
                                        f"lockfile {source}", f"lockfile is invalid: {exc}", {"lockfile": source}))
            checked.append({"path": source, "sha256": sha, "status": "invalid"})
            continue
        found = check_lockfile(files, lock, revision=rev, repo=repo, scope=scope)
        out.findings += found
        bad = any(f.severity >= Severity.CRITICAL for f in found)
        checked.append({"path": source, "sha256": sha, "status": "mismatch" if bad else "verified",
                        "revision": lock.revision, "repo": lock.repo, "files": len(lock.files)})
    if checked:
        primary = checked[-1]          # the explicit lockfile when given
        out.info = dict(primary)
        if len(checked) > 1:
            out.info["others"] = checked[:-1]
        out.sha256 = primary["sha256"]
    return out


# -- input shapes for static size analysis --------------------------------------------------------

def _declared(vi) -> list[int | None] | None:
    t = vi.type.tensor_type
    if not t.HasField("shape"):
        return None
    return [d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else None for d in t.shape.dim]


def _fill(declared: list[int | None] | None, wanted: tuple[int, ...] | None) -> tuple[int, ...]:
    """Static declared dims win; dynamic ones take the pipeline's value (or 1 when unknown)."""
    if declared is None:
        return wanted if wanted is not None else (1,)
    if wanted is not None and len(wanted) == len(declared):
        return tuple(d if d is not None else w for d, w in zip(declared, wanted))
    return tuple(d if d is not None else 1 for d in declared)


def pipeline_input_shapes(ctx: ScanContext) -> dict[str, dict[str, tuple[int, ...]]]:
    """Concrete input shapes per ONNX file: the SD 1.5 pipeline's for the SD components, batch 1 and
    dims 1 for anything else."""
    out: dict[str, dict[str, tuple[int, ...]]] = {}
    hidden = SD_HIDDEN
    te = ctx.onnx(COMPONENT_FILES["text_encoder"]) if ctx.is_sd_repo and COMPONENT_FILES["text_encoder"] in ctx.files else None
    if te is not None:
        for o in te.graph.output:
            dims = _declared(o)
            if o.name == "last_hidden_state" and dims and len(dims) == 3 and dims[2]:
                hidden = dims[2]
    sd_wanted = {
        COMPONENT_FILES["text_encoder"]: {"input_ids": (SD_BATCH, SD_TOKENS)},
        COMPONENT_FILES["unet"]: {"sample": (SD_BATCH, 4, SD_LATENT, SD_LATENT),
                                  "encoder_hidden_states": (SD_BATCH, SD_TOKENS, hidden)},
        COMPONENT_FILES["vae_decoder"]: {"latent_sample": (1, 4, SD_LATENT, SD_LATENT)},
    }
    for path in sorted(ctx.files):
        if not path.endswith(".onnx"):
            continue
        model = ctx.onnx(path)
        if model is None:
            continue
        inits = {i.name for i in model.graph.initializer}
        wanted = sd_wanted.get(path, {}) if ctx.is_sd_repo else {}
        shapes: dict[str, tuple[int, ...]] = {}
        for inp in model.graph.input:
            if inp.name in inits:
                continue
            declared = _declared(inp)
            w = wanted.get(inp.name)
            if w is None and ctx.is_sd_repo and path == COMPONENT_FILES["unet"] and inp.name == "timestep":
                # as the graph declares: a scalar, [1], or [batch]
                w = () if declared == [] else (SD_BATCH,) if declared == [None] else None
            shapes[inp.name] = _fill(declared, w)
        out[path] = shapes
    return out


__all__ = ["validate", "audit", "load_unverified", "pipeline_input_shapes"]
