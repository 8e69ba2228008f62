"""raw_data lengths of a model's main-graph initializers, read from the protobuf wire format.

Why: the Python protobuf runtime (upb) copies a bytes field on every access, so `len(t.raw_data)`
over a 500 MB text encoder copies 500 MB each time a rule asks. The serialized model is already in
memory (the verified blob); walking its wire format finds each initializer's raw_data length without
touching the payload.

The walk is a cross-check, never a source of truth on its own: the result is used only when it
agrees with the parsed ModelProto (same initializer count, same names in order, raw_data present in
exactly the same tensors). Anything unusual (the graph field given twice, which protobuf merges; a
malformed or oversized field list) returns None and callers fall back to the exact, slower path.
"""

from __future__ import annotations

from typing import Any, Callable

# field numbers in onnx.proto
_MODEL_GRAPH = 7
_GRAPH_INITIALIZER = 5
_TENSOR_NAME = 8
_TENSOR_RAW_DATA = 9

_MAX_FIELDS = 1 << 20          # a bound on the work, whatever the model holds


class _Malformed(Exception):
    pass


def _varint(buf: memoryview, pos: int, end: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if pos >= end or shift > 63:
            raise _Malformed
        b = buf[pos]
        pos += 1
        value |= (b & 0x7F) << shift
        if b < 0x80:
            return value, pos
        shift += 7


def _fields(buf: memoryview, start: int, end: int, budget: list[int]):
    """(field number, wire type, value start, value end, field start) of each field in buf[start:end]."""
    pos = start
    while pos < end:
        budget[0] -= 1
        if budget[0] < 0:
            raise _Malformed
        field_start = pos
        key, pos = _varint(buf, pos, end)
        number, wire = key >> 3, key & 7
        if wire == 0:
            _, nxt = _varint(buf, pos, end)
        elif wire == 1:
            nxt = pos + 8
        elif wire == 2:
            length, pos = _varint(buf, pos, end)
            nxt = pos + length
        elif wire == 5:
            nxt = pos + 4
        else:                       # groups (3/4) are not used by onnx.proto
            raise _Malformed
        if nxt > end:
            raise _Malformed
        yield number, wire, pos, nxt, field_start
        pos = nxt


def initializer_raw_lengths(data: Any, model) -> list[int | None] | None:
    """For each main-graph initializer of `model` (parsed from `data`), the length of its raw_data
    (None when it has no raw_data field); None when the wire walk does not agree with `model`."""
    try:
        buf = memoryview(data).cast("B")
        budget = [_MAX_FIELDS]
        graphs = [(s, e) for n, w, s, e, _ in _fields(buf, 0, len(buf), budget) if n == _MODEL_GRAPH and w == 2]
        if len(graphs) != 1:
            return None
        names: list[bytes] = []
        lengths: list[int | None] = []
        for n, w, s, e, _ in _fields(buf, *graphs[0], budget):
            if n != _GRAPH_INITIALIZER or w != 2:
                continue
            name, raw = b"", None
            for tn, tw, ts, te, _ in _fields(buf, s, e, budget):
                if tw != 2:
                    continue
                if tn == _TENSOR_NAME:
                    name = bytes(buf[ts:te])
                elif tn == _TENSOR_RAW_DATA:
                    raw = te - ts           # a repeated singular field: the last one wins
            names.append(name)
            lengths.append(raw)
    except _Malformed:
        return None
    inits = model.graph.initializer
    if len(inits) != len(lengths):
        return None
    for t, name, raw in zip(inits, names, lengths):
        if t.name.encode("utf-8") != name or t.HasField("raw_data") != (raw is not None):
            return None
    return lengths


# -- a copy without the big payloads, for the rules ---------------------------------------------------

_TENSOR_DIMS = 1
_TENSOR_DATA_TYPE = 2


def _varint_bytes(n: int) -> bytes:
    out = bytearray()
    while True:
        b, n = n & 0x7F, n >> 7
        out.append(b | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _key(number: int, wire: int) -> bytes:
    return _varint_bytes(number << 3 | wire)


def _tensor_without_payload(buf: memoryview, s: int, e: int, budget: list[int],
                            droppable: Callable[[list[int], int, int], bool]) -> tuple[bytes, bytes, int | None, bool]:
    """(the tensor message, possibly without its raw_data bytes; its name; its raw_data length; whether
    the payload was dropped). raw_data is dropped only when droppable(dims, data_type, length) says so;
    an empty raw_data field is left in its place, so the field is still present."""
    name, raw, dims, dtype = b"", None, [], 0
    fields = list(_fields(buf, s, e, budget))
    for n, w, fs, fe, _ in fields:
        if n == _TENSOR_NAME and w == 2:
            name = bytes(buf[fs:fe])
        elif n == _TENSOR_RAW_DATA and w == 2:
            raw = fe - fs
        elif n == _TENSOR_DATA_TYPE and w == 0:
            dtype = _varint(buf, fs, fe)[0]
        elif n == _TENSOR_DIMS and w == 0:
            dims.append(_varint(buf, fs, fe)[0])
        elif n == _TENSOR_DIMS and w == 2:                # packed
            pos = fs
            while pos < fe:
                d, pos = _varint(buf, pos, fe)
                dims.append(d)
    if raw is None or not droppable(dims, dtype, raw):
        return bytes(buf[s:e]), name, raw, False
    out = bytearray()
    for n, w, fs, fe, start in fields:
        if n == _TENSOR_RAW_DATA and w == 2:
            out += _key(_TENSOR_RAW_DATA, 2) + b"\x00"
        else:
            out += buf[start:fe]
    return bytes(out), name, raw, True


def without_large_payloads(data: Any, droppable: Callable[[list[int], int, int], bool]
                           ) -> tuple[bytes, list[int | None]] | None:
    """The serialized model with the raw_data bytes of main-graph initializers removed where
    droppable(dims, data_type, length) is true, and every initializer's original raw_data length;
    everything else byte for byte. None when the wire walk cannot vouch for the result (then parse
    the original). The rules analyse this copy: they never read the values of such tensors, and the
    copy is small, so the gate's memory does not grow with inline weights."""
    try:
        buf = memoryview(data).cast("B")
        budget = [_MAX_FIELDS]
        top = list(_fields(buf, 0, len(buf), budget))
        if sum(1 for n, w, *_ in top if n == _MODEL_GRAPH and w == 2) != 1:
            return None
        out = bytearray()
        lengths: list[int | None] = []
        dropped = False
        for n, w, s, e, start in top:
            if not (n == _MODEL_GRAPH and w == 2):
                out += buf[start:e]
                continue
            graph = bytearray()
            for gn, gw, gs, ge, gstart in _fields(buf, s, e, budget):
                if gn == _GRAPH_INITIALIZER and gw == 2:
                    tensor, _name, raw, cut = _tensor_without_payload(buf, gs, ge, budget, droppable)
                    lengths.append(raw)
                    dropped |= cut
                    graph += _key(_GRAPH_INITIALIZER, 2) + _varint_bytes(len(tensor)) + tensor
                else:
                    graph += buf[gstart:ge]
            out += _key(_MODEL_GRAPH, 2) + _varint_bytes(len(graph)) + graph
    except _Malformed:
        return None
    if not dropped:
        return None                     # nothing to gain: parse the original
    return bytes(out), lengths
