#!/usr/bin/env python3
"""Export FULL-size SD 1.5 graphs with random weights (real SD 1.5 configs: CLIP ViT-L text encoder 768 x 12
layers, UNet 320/640/1280/1280, VAE decoder 128/256/512/512) through the legacy exporter, in the Hub layout
of the public SD 1.5 ONNX repos. For engine and memory work at real size; never committed.

    python tools/export_full_sd.py [OUT]          # default generated/full-sd15 (git-ignored)

About 4.3 GB on disk (unet/weights.pb ~3.4 GB), ~70 s and ~7.5 GB peak RAM on 2 cores (more when the
onnxruntime check runs; --no-check skips it). Needs the `fixtures` extra.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import sd15_export  # noqa: E402
from sd15_export import FULL  # noqa: E402

README = """# {repo}: full-size SD 1.5 graphs with RANDOM weights

**Not a real model: its weights are random, so every image it makes is noise.** Same graphs, sizes,
layout and input/output names as the public SD 1.5 ONNX repos (text encoder CLIP ViT-L/14 768 x 12,
UNet 320/640/1280/1280 with unet/weights.pb, VAE decoder 128/256/512/512), for engine and memory work
at real size. Do not commit (several GB).

Made with: python tools/export_full_sd.py {out}
(torch {torch}, torch.onnx.export dynamo=False, opset 14, seed {seed})
"""


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("out", type=Path, nargs="?", default=Path("generated/full-sd15"))
    ap.add_argument("--no-check", action="store_true", help="skip the onnxruntime vs torch comparison")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)

    import torch

    cfg = sd15_export.copy_config(FULL, seed=args.seed, latent_hw=16)
    repo = "sdsecure/full-sd15-random"
    readme = README.format(repo=repo, out=args.out.as_posix(), torch=torch.__version__.split("+")[0], seed=args.seed)
    t0 = time.perf_counter()
    hist = sd15_export.export_pipeline(cfg, args.out, exporter="legacy", repo=repo, readme=readme,
                                       check=not args.no_check)
    print(sd15_export.describe(hist))
    print(f"wrote {args.out} in {time.perf_counter() - t0:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
