#!/usr/bin/env python3
"""Print a markdown table of ONNX op types per component for one or more SD 1.5 model folders.

    python tools/op_histogram.py python/sdsecure/embedded/tiny-sd15 tests/fixtures/tiny-sd15-dynamo > tools/OPS.md

Counts the main graph and If/Loop/Scan bodies; ops outside the default domain are shown as domain::Op.
External data is not loaded.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import onnx

COMPONENTS = ("text_encoder", "unet", "vae_decoder")


def histogram(model: onnx.ModelProto) -> dict[str, int]:
    counts: dict[str, int] = {}

    def walk(g: onnx.GraphProto) -> None:
        for n in g.node:
            key = n.op_type if n.domain in ("", "ai.onnx") else f"{n.domain}::{n.op_type}"
            counts[key] = counts.get(key, 0) + 1
            for a in n.attribute:
                if a.type == onnx.AttributeProto.GRAPH:
                    walk(a.g)
                for sub in a.graphs:
                    walk(sub)

    walk(model.graph)
    for f in model.functions:
        for n in f.node:
            counts[f"{f.name}/{n.op_type}"] = counts.get(f"{f.name}/{n.op_type}", 0) + 1
    return counts


def table(dirs: list[Path]) -> str:
    columns: list[tuple[str, dict[str, int]]] = []
    notes = []
    for d in dirs:
        for c in COMPONENTS:
            m = onnx.load(str(d / c / "model.onnx"), load_external_data=False)
            opset = next((o.version for o in m.opset_import if o.domain in ("", "ai.onnx")), None)
            columns.append((f"{d.name}/{c}", histogram(m)))
            notes.append(f"- `{d.name}/{c}`: opset {opset}, {len(m.graph.node)} nodes, "
                         f"{len(m.graph.initializer)} initializers")
    ops = sorted({op for _, h in columns for op in h})
    head = "| op | " + " | ".join(name for name, _ in columns) + " |"
    sep = "| --- |" + " ---: |" * len(columns)
    rows = [f"| {op} | " + " | ".join(str(h.get(op, "")) for _, h in columns) + " |" for op in ops]
    total = "| **total** | " + " | ".join(str(sum(h.values())) for _, h in columns) + " |"
    return "\n".join(notes + ["", head, sep, *rows, total])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("dirs", type=Path, nargs="+")
    args = ap.parse_args(argv)
    print(table(args.dirs))
    return 0


if __name__ == "__main__":
    sys.exit(main())
