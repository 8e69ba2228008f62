#!/usr/bin/env python3
"""Run ONNX's backend node test cases through the MAX importer and print pass counts per op.

    python tools/onnx_node_cases.py                 # every case of every op the registry knows
    python tools/onnx_node_cases.py --all           # also list ops the engine does not support
    python tools/onnx_node_cases.py -k 'conv|gemm'  # only cases whose name matches the regex
    python tools/onnx_node_cases.py --failures      # print the reason of every non-passing case

Statuses: pass (MAX result matches the expected output at the case's rtol/atol), fail (mismatch),
error (import or compile failure: an engine bug), unsupported (refused up front with a reason, as
UnsupportedOpError would), folded (every input constant: evaluated by the constant folder, not MAX).
All runnable cases are compiled as one MAX graph (a few minutes cold, seconds once cached).
"""

from __future__ import annotations

import argparse
import logging
import sys
import time

from sdsecure.engine import nodecases as nc
from sdsecure.engine.ops import supported_ops

STATUSES = (nc.PASS, nc.FAIL, nc.ERROR, nc.UNSUPPORTED, nc.FOLDED)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-k", "--pattern", help="regex on the case name")
    ap.add_argument("--all", action="store_true", help="include ops the engine does not support")
    ap.add_argument("--failures", action="store_true", help="print why each case did not pass")
    ap.add_argument("--markdown", action="store_true", help="print the table as Markdown")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    t0 = time.perf_counter()
    supported = set(supported_ops())
    cases = nc.load_cases(args.pattern)
    if not args.all:
        cases = [c for c in cases if c.op in supported or
                 (c.op.startswith("expanded:") and _expanded_supported(c, supported))]
    nc.run_cases(cases)
    rows = nc.table(cases)

    sep = " | " if args.markdown else "  "
    header = ["op", *STATUSES]
    widths = [max(len(r[0]) for r in rows + [("op", {})])] + [len(s) for s in STATUSES]
    if args.markdown:
        print("| " + " | ".join(header) + " |")
        print("|" + "|".join("---" for _ in header) + "|")
    else:
        print(sep.join(h.ljust(w) for h, w in zip(header, widths)))
    totals = {s: 0 for s in STATUSES}
    for op, counts in rows:
        for s in STATUSES:
            totals[s] += counts.get(s, 0)
        cells = [op] + [str(counts.get(s, 0)) for s in STATUSES]
        if args.markdown:
            print("| " + " | ".join(cells) + " |")
        else:
            print(sep.join(c.ljust(w) for c, w in zip(cells, widths)))
    cells = ["TOTAL"] + [str(totals[s]) for s in STATUSES]
    print(("| " + " | ".join(cells) + " |") if args.markdown else sep.join(c.ljust(w) for c, w in zip(cells, widths)))
    print(f"{len(cases)} cases in {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    if args.failures:
        for c in cases:
            if c.status != nc.PASS:
                print(f"{c.status:11s} {c.name}: {c.reason}")
    return 0


def _expanded_supported(case: nc.Case, supported: set[str]) -> bool:
    return all(n.op_type in supported for n in case.model.graph.node if not n.domain)


if __name__ == "__main__":
    sys.exit(main())
