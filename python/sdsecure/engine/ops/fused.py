"""Converters for the private fused ops that `sdsecure.engine.fuse` writes (domain `sdsecure.fused`)."""

from __future__ import annotations

from max.graph import ops

from sdsecure.engine.ops import PRIVATE_DOMAIN, Node, register


@register("GroupNorm", domain=PRIVATE_DOMAIN)
def group_norm(n: Node, x, gamma, beta, *, num_groups: int, epsilon: float):
    """torch.nn.GroupNorm on [N, C, ...]: MAX's fused group_norm kernel."""
    return ops.group_norm(n.t(x), n.t(gamma), n.t(beta), num_groups=int(num_groups), epsilon=float(epsilon))
