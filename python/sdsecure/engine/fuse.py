"""Peephole rewrites of a specialised graph into ops that MAX runs faster.

Exporters spell some layers out op by op; MAX then generates (and compiles) one kernel per piece, or
computes more than the layer needs. Each rewrite below matches an exact, value-checked pattern whose
intermediates nobody else reads, and replaces it by one node of the private domain `sdsecure.fused`,
converted by `ops/fused.py`.

* GroupNorm: Reshape [N,C,...] -> [N,G,L] -> InstanceNormalization(scale 1, bias 0) -> Reshape back
  -> Mul gamma[C,1,..] -> Add beta[C,1,..]  (torch's GroupNorm in both exporters)  =>  GroupNorm(x, gamma, beta)
* UpsampleConv2x: Resize (nearest, x2 on H and W) -> Conv 3x3 (stride 1, pad 1)  (the upsamplers of the
  UNet and the VAE decoder)  =>  UpsampleConv2x(x, w00, w01, w10, w11[, bias]). Output pixel (2i+a, 2j+b)
  of the conv only ever sees rows i-1..i+1 of x, with taps that fall on the same source pixel summed:
  each of the four phases (a, b) is a 2x2 conv of x with summed taps, 4/9 of the multiply-adds (the
  VAE's 512-channel upsampler at 128x128: 229 ms instead of 435 ms on MAX). The phase filters are
  computed here, from the verified weights.
* WinogradConv3x3: Conv 3x3 (stride 1, pad 1) on an even-sized image with enough 2x2 output blocks and
  wide enough channels  =>  WinogradConv3x3(x, U[, bias]), U the Winograd F(2x2, 3x3) transform of the filter
  (engine.winograd: 16 multiplies per 2x2 block instead of 36).
* PackedMatMul (only when asked for): MatMul of x [..., K] by a constant weight [K, N]  =>  PackedMatMul(x, P),
  P the weight in the layout MAX's CPU matmul kernel works in (engine.packed_matmul: packed once here
  instead of on every call), for the shapes a probe has shown MAX to multiply correctly that way. The
  MatMuls of one x are packed together, as one weight, with one output each.
* TapConv: Conv 3x3 (stride 1, pad 1) with few output pixels and a big filter  =>  TapConv(x, T[, bias]),
  one matmul per tap (engine.tap_conv): as fast as the direct conv there, and MAX need not repack the
  filter when it initialises the model (3.3 s for the full UNet's 4x4 level at 32x32 latents). An
  UpsampleConv2x on as few source pixels gets attribute taps=1 and runs its four phases that way.

The new filters (phase, Winograd, tap layouts) are allocated when matched and computed from the verified
weights on background threads, while the graph is built (which needs only their shapes); a session waits
for them (FoldedGraph.wait_filled) before MAX binds them.
"""

from __future__ import annotations

import mmap
import os
from concurrent.futures import ThreadPoolExecutor
from typing import Callable

import numpy as np
import onnx
from onnx import helper

from sdsecure.engine import packed_matmul, tap_conv, winograd
from sdsecure.engine.fold import FoldedGraph, TensorInfo
from sdsecure.engine.ops import PRIVATE_DOMAIN as FUSED_DOMAIN


Consts = dict[str, np.ndarray]
# (nodes matched, the node replacing them, its new constants, and None or a function that computes their
# values from the verified weights: the arrays are allocated at once, and filled in the background)
Match = tuple[list[onnx.NodeProto], onnx.NodeProto, Consts, "Callable[[], object] | None"]


class _Index:
    def __init__(self, folded: FoldedGraph):
        self.folded = folded
        self.producer = {o: n for n in folded.nodes for o in n.output if o}
        self.consumers: dict[str, list[onnx.NodeProto]] = {}
        for n in folded.nodes:
            for i in n.input:
                if i:
                    self.consumers.setdefault(i, []).append(n)
        self.outputs = {folded.resolve(o) for o in folded.outputs}
        self.position = {id(n): i for i, n in enumerate(folded.nodes)}
        self.packed_ok: set[tuple[int, int, int]] = set()

    def only_consumer(self, name: str) -> onnx.NodeProto | None:
        users = self.consumers.get(name, [])
        if len(users) != 1 or name in self.outputs:
            return None
        return users[0]

    def const(self, name: str) -> np.ndarray | None:
        return self.folded.consts.get(name)

    def shape(self, name: str) -> tuple[int, ...] | None:
        info = self.folded.infos.get(name)
        return info.shape if info else None


def _attr(node: onnx.NodeProto, name: str, default):
    for a in node.attribute:
        if a.name == name:
            return helper.get_attribute_value(a)
    return default


def _per_channel(idx: _Index, node: onnx.NodeProto, value: str, rank: int, channels: int) -> np.ndarray | None:
    """The constant operand of a Mul/Add if it is one value per channel (axis 1 of a rank-`rank` tensor)."""
    other = [i for i in node.input if i != value]
    if len(other) != 1 or len(node.input) != 2:
        return None
    c = idx.const(other[0])
    if c is None or c.size != channels or c.ndim > rank:
        return None
    padded = (1,) * (rank - c.ndim) + c.shape
    if padded[1] != channels or c.dtype != np.float32:
        return None
    return c.reshape(channels)


def _group_norm(idx: _Index, inorm: onnx.NodeProto) -> Match | None:
    if inorm.op_type != "InstanceNormalization" or inorm.domain not in ("", "ai.onnx") or len(inorm.input) != 3:
        return None
    scale, bias = idx.const(inorm.input[1]), idx.const(inorm.input[2])
    if scale is None or bias is None or not np.all(scale == 1) or not np.all(bias == 0):
        return None
    r1 = idx.producer.get(inorm.input[0])
    if r1 is None or r1.op_type != "Reshape" or idx.only_consumer(r1.output[0]) is not inorm:
        return None
    x = r1.input[0]
    xs, gs = idx.shape(x), idx.shape(inorm.input[0])
    if xs is None or gs is None or len(xs) < 3 or len(gs) != 3 or xs[0] != gs[0]:
        return None
    channels, groups = xs[1], gs[1]
    if channels % groups or int(np.prod(xs[1:])) != groups * gs[2] or idx.folded.infos[x].dtype != np.float32:
        return None
    r2 = idx.only_consumer(inorm.output[0])
    if r2 is None or r2.op_type != "Reshape" or idx.shape(r2.output[0]) != xs:
        return None
    matched, out = [r1, inorm, r2], r2.output[0]
    gamma = np.ones(channels, np.float32)
    beta = np.zeros(channels, np.float32)
    mul = idx.only_consumer(out)
    if mul is not None and mul.op_type == "Mul":
        g = _per_channel(idx, mul, out, len(xs), channels)
        if g is not None and idx.shape(mul.output[0]) == xs:
            gamma, out = g, mul.output[0]
            matched.append(mul)
            add = idx.only_consumer(out)
            if add is not None and add.op_type == "Add":
                b = _per_channel(idx, add, out, len(xs), channels)
                if b is not None and idx.shape(add.output[0]) == xs:
                    beta, out = b, add.output[0]
                    matched.append(add)
    eps = float(_attr(inorm, "epsilon", 1e-5))
    name = inorm.name or out
    consts = {f"{name}::gamma": np.ascontiguousarray(gamma), f"{name}::beta": np.ascontiguousarray(beta)}
    fused = helper.make_node("GroupNorm", [x, *consts], [out], name=name, domain=FUSED_DOMAIN,
                             num_groups=int(groups), epsilon=eps)
    return matched, fused, consts, None


def _resize_repeats(idx: _Index, node: onnx.NodeProto) -> dict[int, int] | None:
    """{axis: k} when Resize `node` is integer nearest upsampling (see ops.nn.nearest_repeats)."""
    from sdsecure.engine.importer import _node_view
    from sdsecure.engine.ops import attributes, resolve
    from sdsecure.engine.ops.nn import nearest_repeats

    opdef, schema, _ = resolve(node, idx.folded.opsets)
    if opdef is None:
        return None
    kwargs, bad = attributes(node, schema, opdef)
    if bad:
        return None
    view = _node_view(idx.folded, node)
    try:
        return nearest_repeats(view, view.consts, kwargs)
    except Exception:  # noqa: BLE001 - anything unusual is simply not this pattern
        return None


def _is_plain_3x3(conv: onnx.NodeProto) -> bool:
    """The Conv's attributes say kernel 3x3 (or nothing), stride 1, pad 1, dilation 1, one group."""
    attrs = {a.name: helper.get_attribute_value(a) for a in conv.attribute}
    return not (attrs.pop("group", 1) != 1 or list(attrs.pop("strides", [1, 1])) != [1, 1]
                or list(attrs.pop("dilations", [1, 1])) != [1, 1] or list(attrs.pop("pads", [0] * 4)) != [1, 1, 1, 1]
                or list(attrs.pop("kernel_shape", [3, 3])) != [3, 3] or attrs.pop("auto_pad", b"NOTSET") != b"NOTSET"
                or attrs)


def _bias_input(conv: onnx.NodeProto) -> str | None:
    return conv.input[2] if len(conv.input) > 2 and conv.input[2] else None


# Which 3x3 taps each 2x2 tap of a phase sums, along one axis: phase 0 reads source rows (i-1, i) with
# taps (w0, w1+w2), phase 1 reads (i, i+1) with taps (w0+w1, w2).
_TAPS = np.array([[[1, 0, 0], [0, 1, 1]],
                  [[1, 1, 0], [0, 0, 1]]], np.float32)          # [phase, 2x2 tap, 3x3 tap]
# _PHASE_MIX[(a, b, r, s), (kr, ks)] = _TAPS[a, r, kr] * _TAPS[b, s, ks]: one row of 9 weights per phase tap
_PHASE_MIX = np.einsum("ark,bsl->absrkl", _TAPS, _TAPS).transpose(0, 1, 3, 2, 4, 5).reshape(16, 9)


def phase_filters(w: np.ndarray, out: list[np.ndarray] | None = None) -> list[np.ndarray]:
    """The four 2x2 filters [F, C, 2, 2] (phases 00, 01, 10, 11) that a 3x3 filter `w` [F, C, 3, 3] applies
    to the source image of a nearest x2 upsampling (see _TAPS), as one small matmul over all (F, C).
    Written into `out` when given."""
    f, c = w.shape[:2]
    taps = (w.reshape(f * c, 9) @ _PHASE_MIX.T).reshape(f, c, 2, 2, 2, 2)      # [F, C, a, b, r, s]
    out = out if out is not None else [np.empty((f, c, 2, 2), np.float32) for _ in range(4)]
    for p, (a, b) in enumerate(((0, 0), (0, 1), (1, 0), (1, 1))):
        out[p][...] = taps[:, :, a, b]
    return out


def phase_taps(w: np.ndarray, out: np.ndarray | None = None) -> list[np.ndarray]:
    """The same four phase filters laid out as taps [4, C, F] (engine.tap_conv): four slices of one
    [16, C, F] array, written into `out` when given."""
    rows = tap_conv.filters(w, _PHASE_MIX, out)                                # [(a, b, r, s), C, F]
    return [rows[4 * p:4 * p + 4] for p in range(4)]


def _upsample_conv(idx: _Index, resize: onnx.NodeProto) -> Match | None:
    if resize.op_type != "Resize" or resize.domain not in ("", "ai.onnx"):
        return None
    conv = idx.only_consumer(resize.output[0])
    plain = _plain_float_3x3(idx, conv) if conv is not None and conv.input[0] == resize.output[0] else None
    x = resize.input[0]
    xs = idx.shape(x)
    if plain is None or xs is None or len(xs) != 4 or _resize_repeats(idx, resize) != {2: 2, 3: 2}:
        return None
    _, w, bias = plain
    name = conv.name or conv.output[0]
    names = [f"{name}::phase{a}{b}" for a in (0, 1) for b in (0, 1)]
    # few source pixels and a big filter: each phase as one matmul per tap (see _tap_conv)
    as_taps = _tap_conv_pays(xs[0] * xs[2] * xs[3], w)
    attrs = {"taps": 1} if as_taps else {}
    fused = helper.make_node("UpsampleConv2x", [x, *names] + ([bias] if bias else []), [conv.output[0]],
                             name=name, domain=FUSED_DOMAIN, **attrs)

    f, c = w.shape[:2]
    if as_taps:
        rows = _empty((16, c, f))
        return [resize, conv], fused, dict(zip(names, [rows[4 * p:4 * p + 4] for p in range(4)])), \
            lambda: phase_taps(w, rows)
    phases = [_empty((f, c, 2, 2)) for _ in range(4)]
    return [resize, conv], fused, dict(zip(names, phases)), lambda: phase_filters(w, phases)


# Winograd pays when its 16 matmuls have enough rows (2x2 output blocks) and the channels are wide enough
# for the matmuls to outweigh the transforms (whose memory traffic grows with C + F, while the multiplies
# saved grow with C * F). Measured on MAX, milliseconds, Winograd against the direct conv:
#   blocks: [2, 16, 16, 640] (128 blocks) 14 vs 21; [2, 8, 8, 1280] (32) 16.5 vs 19.8, and its transformed
#     filter is ready faster than MAX repacks a direct conv's (0.06 s against 0.2 s per 59 MB), though it
#     holds 16/9 of the filter where the repacked one holds 1; [2, 4, 4, 1280] (8) 8.1 vs 7.7, a loss
#     (_tap_conv takes those).
#   width C*F/(C+F): 320->320 (160) 14 vs 23 at [2, 32, 32]; 512->256 (171) 184 vs 231 at [1, 128, 128];
#     256->256 (128) 30 vs 26 at [1, 64, 64] and 121 vs 106 at [1, 128, 128]; 128->128 (64) 204 vs 110.
WINOGRAD_MIN_BLOCKS = 32
WINOGRAD_MIN_WIDTH = 160
WINOGRAD_ENABLED = os.environ.get("SDSECURE_WINOGRAD", "1") != "0"     # 0: direct convs (for comparisons)


def _plain_float_3x3(idx: _Index, conv: onnx.NodeProto) -> tuple[tuple[int, ...], np.ndarray, str | None] | None:
    """(input shape [N, C, H, W], filter, bias input or None) of a float32 Conv 3x3, stride 1, pad 1, with a
    constant filter (and bias); None for anything else."""
    if conv.op_type != "Conv" or conv.domain not in ("", "ai.onnx") or len(conv.input) < 2:
        return None
    xs, info, w = idx.shape(conv.input[0]), idx.folded.infos.get(conv.input[0]), idx.const(conv.input[1])
    if xs is None or len(xs) != 4 or info.dtype != np.float32 or w is None or w.dtype != np.float32 \
            or w.shape[1:] != (xs[1], 3, 3):
        return None
    bias = _bias_input(conv)
    if not _is_plain_3x3(conv) or (bias and idx.const(bias) is None):
        return None
    return xs, w, bias


def _winograd_conv(idx: _Index, conv: onnx.NodeProto) -> Match | None:
    plain = _plain_float_3x3(idx, conv) if WINOGRAD_ENABLED else None
    if plain is None:
        return None
    (n, c, h, wd), w, bias = plain
    f = w.shape[0]
    if h % 2 or wd % 2 or c * f < WINOGRAD_MIN_WIDTH * (c + f) or n * (h // 2) * (wd // 2) < WINOGRAD_MIN_BLOCKS:
        return None
    name = conv.name or conv.output[0]
    u = f"{name}::winograd"
    fused = helper.make_node("WinogradConv3x3", [conv.input[0], u] + ([bias] if bias else []), [conv.output[0]],
                             name=name, domain=FUSED_DOMAIN)
    out = _empty((16, c, f))
    return [conv], fused, {u: out}, lambda: winograd.filters(w, out)


# Output pixels (N*H*W) up to which a matmul per tap runs as fast as MAX's direct conv (measured: 32 at
# [2, 4, 4, 1280]; 128 at [2, 8, 8, 1280] is 16% slower), and the filter size from which binding it as a
# matmul weight saves time worth a graph change (MAX repacks a direct conv's filter at ~0.3 GB/s).
TAP_CONV_MAX_PIXELS = 32
TAP_CONV_MIN_FILTER_BYTES = 1 << 20
TAP_CONV_ENABLED = os.environ.get("SDSECURE_TAP_CONV", "1") != "0"      # 0: direct convs (for comparisons)


def _tap_conv_pays(pixels: int, w: np.ndarray) -> bool:
    return TAP_CONV_ENABLED and pixels <= TAP_CONV_MAX_PIXELS and w.nbytes >= TAP_CONV_MIN_FILTER_BYTES


def _tap_conv(idx: _Index, conv: onnx.NodeProto) -> Match | None:
    plain = _plain_float_3x3(idx, conv)
    if plain is None:
        return None
    (n, c, h, wd), w, bias = plain
    if not _tap_conv_pays(n * h * wd, w):
        return None
    name = conv.name or conv.output[0]
    taps = f"{name}::taps"
    fused = helper.make_node("TapConv", [conv.input[0], taps] + ([bias] if bias else []), [conv.output[0]],
                             name=name, domain=FUSED_DOMAIN, kernel_shape=[3, 3], pads=[1, 1, 1, 1])
    out = _empty((9, c, w.shape[0]))
    return [conv], fused, {taps: out}, lambda: tap_conv.filters(w, out=out)


def _matmul_group(idx: _Index, node: onnx.NodeProto) -> tuple[list[onnx.NodeProto], tuple[int, int, int]] | None:
    """The MatMuls that read the input x of MatMul `node` (in node order, `node` among them) and the
    (M, K, N) of their weights side by side, when each is a float32 MatMul of x [..., K] by a constant
    [K, N_i] and that shape could take a packed weight; None otherwise.

    The group is packed as one weight: MAX merges MatMuls that share their input (attention's q, k and v)
    into one on their weights joined side by side, and separately packed weights joined side by side are
    not the joined weight's packed layout."""
    if node.op_type != "MatMul" or node.domain not in ("", "ai.onnx") or len(node.input) != 2:
        return None
    x = node.input[0]
    info = idx.folded.infos.get(x)
    if info is None or info.dtype != np.float32 or len(info.shape) < 2 or idx.const(x) is not None:
        return None
    group = list({id(c): c for c in idx.consumers.get(x, []) if c.op_type == "MatMul"}.values())
    k = info.shape[-1]
    for mm in group:
        w = idx.const(mm.input[1]) if len(mm.input) == 2 else None
        if mm.domain not in ("", "ai.onnx") or mm.input[0] != x or w is None or w.ndim != 2 \
                or w.dtype != np.float32 or w.shape[0] != k:
            return None
    group.sort(key=lambda mm: idx.position[id(mm)])
    shape = (int(np.prod(info.shape[:-1])), int(k), sum(int(idx.const(mm.input[1]).shape[1]) for mm in group))
    return (group, shape) if packed_matmul.candidate(*shape, np.dtype(np.float32)) else None


def _packed_matmul(idx: _Index, node: onnx.NodeProto) -> Match | None:
    found = _matmul_group(idx, node)
    if found is None or found[0][0] is not node or found[1] not in idx.packed_ok:
        return None
    group, (_, k, n) = found
    ws = [idx.const(mm.input[1]) for mm in group]
    name = node.name or node.output[0]
    packed = f"{name}::packed"
    attrs = {"splits": [int(w.shape[1]) for w in ws]} if len(group) > 1 else {}
    fused = helper.make_node("PackedMatMul", [node.input[0], packed], [mm.output[0] for mm in group], name=name,
                             domain=FUSED_DOMAIN, **attrs)
    # not _empty: these weights are read on every call, and on huge pages (numpy's) the text encoder ran
    # 0.138 s against 0.162 s on small ones
    out = packed_matmul.aligned_empty((k, n))

    def fill() -> None:
        packed_matmul.pack(ws[0] if len(ws) == 1 else np.concatenate(ws, axis=1), out=out)

    # the fused node takes the place of the last node matched: here the group's first, where x is defined
    # and none of the group's outputs is read yet
    return group[1:] + [group[0]], fused, {packed: out}, fill


# in node order, first match wins: an upsampler's Conv goes to _upsample_conv (its Resize comes first)
REWRITES = (_group_norm, _upsample_conv, _winograd_conv, _tap_conv, _packed_matmul)


def _empty(shape: tuple[int, ...]) -> np.ndarray:
    """np.empty(shape, float32) for a new filter, in its own anonymous mapping with transparent huge pages
    off. numpy asks for huge pages, and on these machines the kernel then spends twice as long in page
    faults: the UNet's 2.8 GB of new filters took 4.7 s to fill instead of 2.6 s. MAX's init takes about
    1 s longer on small pages, and the cached start still comes out 1 s shorter (9.2 against 10.3 s)."""
    count = int(np.prod(shape))
    buf = mmap.mmap(-1, max(count, 1) * 4, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    if hasattr(mmap, "MADV_NOHUGEPAGE"):
        buf.madvise(mmap.MADV_NOHUGEPAGE)
    return np.frombuffer(buf, np.float32, count=count).reshape(shape)


_FILLER: ThreadPoolExecutor | None = None


def _filler() -> ThreadPoolExecutor:
    """Threads that compute new filters (numpy's copies and elementwise loops release the GIL)."""
    global _FILLER
    if _FILLER is None:
        _FILLER = ThreadPoolExecutor(max_workers=max(1, min(4, os.cpu_count() or 1)), thread_name_prefix="fuse-fill")
    return _FILLER


def fuse(folded: FoldedGraph, *, pack_matmuls: bool = False) -> FoldedGraph:
    """Apply every rewrite (PackedMatMul only with `pack_matmuls`); returns `folded` changed in place
    (nodes, consts, infos)."""
    idx = _Index(folded)
    if pack_matmuls:
        # which MatMul shapes MAX multiplies correctly with a packed weight (a probe compile the first time)
        idx.packed_ok = packed_matmul.verified({g[1] for n in folded.nodes
                                                if (g := _matmul_group(idx, n)) and g[0][0] is n})
    replaced: dict[int, onnx.NodeProto | None] = {}
    fills: list[tuple[list[str], Callable[[], object]]] = []
    for node in folded.nodes:
        if id(node) in replaced:
            continue
        match = None
        for rewrite in REWRITES:
            match = rewrite(idx, node)
            if match is not None:
                break
        if match is None:
            continue
        matched, fused_node, consts, fill = match
        if any(id(n) in replaced for n in matched):
            continue
        for n in matched:
            replaced[id(n)] = None
        replaced[id(matched[-1])] = fused_node
        for k, v in consts.items():
            folded.consts[k] = v
            folded.infos[k] = TensorInfo(v.shape, v.dtype)
            folded.initializers.add(k)
        if fill is not None:
            fills.append((list(consts), fill))
    # The new filters (0.03-0.1 s per 59 MB, mostly memory traffic) are computed on other threads while
    # the graph is built (or its stored plan loaded): that needs their shapes only. FoldedGraph.wait_filled
    # before reading them.
    folded.filling = {}
    for names, fill in fills:
        future = _filler().submit(fill)
        folded.filling.update((n, future) for n in names)
    if replaced:
        new_nodes = []
        for n in folded.nodes:
            if id(n) not in replaced:
                new_nodes.append(n)
            elif replaced[id(n)] is not None:
                new_nodes.append(replaced[id(n)])
        # the fused node sits where its last piece was: its input x is defined before the first piece
        folded.nodes = new_nodes
        folded.opsets.setdefault(FUSED_DOMAIN, 1)
    return folded
