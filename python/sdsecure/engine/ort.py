"""The onnxruntime backend: the reference the MAX backend is tested against, and a fallback.

Like the MAX backend it never opens a model path: the graph is handed over as bytes and every
externally stored initializer is supplied from `weights` (OrtValues over the verified arrays) through
`SessionOptions.add_external_initializers`, so onnxruntime has no file to read.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np
import onnx
from onnx.external_data_helper import uses_external_data

from sdsecure.engine.runtime import contiguous, prepare_feeds
from sdsecure.errors import UserError

_ORT_DTYPES = {
    "tensor(float)": np.float32, "tensor(double)": np.float64, "tensor(float16)": np.float16,
    "tensor(int64)": np.int64, "tensor(int32)": np.int32, "tensor(int16)": np.int16, "tensor(int8)": np.int8,
    "tensor(uint8)": np.uint8, "tensor(uint16)": np.uint16, "tensor(uint32)": np.uint32,
    "tensor(uint64)": np.uint64, "tensor(bool)": np.bool_,
}


class OrtSession:
    def __init__(self, model: onnx.ModelProto, weights: Mapping[str, np.ndarray],
                 input_shapes: Mapping[str, Sequence[int]], *, name: str = "", threads: int = 0):
        try:
            import onnxruntime as ort
        except ImportError:
            raise UserError("the onnxruntime backend needs the onnxruntime package") from None
        self.name = name or model.graph.name or "model"
        opts = ort.SessionOptions()
        if threads:
            opts.intra_op_num_threads = threads
        external = [t.name for t in model.graph.initializer if uses_external_data(t)]
        missing = [n for n in external if n not in weights]
        if missing:
            raise UserError(f"{self.name}: no data for external initializer {missing[0]!r}")
        # OrtValues borrow the arrays' memory: keep them (and the arrays) alive with the session.
        self._arrays = [contiguous(weights[n]) for n in external]
        self._values = [ort.OrtValue.ortvalue_from_numpy(a) for a in self._arrays]
        if external:
            opts.add_external_initializers(external, self._values)
        try:
            self._session = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
        except Exception as e:
            raise UserError(f"{self.name}: onnxruntime cannot load the model: {str(e).splitlines()[0]}") from None
        self.input_names = [i.name for i in self._session.get_inputs()]
        self.output_names = [o.name for o in self._session.get_outputs()]
        unknown = sorted(set(input_shapes) - set(self.input_names))
        if unknown:
            raise UserError(f"{self.name}: no graph input named {', '.join(unknown)}")
        self._shapes = {n: tuple(int(d) for d in input_shapes[n]) for n in self.input_names}
        self._dtypes = {i.name: np.dtype(_ORT_DTYPES.get(i.type, np.float32)) for i in self._session.get_inputs()}

    def run(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        arrays = prepare_feeds(self.name, feeds, self.input_names, self._shapes, self._dtypes)
        outs = self._session.run(self.output_names, dict(zip(self.input_names, arrays)))
        return dict(zip(self.output_names, outs))
