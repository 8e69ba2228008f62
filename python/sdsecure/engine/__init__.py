"""ONNX -> MAX engine.

    create_session(model, weights, input_shapes, *, backend="max", name="") -> Session
        model: onnx.ModelProto (external data NOT loaded); weights: initializer name -> np.ndarray
        (zero-copy views from VerifiedModel.onnx_weights); input_shapes: input name -> concrete shape.
        backend "max" (our importer, compiled, cached by (graph sha256, shapes, device)) or
        "onnxruntime" (reference). Raises UnsupportedOpError before compiling anything.
    Session.input_names / .output_names / .run(feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]
"""

from __future__ import annotations

from typing import Mapping, Protocol, Sequence

import numpy as np

from sdsecure.errors import UserError

BACKENDS = ("max", "onnxruntime")


class Session(Protocol):
    input_names: list[str]
    output_names: list[str]

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]: ...


def prepare(model, weights: Mapping[str, np.ndarray], input_shapes: Mapping[str, Sequence[int]], *,
            name: str = "", pack_matmuls: bool = False):
    """MAX backend, first step of create_session: specialise and fold `model` to `input_shapes` and
    check that every node can be imported (UnsupportedOpError otherwise). Nothing is compiled, so a
    pipeline can check all its models before compiling any; pass the result as `prepared=`.
    `pack_matmuls`: MatMul weights packed once (engine.packed_matmul), not by MAX on every call."""
    from sdsecure.engine.runtime import prepare_graph

    return prepare_graph(model, weights, input_shapes, name=name, pack_matmuls=pack_matmuls)


def create_session(model, weights: Mapping[str, np.ndarray], input_shapes: Mapping[str, Sequence[int]], *,
                   backend: str = "max", name: str = "", prepared=None, isolate: bool | None = None,
                   source: str | None = None, pack_matmuls: bool = False) -> Session:
    """A runnable session for `model` specialised to `input_shapes` (see the module docstring).
    MAX only: `prepared` is the result of prepare() for the same arguments (not folded again);
    `isolate` compiles in child processes, in pieces (None: when the model's own weights are large);
    `source` identifies the bytes `model` and `weights` came from (VerifiedModel.source_digest): with it,
    an isolated session stores its build plan and a later one skips the build (engine.plan_cache);
    `pack_matmuls` as for prepare()."""
    if backend == "max":
        from sdsecure.engine.runtime import MaxSession

        return MaxSession(model, weights, input_shapes, name=name, prepared=prepared, isolate=isolate,
                          source=source, pack_matmuls=pack_matmuls)
    if backend in ("onnxruntime", "ort"):
        from sdsecure.engine.ort import OrtSession

        return OrtSession(model, weights, input_shapes, name=name)
    raise UserError(f"unknown backend {backend!r} (choose from {', '.join(BACKENDS)})")


__all__ = ["BACKENDS", "Session", "create_session", "prepare"]
