"""Render a gate Report as text (for people), JSON (Report.to_dict + tool) or SARIF 2.1.0 (for code
scanning UIs). Pure functions: Report in, str out. Rule texts come from the RULES registry, so SARIF
`help`, the text report and SECURITY.md say the same thing.
"""

from __future__ import annotations

import json
import re
import urllib.parse
from typing import Any

from sdsecure import __version__
from sdsecure.gate.policy import Policy
from sdsecure.gate.report import Finding, Report, Severity
from sdsecure.gate.rules import RULES, RuleInfo, load_families

TOOL_NAME = "sdsecure"
INFORMATION_URI = "https://github.com/modular/sdsecure"
SARIF_SCHEMA_URI = "https://docs.oasis-open.org/sarif/sarif/v2.1.0/errata01/os/schemas/sarif-schema-2.1.0.json"
FORMATS = ("text", "json", "sarif")

SARIF_LEVEL = {Severity.CRITICAL: "error", Severity.HIGH: "error", Severity.MEDIUM: "warning",
               Severity.LOW: "note", Severity.INFO: "note"}
#: GitHub code scanning reads `security-severity` (0.0-10.0, CVSS-like bands) from rule properties.
SECURITY_SEVERITY = {Severity.CRITICAL: "9.5", Severity.HIGH: "8.0", Severity.MEDIUM: "5.5",
                     Severity.LOW: "3.0", Severity.INFO: "0.0"}


def is_explained(f: Finding) -> bool:
    """An `info` finding that records a recognised benign pattern (e.g. CLIP's EOS pooling), listed
    apart from the findings: rules mark it with evidence {"explained": true} or a *-EXPLAINED id."""
    return f.severity == Severity.INFO and (bool(f.evidence.get("explained")) or f.rule.endswith("-EXPLAINED"))


def sorted_findings(findings: list[Finding]) -> list[Finding]:
    return sorted(findings, key=lambda f: (-int(f.severity), f.rule, f.file, f.where))


def render(report: Report, fmt: str) -> str:
    if fmt == "text":
        return render_text(report)
    if fmt == "json":
        return render_json(report)
    if fmt == "sarif":
        return render_sarif(report)
    raise ValueError(f"unknown format {fmt!r}")


# --- text ------------------------------------------------------------------------------------------

def _evidence_summary(ev: dict[str, Any], limit: int = 240) -> str:
    parts = []
    for k, v in ev.items():
        if k == "explained":
            continue
        text = v if isinstance(v, str) else json.dumps(v, default=str, ensure_ascii=False)
        if len(text) > 80:
            text = text[:77] + "..."
        parts.append(f"{k}={text}")
    out = ", ".join(parts)
    return out if len(out) <= limit else out[: limit - 3] + "..."


def _size(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n} B"  # pragma: no cover


def _policy_text(policy: str) -> str:
    t = Policy.parse(policy).threshold
    if t is None:
        return f"{policy} policy: never blocks"
    return f"{policy} policy: blocks {t}" + ("" if t == Severity.CRITICAL else " and above")


def render_text(report: Report, *, max_files: int = 50) -> str:
    pol = Policy.parse(report.policy)
    blocking = report.blocking_findings()
    explained = [f for f in report.findings if is_explained(f)]
    findings = sorted_findings([f for f in report.findings if not is_explained(f)])
    counts = report.counts()
    lines = [
        f"VERDICT: {report.verdict.upper()}  ({_policy_text(report.policy)})",
        f"model: {report.model_ref}    revision: {report.revision or 'local (no revision)'}",
        "findings: " + ", ".join(f"{counts[str(s)]} {s}" for s in sorted(Severity, reverse=True))
        + f"    blocking: {len(blocking)}",
    ]
    if explained:
        lines[-1] += f"    explained benign patterns: {len(explained)}"
    lines.append("")

    lines.append("Findings (most severe first)" if findings else "Findings: none")
    for f in findings:
        mark = "  BLOCKS" if pol.blocks(f.severity) else ""
        loc = f.file or "(repository)"
        if f.where:
            loc += f" @ {f.where}"
        lines.append(f"  [{str(f.severity).upper():8}] {f.rule}{mark}")
        lines.append(f"      {loc}")
        lines.append(f"      {f.message}")
        if f.evidence:
            lines.append(f"      evidence: {_evidence_summary(f.evidence)}")
    lines.append("")

    if explained:
        lines.append("Explained benign patterns (recognised by structure, not findings)")
        for f in sorted_findings(explained):
            lines.append(f"  {f.rule}  {f.file}" + (f" @ {f.where}" if f.where else ""))
            lines.append(f"      {f.message}")
        lines.append("")

    lines.append("Reputation")
    lines.extend(_reputation_lines(report.reputation))
    lines.append("")
    lines.append("Lockfile: " + _lockfile_line(report.lockfile))
    total = sum(fr.size for fr in report.files)
    lines.append(f"Files hashed: {len(report.files)} ({_size(total)}), sha256:")
    for fr in report.files[:max_files]:
        lines.append(f"  {fr.sha256}  {fr.size:>12}  {fr.path}")
    if len(report.files) > max_files:
        lines.append(f"  ... {len(report.files) - max_files} more (see --format json)")
    return "\n".join(lines) + "\n"


def _reputation_lines(rep: dict[str, Any]) -> list[str]:
    if not rep:
        return ["  not assessed"]
    out = []
    hub = rep.get("hub") or {}
    state = hub.get("state", "unknown")
    line = f"  Hub scan status: {state}"
    extras = [f"{k}: {hub[k]}" for k in ("source", "as_of") if hub.get(k)]
    if extras:
        line += f" ({', '.join(extras)})"
    out.append(line)
    for p in (hub.get("files_with_issues") or [])[:20]:
        out.append(f"    flagged by the Hub: {p if isinstance(p, str) else json.dumps(p)}")
    advisories = rep.get("advisories") or []
    if not advisories:
        out.append("  local advisories: none")
    for a in advisories:
        if isinstance(a, dict):
            text = a.get("summary") or a.get("title") or a.get("rule") or ""
            out.append(f"  advisory {a.get('id', '?')}: {text}".rstrip())
    return out


def _lockfile_line(lock: dict[str, Any]) -> str:
    if not lock:
        return "not checked"
    status = lock.get("status", "unknown")
    bits = [status]
    if lock.get("path"):
        bits.append(str(lock["path"]))
    if lock.get("sha256"):
        bits.append(f"sha256 {lock['sha256']}")
    if lock.get("revision"):
        bits.append(f"revision {lock['revision']}")
    return " | ".join(bits)


# --- JSON ------------------------------------------------------------------------------------------

def report_document(report: Report) -> dict[str, Any]:
    return {"tool": {"name": TOOL_NAME, "version": __version__}, **report.to_dict()}


def render_json(report: Report) -> str:
    return json.dumps(report_document(report), indent=2, ensure_ascii=False, default=str) + "\n"


# --- SARIF 2.1.0 -----------------------------------------------------------------------------------

def _rule_name(rule_id: str) -> str:
    return "".join(p.capitalize() for p in rule_id.replace("_", "-").split("-"))


def _sarif_rule(info: RuleInfo) -> dict[str, Any]:
    help_text = f"{info.title}\n\nWhy it matters: {info.why}\n\nWhat to do: {info.fix}"
    help_md = f"**{info.title}**\n\n*Why it matters:* {info.why}\n\n*What to do:* {info.fix}"
    return {
        "id": info.id,
        "name": _rule_name(info.id),
        "shortDescription": {"text": info.title},
        "fullDescription": {"text": info.why},
        "help": {"text": help_text, "markdown": help_md},
        "defaultConfiguration": {"level": SARIF_LEVEL[info.severity]},
        "properties": {"severity": str(info.severity), "security-severity": SECURITY_SEVERITY[info.severity],
                       "tags": ["security", "model-supply-chain"]},
    }


def _uri(path: str) -> str:
    return urllib.parse.quote(path, safe="/")


_NODE_WHERE = re.compile(r"^(?P<path>.*) \((?P<op>[A-Za-z][\w.]*)\)$")


def node_from_where(where: str) -> str | None:
    """The node part of an ONNX location "main/<node name> (<op>)" (node names may contain "/");
    for nodes inside subgraphs the subgraph path is kept ("If_3.then_branch/Where_7"). None when
    `where` is not a node location."""
    m = _NODE_WHERE.match(where)
    if not m:
        return None
    path = m.group("path")
    return path[len("main/"):] if path.startswith("main/") else path


def _sarif_result(f: Finding, rule_index: int) -> dict[str, Any]:
    res: dict[str, Any] = {
        "ruleId": f.rule,
        "ruleIndex": rule_index,
        "level": SARIF_LEVEL[f.severity],
        "message": {"text": f.message or f.rule},
        "properties": {"severity": str(f.severity), "evidence": json.loads(json.dumps(f.evidence, default=str))},
    }
    loc: dict[str, Any] = {}
    if f.file:
        loc["physicalLocation"] = {"artifactLocation": {"uri": _uri(f.file), "uriBaseId": "MODELROOT"}}
    if f.where:
        loc["logicalLocations"] = [{"name": node_from_where(f.where) or f.where, "fullyQualifiedName": f"{f.file}:{f.where}"
                                    if f.file else f.where, "kind": "element"}]
    if loc:
        res["locations"] = [loc]
    res["partialFingerprints"] = {"sdsecureFinding/v1": f"{f.rule}|{f.file}|{f.where}"}
    return res


def sarif_document(report: Report) -> dict[str, Any]:
    load_families()
    ids = sorted(set(RULES) | {f.rule for f in report.findings})
    rules = [_sarif_rule(RULES.get(i) or RuleInfo(i, Severity.INFO, i, "Undeclared rule.", "See the finding."))
             for i in ids]
    index = {r: n for n, r in enumerate(ids)}
    run: dict[str, Any] = {
        "tool": {"driver": {"name": TOOL_NAME, "version": __version__, "semanticVersion": __version__,
                            "informationUri": INFORMATION_URI, "rules": rules}},
        "originalUriBaseIds": {"MODELROOT": {"description": {"text": f"root of model {report.model_ref}"}}},
        "artifacts": [{"location": {"uri": _uri(fr.path), "uriBaseId": "MODELROOT"}, "length": fr.size,
                       "hashes": {"sha-256": fr.sha256}} for fr in report.files],
        "results": [_sarif_result(f, index[f.rule]) for f in sorted_findings(report.findings)],
        "invocations": [{"executionSuccessful": True}],
        "properties": {"model_ref": report.model_ref, "revision": report.revision, "policy": report.policy,
                       "verdict": report.verdict, "counts": report.counts(),
                       "lockfile": report.lockfile, "reputation": report.reputation},
    }
    return {"$schema": SARIF_SCHEMA_URI, "version": "2.1.0", "runs": [run]}


def render_sarif(report: Report) -> str:
    return json.dumps(sarif_document(report), indent=2, ensure_ascii=False, default=str) + "\n"
