"""Cut a specialised graph into consecutive pieces that are compiled (and run) one after another.

MAX's compiler needs memory in proportion to the graph it compiles: the full SD 1.5 UNet (4,973 ONNX
nodes) peaks above 8 GiB in one compile. Pieces of a few hundred nodes compile within a bounded
budget, and run as a chain: each piece reads the values it needs (graph inputs or earlier pieces'
results) and hands on what later pieces or the caller read.

Cuts follow the topological order. Each cut is placed where the fewest bytes are alive (UNet skip
connections are always alive, so the choice matters little there, but inside a block it avoids cutting
through a wide attention tensor), within a window around the even split by node count.
"""

from __future__ import annotations

import dataclasses

from sdsecure.engine.fold import FoldedGraph

WINDOW = 0.25   # a cut may move this fraction of a piece's length away from the even split


def live_bytes(folded: FoldedGraph) -> list[int]:
    """live_bytes[k]: bytes of computed values made before node k and still read at node k or later."""
    nodes = folded.nodes
    last_use: dict[str, int] = {}
    for k, node in enumerate(nodes):
        for i in node.input:
            if i and i not in folded.consts:
                last_use[i] = k
    end = len(nodes)
    for o in folded.outputs:
        last_use[folded.resolve(o)] = end

    def size(name: str) -> int:
        info = folded.infos.get(name)
        return info.nbytes if info is not None else 0

    dying: dict[int, int] = {}
    alive = 0
    for name in folded.inputs:
        if name in last_use:
            alive += size(name)
            dying[last_use[name]] = dying.get(last_use[name], 0) + size(name)
    out = []
    for k, node in enumerate(nodes):
        out.append(alive)
        alive -= dying.pop(k, 0)
        for o in node.output:
            if o and o in last_use and last_use[o] > k:
                alive += size(o)
                dying[last_use[o]] = dying.get(last_use[o], 0) + size(o)
    return out


def cut_points(folded: FoldedGraph, pieces: int) -> list[int]:
    """Node indices where pieces 2..n start (ascending, strictly inside the node list)."""
    n = len(folded.nodes)
    pieces = max(1, min(pieces, n))
    if pieces == 1:
        return []
    live = live_bytes(folded)
    step = n / pieces
    cuts: list[int] = []
    for p in range(1, pieces):
        ideal = round(p * step)
        lo = max(cuts[-1] + 1 if cuts else 1, round(ideal - WINDOW * step))
        hi = min(n - (pieces - p), round(ideal + WINDOW * step))
        best = min(range(lo, max(lo, hi) + 1), key=lambda k: (live[k], abs(k - ideal)))
        cuts.append(best)
    return cuts


def split(folded: FoldedGraph, pieces: int) -> list[FoldedGraph]:
    """`folded` as a chain of at most `pieces` graphs. Piece i's inputs are graph inputs or outputs of
    earlier pieces; its outputs are what later pieces read plus the graph outputs it computes (as
    resolved names: a caller maps folded.outputs through folded.resolve)."""
    cuts = cut_points(folded, pieces)
    if not cuts:
        return [folded]
    bounds = list(zip([0] + cuts, cuts + [len(folded.nodes)]))
    produced_by: dict[str, int] = {}
    for p, (a, b) in enumerate(bounds):
        for node in folded.nodes[a:b]:
            produced_by.update((o, p) for o in node.output if o)
    wanted_later: dict[int, set[str]] = {p: set() for p in range(len(bounds))}
    piece_inputs: list[list[str]] = []
    for p, (a, b) in enumerate(bounds):
        seen: list[str] = []
        for node in folded.nodes[a:b]:
            for i in node.input:
                if not i or i in folded.consts or produced_by.get(i) == p or i in seen:
                    continue
                seen.append(i)
                if i in produced_by:
                    wanted_later[produced_by[i]].add(i)
        piece_inputs.append(seen)
    final = {folded.resolve(o) for o in folded.outputs}
    out: list[FoldedGraph] = []
    for p, (a, b) in enumerate(bounds):
        nodes = folded.nodes[a:b]
        made = [o for node in nodes for o in node.output if o]
        outputs = [o for o in made if o in wanted_later[p] or o in final]
        used = {i for node in nodes for i in node.input if i}
        consts = {k: v for k, v in folded.consts.items() if k in used}
        out.append(dataclasses.replace(
            folded, name=f"{folded.name}[{p + 1}/{len(bounds)}]", inputs=piece_inputs[p], outputs=outputs,
            nodes=nodes, consts=consts, initializers=folded.initializers & set(consts)))
    return out
