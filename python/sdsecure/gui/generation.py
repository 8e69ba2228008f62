"""Generation in the GUI: parameters, their checks, and the PNG bytes the download button serves.

The bytes served are the bytes `save_png` wrote (same provenance text chunks as the CLIs, plus
"sdsecure:entry" = "gui"), read back from a private temporary folder: what the user downloads is
exactly what the CLI would have written.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import numpy as np

from sdsecure.errors import UserError

if TYPE_CHECKING:
    from sdsecure.gate.verified import VerifiedModel

Progress = Callable[[int, int], None]   # (steps done, total steps)

SCHEDULERS = ("model default", "pndm", "ddim", "euler")


@dataclass(frozen=True)
class GenerationParams:
    prompt: str
    negative_prompt: str = ""
    num_steps: int = 25
    seed: int = 0
    guidance_scale: float = 7.5
    height: int = 512
    width: int = 512
    scheduler: str = "model default"
    backend: str = "max"

    def check(self) -> None:
        """The CLI's rules, as one-line UserErrors."""
        if not self.prompt.strip():
            raise UserError("the prompt must not be empty")
        if self.num_steps <= 0:
            raise UserError(f"steps must be positive, got {self.num_steps}")
        if self.seed < 0:
            raise UserError(f"the seed must be >= 0, got {self.seed}")
        if not np.isfinite(self.guidance_scale) or self.guidance_scale < 0:
            raise UserError(f"the guidance scale must be a finite number >= 0, got {self.guidance_scale}")
        for name, side in (("height", self.height), ("width", self.width)):
            if side <= 0 or side % 8:
                raise UserError(f"the {name} must be a positive multiple of 8, got {side}")
        if self.scheduler not in SCHEDULERS:
            raise UserError(f"unknown scheduler {self.scheduler!r}: choose one of {', '.join(SCHEDULERS)}")

    @property
    def scheduler_override(self) -> str | None:
        return None if self.scheduler == "model default" else self.scheduler

    def provenance(self) -> dict[str, str]:
        return {
            "sdsecure:entry": "gui",
            "sdsecure:prompt": self.prompt,
            "sdsecure:negative_prompt": self.negative_prompt,
            "sdsecure:seed": str(self.seed),
            "sdsecure:steps": str(self.num_steps),
            "sdsecure:guidance_scale": str(self.guidance_scale),
            "sdsecure:size": f"{self.width}x{self.height}",
            "sdsecure:scheduler": self.scheduler,
            "sdsecure:backend": self.backend,
        }


@dataclass
class GeneratedImage:
    png: bytes                     # the file, provenance included
    provenance: dict[str, str]
    file_name: str


def build_pipeline(model: "VerifiedModel", params: GenerationParams):
    """The pipeline for a *verified* model (compiles on first use; the engine caches compiles)."""
    from sdsecure.pipeline.sd15 import StableDiffusion15

    if not model.verified:
        raise UserError("the GUI only runs models the gate has verified")
    return StableDiffusion15(model, backend=params.backend, height=params.height, width=params.width,
                             scheduler=params.scheduler_override)


def render_png(model: "VerifiedModel", image: np.ndarray, params: GenerationParams) -> GeneratedImage:
    """The PNG exactly as save_png writes it, with the gate's and this run's provenance."""
    from sdsecure.pipeline.image import save_png

    provenance = {**model.provenance(), **params.provenance()}
    with tempfile.TemporaryDirectory(prefix="sdsecure-gui-") as tmp:
        path = save_png(Path(tmp) / "image.png", image, provenance)
        png = path.read_bytes()
    return GeneratedImage(png, provenance, f"sdsecure-seed{params.seed}.png")


def generate(model: "VerifiedModel", params: GenerationParams, pipeline=None,
             progress: Progress | None = None) -> GeneratedImage:
    params.check()
    pipe = pipeline if pipeline is not None else build_pipeline(model, params)
    image = pipe.generate(params.prompt, negative_prompt=params.negative_prompt, num_steps=params.num_steps,
                          guidance_scale=params.guidance_scale, seed=params.seed, progress=progress)
    return render_png(model, image, params)
