"""Converters for the private fused ops that `sdsecure.engine.fuse` writes (domain `sdsecure.fused`)."""

from __future__ import annotations

from sdsecure.engine.ops import PRIVATE_DOMAIN, Node, register
from sdsecure.engine.ops.nn import group_norm as _group_norm


@register("GroupNorm", domain=PRIVATE_DOMAIN)
def group_norm(n: Node, x, gamma, beta, *, num_groups: int, epsilon: float):
    """torch.nn.GroupNorm on [N, C, ...] (see ops.nn.group_norm for how)."""
    return _group_norm(n, x, int(num_groups), float(epsilon), gamma, beta)
