"""VerifiedModel: what the gate hands downstream. The only way the engine and pipeline see model data."""

from __future__ import annotations

import hashlib
import json
import posixpath
from dataclasses import dataclass, field
from typing import Any, Mapping

import numpy as np

from sdsecure.errors import UserError
from sdsecure.gate.blob import Blob
from sdsecure.gate.report import Report

# SD 1.5 ONNX layout (as in the public ONNX exports of SD 1.5 on the Hub)
COMPONENT_FILES = {
    "text_encoder": "text_encoder/model.onnx",
    "unet": "unet/model.onnx",
    "vae_decoder": "vae_decoder/model.onnx",
}

_ONNX_NP_DTYPE = {1: np.float32, 2: np.uint8, 3: np.int8, 5: np.int16, 6: np.int32, 7: np.int64,
                  9: np.bool_, 10: np.float16, 11: np.float64, 12: np.uint32, 13: np.uint64}


@dataclass
class VerifiedModel:
    ref: str                          # what the user asked for
    revision: str | None              # pinned commit sha (hub) or None (local / embedded)
    files: dict[str, Blob]            # relative path -> verified bytes
    report: Report
    verified: bool = True             # False only for --skip-validation runs (hashed, not scanned)
    lockfile_sha256: str | None = None
    _protos: dict[str, Any] = field(default_factory=dict, repr=False)

    # -- plain files ---------------------------------------------------------------------------
    def has(self, path: str) -> bool:
        return path in self.files

    def read_bytes(self, path: str) -> bytes:
        try:
            return self.files[path].bytes()
        except KeyError:
            raise UserError(f"model {self.ref!r} has no file {path!r}") from None

    def read_json(self, path: str) -> Any:
        return json.loads(self.read_bytes(path).decode("utf-8"))

    # -- ONNX ----------------------------------------------------------------------------------
    def onnx_model(self, path: str):
        """The parsed ModelProto of `path`, external data *not* loaded (see onnx_weights)."""
        if path not in self._protos:
            if path not in self.files:
                raise UserError(f"model {self.ref!r} has no file {path!r}")
            self._protos[path] = self.files[path].parse_onnx()
        return self._protos[path]

    def onnx_weights(self, path: str) -> dict[str, np.ndarray]:
        """Every initializer of the main graph as a numpy array. Externally stored tensors are
        zero-copy views into the verified blobs of their data files (the gate already checked
        their locations, offsets and lengths)."""
        model = self.onnx_model(path)
        folder = posixpath.dirname(path)
        out: dict[str, np.ndarray] = {}
        for t in model.graph.initializer:
            out[t.name] = self.tensor_array(t, folder)
        return out

    def tensor_array(self, t, folder: str) -> np.ndarray:
        from onnx import numpy_helper
        from onnx.external_data_helper import uses_external_data

        if not uses_external_data(t):
            return numpy_helper.to_array(t)
        info, blob_path = _external_data(t, folder)
        blob = self.files.get(blob_path)
        if blob is None:
            raise UserError(f"{t.name}: external data {info.get('location', '')!r} is not part of the verified model")
        dtype = np.dtype(_ONNX_NP_DTYPE[t.data_type])
        offset = int(info.get("offset", 0))
        count = int(np.prod(t.dims, dtype=np.int64)) if len(t.dims) else 1
        length = int(info.get("length", count * dtype.itemsize))
        if length != count * dtype.itemsize or offset + length > blob.size:
            raise UserError(f"{t.name}: external data range does not match its shape")
        return np.frombuffer(blob.view(), dtype=dtype, count=count, offset=offset).reshape(tuple(t.dims))

    def source_digest(self, path: str) -> str:
        """sha256 naming the verified bytes an ONNX file and its weights came from: the hashes of the file
        and of every file its tensors keep their data in (engine.plan_cache keys build plans by it)."""
        from onnx.external_data_helper import _get_all_tensors, uses_external_data  # noqa: PLC2701 - subgraphs too

        folder = posixpath.dirname(path)
        used = {path}
        for t in _get_all_tensors(self.onnx_model(path)):
            if uses_external_data(t):
                used.add(_external_data(t, folder)[1])
        h = hashlib.sha256()
        for p in sorted(used):
            blob = self.files.get(p)
            h.update(f"{p}\0{blob.sha256 if blob is not None else 'missing'}\n".encode())
        return h.hexdigest()

    # -- provenance ----------------------------------------------------------------------------
    def provenance(self) -> dict[str, str]:
        return {
            "sdsecure:model": self.ref,
            "sdsecure:revision": self.revision or "local",
            "sdsecure:lockfile_sha256": self.lockfile_sha256 or "none",
            "sdsecure:verdict": self.report.verdict if self.verified else "unverified",
            "sdsecure:policy": self.report.policy if self.verified else "skipped",
        }


def files_manifest(files: Mapping[str, Blob]) -> dict[str, dict[str, Any]]:
    return {p: {"sha256": b.sha256, "size": b.size} for p, b in sorted(files.items())}


def _external_data(t, folder: str) -> tuple[dict[str, str], str]:
    """A tensor's external_data entries, and the model path of the file they name (relative to `folder`,
    the ONNX file's)."""
    info = {e.key: e.value for e in t.external_data}
    return info, posixpath.normpath(posixpath.join(folder, info.get("location", "")))
