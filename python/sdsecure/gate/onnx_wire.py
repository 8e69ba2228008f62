"""raw_data lengths of a model's main-graph initializers, read from the protobuf wire format.

Why: the Python protobuf runtime (upb) copies a bytes field on every access, so `len(t.raw_data)`
over a 500 MB text encoder copies 500 MB each time a rule asks. The serialized model is already in
memory (the verified blob); walking its wire format finds each initializer's raw_data length without
touching the payload.

The walk is a cross-check, never a source of truth on its own: the result is used only when it
agrees with the parsed ModelProto (same initializer count, same names in order, raw_data present in
exactly the same tensors). Anything unusual (the graph field given twice, which protobuf merges; a
malformed or oversized field list) returns None and callers fall back to the exact, slower path.

The same walk makes the *light copy* the rules parse when a model holds large weights inline: the
model byte for byte, minus the raw_data bytes of initializers no rule reads the values of (the
caller decides which), so the scan's memory does not grow with the weights.
"""

from __future__ import annotations

from dataclasses import dataclass
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


@dataclass
class Initializers:
    """What the wire walk found about the main graph's initializers, in order."""
    names: list[bytes]
    lengths: list[int | None]        # raw_data length (None: no raw_data field)
    light: bytes | None = None       # the model without droppable payloads (None: nothing dropped)

    def agree_with(self, model) -> bool:
        """Same initializer count, same names in order, raw_data present in the same tensors."""
        inits = model.graph.initializer
        return len(inits) == len(self.lengths) and all(
            t.name.encode("utf-8") == name and t.HasField("raw_data") == (raw is not None)
            for t, name, raw in zip(inits, self.names, self.lengths))


_TENSOR_DIMS = 1
_TENSOR_DATA_TYPE = 2


def _tensor(buf: memoryview, s: int, e: int, budget: list[int]):
    """(fields, name, raw_data length, dims, data_type) of the TensorProto in buf[s:e]."""
    name, raw, dims, dtype = b"", None, [], 0
    fields = list(_fields(buf, s, e, budget))
    for n, w, fs, fe, _ in fields:
        if n == _TENSOR_NAME and w == 2:
            name = bytes(buf[fs:fe])
        elif n == _TENSOR_RAW_DATA and w == 2:
            raw = fe - fs                   # a repeated singular field: the last one wins
        elif n == _TENSOR_DATA_TYPE and w == 0:
            dtype = _varint(buf, fs, fe)[0]
        elif n == _TENSOR_DIMS and w == 0:
            dims.append(_varint(buf, fs, fe)[0])
        elif n == _TENSOR_DIMS and w == 2:                # packed
            pos = fs
            while pos < fe:
                d, pos = _varint(buf, pos, fe)
                dims.append(d)
    return fields, name, raw, dims, dtype


def read_initializers(data: Any, droppable: Callable[[list[int], int, int], bool] | None = None
                      ) -> Initializers | None:
    """Walk the serialized model once: every main-graph initializer's name and raw_data length, and,
    when droppable(dims, data_type, length) holds for any of them, a copy of the model with those
    raw_data bytes left out (an empty raw_data field stays in place; everything else byte for byte).
    None when the walk cannot vouch for the result (malformed, the graph field given twice, too many
    fields): callers then use the parsed original."""
    try:
        buf = memoryview(data).cast("B")
        budget = [_MAX_FIELDS]
        top = list(_fields(buf, 0, len(buf), budget))
        graphs = [f for f in top if f[0] == _MODEL_GRAPH and f[1] == 2]
        if len(graphs) != 1:
            return None
        _, _, gs, ge, _ = graphs[0]
        graph_fields = list(_fields(buf, gs, ge, budget))
        tensors = {}                        # index in graph_fields -> (fields, dropped?)
        found = Initializers([], [])
        for k, (n, w, s, e, _) in enumerate(graph_fields):
            if n == _GRAPH_INITIALIZER and w == 2:
                fields, name, raw, dims, dtype = _tensor(buf, s, e, budget)
                found.names.append(name)
                found.lengths.append(raw)
                if droppable is not None and raw is not None and droppable(dims, dtype, raw):
                    tensors[k] = fields
    except _Malformed:
        return None
    if tensors:                             # only now is a copy worth making
        found.light = _copy_without(buf, top, graph_fields, tensors)
    return found


def _copy_without(buf: memoryview, top, graph_fields, tensors: dict) -> bytes:
    graph = bytearray()
    for k, (n, w, s, e, start) in enumerate(graph_fields):
        if k not in tensors:
            graph += buf[start:e]
            continue
        tensor = bytearray()
        for tn, tw, _ts, te, tstart in tensors[k]:
            if (tn, tw) == (_TENSOR_RAW_DATA, 2):
                tensor += _key(_TENSOR_RAW_DATA, 2) + b"\x00"      # present, empty
            else:
                tensor += buf[tstart:te]
        graph += _key(_GRAPH_INITIALIZER, 2) + _varint_bytes(len(tensor)) + tensor
    out = bytearray()
    for n, w, s, e, start in top:
        if n == _MODEL_GRAPH and w == 2:
            out += _key(_MODEL_GRAPH, 2) + _varint_bytes(len(graph)) + graph
        else:
            out += buf[start:e]
    return bytes(out)


def initializer_raw_lengths(data: Any, model) -> list[int | None] | None:
    """For each main-graph initializer of `model` (parsed from `data`), the length of its raw_data
    (None when it has no raw_data field); None when the wire walk does not agree with `model`."""
    found = read_initializers(data)
    return found.lengths if found is not None and found.agree_with(model) else None


def _varint_bytes(n: int) -> bytes:
    out = bytearray()
    while True:
        b, n = n & 0x7F, n >> 7
        out.append(b | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _key(number: int, wire: int) -> bytes:
    return _varint_bytes(number << 3 | wire)
