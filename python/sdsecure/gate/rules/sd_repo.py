"""The SD 1.5 repo as a unit (only when the snapshot has an SD layout: model_index.json at its root).

Each component can look fine alone and still not belong with the others: a UNet whose
cross-attention expects another text width, a tokenizer that emits ids past the end of the text
encoder's embedding table, a component with a different interface than the SD 1.5 contract the
pipeline feeds. Mismatches are what a swapped or tampered component looks like, and what makes an
engine read out of bounds. Everything is read from graph declarations and initializer *dims* (no
weight data is loaded).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from onnx import TensorProto

from sdsecure.gate.render import node_from_where
from sdsecure.gate.report import Finding, Severity
from sdsecure.gate.rules import ScanContext, declare, repo_rule
from sdsecure.gate.rules.configs import load_json

TEXT = "text_encoder/model.onnx"
UNET = "unet/model.onnx"
VAE = "vae_decoder/model.onnx"
VOCAB = "tokenizer/vocab.json"
MERGES = "tokenizer/merges.txt"
SCHEDULER = "scheduler/scheduler_config.json"
REQUIRED = (TEXT, UNET, VAE, VOCAB, MERGES, SCHEDULER)

F = TensorProto
FLOATS = (F.FLOAT, F.FLOAT16)
INTS = (F.INT32, F.INT64)


@dataclass(frozen=True)
class Port:
    name: str
    dtypes: tuple[int, ...]
    ranks: tuple[int, ...]
    dim1: int | None = None          # required size of axis 1 when the model declares it statically
    required: bool = True


#: The SD 1.5 contract the pipeline feeds (public ONNX exports and both fixture exporters).
CONTRACT: dict[str, tuple[list[Port], list[Port]]] = {
    TEXT: ([Port("input_ids", INTS, (2,))],
           [Port("last_hidden_state", FLOATS, (3,)), Port("pooler_output", FLOATS, (2,), required=False)]),
    UNET: ([Port("sample", FLOATS, (4,), dim1=4), Port("timestep", INTS + FLOATS, (0, 1)),
            Port("encoder_hidden_states", FLOATS, (3,))],
           [Port("out_sample", FLOATS, (4,), dim1=4)]),
    VAE: ([Port("latent_sample", FLOATS, (4,), dim1=4)],
          [Port("sample", FLOATS, (4,), dim1=3)]),
}

MISSING = declare(
    "SD-MISSING-COMPONENT", Severity.HIGH,
    "SD repo lacks a required component",
    "The repo declares an SD pipeline (model_index.json) but a file the pipeline needs is absent: "
    "an incomplete or altered snapshot, whose missing part could be substituted from elsewhere.",
    "Fetch the complete repo at one pinned revision (text_encoder, unet, vae_decoder, tokenizer "
    "vocab.json + merges.txt, scheduler config).")
IO_CONTRACT = declare(
    "SD-IO-CONTRACT", Severity.HIGH,
    "Component inputs/outputs differ from the SD 1.5 contract",
    "The pipeline feeds input_ids -> text encoder, (sample, timestep, encoder_hidden_states) -> UNet, "
    "latent_sample -> VAE decoder. Missing or renamed ports, unexpected dtypes or ranks, or extra "
    "inputs mean the component is not the SD 1.5 model it claims to be (an extra input is a classic "
    "trigger channel).",
    "Use an SD 1.5 ONNX export with the standard interface (e.g. diffusers/optimum export).")
VOCAB_MISMATCH = declare(
    "SD-VOCAB-MISMATCH", Severity.HIGH,
    "Tokenizer vocabulary size differs from the text encoder's embedding table",
    "Token ids index the text encoder's embedding rows. More tokens than rows means some prompts "
    "read out of bounds (a crash, or undefined memory on engines without bound checks); fewer means "
    "the tokenizer was swapped for another model's.",
    "Use the tokenizer that was exported with this text encoder.")
CROSS_DIM = declare(
    "SD-CROSS-ATTN-DIM", Severity.HIGH,
    "UNet cross-attention width differs from the text encoder's hidden size",
    "The UNet attends to the text encoder's last_hidden_state; if the widths differ the pair was "
    "not trained together: a component was replaced.",
    "Use text encoder and UNet from the same SD 1.5 export.")
UNDETERMINED = declare(
    "SD-UNCHECKED", Severity.LOW,
    "An SD cross-component check could not be carried out",
    "The graph hides the dimension the check needs (no static shape, no recognisable embedding or "
    "cross-attention weights); the consistency is unverified.",
    "Export with static hidden sizes, or review the component pairing by hand.")

_PASS_THROUGH = {"Cast", "Identity", "Reshape", "Flatten", "Squeeze", "Unsqueeze", "View", "Expand",
                 "CastLike"}


def _dims(vi: Any) -> list[int | str]:
    return [d.dim_value if d.HasField("dim_value") else (d.dim_param or "?")
            for d in vi.type.tensor_type.shape.dim]


def _has_shape(vi: Any) -> bool:
    return vi.type.tensor_type.HasField("shape")


class _Graph:
    """Lookup tables over the main graph of one component."""

    def __init__(self, model: Any):
        g = model.graph
        self.graph = g
        self.init_dims: dict[str, list[int]] = {t.name: list(t.dims) for t in g.initializer}
        for n in g.node:            # Constant nodes hold weights in some exports
            if n.op_type == "Constant":
                for a in n.attribute:
                    if a.name == "value" and a.type == a.TENSOR:
                        self.init_dims[n.output[0]] = list(a.t.dims)
        self.producer = {o: n for n in g.node for o in n.output}
        self.inputs = {vi.name: vi for vi in g.input if vi.name not in self.init_dims}
        self.outputs = {vi.name: vi for vi in g.output}

    def origin(self, tensor: str) -> str:
        """Follow Cast/Reshape/... back to the tensor an activation comes from."""
        seen = 0
        while tensor in self.producer and self.producer[tensor].op_type in _PASS_THROUGH and seen < 32:
            tensor = self.producer[tensor].input[0]
            seen += 1
        return tensor

    def weight_dims(self, tensor: str) -> list[int] | None:
        """Dims of a weight: an initializer/Constant, possibly through Cast or a 2-D Transpose."""
        transposed = False
        for _ in range(8):
            if tensor in self.init_dims:
                d = self.init_dims[tensor]
                return d[::-1] if transposed and len(d) == 2 else d
            node = self.producer.get(tensor)
            if node is None or node.op_type not in ("Cast", "Identity", "Transpose", "CastLike"):
                return None
            if node.op_type == "Transpose":
                transposed = not transposed
            tensor = node.input[0]
        return None


def _check_ports(path: str, g: _Graph) -> list[Finding]:
    want_in, want_out = CONTRACT[path]
    out: list[Finding] = []
    for kind, want, have in (("input", want_in, g.inputs), ("output", want_out, g.outputs)):
        for p in want:
            vi = have.get(p.name)
            if vi is None:
                if p.required:
                    out.append(Finding(IO_CONTRACT.id, Severity.HIGH, path, f"graph {kind}s",
                                       f"missing {kind} {p.name!r} (has {sorted(have)})",
                                       {"expected": p.name, "present": sorted(have)}))
                continue
            et = vi.type.tensor_type.elem_type
            if et not in p.dtypes:
                out.append(Finding(IO_CONTRACT.id, Severity.HIGH, path, f"{kind} {p.name}",
                                   f"{kind} {p.name!r} has dtype {_tname(et)}, expected one of "
                                   f"{[_tname(t) for t in p.dtypes]}",
                                   {"port": p.name, "dtype": _tname(et)}))
            if _has_shape(vi):
                dims = _dims(vi)
                if len(dims) not in p.ranks:
                    out.append(Finding(IO_CONTRACT.id, Severity.HIGH, path, f"{kind} {p.name}",
                                       f"{kind} {p.name!r} has rank {len(dims)}, expected {p.ranks}",
                                       {"port": p.name, "shape": dims}))
                elif p.dim1 is not None and len(dims) > 1 and isinstance(dims[1], int) and dims[1] \
                        and dims[1] != p.dim1:
                    out.append(Finding(IO_CONTRACT.id, Severity.HIGH, path, f"{kind} {p.name}",
                                       f"{kind} {p.name!r} has {dims[1]} channels, expected {p.dim1}",
                                       {"port": p.name, "shape": dims}))
        extra = sorted(set(have) - {p.name for p in want})
        if extra:
            sev = Severity.HIGH if kind == "input" else Severity.LOW
            out.append(Finding(IO_CONTRACT.id, sev, path, f"graph {kind}s",
                               f"unexpected {kind}(s) {extra}" + (" (the pipeline does not feed them: "
                               "a possible trigger channel)" if kind == "input" else ""),
                               {"unexpected": extra}))
    return out


def _tname(t: int) -> str:
    try:
        return TensorProto.DataType.Name(t).lower()
    except ValueError:
        return f"type{t}"


def _token_embedding_rows(g: _Graph) -> tuple[int, int, str] | None:
    """(rows, width, node) of the Gather that looks up input_ids in the token embedding table."""
    for i, n in enumerate(g.graph.node):
        if n.op_type == "Gather" and len(n.input) == 2 and g.origin(n.input[1]) == "input_ids":
            d = g.weight_dims(n.input[0])
            if d is not None and len(d) == 2:
                return d[0], d[1], n.name or f"#{i}"
    return None


def _text_hidden(g: _Graph) -> tuple[int, str] | None:
    vi = g.outputs.get("last_hidden_state")
    if vi is not None and _has_shape(vi):
        d = _dims(vi)
        if d and isinstance(d[-1], int) and d[-1] > 0:
            return d[-1], "output last_hidden_state"
    emb = _token_embedding_rows(g)
    return (emb[1], f"token embedding {emb[2]}") if emb else None


def _unet_context_dims(g: _Graph) -> dict[int, list[str]]:
    """Width(s) the UNet expects for encoder_hidden_states -> where: every MatMul/Gemm that projects
    it (the attn2 to_k / to_v weights), as "main/<node> (<op>)", then its declared last dim."""
    found: dict[int, list[str]] = {}
    for i, n in enumerate(g.graph.node):
        if n.op_type not in ("MatMul", "Gemm") or len(n.input) < 2:
            continue
        if g.origin(n.input[0]) != "encoder_hidden_states":
            continue
        w = g.weight_dims(n.input[1])
        if w is None or len(w) != 2:
            continue
        trans_b = any(a.name == "transB" and a.i for a in n.attribute) if n.op_type == "Gemm" else False
        width = w[1] if trans_b else w[0]
        found.setdefault(width, []).append(f"main/{n.name or f'#{i}'} ({n.op_type})")
    vi = g.inputs.get("encoder_hidden_states")
    if vi is not None and _has_shape(vi):
        d = _dims(vi)
        if d and isinstance(d[-1], int) and d[-1] > 0:
            found.setdefault(d[-1], []).append("input encoder_hidden_states")
    return found


def _vocab_size(ctx: ScanContext) -> int | None:
    vocab = load_json(ctx, VOCAB)
    if not isinstance(vocab, dict) or not vocab:
        return None
    ids = [v for v in vocab.values() if isinstance(v, int) and not isinstance(v, bool)]
    size = max(ids) + 1 if ids else 0
    tok_cfg = load_json(ctx, "tokenizer/tokenizer_config.json")
    added = tok_cfg.get("added_tokens_decoder") if isinstance(tok_cfg, dict) else None
    if isinstance(added, dict):
        for k in added:
            if str(k).isdigit():
                size = max(size, int(k) + 1)
    return size


@repo_rule
def sd_repo_rule(ctx: ScanContext) -> list[Finding]:
    if not ctx.is_sd_repo:
        return []
    out: list[Finding] = []
    missing = [p for p in REQUIRED if p not in ctx.files]
    for p in missing:
        out.append(Finding(MISSING.id, Severity.HIGH, p, "", f"required SD 1.5 file {p} is missing",
                           {"required": list(REQUIRED)}))

    graphs: dict[str, _Graph] = {}
    for path in (TEXT, UNET, VAE):
        model = ctx.onnx(path) if path in ctx.files else None
        if model is not None:           # unparseable models are reported by the ONNX parse rule
            graphs[path] = _Graph(model)
            out += _check_ports(path, graphs[path])

    text = graphs.get(TEXT)
    if text is not None and VOCAB in ctx.files:
        emb = _token_embedding_rows(text)
        vocab = _vocab_size(ctx)
        if emb is None or vocab is None:
            out.append(Finding(UNDETERMINED.id, Severity.LOW, TEXT, "", "tokenizer/text-encoder vocabulary "
                               "check skipped: " + ("no token-embedding Gather on input_ids found"
                                                     if emb is None else "vocab.json unreadable"), {}))
        elif vocab != emb[0]:
            sev = Severity.HIGH if vocab > emb[0] else Severity.MEDIUM
            out.append(Finding(VOCAB_MISMATCH.id, sev, TEXT, f"main/{emb[2]} (Gather)",
                               f"tokenizer has {vocab} tokens, text encoder embedding has {emb[0]} rows",
                               {"tokenizer_vocab": vocab, "embedding_rows": emb[0], "node": emb[2]}))

    unet = graphs.get(UNET)
    if text is not None and unet is not None:
        hidden = _text_hidden(text)
        ctx_dims = _unet_context_dims(unet)
        if hidden is None or not ctx_dims:
            out.append(Finding(UNDETERMINED.id, Severity.LOW, UNET, "", "cross-attention width check "
                               "skipped: " + ("text hidden size unknown" if hidden is None else
                                              "no projection of encoder_hidden_states found"), {}))
        else:
            for width, where in sorted(ctx_dims.items()):
                if width != hidden[0]:
                    out.append(Finding(
                        CROSS_DIM.id, Severity.HIGH, UNET, where[0],
                        f"UNet expects encoder_hidden_states width {width} ({len(where)} place(s), e.g. "
                        f"{where[0]}), text encoder produces {hidden[0]} ({hidden[1]})",
                        {"unet_width": width, "text_hidden": hidden[0], "locations": where[:20],
                         "nodes": [node_from_where(w) for w in where[:20] if node_from_where(w)]}))
    return out
