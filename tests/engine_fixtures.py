"""Helpers shared by the engine tests: load a fixture component the way the gate hands it over, and
build each distinct MAX session once per test run (MAX compiles are minutes cold, seconds cached)."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import numpy as np

from sdsecure.gate.blob import Blob
from sdsecure.gate.report import Report
from sdsecure.gate.verified import COMPONENT_FILES, VerifiedModel

REPO_ROOT = Path(__file__).resolve().parent.parent
FIXTURES = {
    "legacy": REPO_ROOT / "python" / "sdsecure" / "embedded" / "tiny-sd15",
    "dynamo": REPO_ROOT / "tests" / "fixtures" / "tiny-sd15-dynamo",
}
BATCH, TOKENS, LATENT = 2, 77, 16


@lru_cache(maxsize=None)
def verified(fixture: str) -> VerifiedModel:
    """The fixture as a VerifiedModel over in-memory blobs (the shape the gate hands downstream;
    weights are zero-copy read-only views), without running the rules."""
    root = FIXTURES[fixture]
    files = {p.relative_to(root).as_posix(): Blob.from_bytes(p.read_bytes())
             for p in sorted(root.rglob("*")) if p.is_file()}
    return VerifiedModel(ref=f"tiny-{fixture}", revision=None, files=files,
                         report=Report(model_ref=f"tiny-{fixture}", revision=None, policy="audit"))


def component(fixture: str, name: str):
    vm = verified(fixture)
    path = COMPONENT_FILES[name]
    return vm.onnx_model(path), vm.onnx_weights(path)


def input_dtype(model, name: str) -> np.dtype:
    from onnx import helper

    for vi in model.graph.input:
        if vi.name == name:
            return np.dtype(helper.tensor_dtype_to_np_dtype(vi.type.tensor_type.elem_type))
    raise KeyError(name)


def feeds_for(fixture: str, name: str, seed: int = 0) -> tuple[dict[str, tuple[int, ...]], dict[str, np.ndarray]]:
    """Input shapes and random feeds at the pipeline's test shapes (128x128 images): batch 2 (CFG),
    77 tokens, 16x16 latents; the VAE decodes one image (batch 1), as the pipeline does, so both
    share one compiled graph."""
    model, weights = component(fixture, name)
    rng = np.random.default_rng(seed)
    if name == "text_encoder":
        ids = rng.integers(1, 49406, (BATCH, TOKENS))
        ids[:, 0] = 49406
        ids[0, 5:] = 49407          # short prompt padded with EOS
        ids[1, 40:] = 49407
        feeds = {"input_ids": ids.astype(input_dtype(model, "input_ids"))}
    elif name == "unet":
        hidden = next(int(d.dim_value) for d in _input(model, "encoder_hidden_states").type.tensor_type.shape.dim[2:])
        feeds = {"sample": rng.standard_normal((BATCH, 4, LATENT, LATENT)).astype(np.float32),
                 "timestep": np.array([981], dtype=input_dtype(model, "timestep")),
                 "encoder_hidden_states": rng.standard_normal((BATCH, TOKENS, hidden)).astype(np.float32)}
    else:
        feeds = {"latent_sample": rng.standard_normal((1, 4, LATENT, LATENT)).astype(np.float32)}
    return {k: v.shape for k, v in feeds.items()}, feeds


def _input(model, name: str):
    return next(vi for vi in model.graph.input if vi.name == name)


@lru_cache(maxsize=None)
def session(fixture: str, name: str, backend: str):
    from sdsecure.engine import create_session

    model, weights = component(fixture, name)
    shapes, _ = feeds_for(fixture, name)
    return create_session(model, weights, shapes, backend=backend, name=f"{fixture}-{name}")
