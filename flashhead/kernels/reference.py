"""The torch reference backend: the specification of every kernel, on any device.

Each function states the exact arithmetic; a faster backend must give the same tokens and logits within
the tolerance its tests state (the Triton backend: ``tests/test_triton.py``). Shapes are static and no
function reads a tensor's value on the host, so the reference can stand in on CUDA (under a CUDA graph
too) where Triton is missing, only slower.

Stage-2 logits of float rows are what the dense head in the rows' dtype gives: ``h`` rounded to that
dtype, products summed in fp32, the sum rounded once to that dtype (so bf16 logits tie often, and ties
go to the smallest id). Q8_0 rows (int8 times an fp16/fp32 scale per 32 weights) are dequantized,
exactly, and dotted with ``h`` in fp32.
"""

from __future__ import annotations

import torch

from .centroids import Centroids

__all__ = ["Q8_BLOCK", "argmax_smallest_id", "cluster_logits", "greedy", "mask_duplicates", "stage1_scores"]

Q8_BLOCK = 32  #: weights per scale in Q8_0
_INT64_MAX = torch.iinfo(torch.int64).max


def stage1_scores(h: torch.Tensor, c: Centroids) -> torch.Tensor:
    """Centroid scores ``[N, K]`` fp32 of ``h [N, d]`` (see :class:`Centroids` for each mode's arithmetic)."""
    h32 = h.float()
    if c.mode == "float":
        return h32 @ c.weight.float().t()
    if c.mode == "int8":
        d = c.weight.shape[1]
        a = h32.abs().amax(1, keepdim=True).clamp_min(1e-30) / 127.0
        hq = torch.round(h32 / a)
        # integer sums below 2^53 are exact in fp64 on every device (CUDA has no int32 matmul)
        isum = (hq.double() @ c.weight[:, :d].double().t()).float()
        return isum.mul_(a).mul_(c.scale)
    K, half = c.weight.shape
    d, G = c.mean.shape[0], c.scale.shape[1]
    codes = torch.stack([c.weight & 15, c.weight >> 4], -1).view(K, G, 2 * half // G).float() - 8
    sz = c.scale.float()
    w = (codes * sz[..., :1] + sz[..., 1:]).view(K, -1)[:, :d] + c.mean
    return h32 @ w.t()


def _rows_logits(h: torch.Tensor, rows: torch.Tensor, scales: torch.Tensor | None) -> torch.Tensor:
    """Logits ``[M]`` fp32 of ``rows [M, d]`` (Q8_0 when ``scales [M, d // 32]`` is given) for one ``h [d]``."""
    if scales is None:
        return (rows.float() @ h.to(rows.dtype).float()).to(rows.dtype).float()
    M, d = rows.shape
    w = rows.float().view(M, d // Q8_BLOCK, Q8_BLOCK) * scales.float().unsqueeze(-1)
    return w.view(M, d) @ h.float()


def mask_duplicates(ids: torch.Tensor, logits: torch.Tensor, clusters: torch.Tensor, always_cluster: torch.Tensor,
                    K: int) -> None:
    """In place: the always-scored columns (the last ``A``) whose cluster is also probed get id -1 and logit -inf,
    so that every token appears once among the candidates."""
    A = always_cluster.numel()
    if not A:
        return
    probed = torch.zeros(clusters.shape[0], K, dtype=torch.bool, device=clusters.device)
    dup = probed.scatter_(1, clusters, True)[:, always_cluster]
    ids[:, -A:].masked_fill_(dup, -1)
    logits[:, -A:].masked_fill_(dup, float("-inf"))


def argmax_smallest_id(ids: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """``[N]`` the id of the largest logit of each row, the smallest id among equal ones (as ``torch.argmax``
    over dense logits gives)."""
    best = logits.amax(1, keepdim=True)
    return torch.where(logits == best, ids, _INT64_MAX).amin(1)


def cluster_logits(h: torch.Tensor, rows: torch.Tensor, row_scales: torch.Tensor | None, slot_token: torch.Tensor,
                   clusters: torch.Tensor, always_slot: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Candidates ``(ids [N, p*cap + A] int64, logits [N, p*cap + A] fp32)``: the rows of ``clusters [N, p]`` in
    probe order, then the rows of the flat slots ``always_slot [A]``; empty slots (id -1) and always-scored ids
    also in a probed cluster get id -1 and logit -inf."""
    K, cap, d = rows.shape
    N, p = clusters.shape
    flat = rows.view(K * cap, d)
    flat_scales = None if row_scales is None else row_scales.view(K * cap, -1)
    slots = (clusters.unsqueeze(-1) * cap + torch.arange(cap, device=rows.device)).view(N, p * cap)
    slots = torch.cat([slots, always_slot.expand(N, -1)], 1)
    logits = torch.stack([
        _rows_logits(h[i], flat.index_select(0, slots[i]),
                     None if flat_scales is None else flat_scales.index_select(0, slots[i]))
        for i in range(N)]) if N else torch.empty(0, slots.shape[1], device=rows.device)
    ids = slot_token.view(-1)[slots]
    logits.masked_fill_(ids < 0, float("-inf"))
    mask_duplicates(ids, logits, clusters, always_slot // cap, K)
    return ids, logits


def greedy(h: torch.Tensor, rows: torch.Tensor, row_scales: torch.Tensor | None, slot_token: torch.Tensor,
           clusters: torch.Tensor, always_slot: torch.Tensor) -> torch.Tensor:
    """``[N]`` the argmax token over :func:`cluster_logits`' candidates, ties to the smallest id."""
    return argmax_smallest_id(*cluster_logits(h, rows, row_scales, slot_token, clusters, always_slot))
