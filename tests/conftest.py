"""Shared test paths and the SD 1.5 I/O contract of the committed fixtures.

The fixtures are made by tools/export_tiny_sd.py (see the README.md inside each); the tests never need
torch. Paths are plain `Path`s, read-only: copy a fixture to tmp_path before changing anything.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest

# The GUI tests use streamlit tables (pyarrow) in the same process as MAX: pyarrow must be loaded
# before MAX's runtime or it segfaults (see sdsecure/gui/__init__.py).
import sdsecure.gui  # noqa: F401

REPO_ROOT = Path(__file__).resolve().parent.parent
TOOLS_DIR = REPO_ROOT / "tools"

# tiny random-weight SD 1.5 pipelines in the Hub layout of the public SD 1.5 ONNX repos
EMBEDDED_MODEL_DIR = REPO_ROOT / "python" / "sdsecure" / "embedded" / "tiny-sd15"  # legacy export, opset 14
DYNAMO_MODEL_DIR = REPO_ROOT / "tests" / "fixtures" / "tiny-sd15-dynamo"           # dynamo export, opset 20
FIXTURE_MODEL_DIRS = {"legacy": EMBEDDED_MODEL_DIR, "dynamo": DYNAMO_MODEL_DIR}
TOKENIZER_DIR = EMBEDDED_MODEL_DIR / "tokenizer"  # the real CLIP ViT-L/14 tokenizer files
LOCKFILE = "sdsecure.lock.json"

# ---- SD 1.5 I/O contract, as the pipeline feeds the graphs -----------------------------------------
BATCH = 2                      # classifier-free guidance: [uncond, cond]
MAX_TOKENS = 77                # CLIP context; padded with EOS_ID
BOS_ID, EOS_ID = 49406, 49407  # EOS is also the pad id
INPUT_IDS_DTYPE = np.int32     # text_encoder input_ids [BATCH, 77], as in the public export
LATENT_CHANNELS = 4
LATENT_HW = 16                 # 16x16 latents in the tests (a 128x128 image)
VAE_SCALE = 8                  # vae_decoder output is 8x the latent size
VAE_SCALING_FACTOR = 0.18215   # applied by the pipeline (latents / 0.18215 before decoding), not by the graph
# The UNet `timestep` input is float32 [batch] in both exports. The pipeline passes it like diffusers'
# OnnxStableDiffusionPipeline: np.array([t], dtype=<the graph's timestep type>), i.e. shape [1]; both
# graphs broadcast it to the batch. Shape [BATCH] is accepted too.
TIMESTEP_DTYPE = np.float32
TIMESTEP_SHAPE = (1,)
TINY_HIDDEN = 16               # text hidden size = UNet cross-attention dim of the tiny fixtures


def timestep_feed(t: float | int) -> np.ndarray:
    return np.full(TIMESTEP_SHAPE, t, dtype=TIMESTEP_DTYPE)


@pytest.fixture(scope="session")
def embedded_model_dir() -> Path:
    return EMBEDDED_MODEL_DIR


@pytest.fixture(scope="session")
def dynamo_model_dir() -> Path:
    return DYNAMO_MODEL_DIR


@pytest.fixture(scope="session")
def tokenizer_dir() -> Path:
    return TOKENIZER_DIR


@pytest.fixture(scope="session", params=sorted(FIXTURE_MODEL_DIRS), ids=lambda k: f"tiny-{k}")
def fixture_model_dir(request) -> Path:
    """Each committed fixture pipeline in turn (legacy/embedded, dynamo)."""
    return FIXTURE_MODEL_DIRS[request.param]


@pytest.fixture(autouse=True)
def _online_unless_a_test_says_otherwise(monkeypatch: pytest.MonkeyPatch) -> None:
    """Tests talk only to our loopback Hub server; HF_HUB_OFFLINE from the caller's shell (the demo
    sets it) must not leak into the hub tests, which set it themselves where offline is the point."""
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)


class _Messages(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


@pytest.fixture
def progress_messages():
    """What the engine tells the "sdsecure.progress" log (the CLI shows it on stderr), in order. Read
    from the logger itself: once a CLI test has set it up, it no longer propagates to pytest's caplog."""
    logger = logging.getLogger("sdsecure.progress")
    handler, level = _Messages(), logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    yield handler.messages
    logger.removeHandler(handler)
    logger.setLevel(level)
