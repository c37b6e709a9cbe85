"""The FlashHead index: equal-size clusters of head rows, as assets on disk.

An index is built once per model (:func:`build_index`) and saved as two files in a folder:
``index.safetensors`` (``slot_token`` [K, cap] int64, -1 = empty slot; ``centroids`` [K, d] float32)
and ``flashhead.json`` (format version, sizes, default probe count, always-scored ids, build
parameters and timings, and a fingerprint of the head it was built from). Loading refuses assets
whose fingerprint or shapes do not match the model they are applied to.

Geometry. The error of scoring token ``w`` through its centroid ``c`` is ``h.(w - c)``; its mean
square over the hidden states a model produces is ``(w - c)^T S (w - c)`` with ``S = E[h h^T]``.
So, given calibration hidden states, rows are clustered after the map ``w -> S^(1/2) w`` where plain
squared L2 is exactly that error. Without calibration the rows are clustered on the unit sphere
(cosine), the better of the two raw-row geometries we measured.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from ._io import atomic_dir
from .cluster import balanced_kmeans

FORMAT_VERSION = 1
TENSORS_FILE = "index.safetensors"
CONFIG_FILE = "flashhead.json"


class AssetError(ValueError):
    """Assets on disk are missing, damaged, or belong to another model."""


def fingerprint(weight: torch.Tensor) -> str:
    """A dtype-independent fingerprint of a head weight: its shape and ~4k rows rounded to bf16.

    Rounding to bf16 makes the fp32 and bf16 copies of one model agree, while any retrained or
    different head changes the sampled rows.
    """
    rows = weight.shape[0]
    step = max(1, rows // 4096)
    sample = weight.detach()[::step].to(torch.bfloat16).contiguous().view(torch.int16).cpu().numpy()
    h = hashlib.sha256(f"{tuple(weight.shape)}".encode())
    h.update(sample.tobytes())
    return h.hexdigest()[:32]


@dataclass
class IndexConfig:
    """Everything about an index that is not a tensor (saved as plain JSON)."""

    vocab_size: int  # rows of the head = width of its logits
    num_tokens: int  # rows that are real tokens (<= vocab_size); the rest are never returned
    hidden_size: int
    num_clusters: int
    cluster_size: int
    n_probes: int  # default probe count
    always_ids: list[int]  # token ids scored at every step (EOS, ...)
    fingerprint: str  # of the head weights the index was built from
    model: str = ""  # human-readable name of that model, for error messages
    build: dict = field(default_factory=dict)  # parameters, calibration, objective, timings
    format_version: int = FORMAT_VERSION


@dataclass
class FlashHeadIndex:
    """Cluster layout of a head: which token sits in which slot, and each cluster's centroid."""

    slot_token: torch.Tensor  # [K, cap] int64, -1 = empty slot
    centroids: torch.Tensor  # [K, d] float32, mean of the cluster's head rows
    config: IndexConfig

    @property
    def num_clusters(self) -> int:
        return self.config.num_clusters

    @property
    def cluster_size(self) -> int:
        return self.config.cluster_size

    def check_weight(self, weight: torch.Tensor) -> None:
        """Refuse a head this index was not built from, saying which model it belongs to."""
        c = self.config
        if weight.dim() != 2 or tuple(weight.shape) != (c.vocab_size, c.hidden_size):
            raise AssetError(
                f"these FlashHead assets were built for a head of shape ({c.vocab_size}, {c.hidden_size})"
                f"{f' ({c.model})' if c.model else ''}, but this model's head is {tuple(weight.shape)}; "
                "build an index for this model with `flashhead build`"
            )
        if fingerprint(weight) != c.fingerprint:
            raise AssetError(
                f"these FlashHead assets belong to another model{f' ({c.model})' if c.model else ''}: the head "
                "weights differ from the ones they were built from; build an index for this model with `flashhead build`"
            )

    def save(self, folder: str | Path) -> Path:
        """Write the assets into ``folder`` atomically (the old assets stay until the new ones are whole)."""
        folder = Path(folder)
        with atomic_dir(folder) as tmp:
            save_file({"slot_token": self.slot_token.contiguous(), "centroids": self.centroids.contiguous()},
                      str(tmp / TENSORS_FILE), metadata={"format": f"flashhead-{FORMAT_VERSION}"})  # one key: header order stays fixed
            (tmp / CONFIG_FILE).write_text(json.dumps(asdict(self.config), indent=2) + "\n")
        return folder

    @classmethod
    def load(cls, folder: str | Path, weight: torch.Tensor | None = None) -> FlashHeadIndex:
        """Read assets from ``folder`` and validate them (and, given ``weight``, that they fit it)."""
        from .validate import load_assets  # the checks live in one place

        index = load_assets(Path(folder))
        if weight is not None:
            index.check_weight(weight)
        return index


def _sqrt_psd(s: torch.Tensor) -> torch.Tensor:
    vals, vecs = torch.linalg.eigh(s.double())
    return ((vecs * vals.clamp_min(0).sqrt()) @ vecs.T).float()


def build_index(weight: torch.Tensor, cluster_size: int = 16, *, hidden_states: torch.Tensor | None = None,
                num_tokens: int | None = None, n_probes: int | None = None, always_ids: list[int] | tuple = (),
                iters: int = 10, seed: int = 0, model_name: str = "", calibration: dict | None = None,
                progress: bool = True) -> FlashHeadIndex:
    """Cluster the rows of a head ``weight`` [V, d] into K equal clusters of ``cluster_size`` tokens.

    ``num_tokens`` (default V) rows are clustered; rows past it (embedding padding beyond the
    tokenizer) are left out and never returned. When ``num_tokens`` is not a multiple of
    ``cluster_size``, K = ceil(num_tokens / cluster_size) and the K*cap - num_tokens empty slots
    (fewer than cap) are marked -1. ``hidden_states`` [n, d] selects the S^(1/2) geometry (see the
    module docstring); ``n_probes`` defaults to the probe count measured as the default setting.
    """
    if weight.dim() != 2 or not weight.is_floating_point():
        raise ValueError(f"head weight must be a 2-D float tensor [vocab, hidden], got {tuple(weight.shape)} {weight.dtype}")
    vocab, hidden = weight.shape
    num_tokens = vocab if num_tokens is None else int(num_tokens)
    if not 0 < num_tokens <= vocab:
        raise ValueError(f"num_tokens must be in 1..{vocab} (the head's rows), got {num_tokens}")
    if not isinstance(cluster_size, int) or cluster_size < 2 or cluster_size > num_tokens // 2:
        raise ValueError(f"cluster_size must be an integer from 2 to {num_tokens // 2} (half the tokens) so that "
                         f"there are at least two clusters; got {cluster_size!r} (16 is the usual choice)")
    bad = [i for i in always_ids if not 0 <= int(i) < num_tokens]
    if bad:
        raise ValueError(f"always_ids {bad} are not token ids (0..{num_tokens - 1})")
    k = math.ceil(num_tokens / cluster_size)
    t0 = time.perf_counter()
    w = weight.detach()[:num_tokens].float()
    if hidden_states is not None:
        h = hidden_states.detach().float()
        if h.dim() != 2 or h.shape[1] != hidden or not torch.isfinite(h).all():
            raise ValueError(f"hidden_states must be finite [n, {hidden}], got {tuple(h.shape)}")
        x = w @ _sqrt_psd(h.T @ h / h.shape[0])
        geometry = "S^(1/2) w, S = E[h h^T] over calibration hidden states"
    else:
        x = torch.nn.functional.normalize(w, dim=1)
        geometry = "spherical (unit-norm rows)"
    t_map = time.perf_counter() - t0
    result = balanced_kmeans(x, k, cluster_size, iters=iters, seed=seed, progress=progress)
    del x
    t_cluster = time.perf_counter() - t0 - t_map
    slots = result.slots
    filled = slots.clamp_min(0)
    mask = (slots >= 0).unsqueeze(-1).float()
    centroids = (w[filled] * mask).sum(1) / mask.sum(1)
    if n_probes is None:
        n_probes = default_probes(k)
    config = IndexConfig(
        vocab_size=vocab, num_tokens=num_tokens, hidden_size=hidden, num_clusters=k, cluster_size=cluster_size,
        n_probes=int(n_probes), always_ids=sorted({int(i) for i in always_ids}), fingerprint=fingerprint(weight),
        model=model_name,
        build={"seed": seed, "iters": iters, "geometry": geometry, "calibration": calibration or None,
               "objective": result.objective, "objective_history": result.history,
               "seconds_map": round(t_map, 3), "seconds_cluster": round(t_cluster, 3)},
    )
    return FlashHeadIndex(slots, centroids.contiguous(), config)


def default_probes(num_clusters: int) -> int:
    """Default probe count: K/32 clusters (at cap 16, half as many candidate rows as centroids)."""
    return max(1, num_clusters // 32)
