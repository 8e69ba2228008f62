"""The committed fixture pipelines: locked, small, SD 1.5-shaped, and runnable end to end in onnxruntime."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import numpy_helper
from onnx.external_data_helper import uses_external_data
from transformers import CLIPTokenizer

from conftest import (BATCH, DYNAMO_MODEL_DIR, EMBEDDED_MODEL_DIR, EOS_ID, INPUT_IDS_DTYPE, LATENT_CHANNELS,
                      LATENT_HW, LOCKFILE, MAX_TOKENS, TIMESTEP_DTYPE, TINY_HIDDEN, VAE_SCALE, VAE_SCALING_FACTOR,
                      timestep_feed)

MAX_FILE_BYTES = 5 * 1024 * 1024
EXPECTED_FILES = {
    "README.md", "model_index.json", "scheduler/scheduler_config.json", "text_encoder/model.onnx",
    "unet/model.onnx", "unet/weights.pb", "vae_decoder/model.onnx", "tokenizer/merges.txt",
    "tokenizer/vocab.json", "tokenizer/special_tokens_map.json", "tokenizer/tokenizer_config.json",
}
ORT_TYPE = {np.float32: "tensor(float)", np.int32: "tensor(int32)", np.int64: "tensor(int64)"}


def _session(model_dir: Path, component: str) -> ort.InferenceSession:
    # onnxruntime resolves unet/weights.pb next to the model file
    return ort.InferenceSession(str(model_dir / component / "model.onnx"), providers=["CPUExecutionProvider"])


@pytest.fixture(scope="module")
def sessions(fixture_model_dir: Path) -> dict[str, ort.InferenceSession]:
    return {c: _session(fixture_model_dir, c) for c in ("text_encoder", "unet", "vae_decoder")}


def _files(model_dir: Path) -> dict[str, Path]:
    return {p.relative_to(model_dir).as_posix(): p for p in model_dir.rglob("*") if p.is_file()}


# ---- lockfile, layout, sizes -----------------------------------------------------------------------

def test_lockfile_matches_every_file(fixture_model_dir: Path) -> None:
    lock = json.loads((fixture_model_dir / LOCKFILE).read_text())
    assert lock["format"] == 1 and lock["revision"] is None and lock["repo"].startswith("sdsecure/")
    files = _files(fixture_model_dir)
    del files[LOCKFILE]
    assert set(lock["files"]) == set(files) == EXPECTED_FILES
    for rel, path in files.items():
        data = path.read_bytes()
        assert lock["files"][rel] == {"sha256": hashlib.sha256(data).hexdigest(), "size": len(data)}, rel


def test_files_are_small(fixture_model_dir: Path) -> None:
    for rel, path in _files(fixture_model_dir).items():
        assert path.stat().st_size <= MAX_FILE_BYTES, rel


def test_model_index_and_scheduler(fixture_model_dir: Path) -> None:
    index = json.loads((fixture_model_dir / "model_index.json").read_text())
    assert index["_class_name"] == "OnnxStableDiffusionPipeline"
    for c in ("text_encoder", "unet", "vae_decoder"):
        assert index[c] == ["diffusers", "OnnxRuntimeModel"]
    assert index["tokenizer"] == ["transformers", "CLIPTokenizer"]
    assert index["scheduler"] == ["diffusers", "PNDMScheduler"]
    sched = json.loads((fixture_model_dir / "scheduler" / "scheduler_config.json").read_text())
    assert sched["_class_name"] == "PNDMScheduler"
    assert (sched["beta_start"], sched["beta_end"], sched["beta_schedule"]) == (0.00085, 0.012, "scaled_linear")
    assert sched["skip_prk_steps"] is True and sched["steps_offset"] == 1 and sched["set_alpha_to_one"] is False


def test_readme_says_random_weights(fixture_model_dir: Path) -> None:
    text = (fixture_model_dir / "README.md").read_text()
    assert "random" in text and "noise" in text and "tools/export_tiny_sd.py" in text


@pytest.mark.parametrize("model_dir, opset", [(EMBEDDED_MODEL_DIR, 14), (DYNAMO_MODEL_DIR, 20)], ids=["legacy", "dynamo"])
def test_opsets(model_dir: Path, opset: int) -> None:
    for c in ("text_encoder", "unet", "vae_decoder"):
        m = onnx.load(str(model_dir / c / "model.onnx"), load_external_data=False)
        assert [(o.domain, o.version) for o in m.opset_import if o.domain in ("", "ai.onnx")] == [("", opset)], c


def test_unet_weights_are_external(fixture_model_dir: Path) -> None:
    m = onnx.load(str(fixture_model_dir / "unet" / "model.onnx"), load_external_data=False)
    external = [t for t in m.graph.initializer if uses_external_data(t)]
    assert len(external) > len(m.graph.initializer) / 2
    assert {e.value for t in external for e in t.external_data if e.key == "location"} == {"weights.pb"}
    ends = [int(e.value) for t in external for e in t.external_data if e.key in ("offset", "length")]
    size = (fixture_model_dir / "unet" / "weights.pb").stat().st_size
    assert max(ends) <= size  # offsets and lengths stay inside the data file
    for c in ("text_encoder", "vae_decoder"):
        other = onnx.load(str(fixture_model_dir / c / "model.onnx"), load_external_data=False)
        assert not any(uses_external_data(t) for t in other.graph.initializer), c


@pytest.mark.parametrize("component", ["text_encoder", "unet", "vae_decoder"])
def test_weights_are_not_fresh_init_constants(fixture_model_dir: Path, component: str) -> None:
    """Norm scales of 1 and biases of 0 would hide an importer that swaps or drops them (onnxruntime and
    the engine would still agree): the exporter perturbs them. InstanceNormalization's own scale/bias
    (GroupNorm's export pattern; the affine part is the Mul/Add after it) are legitimately 1 and 0."""
    m = onnx.load(str(fixture_model_dir / component / "model.onnx"))  # external data from the folder
    instance_norm = {i for n in m.graph.node if n.op_type == "InstanceNormalization" for i in n.input[1:]}
    weights = [(t.name, numpy_helper.to_array(t)) for t in m.graph.initializer if t.name not in instance_norm]
    floats = [(name, a) for name, a in weights if a.dtype == np.float32 and a.size > 1]
    assert len(floats) > 10
    constant = [name for name, a in floats if np.all(a == a.flat[0])]
    assert constant == []


# ---- I/O contract ----------------------------------------------------------------------------------

def test_io_names_and_types(sessions: dict[str, ort.InferenceSession]) -> None:
    def io(sess):
        return ([(i.name, i.type) for i in sess.get_inputs()], [(o.name, o.type) for o in sess.get_outputs()])

    assert io(sessions["text_encoder"]) == ([("input_ids", ORT_TYPE[INPUT_IDS_DTYPE])],
                                           [("last_hidden_state", "tensor(float)"), ("pooler_output", "tensor(float)")])
    assert io(sessions["unet"]) == ([("sample", "tensor(float)"), ("timestep", ORT_TYPE[TIMESTEP_DTYPE]),
                                    ("encoder_hidden_states", "tensor(float)")], [("out_sample", "tensor(float)")])
    assert io(sessions["vae_decoder"]) == ([("latent_sample", "tensor(float)")], [("sample", "tensor(float)")])
    for sess in sessions.values():  # batch is a symbol, not a fixed size
        assert all(isinstance(i.shape[0], str) for i in sess.get_inputs())


def _ids(batch: int = BATCH) -> np.ndarray:
    ids = np.full((batch, MAX_TOKENS), EOS_ID, dtype=INPUT_IDS_DTYPE)
    ids[:, 0] = 49406
    ids[-1, 1:6] = [320, 1125, 539, 320, 2368]  # "a photo of a cat"; row 0 is the empty prompt
    return ids


def test_text_encoder(sessions: dict[str, ort.InferenceSession]) -> None:
    hidden, pooled = sessions["text_encoder"].run(None, {"input_ids": _ids()})
    assert hidden.shape == (BATCH, MAX_TOKENS, TINY_HIDDEN) and hidden.dtype == np.float32
    assert pooled.shape == (BATCH, TINY_HIDDEN) and pooled.dtype == np.float32
    assert np.isfinite(hidden).all()
    # CLIP pools at the first EOS (ArgMax over the ids, as SD 1.5's text encoder config has eos_token_id 2)
    np.testing.assert_array_equal(pooled[0], hidden[0, 1])
    np.testing.assert_array_equal(pooled[1], hidden[1, 6])
    assert not np.allclose(hidden[0], hidden[1])  # the prompt changes the embedding


def test_unet_timestep_as_fed(sessions: dict[str, ort.InferenceSession]) -> None:
    rng = np.random.default_rng(0)
    sample = rng.standard_normal((BATCH, LATENT_CHANNELS, LATENT_HW, LATENT_HW), dtype=np.float32)
    context = rng.standard_normal((BATCH, MAX_TOKENS, TINY_HIDDEN), dtype=np.float32)
    unet = sessions["unet"]
    (out,) = unet.run(None, {"sample": sample, "timestep": timestep_feed(981), "encoder_hidden_states": context})
    assert out.shape == sample.shape and out.dtype == np.float32 and np.isfinite(out).all()
    # one timestep per batch row gives the same result
    (per_row,) = unet.run(None, {"sample": sample, "timestep": np.full((BATCH,), 981, TIMESTEP_DTYPE),
                                 "encoder_hidden_states": context})
    np.testing.assert_allclose(per_row, out, rtol=0, atol=1e-5)
    # and the timestep matters
    (later,) = unet.run(None, {"sample": sample, "timestep": timestep_feed(1), "encoder_hidden_states": context})
    assert not np.allclose(later, out, atol=1e-4)


@pytest.mark.parametrize("hw", [LATENT_HW, 24])
def test_vae_decoder_upsamples_8x(sessions: dict[str, ort.InferenceSession], hw: int) -> None:
    latents = np.random.default_rng(1).standard_normal((BATCH, LATENT_CHANNELS, hw, hw), dtype=np.float32)
    (image,) = sessions["vae_decoder"].run(None, {"latent_sample": latents})
    assert image.shape == (BATCH, 3, VAE_SCALE * hw, VAE_SCALE * hw) and image.dtype == np.float32
    assert np.isfinite(image).all()


# ---- end to end ------------------------------------------------------------------------------------

def _generate(model_dir: Path, prompt: str, steps: int = 3, guidance: float = 7.5, seed: int = 0) -> np.ndarray:
    """A minimal SD 1.5 loop (DDIM, eta 0) over the three graphs: tokenizer -> text encoder (uncond +
    cond, batch 2) -> UNet with classifier-free guidance -> 1/0.18215 scaling -> VAE decoder -> uint8."""
    te, unet, vae = (_session(model_dir, c) for c in ("text_encoder", "unet", "vae_decoder"))
    tok = CLIPTokenizer.from_pretrained(str(model_dir / "tokenizer"))
    ids = tok(["", prompt], padding="max_length", max_length=MAX_TOKENS, truncation=True,
              return_tensors="np").input_ids.astype(INPUT_IDS_DTYPE)
    context = te.run(["last_hidden_state"], {"input_ids": ids})[0]

    cfg = json.loads((model_dir / "scheduler" / "scheduler_config.json").read_text())
    betas = np.linspace(cfg["beta_start"] ** 0.5, cfg["beta_end"] ** 0.5, cfg["num_train_timesteps"]) ** 2
    alphas = np.cumprod(1.0 - betas)
    ratio = cfg["num_train_timesteps"] // steps
    timesteps = (np.arange(steps) * ratio)[::-1] + cfg["steps_offset"]

    latents = np.random.default_rng(seed).standard_normal((1, LATENT_CHANNELS, LATENT_HW, LATENT_HW)).astype(np.float32)
    for t in timesteps:
        (eps,) = unet.run(None, {"sample": np.concatenate([latents, latents]), "timestep": timestep_feed(t),
                                 "encoder_hidden_states": context})
        eps = eps[:1] + guidance * (eps[1:] - eps[:1])
        a_t = alphas[t]
        a_prev = alphas[t - ratio] if t - ratio >= 0 else alphas[0]
        x0 = (latents - np.sqrt(1 - a_t) * eps) / np.sqrt(a_t)
        latents = (np.sqrt(a_prev) * x0 + np.sqrt(1 - a_prev) * eps).astype(np.float32)
    (image,) = vae.run(None, {"latent_sample": latents / np.float32(VAE_SCALING_FACTOR)})
    return (np.clip(image[0].transpose(1, 2, 0) / 2 + 0.5, 0, 1) * 255).round().astype(np.uint8)


def test_end_to_end(fixture_model_dir: Path) -> None:
    image = _generate(fixture_model_dir, "a photo of an astronaut riding a horse on mars")
    assert image.shape == (VAE_SCALE * LATENT_HW, VAE_SCALE * LATENT_HW, 3) and image.dtype == np.uint8
    assert image.std() > 0  # noise, but not a constant image
    other = _generate(fixture_model_dir, "a dog")
    assert np.abs(other.astype(int) - image).max() > 10  # the prompt reaches the image


def test_both_exports_compute_the_same_function() -> None:
    """Same classes and seeded weights, two exporters: the images agree (a broken export would not)."""
    a = _generate(EMBEDDED_MODEL_DIR, "a photo of a cat", steps=2).astype(int)
    b = _generate(DYNAMO_MODEL_DIR, "a photo of a cat", steps=2).astype(int)
    assert np.abs(a - b).max() <= 1
