"""ServedHead's exact rows without an engine (fast): the dense head read from the model's tensor (TP=1)
and from FlashHead's own rows, float or Q8_0 (what each rank does under tensor parallelism), and the
one-hot greedy rows."""

from __future__ import annotations

import pytest
import torch

from flashhead.head import FlashHead, q8_0_rows
from flashhead.integrations.vllm.model import ServedHead


def _q8_exact_head(V: int, d: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    w = torch.randn(V, d // 32, 32, generator=g) * (0.5 + torch.rand(V, d // 32, 1, generator=g))
    amax = w.abs().amax(-1, keepdim=True)
    return ((torch.round(w * (127 / amax)) + 0.0) * (amax / 127).half().float()).view(V, d)


@pytest.mark.parametrize("rows", ["float", "q8_0"])
@pytest.mark.parametrize("own_tensor", [True, False])
def test_dense_rows_and_one_hot_greedy(rows, own_tensor):
    V, d, K = 20000, 64, 1250  # 20,000 rows: more than one block of the blockwise dense head
    W = _q8_exact_head(V, d)
    slot = torch.randperm(V, generator=torch.Generator().manual_seed(1)).view(K, V // K)
    kw = dict(out_features=V, n_probes=40, always_ids=torch.tensor([7]))
    if rows == "float":
        head = FlashHead(W[slot], slot, W[slot].mean(1), **kw)
    else:
        q, s = q8_0_rows(W)
        head = FlashHead(q[slot], slot, W[slot].mean(1), row_scales=s[slot], **kw)
    served = ServedHead(head, dense_weight=W if own_tensor else None)
    h = torch.randn(3, d, generator=torch.Generator().manual_seed(2))
    want = h @ W.T
    assert torch.allclose(served.dense(h), want, rtol=0, atol=1e-4)
    ids, vals = served.exact(h[0], torch.tensor([3, 11, 19999]))
    assert torch.allclose(vals, want[0, ids], rtol=0, atol=1e-4)
    one_hot = served.greedy(h)
    assert torch.equal(one_hot.argmax(1), head.greedy(h)) and bool((torch.isfinite(one_hot).sum(1) == 1).all())
