#!/usr/bin/env python3
"""Export a tiny, random-weight, SD 1.5-shaped ONNX pipeline in the Hub layout of the public SD 1.5 ONNX
repos (the embedded default model and the test fixtures).

    python tools/export_tiny_sd.py --exporter legacy python/sdsecure/embedded/tiny-sd15
    python tools/export_tiny_sd.py --exporter dynamo tests/fixtures/tiny-sd15-dynamo

Real classes (transformers CLIPTextModel, diffusers UNet2DConditionModel and AutoencoderKL) with SD 1.5's
configs at tiny width; weights seeded, so a re-run gives the same bytes. Needs the `fixtures` extra.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import sd15_export  # noqa: E402
from sd15_export import TINY, copy_config  # noqa: E402

README = """# {repo}: tiny random-weight SD 1.5-shaped pipeline

**Not a real model: its weights are random, so every image it makes is noise.** It exists so that the
whole flow (gate -> engine -> pipeline) can run in seconds, offline, and as test fixture.

- Same layout, file names, input/output names and dtypes as the public SD 1.5 ONNX repos
  (`OnnxStableDiffusionPipeline`): `text_encoder/model.onnx` (`input_ids` int32 [batch, 77] ->
  `last_hidden_state`, `pooler_output`), `unet/model.onnx` + `unet/weights.pb` (`sample`, `timestep`
  float32 [batch] or [1], `encoder_hidden_states` -> `out_sample`), `vae_decoder/model.onnx`
  (`latent_sample` -> `sample`, 8x the latent size; post_quant_conv + decoder, without the 1/0.18215
  scaling, which the pipeline applies), `tokenizer/` (the real CLIP ViT-L/14 BPE), `scheduler/` (SD 1.5's
  PNDM config).
- Real classes with SD 1.5's block structure at tiny width: CLIPTextModel (hidden 16, 2 layers, 2 heads,
  vocab 49408, 77 positions), UNet2DConditionModel (CrossAttnDownBlock2D x3 + DownBlock2D,
  UNetMidBlock2DCrossAttn, UpBlock2D + CrossAttnUpBlock2D x3; channels {unet_channels}, cross-attention
  dim 16), AutoencoderKL decoder (channels {vae_channels}, 4 blocks).
- Weights: torch's default random initialisation, seed {seed}; parameters that initialise to a constant
  (norm scales of 1, zero biases) get seeded noise added, so no weight is trivially 1 or 0.
- Exporter: torch {torch} `torch.onnx.export` {exporter_desc}.
- `sdsecure.lock.json` lists the sha256 and size of every other file in this folder.

Made with (from the repository root, `fixtures` extra installed):

    python tools/export_tiny_sd.py --exporter {exporter} {out}
"""


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("out", type=Path, help="output folder (replaced)")
    ap.add_argument("--exporter", choices=sd15_export.EXPORTERS, default="legacy")
    ap.add_argument("--opset", type=int, default=None, help="default: 14 (legacy) or 20 (dynamo)")
    ap.add_argument("--repo", default=None, help="repo name written into the lockfile")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)

    import torch

    torch.set_num_threads(1)
    cfg = copy_config(TINY, seed=args.seed)
    repo = args.repo or ("sdsecure/tiny-sd15" if args.exporter == "legacy" else "sdsecure/tiny-sd15-dynamo")
    opset = args.opset or (sd15_export.LEGACY_OPSET if args.exporter == "legacy" else sd15_export.DYNAMO_OPSET)
    exporter_desc = (f"(dynamo=False, opset {opset}, dynamic axes as diffusers' conversion script)"
                     if args.exporter == "legacy" else
                     f"(dynamo=True, opset {opset}; dynamic batch, UNet latent height/width multiples of 8 from 16 "
                     "to 512, decoder height/width 1 to 512)")
    cmd_out = args.out.as_posix()
    readme = README.format(repo=repo, unet_channels=tuple(cfg.unet["block_out_channels"]),
                           vae_channels=tuple(cfg.vae["block_out_channels"]), torch=torch.__version__.split("+")[0],
                           exporter_desc=exporter_desc, seed=args.seed, exporter=args.exporter, out=cmd_out)
    if args.seed:
        readme = readme.replace(f"--exporter {args.exporter} ", f"--exporter {args.exporter} --seed {args.seed} ")
    t0 = time.perf_counter()
    hist = sd15_export.export_pipeline(cfg, args.out, exporter=args.exporter, repo=repo, readme=readme, opset=opset)
    print(sd15_export.describe(hist))
    print(f"wrote {args.out} in {time.perf_counter() - t0:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
