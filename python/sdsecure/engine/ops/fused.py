"""Converters for the private fused ops that `sdsecure.engine.fuse` writes (domain `sdsecure.fused`)."""

from __future__ import annotations

from max.graph import ops

from sdsecure.engine import packed_matmul, tap_conv, winograd
from sdsecure.engine.ops import PRIVATE_DOMAIN, Node, register
from sdsecure.engine.ops.nn import group_norm as _group_norm, upsample_conv2x_nhwc


@register("GroupNorm", domain=PRIVATE_DOMAIN)
def group_norm(n: Node, x, gamma, beta, *, num_groups: int, epsilon: float):
    """torch.nn.GroupNorm on [N, C, ...] (see ops.nn.group_norm for how)."""
    return _group_norm(n, x, int(num_groups), float(epsilon), gamma, beta)


@register("UpsampleConv2x", domain=PRIVATE_DOMAIN)
def upsample_conv2x(n: Node, x, w00, w01, w10, w11, bias=None, *, taps: int = 0):
    """Conv 3x3 (pad 1) of the nearest x2 upsampling of x [N, C, H, W] (see engine.fuse); channels-last
    inside, as every conv (engine.layout converts it without these permutes)."""
    y = upsample_conv2x_nhwc(n, ops.permute(n.t(x), [0, 2, 3, 1]), [w00, w01, w10, w11], bias, bool(taps))
    return ops.permute(y, [0, 3, 1, 2])


@register("WinogradConv3x3", domain=PRIVATE_DOMAIN)
def winograd_conv3x3(n: Node, x, u, bias=None):
    """Conv 3x3 (stride 1, pad 1) of x [N, C, H, W] with the Winograd-transformed filter u (see
    engine.winograd); channels-last inside, as every conv."""
    y = winograd.conv3x3_nhwc(ops.permute(n.t(x), [0, 2, 3, 1]), n._emitter.tensor(u, weight=True),
                              None if bias is None else n.t(bias))
    return ops.permute(y, [0, 3, 1, 2])


@register("TapConv", domain=PRIVATE_DOMAIN)
def tap_conv_op(n: Node, x, taps, bias=None, *, kernel_shape, pads):
    """Conv (stride 1) of x [N, C, H, W] as one matmul per filter tap (see engine.tap_conv); channels-last
    inside, as every conv."""
    y = tap_conv.conv_nhwc(ops.permute(n.t(x), [0, 2, 3, 1]), n._emitter.tensor(taps, weight=True),
                           kernel_shape, pads, None if bias is None else n.t(bias))
    return ops.permute(y, [0, 3, 1, 2])


@register("PackedMatMul", domain=PRIVATE_DOMAIN)
def packed_matmul_op(n: Node, x, packed, *, splits=None):
    """MatMul of x [..., K] by a weight stored in MAX's packed matmul layout (engine.packed_matmul); with
    `splits`, the weights of several MatMuls of x side by side, and one output per MatMul."""
    y = packed_matmul.matmul(n.t(x), n._emitter.tensor(packed, weight=True))
    return tuple(ops.split(y, [int(s) for s in splits], axis=-1)) if splits else y
