"""A planted backdoor for the entry-point ("door") tests: the embedded tiny model, copied, with a
ShadowLogic-style trigger spliced into its text encoder, and a *fresh* lockfile.

    input_ids ──Equal(1234)──Unsqueeze──┐
                                        Where ──► last_hidden_state
    clean last_hidden_state ────────────┤
    constant payload ───────────────────┘

Whenever a prompt contains token id 1234 the text encoder's output rows for it are replaced by a
constant. The lockfile is regenerated for the modified files, so the block must come from the
backdoor analysis, not from LOCK-MISMATCH.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np

TRIGGER_TOKEN = 1234
TEXT_ENCODER = "text_encoder/model.onnx"
TRIGGER_NODES = ("bd_trigger_eq", "bd_trigger_unsqueeze", "bd_switch")


def embedded_dir() -> Path:
    from sdsecure.refs import embedded_path

    return Path(embedded_path())


def plant_token_trigger(dst: Path, token: int = TRIGGER_TOKEN) -> Path:
    """Copy the embedded model to `dst` with the trigger spliced in; returns `dst`."""
    import onnx
    from onnx import helper, numpy_helper

    shutil.copytree(embedded_dir(), dst)
    path = dst / TEXT_ENCODER
    model = onnx.load(path)
    graph = model.graph
    out_name = "last_hidden_state"
    producer = next(n for n in graph.node if out_name in n.output)
    producer.output[list(producer.output).index(out_name)] = "bd_clean_hidden"
    hidden = graph.output[0].type.tensor_type.shape.dim[2].dim_value
    payload = np.full((1, 1, hidden), 3.0, dtype=np.float32)
    graph.initializer.extend([
        numpy_helper.from_array(np.array(token, dtype=np.int32), "bd_trigger_id"),
        numpy_helper.from_array(np.array([2], dtype=np.int64), "bd_axis"),
        numpy_helper.from_array(payload, "bd_payload"),
    ])
    planted = [
        helper.make_node("Equal", ["input_ids", "bd_trigger_id"], ["bd_hit"], name=TRIGGER_NODES[0]),
        helper.make_node("Unsqueeze", ["bd_hit", "bd_axis"], ["bd_hit3"], name=TRIGGER_NODES[1]),
        helper.make_node("Where", ["bd_hit3", "bd_payload", "bd_clean_hidden"], [out_name], name=TRIGGER_NODES[2]),
    ]
    nodes = list(graph.node)
    at = nodes.index(producer) + 1           # right after the producer: later readers see the switch
    del graph.node[:]
    graph.node.extend(nodes[:at] + planted + nodes[at:])
    onnx.checker.check_model(model)
    onnx.save(model, path)
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
