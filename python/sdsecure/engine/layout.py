"""Channels-last (NHWC) propagation between convolutions.

ONNX images are NCHW; MAX's conv2d is NHWC. Permuting around every Conv costs two copies of the
activation each time, and MAX's permute runs at about 1 GB/s here: 39 ms for one [1, 128, 256, 256]
tensor, when the 3x3 conv on it takes 111 ms. So the importer keeps a 4-D value channels-last from the
Conv that makes it, through the ops that do not care about layout (element-wise arithmetic and
activations, GroupNorm, nearest upsampling, channel Concat, Transpose), to the next Conv; a permute
back to NCHW happens only where an op needs it (a Reshape, a MatMul, a graph output), once per value.

`Emitter` holds both forms of a value (`values`: logical ONNX layout; `nhwc`: channels-last form of a
4-D NCHW value) and builds the missing one on first use. `emit_channels_last` converts a node in
channels-last form when that avoids permutes, and returns False to leave it to the ordinary converter.
"""

from __future__ import annotations

import os

import numpy as np
from max.graph import TensorValue, ops

TO_NHWC = (0, 2, 3, 1)
TO_NCHW = (0, 3, 1, 2)
ENABLED = os.environ.get("SDSECURE_CHANNELS_LAST", "1") != "0"

# element-wise ops whose converters only broadcast their operands: fed channels-last operands, they
# compute the channels-last result
ELEMENTWISE = frozenset({"Add", "Sub", "Mul", "Div", "Sigmoid", "Tanh", "Relu", "Neg", "Exp", "Sqrt", "Erf",
                         "Abs"})


def permute(value: TensorValue, perm: tuple[int, ...]) -> TensorValue:
    """ops.permute, or a reshape when the permutation moves only size-1 axes (no data moves)."""
    shape = [int(d) for d in value.shape]
    moved = [a for a in perm if shape[a] != 1]
    if moved == sorted(moved):
        return ops.reshape(value, [shape[a] for a in perm])
    return ops.permute(value, list(perm))


def nhwc_shape(shape) -> tuple[int, ...]:
    return tuple(int(shape[a]) for a in TO_NHWC)


def nhwc_constant(array: np.ndarray) -> np.ndarray:
    """A constant that broadcasts against a 4-D NCHW value, rearranged to broadcast against its NHWC form."""
    if array.size == 1:
        return array
    a = array.reshape((1,) * (4 - array.ndim) + array.shape)
    return np.ascontiguousarray(a.transpose(TO_NHWC))


def _is_4d_float(info) -> bool:
    return info is not None and len(info.shape) == 4 and np.issubdtype(info.dtype, np.floating)


def emit_channels_last(emitter, node, view, kwargs: dict, opdef) -> bool:
    """Convert `node` channels-last if that is how it is cheaper; True when done (outputs stored)."""
    if not ENABLED:
        return False
    op = node.op_type
    if node.domain == "sdsecure.fused" and op == "GroupNorm":
        return _group_norm(emitter, node, view, kwargs)
    if node.domain == "sdsecure.fused" and op == "UpsampleConv2x":
        return _upsample_conv(emitter, node, view, kwargs)
    if node.domain == "sdsecure.fused" and op == "WinogradConv3x3":
        return _winograd_conv(emitter, node, view)
    if node.domain == "sdsecure.fused" and op == "TapConv":
        return _tap_conv(emitter, node, view, kwargs)
    if node.domain not in ("", "ai.onnx"):
        return False
    if op == "Conv":
        return _conv(emitter, node, view, kwargs)
    if op in ELEMENTWISE:
        return _elementwise(emitter, node, view, kwargs, opdef)
    if op == "Transpose":
        return _transpose(emitter, node, view, kwargs)
    if op == "Concat":
        return _concat(emitter, node, view, kwargs)
    if op == "Resize":
        return _resize(emitter, node, view, kwargs)
    return False


def _resident(emitter, name: str) -> bool:
    return bool(name) and name in emitter.nhwc


def _conv(emitter, node, view, kwargs) -> bool:
    from sdsecure.engine.ops.nn import conv2d_nhwc

    if len(view.in_infos[0].shape) != 4 or not _is_4d_float(view.out_infos[0]) or \
            node.input[0] in emitter.folded.consts:
        return False
    x = emitter.channels_last(node.input[0])
    w = emitter.folded.consts[node.input[1]]
    b = node.input[2] if len(node.input) > 2 and node.input[2] else None
    bias = emitter.folded.consts.get(b) if b else None
    y = conv2d_nhwc(view, x, w, bias if bias is not None else (emitter.logical(b) if b else None), **kwargs)
    emitter.store_channels_last(view, node.output[0], y)
    return True


def _upsample_conv(emitter, node, view, kwargs) -> bool:
    from sdsecure.engine.ops.nn import upsample_conv2x_nhwc

    consts = emitter.folded.consts
    x = emitter.channels_last(node.input[0])
    bias = consts[node.input[5]] if len(node.input) > 5 else None
    y = upsample_conv2x_nhwc(view, x, [consts[i] for i in node.input[1:5]], bias, bool(kwargs.get("taps")))
    emitter.store_channels_last(view, node.output[0], y)
    return True


def _winograd_conv(emitter, node, view) -> bool:
    from sdsecure.engine import winograd

    consts = emitter.folded.consts
    x = emitter.channels_last(node.input[0])
    bias = emitter.tensor(consts[node.input[2]]) if len(node.input) > 2 else None
    y = winograd.conv3x3_nhwc(x, emitter.tensor(consts[node.input[1]], weight=True), bias)
    emitter.store_channels_last(view, node.output[0], y)
    return True


def _tap_conv(emitter, node, view, kwargs) -> bool:
    from sdsecure.engine import tap_conv

    consts = emitter.folded.consts
    x = emitter.channels_last(node.input[0])
    bias = emitter.tensor(consts[node.input[2]]) if len(node.input) > 2 else None
    y = tap_conv.conv_nhwc(x, emitter.tensor(consts[node.input[1]], weight=True), kwargs["kernel_shape"],
                           kwargs["pads"], bias)
    emitter.store_channels_last(view, node.output[0], y)
    return True


def _elementwise(emitter, node, view, kwargs, opdef) -> bool:
    out = view.out_infos[0]
    if not _is_4d_float(out) or not any(_resident(emitter, i) for i in node.input):
        return False
    consts = emitter.folded.consts
    if any(name not in consts and (info is None or info.dtype != out.dtype or len(info.shape) > 4)
           for name, info in zip(node.input, view.in_infos)):
        return False                       # checked before anything is added to the graph
    args = [nhwc_constant(consts[name]) if name in consts else emitter.channels_last(name, rank=len(info.shape))
            for name, info in zip(node.input, view.in_infos)]
    emitter.store_channels_last(view, node.output[0], opdef.fn(view, *args, **kwargs))
    return True


def _group_norm(emitter, node, view, kwargs) -> bool:
    from sdsecure.engine.ops.nn import group_norm_nhwc

    x = node.input[0]
    if not _is_4d_float(view.in_infos[0]) or not _resident(emitter, x):
        return False
    gamma, beta = (emitter.folded.consts.get(i) for i in node.input[1:3])
    if gamma is None or beta is None:
        return False
    y = group_norm_nhwc(view, emitter.nhwc[x], int(kwargs["num_groups"]), float(kwargs["epsilon"]), gamma, beta)
    if y is None:
        return False
    emitter.store_channels_last(view, node.output[0], y)
    return True


def _transpose(emitter, node, view, kwargs) -> bool:
    info = view.in_infos[0]
    if info is None or len(info.shape) != 4:
        return False
    perm = tuple(kwargs.get("perm") or (3, 2, 1, 0))
    x = node.input[0]
    if _resident(emitter, x):
        # out[j] = logical[perm[j]] = physical[TO_NHWC.index(perm[j])]
        q = tuple(TO_NHWC.index(p) for p in perm)
        physical = emitter.nhwc[x]
        emitter.store_logical(view, node.output[0], physical if q == (0, 1, 2, 3) else permute(physical, q))
        return True
    if perm == TO_NCHW:
        # the result's channels-last form is the input itself
        emitter.store_channels_last(view, node.output[0], emitter.logical(x))
        return True
    return False


def _concat(emitter, node, view, kwargs) -> bool:
    out = view.out_infos[0]
    if not _is_4d_float(out) or int(kwargs["axis"]) % 4 != 1 or not any(_resident(emitter, i) for i in node.input):
        return False
    parts = []
    for name, info in zip(node.input, view.in_infos):
        if info is None or info.size == 0:
            continue
        if name in emitter.folded.consts:
            parts.append(emitter.tensor(nhwc_constant(emitter.folded.consts[name])))
        else:
            parts.append(emitter.channels_last(name))
    y = parts[0] if len(parts) == 1 else ops.concat(parts, axis=3)
    emitter.store_channels_last(view, node.output[0], y)
    return True


def _resize(emitter, node, view, kwargs) -> bool:
    from sdsecure.engine.ops.nn import nearest_repeats

    x = node.input[0]
    if not _is_4d_float(view.in_infos[0]) or not _resident(emitter, x):
        return False
    consts = [emitter.folded.consts.get(i) if i else None for i in node.input]
    repeats = nearest_repeats(view, consts, kwargs)
    if repeats is None or set(repeats) - {2, 3}:
        return False
    y = emitter.nhwc[x]
    n, h, w, c = (int(d) for d in y.shape)
    kh, kw = repeats.get(2, 1), repeats.get(3, 1)
    y = ops.broadcast_to(ops.reshape(y, [n, h, 1, w, 1, c]), [n, h, kh, w, kw, c])
    emitter.store_channels_last(view, node.output[0], ops.reshape(y, [n, h * kh, w * kw, c]))
    return True
