"""A planted backdoor for the entry-point ("door") tests: the embedded tiny model, copied, with a
ShadowLogic-style token trigger spliced into its text encoder (samples.inject_trigger, the gate
tests' own injector), and a *fresh* lockfile.

    input_ids ──Equal(1234)──Cast──ReduceMax──Greater──┐
                                                      Where "bd_switch" ──► last_hidden_state
    clean last_hidden_state ──────────────────────────┤
    constant payload ─────────────────────────────────┘

Whenever a prompt contains token id 1234 the text encoder's output is replaced by a constant. The
lockfile is regenerated for the modified files, so the block must come from the backdoor analysis,
not from LOCK-MISMATCH.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np

from samples import inject_trigger

TRIGGER_TOKEN = 1234
TEXT_ENCODER = "text_encoder/model.onnx"
TRIGGER_NODES = ("bd_switch", "bd_eq", "bd_cond")   # node names inject_trigger gives the planted logic


def embedded_dir() -> Path:
    from sdsecure.refs import embedded_path

    return Path(embedded_path())


def plant_token_trigger(dst: Path, token: int = TRIGGER_TOKEN) -> Path:
    """Copy the embedded model to `dst` with the trigger spliced in; returns `dst`."""
    import onnx

    shutil.copytree(embedded_dir(), dst)
    path = dst / TEXT_ENCODER
    clean = onnx.load(path)
    hidden = clean.graph.output[0].type.tensor_type.shape.dim[2].dim_value
    planted = inject_trigger(clean, input_name="input_ids", output_name="last_hidden_state", kind="token",
                             via="where", token=token, payload_dim=hidden)
    onnx.checker.check_model(planted)
    onnx.save(planted, path)
    relock(dst)
    return dst


def relock(folder: Path) -> None:
    """Rewrite the folder's lockfile for its current files (the project's own lockfile format)."""
    from sdsecure.gate import load_unverified
    from sdsecure.lockfile import LOCKFILE_NAME, lock_document

    lock = folder / LOCKFILE_NAME
    lock.unlink(missing_ok=True)
    doc = lock_document(load_unverified(str(folder), progress=False))
    lock.write_text(json.dumps(doc, indent=2) + "\n")


def run_text_encoder(folder: Path, ids: np.ndarray) -> np.ndarray:
    """onnxruntime on the (possibly planted) text encoder: proves the trigger really works."""
    import onnxruntime as ort

    sess = ort.InferenceSession(str(folder / TEXT_ENCODER), providers=["CPUExecutionProvider"])
    return sess.run(["last_hidden_state"], {"input_ids": ids.astype(np.int32)})[0]
