"""Data-movement ONNX ops: reshapes, transposes, slicing, gathering, concatenation, padding, tiling.

Shapes are static after specialisation, so every reshape-like op simply reshapes to the output shape
that shape inference computed (`n.out_shape`); index-like inputs must be constants.
"""

from __future__ import annotations

import numpy as np
from max.graph import ops

from sdsecure.engine.ops import Node, register


def _to_shape(n: Node, x):
    return ops.reshape(n.t(x), list(n.out_shape))


@register("Reshape", 5, const_inputs=(1,))
def reshape(n: Node, x, shape, *, allowzero: int = 0):
    return _to_shape(n, x)


@register("Flatten")
def flatten(n: Node, x, *, axis: int):
    return _to_shape(n, x)


@register("Squeeze", 1)
def squeeze_v1(n: Node, x, *, axes=None):
    return _to_shape(n, x)


@register("Squeeze", 13, const_inputs=(1,))
def squeeze(n: Node, x, axes=None):
    return _to_shape(n, x)


@register("Unsqueeze", 1)
def unsqueeze_v1(n: Node, x, *, axes):
    return _to_shape(n, x)


@register("Unsqueeze", 13, const_inputs=(1,))
def unsqueeze(n: Node, x, axes):
    return _to_shape(n, x)


@register("Expand", const_inputs=(1,))
def expand(n: Node, x, shape):
    x = n.t(x)
    if tuple(int(d) for d in x.shape) == n.out_shape:
        return x
    if x.rank < len(n.out_shape):
        x = ops.reshape(x, [1] * (len(n.out_shape) - x.rank) + [int(d) for d in x.shape])
    return ops.broadcast_to(x, list(n.out_shape))


@register("Tile", const_inputs=(1,))
def tile(n: Node, x, repeats):
    return ops.tile(n.t(x), [int(r) for r in repeats])


@register("Transpose")
def transpose(n: Node, x, *, perm=None):
    x = n.t(x)
    perm = list(perm) if perm is not None else list(range(x.rank))[::-1]
    if perm == list(range(x.rank)):
        return x
    return ops.permute(x, perm)


@register("Concat", 4)
def concat(n: Node, *xs, axis: int):
    parts = [n.t(x) for x, info in zip(xs, n.in_infos) if info is None or info.size > 0]
    if len(parts) == 1:
        return parts[0]
    return ops.concat(parts, axis=axis)


def _split_sizes(n: Node, axis: int, split, num_outputs) -> list[int]:
    dim = n.in_infos[0].shape[axis]
    if split is not None:
        return [int(s) for s in np.asarray(split).reshape(-1)]
    count = num_outputs or len(n.proto.output)
    if num_outputs:  # opset 18: the last chunk may be smaller
        chunk = -(-dim // count)
        return [min(chunk, dim - i * chunk) for i in range(count)]
    return [dim // count] * count


@register("Split", 2)
def split_v2(n: Node, x, *, axis: int, split=None):
    return tuple(ops.split(n.t(x), _split_sizes(n, axis, split, None), axis=axis))


@register("Split", 13, const_inputs=(1,))
def split_v13(n: Node, x, split=None, *, axis: int):
    return tuple(ops.split(n.t(x), _split_sizes(n, axis, split, None), axis=axis))


@register("Split", 18, const_inputs=(1,))
def split_v18(n: Node, x, split=None, *, axis: int, num_outputs=None):
    return tuple(ops.split(n.t(x), _split_sizes(n, axis, split, num_outputs), axis=axis))


def _slice(n: Node, x, starts, ends, axes, steps):
    """ONNX Slice with constant starts/ends/axes/steps, as one MAX slice (gather for negative steps)."""
    x = n.t(x)
    shape = n.in_infos[0].shape
    rank = len(shape)
    starts = [int(s) for s in np.asarray(starts).reshape(-1)]
    ends = [int(e) for e in np.asarray(ends).reshape(-1)]
    axes = list(range(len(starts))) if axes is None else [int(a) for a in np.asarray(axes).reshape(-1)]
    steps = [1] * len(starts) if steps is None else [int(s) for s in np.asarray(steps).reshape(-1)]
    index: list[slice] = [slice(None)] * rank
    negative: list[tuple[int, slice]] = []
    for start, end, axis, step in zip(starts, ends, axes, steps):
        axis %= rank
        dim = shape[axis]
        # numpy clamps exactly like ONNX (INT64 max/min included)
        lo, hi, st = slice(start, end, step).indices(dim)
        if step > 0:
            index[axis] = slice(lo, max(lo, hi), st)
        else:
            negative.append((axis, np.arange(lo, hi, st)))
    if any(s != slice(None) for s in index):
        x = ops.slice_tensor(x, [s if s != slice(None) else slice(None) for s in index])
    for axis, idx in negative:
        x = ops.gather(x, n.t(idx.astype(np.int64)), axis=axis)
    return x


@register("Slice", 10, const_inputs=(1, 2, 3, 4))
def slice_(n: Node, x, starts, ends, axes=None, steps=None):
    return _slice(n, x, starts, ends, axes, steps)


@register("Slice", 1)
def slice_v1(n: Node, x, *, starts, ends, axes=None):
    return _slice(n, x, starts, ends, axes, None)


def _norm_indices(idx: np.ndarray, dim: int) -> np.ndarray:
    idx = idx.astype(np.int64)
    return np.where(idx < 0, idx + dim, idx)


@register("Gather")
def gather(n: Node, x, indices, *, axis: int):
    x = n.t(x)
    dim = n.in_infos[0].shape[axis]
    if isinstance(indices, np.ndarray):
        idx = n.t(_norm_indices(indices, dim))
    else:
        idx = n.t(indices)
        idx = ops.where(ops.greater(n.scalar(0, idx), idx), idx + n.scalar(dim, idx), idx)
    return ops.gather(x, idx, axis=axis)


@register("GatherND", 11)
def gather_nd(n: Node, x, indices, *, batch_dims: int = 0):
    x = n.t(x)
    shape = n.in_infos[0].shape
    k = n.in_infos[1].shape[-1]
    dims = np.array(shape[batch_dims:batch_dims + k], dtype=np.int64)
    if isinstance(indices, np.ndarray):
        idx = n.t(np.where(indices < 0, indices + dims, indices).astype(np.int64))
    else:
        idx = n.t(indices)
        idx = ops.where(ops.greater(n.scalar(0, idx), idx), idx + n.t(dims.astype(idx.dtype.to_numpy())), idx)
    return ops.gather_nd(x, idx, batch_dims=batch_dims)


def _pad_check(n: Node, *, mode: str, **_) -> str | None:
    if mode not in ("constant", "reflect", "edge", "wrap"):
        return f"mode={mode!r}"
    return None


@register("Pad", 11, const_inputs=(1, 3), check=_pad_check)
def pad(n: Node, x, pads, value=None, axes=None, *, mode: str):
    x = n.t(x)
    rank = x.rank
    pads = [int(p) for p in np.asarray(pads).reshape(-1)]
    axes = list(range(rank)) if axes is None else [int(a) % rank for a in np.asarray(axes).reshape(-1)]
    half = len(pads) // 2
    before, after = [0] * rank, [0] * rank
    for i, a in enumerate(axes):
        before[a], after[a] = pads[i], pads[i + half]
    # negative pads crop
    if any(p < 0 for p in before + after):
        x = ops.slice_tensor(x, [slice(max(0, -b), int(d) - max(0, -e)) for b, e, d in zip(before, after, x.shape)])
        before = [max(0, b) for b in before]
        after = [max(0, e) for e in after]
    if not any(before + after):
        return x
    flat = [v for b, e in zip(before, after) for v in (b, e)]
    if mode == "wrap":
        for axis, (b, e) in enumerate(zip(before, after)):
            if b or e:
                dim = int(x.shape[axis])
                idx = np.arange(-b, dim + e) % dim
                x = ops.gather(x, n.t(idx.astype(np.int64)), axis=axis)
        return x
    if mode == "constant":
        if value is None:
            fill = n.scalar(0, x)
        elif isinstance(value, np.ndarray):
            fill = n.scalar(value.reshape(-1)[0].item() if value.size else 0, x)
        else:
            fill = ops.reshape(n.t(value), [])
        return ops.pad(x, flat, mode="constant", value=fill)
    return ops.pad(x, flat, mode=mode)


@register("Pad", 2, check=_pad_check)
def pad_v2(n: Node, x, *, pads, mode: str = "constant", value: float = 0.0):
    return pad(n, x, np.asarray(pads), np.asarray(value, dtype=n.in_infos[0].dtype), None, mode=mode)


@register("Trilu", const_inputs=(1,))
def trilu(n: Node, x, k=None, *, upper: int):
    shape = n.in_infos[0].shape
    rows, cols = shape[-2], shape[-1]
    kk = 0 if k is None else int(np.asarray(k).reshape(()))
    i = np.arange(rows)[:, None]
    j = np.arange(cols)[None, :]
    keep = (j - i >= kk) if upper else (j - i <= kk)
    x = n.t(x)
    return ops.where(n.t(keep), x, n.scalar(0, x))


@register("CumSum", const_inputs=(1,))
def cumsum(n: Node, x, axis, *, exclusive: int, reverse: int):
    return ops.cumsum(n.t(x), axis=int(np.asarray(axis).reshape(())), exclusive=bool(exclusive),
                      reverse=bool(reverse))


@register("ConstantOfShape", 9, const_inputs=(0,))
def constant_of_shape(n: Node, shape, *, value=None):
    v = np.zeros((), np.float32) if value is None else np.asarray(value).reshape(())
    fill = ops.reshape(n._emitter.scalar(v.item(), v.dtype), [1] * len(n.out_shape))
    return ops.broadcast_to(fill, list(n.out_shape))


@register("Range", 11, const_inputs=(0, 1, 2))
def range_(n: Node, start, limit, delta):
    # folded in practice; here for completeness (the values are constants)
    s, l, d = (np.asarray(v).reshape(()) for v in (start, limit, delta))
    return n.t(np.arange(s, l, d, dtype=s.dtype))


@register("Shape", 1)
def shape_(n: Node, x, *, start: int = 0, end=None):
    shape = n.in_infos[0].shape
    return n.t(np.array(shape[slice(start, end)], dtype=np.int64))


@register("Size", 1)
def size_(n: Node, x):
    return n.t(np.array(n.in_infos[0].size, dtype=np.int64))


@register("Identity", 1)
def identity(n: Node, x):
    return n.t(x)


def _dropout_check(n: Node, **_) -> str | None:
    mode = n.consts[2] if len(n.consts) > 2 else None
    if len(n.proto.input) > 2 and n.proto.input[2] and (mode is None or bool(np.asarray(mode).reshape(()))):
        return "training mode"
    return None


@register("Dropout", 12, const_inputs=(1, 2), check=_dropout_check)
def dropout(n: Node, x, ratio=None, training_mode=None, *, seed=None):
    """Inference: the identity, and an all-true mask."""
    x = n.t(x)
    if len(n.proto.output) > 1 and n.proto.output[1]:
        shape = list(n.out_infos[1].shape)
        true = ops.reshape(n._emitter.scalar(True, np.bool_), [1] * len(shape))
        return x, ops.broadcast_to(true, shape)
    return x


@register("DepthToSpace", 1)
def depth_to_space(n: Node, x, *, blocksize: int, mode: str = "DCR"):
    b = int(blocksize)
    N, C, H, W = n.in_infos[0].shape
    x = n.t(x)
    if mode == "CRD":
        y = ops.permute(ops.reshape(x, [N, C // (b * b), b, b, H, W]), [0, 1, 4, 2, 5, 3])
    else:
        y = ops.permute(ops.reshape(x, [N, b, b, C // (b * b), H, W]), [0, 3, 4, 1, 5, 2])
    return ops.reshape(y, [N, C // (b * b), H * b, W * b])


@register("SpaceToDepth", 1)
def space_to_depth(n: Node, x, *, blocksize: int, mode: str = "DCR"):
    b = int(blocksize)
    N, C, H, W = n.in_infos[0].shape
    y = ops.reshape(n.t(x), [N, C, H // b, b, W // b, b])
    y = ops.permute(y, [0, 1, 3, 5, 2, 4] if mode == "CRD" else [0, 3, 5, 1, 2, 4])
    return ops.reshape(y, [N, C * b * b, H // b, W // b])


@register("OneHot", 9, const_inputs=(1, 2))
def one_hot(n: Node, indices, depth, values, *, axis: int):
    d = int(np.asarray(depth).reshape(-1)[0])
    rank = len(n.out_shape)
    axis %= rank
    idx = n.t(indices)
    if idx.dtype.is_float():
        idx = ops.cast(ops.floor(idx), idx.dtype)
    idx = ops.where(ops.greater(n.scalar(0, idx), idx), idx + n.scalar(d, idx), idx)
    idx = ops.unsqueeze(idx, axis)
    positions = np.arange(d).reshape([d if a == axis else 1 for a in range(rank)]).astype(idx.dtype.to_numpy())
    off, on = np.asarray(values).reshape(-1)[:2]
    hot = ops.equal(idx, n.t(positions))
    return ops.where(hot, n._emitter.scalar(on.item(), values.dtype), n._emitter.scalar(off.item(), values.dtype))


@register("EyeLike", 9)
def eye_like(n: Node, x, *, dtype=None, k: int = 0):
    rows, cols = n.out_shape
    return n.t(np.eye(rows, cols, k=int(k), dtype=n.out_infos[0].dtype))
