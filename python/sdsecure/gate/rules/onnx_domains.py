"""ONNX-DOMAIN-UNKNOWN and ONNX-DOMAIN-HOSTCODE: which operator implementations a model asks for.

An ONNX node names an operator by (domain, op_type). The standard domains are implemented by every
runtime from the public spec; anything else is resolved against whatever custom-op libraries the
host process has registered. Local functions (model.functions) are not custom operators: a node that
calls one is fine, and the function body's own nodes are checked like any other.
"""

from __future__ import annotations

from typing import Iterator

from sdsecure.gate.blob import Blob
from sdsecure.gate.onnx_graph import cached_index, walk_nodes
from sdsecure.gate.report import Finding, Severity
from sdsecure.gate.rules import ScanContext, declare, file_rule

STANDARD_DOMAINS = frozenset({"", "ai.onnx", "ai.onnx.ml", "ai.onnx.preview", "ai.onnx.preview.training"})

# A short allowlist of ONNX Runtime contrib operators (domain com.microsoft, documented in
# onnxruntime's docs/ContribOperators.md). These are the fused kernels that onnxruntime's transformer
# optimizer (used by Optimum for Stable Diffusion / CLIP exports) emits; each is a pure tensor
# function implemented inside onnxruntime. Everything else in com.microsoft (beam search, EPContext
# blobs, tokenizers, quantised variants, ...) is treated as unknown.
VENDOR_ALLOWLIST: dict[str, frozenset[str]] = {
    "com.microsoft": frozenset({
        "Attention", "MultiHeadAttention", "GroupQueryAttention", "BiasAdd", "BiasGelu",
        "BiasSplitGelu", "FastGelu", "Gelu", "QuickGelu", "GroupNorm", "SkipGroupNorm", "NhwcConv",
        "FusedConv", "FusedGemm", "FusedMatMul", "SkipLayerNormalization",
        "SkipSimplifiedLayerNormalization", "EmbedLayerNormalization", "RotaryEmbedding", "MatMulNBits",
    }),
}

# Domains whose operators are implemented by code that the *model* chooses: onnxruntime-extensions
# registers its custom ops under ai.onnx.contrib (and com.microsoft.extensions); with its PyOp
# mechanism any op name in that domain can be bound to a Python function.
HOSTCODE_DOMAINS = frozenset({"ai.onnx.contrib", "com.microsoft.extensions"})
# Operator names that run Python in the host process whatever their domain: onnxruntime-extensions'
# PyOp, ONNX Runtime training's PythonOp / PythonOpGrad (torch.autograd.Function callbacks).
HOSTCODE_OPS = frozenset({"pyop", "pythonop", "pythonopgrad", "pyfunc", "pythonfunction", "python"})

UNKNOWN = declare(
    "ONNX-DOMAIN-UNKNOWN", Severity.HIGH,
    "Operator from a non-standard domain with no known provider",
    why=("Nodes outside the standard ONNX domains are executed by whatever custom-operator library the "
         "host has registered under that name. Their behaviour is not defined by the ONNX spec, cannot "
         "be reviewed from the model file, and the gate's dataflow analyses cannot see through them. "
         "A model that needs an unknown domain is either tied to a private runtime or hiding logic."),
    fix=("Re-export with standard ONNX operators only (torch.onnx.export does this by default), or, for "
         "onnxruntime fused kernels, run the unoptimised export. If you trust the custom operator, "
         "review its source and scan with --policy audit."),
)

HOSTCODE = declare(
    "ONNX-DOMAIN-HOSTCODE", Severity.CRITICAL,
    "Operator domain or op type that runs host code (Python / custom library)",
    why=("onnxruntime-extensions binds operators in the ai.onnx.contrib domain to Python functions "
         "(PyOp) under any op name, and PythonOp / PyOp nodes call back into Python. A model using them "
         "asks the host to run code that is not in the model at all, chosen by name: loading it with "
         "the wrong library registered is code execution."),
    fix=("Do not run the model. A text-to-image model never needs host callbacks; use an export that "
         "contains only standard ONNX operators."),
)


def _fn_keys(model) -> set[tuple[str, str]]:
    return {(f.domain, f.name) for f in model.functions}


@file_rule("*.onnx")
def check_domains(ctx: ScanContext, path: str, blob: Blob) -> Iterator[Finding]:
    model = ctx.onnx(path)
    if model is None:
        return
    local = _fn_keys(model)
    ix = cached_index(ctx, path, model)
    seen_unknown: dict[tuple[str, str], list[str]] = {}
    for loc in walk_nodes(ix):
        node = loc.node
        dom = "" if node.domain == "ai.onnx" else node.domain
        op_l = node.op_type.lower()
        if dom in HOSTCODE_DOMAINS or op_l in HOSTCODE_OPS:
            why = (f"domain {node.domain!r} runs host code" if dom in HOSTCODE_DOMAINS
                   else f"op type {node.op_type!r} calls back into Python")
            yield Finding(HOSTCODE.id, HOSTCODE.severity, path, loc.where,
                          f"node {loc.name!r} uses {node.domain or 'ai.onnx'}::{node.op_type}: {why}",
                          {"node": loc.name, "op_type": node.op_type, "domain": node.domain,
                           "graph_path": loc.graph_path,
                           "calls_local_function": (node.domain, node.op_type) in local})
            continue
        if (node.domain, node.op_type) in local:
            continue  # a call of a local function: its body is checked node by node
        if dom in STANDARD_DOMAINS:
            continue
        if node.op_type in VENDOR_ALLOWLIST.get(dom, ()):
            continue
        seen_unknown.setdefault((node.domain, node.op_type), []).append(loc.where)
    for (dom, op), wheres in seen_unknown.items():
        vendor = dom in VENDOR_ALLOWLIST
        msg = (f"{dom}::{op} is not on the allowlist of known {dom} operators" if vendor
               else f"operator {dom}::{op} from non-standard domain {dom!r}")
        yield Finding(UNKNOWN.id, UNKNOWN.severity, path, wheres[0],
                      f"{msg} ({len(wheres)} node{'s' if len(wheres) != 1 else ''})",
                      {"domain": dom, "op_type": op, "nodes": wheres[:20], "count": len(wheres)})
    # functions declared in a host-code domain, and host-code domains declared but unused
    for fn in model.functions:
        if fn.domain in HOSTCODE_DOMAINS:
            yield Finding(HOSTCODE.id, HOSTCODE.severity, path, f"function:{fn.domain}:{fn.name}",
                          f"local function {fn.name!r} is declared in host-code domain {fn.domain!r}; "
                          "a runtime with that domain registered may run host code instead of the body",
                          {"function": fn.name, "domain": fn.domain})
    used = {n.node.domain for n in walk_nodes(ix)}
    for imp in model.opset_import:
        if imp.domain in HOSTCODE_DOMAINS and imp.domain not in used:
            yield Finding(HOSTCODE.id, Severity.MEDIUM, path, "model.opset_import",
                          f"model imports host-code domain {imp.domain!r} (no node uses it)",
                          {"domain": imp.domain, "version": imp.version})
