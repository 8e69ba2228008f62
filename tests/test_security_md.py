"""SECURITY.md stays in step with the gate's rule registry (one source: the `declare()` calls)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tools"))

import gen_rule_docs  # noqa: E402

DECLARE_RE = re.compile(r"""declare\(\s*["']([A-Z][A-Z0-9]*(?:-[A-Z0-9]+)+)["']""")


def _declared_in_source() -> set[str]:
    ids: set[str] = set()
    for path in (REPO / "python" / "sdsecure").rglob("*.py"):
        ids |= set(DECLARE_RE.findall(path.read_text(encoding="utf-8")))
    return ids


def test_rule_table_is_up_to_date():
    res = subprocess.run([sys.executable, str(REPO / "tools" / "gen_rule_docs.py"), "--check"],
                         capture_output=True, text=True, cwd=REPO, timeout=300)
    assert res.returncode == 0, res.stderr


def test_registry_holds_every_declared_rule():
    """The generator imports enough of the package to see every rule declared anywhere."""
    registry = gen_rule_docs.load_registry()
    declared = _declared_in_source()
    assert declared, "no declare() calls found: the regex or the layout changed"
    assert declared <= set(registry), f"declared but not rendered: {sorted(declared - set(registry))}"


def test_table_lists_every_rule_once_with_its_severity():
    registry = gen_rule_docs.load_registry()
    text = (REPO / "SECURITY.md").read_text(encoding="utf-8")
    table = text.split(gen_rule_docs.BEGIN, 1)[1].split(gen_rule_docs.END, 1)[0]
    rows = re.findall(r"^\| `([A-Z0-9-]+)` \| (\w+) \|", table, flags=re.M)
    assert sorted(r for r, _ in rows) == sorted(registry)
    for rule, severity in rows:
        assert severity == str(registry[rule].severity)


def test_prose_names_only_real_rules():
    """Every rule id the text mentions (outside the generated table) exists, so the prose cannot
    drift from the code; `BACKDOOR-*` style family wildcards must match at least one rule."""
    registry = set(gen_rule_docs.load_registry())
    text = (REPO / "SECURITY.md").read_text(encoding="utf-8")
    head, rest = text.split(gen_rule_docs.BEGIN, 1)
    prose = head + rest.split(gen_rule_docs.END, 1)[1]
    families = {r.split("-")[0] for r in registry}
    mentioned = set(re.findall(r"`([A-Z][A-Z0-9]*(?:-[A-Z0-9*]+)+)`", prose))
    mentioned = {m for m in mentioned if m.split("-")[0] in families | {"BACKDOOR"}}
    assert mentioned, "the prose names no rule"
    for m in sorted(mentioned):
        if m.endswith("-*"):
            assert any(r.startswith(m[:-1]) for r in registry), f"SECURITY.md names {m}: no such rule family"
        else:
            assert m in registry, f"SECURITY.md names {m}, which no rule declares"


def test_security_md_has_the_required_sections():
    text = (REPO / "SECURITY.md").read_text(encoding="utf-8")
    for heading in ("## Threat model", "## What the gate catches", "## What no static scan can catch",
                    "## The PAIT-ONNX-200 flag and our report", "## Verifying a model by hand",
                    "## Reporting a vulnerability", "## Incident checklist"):
        assert heading in text
    for must in ("homoglyph", "sha256sum", "openssl dgst -sha256", "Netron", "--netron", "sdsecure.lock.json",
                 "BACKDOOR-EXPLAINED"):
        assert must in text, must
