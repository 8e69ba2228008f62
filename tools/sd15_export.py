"""Shared code of export_tiny_sd.py and export_full_sd.py: build SD 1.5-shaped components with the real
classes (transformers CLIPTextModel, diffusers UNet2DConditionModel / AutoencoderKL) and random, seeded
weights, export them to ONNX, and write the Hub layout of the public SD 1.5 ONNX repos plus a lockfile.

Needs the `fixtures` extra (torch, diffusers, onnxscript, open-clip-torch). Nothing here is imported by
the package or the tests.
"""

from __future__ import annotations

import copy
import gc
import hashlib
import json
import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import onnx
from onnx.external_data_helper import set_external_data

sys.path.insert(0, str(Path(__file__).resolve().parent))
import derive_clip_tokenizer  # noqa: E402
from op_histogram import histogram as op_histogram  # noqa: E402

LOCKFILE = "sdsecure.lock.json"
EXPORTERS = ("legacy", "dynamo")
LEGACY_OPSET = 14   # what the public SD 1.5 ONNX repos (diffusers' conversion script) use
DYNAMO_OPSET = 20   # torch.onnx.export(dynamo=True) default

# model_index.json of the public SD 1.5 ONNX repos; components this layout does not ship are null,
# as diffusers writes optional components that are absent.
MODEL_INDEX = {
    "_class_name": "OnnxStableDiffusionPipeline",
    "_diffusers_version": "0.42.1",
    "feature_extractor": [None, None],
    "requires_safety_checker": False,
    "safety_checker": [None, None],
    "scheduler": ["diffusers", "PNDMScheduler"],
    "text_encoder": ["diffusers", "OnnxRuntimeModel"],
    "tokenizer": ["transformers", "CLIPTokenizer"],
    "unet": ["diffusers", "OnnxRuntimeModel"],
    "vae_decoder": ["diffusers", "OnnxRuntimeModel"],
    "vae_encoder": [None, None],
}

# SD 1.5's scheduler/scheduler_config.json (see shared/reference/schedulers/README.md, copied in tests/data/schedulers/)
SCHEDULER_CONFIG = {
    "_class_name": "PNDMScheduler",
    "_diffusers_version": "0.6.0",
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "clip_sample": False,
    "num_train_timesteps": 1000,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "trained_betas": None,
}

# SD 1.5's text_encoder/config.json, less the sizes (eos_token_id 2 keeps the ArgMax(input_ids) pooling)
CLIP_TEXT_BASE = dict(vocab_size=49408, max_position_embeddings=77, hidden_act="quick_gelu", layer_norm_eps=1e-5,
                      bos_token_id=0, eos_token_id=2, pad_token_id=1, attention_dropout=0.0, dropout=0.0,
                      initializer_factor=1.0, initializer_range=0.02)

# SD 1.5's unet/config.json, less the sizes
UNET_BASE = dict(in_channels=4, out_channels=4, sample_size=64, act_fn="silu", center_input_sample=False,
                 down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
                 mid_block_type="UNetMidBlock2DCrossAttn",
                 up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
                 downsample_padding=1, flip_sin_to_cos=True, freq_shift=0, mid_block_scale_factor=1, norm_eps=1e-5)

# SD 1.5's vae/config.json, less the sizes
VAE_BASE = dict(in_channels=3, out_channels=3, latent_channels=4, act_fn="silu", sample_size=512,
                down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4)


@dataclass
class SDConfig:
    text: dict[str, Any]
    unet: dict[str, Any]
    vae: dict[str, Any]
    seed: int = 0
    latent_hw: int = 16         # spatial size of the example inputs used for tracing
    unet_external_threshold: int = 32   # float initializers of >= this many bytes go to unet/weights.pb
    extra: dict[str, Any] = field(default_factory=dict)


TINY = SDConfig(
    text=dict(hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32, projection_dim=16),
    unet=dict(block_out_channels=(8, 16, 16, 16), layers_per_block=1, norm_num_groups=4, attention_head_dim=2,
              cross_attention_dim=16),
    vae=dict(block_out_channels=(8, 8, 16, 16), layers_per_block=1, norm_num_groups=4),
)

FULL = SDConfig(
    text=dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072, projection_dim=768),
    unet=dict(block_out_channels=(320, 640, 1280, 1280), layers_per_block=2, norm_num_groups=32, attention_head_dim=8,
              cross_attention_dim=768),
    vae=dict(block_out_channels=(128, 256, 512, 512), layers_per_block=2, norm_num_groups=32),
    unet_external_threshold=1024,  # about onnx's default, which diffusers' conversion script uses
)


# ---------------------------------------------------------------------------------------------------
# components (torch)

COMPONENTS = ("text_encoder", "unet", "vae_decoder")


def build_component(cfg: SDConfig, name: str):
    """The torch module of one component with seeded random weights (seed + its index, so each component
    is the same whatever else is built), wrapped so its forward has the SD 1.5 ONNX signature and returns
    its outputs in the ONNX output order."""
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    class TextEncoder(torch.nn.Module):
        def __init__(self, model):
            super().__init__()
            self.model = model

        def forward(self, input_ids):
            out = self.model(input_ids=input_ids, return_dict=True)
            return out.last_hidden_state, out.pooler_output

    class UNet(torch.nn.Module):
        def __init__(self, model):
            super().__init__()
            self.model = model

        def forward(self, sample, timestep, encoder_hidden_states):
            return self.model(sample, timestep, encoder_hidden_states, return_dict=False)[0]

    class VaeDecoder(torch.nn.Module):
        """AutoencoderKL.decode (post_quant_conv + decoder) as in the public exports; no 1/0.18215 scaling."""

        def __init__(self, vae):
            super().__init__()
            self.post_quant_conv = vae.post_quant_conv
            self.decoder = vae.decoder

        def forward(self, latent_sample):
            return self.decoder(self.post_quant_conv(latent_sample))

    torch.manual_seed(cfg.seed + COMPONENTS.index(name))
    if name == "text_encoder":
        text_cfg = CLIPTextConfig(**CLIP_TEXT_BASE, **cfg.text)
        text_cfg._attn_implementation = "eager"  # MatMul/Softmax attention, as in the public exports
        module = TextEncoder(CLIPTextModel(text_cfg))
    elif name == "unet":
        module = UNet(UNet2DConditionModel(**UNET_BASE, **cfg.unet))
    else:
        module = VaeDecoder(AutoencoderKL(**VAE_BASE, **cfg.vae))
    perturb_constant_parameters(module, cfg.seed + 100 + COMPONENTS.index(name))
    return module.eval()


def perturb_constant_parameters(module, seed: int, scale: float = 0.1) -> None:
    """Fresh initialisation leaves norm scales at 1 and many biases at 0. Trained weights are not like
    that, and a graph importer that swapped or dropped a norm's scale and bias would still agree with
    onnxruntime on such weights; the legacy exporter also merges the identical tensors into one
    initializer read through Identity nodes. Add seeded noise to every parameter whose values are all
    equal."""
    import torch

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in sorted(module.named_parameters()):
            flat = p.detach().reshape(-1)
            if bool(torch.all(flat == flat[0])):
                p.add_(scale * torch.randn(p.shape, generator=g, dtype=p.dtype))


def example_inputs(cfg: SDConfig):
    """Batch-2 example inputs, as the pipeline feeds them with classifier-free guidance."""
    import torch

    g = torch.Generator().manual_seed(1234)
    b, hw = 2, cfg.latent_hw  # >= 16: the dynamo UNet export needs >= 2x2 after three downsamplings
    ids = torch.randint(0, 49406, (b, 77), generator=g, dtype=torch.int64)
    ids[:, 0] = 49406
    ids[:, 10:] = 49407
    return {
        "text_encoder": (ids.to(torch.int32),),
        "unet": (torch.randn(b, 4, hw, hw, generator=g), torch.tensor([981.0] * b),
                 torch.randn(b, 77, cfg.unet["cross_attention_dim"], generator=g)),
        "vae_decoder": (torch.randn(b, 4, hw, hw, generator=g),),
    }


IO_NAMES = {
    "text_encoder": (["input_ids"], ["last_hidden_state", "pooler_output"]),
    "unet": (["sample", "timestep", "encoder_hidden_states"], ["out_sample"]),
    "vae_decoder": (["latent_sample"], ["sample"]),
}

# dynamic axes as in diffusers' convert_stable_diffusion_checkpoint_to_onnx.py
LEGACY_DYNAMIC_AXES = {
    "text_encoder": {"input_ids": {0: "batch", 1: "sequence"}},
    "unet": {"sample": {0: "batch", 1: "channels", 2: "height", 3: "width"}, "timestep": {0: "batch"},
             "encoder_hidden_states": {0: "batch", 1: "sequence"}},
    "vae_decoder": {"latent_sample": {0: "batch", 1: "channels", 2: "height", 3: "width"}},
}
# Output axes are named too: left to itself the legacy exporter names them after the producing node and
# gives the decoder output's batch and height the same symbol ("Convsample_dim_0").
LEGACY_OUTPUT_AXES = {
    "text_encoder": {"last_hidden_state": {0: "batch", 1: "sequence"}, "pooler_output": {0: "batch"}},
    "unet": {"out_sample": {0: "batch", 2: "height", 3: "width"}},
    "vae_decoder": {"sample": {0: "batch", 2: "image_height", 3: "image_width"}},
}


def dynamo_dynamic_shapes(name: str):
    """torch.export dims: batch dynamic everywhere, spatial dims dynamic in multiples of 8 for the UNet
    (three downsamplings) and free for the decoder. Channels and the 77 tokens stay static (torch.export
    refuses a dynamic channel axis; the position embedding fixes the sequence length)."""
    from torch.export import Dim

    batch = Dim("batch", min=1, max=64)
    if name == "text_encoder":
        return {"input_ids": {0: batch}}
    if name == "unet":
        # torch.export specialises a size-1 dim, so the innermost feature map must be at least 2x2
        h, w = 8 * Dim("height_8", min=2, max=64), 8 * Dim("width_8", min=2, max=64)
        return {"sample": {0: batch, 2: h, 3: w}, "timestep": {0: Dim("timestep_batch", min=1, max=64)},
                "encoder_hidden_states": {0: batch}}
    return {"latent_sample": {0: batch, 2: Dim("height", min=1, max=512), 3: Dim("width", min=1, max=512)}}


def export_component(module, name: str, args: tuple, exporter: str, opset: int | None, tmp: Path) -> onnx.ModelProto:
    import torch

    inputs, outputs = IO_NAMES[name]
    path = tmp / f"{name}.onnx"
    with torch.no_grad():
        if exporter == "legacy":
            torch.onnx.export(module, args, str(path), dynamo=False, opset_version=opset or LEGACY_OPSET,
                              input_names=inputs, output_names=outputs,
                              dynamic_axes=LEGACY_DYNAMIC_AXES[name] | LEGACY_OUTPUT_AXES[name], do_constant_folding=True)
        else:
            prog = torch.onnx.export(module, args, dynamo=True, opset_version=opset or DYNAMO_OPSET,
                                     input_names=inputs, output_names=outputs,
                                     dynamic_shapes=dynamo_dynamic_shapes(name), optimize=True)
            prog.save(str(path), external_data=True)
    return onnx.load(str(path), load_external_data=True)


def verify(module, args: tuple, path: Path, name: str) -> float:
    """Run the saved file in onnxruntime on the example inputs; return max abs diff to torch (raises when
    the outputs disagree)."""
    import numpy as np
    import onnxruntime as ort
    import torch

    with torch.no_grad():
        want = module(*args)
    want = [w.numpy() for w in (want if isinstance(want, tuple) else (want,))]
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = sess.run(None, {n: a.numpy() for n, a in zip(IO_NAMES[name][0], args)})
    worst = 0.0
    for w, g in zip(want, got):
        if w.shape != g.shape or w.dtype != g.dtype:
            raise RuntimeError(f"{name}: onnxruntime gives {g.dtype}{g.shape}, torch {w.dtype}{w.shape}")
        diff = float(np.max(np.abs(w - g)))
        if diff > 1e-4 * max(1.0, float(np.max(np.abs(w)))):
            raise RuntimeError(f"{name}: onnxruntime and torch differ by {diff}")
        worst = max(worst, diff)
    return worst


def scrub(model: onnx.ModelProto) -> onnx.ModelProto:
    """Remove what is not the model and may differ between runs or machines: doc strings and metadata
    (the dynamo exporter records stack traces with file paths there)."""
    model.doc_string = ""
    del model.metadata_props[:]

    def graph(g: onnx.GraphProto) -> None:
        g.doc_string = ""
        del g.metadata_props[:]
        for n in g.node:
            n.doc_string = ""
            del n.metadata_props[:]
            for a in n.attribute:
                a.doc_string = ""
                if a.type == onnx.AttributeProto.GRAPH:
                    graph(a.g)
                for sub in a.graphs:
                    graph(sub)
        for vi in list(g.input) + list(g.output) + list(g.value_info):
            vi.doc_string = ""
            del vi.metadata_props[:]
        for t in g.initializer:
            t.doc_string = ""
            del t.metadata_props[:]

    graph(model.graph)
    for f in model.functions:
        f.doc_string = ""
        del f.metadata_props[:]
        for n in f.node:
            n.doc_string = ""
            del n.metadata_props[:]
    return model


def save_onnx(model: onnx.ModelProto, path: Path, external: bool, threshold: int) -> None:
    """Save `model`; with `external`, float initializers of at least `threshold` bytes go to
    weights.pb next to it (one file, as in the public repos). Integer tensors (shapes, indices) stay
    inline: onnxruntime's shape inference cannot read a Reshape's shape from external data."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if external:
        data = path.parent / "weights.pb"
        if data.exists():
            data.unlink()  # onnx appends to an existing data file
        floats = {onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16, onnx.TensorProto.DOUBLE}
        for t in model.graph.initializer:
            if t.data_type in floats and t.HasField("raw_data") and len(t.raw_data) >= threshold:
                set_external_data(t, location="weights.pb")
    onnx.save_model(model, str(path))  # writes the tensors marked external into weights.pb


# ---------------------------------------------------------------------------------------------------
# layout

def _json_bytes(obj: Any) -> bytes:
    return (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode("utf-8")


def write_lockfile(out: Path, repo: str) -> dict[str, Any]:
    """sdsecure.lock.json over every file in `out` except itself."""
    files = {}
    for p in sorted(out.rglob("*")):
        rel = p.relative_to(out).as_posix()
        if p.is_file() and rel != LOCKFILE:
            data = p.read_bytes()
            files[rel] = {"sha256": hashlib.sha256(data).hexdigest(), "size": len(data)}
    lock = {"format": 1, "repo": repo, "revision": None, "files": files}
    (out / LOCKFILE).write_bytes(_json_bytes(lock))
    return lock


def export_pipeline(cfg: SDConfig, out: Path, *, exporter: str, repo: str, readme: str,
                    opset: int | None = None, check: bool = True) -> dict[str, dict[str, int]]:
    """Write the whole pipeline into `out` (replaced atomically: built in a sibling temp folder).
    Returns the op histogram per component."""
    if exporter not in EXPORTERS:
        raise ValueError(f"exporter must be one of {EXPORTERS}")
    out = out.resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    hist: dict[str, dict[str, int]] = {}
    try:
        derive_clip_tokenizer.write_tokenizer(stage / "tokenizer")
        examples = example_inputs(cfg)
        with tempfile.TemporaryDirectory(dir=out.parent, prefix=".export.") as tmp:
            for name in COMPONENTS:  # one at a time: the full-size UNet alone is 3.4 GB
                t0 = time.perf_counter()
                module = build_component(cfg, name)
                work = Path(tmp) / name
                work.mkdir()
                model = scrub(export_component(module, name, examples[name], exporter, opset, work))
                hist[name] = op_histogram(model)
                save_onnx(model, stage / name / "model.onnx", external=(name == "unet"),
                          threshold=cfg.unet_external_threshold)
                nodes = len(model.graph.node)
                del model
                diff = f", max abs diff to torch {verify(module, examples[name], stage / name / 'model.onnx', name):.2g}" \
                    if check else ""
                print(f"  {name}: {nodes} nodes, {time.perf_counter() - t0:.1f} s{diff}", flush=True)
                del module
                gc.collect()
        (stage / "model_index.json").write_bytes(_json_bytes(MODEL_INDEX))
        (stage / "scheduler").mkdir()
        (stage / "scheduler" / "scheduler_config.json").write_bytes(_json_bytes(SCHEDULER_CONFIG))
        (stage / "README.md").write_text(readme, encoding="utf-8")
        write_lockfile(stage, repo)
        if out.exists():
            shutil.rmtree(out)
        os.replace(stage, out)
    finally:
        if stage.exists():
            shutil.rmtree(stage)
    return hist


def describe(hist: dict[str, dict[str, int]]) -> str:
    lines = []
    for name, counts in hist.items():
        total = sum(counts.values())
        lines.append(f"{name} ({total} nodes): " + ", ".join(f"{k} {v}" for k, v in sorted(counts.items())))
    return "\n".join(lines)


def copy_config(cfg: SDConfig, **changes: Any) -> SDConfig:
    new = copy.deepcopy(cfg)
    for k, v in changes.items():
        setattr(new, k, v)
    return new
