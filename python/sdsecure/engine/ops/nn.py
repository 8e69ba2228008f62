"""Compute-heavy ONNX ops: MatMul/Gemm, Conv, normalisations, Softmax, reductions, Resize, pooling."""

from __future__ import annotations

import numpy as np
import onnx
from max.graph import ops
from max.graph.type import FilterLayout

from sdsecure.engine.ops import Node, register
from sdsecure.engine.ops.elementwise import _float_only, operand


# -- linear algebra ------------------------------------------------------------------------------
def _matmul_check(n: Node, **_) -> str | None:
    if any(i is not None and i.size == 0 for i in n.in_infos[:2]):
        return "empty operand"
    return _float_only(n)


@register("MatMul", check=_matmul_check)
def matmul(n: Node, a, b):
    return ops.matmul(n.t(a), n.t(b))


@register("Gemm", check=_matmul_check)
def gemm(n: Node, a, b, c=None, *, alpha: float, beta: float, transA: int, transB: int):  # noqa: N803
    x, w = n.t(a), n.t(b)
    if transA:
        x = ops.transpose(x, 0, 1)
    if transB:
        w = ops.transpose(w, 0, 1)
    y = ops.matmul(x, w)
    if alpha != 1.0:
        y = y * n.scalar(alpha, y)
    if c is not None and beta != 0.0:
        bias = operand(n, c, y)
        if beta != 1.0:
            bias = bias * n.scalar(beta, y)
        y = y + bias
    return y


# -- convolution ---------------------------------------------------------------------------------
def _conv_pads(n: Node, auto_pad: str, pads, kernel: list[int], strides: list[int], dilations: list[int]):
    spatial = list(n.in_infos[0].shape[2:])
    k = len(spatial)
    if auto_pad in ("SAME_UPPER", "SAME_LOWER"):
        before, after = [], []
        for size, kk, s, d in zip(spatial, kernel, strides, dilations):
            out = -(-size // s)
            total = max(0, (out - 1) * s + (kk - 1) * d + 1 - size)
            small, big = total // 2, total - total // 2
            before.append(small if auto_pad == "SAME_UPPER" else big)
            after.append(big if auto_pad == "SAME_UPPER" else small)
        return before, after
    if auto_pad == "VALID" or pads is None:
        return [0] * k, [0] * k
    return list(pads[:k]), list(pads[k:])


def _conv_check(n: Node, *, auto_pad: str, **_) -> str | None:
    rank = len(n.in_infos[0].shape) if n.in_infos[0] else 0
    if rank not in (3, 4):
        return f"{rank - 2}-D convolution (1-D and 2-D supported)"
    if auto_pad not in ("NOTSET", "VALID", "SAME_UPPER", "SAME_LOWER"):
        return f"auto_pad={auto_pad!r}"
    return _float_only(n)


@register("Conv", const_inputs=(1,), check=_conv_check)
def conv(n: Node, x, w, b=None, *, auto_pad: str, dilations=None, group: int, kernel_shape=None, pads=None,
         strides=None):
    """ONNX Conv is NCHW/OIHW; MAX's conv2d is NHWC with the filter as FCRS (= OIHW, no copy) (G1).
    A 4-D Conv is normally converted channels-last by engine.layout; this is the NCHW form."""
    one_d = len(n.in_infos[0].shape) == 3
    x = n.t(x)
    if one_d:
        x = ops.unsqueeze(x, 2)
    y = conv2d_nhwc(n, ops.permute(x, [0, 2, 3, 1]), w, b, auto_pad=auto_pad, dilations=dilations, group=group,
                    kernel_shape=kernel_shape, pads=pads, strides=strides)
    y = ops.permute(y, [0, 3, 1, 2])
    if one_d:
        y = ops.squeeze(y, 2)
    return y


def conv2d_nhwc(n: Node, x, w, b=None, *, auto_pad: str, dilations=None, group: int, kernel_shape=None, pads=None,
                strides=None):
    """The ONNX Conv of node `n` on an NHWC input `x` (1-D convs as H=1), giving NHWC."""
    one_d = len(n.in_infos[0].shape) == 3
    kernel = list(n.in_infos[1].shape[2:])
    k = len(kernel)
    strides = list(strides or [1] * k)
    dilations = list(dilations or [1] * k)
    before, after = _conv_pads(n, auto_pad, pads, kernel, strides, dilations)
    f = n._emitter.tensor(w, weight=True)   # a constant 1x1 filter does not compile (max_notes G2)
    if one_d:
        f = ops.unsqueeze(f, 2)
        strides, dilations, before, after = [1] + strides, [1] + dilations, [0] + before, [0] + after
    return ops.conv2d(x, f, stride=tuple(strides), dilation=tuple(dilations),
                      padding=(before[0], after[0], before[1], after[1]), groups=group,
                      bias=None if b is None else n.t(b), filter_layout=FilterLayout.FCRS)


def upsample_conv2x_nhwc(n: Node, x, phases, bias=None, taps: bool = False):
    """fuse.UpsampleConv2x on an NHWC input [N, H, W, C]: Conv3x3(nearest x2 upsampling of x) as four 2x2
    convs of x, one per output phase (a, b), interleaved into [N, 2H, 2W, F]. With `taps` the phase
    filters are laid out [4, C, F] and each conv is one matmul per tap (engine.tap_conv)."""
    from sdsecure.engine import tap_conv

    batch, h, w, _ = (int(d) for d in x.shape)
    b = None if bias is None else n.t(bias)

    def phase_conv(a: int, c: int):
        f = n._emitter.tensor(phases[2 * a + c], weight=True)
        if taps:
            return tap_conv.conv_nhwc(x, f, (2, 2), (1 - a, 1 - c, a, c), b)
        return ops.conv2d(x, f, padding=(1 - a, a, 1 - c, c), bias=b, filter_layout=FilterLayout.FCRS)

    rows = []
    for a in (0, 1):
        cols = [phase_conv(a, c) for c in (0, 1)]
        f = int(cols[0].shape[3])
        rows.append(ops.reshape(ops.stack(cols, axis=3), [batch, h, 2 * w, f]))    # columns 2j, 2j+1
    return ops.reshape(ops.stack(rows, axis=2), [batch, 2 * h, 2 * w, f])           # rows 2i, 2i+1


# -- normalisation -------------------------------------------------------------------------------
def _vector(n: Node, x, length: int, like, fill: float):
    if x is None:
        return n.t(np.full((length,), fill, dtype=like.dtype.to_numpy()))
    v = n.t(x)
    if v.rank != 1:
        v = ops.reshape(v, [length])
    return v


_VECTOR_SAFE = 64              # see group_norm
_EXPANDED_AFFINE_CAP = 1 << 20  # elements of a [G, L] scale/bias


def group_norm(n: Node, x, groups: int, epsilon: float, scale=None, bias=None):
    """Normalise each group of channels of x [N, C, ...] over (its channels, spatial), then apply a
    per-channel scale and bias (torch.nn.GroupNorm).

    MAX's fused `ops.group_norm` CPU kernel is an order of magnitude slower than its layer_norm kernel
    (6 ms vs 0.46 ms on [2, 320, 32, 32]; onnxruntime 0.41 ms), so each group is flattened onto the last
    axis and normalised by layer_norm. Careful: MAX fuses the per-channel affine that follows into the
    layer_norm kernel, and that fused epilogue is wrong when a SIMD vector of a row spans several
    channels (seen with 2x2 spatial maps: errors of 0.5). So the affine is applied per position on the
    [N, G, L] rows (scale/bias expanded to [G, L]) unless the spatial size is a multiple of 64, and the
    slow kernel is kept when the expanded arrays would be large."""
    x = n.t(x)
    shape = [int(d) for d in x.shape]
    rank, channels = len(shape), shape[1]
    spatial = int(np.prod(shape[2:], dtype=np.int64))
    length = (channels // groups) * spatial
    per_channel = [channels] + [1] * (rank - 2)
    rows_safe = spatial % _VECTOR_SAFE == 0
    const_affine = all(v is None or isinstance(v, np.ndarray) for v in (scale, bias))
    if epsilon <= 0 or (not rows_safe and (not const_affine or channels * spatial > _EXPANDED_AFFINE_CAP)):
        g = scale if scale is not None else np.ones(channels, n.in_infos[0].dtype)
        b = bias if bias is not None else np.zeros(channels, n.in_infos[0].dtype)
        return ops.group_norm(x, ops.reshape(n.t(g), [channels]), ops.reshape(n.t(b), [channels]),
                              num_groups=groups, epsilon=max(float(epsilon), 1e-30))
    flat = ops.reshape(x, [shape[0], groups, length])
    # real arrays: with a broadcast view for gamma/beta MAX's kernel reads past its one element
    y = ops.layer_norm(flat, n._emitter.filled(1.0, length, x.dtype), n._emitter.filled(0.0, length, x.dtype),
                       float(epsilon))
    if rows_safe:
        y = ops.reshape(y, shape)
        if scale is not None:
            y = y * ops.reshape(n.t(scale), per_channel)
        if bias is not None:
            y = y + ops.reshape(n.t(bias), per_channel)
        return y
    dtype = n.in_infos[0].dtype
    if scale is not None:
        y = y * n.t(np.repeat(np.asarray(scale, dtype).reshape(channels), spatial).reshape(groups, length))
    if bias is not None:
        y = y + n.t(np.repeat(np.asarray(bias, dtype).reshape(channels), spatial).reshape(groups, length))
    return ops.reshape(y, shape)


def group_norm_nhwc(n: Node, x, groups: int, epsilon: float, scale: np.ndarray, bias: np.ndarray):
    """group_norm on the channels-last form x [N, H, W, C] (engine.layout), or None when it does not apply.

    Two passes (the mean, then the mean squared deviation), each reducing W, then H, then the channels
    of a group: with C contiguous no transpose is needed, and reducing W then H gives MAX parallel work
    at every stage (4.3 ms on [1, 256, 256, 128]; 17 ms reducing H*W at once; 56 ms for the NCHW
    layer_norm form with the permutes that the convolutions around it would then need)."""
    shape = [int(d) for d in x.shape]
    if len(shape) != 4:
        return None
    batch, channels = shape[0], shape[3]
    if epsilon <= 0 or channels % groups or scale.size != channels or bias.size != channels:
        return None
    per_group = channels // groups

    def group_mean(v):                      # [N, H, W, C] -> each group's mean, per channel [N, 1, 1, C]
        per_channel = ops.reshape(ops.mean(ops.mean(v, axis=2), axis=1), [batch, 1, groups, per_group])
        g = ops.broadcast_to(ops.mean(per_channel, axis=3), [batch, 1, groups, per_group])
        return ops.reshape(g, [batch, 1, 1, channels])

    centred = x - group_mean(x)
    var = group_mean(centred * centred)
    dtype = scale.dtype if np.issubdtype(scale.dtype, np.floating) else np.float32
    gain = ops.rsqrt(var + n.scalar(float(epsilon), x)) * n.t(np.ascontiguousarray(scale, dtype).reshape(channels))
    return centred * gain + n.t(np.ascontiguousarray(bias, dtype).reshape(channels))


@register("InstanceNormalization", check=_float_only)
def instance_norm(n: Node, x, scale, bias, *, epsilon: float):
    """MAX's own group_norm kernel (slow but safe here: what follows the node is not ours to shape;
    the GroupNorm pattern of SD's exporters is rewritten to the fast path by engine.fuse)."""
    x = n.t(x)
    channels = int(x.shape[1])
    return ops.group_norm(x, _vector(n, scale, channels, x, 1.0), _vector(n, bias, channels, x, 0.0),
                          num_groups=channels, epsilon=float(epsilon))


def _layer_norm_check(n: Node, **_) -> str | None:
    return _float_only(n)


@register("LayerNormalization", 17, check=_layer_norm_check)
def layer_norm(n: Node, x, scale, bias=None, *, axis: int, epsilon: float, stash_type: int):
    shape = n.in_infos[0].shape
    axis %= len(shape)
    norm_shape = list(shape[axis:])
    size = int(np.prod(norm_shape))
    x = n.t(x)
    extra = len(n.proto.output) > 1
    fused = not extra and all(i is None or i.shape[-len(norm_shape):] == tuple(norm_shape) and i.size == size
                              for i in n.in_infos[1:3])
    if fused and float(epsilon) > 0:
        flat = x if axis == len(shape) - 1 else ops.reshape(x, list(shape[:axis]) + [size])
        y = ops.layer_norm(flat, _vector(n, scale, size, x, 1.0), _vector(n, bias, size, x, 0.0), float(epsilon))
        return y if axis == len(shape) - 1 else ops.reshape(y, list(shape))
    # general broadcasting scale/bias: spell it out
    axes = list(range(axis, len(shape)))
    mean = _reduce_axes(x, axes, ops.mean)
    d = x - mean
    var = _reduce_axes(d * d, axes, ops.mean)
    inv_std = ops.rsqrt(var + n.scalar(float(epsilon), x))
    y = d * inv_std * operand(n, scale, x)
    if bias is not None:
        y = y + operand(n, bias, x)
    if extra:
        return y, mean, inv_std
    return y


@register("BatchNormalization", 9)
def batch_norm(n: Node, x, scale, bias, mean, var, *, epsilon: float, momentum: float = 0.9,
               training_mode: int = 0):
    x = n.t(x)
    rank = x.rank
    if isinstance(scale, np.ndarray) and isinstance(var, np.ndarray) and isinstance(mean, np.ndarray) \
            and isinstance(bias, np.ndarray):
        k = (scale / np.sqrt(var + np.asarray(epsilon, var.dtype))).astype(scale.dtype)
        c = (bias - mean * k).astype(scale.dtype)
        shape = [-1] + [1] * (rank - 2)
        return x * n.t(k.reshape(shape)) + n.t(c.reshape(shape))
    shape = [-1] + [1] * (rank - 2)
    s, b, m, v = (ops.reshape(n.t(t), shape) for t in (scale, bias, mean, var))
    return (x - m) * ops.rsqrt(v + n.scalar(float(epsilon), x)) * s + b


def _bn_check(n: Node, *, training_mode: int = 0, **_) -> str | None:
    if training_mode or len([o for o in n.proto.output if o]) > 1:
        return "training mode"
    return _float_only(n)


register("BatchNormalization", 14, check=_bn_check)(batch_norm)
register("BatchNormalization", 15, check=_bn_check)(batch_norm)


# -- softmax -------------------------------------------------------------------------------------
def _softmax_last(x, fn, axis: int):
    rank = x.rank
    axis %= rank
    if axis == rank - 1:
        return fn(x)
    perm = list(range(rank))
    perm[axis], perm[-1] = perm[-1], perm[axis]
    return ops.permute(fn(ops.permute(x, perm)), perm)


def _softmax_like(op_type: str, fn) -> None:
    @register(op_type, 13, check=_float_only)
    def convert(n: Node, x, *, axis: int):
        return _softmax_last(n.t(x), fn, axis)

    @register(op_type, 1, check=_float_only)
    def convert_v1(n: Node, x, *, axis: int):
        shape = n.in_infos[0].shape
        axis %= max(1, len(shape))
        rows = int(np.prod(shape[:axis]))
        flat = ops.reshape(n.t(x), [rows, int(np.prod(shape[axis:]))])
        return ops.reshape(fn(flat), list(shape))


_softmax_like("Softmax", ops.softmax)
_softmax_like("LogSoftmax", ops.logsoftmax)


# -- reductions ----------------------------------------------------------------------------------
def _reduce_axes(x, axes: list[int], fn):
    for a in sorted({a % x.rank for a in axes}):
        x = fn(x, axis=a)
    return x


def _finish_reduce(n: Node, y):
    out = list(n.out_shape)
    return y if [int(d) for d in y.shape] == out else ops.reshape(y, out)


_REDUCERS = {
    "ReduceSum": (None, ops.sum, None),
    "ReduceMean": (None, ops.mean, None),
    "ReduceMax": (None, ops.max, None),
    "ReduceMin": (None, ops.min, None),
    "ReduceProd": (None, ops.prod, None),
    "ReduceSumSquare": (lambda x: x * x, ops.sum, None),
    "ReduceL1": (ops.abs, ops.sum, None),
    "ReduceL2": (lambda x: x * x, ops.sum, ops.sqrt),
    "ReduceLogSum": (None, ops.sum, ops.log),
}
# opset where `axes` became an input
_AXES_INPUT_SINCE = {"ReduceSum": 13}


def _reduce(n: Node, x, axes, keepdims: int, noop_with_empty_axes: int, op_type: str):
    pre, fn, post = _REDUCERS[op_type]
    x = n.t(x)
    axes = [] if axes is None else [int(a) for a in np.asarray(axes).reshape(-1)]
    if not axes:
        if noop_with_empty_axes:
            return x
        axes = list(range(x.rank))
    if x.rank == 0:
        y = x
        if pre is not None:
            y = pre(y)
        return post(y) if post is not None else y
    if pre is not None:
        x = pre(x)
    y = _reduce_axes(x, axes, fn)
    if post is not None:
        y = post(y)
    return _finish_reduce(n, y)


def _reduce_check(n: Node, **_) -> str | None:
    info = n.in_infos[0]
    if info is not None and info.size == 0:
        return "empty input"
    return None


def _make_reducer(op_type: str) -> None:
    since = _AXES_INPUT_SINCE.get(op_type, 18)

    @register(op_type, 1, check=_reduce_check)
    def convert_attr(n: Node, x, *, axes=None, keepdims: int):
        return _reduce(n, x, axes, keepdims, 0, op_type)

    @register(op_type, since, const_inputs=(1,), check=_reduce_check)
    def convert_input(n: Node, x, axes=None, *, keepdims: int, noop_with_empty_axes: int):
        return _reduce(n, x, axes, keepdims, noop_with_empty_axes, op_type)


for _op in _REDUCERS:
    _make_reducer(_op)


@register("ReduceLogSumExp", 1, check=_reduce_check)
def reduce_log_sum_exp_v1(n: Node, x, *, axes=None, keepdims: int):
    return _log_sum_exp(n, x, axes, keepdims, 0)


@register("ReduceLogSumExp", 18, const_inputs=(1,), check=_reduce_check)
def reduce_log_sum_exp(n: Node, x, axes=None, *, keepdims: int, noop_with_empty_axes: int):
    return _log_sum_exp(n, x, axes, keepdims, noop_with_empty_axes)


def _log_sum_exp(n: Node, x, axes, keepdims, noop):
    x = n.t(x)
    axes = [] if axes is None else [int(a) for a in np.asarray(axes).reshape(-1)]
    if not axes:
        if noop:
            return x
        axes = list(range(x.rank))
    m = _reduce_axes(x, axes, ops.max)
    m = ops.where(ops.is_inf(m), ops.broadcast_to(n.scalar(0.0, m), [int(d) for d in m.shape]), m)
    y = ops.log(_reduce_axes(ops.exp(x - m), axes, ops.sum)) + m
    return _finish_reduce(n, y)


def _arg(fn, n: Node, x, axis: int, select_last_index: int):
    x = n.t(x)
    axis %= x.rank
    if select_last_index:
        dim = int(x.shape[axis])
        rev = ops.gather(x, n.t(np.arange(dim - 1, -1, -1, dtype=np.int64)), axis=axis)
        idx = fn(rev, axis=axis)
        y = n.scalar(dim - 1, idx) - idx
    else:
        y = fn(x, axis=axis)
    return _finish_reduce(n, y)


@register("ArgMax")
def argmax(n: Node, x, *, axis: int, keepdims: int, select_last_index: int = 0):
    return _arg(ops.argmax, n, x, axis, select_last_index)


@register("ArgMin")
def argmin(n: Node, x, *, axis: int, keepdims: int, select_last_index: int = 0):
    return _arg(ops.argmin, n, x, axis, select_last_index)


@register("GlobalAveragePool", check=_float_only)
def global_average_pool(n: Node, x):
    x = n.t(x)
    return _reduce_axes(x, list(range(2, x.rank)), ops.mean)


@register("GlobalMaxPool", check=_float_only)
def global_max_pool(n: Node, x):
    x = n.t(x)
    return _reduce_axes(x, list(range(2, x.rank)), ops.max)


# -- Resize --------------------------------------------------------------------------------------
_MATRIX_CAP = 1 << 22


def _resize_check(n: Node, *, mode: str = "nearest", keep_aspect_ratio_policy: str = "stretch",
                  coordinate_transformation_mode: str = "half_pixel", **_) -> str | None:
    if keep_aspect_ratio_policy != "stretch":
        return f"keep_aspect_ratio_policy={keep_aspect_ratio_policy!r}"
    shape_in, shape_out = n.in_infos[0].shape, n.out_infos[0].shape if n.out_infos[0] else None
    if shape_out is None:
        return "output shape unknown"
    for i, o in zip(shape_in, shape_out):
        if (mode != "nearest" or coordinate_transformation_mode == "tf_crop_and_resize") and i * o > _MATRIX_CAP:
            return f"{mode} resize of a {i}->{o} axis"
    return _float_only(n) if mode != "nearest" else None


def _axis_operator(n: Node, axis: int, roi, scales, sizes, attrs: dict) -> tuple[str, np.ndarray | None, np.ndarray | None]:
    """How ONNX resizes one axis, found by running ONNX's reference Resize on a 2-D probe.

    Returns ("identity"|"gather"|"matrix", indices or matrix [out, in], bias [out] or None)."""
    from onnx.reference import ReferenceEvaluator

    length, out = n.in_infos[0].shape[axis], n.out_shape[axis]
    rank = len(n.in_infos[0].shape)
    opset = max(n.opset, 11)
    node_attrs = {k: v for k, v in attrs.items() if k not in ("axes", "keep_aspect_ratio_policy") and v is not None}
    use_sizes = sizes is not None
    probe_roi = None
    if roi is not None and np.asarray(roi).size:
        r = np.asarray(roi, np.float32).reshape(-1)
        probe_roi = np.array([0, r[axis], 1, r[axis + rank]], np.float32)
    inputs = ["X", "roi" if probe_roi is not None else "", "" if use_sizes else "scales", "sizes" if use_sizes else ""]
    node = onnx.helper.make_node("Resize", inputs, ["Y"], **node_attrs)

    def run(x: np.ndarray) -> np.ndarray:
        feeds = {"X": x}
        if probe_roi is not None:
            feeds["roi"] = probe_roi
        if use_sizes:
            feeds["sizes"] = np.array([x.shape[0], out], np.int64)
        else:
            feeds["scales"] = np.array([1.0, float(scales[axis])], np.float32)
        y = ReferenceEvaluator(node, opsets={"": opset}).run(None, feeds)[0]
        if y.shape[1] != out:
            raise ValueError(f"Resize probe gave {y.shape[1]} elements on axis {axis}, shape inference {out}")
        return y

    crop = attrs.get("coordinate_transformation_mode") == "tf_crop_and_resize"
    if attrs.get("mode", "nearest") == "nearest" and not crop:
        idx = run(np.arange(length, dtype=np.float64)[None, :].astype(np.float32))[0].astype(np.int64)
        if out == length and np.array_equal(idx, np.arange(length)):
            return "identity", None, None
        return "gather", idx, None
    bias = run(np.zeros((1, length), np.float32))[0]   # what does not depend on x (extrapolation)
    matrix = run(np.eye(length, dtype=np.float32)).T - bias[:, None]  # [out, in]
    if out == length and np.array_equal(matrix, np.eye(length)) and not bias.any():
        return "identity", None, None
    return "matrix", matrix, (bias if bias.any() else None)


def _repeat_factor(idx: np.ndarray) -> int:
    """k when the gather indices are [0]*k + [1]*k + ... (nearest upsampling by an integer factor)."""
    if idx.size == 0:
        return 0
    k = idx.size // (int(idx[-1]) + 1)
    if k >= 1 and idx.size == k * (int(idx[-1]) + 1) and np.array_equal(idx, np.repeat(np.arange(idx[-1] + 1), k)):
        return k
    return 0


def _resize(n: Node, x, roi, scales, sizes, attrs: dict):
    rank = len(n.in_infos[0].shape)
    axes = attrs.get("axes")
    if axes is not None:  # opset 18: scales/sizes/roi name only these axes
        axes = [a % rank for a in axes]
        full_scales = np.ones(rank, np.float32)
        full_sizes = np.array(n.in_infos[0].shape, np.int64)
        full_roi = np.concatenate([np.zeros(rank), np.ones(rank)]).astype(np.float32)
        for i, a in enumerate(axes):
            if scales is not None and np.asarray(scales).size:
                full_scales[a] = np.asarray(scales).reshape(-1)[i]
            if sizes is not None and np.asarray(sizes).size:
                full_sizes[a] = np.asarray(sizes).reshape(-1)[i]
            if roi is not None and np.asarray(roi).size:
                r = np.asarray(roi).reshape(-1)
                full_roi[a], full_roi[a + rank] = r[i], r[i + len(axes)]
        scales = full_scales if scales is not None and np.asarray(scales).size else None
        sizes = full_sizes if sizes is not None and np.asarray(sizes).size else None
        roi = full_roi if roi is not None and np.asarray(roi).size else None
    if scales is not None and not np.asarray(scales).size:
        scales = None
    if sizes is not None and not np.asarray(sizes).size:
        sizes = None
    if scales is not None:
        scales = np.asarray(scales, np.float32).reshape(-1)
    y = n.t(x)
    plan = []
    for axis in range(rank):
        if sizes is None and scales is not None and scales[axis] == 1.0 and \
                attrs.get("coordinate_transformation_mode") != "tf_crop_and_resize":
            continue
        plan.append((axis, *_axis_operator(n, axis, roi, scales, sizes, attrs)))
    repeats = {axis: _repeat_factor(op) for axis, kind, op, _ in plan if kind == "gather"}
    if plan and all(kind == "gather" and repeats[axis] for axis, kind, _, _ in plan):
        # integer nearest upsampling (SD's 2x): one broadcast instead of a gather per axis
        shape = [int(d) for d in y.shape]
        expanded, target = [], []
        for axis, dim in enumerate(shape):
            expanded.append(dim)
            target.append(dim)
            if axis in repeats:
                expanded.append(1)
                target.append(repeats[axis])
        y = ops.broadcast_to(ops.reshape(y, expanded), target)
        return ops.reshape(y, list(n.out_shape))
    for axis, kind, op, bias in plan:
        if kind == "gather":
            y = ops.gather(y, n.t(op), axis=axis)
        elif kind == "matrix":
            perm = list(range(rank))
            perm[axis], perm[-1] = perm[-1], perm[axis]
            moved = ops.permute(y, perm) if axis != rank - 1 else y
            res = ops.matmul(moved, n.t(np.ascontiguousarray(op.T.astype(y.dtype.to_numpy()))))
            if bias is not None:
                res = res + n.t(bias.astype(y.dtype.to_numpy()))
            y = ops.permute(res, perm) if axis != rank - 1 else res
    return y


def nearest_repeats(n: Node, consts: list, kwargs: dict) -> dict[int, int] | None:
    """{axis: k} when the Resize node `n` is integer nearest upsampling (each element repeated k times on
    each resized axis, every other axis unchanged); None otherwise. consts: the node's constant inputs."""
    if kwargs.get("mode", "nearest") != "nearest" or kwargs.get("antialias") or kwargs.get("axes") is not None:
        return None
    if "coordinate_transformation_mode" in kwargs:          # opset 11+: X, roi, scales, sizes
        roi, scales, sizes = (consts + [None] * 4)[1:4]
        attrs = dict(kwargs)
    else:                                                    # opset 10: X, scales
        roi, scales, sizes = None, consts[1], None
        attrs = dict(mode="nearest", coordinate_transformation_mode="asymmetric", nearest_mode="floor")
    if attrs.get("coordinate_transformation_mode") == "tf_crop_and_resize":
        return None
    scales = None if scales is None or not np.asarray(scales).size else np.asarray(scales, np.float32).reshape(-1)
    sizes = None if sizes is None or not np.asarray(sizes).size else sizes
    repeats = {}
    for axis in range(len(n.in_infos[0].shape)):
        if sizes is None and scales is not None and scales[axis] == 1.0:
            continue
        kind, idx, _ = _axis_operator(n, axis, roi, scales, sizes, attrs)
        if kind == "identity":
            continue
        k = _repeat_factor(idx) if kind == "gather" else 0
        if not k:
            return None
        repeats[axis] = k
    return repeats


@register("Resize", 11, const_inputs=(1, 2, 3), check=_resize_check)
def resize(n: Node, x, roi=None, scales=None, sizes=None, *, mode: str, coordinate_transformation_mode: str,
           nearest_mode: str, cubic_coeff_a: float, exclude_outside: int, extrapolation_value: float,
           antialias: int = 0, axes=None, keep_aspect_ratio_policy: str = "stretch"):
    attrs = dict(mode=mode, coordinate_transformation_mode=coordinate_transformation_mode, nearest_mode=nearest_mode,
                 cubic_coeff_a=cubic_coeff_a, exclude_outside=exclude_outside,
                 extrapolation_value=extrapolation_value, antialias=antialias, axes=axes)
    return _resize(n, x, roi, scales, sizes, attrs)


@register("Resize", 10, const_inputs=(1,), check=_resize_check)
def resize_v10(n: Node, x, scales, *, mode: str):
    # opset 10 semantics are those of opset 11 with asymmetric coordinates and floor rounding
    attrs = dict(mode=mode, coordinate_transformation_mode="asymmetric", nearest_mode="floor")
    return _resize(n, x, None, scales, None, attrs)


@register("Hardmax", 13, check=_float_only)
def hardmax(n: Node, x, *, axis: int):
    x = n.t(x)
    axis %= x.rank
    dim = int(x.shape[axis])
    first = ops.argmax(x, axis=axis)                     # ties: the first index (CPU)
    positions = np.arange(dim, dtype=np.int64).reshape([dim if a == axis else 1 for a in range(x.rank)])
    return ops.cast(ops.equal(first, n.t(positions)), x.dtype)


@register("LpNormalization", 1, check=_float_only)
def lp_normalization(n: Node, x, *, axis: int, p: int):
    x = n.t(x)
    if int(p) == 1:
        norm = ops.sum(ops.abs(x), axis=axis % x.rank)
    else:
        norm = ops.sqrt(ops.sum(x * x, axis=axis % x.rank))
    zero = n.scalar(0.0, x)
    return ops.where(ops.equal(norm, zero), zero, x / norm)


@register("RMSNormalization", 23, check=_float_only)
def rms_normalization(n: Node, x, scale, *, axis: int, epsilon: float, stash_type: int):
    x = n.t(x)
    axes = list(range(axis % x.rank, x.rank))
    ms = _reduce_axes(x * x, axes, ops.mean)
    return x * ops.rsqrt(ms + n.scalar(float(epsilon), x)) * operand(n, scale, x)
