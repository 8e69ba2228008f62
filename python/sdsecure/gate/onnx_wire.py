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

from typing import Any

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
    """(field number, wire type, value start, value end) of each field in buf[start:end]."""
    pos = start
    while pos < end:
        budget[0] -= 1
        if budget[0] < 0:
            raise _Malformed
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
        yield number, wire, pos, nxt
        pos = nxt


def initializer_raw_lengths(data: Any, model) -> list[int | None] | None:
    """For each main-graph initializer of `model` (parsed from `data`), the length of its raw_data
    (None when it has no raw_data field); None when the wire walk does not agree with `model`."""
    try:
        buf = memoryview(data).cast("B")
        budget = [_MAX_FIELDS]
        graphs = [(s, e) for n, w, s, e in _fields(buf, 0, len(buf), budget) if n == _MODEL_GRAPH and w == 2]
        if len(graphs) != 1:
            return None
        names: list[bytes] = []
        lengths: list[int | None] = []
        for n, w, s, e in _fields(buf, *graphs[0], budget):
            if n != _GRAPH_INITIALIZER or w != 2:
                continue
            name, raw = b"", None
            for tn, tw, ts, te in _fields(buf, s, e, budget):
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
