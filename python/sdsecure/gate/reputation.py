"""Reputation: what others say about a model, reported next to our own analysis, never instead of it.

- The Hub's scan status (`model_info(..., securityStatus=True).security_repo_status`): `scansDone`
  and `filesWithIssues[*].path`; every other field is optional (the format is not stable).
- Local advisories (gate/data/advisories.json: dated, with sources), matched by repo id or by a file's
  sha256.
- The last status seen online is cached (under HF_HOME/sdsecure or ~/.cache/sdsecure) and shown,
  with its date, when offline. No status is reported as unknown, never as safe.

A Hub flag is a medium finding: it asks a person to look; the verdict comes from the gate's rules.
"""

from __future__ import annotations

import json
import logging
from importlib import resources
from typing import Any, Mapping

from sdsecure.gate.blob import Blob
from sdsecure.gate.report import Finding, Severity
from sdsecure.gate.rules import declare

log = logging.getLogger(__name__)

declare("REPUTATION-HUB-FLAGGED", Severity.MEDIUM, "The Hub's scanners flag a file",
        "Hugging Face runs third-party scanners (Protect AI, JFrog, ClamAV, pickle import scan) on every "
        "repo. A flag asks for a closer look; heuristic rules also flag benign official exports, so "
        "sdsecure's own analysis decides the verdict and the report explains it.",
        "Read the Hub's scan details on the model page and the gate's findings for the same file.")
declare("REPUTATION-ADVISORY", Severity.MEDIUM, "Local advisory about this model",
        "sdsecure ships a dated list of advisories about specific repos (with sources), shown also offline.",
        "Read the advisory's sources; the gate's own findings decide whether the model runs.")
declare("REPUTATION-HUB-CLEAN", Severity.INFO, "The Hub's scans found nothing",
        "All of the Hub's scans are done and no file is flagged. This is context, not a guarantee: those "
        "scanners missed graph backdoors in tests.",
        "Nothing to do.")
declare("REPUTATION-UNKNOWN", Severity.LOW, "No scan status known",
        "The Hub's scan status could not be obtained (offline with no cached status, scans pending, or "
        "an answer in an unknown format). Unknown is not safe.",
        "Run once online to obtain the Hub's scan status.")


def load_advisories() -> list[dict[str, Any]]:
    try:
        text = (resources.files("sdsecure.gate") / "data" / "advisories.json").read_text(encoding="utf-8")
        doc = json.loads(text)
        return [a for a in doc.get("advisories", []) if isinstance(a, dict) and a.get("id")]
    except (OSError, ValueError, AttributeError) as exc:
        log.warning("advisory list unreadable: %s", exc)
        return []


def parse_security_status(raw: Any) -> dict[str, Any]:
    """Normalise a securityRepoStatus payload. Unknown shapes give state "unknown"."""
    if not isinstance(raw, dict):
        return {"state": "unknown", "scans_done": None, "files_with_issues": []}
    scans_done = raw.get("scansDone")
    scans_done = scans_done if isinstance(scans_done, bool) else None
    files = []
    fwi = raw.get("filesWithIssues")
    for item in fwi if isinstance(fwi, list) else []:
        if isinstance(item, str):
            files.append({"path": item})
            continue
        if not isinstance(item, dict) or not isinstance(item.get("path"), str):
            continue
        entry: dict[str, Any] = {"path": item["path"]}
        if isinstance(item.get("level"), str):
            entry["level"] = item["level"]
        scanners = {}
        for k, v in item.items():
            if isinstance(v, dict) and isinstance(v.get("status"), str):
                scanners[k] = v["status"]
                msg = v.get("message") or v.get("reason")
                if isinstance(msg, str):
                    scanners[k] += f": {msg[:200]}"
        if scanners:
            entry["scanners"] = scanners
        files.append(entry)
    if files:
        state = "flagged"
    elif scans_done is True and isinstance(fwi, list):
        state = "scanned-clean"
    else:
        state = "unknown"       # scans pending, or a payload we do not understand
    return {"state": state, "scans_done": scans_done, "files_with_issues": files}


# -- cache ---------------------------------------------------------------------------------------

def _cache_path(repo_id: str):
    from sdsecure.hub import repo_folder, sdsecure_cache_dir

    return sdsecure_cache_dir() / "reputation" / f"{repo_folder(repo_id)}.json"


def save_status(repo_id: str, revision: str | None, raw: Any, fetched_at: str) -> None:
    from sdsecure.hub import write_json_atomic

    try:
        write_json_atomic(_cache_path(repo_id), {"repo": repo_id, "revision": revision, "fetched_at": fetched_at,
                                                 "security_repo_status": raw})
    except (OSError, TypeError, ValueError) as exc:
        log.warning("could not cache the scan status of %s: %s", repo_id, exc)


def load_status(repo_id: str) -> dict[str, Any] | None:
    try:
        doc = json.loads(_cache_path(repo_id).read_text(encoding="utf-8"))
        return doc if isinstance(doc, dict) else None
    except (OSError, ValueError):
        return None


# -- assessment ------------------------------------------------------------------------------------

def assess(*, repo_id: str | None, revision: str | None, files: Mapping[str, Blob],
           live_status: Any = None, live: bool = False, fetched_at: str = "") -> tuple[dict[str, Any], list[Finding]]:
    """Reputation of a model. `repo_id` is None for local models (only hash advisories apply).
    `live`: the Hub answered just now (then `live_status` is its securityRepoStatus, maybe None)."""
    findings: list[Finding] = []
    hub: dict[str, Any] = {"state": "not-applicable", "source": "none"}
    if repo_id:
        hub = _hub_status(repo_id, revision, files, live_status, live, fetched_at, findings)
    advisories = _advisories(repo_id, revision, files, findings)
    return {"hub": hub, "advisories": advisories}, findings


def _hub_status(repo_id, revision, files, live_status, live, fetched_at, findings) -> dict[str, Any]:
    status = parse_security_status(live_status) if live else None
    source, as_of, status_rev = "live", fetched_at, revision
    if live and live_status is not None:
        save_status(repo_id, revision, live_status, fetched_at)
    if status is None or status["state"] == "unknown":
        cached = load_status(repo_id)
        cached_status = parse_security_status(cached.get("security_repo_status")) if cached else None
        if cached_status and cached_status["state"] != "unknown":
            status, source, as_of, status_rev = cached_status, "cache", cached.get("fetched_at", ""), cached.get("revision")
        elif status is None:
            status, source, as_of = parse_security_status(None), "none", ""
    hub = {"state": status["state"], "source": source, "as_of": as_of, "revision": status_rev,
           "scans_done": status["scans_done"], "files_with_issues": status["files_with_issues"]}
    when = f"as of {as_of}" if as_of else "date unknown"
    origin = "the Hub" if source == "live" else f"the last known Hub status ({when}, cached)"
    ev = {"source": source, "as_of": as_of, "revision": status_rev}
    if status["state"] == "flagged":
        for item in status["files_with_issues"]:
            path = item["path"]
            used = path in files
            detail = ", ".join(f"{k}: {v}" for k, v in item.get("scanners", {}).items())
            level = item.get("level")
            msg = (f"{origin} flags this file" + (f" ({level})" if level else "") + (f" [{detail}]" if detail else "")
                   + ("; sdsecure's own analysis decides the verdict" if used
                      else "; not fetched (the pipeline does not use it)"))
            findings.append(Finding("REPUTATION-HUB-FLAGGED", Severity.MEDIUM if used else Severity.INFO, path,
                                    "Hub scan", msg, {**ev, **item}))
    elif status["state"] == "scanned-clean":
        findings.append(Finding("REPUTATION-HUB-CLEAN", Severity.INFO, "", "Hub scan",
                                f"{origin}: scans done, no file flagged (context, not a guarantee)", ev))
    else:
        why = ("the Hub returned no scan status" if source == "live" and live else
               "no scan status is known (offline and nothing cached)" if source == "none" else
               "the Hub's scans are not done")
        findings.append(Finding("REPUTATION-UNKNOWN", Severity.LOW, "", "Hub scan",
                                f"reputation unknown: {why}; unknown is not safe", ev))
    return hub


def _advisories(repo_id: str | None, revision: str | None, files: Mapping[str, Blob],
                findings: list[Finding]) -> list[dict[str, Any]]:
    hashes = {b.sha256: p for p, b in files.items()}
    out = []
    for adv in load_advisories():
        matched_by = None
        revs = adv.get("revisions", "all")
        rev_ok = revs == "all" or not isinstance(revs, list) or (revision is not None and revision in revs)
        if repo_id and rev_ok and isinstance(adv.get("repo"), str) and adv["repo"].lower() == repo_id.lower():
            matched_by = "repo"
        hit_files = [hashes[h] for h in adv.get("sha256") or [] if isinstance(h, str) and h in hashes]
        if hit_files:
            matched_by = "sha256"
        if not matched_by:
            continue
        entry = {k: adv.get(k) for k in ("id", "repo", "title", "rule", "scanner", "summary", "note",
                                          "recorded", "sources") if adv.get(k) is not None}
        entry["matched_by"] = matched_by
        out.append(entry)
        for f in hit_files or [""]:
            findings.append(Finding("REPUTATION-ADVISORY", Severity.MEDIUM, f, str(adv["id"]),
                                    f"{adv.get('title', 'advisory')} (recorded {adv.get('recorded', '?')}); "
                                    "the gate's own findings decide", entry))
    return out
