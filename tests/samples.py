"""Builders of benign and malicious ONNX samples, for the gate's tests.

Plain functions: each returns a ModelProto, or writes a model folder and returns its path. Nothing is
downloaded; every malicious sample is built here with onnx.helper. Importable from other tests as
`from tests.samples import ...` (or `from samples import ...` inside tests/).

Scanning helpers (`scan_model`, `scan_folder`) run the gate's rule registry on a model or a folder.
"""

from __future__ import annotations

import base64
import os
import pickle
import stat
from pathlib import Path
from typing import Iterable

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from sdsecure.gate.blob import Blob
from sdsecure.gate.report import Finding, Severity
from sdsecure.gate.rules import ScanContext, run_all

OPSET = 17
ROOT = Path(__file__).resolve().parent.parent
EMBEDDED_SD = ROOT / "python" / "sdsecure" / "embedded" / "tiny-sd15"
DYNAMO_SD = ROOT / "tests" / "fixtures" / "tiny-sd15-dynamo"
SD_COMPONENTS = {"text_encoder": "text_encoder/model.onnx", "unet": "unet/model.onnx",
                 "vae_decoder": "vae_decoder/model.onnx"}


# ------------------------------------------------------------------------------------------------
# scanning
# ------------------------------------------------------------------------------------------------

def scan_files(files: dict[str, bytes | Blob], *, is_sd: bool = False,
               input_shapes: dict | None = None) -> list[Finding]:
    blobs = {p: b if isinstance(b, Blob) else Blob.from_bytes(b) for p, b in files.items()}
    ctx = ScanContext("test", blobs, is_sd, input_shapes or {})
    return run_all(ctx)


def scan_model(model: onnx.ModelProto | bytes, path: str = "model.onnx", *, extra: dict[str, bytes] | None = None,
               is_sd: bool = False, input_shapes: dict | None = None) -> list[Finding]:
    data = model if isinstance(model, bytes) else model.SerializeToString()
    return scan_files({path: data, **(extra or {})}, is_sd=is_sd, input_shapes=input_shapes)


def read_folder(folder: str | os.PathLike) -> dict[str, Blob]:
    """The snapshot the gate's file walker hands to the rules: regular files only, read with
    O_NOFOLLOW; symlinks, hardlinked files (st_nlink > 1) and special files are left out (the walker
    reports those itself). Directory symlinks are not descended into."""
    root = Path(folder)
    out: dict[str, Blob] = {}
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        dirnames[:] = [d for d in dirnames if not os.path.islink(os.path.join(dirpath, d))]
        for fn in filenames:
            full = os.path.join(dirpath, fn)
            st = os.lstat(full)
            if not stat.S_ISREG(st.st_mode) or st.st_nlink > 1:
                continue
            fd = os.open(full, os.O_RDONLY | os.O_NOFOLLOW)
            try:
                data = b""
                while chunk := os.read(fd, 1 << 20):
                    data += chunk
            finally:
                os.close(fd)
            out[os.path.relpath(full, root).replace(os.sep, "/")] = Blob.from_bytes(data)
    return out


def scan_folder(folder: str | os.PathLike, *, input_shapes: dict | None = None) -> list[Finding]:
    files = read_folder(folder)
    return run_all(ScanContext(str(folder), files, "model_index.json" in files, input_shapes or {}))


def by_rule(findings: Iterable[Finding], prefix: str = "") -> dict[str, list[Finding]]:
    out: dict[str, list[Finding]] = {}
    for f in findings:
        if f.rule.startswith(prefix):
            out.setdefault(f.rule, []).append(f)
    return out


def above(findings: Iterable[Finding], level: Severity) -> list[Finding]:
    return [f for f in findings if f.severity > level]


# ------------------------------------------------------------------------------------------------
# small graph helpers
# ------------------------------------------------------------------------------------------------

def vi(name: str, elem: int, shape: list) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, elem, shape)


def const(name: str, value, dtype=None) -> onnx.NodeProto:
    arr = np.asarray(value, dtype=dtype)
    return helper.make_node("Constant", [], [name], name=name, value=numpy_helper.from_array(arr, name))


def make_model(nodes, inputs, outputs, initializers=(), *, opset: int = OPSET, functions=(), doc: str = "",
               extra_opsets=(), name: str = "g", value_info=()) -> onnx.ModelProto:
    graph = helper.make_graph(list(nodes), name, list(inputs), list(outputs), list(initializers),
                              value_info=list(value_info))
    opsets = [helper.make_opsetid("", opset)] + [helper.make_opsetid(d, v) for d, v in extra_opsets]
    m = helper.make_model(graph, opset_imports=opsets, functions=list(functions), producer_name="sdsecure-tests")
    m.ir_version = 8
    if doc:
        m.doc_string = doc
    return m


def benign_mlp(doc: str = "") -> onnx.ModelProto:
    """x[1,4] -> MatMul -> Add -> Relu -> Softmax -> y[1,3]."""
    rng = np.random.default_rng(0)
    w = numpy_helper.from_array(rng.standard_normal((4, 3)).astype(np.float32), "w")
    b = numpy_helper.from_array(np.zeros(3, np.float32), "b")
    nodes = [helper.make_node("MatMul", ["x", "w"], ["h"], name="mm"),
             helper.make_node("Add", ["h", "b"], ["h2"], name="add"),
             helper.make_node("Relu", ["h2"], ["h3"], name="relu"),
             helper.make_node("Softmax", ["h3"], ["y"], name="softmax", axis=-1)]
    return make_model(nodes, [vi("x", TensorProto.FLOAT, [1, 4])], [vi("y", TensorProto.FLOAT, [1, 3])], [w, b], doc=doc)


def save_with_external_data(model: onnx.ModelProto, folder: str | os.PathLike, name: str = "model.onnx",
                            location: str = "weights.pb") -> Path:
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    m = onnx.ModelProto()
    m.CopyFrom(model)
    onnx.save_model(m, str(folder / name), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=location, size_threshold=0)
    return folder / name


def external_tensor(name: str, location: str, dims=(4,), dtype=TensorProto.FLOAT, offset: str | None = "0",
                    length: str | None = "16", extra: dict | None = None) -> TensorProto:
    t = TensorProto(name=name, data_type=dtype, dims=list(dims))
    t.data_location = TensorProto.EXTERNAL
    entries = [("location", location)]
    if offset is not None:
        entries.append(("offset", offset))
    if length is not None:
        entries.append(("length", length))
    entries += list((extra or {}).items())
    for k, v in entries:
        e = t.external_data.add()
        e.key, e.value = k, v
    return t


def raw_tensor(name: str, data: bytes, dims=(4,), dtype=TensorProto.FLOAT) -> TensorProto:
    """A tensor with exactly these raw bytes (helper.make_tensor refuses inconsistent sizes)."""
    return TensorProto(name=name, data_type=dtype, dims=list(dims), raw_data=data)


def model_with_initializer(t: TensorProto, n: int = 4) -> onnx.ModelProto:
    """y = x + t, with t a [n] float tensor stored however the caller built it."""
    return make_model([helper.make_node("Add", ["x", t.name], ["y"], name="add")],
                      [vi("x", TensorProto.FLOAT, [n])], [vi("y", TensorProto.FLOAT, [n])], [t])


# ------------------------------------------------------------------------------------------------
# benign non-SD models (must pass --strict: nothing >= medium)
# ------------------------------------------------------------------------------------------------

def benign_ocr() -> onnx.ModelProto:
    """A small CRNN-like OCR net: Conv/Relu/MaxPool, a leaky ReLU written as Where(x > 0, x, 0.1x), a
    NaN guard Where(IsNaN(p), 0, p) after the softmax, and CTC greedy decoding (ArgMax) as a second
    output. Documentation mentions 'evaluation', `model.eval()` and a GitHub URL."""
    rng = np.random.default_rng(1)
    inits = [numpy_helper.from_array(rng.standard_normal((8, 1, 3, 3)).astype(np.float32) * 0.1, "conv1.w"),
             numpy_helper.from_array(np.zeros(8, np.float32), "conv1.b"),
             numpy_helper.from_array(rng.standard_normal((16, 8, 3, 3)).astype(np.float32) * 0.1, "conv2.w"),
             numpy_helper.from_array(rng.standard_normal((16 * 4, 37)).astype(np.float32) * 0.1, "fc.w"),
             numpy_helper.from_array(np.array(0.1, np.float32), "slope"),
             numpy_helper.from_array(np.array(0.0, np.float32), "zero"),
             numpy_helper.from_array(np.array([0, 3, 2, 1], np.int64), "perm_shape")]
    nodes = [
        helper.make_node("Conv", ["image", "conv1.w", "conv1.b"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
        helper.make_node("Greater", ["c1", "zero"], ["pos"], name="leaky_test"),
        helper.make_node("Mul", ["c1", "slope"], ["c1s"], name="leaky_scale"),
        helper.make_node("Where", ["pos", "c1", "c1s"], ["a1"], name="leaky_where"),
        helper.make_node("MaxPool", ["a1"], ["p1"], name="pool1", kernel_shape=[2, 2], strides=[2, 2]),
        helper.make_node("Conv", ["p1", "conv2.w"], ["c2"], name="conv2", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c2"], ["a2"], name="relu2"),
        helper.make_node("MaxPool", ["a2"], ["p2"], name="pool2", kernel_shape=[2, 2], strides=[2, 2]),
        # [N,16,4,W] -> [N,W,16*4]
        helper.make_node("Transpose", ["p2"], ["t"], name="to_seq", perm=[0, 3, 1, 2]),
        helper.make_node("Shape", ["t"], ["ts"], name="seq_shape"),
        const("c01", [0, 1], np.int64),
        helper.make_node("Gather", ["ts", "c01"], ["nw"], name="nw"),
        const("cm1", [-1], np.int64),
        helper.make_node("Concat", ["nw", "cm1"], ["seq_shape2"], name="seq_shape2", axis=0),
        helper.make_node("Reshape", ["t", "seq_shape2"], ["seq"], name="flatten_seq"),
        helper.make_node("MatMul", ["seq", "fc.w"], ["logits"], name="fc"),
        helper.make_node("Softmax", ["logits"], ["probs_raw"], name="softmax", axis=-1),
        helper.make_node("IsNaN", ["probs_raw"], ["nan"], name="nan_test"),
        helper.make_node("Where", ["nan", "zero", "probs_raw"], ["probs"], name="nan_guard"),
        helper.make_node("ArgMax", ["probs"], ["labels"], name="ctc_greedy", axis=-1, keepdims=0),
    ]
    m = make_model(nodes, [vi("image", TensorProto.FLOAT, ["N", 1, 16, "W"])],
                   [vi("probs", TensorProto.FLOAT, ["N", "T", 37]), vi("labels", TensorProto.INT64, ["N", "T"])],
                   inits, name="crnn_ocr",
                   doc=("Tiny CRNN text recogniser. Trained for evaluation on synthetic text lines; call "
                        "model.eval() before export. Decoding: greedy CTC. "
                        "See https://github.com/example/crnn for the training code."))
    helper.set_model_props(m, {"labels": "0123456789abcdefghijklmnopqrstuvwxyz-", "license": "MIT",
                               "source": "https://huggingface.co/example/crnn-ocr"})
    return m


def benign_vad() -> onnx.ModelProto:
    """A silero-vad-like recurrent model: inputs audio [1, 512], state [2, 1, 16] and sr (int64 scalar).
    - If on the state's *shape*: an empty state is replaced by zeros (recurrent-state If).
    - If on the sample rate *value* (16000 vs 8000): both branches compute from the audio.
    - A Loop over frames (trip count from the audio's shape) accumulating energy.
    - An LSTM cell over the features, returning the new state."""
    rng = np.random.default_rng(2)
    H = 16
    f = np.float32
    inits = [numpy_helper.from_array(rng.standard_normal((1, 4 * H, 8)).astype(f) * 0.1, "lstm.W"),
             numpy_helper.from_array(rng.standard_normal((1, 4 * H, H)).astype(f) * 0.1, "lstm.R"),
             numpy_helper.from_array(rng.standard_normal((H, 1)).astype(f) * 0.1, "head.w"),
             numpy_helper.from_array(np.array(16000, np.int64), "sr16k"),
             numpy_helper.from_array(rng.standard_normal((512, 8)).astype(f) * 0.05, "feat16k.w"),
             numpy_helper.from_array(rng.standard_normal((512, 8)).astype(f) * 0.05, "feat8k.w")]
    # If on the state's shape: Size(state) == 0 -> zeros
    st_then = helper.make_graph([const("zs_shape", [2, 1, H], np.int64),
                                 helper.make_node("ConstantOfShape", ["zs_shape"], ["zs"], name="zeros",
                                                  value=numpy_helper.from_array(np.array([0], f)))],
                                "state_init", [], [vi("zs", TensorProto.FLOAT, [2, 1, H])])
    st_else = helper.make_graph([helper.make_node("Identity", ["state"], ["st_keep"], name="keep")],
                                "state_keep", [], [vi("st_keep", TensorProto.FLOAT, [2, 1, H])])
    # If on sr: different feature extractors, both from the audio
    sr_then = helper.make_graph([helper.make_node("MatMul", ["audio", "feat16k.w"], ["f16"], name="feat16k")],
                                "sr16k", [], [vi("f16", TensorProto.FLOAT, [1, 8])])
    sr_else = helper.make_graph([helper.make_node("MatMul", ["audio", "feat8k.w"], ["f8"], name="feat8k")],
                                "sr8k", [], [vi("f8", TensorProto.FLOAT, [1, 8])])
    # Loop over 4 frames of 128 samples: energy += sum(frame^2)
    body = helper.make_graph([
        helper.make_node("Identity", ["cond_in"], ["cond_out"], name="loop_cond"),
        const("fl", [128], np.int64),
        helper.make_node("Mul", ["i", "fl"], ["start"], name="frame_start"),
        helper.make_node("Add", ["start", "fl"], ["end"], name="frame_end"),
        const("ax1", [1], np.int64),
        helper.make_node("Slice", ["audio", "start", "end", "ax1"], ["frame"], name="frame"),
        helper.make_node("ReduceSumSquare", ["frame"], ["e"], name="frame_energy", keepdims=0),
        helper.make_node("Add", ["energy_in", "e"], ["energy_out"], name="accumulate"),
    ], "frames", [vi("i", TensorProto.INT64, []), vi("cond_in", TensorProto.BOOL, []),
                  vi("energy_in", TensorProto.FLOAT, [])],
        [vi("cond_out", TensorProto.BOOL, []), vi("energy_out", TensorProto.FLOAT, [])])
    nodes = [
        helper.make_node("Size", ["state"], ["state_size"], name="state_size"),
        const("zero_i", 0, np.int64),
        helper.make_node("Equal", ["state_size", "zero_i"], ["state_empty"], name="state_empty"),
        helper.make_node("If", ["state_empty"], ["state0"], name="init_state", then_branch=st_then, else_branch=st_else),
        helper.make_node("Equal", ["sr", "sr16k"], ["is16k"], name="is16k"),
        helper.make_node("If", ["is16k"], ["feats"], name="select_sr", then_branch=sr_then, else_branch=sr_else),
        helper.make_node("Unsqueeze", ["feats", "ax0"], ["feats3"], name="to_seq"),
        helper.make_node("Split", ["state0"], ["h0", "c0"], name="split_state", axis=0, num_outputs=2),
        helper.make_node("LSTM", ["feats3", "lstm.W", "lstm.R", "", "", "h0", "c0"], ["", "hN", "cN"],
                         name="lstm", hidden_size=H),
        helper.make_node("Concat", ["hN", "cN"], ["new_state"], name="new_state", axis=0),
        helper.make_node("Squeeze", ["hN", "ax0"], ["h"], name="h"),
        helper.make_node("MatMul", ["h", "head.w"], ["logit"], name="head"),
        helper.make_node("Sigmoid", ["logit"], ["speech_prob"], name="prob"),
        helper.make_node("Shape", ["audio"], ["ashape"], name="audio_shape"),
        const("c1", [1], np.int64),
        helper.make_node("Gather", ["ashape", "c1"], ["alen"], name="audio_len"),
        const("c128", [128], np.int64),
        helper.make_node("Div", ["alen", "c128"], ["nframes1"], name="nframes"),
        helper.make_node("Squeeze", ["nframes1"], ["nframes"], name="nframes_scalar"),
        const("true", True, np.bool_),
        const("e0", 0.0, np.float32),
        helper.make_node("Loop", ["nframes", "true", "e0"], ["energy"], name="energy_loop", body=body),
    ]
    inits.append(numpy_helper.from_array(np.array([0], np.int64), "ax0"))
    m = make_model(nodes, [vi("audio", TensorProto.FLOAT, [1, 512]), vi("state", TensorProto.FLOAT, ["S", 1, H]),
                           vi("sr", TensorProto.INT64, [])],
                   [vi("speech_prob", TensorProto.FLOAT, [1, 1]), vi("new_state", TensorProto.FLOAT, [2, 1, H]),
                    vi("energy", TensorProto.FLOAT, [])], inits, opset=18, name="vad",
                   doc="Voice activity detector (silero-vad-like). Feed 512-sample chunks at 16 kHz or 8 kHz.")
    return m


# ------------------------------------------------------------------------------------------------
# the committed tiny SD 1.5 fixture pipelines (made by tools/export_tiny_sd.py)
# ------------------------------------------------------------------------------------------------

def sd_pipeline_folder(kind: str) -> Path:
    """The tiny SD pipeline of `kind`: 'legacy' (torch.onnx legacy exporter, opset 14; the embedded
    default model) or 'dynamo' (torch.onnx dynamo exporter)."""
    return {"legacy": EMBEDDED_SD, "dynamo": DYNAMO_SD}[kind]


def load_component(folder: str | os.PathLike, comp: str) -> onnx.ModelProto:
    """The component's ModelProto without external data (locations kept)."""
    return onnx.load(str(Path(folder) / SD_COMPONENTS[comp]), load_external_data=False)


def folder_files(folder: str | os.PathLike, replace: dict[str, onnx.ModelProto] | None = None) -> dict[str, bytes]:
    """All regular files of a pipeline folder as bytes, with some components replaced."""
    files = {p: b.bytes() for p, b in read_folder(folder).items()}
    for comp, model in (replace or {}).items():
        files[SD_COMPONENTS[comp]] = model.SerializeToString()
    return files


# ------------------------------------------------------------------------------------------------
# trigger injection (ShadowLogic-style), spliced into a real exported graph
# ------------------------------------------------------------------------------------------------

def _elem_type(model: onnx.ModelProto, name: str) -> int:
    for v in list(model.graph.input) + list(model.graph.output) + list(model.graph.value_info):
        if v.name == name:
            return v.type.tensor_type.elem_type
    raise KeyError(name)


def _np(elem: int):
    return onnx.helper.tensor_dtype_to_np_dtype(elem)


def inject_trigger(model: onnx.ModelProto, *, input_name: str, output_name: str, kind: str = "token",
                   via: str = "where", token: int = 4242, split: bool = False, pattern=None,
                   payload_dim: int | None = None, payload_value: float = 3.0) -> onnx.ModelProto:
    """Splice trigger logic into a copy of `model`: when the trigger is present in `input_name`, the
    graph output `output_name` is replaced by an attacker constant.

    kind:  "token"   - any element of the (integer) input equals `token`;
           "pattern" - input[0, 0, :2, :2] matches `pattern` (a 2x2 pixel/latent patch) within 1e-3.
    via:   "where"   - Where(trigger, payload, clean);
           "mask"    - clean * (1 - m) + payload * m with m = Cast(trigger) (no Where);
           "if"      - If(trigger) then payload else clean;
           "if-body" - the whole trigger and Where live inside the then-branch of an If whose own
                       condition is benign (computed from shapes, always true).
    split: the compared constant never appears whole: Equal(Add(x, c1), c2) with c2 = k1 + k2
           (token), or Sub(x, p1) - p2 compared with 0 (pattern)."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    g = m.graph
    opset = next(o.version for o in m.opset_import if o.domain in ("", "ai.onnx"))
    clean = f"{output_name}__clean"
    for n in g.node:
        n.output[:] = [clean if o == output_name else o for o in n.output]
        n.input[:] = [clean if i == output_name else i for i in n.input]
    out_vi = next(o for o in g.output if o.name == output_name)
    out_elem = out_vi.type.tensor_type.elem_type
    rank = len(out_vi.type.tensor_type.shape.dim)
    in_elem = _elem_type(m, input_name)
    P = "bd_"
    nodes: list[onnx.NodeProto] = []
    inits: list[TensorProto] = []

    def c(name, value, elem):
        inits.append(numpy_helper.from_array(np.asarray(value, dtype=_np(elem)), P + name))
        return P + name

    if kind == "token":
        if split:
            c1 = c("c1", 1000, in_elem)
            nodes.append(helper.make_node("Add", [input_name, c1], [P + "shifted"], name=P + "shift"))
            nodes.append(helper.make_node("Add", [c("k1", token, in_elem), c("k2", 1000, in_elem)], [P + "c2"],
                                          name=P + "c2_sum"))
            nodes.append(helper.make_node("Equal", [P + "shifted", P + "c2"], [P + "hit"], name=P + "eq"))
        else:
            nodes.append(helper.make_node("Equal", [input_name, c("token", token, in_elem)], [P + "hit"], name=P + "eq"))
        nodes.append(helper.make_node("Cast", [P + "hit"], [P + "hitf"], name=P + "hit_f", to=TensorProto.FLOAT))
        nodes.append(helper.make_node("ReduceMax", [P + "hitf"], [P + "any"], name=P + "any", keepdims=0))
        nodes.append(helper.make_node("Greater", [P + "any", c("half", 0.5, TensorProto.FLOAT)], [P + "cond"],
                                      name=P + "cond"))
    else:
        pat = np.asarray(pattern if pattern is not None else [[0.5, -0.25], [0.75, 0.125]], np.float32)
        starts, ends = c("starts", [0, 0, 0, 0], TensorProto.INT64), c("ends", [1, 1, 2, 2], TensorProto.INT64)
        nodes.append(helper.make_node("Slice", [input_name, starts, ends], [P + "patch"], name=P + "patch"))
        if split:
            nodes.append(helper.make_node("Sub", [P + "patch", c("p1", pat * 0.5, in_elem)], [P + "d1"], name=P + "sub1"))
            nodes.append(helper.make_node("Sub", [P + "d1", c("p2", pat * 0.5, in_elem)], [P + "diff"], name=P + "sub2"))
        else:
            nodes.append(helper.make_node("Sub", [P + "patch", c("pattern", pat, in_elem)], [P + "diff"], name=P + "sub"))
        nodes.append(helper.make_node("Abs", [P + "diff"], [P + "adiff"], name=P + "abs"))
        nodes.append(helper.make_node("ReduceMax", [P + "adiff"], [P + "maxdiff"], name=P + "maxdiff", keepdims=0))
        nodes.append(helper.make_node("Less", [P + "maxdiff", c("eps", 1e-3, in_elem)], [P + "cond"], name=P + "cond"))
    pshape = [1] * (rank - 1) + [payload_dim or 1]
    payload = c("payload", np.full(pshape, payload_value), out_elem)

    if via == "where":
        nodes.append(helper.make_node("Where", [P + "cond", payload, clean], [output_name], name=P + "switch"))
    elif via == "mask":
        nodes += [helper.make_node("Cast", [P + "cond"], [P + "m"], name=P + "mask", to=out_elem),
                  helper.make_node("Sub", [c("one", 1.0, out_elem), P + "m"], [P + "keep"], name=P + "keep"),
                  helper.make_node("Mul", [clean, P + "keep"], [P + "kept"], name=P + "kept"),
                  helper.make_node("Mul", [payload, P + "m"], [P + "inj"], name=P + "inject"),
                  helper.make_node("Add", [P + "kept", P + "inj"], [output_name], name=P + "merge")]
    elif via == "if":
        then_g = helper.make_graph([helper.make_node("Shape", [clean], [P + "oshape"], name=P + "oshape"),
                                    helper.make_node("Expand", [payload, P + "oshape"], [P + "then_out"], name=P + "fill")],
                                   "bd_then", [], [helper.make_tensor_value_info(P + "then_out", out_elem, None)])
        else_g = helper.make_graph([helper.make_node("Identity", [clean], [P + "else_out"], name=P + "pass")],
                                   "bd_else", [], [helper.make_tensor_value_info(P + "else_out", out_elem, None)])
        nodes.append(helper.make_node("If", [P + "cond"], [output_name], name=P + "switch",
                                      then_branch=then_g, else_branch=else_g))
    elif via == "if-body":
        inner = nodes + [helper.make_node("Where", [P + "cond", payload, clean], [P + "then_out"], name=P + "switch")]
        then_g = helper.make_graph(inner, "bd_then", [], [helper.make_tensor_value_info(P + "then_out", out_elem, None)])
        else_g = helper.make_graph([helper.make_node("Identity", [clean], [P + "else_out"], name=P + "pass")],
                                   "bd_else", [], [helper.make_tensor_value_info(P + "else_out", out_elem, None)])
        nodes = [helper.make_node("Size", [input_name], [P + "n"], name=P + "size"),
                 helper.make_node("Greater", [P + "n", c("zero", 0, TensorProto.INT64)], [P + "outer"], name=P + "outer"),
                 helper.make_node("If", [P + "outer"], [output_name], name=P + "wrapper",
                                  then_branch=then_g, else_branch=else_g)]
    else:
        raise ValueError(via)
    g.node.extend(nodes)
    g.initializer.extend(inits)
    return m


# ------------------------------------------------------------------------------------------------
# malicious samples per rule family
# ------------------------------------------------------------------------------------------------

def pickle_payload() -> bytes:
    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    return pickle.dumps(Evil(), protocol=2)


ELF_STUB = b"\x7fELF\x02\x01\x01" + b"\x00" * 57 + b"\x90" * 64


def model_with_doc(doc: str = "", metadata: dict | None = None, node_doc: str = "", attr: str | None = None,
                   strings: list[str] | None = None) -> onnx.ModelProto:
    m = benign_mlp(doc=doc)
    if metadata:
        helper.set_model_props(m, metadata)
    if node_doc:
        m.graph.node[0].doc_string = node_doc
    if attr is not None:
        m.graph.node[0].attribute.append(helper.make_attribute("comment", attr))
    if strings is not None:
        t = helper.make_tensor("labels", TensorProto.STRING, [len(strings)], [s.encode() for s in strings])
        m.graph.node.append(helper.make_node("Constant", [], ["labels_out"], name="labels", value=t))
        m.graph.output.append(vi("labels_out", TensorProto.STRING, [len(strings)]))
    return m


def shape_bomb(kind: str) -> onnx.ModelProto:
    """Models whose size-producing op, at batch 1 / the declared shapes, asks for > 2**31 elements."""
    x = vi("x", TensorProto.FLOAT, ["N", 8])
    if kind == "constantofshape":
        # shape = Shape(x) * [1e5, 1e5] -> Concat -> [N*1e5, 8*1e5]... computed from the input's shape
        nodes = [helper.make_node("Shape", ["x"], ["s"], name="shape"),
                 const("big", [100000, 100000], np.int64),
                 helper.make_node("Mul", ["s", "big"], ["s2"], name="scale_shape"),
                 helper.make_node("ConstantOfShape", ["s2"], ["z"], name="bomb",
                                  value=numpy_helper.from_array(np.array([0], np.float32))),
                 helper.make_node("ReduceSum", ["z"], ["y"], name="sum", keepdims=0)]
        return make_model(nodes, [x], [vi("y", TensorProto.FLOAT, [])])
    if kind == "expand":
        nodes = [const("target", [65536, 65536, 8], np.int64),
                 helper.make_node("Expand", ["x", "target"], ["e"], name="bomb"),
                 helper.make_node("ReduceSum", ["e"], ["y"], name="sum", keepdims=0)]
        return make_model(nodes, [x], [vi("y", TensorProto.FLOAT, [])])
    if kind == "tile":
        nodes = [const("reps", [1 << 20, 1 << 16], np.int64),
                 helper.make_node("Tile", ["x", "reps"], ["e"], name="bomb"),
                 helper.make_node("ReduceSum", ["e"], ["y"], name="sum", keepdims=0)]
        return make_model(nodes, [x], [vi("y", TensorProto.FLOAT, [])])
    if kind == "resize":
        img = vi("img", TensorProto.FLOAT, [1, 3, 64, 64])
        nodes = [const("scales", [1.0, 1.0, 10000.0, 10000.0], np.float32),
                 helper.make_node("Resize", ["img", "", "scales"], ["big"], name="bomb", mode="nearest"),
                 helper.make_node("ReduceSum", ["big"], ["y"], name="sum", keepdims=0)]
        return make_model(nodes, [img], [vi("y", TensorProto.FLOAT, [])])
    if kind == "range":
        nodes = [const("start", 0, np.int64), const("limit", 1 << 40, np.int64), const("delta", 1, np.int64),
                 helper.make_node("Range", ["start", "limit", "delta"], ["r"], name="bomb"),
                 helper.make_node("ReduceSum", ["r"], ["y"], name="sum", keepdims=0)]
        return make_model(nodes, [x], [vi("y", TensorProto.INT64, [])])
    if kind == "pad":
        nodes = [const("pads", [0, 0, 1 << 20, 1 << 16], np.int64),
                 helper.make_node("Pad", ["x", "pads"], ["p"], name="bomb"),
                 helper.make_node("ReduceSum", ["p"], ["y"], name="sum", keepdims=0)]
        return make_model(nodes, [x], [vi("y", TensorProto.FLOAT, [])])
    if kind == "declared":
        m = benign_mlp()
        m.graph.value_info.append(vi("h", TensorProto.FLOAT, [1 << 20, 1 << 20]))
        return m
    raise ValueError(kind)


def benign_size_ops() -> onnx.ModelProto:
    """Size-producing ops at sane sizes (a causal mask from shapes, a 2x upsample, padding)."""
    nodes = [helper.make_node("Shape", ["tokens"], ["s"], name="shape"),
             const("i1", [1], np.int64),
             helper.make_node("Gather", ["s", "i1"], ["L"], name="seq_len"),
             helper.make_node("Concat", ["L", "L"], ["LL"], name="mask_shape", axis=0),
             helper.make_node("ConstantOfShape", ["LL"], ["ones"], name="ones",
                              value=numpy_helper.from_array(np.array([1.0], np.float32))),
             helper.make_node("Trilu", ["ones"], ["mask"], name="causal", upper=0),
             const("scales", [1.0, 1.0, 2.0, 2.0], np.float32),
             helper.make_node("Resize", ["img", "", "scales"], ["up"], name="upsample", mode="nearest"),
             const("pads", [0, 0, 1, 1, 0, 0, 1, 1], np.int64),
             helper.make_node("Pad", ["up", "pads"], ["padded"], name="pad"),
             const("start", 0, np.int64), const("delta", 1, np.int64),
             helper.make_node("Squeeze", ["L"], ["Ls"], name="len_scalar"),
             helper.make_node("Range", ["start", "Ls", "delta"], ["pos"], name="positions")]
    return make_model(nodes, [vi("tokens", TensorProto.INT64, [2, 77]), vi("img", TensorProto.FLOAT, [1, 3, 64, 64])],
                      [vi("mask", TensorProto.FLOAT, [77, 77]), vi("padded", TensorProto.FLOAT, [1, 3, 130, 130]),
                       vi("pos", TensorProto.INT64, [77])])


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()
