"""ONNX-TENSOR-DUAL-DATA and ONNX-TENSOR-SIZE-MISMATCH: tensors whose data is ambiguous.

Checked everywhere a TensorProto can live: initializers of every graph (subgraphs included), Constant
and other tensor-valued attributes, sparse tensors (values, indices, and indices against the dense
shape), function attribute defaults.
"""

from __future__ import annotations

from typing import Iterator

import numpy as np
from onnx import TensorProto

from sdsecure.gate.blob import Blob
from sdsecure.gate.onnx_graph import cached_index, elem_bits, raw_data_len, num_elements, type_name, uses_external, walk_sparse, walk_tensors
from sdsecure.gate.report import Finding, Severity
from sdsecure.gate.rules import ScanContext, declare, file_rule

DUAL = declare(
    "ONNX-TENSOR-DUAL-DATA", Severity.HIGH,
    "Tensor carries its data twice (raw_data and a typed field, or inline and external)",
    why=("A TensorProto must hold its values in exactly one place. With both raw_data and e.g. "
         "float_data (or inline bytes plus an external location), which copy is used depends on the "
         "reader: a checker or a reviewer's tool can see benign weights while the runtime uses the "
         "other ones. onnx's save_external_data also writes such inline bytes to the tensor's external "
         "location (CVE-2025-51480). There is no benign reason for it."),
    fix="Re-export or re-save the model; keep one data field per tensor.",
)
SIZE = declare(
    "ONNX-TENSOR-SIZE-MISMATCH", Severity.HIGH,
    "Tensor data length does not match dims x dtype (or sparse indices out of range)",
    why=("A tensor with shape dims and element type T holds exactly prod(dims) values. Shorter data "
         "makes runtimes read past the buffer or zero-fill; longer data hides bytes the graph never "
         "shows; sparse indices outside the dense shape are out-of-bounds writes when densified. "
         "Runtimes differ in how they handle each case."),
    fix="Re-export the model; a tensor written by onnx.numpy_helper.from_array is always consistent.",
)

# typed field -> element types it may carry, and values per element
_TYPED_FIELDS: dict[str, dict[int, float]] = {
    "float_data": {TensorProto.FLOAT: 1, TensorProto.COMPLEX64: 2},
    "int32_data": {t: 1 for t in (TensorProto.INT32, TensorProto.INT16, TensorProto.INT8, TensorProto.UINT16,
                                  TensorProto.UINT8, TensorProto.BOOL, TensorProto.FLOAT16,
                                  TensorProto.BFLOAT16)},
    "int64_data": {TensorProto.INT64: 1},
    "double_data": {TensorProto.DOUBLE: 1, TensorProto.COMPLEX128: 2},
    "uint64_data": {TensorProto.UINT32: 1, TensorProto.UINT64: 1},
    "string_data": {TensorProto.STRING: 1},
}
for _name in ("FLOAT8E4M3FN", "FLOAT8E4M3FNUZ", "FLOAT8E5M2", "FLOAT8E5M2FNUZ", "FLOAT8E8M0"):
    if hasattr(TensorProto, _name):
        _TYPED_FIELDS["int32_data"][getattr(TensorProto, _name)] = 1
for _name in ("INT4", "UINT4", "FLOAT4E2M1"):
    if hasattr(TensorProto, _name):
        _TYPED_FIELDS["int32_data"][getattr(TensorProto, _name)] = 0.5
for _name in ("INT2", "UINT2"):
    if hasattr(TensorProto, _name):
        _TYPED_FIELDS["int32_data"][getattr(TensorProto, _name)] = 0.25

MAX_SPARSE_INDEX_CHECK = 1 << 22


def data_sources(t: TensorProto, raw_len: int | None = None) -> dict[str, int]:
    """{field: number of entries (bytes for raw_data)} for every populated data field; `raw_len`,
    when known, is len(t.raw_data)."""
    out: dict[str, int] = {}
    if t.HasField("raw_data"):
        out["raw_data"] = raw_len if raw_len is not None else raw_data_len(t)
    for f in _TYPED_FIELDS:
        n = len(getattr(t, f))
        if n:
            out[f] = n
    if uses_external(t):
        out["external"] = 0
    return out


@file_rule("*.onnx")
def check_tensors(ctx: ScanContext, path: str, blob: Blob) -> Iterator[Finding]:
    model = ctx.onnx(path)
    if model is None:
        return
    ix = cached_index(ctx, path, model)
    for tl in walk_tensors(ix):
        t = tl.tensor
        src = data_sources(t, tl.raw_len)
        ev = {"tensor": t.name, "dtype": type_name(t.data_type), "dims": list(t.dims), "fields": src}
        if len(src) > 1:
            yield Finding(DUAL.id, DUAL.severity, path, tl.where,
                          f"tensor {t.name!r} has data in {' and '.join(src)}", ev)
            continue
        if any(d < 0 for d in t.dims):
            yield Finding(SIZE.id, SIZE.severity, path, tl.where, f"tensor {t.name!r} has negative dims {list(t.dims)}", ev)
            continue
        if "external" in src:
            continue  # lengths of external data: ONNX-EXTDATA-LENGTH
        n = num_elements(t.dims)
        if not src:
            if n > 0 and t.data_type != TensorProto.UNDEFINED:
                yield Finding(SIZE.id, SIZE.severity, path, tl.where,
                              f"tensor {t.name!r} {type_name(t.data_type)}{list(t.dims)} has no data", ev)
            continue
        (field, count), = src.items()
        if field == "raw_data":
            bits = elem_bits(t.data_type)
            if bits is None:
                yield Finding(SIZE.id, SIZE.severity, path, tl.where,
                              f"tensor {t.name!r}: raw_data is not allowed for {type_name(t.data_type)}", ev)
                continue
            expected = (n * bits + 7) // 8
            if count != expected:
                yield Finding(SIZE.id, SIZE.severity, path, tl.where,
                              f"tensor {t.name!r}: {count} bytes of raw_data for {type_name(t.data_type)}"
                              f"{list(t.dims)} ({expected} expected)", {**ev, "expected_bytes": expected})
            continue
        per = _TYPED_FIELDS[field].get(t.data_type)
        if per is None:
            yield Finding(SIZE.id, SIZE.severity, path, tl.where,
                          f"tensor {t.name!r}: {field} cannot hold {type_name(t.data_type)} values", ev)
            continue
        expected = int(np.ceil(n * per))
        if count != expected:
            yield Finding(SIZE.id, SIZE.severity, path, tl.where,
                          f"tensor {t.name!r}: {count} entries in {field} for {type_name(t.data_type)}"
                          f"{list(t.dims)} ({expected} expected)", {**ev, "expected_entries": expected})
    for where, st in walk_sparse(ix):
        yield from _check_sparse(path, where, st)


def _check_sparse(path: str, where: str, st) -> Iterator[Finding]:
    dense = list(st.dims)
    values, indices = st.values, st.indices
    ev = {"tensor": values.name, "dense_dims": dense, "values_dims": list(values.dims),
          "indices_dims": list(indices.dims)}
    if any(d < 0 for d in dense) or len(values.dims) != 1:
        yield Finding(SIZE.id, SIZE.severity, path, where,
                      f"sparse tensor {values.name!r}: values must be 1-D and dense dims non-negative", ev)
        return
    nnz = values.dims[0]
    idims = list(indices.dims)
    if not (idims == [nnz] or idims == [nnz, len(dense)]):
        yield Finding(SIZE.id, SIZE.severity, path, where,
                      f"sparse tensor {values.name!r}: indices shape {idims} does not fit {nnz} values "
                      f"of a rank-{len(dense)} tensor", ev)
        return
    if uses_external(indices) or num_elements(idims) > MAX_SPARSE_INDEX_CHECK:
        return
    try:
        from onnx import numpy_helper

        idx = numpy_helper.to_array(indices).astype(np.int64)
    except Exception:  # noqa: BLE001 - malformed data is reported by the per-tensor checks
        return
    if idx.size != num_elements(idims):
        return
    if len(idims) == 1:
        bound = num_elements(dense)
        bad = (idx < 0) | (idx >= bound)
    else:
        bad = ((idx < 0) | (idx >= np.array(dense, np.int64))).any(axis=1)
    if bad.any():
        first = idx[bad][:5].tolist()
        yield Finding(SIZE.id, SIZE.severity, path, where,
                      f"sparse tensor {values.name!r}: {int(bad.sum())} indices outside the dense shape {dense}",
                      {**ev, "first_bad_indices": first})
