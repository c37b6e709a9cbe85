"""Small synthetic indexes for the kernel-interface tests (tests/test_kernel_interface.py, tests/test_triton.py)."""

from __future__ import annotations

import torch

from flashhead.head import FlashHead, q8_0_rows
from flashhead.kernels import KernelHead


def make_index(K: int = 12, cap: int = 4, d: int = 96, *, rows_dtype: torch.dtype | str = torch.float32,
               stage1: str = "float", n_empty: int = 2, always: tuple[int, ...] = (0, 3, 7), n_probes: int = 3,
               seed: int = 0, device: str = "cpu") -> tuple[FlashHead, KernelHead]:
    """A random head of ``K * cap - n_empty`` tokens scattered over the slots (``rows_dtype`` ``"q8"``: exact Q8_0
    rows), as a CPU :class:`FlashHead` (it quantizes stage 1) and its :class:`KernelHead` on ``device``."""
    g = torch.Generator().manual_seed(seed)
    V = K * cap - n_empty
    W = torch.randn(V, d, generator=g)
    slot = torch.full((K * cap,), -1, dtype=torch.int64)
    slot[torch.randperm(K * cap, generator=g)[:V]] = torch.arange(V)
    valid = slot >= 0
    if rows_dtype == "q8":
        amax = W.view(V, -1, 32).abs().amax(-1, keepdim=True)
        k = (W.view(V, -1, 32) * (127 / amax)).round() + 0.0  # + 0.0: no -0.0, which a Q8_0 head cannot hold
        W = (k * (amax / 127).half().float()).view(V, d)
    flat = torch.zeros(K * cap, d)
    flat[valid] = W[slot[valid]]
    cents = flat.view(K, cap, d).sum(1) / valid.view(K, cap).sum(1, keepdim=True)
    kw = {}
    if rows_dtype == "q8":
        q, s = q8_0_rows(flat)
        rows, kw["row_scales"] = q.view(K, cap, d), s.view(K, cap, -1)
    else:
        rows = flat.view(K, cap, d).to(rows_dtype)
    head = FlashHead(rows, slot.view(K, cap), cents, out_features=V, n_probes=n_probes,
                     always_ids=torch.tensor(always, dtype=torch.int64), stage1=stage1, **kw)
    return head, KernelHead.from_flashhead(head).to(device)


def hidden(N: int, d: int, *, dtype: torch.dtype = torch.float32, seed: int = 1, device: str = "cpu") -> torch.Tensor:
    """``N`` random hidden states of width ``d``."""
    return torch.randn(N, d, generator=torch.Generator().manual_seed(seed)).to(device=device, dtype=dtype)


def logit_tolerance(ref: torch.Tensor, rows_dtype: torch.dtype | str) -> torch.Tensor:
    """How far another backend's logit may lie from the reference's: one step of the rows' dtype at that logit (the
    final rounding may fall the other way) plus what another fp32 summation order moves."""
    eps = torch.finfo(rows_dtype).eps if rows_dtype in (torch.bfloat16, torch.float16) else 0.0
    return eps * ref.abs() + 1e-5 * (1 + ref.abs())
