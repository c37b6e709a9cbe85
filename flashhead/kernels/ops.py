"""The kernel interface: one function per step, each a ``torch.library`` custom op with a fake (meta)
implementation, so that ``torch.compile(fullgraph=True)`` traces around them and a CUDA graph captures
them (static shapes, no value read on the host).

Each op checks only what shapes, dtypes and devices say (no host sync), then runs on the backend that
:func:`~flashhead.kernels.backend.backend_for` picks for the device of ``h``. Values are not checked, since that
would read them on the host: cluster ids must lie in ``[0, K)`` and slots in ``[0, K * cap)``, as
:func:`top_clusters` and ``FlashHead`` give them (``FlashHead.candidates`` checks a caller's ids).
"""

from typing import Optional

import torch

from .backend import backend_for
from .centroids import MODES, Centroids

__all__ = ["cluster_logits", "greedy", "stage1_scores", "top_clusters"]

_ROW_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


@torch.library.custom_op("flashhead::stage1_scores", mutates_args=())
def _stage1_op(h: torch.Tensor, weight: torch.Tensor, scale: Optional[torch.Tensor], mean: Optional[torch.Tensor],
               mode: str) -> torch.Tensor:
    return backend_for(h.device).stage1_scores(h, Centroids(mode, weight, scale, mean))


@_stage1_op.register_fake
def _(h, weight, scale, mean, mode):
    return h.new_empty((h.shape[0], weight.shape[0]), dtype=torch.float32)


@torch.library.custom_op("flashhead::cluster_logits", mutates_args=())
def _logits_op(h: torch.Tensor, rows: torch.Tensor, row_scales: Optional[torch.Tensor], slot_token: torch.Tensor,
               clusters: torch.Tensor, always_slot: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return backend_for(h.device).cluster_logits(h, rows, row_scales, slot_token, clusters, always_slot)


@_logits_op.register_fake
def _(h, rows, row_scales, slot_token, clusters, always_slot):
    width = clusters.shape[1] * rows.shape[1] + always_slot.shape[0]
    shape = (clusters.shape[0], width)
    return h.new_empty(shape, dtype=torch.int64), h.new_empty(shape, dtype=torch.float32)


@torch.library.custom_op("flashhead::greedy", mutates_args=())
def _greedy_op(h: torch.Tensor, rows: torch.Tensor, row_scales: Optional[torch.Tensor], slot_token: torch.Tensor,
               clusters: torch.Tensor, always_slot: torch.Tensor) -> torch.Tensor:
    return backend_for(h.device).greedy(h, rows, row_scales, slot_token, clusters, always_slot)


@_greedy_op.register_fake
def _(h, rows, row_scales, slot_token, clusters, always_slot):
    return h.new_empty((clusters.shape[0],), dtype=torch.int64)


def _same_device(h: torch.Tensor, **tensors: torch.Tensor | None) -> None:
    for name, t in tensors.items():
        if t is not None and t.device != h.device:
            raise ValueError(f"hidden states are on {h.device} but {name} is on {t.device}; move the index there")


def _check_hidden(h: torch.Tensor, d: int) -> None:
    if h.dim() != 2 or h.shape[1] != d or not h.dtype.is_floating_point:
        raise ValueError(f"hidden states must be a float [N, d={d}] tensor, got {tuple(h.shape)} {h.dtype}")


def stage1_scores(h: torch.Tensor, centroids: Centroids) -> torch.Tensor:
    """Stage 1: scores ``[N, K]`` fp32 of ``h [N, d]`` against every centroid."""
    if centroids.mode not in MODES:
        raise ValueError(f"centroids mode must be one of {MODES}, got {centroids.mode!r}")
    d = centroids.weight.shape[1] if centroids.mean is None else centroids.mean.shape[0]
    _check_hidden(h, d)
    _same_device(h, centroids=centroids.weight, centroid_scales=centroids.scale, centroid_mean=centroids.mean)
    return _stage1_op(h.contiguous(), centroids.weight, centroids.scale, centroids.mean, centroids.mode)


def top_clusters(scores: torch.Tensor, p: int, ordered: bool) -> torch.Tensor:
    """Stage 1's selection: ``[N, p]`` ids of the ``p`` best-scored clusters (best first when ``ordered``), on the
    scores' device: no host round trip."""
    if not 1 <= p <= scores.shape[1]:
        raise ValueError(f"n_probes must be in [1, K={scores.shape[1]}], got {p}")
    return torch.topk(scores, p, dim=1, sorted=ordered).indices


def _check_stage2(h: torch.Tensor, rows: torch.Tensor, row_scales: torch.Tensor | None, slot_token: torch.Tensor,
                  clusters: torch.Tensor, always_slot: torch.Tensor) -> None:
    K, cap, d = rows.shape
    _check_hidden(h, d)
    _same_device(h, rows=rows, row_scales=row_scales, slot_token=slot_token, clusters=clusters,
                 always_slot=always_slot)
    if row_scales is None and rows.dtype not in _ROW_DTYPES:
        raise ValueError(f"rows must be fp32, bf16 or fp16 (or int8 with Q8_0 row_scales), got {rows.dtype}")
    if row_scales is not None and (rows.dtype != torch.int8 or d % 32 or tuple(row_scales.shape) != (K, cap, d // 32)):
        raise ValueError(f"Q8_0 rows must be int8 [K, cap, d] (d a multiple of 32) with row_scales [K, cap, d // 32], "
                         f"got {rows.dtype} {tuple(rows.shape)} and {tuple(row_scales.shape)}")
    if row_scales is not None and row_scales.dtype not in (torch.float16, torch.float32):
        raise ValueError(f"row_scales must be fp16 or fp32, got {row_scales.dtype}")
    for name, t in (("rows", rows), ("row_scales", row_scales), ("slot_token", slot_token)):
        if t is not None and not t.is_contiguous():
            raise ValueError(f"{name} must be contiguous (the kernels read it in place, never copy it)")
    for name, t, shape in (("slot_token", slot_token, (K, cap)), ("clusters", clusters, (h.shape[0], clusters.shape[-1])),
                           ("always_slot", always_slot, (always_slot.shape[-1],))):
        if t.dtype != torch.int64 or tuple(t.shape) != shape:
            raise ValueError(f"{name} must be int64 of shape {shape}, got {t.dtype} {tuple(t.shape)}")


def cluster_logits(h: torch.Tensor, rows: torch.Tensor, row_scales: torch.Tensor | None, slot_token: torch.Tensor,
                   clusters: torch.Tensor, always_slot: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Stage 2: the candidates ``(ids, logits)`` ``[N, p*cap + A]``: the rows of ``clusters [N, p]`` of
    ``rows [K, cap, d]`` in probe order, then the flat slots ``always_slot [A]`` (see
    :func:`flashhead.kernels.reference.cluster_logits` for the arithmetic and the -1 / -inf entries)."""
    _check_stage2(h, rows, row_scales, slot_token, clusters, always_slot)
    return _logits_op(h.contiguous(), rows, row_scales, slot_token, clusters.contiguous(), always_slot.contiguous())


def greedy(h: torch.Tensor, rows: torch.Tensor, row_scales: torch.Tensor | None, slot_token: torch.Tensor,
           clusters: torch.Tensor, always_slot: torch.Tensor) -> torch.Tensor:
    """Stage 2 and the argmax: ``[N]`` the token of the largest candidate logit, ties to the smallest id."""
    _check_stage2(h, rows, row_scales, slot_token, clusters, always_slot)
    return _greedy_op(h.contiguous(), rows, row_scales, slot_token, clusters.contiguous(), always_slot.contiguous())
