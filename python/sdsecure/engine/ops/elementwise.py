"""Element-wise ONNX ops: arithmetic, comparison, logic, activations, Cast, Where, Clip."""

from __future__ import annotations

import math

import numpy as np
from max.dtype import DType
from max.graph import ops
from max.graph.ops.elementwise import _trunc_div

from sdsecure.engine.ops import Node, register


def _rank(x) -> int:
    return x.ndim if isinstance(x, np.ndarray) else x.rank


def operand(n: Node, x, *others):
    """`x` as a TensorValue. A constant with a single element and no more dims than the other operands
    becomes rank 0: the result shape is unchanged and MAX's fused kernels want scalar operands (G5)."""
    if isinstance(x, np.ndarray) and x.size == 1 and x.ndim <= max((_rank(o) for o in others), default=0):
        return n._emitter.scalar(x.reshape(()).item(), x.dtype)
    return n.t(x)


def pair(n: Node, a, b):
    return operand(n, a, b), operand(n, b, a)


def _is_int(x) -> bool:
    dt = x.dtype if isinstance(x, np.ndarray) else x.dtype.to_numpy()
    return np.issubdtype(dt, np.integer)


def _binary(op_type: str, fn, since: int = 1) -> None:
    @register(op_type, since)
    def convert(n: Node, a, b):
        return fn(*pair(n, a, b))
    convert.__name__ = op_type.lower()


_binary("Add", ops.add)
_binary("Sub", ops.sub)
_binary("Mul", ops.mul)
_binary("Equal", ops.equal)
_binary("Greater", ops.greater)
_binary("GreaterOrEqual", ops.greater_equal)
_binary("Less", lambda a, b: ops.greater(b, a))
_binary("LessOrEqual", lambda a, b: ops.greater_equal(b, a))
_binary("And", ops.logical_and)
_binary("Or", ops.logical_or)
_binary("Xor", ops.logical_xor)


@register("Div")
def div(n: Node, a, b):
    x, y = pair(n, a, b)
    return _trunc_div(x, y) if _is_int(a) else ops.div(x, y)


@register("Mod")
def mod(n: Node, a, b, *, fmod: int):
    """fmod=1: C fmod (sign of the dividend); fmod=0: Python/numpy mod (sign of the divisor)."""
    x, y = pair(n, a, b)
    zero = n.scalar(0, x)
    if _is_int(a):
        r = x - _trunc_div(x, y) * y
    else:
        r = x - ops.trunc(x / y) * y
        r = ops.where(ops.logical_and(ops.is_inf(y), ops.logical_not(ops.is_inf(x))), x, r)  # fmod(x, inf) = x
    if fmod:
        return r
    fix = ops.logical_and(ops.not_equal(r, zero), ops.not_equal(ops.greater(zero, r), ops.greater(zero, y)))
    return ops.where(fix, r + y, r)


@register("Pow")
def pow_(n: Node, a, b):
    x = n.t(a)
    if not x.dtype.is_float():  # integer power: exact in float64 for the magnitudes ints can hold
        y = n.t(b)
        r = ops.pow(ops.cast(x, DType.float64), ops.cast(y, DType.float64))
        return ops.cast(ops.floor(r + n.scalar(0.5, r)), x.dtype)
    if isinstance(b, np.ndarray) and b.size == 1 and b.ndim <= _rank(a):
        e = float(b.reshape(()).item())
        if e == 1.0:
            return x
        if e == 2.0:
            return x * x
        if e == 3.0:
            return x * x * x
        if e == 0.5:
            return ops.sqrt(x)
        return ops.pow(x, n.scalar(e, x))
    y = n.t(b)
    if y.dtype != x.dtype:
        y = ops.cast(y, x.dtype)
    return ops.pow(x, y)


@register("PRelu")
def prelu(n: Node, x, slope):
    x = n.t(x)
    s = operand(n, slope, x)
    return ops.where(ops.greater(x, n.scalar(0, x)), x, x * s)


def _variadic(op_type: str, fn, mean: bool = False) -> None:
    @register(op_type)
    def convert(n: Node, *xs):
        vals = [n.t(x) for x in xs]
        out = vals[0]
        for v in vals[1:]:
            out = fn(out, v)
        if mean:
            out = out / n.scalar(float(len(vals)), out)
        if len(vals) == 1:  # single operand: the output still has the declared dtype/shape
            out = ops.broadcast_to(out, n.out_shape)
        return out
    convert.__name__ = op_type.lower()


_variadic("Sum", ops.add)
_variadic("Mean", ops.add, mean=True)
_variadic("Max", ops.max)
_variadic("Min", ops.min)


def _float_only(n: Node, **_) -> str | None:
    info = n.in_infos[0]
    if info is not None and not np.issubdtype(info.dtype, np.floating):
        return f"{info.dtype} input (float only)"
    return None


def _unary(op_type: str, fn, *, since: int = 1, float_only: bool = False) -> None:
    @register(op_type, since, check=_float_only if float_only else None)
    def convert(n: Node, x):
        return fn(n, n.t(x))
    convert.__name__ = op_type.lower()


_unary("Abs", lambda n, x: ops.abs(x))
_unary("Neg", lambda n, x: ops.negate(x))
_unary("Exp", lambda n, x: ops.exp(x), float_only=True)
_unary("Log", lambda n, x: ops.log(x), float_only=True)
_unary("Sqrt", lambda n, x: ops.sqrt(x), float_only=True)
_unary("Reciprocal", lambda n, x: n.scalar(1.0, x) / x, float_only=True)
_unary("Sin", lambda n, x: ops.sin(x), float_only=True)
_unary("Cos", lambda n, x: ops.cos(x), float_only=True)
_unary("Tanh", lambda n, x: ops.tanh(x), float_only=True)
_unary("Sigmoid", lambda n, x: ops.sigmoid(x), float_only=True)
_unary("Erf", lambda n, x: ops.erf(x), float_only=True)
_unary("Floor", lambda n, x: ops.floor(x), float_only=True)
_unary("Ceil", lambda n, x: ops.ceil(x), float_only=True)
_unary("Relu", lambda n, x: ops.relu(x))
_unary("Not", lambda n, x: ops.logical_not(x))
_unary("IsNaN", lambda n, x: ops.is_nan(x), float_only=True)
_unary("Sign", lambda n, x: ops.cast(ops.greater(x, n.scalar(0, x)), x.dtype)
       - ops.cast(ops.greater(n.scalar(0, x), x), x.dtype))
_unary("Softsign", lambda n, x: x / (n.scalar(1.0, x) + ops.abs(x)), float_only=True)
_unary("Softplus", lambda n, x: _softplus(n, x), float_only=True)
_unary("Mish", lambda n, x: x * ops.tanh(_softplus(n, x)), float_only=True)
_unary("HardSwish", lambda n, x: x * ops.max(n.scalar(0.0, x), ops.min(n.scalar(1.0, x),
                                                                        x / n.scalar(6.0, x) + n.scalar(0.5, x))),
       float_only=True)


def _softplus(n: Node, x):
    # log(1 + exp(x)) without overflow: max(x, 0) + log(1 + exp(-|x|))
    return ops.max(x, n.scalar(0.0, x)) + ops.log(n.scalar(1.0, x) + ops.exp(ops.negate(ops.abs(x))))


@register("Round", check=_float_only)
def round_(n: Node, x):
    x = n.t(x)
    # ONNX rounds halves to even (like numpy)
    f = ops.floor(x)
    d = x - f
    half = n.scalar(0.5, x)
    f_is_odd = ops.not_equal(f - ops.floor(f / n.scalar(2.0, x)) * n.scalar(2.0, x), n.scalar(0.0, x))
    up = ops.logical_or(ops.greater(d, half), ops.logical_and(ops.equal(d, half), f_is_odd))
    return ops.where(up, f + n.scalar(1.0, x), f)


@register("IsInf", check=_float_only)
def is_inf(n: Node, x, *, detect_negative: int, detect_positive: int):
    x = n.t(x)
    inf = ops.is_inf(x)
    if detect_negative and detect_positive:
        return inf
    if not detect_negative and not detect_positive:
        return ops.logical_and(inf, ops.logical_not(inf))
    pos = ops.greater(x, n.scalar(0.0, x))
    return ops.logical_and(inf, pos if detect_positive else ops.logical_not(pos))


@register("LeakyRelu", check=_float_only)
def leaky_relu(n: Node, x, *, alpha: float):
    x = n.t(x)
    return ops.where(ops.greater(x, n.scalar(0.0, x)), x, x * n.scalar(alpha, x))


@register("Elu", check=_float_only)
def elu(n: Node, x, *, alpha: float):
    x = n.t(x)
    return ops.where(ops.greater(x, n.scalar(0.0, x)), x, (ops.exp(x) - n.scalar(1.0, x)) * n.scalar(alpha, x))


@register("Selu", check=_float_only)
def selu(n: Node, x, *, alpha: float, gamma: float):
    x = n.t(x)
    neg = (ops.exp(x) - n.scalar(1.0, x)) * n.scalar(alpha, x)
    return ops.where(ops.greater(x, n.scalar(0.0, x)), x, neg) * n.scalar(gamma, x)


@register("Celu", check=_float_only)
def celu(n: Node, x, *, alpha: float):
    x = n.t(x)
    zero = n.scalar(0.0, x)
    return ops.max(x, zero) + ops.min(zero, (ops.exp(x / n.scalar(alpha, x)) - n.scalar(1.0, x))
                                       * n.scalar(alpha, x))


@register("ThresholdedRelu", check=_float_only)
def thresholded_relu(n: Node, x, *, alpha: float):
    x = n.t(x)
    return ops.where(ops.greater(x, n.scalar(alpha, x)), x, n.scalar(0.0, x))


@register("HardSigmoid", check=_float_only)
def hard_sigmoid(n: Node, x, *, alpha: float, beta: float):
    x = n.t(x)
    y = x * n.scalar(alpha, x) + n.scalar(beta, x)
    return ops.max(n.scalar(0.0, x), ops.min(n.scalar(1.0, x), y))


def _gelu_check(n: Node, *, approximate: str) -> str | None:
    if approximate not in ("none", "tanh"):
        return f"approximate={approximate!r}"
    return _float_only(n)


@register("Gelu", 20, check=_gelu_check)
def gelu(n: Node, x, *, approximate: str):
    return ops.gelu(n.t(x), approximate=approximate)


@register("Clip", 11)
def clip(n: Node, x, lo=None, hi=None):
    x = n.t(x)
    if lo is not None:
        x = ops.max(x, operand(n, lo, x))
    if hi is not None:
        x = ops.min(x, operand(n, hi, x))
    return x


@register("Clip", 1)
def clip_v1(n: Node, x, *, min: float = -math.inf, max: float = math.inf):  # noqa: A002
    x = n.t(x)
    lo = -3.4028234663852886e38 if min is None else min
    hi = 3.4028234663852886e38 if max is None else max
    return ops.min(ops.max(x, n.scalar(lo, x)), n.scalar(hi, x))


def _cast_check(n: Node, *, to: int, saturate: int = 1, round_mode: str = "up") -> str | None:
    from sdsecure.engine.importer import max_dtype

    try:
        max_dtype(np.dtype(onnx_to_np(to)))
    except Exception:
        return f"cast to ONNX type {to}"
    return None


def onnx_to_np(elem_type: int):
    from onnx import helper

    return helper.tensor_dtype_to_np_dtype(elem_type)


@register("Cast", check=_cast_check)
def cast(n: Node, x, *, to: int, saturate: int = 1):
    from sdsecure.engine.importer import max_dtype

    dt = max_dtype(np.dtype(onnx_to_np(to)))
    x = n.t(x)
    if x.dtype == dt:
        return x
    if dt == DType.bool:
        return ops.not_equal(x, n.scalar(0, x))
    return ops.cast(x, dt)


@register("CastLike", type_only=(1,))
def cast_like(n: Node, x, like, *, saturate: int = 1):
    from sdsecure.engine.importer import max_dtype

    x = n.t(x)
    dt = max_dtype(n.in_infos[1].dtype)
    if x.dtype == dt:
        return x
    if dt == DType.bool:
        return ops.not_equal(x, n.scalar(0, x))
    return ops.cast(x, dt)


@register("Where")
def where(n: Node, cond, a, b):
    out = ops.where(n.t(cond), operand(n, a, b, cond), operand(n, b, a, cond))
    if tuple(int(d) for d in out.shape) != n.out_shape:
        out = ops.broadcast_to(out, n.out_shape)
    return out


_HALF_PI = 1.5707963267948966
_unary("Tan", lambda n, x: ops.sin(x) / ops.cos(x), float_only=True)
_unary("Sinh", lambda n, x: (ops.exp(x) - ops.exp(ops.negate(x))) * n.scalar(0.5, x), float_only=True)
_unary("Cosh", lambda n, x: (ops.exp(x) + ops.exp(ops.negate(x))) * n.scalar(0.5, x), float_only=True)
_unary("Acos", lambda n, x: ops.acos(x), float_only=True)
_unary("Asin", lambda n, x: n.scalar(_HALF_PI, x) - ops.acos(x), float_only=True)
_unary("Atan", lambda n, x: _atan(n, x), float_only=True)
_unary("Atanh", lambda n, x: ops.atanh(x), float_only=True)
_unary("Asinh", lambda n, x: ops.log(x + ops.sqrt(x * x + n.scalar(1.0, x))), float_only=True)
_unary("Acosh", lambda n, x: ops.log(x + ops.sqrt(x * x - n.scalar(1.0, x))), float_only=True)


def _atan(n: Node, x):
    # atan(x) = asin(x / sqrt(1 + x^2)) = pi/2 - acos(x / sqrt(1 + x^2))
    return n.scalar(_HALF_PI, x) - ops.acos(x * ops.rsqrt(x * x + n.scalar(1.0, x)))


@register("Shrink")
def shrink(n: Node, x, *, bias: float, lambd: float):
    x = n.t(x)
    lo = ops.greater(n.scalar(-lambd, x), x)
    hi = ops.greater(x, n.scalar(lambd, x))
    return ops.where(lo, x + n.scalar(bias, x), ops.where(hi, x - n.scalar(bias, x), n.scalar(0, x)))
