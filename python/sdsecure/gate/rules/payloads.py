"""PAYLOAD-*: code hidden in a model's free text.

Every doc string, metadata_props entry, string attribute and string tensor (onnx_graph.walk_strings)
is analysed for:
- Python that *parses* (ast) and calls something that runs code or touches the host (exec, eval,
  compile, __import__, open, os.system, subprocess.*, pickle.loads, ...), with import aliases
  resolved. A word like "evaluation" or the method call `model.eval()` is not a finding.
- shell command lines (download piped to a shell, `bash -c`, `/bin/sh`, `powershell -enc`, ...);
- long base64 / hex runs that decode to an executable, an archive, a pickle or code;
- URLs (informational for well-known documentation hosts).
"""

from __future__ import annotations

import ast
import base64
import binascii
import ipaddress
import pickletools
import re
from dataclasses import dataclass
from typing import Iterator
from urllib.parse import urlsplit

from sdsecure.gate.blob import Blob
from sdsecure.gate.onnx_graph import cached_index, walk_strings
from sdsecure.gate.report import Finding, Severity
from sdsecure.gate.rules import ScanContext, declare, file_rule

PYTHON = declare(
    "PAYLOAD-PYTHON", Severity.CRITICAL,
    "Python code that runs commands or code, hidden in model text",
    why=("ONNX models carry free text (doc strings, metadata_props, string attributes, string tensors) "
         "that no runtime executes, but loaders, model cards, notebooks and custom-op hosts sometimes "
         "do (e.g. a PyOp whose 'source' attribute is exec'd, tooling that evals metadata). Python "
         "that parses and calls exec/eval/compile/__import__/os.system/subprocess/pickle.loads has no "
         "business in a model: it is a staged payload waiting for a careless consumer."),
    fix="Do not use the model. Report it to the publisher and the Hub.",
)
SHELL = declare(
    "PAYLOAD-SHELL", Severity.HIGH,
    "Shell command line hidden in model text",
    why=("Command lines such as `curl ... | sh`, `bash -c`, `/bin/sh`, `powershell -enc` inside a model's "
         "text are a second stage waiting for a tool or a person to run them. Models need none."),
    fix="Do not use the model; report it. If the text is documentation, move it to the model card.",
)
ENCODED = declare(
    "PAYLOAD-ENCODED", Severity.HIGH,
    "Encoded blob (base64/hex) that decodes to an executable, archive, pickle or code",
    why=("A long base64 or hex run that decodes to an ELF/PE/Mach-O binary, a zip/gzip archive, a "
         "pickle (which executes code when loaded) or a script is a smuggled payload: it survives "
         "scanners that only look at weights and is one decode away from running."),
    fix="Do not use the model; report it.",
)
URL = declare(
    "PAYLOAD-URL", Severity.LOW,
    "URL in model text",
    why=("URLs in a model's text are usually documentation links, but a URL on a raw IP, a paste or "
         "webhook service, or a non-HTTP scheme is how staged payloads fetch their next step or "
         "exfiltrate data. Well-known documentation hosts are listed as info, raw IPs, paste/webhook "
         "services and file/ftp/smb URLs as medium, others as low."),
    fix="Check that each URL is expected documentation; remove the others.",
)

# --- Python --------------------------------------------------------------------------------------
_PY_HINT = re.compile(r"\b(exec|eval|compile|__import__|open|system|popen|subprocess|pickle|marshal|import|"
                      r"getattr|spawn|ctypes|socket|loads|builtins|runpy|urlopen|requests|execfile|load)\b")
DANGEROUS_BUILTINS = frozenset({"exec", "eval", "compile", "__import__", "execfile", "open", "breakpoint"})
DANGEROUS_CALLS = (
    "os.system", "os.popen", "os.exec", "os.spawn", "os.posix_spawn", "os.fork", "os.kill", "os.remove",
    "os.unlink", "os.rmdir", "os.chmod", "os.startfile", "subprocess.", "pty.spawn", "commands.",
    "pickle.load", "cPickle.load", "_pickle.load", "dill.load", "joblib.load", "marshal.load",
    "shelve.open", "importlib.", "imp.load", "runpy.", "builtins.", "__builtin__.", "ctypes.",
    "socket.", "urllib.request.", "urllib2.", "requests.", "http.client.", "shutil.rmtree",
    "torch.load", "code.interact", "webbrowser.open", "platform.popen", "asyncio.create_subprocess",
)


def _dotted(node: ast.AST) -> str | None:
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if isinstance(node, ast.Name):
        parts.append(node.id)
        return ".".join(reversed(parts))
    return None


def dangerous_calls(tree: ast.AST) -> list[str]:
    """Calls in `tree` that run code or reach the host, as resolved dotted names."""
    aliases: dict[str, str] = {}
    for n in ast.walk(tree):
        if isinstance(n, ast.Import):
            for a in n.names:
                aliases[a.asname or a.name.split(".")[0]] = a.name if a.asname else a.name.split(".")[0]
        elif isinstance(n, ast.ImportFrom) and n.module:
            for a in n.names:
                aliases[a.asname or a.name] = f"{n.module}.{a.name}"
    hits: list[str] = []
    for n in ast.walk(tree):
        if not isinstance(n, ast.Call):
            continue
        name = _dotted(n.func)
        if name is None:
            # e.g. __builtins__.__dict__['exec'](...) / getattr(...)(...)
            if isinstance(n.func, (ast.Subscript, ast.Call)) and "__builtins__" in ast.dump(n.func):
                hits.append("__builtins__[...]")
            continue
        head, _, rest = name.partition(".")
        resolved = aliases.get(head, head) + ("." + rest if rest else "")
        if resolved in DANGEROUS_BUILTINS:
            hits.append(resolved)
        elif "." in resolved and any(resolved.startswith(c) for c in DANGEROUS_CALLS):
            hits.append(resolved)
        elif resolved == "getattr" and n.args and _dotted(n.args[0]) in ("__builtins__", "builtins", "os", "subprocess"):
            hits.append(f"getattr({_dotted(n.args[0])}, ...)")
        elif head.startswith("__builtins__"):
            hits.append(name)
    return hits


_FENCE = re.compile(r"```(?:python|py)?\s*\n(.*?)```", re.S)


def python_snippets(text: str) -> Iterator[str]:
    """Candidate Python programs inside free text: the whole text, fenced blocks, single lines."""
    yield text
    for m in _FENCE.finditer(text):
        yield m.group(1)
    lines = text.splitlines()
    if len(lines) > 1:
        for line in lines:
            if _PY_HINT.search(line):
                yield line.strip().strip("`").strip()
    for m in re.finditer(r"python[0-9.]*\s+-c\s+(['\"])(.+?)\1", text, re.S):
        yield m.group(2)


def analyse_python(text: str) -> tuple[list[str], str] | None:
    """(dangerous calls, the snippet that parsed) or None."""
    if not _PY_HINT.search(text):
        return None
    for snippet in python_snippets(text):
        if not snippet or not _PY_HINT.search(snippet):
            continue
        try:
            tree = ast.parse(snippet)
        except (SyntaxError, ValueError, RecursionError, MemoryError):
            continue
        hits = dangerous_calls(tree)
        if hits:
            return hits, snippet
    return None


# --- shell ---------------------------------------------------------------------------------------
SHELL_PATTERNS: list[tuple[re.Pattern[str], str]] = [(re.compile(p, re.I), d) for p, d in [
    (r"\b(curl|wget)\b[^\n|;]*\|\s*(sudo\s+)?(ba|z|da|k)?sh\b", "download piped into a shell"),
    (r"\b(curl|wget)\s+(-{1,2}[\w-]+\s+)*['\"]?(https?|ftp)://", "download command"),
    (r"\b(ba|z|da)?sh\s+-c\s", "shell -c command"),
    (r"/bin/(ba|z|da|k)?sh\b", "/bin/sh invocation"),
    (r"\bcmd(\.exe)?\s+/[ck]\s", "cmd.exe /c command"),
    (r"\bpowershell(\.exe)?\b[^\n]*\s-(e|en|enc|encodedcommand|c|command|nop|w)\b", "PowerShell command"),
    (r"\b(iex|invoke-expression)\b", "PowerShell Invoke-Expression"),
    (r"/dev/tcp/", "bash /dev/tcp reverse connection"),
    (r"\bnc(at)?\s+(-\w+\s+)*-e\s", "netcat -e"),
    (r"\bbase64\s+(-d|--decode)\b[^\n]*\|\s*(ba)?sh\b", "decoded payload piped into a shell"),
    (r"\bchmod\s+\+x\s", "chmod +x"),
    (r"\brm\s+-rf\s+[/~]", "rm -rf on system paths"),
    (r"\bmkfifo\b", "mkfifo (reverse shell plumbing)"),
    (r"\bcertutil(\.exe)?\s+-urlcache\b", "certutil download"),
    (r"\bpython[0-9.]*\s+-c\s", "python -c command"),
]]


_SHELL_HINT = re.compile(r"curl|wget|/bin/|\s-c\s|cmd|powershell|iex|invoke-expression|/dev/tcp|\bnc|base64|"
                         r"chmod|rm\s+-rf|mkfifo|certutil")     # matched against the lowercased text


def analyse_shell(text: str) -> list[str]:
    if not _SHELL_HINT.search(text.lower()):
        return []
    return [d for p, d in SHELL_PATTERNS if p.search(text)]


# --- encoded blobs -------------------------------------------------------------------------------
_B64 = re.compile(r"[A-Za-z0-9+/_-]{40,}={0,2}")   # 40 chars = 30 bytes: a short pickle
_HEX = re.compile(r"[0-9a-fA-F]{64,}")
MAX_DECODE = 1 << 20

MAGICS = [(b"\x7fELF", "ELF executable"), (b"MZ", "PE/DOS executable"), (b"\xca\xfe\xba\xbe", "Mach-O executable"),
          (b"\xcf\xfa\xed\xfe", "Mach-O executable"), (b"\xce\xfa\xed\xfe", "Mach-O executable"),
          (b"PK\x03\x04", "zip archive"), (b"\x1f\x8b", "gzip archive"), (b"BZh", "bzip2 archive"),
          (b"\xfd7zXZ\x00", "xz archive"), (b"7z\xbc\xaf\x27\x1c", "7z archive"), (b"#!", "script with shebang"),
          (b"\x00asm", "WebAssembly module")]


def is_pickle(data: bytes) -> bool:
    if not data or data[:1] != b"\x80" and not data.endswith(b"."):
        return False
    try:
        ops = {op.name for op, _arg, _pos in pickletools.genops(data)}
    except Exception:  # noqa: BLE001 - not a pickle
        return False
    return "STOP" in ops and bool(ops & {"GLOBAL", "STACK_GLOBAL", "REDUCE", "INST", "OBJ", "NEWOBJ"})


_DIGIT = re.compile(r"[0-9]")


def _has_digit(s: str) -> bool:
    return _DIGIT.search(s) is not None


def _decodings(text: str) -> Iterator[tuple[str, bytes]]:
    for m in _B64.finditer(text):
        s = m.group(0)
        if len(s) > 4 * MAX_DECODE:
            continue
        urlsafe = "-" in s or "_" in s
        if urlsafe and ("+" in s or "/" in s):
            continue          # mixed alphabets: a path or an identifier, not base64
        if not (_has_digit(s) and s.lower() != s and s.upper() != s):
            continue          # encoded binary has digits and both cases; identifiers and words do not
        for dec in ((base64.urlsafe_b64decode,) if urlsafe else (base64.b64decode,)):
            try:
                yield "base64", dec(s + "=" * (-len(s) % 4))
                break
            except (binascii.Error, ValueError):
                continue
    for m in _HEX.finditer(text):
        s = m.group(0)
        s = s[: len(s) // 2 * 2]
        if len(s) <= 2 * MAX_DECODE:
            try:
                yield "hex", bytes.fromhex(s)
            except ValueError:
                pass


def classify_bytes(data: bytes) -> str | None:
    for magic, kind in MAGICS:
        if data.startswith(magic):
            if kind.startswith("PE") and len(data) < 64:
                continue
            return kind
    if is_pickle(data):
        return "pickle"
    return None


def _as_text(data: bytes) -> str | None:
    try:
        s = data.decode("utf-8")
    except UnicodeDecodeError:
        return None
    printable = sum(c.isprintable() or c in "\n\r\t" for c in s)
    return s if s and printable / len(s) > 0.95 else None


def _looks_like_python(text: str) -> bool:
    try:
        tree = ast.parse(text)
    except (SyntaxError, ValueError, RecursionError, MemoryError):
        return False
    return len(text) >= 20 and any(isinstance(n, (ast.Import, ast.ImportFrom, ast.FunctionDef, ast.ClassDef))
                                   for n in ast.walk(tree))


# --- URLs ----------------------------------------------------------------------------------------
_URL = re.compile(r"\b(?:https?|ftp|file|smb|ssh|sftp|s3|gs)://[^\s'\"<>()\[\]{}]+", re.I)
WELL_KNOWN_HOSTS = ("github.com", "huggingface.co", "hf.co", "pytorch.org", "onnx.ai", "arxiv.org",
                    "python.org", "microsoft.com", "onnxruntime.ai", "tensorflow.org", "nvidia.com",
                    "modular.com", "stability.ai", "openai.com", "paperswithcode.com", "wikipedia.org",
                    "readthedocs.io", "apache.org", "opensource.org", "creativecommons.org")
SUSPICIOUS_HOSTS = ("pastebin.com", "paste.ee", "hastebin.com", "transfer.sh", "ngrok.io", "ngrok-free.app",
                    "ngrok.app", "webhook.site", "requestbin", "pipedream.net", "discord.com", "discordapp.com",
                    "t.me", "telegram.org", "bit.ly", "tinyurl.com", "0x0.st", "interact.sh", "oast.")


def _host_matches(host: str, pattern: str) -> bool:
    if pattern.endswith("."):                  # a label prefix, e.g. "oast." matches x.oast.fun
        return ("." + host).find("." + pattern) >= 0
    if "." not in pattern:                     # a bare name, e.g. "requestbin"
        return pattern in host.split(".")
    return host == pattern or host.endswith("." + pattern)


def url_severity(url: str) -> tuple[Severity, str]:
    try:
        parts = urlsplit(url)
        host = (parts.hostname or "").lower()
    except ValueError:
        return Severity.MEDIUM, "malformed URL"
    scheme = parts.scheme.lower()
    if scheme not in ("http", "https"):
        return Severity.MEDIUM, f"{scheme}:// URL"
    try:
        ipaddress.ip_address(host)
        return Severity.MEDIUM, "URL on a raw IP address"
    except ValueError:
        pass
    if any(_host_matches(host, h) for h in SUSPICIOUS_HOSTS):
        return Severity.MEDIUM, "paste, webhook or tunnelling service"
    if any(host == h or host.endswith("." + h) for h in WELL_KNOWN_HOSTS):
        return Severity.INFO, "well-known documentation host"
    return Severity.LOW, "URL"


# --- the rule ------------------------------------------------------------------------------------
@dataclass
class _Hit:
    rule: str
    severity: Severity
    message: str
    evidence: dict


def analyse_text(text: str, depth: int = 0) -> list[_Hit]:
    """All payload hits in one string (cached by the caller)."""
    hits: list[_Hit] = []
    py = analyse_python(text)
    if py:
        calls, snippet = py
        hits.append(_Hit(PYTHON.id, PYTHON.severity, f"Python code calling {', '.join(sorted(set(calls))[:5])}",
                         {"calls": sorted(set(calls)), "code": snippet[:500]}))
    sh = analyse_shell(text)
    if sh:
        hits.append(_Hit(SHELL.id, SHELL.severity, f"shell command line ({'; '.join(sh[:3])})",
                         {"patterns": sh, "text": text[:500]}))
    if depth < 2 and len(text) >= 40:
        for enc, data in _decodings(text):
            kind = classify_bytes(data)
            if kind:
                hits.append(_Hit(ENCODED.id, ENCODED.severity, f"{enc} blob decodes to {kind} ({len(data)} bytes)",
                                 {"encoding": enc, "decoded_kind": kind, "decoded_bytes": len(data),
                                  "decoded_head": data[:32].hex()}))
                continue
            inner = _as_text(data)
            if inner is None:
                continue
            sub = analyse_text(inner, depth + 1)
            for h in sub:
                if h.rule == URL.id:
                    continue
                h.message = f"{enc}-encoded {h.message}"
                h.evidence = {**h.evidence, "encoding": enc}
                hits.append(h)
            if not sub and _looks_like_python(inner):
                hits.append(_Hit(ENCODED.id, ENCODED.severity, f"{enc} blob decodes to Python source",
                                 {"encoding": enc, "decoded_kind": "python source", "decoded_text": inner[:500]}))
    for url in dict.fromkeys(_URL.findall(text)) if "://" in text else ():
        sev, why = url_severity(url)
        hits.append(_Hit(URL.id, sev, f"URL ({why}): {url[:200]}", {"url": url[:2000], "reason": why}))
    return hits


@file_rule("*.onnx")
def check_payloads(ctx: ScanContext, path: str, blob: Blob) -> Iterator[Finding]:
    model = ctx.onnx(path)
    if model is None:
        return
    cache: dict[str, list[_Hit]] = {}
    urls: dict[str, tuple[Severity, str, list[str]]] = {}
    for sl in walk_strings(model, cached_index(ctx, path, model)):
        if not sl.text:
            continue
        hits = cache.get(sl.text)
        if hits is None:
            hits = cache[sl.text] = analyse_text(sl.text)
        for h in hits:
            if h.rule == URL.id:
                u = h.evidence["url"]
                if u not in urls:
                    urls[u] = (h.severity, h.message, [])
                urls[u][2].append(sl.where)
                continue
            yield Finding(h.rule, h.severity, path, sl.where, f"{sl.kind}: {h.message}",
                          {**h.evidence, "source": sl.kind})
    for u, (sev, msg, wheres) in urls.items():
        yield Finding(URL.id, sev, path, wheres[0], msg,
                      {"url": u, "locations": wheres[:20], "count": len(wheres)})
