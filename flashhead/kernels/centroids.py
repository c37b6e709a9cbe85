"""Stage-1 weights in the layout every kernel backend reads: one small, device-agnostic record.

Why a record of its own: the head quantizes its centroids once (``FlashHead._build_stage1``), and each
backend needs the same values in a plain layout (no CPU-kernel packing), so that a Triton program can
read one centroid's codes as one contiguous run of bytes.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["MODES", "Centroids", "float_centroids", "int4_centroids", "int8_centroids"]

MODES = ("float", "int8", "int4")


@dataclass(frozen=True)
class Centroids:
    """The ``K`` stage-1 centroids of width ``d`` in one of :data:`MODES`.

    * ``"float"``: ``weight [K, d]`` fp32, bf16 or fp16; a score is ``h . c`` summed in fp32.
    * ``"int8"``: ``weight [K, d]`` int8 and ``scale [K]`` fp32 (``c = scale * q``); ``h`` is quantized per row
      to int8 (``a = max|h| / 127``) and a score is the exact integer sum times ``a`` times ``scale``.
    * ``"int4"``: ``weight [K, d_pad // 2]`` uint8, two codes ``0..15`` a byte (column ``2i`` in the low nibble),
      ``scale [K, d_pad // group, 2]`` bf16 (scale, zero) per group and ``mean [d]`` fp32: the centroid is
      ``(code - 8) * scale + zero + mean`` (columns past ``d`` are padding, multiplied by zeros).
    """

    mode: str
    weight: torch.Tensor
    scale: torch.Tensor | None = None
    mean: torch.Tensor | None = None

    @property
    def K(self) -> int:
        return self.weight.shape[0]

    @property
    def device(self) -> torch.device:
        return self.weight.device

    def to(self, device: torch.device | str) -> Centroids:
        """The same centroids on ``device``."""
        move = (lambda t: None if t is None else t.to(device))
        return Centroids(self.mode, move(self.weight), move(self.scale), move(self.mean))


def float_centroids(c: torch.Tensor) -> Centroids:
    """Float centroids ``[K, d]`` (fp32, bf16 or fp16), kept as given."""
    if c.dim() != 2 or c.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(f"float centroids must be a [K, d] fp32/bf16/fp16 tensor, got {tuple(c.shape)} {c.dtype}")
    return Centroids("float", c.contiguous())


def int8_centroids(q: torch.Tensor, scale: torch.Tensor) -> Centroids:
    """int8 centroids ``q [K, d]`` with one fp32 ``scale [K]`` each."""
    if q.dim() != 2 or q.dtype != torch.int8 or tuple(scale.shape) != (q.shape[0],):
        raise ValueError(f"int8 centroids need q [K, d] int8 and scale [K], got {tuple(q.shape)} {q.dtype} "
                         f"and {tuple(scale.shape)}")
    return Centroids("int8", q.contiguous(), scale.to(torch.float32).contiguous())


def int4_centroids(codes: torch.Tensor, sz: torch.Tensor, mean: torch.Tensor) -> Centroids:
    """int4 centroids from plain ``codes [K, d_pad]`` (``0..15``), bf16 ``sz [K, G, 2]`` (scale, zero) and
    ``mean [d]``: the codes packed two a byte, column ``2i`` in the low nibble."""
    K, d_pad = codes.shape
    if d_pad % 2 or sz.dim() != 3 or sz.shape[0] != K or sz.shape[2] != 2 or d_pad % sz.shape[1] or mean.dim() != 1 \
            or mean.shape[0] > d_pad:
        raise ValueError(f"int4 centroids need codes [K, d_pad], sz [K, G, 2] with G dividing d_pad and mean [d <= "
                         f"d_pad], got {tuple(codes.shape)}, {tuple(sz.shape)}, {tuple(mean.shape)}")
    c = codes.to(torch.uint8).view(K, d_pad // 2, 2)
    packed = c[..., 0] | (c[..., 1] << 4)
    return Centroids("int4", packed.contiguous(), sz.to(torch.bfloat16).contiguous(),
                     mean.to(torch.float32).contiguous())
