"""Show a flagged ONNX file in Netron (optional extra: `pip install 'sdsecure[netron]'`).

Netron is served on 127.0.0.1 only, from the *verified bytes* held in memory (never re-read from the
model folder), and from an empty temporary directory: Netron's server answers `/data/<name>` from the
directory of the file it was given, so pointing it at a real folder (or at the current directory, its
default for a bare file name) would expose that folder's other files to any local client.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from typing import Any, Callable

from sdsecure.gate.render import node_from_where, sorted_findings
from sdsecure.gate.report import Finding, Report, Severity

INSTALL_HINT = "pip install 'sdsecure[netron]'   (or: pip install netron)"
_NODE_KEYS = ("node", "nodes", "path", "node_path", "trigger_nodes", "switch", "output_path")


class NetronUnavailable(Exception):
    """The netron package is not installed."""


def flagged_onnx_file(report: Report) -> str | None:
    """The ONNX file whose findings are most severe (above info), ties broken by count, then name."""
    scores: dict[str, tuple[int, int]] = {}
    for f in report.findings:
        if f.file.endswith(".onnx") and f.severity > Severity.INFO:
            sev, n = scores.get(f.file, (0, 0))
            scores[f.file] = (max(sev, int(f.severity)), n + 1)
    if not scores:
        return None
    return sorted(scores, key=lambda p: (-scores[p][0], -scores[p][1], p))[0]


def _names(value: Any) -> list[str]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, (list, tuple)):
        return [v for v in value if isinstance(v, str)]
    return []


def nodes_to_inspect(report: Report, path: str) -> list[tuple[str, str]]:
    """(node name, why) for every node named by a finding on `path` (above info), most severe
    first: the node of `where`, then the node names the evidence lists (trigger paths etc.)."""
    out: list[tuple[str, str]] = []
    seen: set[str] = set()
    findings: list[Finding] = [f for f in report.findings if f.file == path and f.severity > Severity.INFO]
    for f in sorted_findings(findings):
        names = []
        node = node_from_where(f.where)
        if node:
            names.append(node)
        for key in _NODE_KEYS:
            names.extend(_names(f.evidence.get(key)))
        for n in names:
            if n and n not in seen:
                seen.add(n)
                out.append((n, f"{f.severity} {f.rule}"))
    return out


@dataclass
class NetronServer:
    url: str
    stop: Callable[[], None]


def serve(data: bytes, filename: str, port: int = 0) -> NetronServer:
    """Start Netron on 127.0.0.1:`port` (0: any free port) for `data`, shown as `filename`."""
    try:
        import netron
    except ImportError:
        raise NetronUnavailable(INSTALL_HINT) from None
    tmp = tempfile.TemporaryDirectory(prefix="sdsecure-netron-")
    name = os.path.join(tmp.name, os.path.basename(filename) or "model.onnx")
    address = netron.serve(name, data=bytearray(data), address=("127.0.0.1", port), browse=False)

    def stop() -> None:
        netron.stop(address)
        tmp.cleanup()

    return NetronServer(url=f"http://{address[0]}:{address[1]}", stop=stop)


def wait_forever() -> None:
    """Block until Ctrl-C or SIGTERM (both arrive as KeyboardInterrupt; the caller stops the server)."""
    import signal
    import time

    def _term(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, _term)
    # A process started in the background by a non-interactive shell inherits SIGINT ignored, and
    # Python then leaves it ignored: Ctrl-C (or a supervisor's SIGINT) would never stop the server.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    while True:
        # Not signal.pause(): a signal that lands after Python's last check but before pause() starts
        # is handled at C level only, and pause() then waits for another one. A sleep returns within
        # the half second and Python runs the pending handler.
        time.sleep(0.5)
