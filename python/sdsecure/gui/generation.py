"""Generation in the GUI: parameters, their checks, and the PNG bytes the download button serves.

The bytes served are the bytes `save_png` wrote, with the provenance the Python CLI writes (same
function, "sdsecure:entry" = "gui"), read back from a private temporary folder: what the user
downloads is exactly what the CLI would have written.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
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
        """The pipeline's own argument checks (as the CLIs run them), as one-line UserErrors."""
        from sdsecure.pipeline.sd15 import check_generate_args, check_size

        check_generate_args(self.prompt, self.negative_prompt, self.num_steps, self.guidance_scale, self.seed)
        check_size(self.height, self.width)
        if self.scheduler not in SCHEDULERS:
            raise UserError(f"unknown scheduler {self.scheduler!r}: choose one of {', '.join(SCHEDULERS)}")

    @property
    def scheduler_override(self) -> str | None:
        return None if self.scheduler == "model default" else self.scheduler

    def as_run_args(self) -> SimpleNamespace:
        """The fields the CLI's provenance() reads from its parsed arguments."""
        return SimpleNamespace(prompt=self.prompt, negative_prompt=self.negative_prompt, seed=self.seed,
                               num_steps=self.num_steps, guidance_scale=self.guidance_scale,
                               width=self.width, height=self.height, backend=self.backend)


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


def render_png(model: "VerifiedModel", image: np.ndarray, params: GenerationParams, pipeline) -> GeneratedImage:
    """The PNG exactly as save_png writes it, with the same provenance as the CLI (entry "gui")."""
    from sdsecure.cli.generate import provenance as run_provenance
    from sdsecure.pipeline.image import save_png

    provenance = run_provenance(model, params.as_run_args(), pipeline, "gui")
    with tempfile.TemporaryDirectory(prefix="sdsecure-gui-") as tmp:
        path = save_png(Path(tmp) / "image.png", image, provenance)
        png = path.read_bytes()
    return GeneratedImage(png, provenance, f"sdsecure-seed{params.seed}.png")


def generate(model: "VerifiedModel", params: GenerationParams, pipeline=None,
             progress: Progress | None = None) -> GeneratedImage:
    params.check()
    pipe = pipeline if pipeline is not None else build_pipeline(model, params)
    image = pipe.generate(params.prompt, negative_prompt=params.negative_prompt, num_steps=params.num_steps,
                          guidance_scale=params.guidance_scale, seed=params.seed,
                          progress=progress if progress is not None else False)
    return render_png(model, image, params, pipe)
