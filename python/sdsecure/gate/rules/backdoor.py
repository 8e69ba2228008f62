"""BACKDOOR-TRIGGER: architectural backdoors (ShadowLogic-style trigger logic) found by dataflow.

A graph backdoor is extra logic that compares the *values* of an input with constants (the trigger)
and, when they match, switches what reaches an output. The analysis works on the flattened graph
(main graph + If/Loop/Scan bodies + inlined local functions, onnx_graph.flatten):

1. Taint. Every tensor gets `vt`, the set of graph inputs whose *values* flow into it. Shape and Size
   cut value taint: what is computed only from shapes (causal masks, broadcasting) carries none.
2. Decisions. A comparison (Equal, Less, Greater, ...), IsNaN/IsInf, ArgMax/ArgMin/TopK, NonZero, a
   Cast to bool, or an If/Loop condition whose inputs carry value taint is a decision; its result
   carries decision taint `dt` (one bit per decision).
3. Switches. A node where a decision-tainted operand meets a data operand that does not carry that
   decision (Where condition, If condition, Mul/Add by a mask, Gather/GatherND index, ...) is a
   switch. A switch whose output reaches a graph output is a candidate.
4. Known benign structures are recognised by shape of the dataflow, not by names, and reported as
   BACKDOOR-EXPLAINED (info): index selection of data rows by ArgMax/ArgMin/TopK (CLIP's pooled
   output: ArgMax over input_ids, or Equal with the EOS id then ArgMax, then Gather by batch index),
   elementwise piecewise functions of the compared tensor itself (NaN replacement, clamps, leaky
   ReLU), masks built from shapes only (causal masks), inputs broadcast by shape (timestep
   broadcasting) and, outside SD components, mode switches on a scalar configuration input whose
   branches all compute from the data.
5. Severity. Critical when the decision compares a thin function of an input's values (no learned
   weights on the way: Slice/Gather/Add/Sub/Abs/Reduce...) with constants; high when a deeper
   decision switches in an input-independent (constant) value; low otherwise.

Evidence names the node path from the input through the decision and the switch to the output, the
compared constants (folded, so constants split over several nodes show their effective value), the
effective trigger where it can be solved (e.g. Equal(Add(x, c1), c2) -> x == c2 - c1), and what the
triggered branch switches in.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Any, Iterator

import numpy as np
import onnx

from sdsecure.gate.blob import Blob
from sdsecure.gate.onnx_graph import (ConstFolder, FlatGraph, FlatNode, attr_value, describe_value,
                                      num_elements, type_name)
from sdsecure.gate.report import Finding, Severity
from sdsecure.gate.rules import ScanContext, declare, file_rule
from sdsecure.gate.onnx_graph import pipeline_input_shapes
from sdsecure.gate.rules.onnx_bombs import flat_graph

TRIGGER = declare(
    "BACKDOOR-TRIGGER", Severity.CRITICAL,
    "Architectural backdoor: input values compared with constants switch what reaches an output",
    why=("An architectural backdoor (e.g. HiddenLayer's ShadowLogic) is extra graph logic, not poisoned "
         "weights: the values of an input are compared with constants (a trigger token id, a pixel "
         "pattern) and, when they match, a switch (Where, If, a 0/1 mask, an index) replaces or alters "
         "what reaches an output, e.g. swaps the text embedding for an attacker's. It survives "
         "fine-tuning and format conversion, and is invisible when testing with normal inputs. The gate "
         "finds it by dataflow: value taint from inputs, decisions on it, and switches that reach outputs."),
    fix=("Do not use the model. Open the file in Netron, follow the listed node path from the input to "
         "the output and compare with a clean export of the same architecture. Re-export the model from "
         "trusted source weights."),
)
EXPLAINED = declare(
    "BACKDOOR-EXPLAINED", Severity.INFO,
    "Data-dependent logic recognised as a known benign structure",
    why=("Ordinary models also make data-dependent choices: CLIP pools the hidden state at the EOS token "
         "(ArgMax over input_ids then Gather), attention builds causal masks from shapes, exporters "
         "replace NaNs after softmax, recurrent models branch on their state's shape. The gate recognises "
         "these by the structure of the dataflow (what is compared, what is selected) and lists them so "
         "a reviewer can check them too."),
    fix="Nothing to do; listed for review.",
)

CMP_OPS = frozenset({"Equal", "Less", "Greater", "LessOrEqual", "GreaterOrEqual"})
BOOL_OPS = frozenset({"Not", "And", "Or", "Xor", "BitwiseAnd", "BitwiseOr", "BitwiseXor", "BitwiseNot"})
SELECT_DECISIONS = frozenset({"ArgMax", "ArgMin", "TopK"})
OTHER_DECISIONS = frozenset({"IsNaN", "IsInf", "NonZero"}) | SELECT_DECISIONS
SHAPE_OPS = frozenset({"Shape", "Size"})
GATHERS = frozenset({"Gather", "GatherND", "GatherElements"})
PSEUDO = frozenset({"<enter>", "<return>", "<sparse>"})
# ops with no learned weights, through which a compared tensor is still "the input's values"
THIN_OPS = frozenset({
    "Identity", "Cast", "CastLike", "Reshape", "Flatten", "Squeeze", "Unsqueeze", "Transpose", "Slice",
    "Gather", "GatherElements", "GatherND", "Concat", "Split", "Expand", "Tile", "Pad", "Add", "Sub", "Mul",
    "Div", "Neg", "Abs", "Mod", "Min", "Max", "Clip", "Floor", "Ceil", "Round", "Sign", "Sqrt", "Pow",
    "ReduceMax", "ReduceMin", "ReduceSum", "ReduceMean", "ReduceProd", "ReduceL1", "ReduceL2",
    "ReduceSumSquare", "ArgMax", "ArgMin", "Where", "IsNaN", "IsInf", "BitShift", "Relu", "Sum",
}) | CMP_OPS | BOOL_OPS | PSEUDO
# index arithmetic between an ArgMax and the index input of a Gather (batch offsets, stacking)
INDEX_ARITH = frozenset({"Cast", "Add", "Sub", "Mul", "Unsqueeze", "Squeeze", "Reshape", "Concat", "Flatten",
                         "Identity", "Expand", "Transpose", "<return>"})
# elementwise steps allowed between a compared tensor and the value a piecewise function returns
ELEMENTWISE = frozenset({"Identity", "Cast", "Mul", "Add", "Sub", "Div", "Neg", "Abs", "Clip", "Relu",
                         "LeakyRelu", "Min", "Max"})
# steps allowed between a piecewise comparison and the switch's condition (no reductions, no slicing)
LOCAL_BOOL = frozenset({"Not", "And", "Or", "Xor", "Cast", "Identity", "IsNaN", "IsInf"}) | CMP_OPS
REDUCTIONS = frozenset({"ReduceMax", "ReduceMin", "ReduceSum", "ReduceMean", "ReduceProd", "ReduceL1",
                        "ReduceL2", "ReduceSumSquare", "ArgMax", "ArgMin"})

MAX_PATH = 40


@dataclass
class Decision:
    node: FlatNode
    bit: int
    tainted: list[int]         # input positions that carry value taint
    constant: list[int]        # input positions that are input-independent


@dataclass
class Switch:
    node: FlatNode
    bits: int                  # decisions this node switches on
    kind: str = ""             # explanation kind ("" when unexplained)
    detail: dict = field(default_factory=dict)


class Analysis:
    def __init__(self, fg: FlatGraph, fold: ConstFolder, input_elems: dict[str, int], sd_component: bool) -> None:
        self.fg, self.fold, self.sd_component = fg, fold, sd_component
        self.input_bit = {name: 1 << i for i, name in enumerate(fg.inputs)}
        self.input_elems = input_elems
        self.vt: dict[str, int] = {}
        self.dt: dict[str, int] = {}
        self.ap: dict[str, int] = {}         # decision bits whose switch already happened upstream
        self.sd: dict[str, bool] = {}        # derived from Shape/Size
        self.decisions: dict[int, Decision] = {}
        self.decision_bit: dict[int, int] = {}
        self.switches: dict[int, Switch] = {}
        self.shape_masks: list[str] = []
        self.broadcasts: list[str] = []
        self.order: list[FlatNode] = []

    # ------------------------------------------------------------------------------------------
    def run(self) -> None:
        for name, bit in self.input_bit.items():
            self.vt[name] = bit
        self.order = order = [self.fg.nodes[i] for i in self.fg.topological_order()]
        loops = any(n.op == "<enter>" for n in self.fg.nodes)
        for _ in range(6 if loops else 1):
            before = (dict(self.vt), dict(self.dt), dict(self.ap))
            self.switches.clear()
            self.shape_masks.clear()
            self.broadcasts.clear()
            for node in order:
                self._step(node)
            if (self.vt, self.dt, self.ap) == before:
                break

    def _bit_for(self, node: FlatNode, tainted: list[int], constant: list[int]) -> int:
        if node.index not in self.decision_bit:
            bit = 1 << len(self.decision_bit)
            self.decision_bit[node.index] = bit
            self.decisions[bit] = Decision(node, bit, tainted, constant)
        return self.decision_bit[node.index]

    def _step(self, node: FlatNode) -> None:
        ins = node.inputs
        ivt = [self.vt.get(x, 0) if x else 0 for x in ins]
        idt = [self.dt.get(x, 0) if x else 0 for x in ins]
        iap = [self.ap.get(x, 0) if x else 0 for x in ins]
        isd = [self.sd.get(x, False) if x else False for x in ins]
        op = node.op
        if op in SHAPE_OPS:
            for o in node.outputs:
                self.vt[o], self.dt[o], self.ap[o], self.sd[o] = 0, 0, 0, True
            return
        extra = 0
        # decisions ---------------------------------------------------------------------------
        tainted = [i for i, v in enumerate(ivt) if v]
        is_decision = (op in CMP_OPS or op in OTHER_DECISIONS or
                       (op == "Cast" and node.proto is not None and attr_value(node.proto, "to") == onnx.TensorProto.BOOL))
        if is_decision and tainted:
            constant = [i for i, x in enumerate(ins) if x and not ivt[i]]
            extra = self._bit_for(node, tainted, constant)
        elif op in CMP_OPS and any(isd) and not tainted:
            self.shape_masks.append(node.where)
        if node.control and not is_decision:
            ctl = [i for i in node.control if i < len(ins) and ivt[i] and not idt[i]]
            if ctl:
                bit = self._bit_for(node, ctl, [])
                for i in ctl:
                    idt[i] |= bit
        if op in ("Expand", "Tile") and len(ins) > 1 and ivt[0] and not ivt[1] and isd[1]:
            self.broadcasts.append(node.where)
        # switches: a raw decision signal meets data that does not carry it ---------------------
        switched = 0
        if not is_decision and op not in BOOL_OPS and op not in PSEUDO:
            raw = 0
            for b, a in zip(idt, iap):
                raw |= b & ~a
            if raw:
                for q, x in enumerate(ins):
                    if ivt[q] and (raw & ~idt[q]):
                        switched |= raw & ~idt[q]
        sanitise = 0
        if switched:
            sw = Switch(node, switched)
            self._explain(sw, ivt, idt)
            self.switches[node.index] = sw
            if sw.kind:
                sanitise = switched
        # propagate ---------------------------------------------------------------------------
        for k, o in enumerate(node.outputs):
            pos = node.deps[k] if node.deps is not None and k < len(node.deps) else range(len(ins))
            v = d = a = 0
            s = False
            for p in pos:
                if p < len(ins):
                    v |= ivt[p]
                    d |= idt[p]
                    a |= iap[p]
                    s = s or isd[p]
            self.vt[o] = v
            self.dt[o] = (d | extra) & ~sanitise
            self.ap[o] = (a | switched) & ~sanitise
            self.sd[o] = s

    # ------------------------------------------------------------------------------------------
    # explanations
    # ------------------------------------------------------------------------------------------
    def _producer(self, tid: str | None) -> FlatNode | None:
        if tid is None:
            return None
        idx = self.fg.producer.get(tid)
        return None if idx is None else self.fg.nodes[idx]

    def _explain(self, sw: Switch, ivt: list[int], idt: list[int]) -> None:
        for fn in (self._explain_selection, self._explain_piecewise, self._explain_mode_switch):
            res = fn(sw, ivt, idt)
            if res:
                sw.kind, sw.detail = res
                return

    def _explain_selection(self, sw: Switch, ivt, idt):
        node = sw.node
        if node.op not in GATHERS or len(node.inputs) < 2:
            return None
        data, index = node.inputs[0], node.inputs[1]
        if not ivt[0] or idt[0] & sw.bits or (idt[1] & sw.bits) != sw.bits:
            return None
        # the selected-from tensor must be data, not data glued to constants
        stack, seen = [data], set()
        while stack:
            t = stack.pop()
            p = self._producer(t)
            if p is None or t in seen:
                continue
            seen.add(t)
            if p.op == "Concat" and any(x and not self.vt.get(x, 0) for x in p.inputs):
                return None
            if p.op == "Concat":
                stack.extend(x for x in p.inputs if x)
            elif p.op in ("Reshape", "Flatten", "Transpose", "Identity", "Squeeze", "Unsqueeze"):
                stack.extend(x for x in p.inputs[:1] if x)
        # the index must come from ArgMax/ArgMin/TopK through index arithmetic on shapes/constants
        selectors: list[FlatNode] = []
        stack, seen = [index], set()
        while stack:
            t = stack.pop()
            if t in seen or not (self.dt.get(t, 0) & sw.bits):
                continue
            seen.add(t)
            p = self._producer(t)
            if p is None:
                return None
            if p.op in SELECT_DECISIONS:
                selectors.append(p)
                continue
            if p.op not in INDEX_ARITH:
                return None
            for x in p.inputs:
                if x is None:
                    continue
                if self.dt.get(x, 0) & sw.bits:
                    stack.append(x)
                elif self.vt.get(x, 0):
                    return None
        if not selectors:
            return None
        sel = selectors[0]
        src = self._input_names(self.vt.get(sel.inputs[0], 0)) if sel.inputs else []
        near = self._near_input([sel.inputs[0]]) if sel.inputs else False
        clip = near and bool(src)
        kind = "clip-pooling" if clip else "index-selection"
        msg = (f"CLIP-style pooling: {sel.op} over the values of {', '.join(src)} picks the row of "
               f"{self.fg.name_of(data)!r} that {node.where} returns; a data row is selected, no constant is switched in"
               if clip else
               f"{sel.op} selects rows of {self.fg.name_of(data)!r} in {node.where}; no constant is switched in")
        return kind, {"message": msg, "selector": sel.where, "gather": node.where,
                      "selected_from": self.fg.name_of(data), "inputs": src}

    def _explain_piecewise(self, sw: Switch, ivt, idt):
        node = sw.node
        if node.op == "Where":
            ctl_pos, data_pos = [0], [1, 2]
        elif node.op in ("Mul", "Add", "Sub"):
            ctl_pos = [i for i in range(len(node.inputs)) if idt[i] & sw.bits]
            data_pos = [i for i in range(len(node.inputs)) if i not in ctl_pos]
        else:
            return None
        if not ctl_pos or any(not (idt[i] & sw.bits) for i in ctl_pos[:1]):
            return None
        # every decision on the way must be a local elementwise test (no reduction, no slicing)
        for bit in self._bits(sw.bits):
            dec = self.decisions[bit]
            if dec.node.op not in ("IsNaN", "IsInf", "Less", "Greater", "LessOrEqual", "GreaterOrEqual"):
                return None
            for c in dec.constant:
                v = self.fold.value(dec.node.inputs[c])
                if v is None or np.asarray(v).size != 1:
                    return None
        if not self._local_path(node.inputs[ctl_pos[0]], sw.bits):
            return None
        compared = set()
        for bit in self._bits(sw.bits):
            dec = self.decisions[bit]
            compared.update(dec.node.inputs[i] for i in dec.tainted)
        for q in data_pos:
            if q < len(node.inputs) and self._elementwise_descendant(node.inputs[q], compared):
                ops = sorted({self.decisions[b].node.op for b in self._bits(sw.bits)})
                return "piecewise", {"message": f"{'/'.join(ops)} test of a tensor and {node.op} on the same tensor "
                                                "(elementwise piecewise function: NaN replacement, clamp, leaky ReLU)",
                                     "switch": node.where,
                                     "decisions": [self.decisions[b].node.where for b in self._bits(sw.bits)]}
        return None

    def _explain_mode_switch(self, sw: Switch, ivt, idt):
        if self.sd_component:
            return None
        node = sw.node
        if node.op == "If":
            data_pos = list(range(1, len(node.inputs)))
        elif node.op == "Where":
            data_pos = [1, 2]
        else:
            return None
        scalar_bits = 0
        for name, bit in self.input_bit.items():
            if self.input_elems.get(name, 2) <= 1:
                scalar_bits |= bit
        if not scalar_bits:
            return None
        for bit in self._bits(sw.bits):
            dec = self.decisions[bit]
            for i in dec.tainted:
                v = self.vt.get(dec.node.inputs[i], 0)
                if v & ~scalar_bits:
                    return None
        for q in data_pos:
            if q < len(node.inputs) and node.inputs[q] and not (ivt[q] & ~scalar_bits):
                return None   # a branch that does not compute from the data: not a mode switch
        names = self._input_names(scalar_bits & self._decision_inputs(sw.bits))
        return "mode-switch", {"message": f"{node.op} selects between branches that all compute from the data, "
                                          f"on scalar configuration input(s) {', '.join(names)}",
                               "switch": node.where, "inputs": names}

    # ------------------------------------------------------------------------------------------
    # helpers
    # ------------------------------------------------------------------------------------------
    @staticmethod
    def _bits(bits: int) -> Iterator[int]:
        while bits:
            low = bits & -bits
            yield low
            bits ^= low

    def _input_names(self, vt: int) -> list[str]:
        return [n for n, b in self.input_bit.items() if vt & b]

    def _decision_inputs(self, bits: int) -> int:
        v = 0
        for b in self._bits(bits):
            d = self.decisions[b]
            for i in d.tainted:
                v |= self.vt.get(d.node.inputs[i], 0)
        return v

    def _local_path(self, ctl: str | None, bits: int) -> bool:
        stack, seen = [ctl], set()
        while stack:
            t = stack.pop()
            if t is None or t in seen or not (self.dt.get(t, 0) & bits):
                continue
            seen.add(t)
            p = self._producer(t)
            if p is None:
                return False
            if p.index in self.decision_bit and self.decision_bit[p.index] & bits and p.op != "Cast":
                continue
            if p.op not in LOCAL_BOOL:
                return False
            stack.extend(p.inputs)
        return True

    def _elementwise_descendant(self, tid: str | None, targets: set, depth: int = 4) -> bool:
        frontier = [tid]
        for _ in range(depth + 1):
            nxt = []
            for t in frontier:
                if t is None:
                    continue
                if t in targets:
                    return True
                p = self._producer(t)
                if p is not None and p.op in ELEMENTWISE:
                    nxt.extend(x for x in p.inputs if x and self.vt.get(x, 0))
            frontier = nxt
        return False

    def _near_input(self, tids: list[str | None], limit: int = 400) -> bool:
        """True when the tensors are computed from graph inputs through thin ops only."""
        stack, seen, reached = list(tids), set(), False
        while stack:
            t = stack.pop()
            if t is None or t in seen or not self.vt.get(t, 0):
                continue
            seen.add(t)
            if len(seen) > limit:
                return False
            if t in self.input_bit:
                reached = True
                continue
            p = self._producer(t)
            if p is None:
                continue
            if p.op not in THIN_OPS:
                return False
            stack.extend(p.inputs)
        return reached

    # ------------------------------------------------------------------------------------------
    # evidence
    # ------------------------------------------------------------------------------------------
    def live(self) -> set[str]:
        seen: set[str] = set()
        stack = list(self.fg.outputs)
        while stack:
            t = stack.pop()
            if t in seen:
                continue
            seen.add(t)
            p = self._producer(t)
            if p is not None:
                stack.extend(x for x in p.inputs if x and x not in seen)
        return seen

    def path_to_input(self, tid: str | None) -> list[str]:
        """Shortest chain of nodes from a graph input to `tid` (following value taint)."""
        if tid is None:
            return []
        prev: dict[str, tuple[str | None, FlatNode | None]] = {tid: (None, None)}
        q = deque([tid])
        found = None
        while q:
            t = q.popleft()
            if t in self.input_bit:
                found = t
                break
            p = self._producer(t)
            if p is None:
                continue
            for x in p.inputs:
                if x and x not in prev and self.vt.get(x, 0):
                    prev[x] = (t, p)
                    q.append(x)
        if found is None:
            return []
        chain, t = [f"input '{found}'"], found
        while prev[t][0] is not None:
            nxt, p = prev[t]
            chain.append(p.where)
            t = nxt
        return chain

    def path_forward(self, start: FlatNode, goal: set[int] | None, goal_tids: set[str] | None) -> list[str]:
        """Nodes from `start` to the first node in `goal` (or to a tensor in goal_tids)."""
        prev: dict[int, int | None] = {start.index: None}
        q = deque([start.index])
        end = None
        while q:
            i = q.popleft()
            node = self.fg.nodes[i]
            if (goal and i in goal and i != start.index) or (goal_tids and any(o in goal_tids for o in node.outputs)):
                end = i
                break
            for o in node.outputs:
                for c in self.fg.consumers.get(o, []):
                    if c not in prev:
                        prev[c] = i
                        q.append(c)
        if end is None:
            return []
        chain = []
        while end is not None:
            chain.append(self.fg.nodes[end].where)
            end = prev[end]
        return list(reversed(chain))

    def describe_tensor(self, tid: str | None) -> dict[str, Any]:
        if tid is None:
            return {}
        out: dict[str, Any] = {"tensor": self.fg.name_of(tid)}
        init = self.fg.initializers.get(tid)
        p = self._producer(tid)
        if init is not None:
            out["source"] = f"initializer {type_name(init.data_type)}{list(init.dims)}"
        elif p is not None:
            out["source"] = p.where
        v = self.fold.value(tid)
        if v is not None:
            out["value"] = describe_value(v)
        if self.vt.get(tid, 0):
            out["depends_on_inputs"] = self._input_names(self.vt[tid])
        elif self.sd.get(tid, False):
            out["input_independent"] = "computed from shapes and constants only"
        else:
            out["input_independent"] = "constant"
        return out

    def trigger_text(self, dec: Decision) -> dict[str, Any]:
        """The comparison as an expression over the input, solved for the input where possible."""
        node = dec.node
        rel = {"Equal": "==", "Less": "<", "Greater": ">", "LessOrEqual": "<=", "GreaterOrEqual": ">="}.get(node.op)
        out: dict[str, Any] = {"decision": node.where, "op": node.op}
        if not dec.tainted:
            return out
        t_pos = dec.tainted[0]
        const = None
        if node.op in CMP_OPS and dec.constant:
            cid = node.inputs[dec.constant[0]]
            const = self.fold.value(cid)
            out["compared_with"] = describe_value(const) if const is not None else self.describe_tensor(cid)
            src = self._producer(cid)
            if src is not None and src.op != "Constant":
                out["compared_constant_computed_by"] = src.where    # e.g. split constants: k1 + k2
        elif node.op == "Cast":
            rel, const = "!=", np.array(0)
            out["compared_with"] = 0
        # chain from the compared tensor back to an input
        chain: list[tuple[FlatNode, str]] = []     # (node, role) from the decision outwards
        t = node.inputs[t_pos]
        input_name = None
        for _ in range(64):
            if t in self.input_bit:
                input_name = t
                break
            p = self._producer(t)
            if p is None:
                break
            tainted = [x for x in p.inputs if x and self.vt.get(x, 0)]
            if len(tainted) != 1 or p.op not in THIN_OPS:
                chain.append((p, "opaque"))
                break
            chain.append((p, "step"))
            t = tainted[0]
        expr = input_name or (self.fg.name_of(t) if t else "?")
        subject = expr                       # the input with indexing applied (x[..., 5])
        invertible = input_name is not None  # expr is an invertible scalar-affine function of subject
        value = None
        if const is not None:
            cv0 = np.asarray(const)
            value = cv0 if cv0.dtype == np.bool_ else cv0.astype(np.float64)
        flip = False
        offset = np.zeros(())                # expr == subject + offset while only Add/Sub were seen
        offset_ok = input_name is not None
        center = None                        # |subject - center| was taken (pattern match)
        reduced = None
        constants: list[dict] = []
        for p, role in reversed(chain):
            if role == "opaque":
                expr, invertible, offset_ok = f"{p.op}(...)", False, False
                continue
            others = [(i, x) for i, x in enumerate(p.inputs) if x and not self.vt.get(x, 0)]
            cvals = [(i, self.fold.value(x)) for i, x in others]
            cv = cvals[0][1] if len(cvals) == 1 else None
            scalar = cv is not None and np.asarray(cv).size == 1
            shown = describe_value(cv) if scalar else (self.fg.name_of(others[0][1]) if others else "")
            if others and p.op in ("Add", "Sub", "Mul", "Div", "Mod", "Min", "Max", "Pow"):
                constants.append({"node": p.where, "op": p.op, **self.describe_tensor(others[0][1])})
            if p.op in ("Cast", "CastLike", "Identity", "Reshape", "Flatten", "Squeeze", "Unsqueeze", "Expand",
                        "Transpose", "<return>", "<enter>"):
                continue
            at_subject = expr == subject
            if p.op == "Gather" and cv is not None and at_subject:
                subject = expr = f"{expr}[axis {attr_value(p.proto, 'axis', 0)} = {describe_value(cv)}]"
                continue
            if p.op == "Slice" and at_subject:
                subject = expr = f"{expr}[{_slice_text(p, self.fold)}]"
                continue
            if p.op in ("Add", "Sub", "Mul", "Div") and cv is not None:
                first = others[0][0] != 0   # the tainted operand is the first input
                sym = {"Add": "+", "Sub": "-", "Mul": "*", "Div": "/"}[p.op]
                expr = f"({expr} {sym} {shown})" if first else f"({shown} {sym} {expr})"
                c = np.asarray(cv, dtype=np.float64)
                if offset_ok and p.op in ("Add", "Sub") and first:
                    offset = offset + c if p.op == "Add" else offset - c
                else:
                    offset_ok = False
                if invertible and scalar and value is not None:
                    c0 = float(c.reshape(()))
                    if p.op == "Add":
                        value = value - c0
                    elif p.op == "Sub":
                        value, flip = (value + c0, flip) if first else (c0 - value, not flip)
                    elif p.op == "Mul" and c0 != 0:
                        value, flip = value / c0, flip ^ (c0 < 0)
                    elif p.op == "Div":
                        value, flip = value * c0, flip ^ (c0 < 0)
                    else:
                        invertible = False
                else:
                    invertible = False
                continue
            if p.op == "Neg":
                expr = f"-{expr}"
                offset_ok = False
                if value is not None:
                    value, flip = -value, not flip
                continue
            if p.op == "Abs":
                if offset_ok and center is None:
                    center = -offset
                expr, invertible, offset_ok = f"|{expr}|", False, False
                continue
            if p.op in REDUCTIONS and center is not None and reduced is None:
                reduced = p.op
            expr, invertible, offset_ok = f"{p.op}({expr})", False, False
        if rel and const is not None:
            out["expression"] = f"{expr} {rel} {describe_value(const)}"
            if invertible and value is not None and input_name is not None:
                r = {"<": ">", ">": "<", "<=": ">=", ">=": "<="}.get(rel, rel) if flip else rel
                v = np.asarray(value)
                if v.dtype.kind == "f" and np.all(np.isfinite(v)) and np.all(v == np.round(v)) and \
                        np.asarray(const).dtype.kind in "iub":
                    v = v.astype(np.int64)
                out["effective_trigger"] = f"{subject} {r} {describe_value(v)}"
            elif center is not None and rel in ("<", "<=") and reduced in (None, "ReduceMax", "ReduceL1", "ReduceSum"):
                out["effective_trigger"] = (f"{subject} matches pattern {_short(describe_value(center))} "
                                            f"(|difference| {rel} {describe_value(const)})")
                out["pattern"] = describe_value(center, limit=64)
        else:
            out["expression"] = f"{node.op}({expr})"
        if constants:
            out["constants_on_path"] = constants
        if input_name:
            out["input"] = input_name
        return out

    def downstream_ops(self, dec: Decision, switch: FlatNode) -> list[str]:
        path = self.path_forward(dec.node, {switch.index}, None)
        return [w for w in path[1:-1]]

    def switched_in(self, sw: Switch) -> list[dict]:
        """Input-independent values that the trigger brings in: the constant operands of every node
        where the raw decision signal (before any switch applied it) meets other values, from the
        decisions down to the outputs: Where/If branches, Mul/Add by a mask, ..."""
        out, seen = [], set()
        stack = [self.decisions[b].node for b in self._bits(sw.bits)]
        visited: set[int] = set()
        while stack and len(visited) < 2000:
            node = stack.pop()
            if node.index in visited:
                continue
            visited.add(node.index)
            raw_in = any(x and (self.dt.get(x, 0) & sw.bits & ~self.ap.get(x, 0)) for x in node.inputs)
            if raw_in and node.op in ("Where", "If", "Mul", "Add", "Sub", "Div", "Concat", "Max", "Min"):
                for q, x in enumerate(node.inputs):
                    if not x or x in seen or self.vt.get(x, 0) or (node.op == "Where" and q == 0):
                        continue
                    v = self.fold.value(x)
                    if v is not None and np.asarray(v).size == 1 and float(np.asarray(v).reshape(())) in (0.0, 1.0) \
                            and node.op not in ("Where", "If"):
                        continue          # 1 - mask, x * 0 ...: mask arithmetic, not a payload
                    seen.add(x)
                    d = self.describe_tensor(x)
                    d["role"] = f"input {q} of {node.where}"
                    out.append(d)
            for o in node.outputs:
                if self.dt.get(o, 0) & sw.bits & ~self.ap.get(o, 0) or node.index == sw.node.index:
                    stack.extend(self.fg.nodes[c] for c in self.fg.consumers.get(o, []))
        return out[:8]


def _slice_text(p: FlatNode, fold: ConstFolder) -> str:
    """numpy-style text of a Slice with constant arguments, e.g. "0:1, :, 0:2"."""
    vals = [fold.value(x) if x else None for x in p.inputs[1:5]]
    if p.proto is not None and attr_value(p.proto, "starts") is not None:
        starts, ends = attr_value(p.proto, "starts"), attr_value(p.proto, "ends")
        axes = attr_value(p.proto, "axes", list(range(len(starts))))
        steps = [1] * len(starts)
    elif len(vals) >= 2 and vals[0] is not None and vals[1] is not None:
        starts, ends = [int(v) for v in vals[0].ravel()], [int(v) for v in vals[1].ravel()]
        axes = [int(v) for v in vals[2].ravel()] if len(vals) > 2 and vals[2] is not None else list(range(len(starts)))
        steps = [int(v) for v in vals[3].ravel()] if len(vals) > 3 and vals[3] is not None else [1] * len(starts)
    else:
        return "slice"
    parts = {a: f"{s}:{'' if e >= 2**62 else e}" + (f":{st}" if st != 1 else "") for s, e, a, st in zip(starts, ends, axes, steps)}
    if any(a < 0 for a in parts):
        return ", ".join(f"axis {a}: {v}" for a, v in parts.items())
    return ", ".join(parts.get(i, ":") for i in range(max(parts) + 1))


def _short(v: Any) -> str:
    if isinstance(v, dict) and "values" in v and "shape" in v:
        v = np.array(v["values"]).reshape(v["shape"]).tolist()
    text = str(v)
    return text if len(text) <= 80 else text[:77] + "..."


def _elems(shape: tuple[int, ...]) -> int:
    return num_elements(shape)


def analyse(ctx: ScanContext, path: str, model: onnx.ModelProto) -> Analysis:
    fg = flat_graph(ctx, path, model)
    fold = ConstFolder(fg)          # constants only: the result must not depend on rule order
    try:
        elems = {k: _elems(v) for k, v in pipeline_input_shapes(ctx, path, model).items()}
    except Exception:  # noqa: BLE001
        elems = {}
    sd_component = ctx.is_sd_repo and path in ("text_encoder/model.onnx", "unet/model.onnx", "vae_decoder/model.onnx")
    an = Analysis(fg, fold, elems, sd_component)
    an.run()
    return an


@file_rule("*.onnx")
def check_backdoor(ctx: ScanContext, path: str, blob: Blob) -> Iterator[Finding]:
    model = ctx.onnx(path)
    if model is None or not model.HasField("graph"):
        return
    an = analyse(ctx, path, model)
    live = an.live()
    explained: dict[str, list[Switch]] = {}
    reported = 0
    for node in an.order:                      # upstream switches first
        sw = an.switches.get(node.index)
        if sw is None:
            continue
        if not any(o in live for o in sw.node.outputs):
            continue
        if sw.kind:
            explained.setdefault(sw.kind, []).append(sw)
            continue
        if not (sw.bits & ~reported):
            continue       # same trigger, further downstream
        reported |= sw.bits
        yield _trigger_finding(an, path, sw, live)
    for kind, sws in explained.items():
        first = sws[0]
        yield Finding(EXPLAINED.id, EXPLAINED.severity, path, first.node.where,
                      f"{first.detail.get('message', kind)}" + (f" (+{len(sws) - 1} more)" if len(sws) > 1 else ""),
                      {"pattern": kind, "count": len(sws), "switches": [s.node.where for s in sws[:20]],
                       "example": first.detail})
    if an.shape_masks:
        yield Finding(EXPLAINED.id, EXPLAINED.severity, path, an.shape_masks[0],
                      f"{len(an.shape_masks)} comparison(s) computed from tensor shapes only (causal/padding masks)",
                      {"pattern": "shape-mask", "count": len(an.shape_masks), "nodes": an.shape_masks[:20]})
    if an.broadcasts:
        yield Finding(EXPLAINED.id, EXPLAINED.severity, path, an.broadcasts[0],
                      f"{len(an.broadcasts)} input value(s) broadcast to shapes taken from other tensors "
                      "(e.g. timestep broadcast to the batch)",
                      {"pattern": "broadcast", "count": len(an.broadcasts), "nodes": an.broadcasts[:20]})


def _trigger_finding(an: Analysis, path: str, sw: Switch, live: set[str]) -> Finding:
    decs = [an.decisions[b] for b in an._bits(sw.bits)]
    # root decisions: those not fed by another decision of the same switch
    roots = [d for d in decs if not any(an.dt.get(d.node.inputs[i], 0) & sw.bits for i in d.tainted)] or decs
    triggers = [an.trigger_text(d) for d in roots]
    on_input = [d for d in roots if (d.node.op in CMP_OPS and d.constant or d.node.op == "Cast")
                and an._near_input([d.node.inputs[i] for i in d.tainted])]
    switched = an.switched_in(sw)
    out_path = an.path_forward(sw.node, None, set(an.fg.outputs))
    out_name = None
    for o in an.fg.outputs:
        p = an.fg.producer.get(o)
        if p is not None and out_path and an.fg.nodes[p].where == out_path[-1]:
            out_name = an.fg.name_of(o)
            break
    if on_input:
        sev = Severity.CRITICAL
        why = "compares input values with constants"
    elif switched:
        sev = Severity.HIGH
        why = "a data-dependent decision switches an input-independent value into an output"
    else:
        sev = Severity.LOW
        why = "a data-dependent decision steers an output; no known benign structure matches"
    root = on_input[0] if on_input else roots[0]
    trig = an.trigger_text(root)
    trig_s = trig.get("effective_trigger") or trig.get("expression") or root.node.op
    reduced = [w for w in an.downstream_ops(root, sw.node) if w.rsplit("(", 1)[-1].rstrip(")") in REDUCTIONS]
    scope = " (anywhere in the input)" if reduced else ""
    what = ("switches in " + ", ".join(f"{s['tensor']!r} ({s.get('input_independent', 'data')})" for s in switched[:2])
            if switched else "alters it")
    msg = (f"trigger logic: {trig_s}{scope} reaches output {out_name or '?'!r} through "
           f"{sw.node.op} {sw.node.name!r} and {what}")
    full_path = (an.path_to_input(root.node.inputs[root.tainted[0]] if root.tainted else None)
                 + an.path_forward(root.node, {sw.node.index}, None) + out_path[1:])
    if len(full_path) > MAX_PATH:
        full_path = full_path[:MAX_PATH // 2] + [f"... {len(full_path) - MAX_PATH} more ..."] + full_path[-MAX_PATH // 2:]
    evidence = {
        "why": why,
        "trigger": trig_s + scope,
        "decisions": triggers,
        "switch": {"node": sw.node.where, "op": sw.node.op,
                   "control": [an.fg.name_of(sw.node.inputs[i]) for i in range(len(sw.node.inputs))
                               if sw.node.inputs[i] and an.dt.get(sw.node.inputs[i], 0) & sw.bits]},
        "switched_in": switched,
        "output": out_name,
        "node_path": full_path,
        "inputs": an._input_names(an._decision_inputs(sw.bits)),
    }
    if reduced:
        evidence["reduced_by"] = reduced
    return Finding(TRIGGER.id, sev, path, sw.node.where, msg, evidence)
