"""Triton stage 2: exact logits of the probed clusters' rows and of the always-scored ids, and the fused
greedy argmax, each in one launch.

The grid is ``(p + ceil(A / ROWS), N)``: program ``(j, n)`` scores one tile of row ``n``, either probe
``j`` (the ``cap`` rows of cluster ``clusters[n, j]``, contiguous in memory) or, past the probes, the next
``ROWS`` always-scored slots. Every tile has the same shape and runs the same code, so the same row gets
the same bits whichever tile holds it.

Greedy reduces without a host round trip: each program packs its best candidate into one int64 key,
``(order-preserving int32 of the logit) << 32 | (2^31 - 1 - token id)``, and ``atomic_max``-es it into
its row's slot. The largest key is the largest logit, and among equal logits the smallest id, as
``torch.argmax`` over dense logits breaks ties. ``-0.0`` is folded into ``+0.0`` first (they are equal
logits). Empty slots and padding lanes take a key below every real one.

Bf16 in the interpreter: conversions to bf16 truncate there instead of rounding to nearest even, so
rounding to bf16 is done on the bits (:func:`_round_bf16`), which is right on both. Loads of 16-bit
values are widened to fp32 straight away; loop bounds are ``constexpr``; every load is masked.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .reference import mask_duplicates
from .triton_stage1 import block_width

__all__ = ["cluster_logits", "greedy"]

_ROUND = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2, torch.int8: 0}  # int8: Q8_0 rows, fp32 logits
_LOW = 2147483647  # the key's low half is _LOW - token id
_INT64_MIN = torch.iinfo(torch.int64).min


@triton.jit
def _round_bf16(x):
    """fp32 -> the nearest bf16 (ties to even), as fp32."""
    b = x.to(tl.int32, bitcast=True)
    b = (b + (0x7FFF + ((b >> 16) & 1))) & -65536
    return b.to(tl.float32, bitcast=True)


@triton.jit
def _to_row_dtype(x, ROUND: tl.constexpr):
    """``x`` (fp32) rounded to the rows' float dtype: 0 none (fp32 or Q8_0 rows), 1 bf16, 2 fp16."""
    if ROUND == 1:
        x = _round_bf16(x)
    elif ROUND == 2:
        x = x.to(tl.float16).to(tl.float32)
    return x


@triton.jit
def _tile(j, n, clusters_ptr, always_ptr, slot_token_ptr, P, A, CAP: tl.constexpr, ROWS: tl.constexpr):
    """Tile ``j`` of row ``n``: (flat slots, token ids (-1: empty or padding lane), live lanes, output columns)."""
    r = tl.arange(0, ROWS)
    if j < P:
        k = tl.load(clusters_ptr + n.to(tl.int64) * P + j)
        slots = k * CAP + r
        live = r < CAP
        col = j * CAP + r
    else:
        t = (j - P) * ROWS + r
        live = t < A
        slots = tl.load(always_ptr + t, mask=live, other=0)
        col = P * CAP + t
    ids = tl.load(slot_token_ptr + slots, mask=live, other=-1)
    return slots, ids, live, col


@triton.jit
def _tile_logits(h_ptr, rows_ptr, scales_ptr, n, slots, live, D: tl.constexpr, ITERS: tl.constexpr,
                 BLOCK_D: tl.constexpr, ROWS: tl.constexpr, Q8: tl.constexpr, ROUND: tl.constexpr):
    """Logits (fp32) of the tile's rows for ``h[n]``: ``h`` in the rows' dtype, fp32 sums, the sum rounded
    to the rows' dtype; Q8_0 rows dequantized (int8 times the block's scale, exact) and dotted in fp32."""
    acc = tl.zeros([ROWS], tl.float32)
    h_row = h_ptr + n.to(tl.int64) * D
    for i in range(ITERS):
        cols = i * BLOCK_D + tl.arange(0, BLOCK_D)
        c_in = cols < D
        hv = _to_row_dtype(tl.load(h_row + cols, mask=c_in, other=0.0).to(tl.float32), ROUND)
        m2 = live[:, None] & c_in[None, :]
        w = tl.load(rows_ptr + slots[:, None] * D + cols[None, :], mask=m2, other=0).to(tl.float32)
        if Q8:
            w = w * tl.load(scales_ptr + slots[:, None] * (D // 32) + (cols // 32)[None, :], mask=m2,
                            other=0.0).to(tl.float32)
        acc += tl.sum(w * hv[None, :], axis=1)
    return _to_row_dtype(acc, ROUND)


@triton.jit
def _logits_kernel(h_ptr, rows_ptr, scales_ptr, slot_token_ptr, clusters_ptr, always_ptr, ids_ptr, out_ptr, P, A,
                   WIDTH, D: tl.constexpr, ITERS: tl.constexpr, BLOCK_D: tl.constexpr, CAP: tl.constexpr,
                   ROWS: tl.constexpr, Q8: tl.constexpr, ROUND: tl.constexpr):
    j, n = tl.program_id(0), tl.program_id(1)
    slots, ids, live, col = _tile(j, n, clusters_ptr, always_ptr, slot_token_ptr, P, A, CAP, ROWS)
    logits = _tile_logits(h_ptr, rows_ptr, scales_ptr, n, slots, live, D, ITERS, BLOCK_D, ROWS, Q8, ROUND)
    logits = tl.where(ids >= 0, logits, float("-inf"))
    at = n.to(tl.int64) * WIDTH + col
    tl.store(ids_ptr + at, ids, mask=live)
    tl.store(out_ptr + at, logits, mask=live)


@triton.jit
def _greedy_kernel(h_ptr, rows_ptr, scales_ptr, slot_token_ptr, clusters_ptr, always_ptr, keys_ptr, P, A,
                   D: tl.constexpr, ITERS: tl.constexpr, BLOCK_D: tl.constexpr, CAP: tl.constexpr,
                   ROWS: tl.constexpr, Q8: tl.constexpr, ROUND: tl.constexpr):
    j, n = tl.program_id(0), tl.program_id(1)
    slots, ids, live, col = _tile(j, n, clusters_ptr, always_ptr, slot_token_ptr, P, A, CAP, ROWS)
    logits = _tile_logits(h_ptr, rows_ptr, scales_ptr, n, slots, live, D, ITERS, BLOCK_D, ROWS, Q8, ROUND)
    bits = (logits + 0.0).to(tl.int32, bitcast=True)  # + 0.0: -0.0 becomes +0.0
    ordered = tl.where(bits >= 0, bits, bits ^ 0x7FFFFFFF)  # int32 order = float order
    key = (ordered.to(tl.int64) << 32) | (2147483647 - ids)
    key = tl.where(ids >= 0, key, -9223372036854775807)  # below every real key
    tl.atomic_max(keys_ptr + n, tl.max(key, axis=0))


def _launch(kernel, h: torch.Tensor, rows: torch.Tensor, row_scales: torch.Tensor | None, slot_token: torch.Tensor,
            clusters: torch.Tensor, always_slot: torch.Tensor, *outputs, **extra) -> None:
    """Runs ``kernel`` over the (tile, row) grid with the shape constants of these rows."""
    K, cap, d = rows.shape
    N, p = clusters.shape
    A = always_slot.numel()
    tile = triton.next_power_of_2(cap)
    block_d = block_width(d)
    kernel[(p + triton.cdiv(A, tile), N)](
        h, rows, rows if row_scales is None else row_scales, slot_token, clusters, always_slot, *outputs, p, A,
        **extra, D=d, ITERS=triton.cdiv(d, block_d), BLOCK_D=block_d, CAP=cap, ROWS=tile,
        Q8=row_scales is not None, ROUND=_ROUND[rows.dtype])


def cluster_logits(h: torch.Tensor, rows: torch.Tensor, row_scales: torch.Tensor | None, slot_token: torch.Tensor,
                   clusters: torch.Tensor, always_slot: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Candidates ``(ids, logits)`` as :func:`reference.cluster_logits` (contiguous inputs)."""
    N, p = clusters.shape
    width = p * rows.shape[1] + always_slot.numel()
    ids = torch.empty(N, width, dtype=torch.int64, device=h.device)
    logits = torch.empty(N, width, dtype=torch.float32, device=h.device)
    if N:
        _launch(_logits_kernel, h, rows, row_scales, slot_token, clusters, always_slot, ids, logits, WIDTH=width)
    mask_duplicates(ids, logits, clusters, always_slot // rows.shape[1], rows.shape[0])
    return ids, logits


def greedy(h: torch.Tensor, rows: torch.Tensor, row_scales: torch.Tensor | None, slot_token: torch.Tensor,
           clusters: torch.Tensor, always_slot: torch.Tensor) -> torch.Tensor:
    """``[N]`` the argmax token as :func:`reference.greedy`, stage 2 and the argmax fused (contiguous inputs)."""
    keys = torch.full((clusters.shape[0],), _INT64_MIN, dtype=torch.int64, device=h.device)
    if clusters.shape[0]:
        _launch(_greedy_kernel, h, rows, row_scales, slot_token, clusters, always_slot, keys)
    return _LOW - (keys & 0xFFFFFFFF)
