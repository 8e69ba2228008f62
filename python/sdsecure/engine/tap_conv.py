"""Convs with big filters and few output pixels, as one matmul per filter tap.

When MAX initialises a compiled model it repacks every direct conv's filter into its kernel's layout,
on one thread, at about 0.3 GB/s: 3.3 s for the 1 GB of 3x3 filters at the full UNet's lowest level
(4x4 at 32x32 latents). A matmul's weights are read as they are. With only a few output pixels (the
rows of the matmul) a conv is bound by reading its filter whichever way it runs, and one matmul
[pixels, C] x [C, F] per tap over the shifted input, summed, runs as fast as the direct conv
([2, 4, 4, 1280] -> 1280: 7.6-8.2 ms against 7.9-8.4 ms) and binds in no time. With more pixels MAX's
conv kernel pulls ahead ([2, 8, 8, 1280]: 22.9 ms against 19.7 ms), so engine.fuse takes only small
outputs. The taps are laid out [kh*kw, C, F] at load time from the verified weights (0.03 s for 59 MB).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
from max.graph import TensorValue, ops


_CHUNK = 128      # input channels per step: the scratch stays small (fresh memory is slow to touch)


def filters(w: np.ndarray, mix: np.ndarray | None = None, out: np.ndarray | None = None) -> np.ndarray:
    """The taps T [kh*kw, C, F] of a filter `w` [F, C, kh, kw]: T[kw*r + s] = w[:, :, r, s].T. With `mix`
    [K, kh*kw], the K combinations of taps instead: out[k] = sum_t mix[k, t] T[t] (engine.winograd and
    the upsampler's phases use this). Written into `out` when given. A chunk of input channels at a time,
    straight into the result: 0.03 s for a 59 MB filter, 0.06 s with Winograd's 16-row mix (0.05 s and
    0.15 s in one piece)."""
    f, c, kh, kw = w.shape
    taps = w.reshape(f, c, kh * kw)
    rows = kh * kw if mix is None else mix.shape[0]
    if out is None:
        out = np.empty((rows, c, f), np.float32)
    for c0 in range(0, c, _CHUNK):
        block = taps[:, c0:c0 + _CHUNK].transpose(2, 1, 0)                     # [kh*kw, chunk, F]
        if mix is None:
            out[:, c0:c0 + _CHUNK] = block
        else:
            _mix(mix, np.ascontiguousarray(block, dtype=np.float32), out[:, c0:c0 + _CHUNK])
    return out


def _mix(mix: np.ndarray, block: np.ndarray, out: np.ndarray) -> None:
    """out[k] = sum_t mix[k, t] * block[t], in numpy's elementwise loops. The mixes are sparse (zeros, ones,
    halves), and a BLAS matmul starts worker threads that spin against the graph build running beside
    it (engine.fuse fills filters in the background): alone a chunk takes 1.9 ms here against 0.6 ms,
    but the UNet's cached start measured 9.6-10.7 s this way against 10.4-10.7 s with BLAS."""
    scratch = np.empty_like(block[0])
    for k, row in enumerate(mix):
        dst = out[k]
        terms = [(t, float(coef)) for t, coef in enumerate(row) if coef]
        if not terms:
            dst[...] = 0
            continue
        np.multiply(block[terms[0][0]], terms[0][1], out=dst)
        for t, coef in terms[1:]:
            if coef == 1:
                np.add(dst, block[t], out=dst)
            elif coef == -1:
                np.subtract(dst, block[t], out=dst)
            else:
                np.multiply(block[t], coef, out=scratch)
                np.add(dst, scratch, out=dst)


def conv_nhwc(x: TensorValue, taps: TensorValue, kernel: Sequence[int], pads: Sequence[int],
              bias: TensorValue | None = None) -> TensorValue:
    """Conv (stride 1, dilation 1, one group) of x [N, H, W, C] with taps [kh*kw, C, F] (see filters);
    `pads` in ONNX order (top, left, bottom, right). Gives [N, Ho, Wo, F]."""
    batch, h, w, c = (int(d) for d in x.shape)
    kh, kw = (int(k) for k in kernel)
    top, left, bottom, right = (int(p) for p in pads)
    f = int(taps.shape[2])
    ho, wo = h + top + bottom - kh + 1, w + left + right - kw + 1
    padded = ops.pad(x, [0, 0, top, bottom, left, right, 0, 0]) if any(pads) else x
    acc = None
    for r in range(kh):
        for s in range(kw):
            window = ops.reshape(padded[:, r:r + ho, s:s + wo, :], [batch * ho * wo, c])
            part = ops.matmul(window, taps[kw * r + s])
            acc = part if acc is None else acc + part
    y = ops.reshape(acc, [batch, ho, wo, f])
    return y if bias is None else y + bias
