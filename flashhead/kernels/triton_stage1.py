"""Triton stage 1: the scores of all ``K`` centroids for each hidden state, in one launch.

One program scores ``BLOCK_K`` centroids against one row of ``h``, reading each centroid once, in its
stored precision (float, int8 or int4, :class:`~flashhead.kernels.centroids.Centroids`). The int8 mode
quantizes ``h`` inside the program exactly as the reference does (IEEE division, ties to even, exact
integer sums), so its scores equal the reference's bit for bit. The top ``p`` is taken by ``torch.topk``
on the same device (no host round trip).

Loop bounds are ``constexpr``: triton 3.6's interpreter fails on a loop over a runtime bound with
numpy >= 2.4 (triton issue 9171). Every load is masked.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .centroids import Centroids

__all__ = ["block_width", "stage1_scores"]

_MODE = {"float": 0, "int8": 1, "int4": 2}
_BLOCK_K = 32
_ROUND_MAGIC = tl.constexpr(12582912.0)  # 1.5 * 2^23: (x + M) - M rounds |x| < 2^22 to an integer, ties to even


def block_width(n: int) -> int:
    """Columns a program reads per step of its loop over ``n``: up to 256, a power of two that divides ``n`` where one
    of 32 or more does (no lanes masked off in the last step), else the power of two above ``n``, at most 256."""
    width = min(256, triton.next_power_of_2(n))
    while n % width and width > 32:
        width //= 2
    return width if n % width == 0 else min(256, triton.next_power_of_2(n))


@triton.jit
def _scores_kernel(h_ptr, w_ptr, s_ptr, m_ptr, out_ptr, K,
                   D: tl.constexpr, W_COLS: tl.constexpr, ITERS: tl.constexpr, MODE: tl.constexpr,
                   GROUP: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr):
    n = tl.program_id(1)
    ks = tl.program_id(0) * BLOCK_K + tl.arange(0, BLOCK_K)
    k_in = ks < K
    w_base = w_ptr + ks[:, None].to(tl.int64) * W_COLS
    h_row = h_ptr + n.to(tl.int64) * D
    if MODE == 0:  # float centroids: fp32 sums
        acc = tl.zeros([BLOCK_K], tl.float32)
        for i in range(ITERS):
            cols = i * BLOCK_D + tl.arange(0, BLOCK_D)
            c_in = cols < D
            hv = tl.load(h_row + cols, mask=c_in, other=0.0).to(tl.float32)
            w = tl.load(w_base + cols[None, :], mask=k_in[:, None] & c_in[None, :], other=0.0).to(tl.float32)
            acc += tl.sum(w * hv[None, :], axis=1)
        score = acc
    elif MODE == 1:  # int8: h quantized per row, exact int32 sums, times both scales
        amax = tl.zeros([BLOCK_D], tl.float32)
        for i in range(ITERS):
            cols = i * BLOCK_D + tl.arange(0, BLOCK_D)
            hv = tl.load(h_row + cols, mask=cols < D, other=0.0).to(tl.float32)
            amax = tl.maximum(amax, tl.abs(hv))
        a = tl.math.div_rn(tl.maximum(tl.max(amax, axis=0), 1e-30), 127.0)
        acc_i = tl.zeros([BLOCK_K], tl.int32)
        for i in range(ITERS):
            cols = i * BLOCK_D + tl.arange(0, BLOCK_D)
            c_in = cols < D
            hv = tl.load(h_row + cols, mask=c_in, other=0.0).to(tl.float32)
            hq = ((tl.math.div_rn(hv, a) + _ROUND_MAGIC) - _ROUND_MAGIC).to(tl.int32)
            w = tl.load(w_base + cols[None, :], mask=k_in[:, None] & c_in[None, :], other=0).to(tl.int32)
            acc_i += tl.sum(w * hq[None, :], axis=1)
        scale = tl.load(s_ptr + ks, mask=k_in, other=0.0)
        score = acc_i.to(tl.float32) * a * scale
    else:  # int4: byte j holds columns 2j (low nibble) and 2j + 1; (code - 8) * scale + zero + mean
        acc = tl.zeros([BLOCK_K], tl.float32)
        for i in range(ITERS):
            js = i * BLOCK_D + tl.arange(0, BLOCK_D)
            m2 = k_in[:, None] & (js < W_COLS)[None, :]
            b = tl.load(w_base + js[None, :], mask=m2, other=0).to(tl.int32)
            sz = s_ptr + ks[:, None].to(tl.int64) * (2 * W_COLS // GROUP * 2) + ((2 * js) // GROUP * 2)[None, :]  # [K, G, 2]
            s = tl.load(sz, mask=m2, other=0.0).to(tl.float32)
            z = tl.load(sz + 1, mask=m2, other=0.0).to(tl.float32)
            ev, od = 2 * js, 2 * js + 1
            he = tl.load(h_row + ev, mask=ev < D, other=0.0).to(tl.float32)
            ho = tl.load(h_row + od, mask=od < D, other=0.0).to(tl.float32)
            me = tl.load(m_ptr + ev, mask=ev < D, other=0.0)
            mo = tl.load(m_ptr + od, mask=od < D, other=0.0)
            w_lo = ((b & 15).to(tl.float32) - 8.0) * s + z + me[None, :]
            w_hi = ((b >> 4).to(tl.float32) - 8.0) * s + z + mo[None, :]
            acc += tl.sum(w_lo * he[None, :] + w_hi * ho[None, :], axis=1)
        score = acc
    tl.store(out_ptr + n.to(tl.int64) * K + ks, score, mask=k_in)


def stage1_scores(h: torch.Tensor, c: Centroids) -> torch.Tensor:
    """Centroid scores ``[N, K]`` fp32 of ``h [N, d]`` (contiguous), as :func:`reference.stage1_scores`."""
    N, d = h.shape
    K, w_cols = c.weight.shape
    out = torch.empty(N, K, dtype=torch.float32, device=h.device)
    if N == 0:
        return out
    block_d = block_width(w_cols)
    group = 2 * w_cols // c.scale.shape[1] if c.mode == "int4" else 1
    dummy = c.weight  # an unused pointer argument must still be a tensor
    _scores_kernel[(triton.cdiv(K, _BLOCK_K), N)](
        h, c.weight, dummy if c.scale is None else c.scale, dummy if c.mean is None else c.mean, out, K,
        D=d, W_COLS=w_cols, ITERS=triton.cdiv(w_cols, block_d), MODE=_MODE[c.mode], GROUP=group,
        BLOCK_K=_BLOCK_K, BLOCK_D=block_d)
    return out
