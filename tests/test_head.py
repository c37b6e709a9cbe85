"""Tests of flashhead.head.FlashHead on small synthetic heads (no model needed).

Most checks use integer-valued rows and hidden states (entries in -2..2): every dot product is
then exact in fp32 and bf16 whatever the kernel's summation order, so "equal to the dense
head" can be asserted bit for bit, and ties are frequent (which exercises tie-breaking).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from flashhead.head import STAGE1_MODES, FlashHead

NEG_INF = float("-inf")


@dataclass
class Synth:
    head: FlashHead
    W: torch.Tensor  # [V, d] float32, row t = token t (only tokens that own a slot)
    V: int  # tokens with a slot: ids 0..V-1; ids V..out_features-1 are padding
    rows: torch.Tensor  # the [K, cap, d] tensor handed to the head

    def dense(self, h: torch.Tensor) -> torch.Tensor:
        """Dense-head logits in the head's dtype, float32, -inf for padding ids."""
        dt = self.rows.dtype
        out = torch.full((h.shape[0], self.head.out_features), NEG_INF)
        out[:, : self.V] = (h.to(dt) @ self.W.to(dt).t()).float()
        return out


def make(
    K: int,
    cap: int,
    d: int,
    *,
    n_empty: int = 0,
    out_pad: int = 0,
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
    integer: bool = True,
    stage1: str = "float",
    n_probes: int | None = None,
    always: list[int] | None = None,
    scale: float = 1.0,
) -> Synth:
    """A random head: V = K*cap - n_empty tokens scattered over the slots at random."""
    g = torch.Generator().manual_seed(seed)
    V = K * cap - n_empty
    if integer:
        W = torch.randint(-2, 3, (V, d), generator=g).float()
    else:
        W = torch.randn(V, d, generator=g) * scale
    slot = torch.full((K * cap,), -1, dtype=torch.int64)
    slot[torch.randperm(K * cap, generator=g)[:V]] = torch.arange(V)
    valid = slot >= 0
    rows = torch.zeros(K * cap, d)
    rows[valid] = W[slot[valid]]
    rows = rows.view(K, cap, d).to(dtype)
    W = W.to(dtype).float()
    # integer data: centroid = sum of the rows (integer, so stage-1 scores are exact too)
    cents = rows.float().sum(1) if integer else rows.float().sum(1) / valid.view(K, cap).sum(1, keepdim=True)
    head = FlashHead(
        rows,
        slot.view(K, cap),
        cents,
        out_features=V + out_pad,
        n_probes=K if n_probes is None else n_probes,
        always_ids=None if always is None else torch.tensor(always),
        stage1=stage1,
    )
    return Synth(head, W, V, rows)


def hidden(N: int, d: int, seed: int = 1, integer: bool = True) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    if integer:
        return torch.randint(-2, 3, (N, d), generator=g).float()
    return torch.randn(N, d, generator=g)


def chi2_critical(df: int, z: float) -> float:
    """Wilson-Hilferty upper quantile of chi2(df) for the standard-normal quantile z."""
    a = 2.0 / (9.0 * df)
    return df * (1.0 - a + z * math.sqrt(a)) ** 3


Z_1E3 = 3.0902  # standard normal 0.999 quantile: each chi-square test has a 1e-3 false-alarm rate


def chi2_stat(counts: torch.Tensor, probs: torch.Tensor) -> tuple[float, int]:
    n = counts.sum()
    keep = probs > 0
    assert counts[~keep].sum() == 0, "drew an outcome of probability 0"
    exp = probs[keep] * n
    assert exp.min() >= 5, "test design: expected counts must be >= 5"
    stat = ((counts[keep] - exp) ** 2 / exp).sum().item()
    return stat, int(keep.sum()) - 1


# ------------------------------------------------------------------------------------------
# exactness with every cluster probed
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("N", [1, 7])
def test_full_probe_equals_dense(dtype, N):
    s = make(6, 5, 24, n_empty=3, out_pad=4, dtype=dtype, always=[0, 7])
    h = hidden(N, 24)
    dense = s.dense(h)
    assert torch.equal(s.head.greedy(h), dense.argmax(1))
    out = s.head(h)
    assert out.dtype == torch.float32 and out.shape == (N, s.V + 4)
    assert torch.equal(out, dense)  # candidates exact, -inf elsewhere (padding ids)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_full_probe_random_data(dtype):
    s = make(16, 8, 64, n_empty=5, out_pad=3, dtype=dtype, integer=False)
    h = hidden(9, 64, integer=False)
    dense = s.dense(h)
    out = s.head(h)
    assert torch.equal(out.isinf(), dense.isinf())
    fin = dense.isfinite()
    tol = 1e-4 if dtype == torch.float32 else 0.1
    assert torch.allclose(out[fin], dense[fin], atol=tol, rtol=1e-2)
    assert torch.equal(s.head.greedy(h), dense.argmax(1))


def test_ties_resolve_to_smallest_id():
    # every token has the same row -> all logits equal -> dense argmax = 0
    K, cap, d = 4, 3, 8
    slot = torch.tensor([[5, 9, -1], [2, 7, 11], [0, 4, 8], [1, 3, 6]])
    rows = torch.ones(K, cap, d)
    rows[0, 2] = 0
    cents = rows.sum(1) * torch.tensor([1.0, 2.0, 1.0, 1.0])[:, None]
    head = FlashHead(rows, slot, cents, out_features=14, n_probes=K)
    h = torch.ones(3, d)
    assert head.greedy(h).tolist() == [0, 0, 0]
    head.n_probes = 1  # probes cluster 1 only (largest centroid score): ties -> token 2
    assert head.greedy(h).tolist() == [2, 2, 2]
    # duplicated rows with a strict maximum: ids 3 and 9 share the best row
    rows2 = torch.zeros(K, cap, d)
    rows2[0, 1] = 2.0  # token 9
    rows2[3, 1] = 2.0  # token 3
    head2 = FlashHead(rows2, slot, rows2.sum(1) + 1, out_features=14, n_probes=K)
    assert head2.greedy(torch.ones(2, d)).tolist() == [3, 3]


# ------------------------------------------------------------------------------------------
# batching, probing, candidates
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("stage1", STAGE1_MODES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_batched_equals_per_row(stage1, dtype):
    s = make(32, 4, 48, n_empty=2, out_pad=2, dtype=dtype, stage1=stage1, n_probes=3, always=[1])
    h = hidden(12, 48, seed=5)
    out = s.head(h)
    greedy = s.head.greedy(h)
    cl = s.head.select_clusters(h)
    for i in range(h.shape[0]):
        assert torch.equal(s.head(h[i : i + 1]), out[i : i + 1])
        assert torch.equal(s.head.greedy(h[i : i + 1]), greedy[i : i + 1])
        assert torch.equal(s.head.select_clusters(h[i : i + 1]).sort().values, cl[i : i + 1].sort().values)


def test_topp_probes_and_logits():
    s = make(10, 4, 16, n_empty=1, out_pad=2, n_probes=3)
    h = hidden(5, 16)
    scores = s.head.stage1_scores(h)
    assert scores.dtype == torch.float32 and scores.shape == (5, 10)
    assert torch.equal(scores, h @ s.head.centroids.t())
    cl = s.head.select_clusters(h)
    assert cl.shape == (5, 3)
    assert torch.equal(scores.gather(1, cl).sort(1).values, scores.topk(3).values.sort(1).values)
    ids, logits = s.head.candidates(h, cl)
    assert ids.shape == logits.shape == (5, 12) and ids.dtype == torch.int64
    assert torch.equal(ids, s.head.slot_token[cl].view(5, 12))
    dense = s.dense(h)
    valid = ids >= 0
    assert torch.equal(logits[valid], dense.gather(1, ids.clamp(min=0))[valid])
    assert torch.all(logits[~valid] == NEG_INF)
    out = s.head(h)
    expect = torch.full_like(out, NEG_INF)
    for i in range(5):
        expect[i, ids[i][valid[i]]] = logits[i][valid[i]]
    assert torch.equal(out, expect)


def test_padding_and_empty_slots_never_returned():
    s = make(8, 4, 16, n_empty=3, out_pad=5, n_probes=2, integer=False)
    g = torch.Generator().manual_seed(0)
    h = hidden(300, 16, integer=False) * 3
    for tok in (
        s.head.greedy(h),
        s.head.sample(h, temperature=1.0, generator=g),
        s.head.sample(h, temperature=5.0, top_k=3, top_p=0.5, generator=g),
    ):
        assert tok.min() >= 0 and tok.max() < s.V
    assert torch.all(s.head(h)[:, s.V :] == NEG_INF)


def test_always_ids_always_scored_once():
    always = [0, 5, 17]
    s = make(12, 3, 16, out_pad=1, n_probes=1, always=always + [5])  # duplicate id is merged
    h = hidden(40, 16, seed=3)
    ids, logits = s.head.candidates(h, s.head.select_clusters(h))
    assert ids.shape[1] == 3 + 3
    dense = s.dense(h)
    out = s.head(h)
    for i in range(40):
        row = ids[i][ids[i] >= 0]
        assert row.unique().numel() == row.numel()  # no token twice
        assert set(always) <= set(row.tolist())
    assert torch.equal(out[:, always], dense[:, always])
    # an always id whose own cluster is probed appears once, with its real logit
    k5 = int(s.head.token_slot[5]) // 3
    h5 = hidden(1, 16, seed=4)
    ids5, lg5 = s.head.candidates(h5, torch.tensor([[k5]]))
    assert (ids5 == 5).sum() == 1
    assert lg5[ids5 == 5].item() == s.dense(h5)[0, 5].item()


def test_quantized_stage1_ranking_close_to_float():
    """Top-1 cluster agreement with float32 stage 1 on clustered data (K=256, d=64)."""
    g = torch.Generator().manual_seed(0)
    K, cap, d = 256, 4, 64
    centers = torch.randn(K, d, generator=g)
    rows = centers[:, None, :] + 0.3 * torch.randn(K, cap, d, generator=g)
    slot = torch.arange(K * cap).view(K, cap)
    cents = rows.mean(1)
    h = cents[torch.randint(0, K, (2000,), generator=g)] + 1.5 * torch.randn(2000, d, generator=g)
    ref = FlashHead(rows, slot, cents, out_features=K * cap, n_probes=8).stage1_scores(h).argmax(1)
    # measured on this data: int8 0.997, int4 0.97 (seeded, deterministic)
    for mode, min_agree in (("int8", 0.99), ("int4", 0.93)):
        head = FlashHead(rows, slot, cents, out_features=K * cap, n_probes=8, stage1=mode)
        scores = head.stage1_scores(h)
        assert scores.dtype == torch.float32
        agree = (scores.argmax(1) == ref).float().mean().item()
        assert agree >= min_agree, (mode, agree)
        recall4 = (scores.topk(4, dim=1).indices == ref[:, None]).any(1).float().mean().item()
        assert recall4 >= 0.995, (mode, recall4)


@pytest.mark.parametrize("stage1,tol", [("int8", 0.02), ("int4", 0.2)])
def test_quantized_scores_error_bound(stage1, tol):
    """|q-score - score| <= tol * |h| * |c| on odd shapes (d=1 included: _int_mm bug guard)."""
    g = torch.Generator().manual_seed(3)
    for K, d, N in ((1, 1, 1), (3, 1, 2), (7, 5, 3), (17, 33, 17), (40, 100, 2)):
        C = torch.randn(K, d, generator=g)
        h = torch.randn(N, d, generator=g)
        head = FlashHead(torch.zeros(K, 1, d), torch.arange(K).view(K, 1), C, out_features=K, n_probes=1,
                         stage1=stage1)
        err = (head.stage1_scores(h) - h @ C.t()).abs()
        assert torch.all(err <= tol * h.norm(dim=1, keepdim=True) * C.norm(dim=1)), (K, d, N)


def test_quantized_odd_shapes():
    # int4 pads K to 16 and d to 32 internally; results stay [N, K]
    for K, d in ((5, 7), (17, 33), (3, 64)):
        s = make(K, 2, d, stage1="int4", n_probes=min(2, K))
        h = hidden(3, d)
        assert s.head.stage1_scores(h).shape == (3, K)
        assert s.head.greedy(h).shape == (3,)


# ------------------------------------------------------------------------------------------
# sampling
# ------------------------------------------------------------------------------------------
def _reference_probs(logits: torch.Tensor, T: float, top_k: int | None, top_p: float | None) -> torch.Tensor:
    """Dense reference: softmax(logits/T) after top-k then nucleus filtering."""
    z = logits / T
    if top_k is not None:
        kth = z.topk(top_k).values[-1]
        z = torch.where(z < kth, NEG_INF, z)
    if top_p is not None:
        p = z.softmax(0)
        order = p.argsort(descending=True)
        before = p[order].cumsum(0) - p[order]  # mass of strictly better tokens
        drop = torch.zeros_like(p, dtype=torch.bool)
        drop[order[before >= top_p]] = True
        z = torch.where(drop, NEG_INF, z)
    return z.softmax(0)


@pytest.mark.parametrize("T,top_k,top_p", [(1.0, None, None), (2.0, 8, 0.9)])
def test_sampling_full_probe_matches_dense_softmax(T, top_k, top_p):
    """n=40000 draws, chi-square at false-alarm rate 1e-3 and TV < 0.02 (fixed seed)."""
    s = make(4, 4, 8, n_empty=2, out_pad=2, integer=False, scale=0.5)
    h = hidden(1, 8, seed=11, integer=False)
    probs = _reference_probs(s.dense(h)[0], T, top_k, top_p)
    n = 40000
    tok = s.head.sample(h.expand(n, 8), temperature=T, top_k=top_k, top_p=top_p,
                        generator=torch.Generator().manual_seed(1234))
    counts = torch.bincount(tok, minlength=s.head.out_features).double()
    stat, df = chi2_stat(counts, probs.double())
    assert stat < chi2_critical(df, Z_1E3), (stat, df)
    assert 0.5 * (counts / n - probs).abs().sum() < 0.02


@pytest.mark.parametrize("always", [None, [3, 9]])
def test_sampling_with_a_tail_matches_its_exact_distribution(always):
    """p < K: draws follow the distribution flashhead.evaluate computes exactly (candidates exact,
    unprobed clusters by estimated mass), and tokens of unprobed clusters are drawn: chi-square at 1e-3."""
    from flashhead.evaluate import sampling_distribution

    s = make(6, 3, 8, n_empty=1, integer=False, n_probes=2, scale=0.4, always=always)
    h = hidden(1, 8, seed=3, integer=False)
    T = 1.5
    probs = sampling_distribution(s.head, h, s.dense(h), T)[0].double()
    assert abs(float(probs.sum()) - 1.0) < 1e-6
    n = 40000
    tok = s.head.sample(h.expand(n, 8), temperature=T, generator=torch.Generator().manual_seed(7))
    counts = torch.bincount(tok, minlength=s.head.out_features).double()
    stat, df = chi2_stat(counts, probs)
    assert stat < chi2_critical(df, Z_1E3), (stat, df)
    probed = s.head.slot_token[s.head.select_clusters(h)[0]].flatten()
    assert (~torch.isin(tok, probed)).float().mean() > 0.1  # the tail is really sampled


def test_tail_estimate_is_exact_when_clusters_are_tight():
    """Rows equal within each cluster: a centroid predicts its cluster's mass exactly, so FlashHead's
    sampling distribution is the dense softmax at every probe count."""
    from flashhead.evaluate import sampling_distribution

    g = torch.Generator().manual_seed(0)
    K, cap, d = 8, 4, 6
    cents = torch.randn(K, d, generator=g)
    rows = cents[:, None, :].expand(K, cap, d).contiguous()
    head = FlashHead(rows, torch.arange(K * cap).view(K, cap), cents, out_features=K * cap, n_probes=2)
    h = torch.randn(5, d, generator=g)
    dense = h @ rows.view(-1, d).T
    for T in (0.7, 1.0):
        assert torch.allclose(sampling_distribution(head, h, dense, T), (dense / T).softmax(-1), atol=1e-6)


def test_seeded_sampling_reproducible():
    s = make(16, 4, 16, n_empty=1, integer=False, n_probes=3)
    h = hidden(20, 16, integer=False)
    a = s.head.sample(h, temperature=0.9, top_k=10, generator=torch.Generator().manual_seed(5))
    b = s.head.sample(h, temperature=0.9, top_k=10, generator=torch.Generator().manual_seed(5))
    assert torch.equal(a, b)
    s.head.temperature = 2.0
    s.head.generator = torch.Generator().manual_seed(9)
    o1 = s.head(h)
    s.head.generator = torch.Generator().manual_seed(9)
    o2 = s.head(h)
    assert torch.equal(o1, o2)
    # when sampling, forward scores the top-p candidates plus the tokens of one unprobed cluster
    ids, _ = s.head.candidates(h, s.head.select_clusters(h))
    cluster_of = s.head.token_slot // s.head.cap
    for i in range(20):
        extra = set(o1[i].isfinite().nonzero().flatten().tolist()) - set(ids[i][ids[i] >= 0].tolist())
        assert len({int(cluster_of[t]) for t in extra}) == 1
    s.head.temperature = None
    assert torch.equal(s.head(h).isfinite(), s.head(h).isfinite())


# ------------------------------------------------------------------------------------------
# inputs, dtypes, memory
# ------------------------------------------------------------------------------------------
def test_validation_errors():
    s = make(4, 3, 8, n_probes=2)
    head = s.head
    h = hidden(2, 8)
    bad = [
        (lambda: head.greedy(torch.zeros(2, 7)), "last dim d=8"),
        (lambda: head(torch.zeros(2, 3, 9)), "last dim d=8"),
        (lambda: head.greedy(torch.tensor([[float("nan")] * 8])), "NaN or Inf"),
        (lambda: head(torch.full((1, 8), float("inf"))), "NaN or Inf"),
        (lambda: head.greedy(torch.zeros(2, 8, dtype=torch.int64)), "float tensor"),
        (lambda: head.stage1_scores(torch.zeros(1, 2, 8)), r"\[N, d=8\]"),
        (lambda: setattr(head, "n_probes", 0), r"n_probes must be in \[1, K=4\]"),
        (lambda: setattr(head, "n_probes", 5), r"n_probes must be in \[1, K=4\]"),
        (lambda: setattr(head, "n_probes", 2.0), "n_probes must be an int"),
        (lambda: head.select_clusters(h, n_probes=True), "n_probes must be an int"),
        (lambda: setattr(head, "temperature", 0.0), "temperature must be a finite float > 0"),
        (lambda: setattr(head, "temperature", float("nan")), "temperature must be a finite float > 0"),
        (lambda: head.sample(h, temperature=-1.0), "temperature must be a finite float > 0"),
        (lambda: head.sample(h, temperature=float("inf")), "temperature must be a finite float > 0"),
        (lambda: head.sample(h, temperature=1.0, top_p=0.0), r"top_p must be in \(0, 1\]"),
        (lambda: head.sample(h, temperature=1.0, top_p=1.5), r"top_p must be in \(0, 1\]"),
        (lambda: head.sample(h, temperature=1.0, top_k=0), "top_k must be an int >= 1"),
        (lambda: head.candidates(h, torch.tensor([[0], [4]])), r"cluster ids must lie in \[0, K=4\)"),
        (lambda: head.candidates(h, torch.tensor([0, 1])), "clusters must be a"),
    ]
    for fn, msg in bad:
        with pytest.raises(ValueError, match=msg):
            fn()
    assert head.n_probes == 2


def test_constructor_validation():
    rows = torch.zeros(3, 2, 4)
    slot = torch.tensor([[0, 1], [2, 3], [4, -1]])
    c = torch.zeros(3, 4)
    ok = dict(out_features=5, n_probes=1)
    FlashHead(rows, slot, c, **ok)
    bad = [
        ((torch.zeros(6, 4), slot, c), ok, r"\[K, cap, d\]"),
        ((rows.long(), slot, c), ok, "float32, bfloat16 or float16"),
        ((torch.zeros(3, 4, 2).transpose(1, 2), slot, c), ok, "unit stride"),
        ((rows, slot[:2], c), ok, r"slot_token must have shape \[K, cap\]"),
        ((rows, slot.float(), c), ok, "integer tensor"),
        ((rows, torch.tensor([[0, 1], [2, 3], [4, -2]]), c), ok, "ids < -1"),
        ((rows, slot, c), dict(out_features=4, n_probes=1), "out_features must be >= max token id"),
        ((rows, torch.tensor([[0, 1], [2, 3], [3, -1]]), c), ok, "more than once"),
        ((rows, torch.tensor([[0, 1], [2, -1], [4, -1]]), c), ok, "at most cap - 1 = 1"),
        ((rows, slot, c[:2]), ok, r"centroids must have shape \[K, d\]"),
        ((rows, slot, c + float("nan")), ok, "NaN/Inf"),
        ((rows, slot, c), dict(ok, stage1="int2"), "stage1 must be one of"),
        ((rows, slot, c), dict(ok, n_probes=4), r"n_probes must be in \[1, K=3\]"),
        ((rows, slot, c), dict(ok, always_ids=torch.tensor([5])), "always_ids must lie in"),
        ((rows, torch.tensor([[0, 1], [2, 3], [-1, 5]]), c), dict(ok, out_features=6, always_ids=torch.tensor([4])),
         "own no slot"),
    ]
    for args, kw, msg in bad:
        with pytest.raises(ValueError, match=msg):
            FlashHead(*args, **kw)


def test_non_contiguous_and_shapes():
    s = make(8, 4, 16, n_probes=3, always=[2])
    h = hidden(5, 16)
    h_nc = h.t().contiguous().t()
    assert not h_nc.is_contiguous()
    assert torch.equal(s.head(h_nc), s.head(h))
    assert torch.equal(s.head.greedy(h_nc), s.head.greedy(h))
    assert torch.equal(s.head.greedy(h[:, None, :][:, 0]), s.head.greedy(h))
    # [B, T, d] -> [B, T, V] and [d] -> [V], like nn.Linear
    out3 = s.head(h.view(5, 1, 16).expand(5, 2, 16))
    assert out3.shape == (5, 2, s.head.out_features)
    assert torch.equal(out3[:, 1], s.head(h))
    assert torch.equal(s.head(h[0]), s.head(h)[0])
    assert s.head(torch.zeros(0, 16)).shape == (0, s.head.out_features)
    assert s.head.greedy(torch.zeros(0, 16)).shape == (0,)
    for mode in ("int8", "int4"):
        q = make(8, 4, 16, n_probes=3, stage1=mode).head
        assert q.sample(torch.zeros(0, 16), temperature=1.0, top_k=2, top_p=0.5).shape == (0,)


def test_dtypes():
    for dt in (torch.float32, torch.bfloat16, torch.float16):
        s = make(6, 4, 16, dtype=dt, n_probes=2)
        for hdt in (torch.float32, torch.bfloat16, torch.float16):
            h = hidden(3, 16).to(hdt)
            out = s.head(h)
            assert out.dtype == torch.float32
            ids, logits = s.head.candidates(h, s.head.select_clusters(h))
            assert logits.dtype == torch.float32
            assert s.head.greedy(h).dtype == torch.int64


def test_rows_shared_with_embedding_not_copied():
    K, cap, d, V = 8, 4, 16, 30
    emb = torch.nn.Embedding(K * cap + 3, d)  # cluster-ordered table, 3 trailing spare rows
    with torch.no_grad():
        emb.weight.copy_(torch.randint(-2, 3, emb.weight.shape).float())
    rows = emb.weight.detach()[: K * cap].view(K, cap, d)
    slot = torch.arange(K * cap).view(K, cap)
    slot[-1, -2:] = -1
    with torch.no_grad():
        emb.weight[K * cap - 2 : K * cap] = 0.0
    head = FlashHead(rows, slot, rows.sum(1), out_features=V + 5, n_probes=K)
    assert head.rows.data_ptr() == emb.weight.data_ptr()
    assert "rows" not in head.state_dict()
    h = torch.ones(1, d)
    with torch.no_grad():
        emb.weight[7] = 5.0  # token 7 sits in slot (1, 3)
    assert head.greedy(h).item() == 7
    # casting the module keeps stage-1 tensors float32 and still works
    head.to(torch.bfloat16)
    assert head.centroids.dtype == torch.float32 and head.rows.dtype == torch.bfloat16
    assert head.greedy(h).item() == 7


def test_rows_requiring_grad_forward_differentiable():
    w = torch.nn.Parameter(torch.randn(4 * 2, 8))
    head = FlashHead(w.view(4, 2, 8), torch.arange(8).view(4, 2), torch.randn(4, 8), out_features=8, n_probes=2)
    out = head(torch.randn(3, 8))
    out[out.isfinite()].sum().backward()
    assert w.grad is not None
    with torch.no_grad():
        assert head.greedy(torch.randn(2, 8)).shape == (2,)


def test_nbytes_per_step():
    sizes = {}
    for mode in STAGE1_MODES:
        s = make(64, 8, 64, stage1=mode, n_probes=4, always=[3])
        sizes[mode] = s.head.nbytes_per_step()
        assert s.head.nbytes_per_step(5) - sizes[mode] == 8 * (64 * 4 + 8)
    assert sizes["float"] > sizes["int8"] > sizes["int4"]
    assert sizes["float"] == 64 * 64 * 4 + (4 * 8 + 1) * (64 * 4 + 8)


# ------------------------------------------------------------------------------------------
# property tests
# ------------------------------------------------------------------------------------------
@st.composite
def heads(draw, full_probe: bool = False):
    K = draw(st.integers(1, 9))
    cap = draw(st.integers(1, 5))
    d = draw(st.integers(1, 20))
    n_empty = draw(st.integers(0, cap - 1))
    out_pad = draw(st.integers(0, 3))
    V = K * cap - n_empty
    always = draw(st.lists(st.integers(0, V - 1), max_size=3))
    s = make(
        K, cap, d,
        n_empty=n_empty,
        out_pad=out_pad,
        dtype=draw(st.sampled_from([torch.float32, torch.bfloat16])),
        seed=draw(st.integers(0, 2**31 - 1)),
        stage1=draw(st.sampled_from(STAGE1_MODES)),
        n_probes=K if full_probe else draw(st.integers(1, K)),
        always=always or None,
    )
    h = hidden(draw(st.integers(1, 5)), d, seed=draw(st.integers(0, 2**31 - 1)))
    return s, h


PROP = settings(max_examples=60, deadline=None)


@PROP
@given(heads())
def test_prop_tokens_in_candidates(sh):
    s, h = sh
    ids, logits = s.head.candidates(h, s.head.select_clusters(h))
    tok = s.head.greedy(h)
    smp = s.head.sample(h, temperature=1.3, top_p=0.9, generator=torch.Generator().manual_seed(0))
    for i in range(h.shape[0]):
        valid = ids[i] >= 0
        cands = ids[i][valid]
        assert tok[i].item() in cands.tolist()
        assert s.head.token_slot[smp[i]] >= 0  # a real token, never padding
        best = logits[i][valid].max()
        assert tok[i].item() == cands[logits[i][valid] == best].min().item()


@PROP
@given(heads(full_probe=True))
def test_prop_full_probe_greedy_is_dense(sh):
    s, h = sh
    dense = s.dense(h)
    assert torch.equal(s.head.greedy(h), dense.argmax(1))
    assert torch.equal(s.head(h), dense)


@PROP
@given(heads())
def test_prop_candidate_count(sh):
    s, h = sh
    head = s.head
    cl = head.select_clusters(h)
    ids, logits = head.candidates(h, cl)
    A = head.always_ids.numel()
    assert ids.shape == logits.shape == (h.shape[0], head.n_probes * head.cap + A)
    for i in range(h.shape[0]):
        real = ids[i][ids[i] >= 0]
        assert real.unique().numel() == real.numel()  # every token at most once
        in_probes = int((head.slot_token[cl[i]] >= 0).sum())
        extra = sum(1 for a in head.always_ids.tolist() if int(head.token_slot[a]) // head.cap not in cl[i].tolist())
        assert real.numel() == in_probes + extra
        assert torch.all(logits[i][ids[i] < 0] == NEG_INF)


@PROP
@given(heads())
def test_prop_no_padding_tokens(sh):
    s, h = sh
    out = s.head(h)
    assert torch.all(out[:, s.V :] == NEG_INF)
    g = torch.Generator().manual_seed(1)
    for tok in (s.head.greedy(h), s.head.sample(h, temperature=4.0, generator=g),
                s.head.sample(h, temperature=0.5, top_k=2, generator=g)):
        assert tok.min() >= 0 and tok.max() < s.V


def test_compiled_stage2_kernel_matches_the_torch_path(monkeypatch):
    """The fused gather + GEMV kernel gives the torch path's logits (float rounding aside) and the same
    greedy tokens; bf16 rows never take it."""
    from flashhead import _kernels

    if not _kernels.build():
        pytest.skip("no C++ compiler on this machine: the torch path is used (and tested everywhere else)")
    s = make(40, 16, 64, n_empty=5, integer=False, n_probes=7, always=[2, 9])
    h = hidden(9, 64, integer=False)
    clusters = s.head.select_clusters(h)
    assert _kernels.gather_gemv(s.head.rows, clusters, h) is not None
    assert _kernels.gather_gemv(s.head.rows.to(torch.bfloat16), clusters, h) is None
    ids_k, logits_k = s.head.candidates(h, clusters)
    greedy_k = s.head.greedy(h)
    monkeypatch.setattr(_kernels, "gather_gemv", lambda *a: None)
    ids_t, logits_t = s.head.candidates(h, clusters)
    assert torch.equal(ids_k, ids_t)
    assert torch.allclose(logits_k, logits_t, rtol=1e-5, atol=1e-5)
    assert torch.equal(greedy_k, s.head.greedy(h))


def test_compiled_stage2_kernel_gives_the_same_bits_on_any_number_of_threads():
    """The kernel splits the (cluster, probe) pairs over torch's intra-op threads; every logit is the same
    dot product in the same order, so 1 and 2 threads give bit-identical logits."""
    from flashhead import _kernels

    if not _kernels.build():
        pytest.skip("no C++ compiler on this machine: the torch path is used (and tested everywhere else)")
    s = make(40, 16, 64, n_empty=5, integer=False, n_probes=7, always=[2, 9])
    h = hidden(9, 64, integer=False)
    clusters = s.head.select_clusters(h)  # 63 pairs: two runs of 32 on two threads
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = _kernels.gather_gemv(s.head.rows, clusters, h)
        torch.set_num_threads(2)
        two = _kernels.gather_gemv(s.head.rows, clusters, h)
    finally:
        torch.set_num_threads(before)
    assert torch.equal(one, two)


@pytest.mark.parametrize("d", [64, 72])  # 72: a tail after the 32-wide blocks
def test_int8_stage1_kernel_gives_the_bits_of_int_mm(monkeypatch, d):
    """The compiled int8 stage-1 kernel returns torch._int_mm's scores bit for bit (exact int32 sums, the
    same two roundings), at batch 1 and 5 and on 1 or 2 threads, so it changes no probe."""
    from flashhead import _kernels

    if not _kernels.build():
        pytest.skip("no C++ compiler on this machine: the torch path is used (and tested everywhere else)")
    s = make(600, 4, d, integer=False, n_probes=7, stage1="int8")
    h = hidden(5, d, integer=False)
    before = torch.get_num_threads()
    try:
        got = {}
        for threads in (1, 2):
            torch.set_num_threads(threads)
            got[threads] = [s.head.stage1_scores(h), s.head.stage1_scores(h[:1])]
    finally:
        torch.set_num_threads(before)
    monkeypatch.setattr(_kernels, "int8_scores", lambda *a: None)
    ref = s.head.stage1_scores(h)
    for one_batch, one_row in got.values():
        assert torch.equal(one_batch, ref)
        assert torch.equal(one_row, ref[:1])


@pytest.mark.parametrize("d", [64, 33, 96])  # 33: d padded to 64; 96: groups of 32
def test_int4_stage1_kernel_scores_the_int4_centroids_with_h_in_int8(monkeypatch, d):
    """The compiled int4 stage 1 scores the int4 centroids exactly but for h taken per group in int8 against the
    centred codes: the error against ``h . centroids`` stays within the bound that rounding (amax / 254 per
    weight, times |q - 8| s) gives, whatever K (here not a multiple of 8), batch or thread count (same bits), and
    torch's int4 kernel (the fallback, bf16 h) gives nearly the same scores."""
    from flashhead import _kernels

    if not _kernels.build():
        pytest.skip("no C++ compiler on this machine: the torch path is used (and tested everywhere else)")
    s = make(203, 2, d, integer=False, n_probes=7, stage1="int4")
    head = s.head
    h = hidden(9, d, integer=False)
    d_pad, g = head._int4_dpad, head._int4_group
    exact = h @ head.centroids.t()
    step = F.pad(h, (0, d_pad - d)).view(9, -1, g).abs().amax(-1) / 254  # the largest rounding error per group
    codes, sz = head._int4_codes()
    centred = (codes.view(203, -1, g).float() - 8).abs() * sz[..., :1].float()  # |q - 8| s: what meets int8 h
    bound = (centred.sum(-1) @ step.t()).t() + 1e-5 * (h.abs() @ head.centroids.abs().t())  # + float rounding
    before = torch.get_num_threads()
    try:
        got = {}
        for threads in (1, 2):
            torch.set_num_threads(threads)
            got[threads] = [head.stage1_scores(h), torch.cat([head.stage1_scores(h[i:i + 1]) for i in range(9)])]
    finally:
        torch.set_num_threads(before)
    scores = got[1][0]
    assert torch.all((scores - exact).abs() <= bound)
    assert ((scores - exact).abs() > 1e-3).any()  # h really is rounded (this checks the check)
    for batch, rows in got.values():
        assert torch.equal(batch, scores) and torch.equal(rows, scores)
    monkeypatch.setattr(_kernels, "int4_scores", lambda *a: None)
    fallback = head.stage1_scores(h)
    assert not torch.equal(fallback, scores)
    assert torch.allclose(fallback, scores, atol=0.05 * exact.abs().max().item())


def test_top_unsorted_picks_the_p_largest_ties_to_the_smallest_ids():
    """The compiled selection returns the p largest scores' ids, of equal scores the smallest ids (-0 equals 0),
    the set a stable sort by score gives; on scores without ties, torch.topk's set."""
    from flashhead import _kernels

    if not _kernels.build():
        pytest.skip("no C++ compiler on this machine: the torch path is used (and tested everywhere else)")
    g = torch.Generator().manual_seed(5)
    coarse = torch.randint(-4, 5, (3, 500), generator=g).float() / 4  # many ties, zeros of both signs
    coarse[0, ::7] = -0.0
    coarse[1, :40] = float("-inf")
    coarse[2] = coarse[2] * 1e30  # wide exponents
    for scores in (coarse, torch.randn(4, 5000, generator=g)):
        for p in (1, 3, 57, 250, scores.shape[1] - 1):
            got = _kernels.top_unsorted(scores.contiguous(), p)
            for n in range(scores.shape[0]):
                order = sorted(range(scores.shape[1]), key=lambda k: (-scores[n, k].item(), k))
                assert sorted(got[n].tolist()) == sorted(order[:p]), (n, p)
    fine = torch.randn(2, 3000, generator=g)
    assert torch.equal(_kernels.top_unsorted(fine, 300).sort(1).values,
                       torch.topk(fine, 300, dim=1, sorted=False).indices.sort(1).values)
