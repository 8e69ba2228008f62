"""Peephole rewrites of a specialised graph into ops MAX has fused kernels for.

Exporters spell some layers out op by op; MAX then generates (and compiles) one kernel per piece.
Each rewrite below matches an exact, value-checked pattern whose intermediates nobody else reads, and
replaces it by one node of the private domain `sdsecure.fused`, converted by `ops/fused.py`.

* GroupNorm: Reshape [N,C,...] -> [N,G,L] -> InstanceNormalization(scale 1, bias 0) -> Reshape back
  -> Mul gamma[C,1,..] -> Add beta[C,1,..]  (torch's GroupNorm in both exporters)  =>  GroupNorm(x, gamma, beta)
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper

from sdsecure.engine.fold import FoldedGraph, TensorInfo
from sdsecure.engine.ops import PRIVATE_DOMAIN as FUSED_DOMAIN


class _Index:
    def __init__(self, folded: FoldedGraph):
        self.folded = folded
        self.producer = {o: n for n in folded.nodes for o in n.output if o}
        self.consumers: dict[str, list[onnx.NodeProto]] = {}
        for n in folded.nodes:
            for i in n.input:
                if i:
                    self.consumers.setdefault(i, []).append(n)
        self.outputs = {folded.resolve(o) for o in folded.outputs}

    def only_consumer(self, name: str) -> onnx.NodeProto | None:
        users = self.consumers.get(name, [])
        if len(users) != 1 or name in self.outputs:
            return None
        return users[0]

    def const(self, name: str) -> np.ndarray | None:
        return self.folded.consts.get(name)

    def shape(self, name: str) -> tuple[int, ...] | None:
        info = self.folded.infos.get(name)
        return info.shape if info else None


def _attr(node: onnx.NodeProto, name: str, default):
    for a in node.attribute:
        if a.name == name:
            return helper.get_attribute_value(a)
    return default


def _per_channel(idx: _Index, node: onnx.NodeProto, value: str, rank: int, channels: int) -> np.ndarray | None:
    """The constant operand of a Mul/Add if it is one value per channel (axis 1 of a rank-`rank` tensor)."""
    other = [i for i in node.input if i != value]
    if len(other) != 1 or len(node.input) != 2:
        return None
    c = idx.const(other[0])
    if c is None or c.size != channels or c.ndim > rank:
        return None
    padded = (1,) * (rank - c.ndim) + c.shape
    if padded[1] != channels or c.dtype != np.float32:
        return None
    return c.reshape(channels)


def _group_norm(idx: _Index, inorm: onnx.NodeProto) -> tuple[list[onnx.NodeProto], onnx.NodeProto, dict] | None:
    if inorm.op_type != "InstanceNormalization" or inorm.domain not in ("", "ai.onnx") or len(inorm.input) != 3:
        return None
    scale, bias = idx.const(inorm.input[1]), idx.const(inorm.input[2])
    if scale is None or bias is None or not np.all(scale == 1) or not np.all(bias == 0):
        return None
    r1 = idx.producer.get(inorm.input[0])
    if r1 is None or r1.op_type != "Reshape" or idx.only_consumer(r1.output[0]) is not inorm:
        return None
    x = r1.input[0]
    xs, gs = idx.shape(x), idx.shape(inorm.input[0])
    if xs is None or gs is None or len(xs) < 3 or len(gs) != 3 or xs[0] != gs[0]:
        return None
    channels, groups = xs[1], gs[1]
    if channels % groups or int(np.prod(xs[1:])) != groups * gs[2] or idx.folded.infos[x].dtype != np.float32:
        return None
    r2 = idx.only_consumer(inorm.output[0])
    if r2 is None or r2.op_type != "Reshape" or idx.shape(r2.output[0]) != xs:
        return None
    matched, out = [r1, inorm, r2], r2.output[0]
    gamma = np.ones(channels, np.float32)
    beta = np.zeros(channels, np.float32)
    mul = idx.only_consumer(out)
    if mul is not None and mul.op_type == "Mul":
        g = _per_channel(idx, mul, out, len(xs), channels)
        if g is not None and idx.shape(mul.output[0]) == xs:
            gamma, out = g, mul.output[0]
            matched.append(mul)
            add = idx.only_consumer(out)
            if add is not None and add.op_type == "Add":
                b = _per_channel(idx, add, out, len(xs), channels)
                if b is not None and idx.shape(add.output[0]) == xs:
                    beta, out = b, add.output[0]
                    matched.append(add)
    eps = float(_attr(inorm, "epsilon", 1e-5))
    name = inorm.name or out
    consts = {f"{name}::gamma": np.ascontiguousarray(gamma), f"{name}::beta": np.ascontiguousarray(beta)}
    fused = helper.make_node("GroupNorm", [x, *consts], [out], name=name, domain=FUSED_DOMAIN,
                             num_groups=int(groups), epsilon=eps)
    return matched, fused, consts


def fuse(folded: FoldedGraph) -> FoldedGraph:
    """Apply every rewrite; returns `folded` changed in place (nodes, consts, infos)."""
    idx = _Index(folded)
    replaced: dict[int, onnx.NodeProto | None] = {}
    for node in folded.nodes:
        if id(node) in replaced:
            continue
        match = _group_norm(idx, node)
        if match is None:
            continue
        matched, fused_node, consts = match
        if any(id(n) in replaced for n in matched):
            continue
        for n in matched:
            replaced[id(n)] = None
        replaced[id(matched[-1])] = fused_node
        for k, v in consts.items():
            folded.consts[k] = v
            folded.infos[k] = TensorInfo(v.shape, v.dtype)
            folded.initializers.add(k)
    if replaced:
        new_nodes = []
        for n in folded.nodes:
            if id(n) not in replaced:
                new_nodes.append(n)
            elif replaced[id(n)] is not None:
                new_nodes.append(replaced[id(n)])
        # the fused node sits where its last piece was: its input x is defined before the first piece
        folded.nodes = new_nodes
        folded.opsets.setdefault(FUSED_DOMAIN, 1)
    return folded
