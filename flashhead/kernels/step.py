"""A FlashHead decode step over the kernel interface: the head's tensors in the kernels' layout, and its
stage 1, stage 2 and greedy argmax as a few static-shape ops, none of which reads a value on the host, so
that a CUDA graph can capture a whole greedy step (``labs/gpu_bench.py`` replays one).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from . import ops
from .centroids import Centroids, float_centroids, int4_centroids, int8_centroids

__all__ = ["KernelHead"]


@dataclass(frozen=True)
class KernelHead:
    """FlashHead's index for the kernels: stage-1 ``centroids``, ``rows [K, cap, d]`` (float, or int8 with Q8_0
    ``row_scales``), ``slot_token [K, cap]`` int64 (-1: empty slot), the always-scored flat slots
    ``always_slot [A]`` int64 and ``n_probes``, all on one device."""

    centroids: Centroids
    rows: torch.Tensor
    row_scales: torch.Tensor | None
    slot_token: torch.Tensor
    always_slot: torch.Tensor
    n_probes: int

    def __post_init__(self) -> None:
        device = self.rows.device
        for name, t in (("centroids", self.centroids.weight), ("row_scales", self.row_scales),
                        ("slot_token", self.slot_token), ("always_slot", self.always_slot)):
            if t is not None and t.device != device:
                raise ValueError(f"the index is split across devices: rows on {device}, {name} on {t.device}; "
                                 "move the whole index with .to(device)")
        if self.centroids.K != self.rows.shape[0]:
            raise ValueError(f"{self.centroids.K} centroids for {self.rows.shape[0]} clusters of rows")
        if not 1 <= self.n_probes <= self.rows.shape[0]:
            raise ValueError(f"n_probes must be in [1, K={self.rows.shape[0]}], got {self.n_probes}")

    @classmethod
    def from_flashhead(cls, head, centroid_dtype: torch.dtype | None = None) -> KernelHead:
        """The index of a :class:`~flashhead.head.FlashHead`, on its device, sharing its rows (no copy).
        ``centroid_dtype`` (float stage 1 only): keep the float centroids in bf16 or fp16, half the bytes."""
        if head.quantize_activations:
            raise ValueError("Q8_0 activations (quantize_activations=True) have no kernel in flashhead.kernels yet")
        if centroid_dtype is not None and head.stage1 != "float":
            raise ValueError(f"centroid_dtype applies to the float stage 1, not to {head.stage1!r}")
        if head.stage1 == "float":
            c = float_centroids(head._c_t.t().to(centroid_dtype or torch.float32))
        elif head.stage1 == "int8":
            c = int8_centroids(head._q[:, : head.d], head._scale)
        else:
            c = int4_centroids(*head._int4_codes(), head._mean)
        return cls(c, head.rows, head.row_scales, head.slot_token, head._always_slot, head.n_probes)

    def to(self, device: torch.device | str) -> KernelHead:
        """The same index on ``device``."""
        move = (lambda t: None if t is None else t.to(device))
        return KernelHead(self.centroids.to(device), move(self.rows), move(self.row_scales), move(self.slot_token),
                          move(self.always_slot), self.n_probes)

    def check_hidden(self, h: torch.Tensor) -> None:
        """Refuse hidden states on another device, or in another dtype than float rows (the model's dtype)."""
        if h.device != self.rows.device:
            raise ValueError(f"hidden states are on {h.device} but the index is on {self.rows.device}; "
                             "move the index with .to(device)")
        if self.row_scales is None and h.dtype != self.rows.dtype:
            raise ValueError(f"hidden states are {h.dtype} but the index rows are {self.rows.dtype}; "
                             "keep the rows in the model's dtype")

    def select(self, h: torch.Tensor, ordered: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Stage 1: (top-``n_probes`` clusters ``[N, p]``, best first when ``ordered``; scores ``[N, K]``, or
        None when every cluster is probed)."""
        self.check_hidden(h)
        K = self.rows.shape[0]
        if self.n_probes == K:
            return torch.arange(K, device=h.device).expand(h.shape[0], K), None
        scores = ops.stage1_scores(h, self.centroids)
        return ops.top_clusters(scores, self.n_probes, ordered), scores

    def candidates(self, h: torch.Tensor, clusters: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Stage 2: ``(ids, logits)`` of the rows of ``clusters`` and of the always-scored ids."""
        self.check_hidden(h)
        return ops.cluster_logits(h, self.rows, self.row_scales, self.slot_token, clusters, self.always_slot)

    def greedy(self, h: torch.Tensor) -> torch.Tensor:
        """The greedy token ``[N]`` of ``h [N, d]``: stage 1, top p, fused stage 2 and argmax."""
        clusters, _ = self.select(h)
        return ops.greedy(h, self.rows, self.row_scales, self.slot_token, clusters, self.always_slot)
