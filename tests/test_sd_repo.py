"""The SD repo as a unit: both fixture exports pass; a small synthetic SD repo (built here with
onnx.helper) is bent in each way the rules look for."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from conftest import FIXTURE_MODEL_DIRS
from sdsecure.gate.blob import Blob
from sdsecure.gate.report import Severity
from sdsecure.gate.rules import _REPO_RULES, RULES, ScanContext
from sdsecure.gate.rules import sd_repo
from sdsecure.gate.rules.sd_repo import sd_repo_rule

SCHEDULER = {"_class_name": "PNDMScheduler", "beta_end": 0.012, "beta_schedule": "scaled_linear",
             "beta_start": 0.00085, "num_train_timesteps": 1000, "steps_offset": 1}
MODEL_INDEX = {"_class_name": "OnnxStableDiffusionPipeline", "scheduler": ["diffusers", "PNDMScheduler"],
               "text_encoder": ["diffusers", "OnnxRuntimeModel"], "tokenizer": ["transformers", "CLIPTokenizer"],
               "unet": ["diffusers", "OnnxRuntimeModel"], "vae_decoder": ["diffusers", "OnnxRuntimeModel"],
               "safety_checker": [None, None], "feature_extractor": [None, None]}


def _model(nodes, inputs, outputs, inits) -> bytes:
    graph = helper.make_graph(nodes, "g", inputs, outputs, initializer=inits)
    m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 14)], ir_version=8)
    onnx.checker.check_model(m, full_check=True)
    return m.SerializeToString()


def _w(name: str, *shape: int) -> TensorProto:
    rng = np.random.default_rng(len(name))
    return numpy_helper.from_array(rng.standard_normal(shape).astype(np.float32) * 0.1, name)


def text_encoder(*, rows: int = 100, hidden: int = 8, ids_type: int = TensorProto.INT32,
                 out_name: str = "last_hidden_state", declare_hidden: bool = True) -> bytes:
    d = hidden if declare_hidden else "hidden"
    ids = "input_ids"
    nodes = []
    if ids_type not in (TensorProto.INT32, TensorProto.INT64):
        nodes.append(helper.make_node("Cast", ["input_ids"], ["ids64"], to=TensorProto.INT64, name="cast_ids"))
        ids = "ids64"
    nodes += [helper.make_node("Gather", ["token_embedding.weight", ids], ["emb"], name="token_embedding/Gather"),
             helper.make_node("Identity", ["emb"], [out_name], name="final"),
             helper.make_node("ReduceMean", ["emb"], ["pooler_output"], axes=[1], keepdims=0, name="pool")]
    return _model(nodes, [helper.make_tensor_value_info("input_ids", ids_type, ["batch", 77])],
                  [helper.make_tensor_value_info(out_name, TensorProto.FLOAT, ["batch", 77, d]),
                   helper.make_tensor_value_info("pooler_output", TensorProto.FLOAT, ["batch", d])],
                  [_w("token_embedding.weight", rows, hidden)])


def unet(*, ctx_dim: int = 8, declare_ctx: bool = True, weight_style: str = "plain",
         extra_input: bool = False, sample_rank: int = 4) -> bytes:
    inits = [numpy_helper.from_array(np.array([-1, 1, 1, 1], np.int64), "shape4")]
    if weight_style == "plain":                       # legacy export: MatMul(x, W[in, out])
        inits.append(_w("to_k.weight", ctx_dim, 6))
        proj = [helper.make_node("MatMul", ["encoder_hidden_states", "to_k.weight"], ["k"], name="attn2/to_k/MatMul")]
    elif weight_style == "transpose":                 # dynamo export: MatMul(x, Transpose(W[out, in]))
        inits.append(_w("to_k.weight", 6, ctx_dim))
        proj = [helper.make_node("Transpose", ["to_k.weight"], ["wt"], perm=[1, 0], name="attn2/to_k/T"),
                helper.make_node("MatMul", ["encoder_hidden_states", "wt"], ["k"], name="attn2/to_k/MatMul")]
    else:                                             # Gemm on a flattened context, transB=1
        inits += [_w("to_k.weight", 6, ctx_dim),
                  numpy_helper.from_array(np.array([-1, ctx_dim], np.int64), "flat")]
        proj = [helper.make_node("Reshape", ["encoder_hidden_states", "flat"], ["ehs2"], name="attn2/flatten"),
                helper.make_node("Gemm", ["ehs2", "to_k.weight"], ["k"], transB=1, name="attn2/to_k/Gemm")]
    k_axes = [1, 2] if weight_style != "gemm" else [0, 1]
    nodes = proj + [
        helper.make_node("ReduceMean", ["k"], ["m"], axes=k_axes, keepdims=1, name="attn2/mean"),
        helper.make_node("ReduceMean", ["m"], ["m1"], axes=[0], keepdims=0, name="attn2/mean2")
        if weight_style == "gemm" else helper.make_node("Identity", ["m"], ["m1"], name="attn2/id"),
        helper.make_node("Reshape", ["m1", "shape4"], ["m4"], name="attn2/reshape"),
        helper.make_node("Reshape", ["timestep", "shape4"], ["t4"], name="time/reshape"),
        helper.make_node("Add", ["sample", "m4"], ["s1"], name="add1"),
        helper.make_node("Add", ["s1", "t4"], ["out_sample"], name="add2"),
    ]
    sample_shape = ["batch", 4, "h", "w"][:sample_rank]
    inputs = [helper.make_tensor_value_info("sample", TensorProto.FLOAT, sample_shape),
              helper.make_tensor_value_info("timestep", TensorProto.FLOAT, ["batch"]),
              helper.make_tensor_value_info("encoder_hidden_states", TensorProto.FLOAT,
                                            ["batch", 77, ctx_dim if declare_ctx else "ctx"])]
    if extra_input:
        inputs.append(helper.make_tensor_value_info("trigger", TensorProto.FLOAT, [1]))
        nodes[-1] = helper.make_node("Add", ["s1", "t4"], ["s2"], name="add2")
        nodes.append(helper.make_node("Add", ["s2", "trigger"], ["out_sample"], name="add3"))
    out_shape = ["batch", 4, "h", "w"] if sample_rank == 4 else [None] * 4   # broadcasting: rank 4
    return _model(nodes, inputs, [helper.make_tensor_value_info("out_sample", TensorProto.FLOAT, out_shape)],
                  inits)


def vae_decoder(*, out_channels: int = 3) -> bytes:
    nodes = [helper.make_node("Conv", ["latent_sample", "conv.weight"], ["c"], name="conv_out"),
             helper.make_node("DepthToSpace", ["c"], ["sample"], blocksize=8, name="upsample")]
    return _model(nodes, [helper.make_tensor_value_info("latent_sample", TensorProto.FLOAT, ["batch", 4, "h", "w"])],
                  [helper.make_tensor_value_info("sample", TensorProto.FLOAT, ["batch", out_channels, "H", "W"])],
                  [_w("conv.weight", out_channels * 64, 4, 1, 1)])


def sd_files(*, vocab: int = 100, te: bytes | None = None, un: bytes | None = None,
             vae: bytes | None = None) -> dict[str, bytes]:
    """A complete, small SD 1.5-shaped repo: text hidden 8 = UNet context 8, vocab 100 = 100 rows."""
    return {
        "model_index.json": json.dumps(MODEL_INDEX).encode(),
        "scheduler/scheduler_config.json": json.dumps(SCHEDULER).encode(),
        "tokenizer/vocab.json": json.dumps({f"t{i}": i for i in range(vocab)}).encode(),
        "tokenizer/merges.txt": b"#version: 0.2\n",
        "tokenizer/tokenizer_config.json": json.dumps({"tokenizer_class": "CLIPTokenizer"}).encode(),
        "text_encoder/model.onnx": te if te is not None else text_encoder(),
        "unet/model.onnx": un if un is not None else unet(),
        "vae_decoder/model.onnx": vae if vae is not None else vae_decoder(),
    }


def write_sd_repo(root: Path, **kw) -> Path:
    for rel, data in sd_files(**kw).items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)
    return root


def check(files: dict[str, bytes], is_sd: bool = True):
    ctx = ScanContext("x", {p: Blob.from_bytes(b) for p, b in files.items()}, is_sd)
    return sd_repo_rule(ctx)


def hits(found, rule: str) -> list:
    return [f for f in found if f.rule == rule]


# --- benign -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("fixture", sorted(FIXTURE_MODEL_DIRS))
def test_fixture_pipelines_pass(fixture):
    root: Path = FIXTURE_MODEL_DIRS[fixture]
    files = {p.relative_to(root).as_posix(): p.read_bytes() for p in root.rglob("*") if p.is_file()}
    ctx = ScanContext(fixture, {p: Blob.from_bytes(b) for p, b in files.items()}, True)
    assert sd_repo_rule(ctx) == []
    # and the checks really ran: the embedding table and the UNet's cross-attention were found
    text = sd_repo._Graph(ctx.onnx(sd_repo.TEXT))
    assert sd_repo._token_embedding_rows(text)[:2] == (49408, 16)
    assert set(sd_repo._unet_context_dims(sd_repo._Graph(ctx.onnx(sd_repo.UNET)))) == {16}


def test_synthetic_repo_passes():
    assert check(sd_files()) == []


@pytest.mark.parametrize("style", ["transpose", "gemm"])
def test_other_weight_layouts_are_understood(style):
    assert check(sd_files(un=unet(weight_style=style, declare_ctx=False))) == []
    found = check(sd_files(un=unet(ctx_dim=12, weight_style=style, declare_ctx=False)))
    assert [f.evidence["unet_width"] for f in hits(found, "SD-CROSS-ATTN-DIM")] == [12]


def test_not_an_sd_repo_is_not_checked():
    files = sd_files()
    del files["unet/model.onnx"]
    assert check(files, is_sd=False) == []


# --- missing components ------------------------------------------------------------------------------

@pytest.mark.parametrize("missing", sd_repo.REQUIRED)
def test_missing_component_is_high(missing):
    files = sd_files()
    del files[missing]
    found = hits(check(files), "SD-MISSING-COMPONENT")
    assert [(f.file, f.severity) for f in found] == [(missing, Severity.HIGH)]


# --- interface contract ---------------------------------------------------------------------------------

def test_wrong_input_ids_dtype():
    found = hits(check(sd_files(te=text_encoder(ids_type=TensorProto.FLOAT))), "SD-IO-CONTRACT")
    assert [(f.file, f.where, f.severity) for f in found] == [
        ("text_encoder/model.onnx", "input input_ids", Severity.HIGH)]
    assert found[0].evidence["dtype"] == "float"


def test_renamed_output():
    found = hits(check(sd_files(te=text_encoder(out_name="hidden"))), "SD-IO-CONTRACT")
    assert any("missing output 'last_hidden_state'" in f.message and f.severity == Severity.HIGH for f in found)
    assert any(f.evidence.get("unexpected") == ["hidden"] and f.severity == Severity.LOW for f in found)


def test_extra_unet_input_is_a_possible_trigger_channel():
    found = hits(check(sd_files(un=unet(extra_input=True))), "SD-IO-CONTRACT")
    assert [(f.file, f.severity, f.evidence["unexpected"]) for f in found] == [
        ("unet/model.onnx", Severity.HIGH, ["trigger"])]


def test_wrong_vae_output_channels():
    found = hits(check(sd_files(vae=vae_decoder(out_channels=4))), "SD-IO-CONTRACT")
    assert [(f.where, f.evidence["shape"][1]) for f in found] == [("output sample", 4)]


def test_wrong_unet_rank():
    found = hits(check(sd_files(un=unet(sample_rank=3))), "SD-IO-CONTRACT")
    assert [(f.where, f.evidence["shape"]) for f in found] == [("input sample", ["batch", 4, "h"])]


# --- cross-component consistency ---------------------------------------------------------------------------

def test_tokenizer_larger_than_embedding_is_high():
    found = hits(check(sd_files(vocab=120)), "SD-VOCAB-MISMATCH")
    assert [(f.severity, f.evidence["tokenizer_vocab"], f.evidence["embedding_rows"]) for f in found] == [
        (Severity.HIGH, 120, 100)]
    assert found[0].where == "main/token_embedding/Gather (Gather)"


def test_tokenizer_smaller_than_embedding_is_medium():
    found = hits(check(sd_files(vocab=90)), "SD-VOCAB-MISMATCH")
    assert [f.severity for f in found] == [Severity.MEDIUM]


def test_added_tokens_count_in_the_vocabulary():
    files = sd_files(vocab=99)
    files["tokenizer/tokenizer_config.json"] = json.dumps(
        {"tokenizer_class": "CLIPTokenizer", "added_tokens_decoder": {"99": {"content": "<x>"}}}).encode()
    assert check(files) == []


def test_cross_attention_width_mismatch_is_high_and_names_the_node():
    found = hits(check(sd_files(un=unet(ctx_dim=12))), "SD-CROSS-ATTN-DIM")
    assert len(found) == 1 and found[0].severity == Severity.HIGH
    assert found[0].evidence["unet_width"] == 12 and found[0].evidence["text_hidden"] == 8
    assert "attn2/to_k/MatMul" in found[0].evidence["nodes"]


def test_undeclared_widths_fall_back_to_weights():
    te = text_encoder(declare_hidden=False)
    assert check(sd_files(te=te, un=unet(declare_ctx=False))) == []
    found = check(sd_files(te=te, un=unet(ctx_dim=4, declare_ctx=False)))
    assert [f.evidence["unet_width"] for f in hits(found, "SD-CROSS-ATTN-DIM")] == [4]


def test_unrecognisable_text_encoder_is_low_unchecked():
    nodes = [helper.make_node("Cast", ["input_ids"], ["f"], to=TensorProto.FLOAT, name="cast"),
             helper.make_node("Unsqueeze", ["f", "ax"], ["last_hidden_state"], name="unsq")]
    te = _model(nodes, [helper.make_tensor_value_info("input_ids", TensorProto.INT32, ["b", 77])],
                [helper.make_tensor_value_info("last_hidden_state", TensorProto.FLOAT, ["b", 77, "d"])],
                [numpy_helper.from_array(np.array([2], np.int64), "ax")])
    found = check(sd_files(te=te))
    assert {(f.rule, f.severity) for f in found} == {("SD-UNCHECKED", Severity.LOW)}


def test_unparseable_component_is_left_to_the_parse_rule():
    found = check(sd_files(un=b"\x00garbage"))
    assert hits(found, "SD-IO-CONTRACT") == [] and hits(found, "SD-MISSING-COMPONENT") == []


def test_rule_registered_and_declared():
    assert sd_repo_rule in _REPO_RULES
    for rid in ("SD-MISSING-COMPONENT", "SD-IO-CONTRACT", "SD-VOCAB-MISMATCH", "SD-CROSS-ATTN-DIM", "SD-UNCHECKED"):
        assert len(RULES[rid].why) > 60 and RULES[rid].fix
