"""ONNX op -> max.graph converters: one small function per op, in a registry.

A converter is registered for (domain, op type, since-version) and is picked the way onnx2torch does:
the model's opset gives, through `onnx.defs.get_schema(op, max_inclusive_version=opset)`, the version of
the op's semantics, and the converter with the highest `since` not above it handles the node.

    @register("LeakyRelu", check=...)
    def leaky_relu(n: Node, x, *, alpha: float): ...

* Inputs arrive positionally: a `TensorValue`, or a numpy array when the value is a constant (the
  converter may use it as a compile-time value; `n.t(x)` turns either into a `TensorValue`), or None
  for an omitted optional input. Inputs listed in `const_inputs` must be constants.
* Attributes arrive as keyword arguments, with the schema's defaults. A node that sets an attribute
  the converter does not name is unsupported (reported, never silently ignored).
* `check(n, **attrs)` may return a reason why this node is unsupported; it runs over the whole graph
  before anything is built.
* The converter returns one value per ONNX output (a tuple when there are several).
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import numpy as np
import onnx
from onnx import helper

from sdsecure.engine.fold import TensorInfo

Converter = Callable[..., Any]
PRIVATE_DOMAIN = "sdsecure.fused"


@dataclass
class OpDef:
    op_type: str
    domain: str
    since: int
    fn: Converter
    const_inputs: tuple[int, ...] = ()
    check: Callable[..., str | None] | None = None
    type_only: tuple[int, ...] = ()      # inputs whose element type alone is used (CastLike's target)
    attr_names: frozenset[str] = field(default_factory=frozenset)


_REGISTRY: dict[tuple[str, str], list[OpDef]] = {}


def register(op_type: str, since: int = 1, *, domain: str = "", const_inputs: Sequence[int] = (),
             check: Callable[..., str | None] | None = None,
             type_only: Sequence[int] = ()) -> Callable[[Converter], Converter]:
    def deco(fn: Converter) -> Converter:
        params = inspect.signature(fn).parameters.values()
        attrs = frozenset(p.name for p in params if p.kind is inspect.Parameter.KEYWORD_ONLY)
        defs = _REGISTRY.setdefault((domain, op_type), [])
        defs.append(OpDef(op_type, domain, since, fn, tuple(const_inputs), check, tuple(type_only), attrs))
        defs.sort(key=lambda d: d.since)
        return fn
    return deco


def supported_ops() -> list[str]:
    _load()
    return sorted(op if not dom else f"{dom}.{op}" for dom, op in _REGISTRY)


def _load() -> None:
    from sdsecure.engine.ops import elementwise, fused, nn, tensor  # noqa: F401  (registration side effects)


def resolve(node: onnx.NodeProto, opsets: dict[str, int]) -> tuple[OpDef | None, onnx.defs.OpSchema | None, str]:
    """(converter, schema, reason): reason says why there is no converter."""
    _load()
    domain = "" if node.domain in ("", "ai.onnx") else node.domain
    defs = _REGISTRY.get((domain, node.op_type))
    if not defs:
        return None, None, "op not supported"
    version = opsets.get(domain)
    if version is None:
        return None, None, f"model imports no opset for domain {domain!r}"
    if domain == PRIVATE_DOMAIN:  # our own fused ops (sdsecure.engine.fuse): no ONNX schema
        return defs[-1], None, ""
    try:
        schema = onnx.defs.get_schema(node.op_type, version, domain)
    except onnx.defs.SchemaError:
        return None, None, f"no schema for opset {version}"
    chosen = [d for d in defs if d.since <= schema.since_version]
    if not chosen:
        return None, schema, f"version {schema.since_version} of the op not supported"
    return chosen[-1], schema, ""


def attributes(node: onnx.NodeProto, schema: onnx.defs.OpSchema | None, opdef: OpDef) -> tuple[dict[str, Any], list[str]]:
    """Keyword arguments for the converter (schema defaults filled in) and the attributes it cannot take."""
    kwargs: dict[str, Any] = {}
    for name, attr in (schema.attributes.items() if schema is not None else ()):
        if name in opdef.attr_names:
            default = attr.default_value
            kwargs[name] = helper.get_attribute_value(default) if default.type else None
    bad = []
    for a in node.attribute:
        if a.name not in opdef.attr_names:
            bad.append(a.name)
            continue
        if a.ref_attr_name:
            bad.append(a.name)
            continue
        v = helper.get_attribute_value(a)
        kwargs[a.name] = v.decode() if isinstance(v, bytes) else v
    for k, v in kwargs.items():
        if isinstance(v, bytes):
            kwargs[k] = v.decode()
    return kwargs, bad


class Node:
    """What a converter sees of the node it converts."""

    def __init__(self, node: onnx.NodeProto, opset: int, in_infos: list[TensorInfo | None],
                 out_infos: list[TensorInfo | None], consts: list[np.ndarray | None], emitter: Any = None):
        self.proto = node
        self.opset = opset
        self.in_infos = in_infos
        self.out_infos = out_infos
        self.consts = consts
        self._emitter = emitter

    @property
    def label(self) -> str:
        return f"{self.proto.op_type} node {self.proto.name or '(unnamed)'!r}"

    @property
    def out_shape(self) -> tuple[int, ...]:
        info = self.out_infos[0]
        assert info is not None, "output type unknown"
        return info.shape

    @property
    def dev(self):
        return self._emitter.device

    def t(self, x: Any, dtype: Any = None):
        """A TensorValue for `x` (TensorValue, numpy constant or Python scalar)."""
        return self._emitter.tensor(x, dtype)

    def scalar(self, value: float | int | bool, like):
        """A rank-0 constant with the dtype of `like`."""
        return self._emitter.scalar(value, like.dtype)


class Unsupported(Exception):
    """Raised by a converter helper when a node is outside what the converter handles."""
