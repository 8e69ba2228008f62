"""3x3 convolutions as Winograd F(2x2, 3x3) (Lavin & Gray, "Fast Algorithms for Convolutional Neural
Networks", 2016).

Each 2x2 block of a 3x3 conv's output is computed from the 4x4 input tile around it: transform the tile
(V = Bt d B, additions only), multiply element-wise by the transformed filter (U = G g Gt, computed once
at load time from the verified weights) summed over input channels, and transform back (Y = At M A,
additions only). Over all tiles, the middle step is 16 matrix products [tiles, C] x [C, F]: 16 multiplies
per output block and channel pair instead of 36. MAX's direct conv runs at about 80% of onnxruntime's
GFLOP/s here; with 4/9 of the multiplies it comes out ahead (measured: [1, 64, 64, 512] 80 ms against
112 ms direct and 91 ms onnxruntime; [2, 16, 16, 640] 14 ms against 21 ms and 18 ms).

The transforms cost memory traffic (V holds 4x the input), so the rewrite (engine.fuse) only takes convs
with enough tiles and channels for the matmuls to dominate. In float32 the result differs from a
float64 reference by about 1e-6 of its range, as much as MAX's direct conv.
"""

from __future__ import annotations

import numpy as np
from max.graph import TensorValue, ops

from sdsecure.engine import tap_conv

# F(2x2, 3x3) with interpolation points 0, 1, -1 (and infinity)
BT = np.array([[1, 0, -1, 0], [0, 1, 1, 0], [0, -1, 1, 0], [0, 1, 0, -1]], np.float32)  # input tile 4 -> 4
G = np.array([[1, 0, 0], [.5, .5, .5], [.5, -.5, .5], [0, 0, 1]], np.float32)           # filter 3 -> 4
AT = np.array([[1, 1, 1, 0], [0, 1, -1, -1]], np.float32)                               # product 4 -> output 2
_MIX = np.einsum("rk,sl->rskl", G, G).reshape(16, 9)                                    # U[4r+s] from the 9 taps


def filters(w: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """The transformed filter U [16, C, F] of a 3x3 filter `w` [F, C, 3, 3]: U[4r + s, c, f] = (G w[f, c] Gt)[r, s],
    the 16 combinations of the 9 taps in tap_conv.filters, a chunk of channels at a time (G's entries are
    multiples of 1/2, so the sums are exact in float32). Written into `out` when given."""
    return tap_conv.filters(w, _MIX, out)


def _tile_taps(t: TensorValue, axis: int, tiles: int) -> list[TensorValue]:
    """The four views t[2i + r] (r = 0..3, i < tiles) along `axis`, whose length is 2 * (tiles + 1): the
    axis split into pairs, element 2i + r is pair i + r // 2, member r % 2."""
    shape = [int(d) for d in t.shape]
    pairs = ops.reshape(t, shape[:axis] + [shape[axis] // 2, 2] + shape[axis + 1:])
    lead = (slice(None),) * axis
    return [pairs[lead + (slice(r // 2, r // 2 + tiles), r % 2)] for r in range(4)]


def _combine(matrix: np.ndarray, parts: list[TensorValue]) -> list[TensorValue]:
    """[sum_k matrix[i, k] * parts[k] for each row i], for matrices of 0 and +-1 (additions only)."""
    out = []
    for row in matrix:
        plus = [p for coef, p in zip(row, parts) if coef == 1]
        minus = [p for coef, p in zip(row, parts) if coef == -1]
        acc = plus[0]
        for p in plus[1:]:
            acc = acc + p
        for p in minus:
            acc = acc - p
        out.append(acc)
    return out


def conv3x3_nhwc(x: TensorValue, u: TensorValue, bias: TensorValue | None = None) -> TensorValue:
    """Conv 3x3 (stride 1, pad 1) of x [N, H, W, C] (H and W even) with transformed filter u [16, C, F]."""
    batch, h, w, c = (int(d) for d in x.shape)
    f = int(u.shape[2])
    th, tw = h // 2, w // 2
    padded = ops.pad(x, [0, 0, 1, 1, 1, 1, 0, 0])                               # [N, H+2, W+2, C]
    rows = _combine(BT, _tile_taps(padded, 1, th))                              # 4 x [N, th, W+2, C]
    tiles = [v for row in rows for v in _combine(BT, _tile_taps(row, 2, tw))]   # 16 x [N, th, tw, C]
    v = ops.reshape(ops.stack(tiles, axis=0), [16, batch * th * tw, c])
    m = ops.reshape(ops.matmul(v, u), [4, 4, batch, th, tw, f])
    halves = _combine(AT, [m[r] for r in range(4)])                             # output row a: [4, N, th, tw, F]
    blocks = [_combine(AT, [half[s] for s in range(4)]) for half in halves]     # blocks[a][b]: [N, th, tw, F]
    out_rows = [ops.reshape(ops.stack(blocks[a], axis=3), [batch, th, w, f]) for a in (0, 1)]  # columns 2j, 2j+1
    y = ops.reshape(ops.stack(out_rows, axis=2), [batch, h, w, f])              # rows 2i, 2i+1
    return y if bias is None else y + bias
