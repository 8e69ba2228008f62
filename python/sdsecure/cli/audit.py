"""sdsecure-audit / model_security.py: run the security gate on a model and report.

    model_security.py [--model-id REF] [--revision REV] [--strict | --policy P]
                      [--format text|json|sarif] [--output FILE] [--netron]
    model_security.py lock --model-id REF [--revision REV] [--output PATH]

REF is a Hub id (org/name[@rev]), a local folder, a single model file, or "embedded" (default).
Exit codes: 0 allowed, 1 blocked by the policy, 2 could not complete (bad arguments, I/O error,
unreachable model). The same `audit()` call as every other entry point: no lighter check here.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Sequence, TextIO

from sdsecure import __version__
from sdsecure.cli.common import (EXIT_BLOCKED, EXIT_OK, ArgumentParser, atomic_write_text, run,
                                 setup_logging)

FORMATS = ("text", "json", "sarif")
POLICIES = ("default", "strict", "audit")


def _common(p: ArgumentParser) -> None:
    p.add_argument("--model-id", default="embedded", metavar="REF",
                   help="Hub id org/name[@revision], local folder, single model file, or 'embedded' "
                        "(default: %(default)s)")
    p.add_argument("--revision", default=None, help="Hub branch, tag or commit (pinned to its commit sha)")
    pol = p.add_mutually_exclusive_group()
    pol.add_argument("--strict", action="store_true", help="same as --policy strict: block medium and above")
    pol.add_argument("--policy", choices=POLICIES, default="default",
                     help="default blocks critical; strict blocks medium and above; audit never blocks")
    p.add_argument("--lockfile", default=None, metavar="PATH",
                   help="also verify this lockfile (hashes and revision); a mismatch blocks")
    p.add_argument("--no-progress", action="store_true", help="no progress bars while fetching/hashing")
    p.add_argument("-v", "--verbose", action="count", default=0, help="more logging on stderr (-vv: debug)")
    p.add_argument("--debug", action="store_true", help="show tracebacks of internal errors")


def build_parser(prog: str | None = None) -> ArgumentParser:
    p = ArgumentParser(prog=prog, usage="%(prog)s [options]\n       %(prog)s lock --model-id REF [--output PATH]",
                       description="Run the sdsecure security gate on a model and report. "
                       "Subcommand: 'lock' writes sdsecure.lock.json (see 'lock --help').",
                       epilog="exit codes: 0 allowed, 1 blocked by policy, 2 could not complete")
    _common(p)
    p.add_argument("--format", choices=FORMATS, default="text", help="report format (default: text)")
    p.add_argument("--json", dest="format", action="store_const", const="json", help="same as --format json")
    p.add_argument("--output", default=None, metavar="FILE",
                   help="write the report to FILE (atomically) instead of stdout")
    p.add_argument("--netron", action="store_true",
                   help="serve the most-flagged ONNX file in Netron on 127.0.0.1 and list the nodes to "
                        "inspect (needs the 'netron' extra); runs until Ctrl-C")
    p.add_argument("--netron-port", type=int, default=0, metavar="PORT", help="Netron port (default: any free)")
    p.add_argument("--version", action="version", version=f"%(prog)s (sdsecure {__version__})")
    return p


def build_lock_parser(prog: str | None = None) -> ArgumentParser:
    p = ArgumentParser(prog=f"{prog} lock" if prog else None,
                       description="Validate a model and pin it: write sdsecure.lock.json (repo, revision "
                       "sha, sha256 and size of every file). Refuses a model the policy blocks.")
    _common(p)
    p.add_argument("--output", default=None, metavar="PATH",
                   help="lockfile path (default: inside a local model folder, else ./sdsecure.lock.json)")
    return p


def _progress(args) -> bool:
    return not args.no_progress and sys.stderr.isatty()


def _policy(args) -> str:
    return "strict" if args.strict else args.policy


def _audit(args):
    from sdsecure.gate import audit

    return audit(args.model_id, _policy(args), revision=args.revision, progress=_progress(args),
                 lockfile=args.lockfile)


def scan(args, prog: str) -> int:
    from sdsecure.gate.render import render

    vm = _audit(args)
    report = vm.report
    text = render(report, args.format)
    code = EXIT_BLOCKED if report.verdict == "blocked" else EXIT_OK
    if args.output and args.output != "-":
        dest = atomic_write_text(args.output, text)
        counts = ", ".join(f"{n} {s}" for s, n in report.counts().items() if n)
        print(f"VERDICT: {report.verdict.upper()} ({report.policy} policy; {counts or 'no findings'}); "
              f"{args.format} report written to {dest}")
        info_stream: TextIO = sys.stdout
    else:
        sys.stdout.write(text)
        info_stream = sys.stdout if args.format == "text" else sys.stderr
    sys.stdout.flush()
    if args.netron:
        show_in_netron(vm, port=args.netron_port, out=info_stream)
    return code


def show_in_netron(vm, *, port: int = 0, out: TextIO | None = None) -> None:
    """Print the flagged ONNX file and its nodes, serve it in Netron until Ctrl-C."""
    from sdsecure.gate import netron

    out = out or sys.stdout
    path = netron.flagged_onnx_file(vm.report)
    if path is None:
        print("netron: no ONNX file has findings above info; nothing to inspect", file=out, flush=True)
        return
    nodes = netron.nodes_to_inspect(vm.report, path)
    print(f"netron: flagged file {path}; nodes to inspect (Ctrl-F in Netron finds them by name):", file=out)
    for name, why in nodes:
        print(f"  {name}    [{why}]", file=out)
    if not nodes:
        print("  (the findings name no node: they concern the whole file)", file=out)
    try:
        server = netron.serve(vm.files[path].bytes(), path, port)
    except netron.NetronUnavailable:
        print(f"netron: not installed; to view the graph: {netron.INSTALL_HINT}", file=out, flush=True)
        return
    try:
        print(f"netron: serving the verified bytes of {path} at {server.url}  (Ctrl-C to stop)",
              file=out, flush=True)
        netron.wait_forever()
    except KeyboardInterrupt:
        print("netron: stopped", file=out, flush=True)
    finally:
        server.stop()


def lock(args) -> int:
    from sdsecure.gate.render import sorted_findings
    from sdsecure.lockfile import LOCKFILE_NAME, write_lockfile
    from sdsecure.refs import parse_ref

    vm = _audit(args)
    report = vm.report
    if report.verdict == "blocked":
        first = sorted_findings(report.blocking_findings())[0]
        print(f"not locked: {vm.ref!r} is blocked by the {report.policy} policy "
              f"({len(report.blocking_findings())} blocking finding(s); first: {first.rule} in "
              f"{first.file or 'the repository'}: {first.message})", file=sys.stderr)
        return EXIT_BLOCKED
    if args.output:
        dest = Path(args.output)
    else:
        ref = parse_ref(args.model_id, args.revision)
        dest = (ref.path / LOCKFILE_NAME) if ref.kind == "dir" and ref.path else Path(LOCKFILE_NAME)
    sha = write_lockfile(vm, dest)
    n = len([p for p in vm.files if p != LOCKFILE_NAME])
    print(f"locked {vm.ref} at revision {vm.revision or 'local (none)'}: {n} files -> {dest} "
          f"(lockfile sha256 {sha})")
    return EXIT_OK


def _main(argv: Sequence[str] | None, prog: str) -> int:
    args_in = list(sys.argv[1:] if argv is None else argv)
    if args_in[:1] == ["lock"]:
        args = build_lock_parser(prog).parse_args(args_in[1:])
        setup_logging(args.verbose)
        return lock(args)
    if args_in[:1] == ["scan"]:
        args_in = args_in[1:]
    args = build_parser(prog).parse_args(args_in)
    setup_logging(args.verbose)
    return scan(args, prog)


def main(argv: Sequence[str] | None = None, prog: str | None = None) -> int:
    """Console script entry point; returns the exit code (0 allowed, 1 blocked, 2 error)."""
    prog = prog or os.path.basename(sys.argv[0]) or "sdsecure-audit"
    return run(lambda a: _main(a, prog), argv, prog=prog)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
