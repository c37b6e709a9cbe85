"""Stage 2 at the head's stored precision: Q8_0 rows (int8 + one fp16 scale per 32 weights).

Synthetic heads are made the way ggml quantizes (scale = fp16(amax / 127), int8 = round(w * 127 / amax)),
so their fp32 copy is exactly ``scale * int8``, as a head that transformers dequantized from a Q8_0 GGUF.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from flashhead import _kernels
from flashhead.head import FlashHead, q8_0_block_l1, q8_0_dequantize, q8_0_from_blocks, q8_0_quantize, q8_0_rows


def q8_head(V: int, d: int, seed: int = 0) -> torch.Tensor:
    """A random fp32 head [V, d] that is exactly Q8_0."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(V, d // 32, 32, generator=g) * torch.rand(V, d // 32, 1, generator=g)
    amax = w.abs().amax(-1, keepdim=True)
    k = torch.round(w * (127 / amax)) + 0.0  # int8 has no -0
    return (k * (amax / 127).half().float()).view(V, d)


def heads(W: torch.Tensor, K: int, p: int, scales: torch.dtype = torch.float16, always=(3, 5), seed: int = 0):
    """(fp32-row head, Q8_0-row head, Q8_0 head with Q8_0 activations) over the same random clusters."""
    V, d = W.shape
    cap = V // K
    slot = torch.randperm(V, generator=torch.Generator().manual_seed(seed)).view(K, cap)
    q, s = q8_0_rows(W)
    kw = dict(out_features=V, n_probes=p, always_ids=torch.tensor(always))
    cents = W[slot].mean(1)
    return (FlashHead(W[slot], slot, cents, **kw),
            FlashHead(q[slot], slot, cents, row_scales=s[slot].to(scales), **kw),
            FlashHead(q[slot], slot, cents, row_scales=s[slot].to(scales), quantize_activations=True, **kw))


def assert_close(a: torch.Tensor, b: torch.Tensor, h: torch.Tensor, W: torch.Tensor, ids: torch.Tensor | None = None):
    """Logits ``a`` and ``b`` [N, M] (token ``ids`` [N, M], -1 = none; None: all V columns) equal up to float
    rounding: within 1e-6 of sum_j |h_j w_j| (a few ulps of the largest partial sum), and -inf alike."""
    bound = h.abs() @ W.abs().t()
    if ids is not None:
        bound = bound.gather(1, ids.clamp_min(0))
    assert torch.equal(torch.isinf(a), torch.isinf(b))
    fin = torch.isfinite(a)
    assert bool(((a - b).abs()[fin] <= 1e-6 * bound[fin] + 1e-7).all()), float((a - b).abs()[fin].max())


def test_q8_0_rows_finds_exact_heads_and_refuses_others():
    W = q8_head(64, 96)
    W[5, 32:64] = 0.0  # an all-zero block
    q, s = q8_0_rows(W)
    assert q.dtype == torch.int8 and s.dtype == torch.float16 and s.shape == (64, 3)
    assert torch.equal(q8_0_dequantize(q, s).view(torch.int32), W.view(torch.int32))  # bit for bit
    assert int(q.abs().max()) == 127
    nudged = W.clone()
    nudged[7, 40] = torch.nextafter(nudged[7, 40], torch.tensor(1.0))  # one ulp off
    assert q8_0_rows(nudged) is None
    assert q8_0_rows(torch.randn(64, 96)) is None  # an ordinary float head
    assert q8_0_rows(W.bfloat16()) is None  # rounded to bf16: not scale * int8 any more
    assert q8_0_rows(W[:, :80]) is None  # d not a multiple of 32
    negzero = W.clone()
    negzero[5, 33] = -0.0  # scale * 0 is +0.0: not the same bits
    assert q8_0_rows(negzero) is None


def test_q8_0_from_blocks_reads_the_gguf_layout():
    W = q8_head(16, 64)
    q, s = q8_0_rows(W)
    raw = torch.cat([s.view(16, 2, 1).view(torch.uint8), q.view(16, 2, 32).view(torch.uint8)], -1)  # [V, nb, 34]
    q2, s2 = q8_0_from_blocks(raw.reshape(16, 68).numpy(), 64)
    assert torch.equal(q2, q) and torch.equal(s2, s)
    with pytest.raises(ValueError, match="Q8_0 blocks must be uint8"):
        q8_0_from_blocks(raw.reshape(16, 68)[:, :67], 64)
    with pytest.raises(ValueError, match="Q8_0 blocks must be uint8"):
        q8_0_from_blocks(raw.float(), 64)


@pytest.mark.parametrize("scales", [torch.float16, torch.float32])
@pytest.mark.parametrize("d", [64, 576, 640])
def test_int8_stage2_logits_equal_the_fp32_head(scales, d):
    hf, h8, _ = heads(q8_head(400, d), K=100, p=9, scales=scales)
    h = torch.randn(7, d)
    cl = hf.select_clusters(h)
    ids_f, lf = hf.candidates(h, cl)
    ids_8, l8 = h8.candidates(h, cl)
    assert torch.equal(ids_f, ids_8)
    W = q8_head(400, d)
    assert_close(l8, lf, h, W, ids_f)  # the same weights; only the summation order differs
    assert torch.equal(h8.greedy(h), hf.greedy(h))
    full = FlashHead(h8.rows, h8.slot_token, hf.centroids, out_features=400, n_probes=100, row_scales=h8.row_scales)
    dense = h @ W.t()
    assert torch.equal(full.greedy(h), dense.argmax(1))  # every cluster probed: the dense argmax
    assert_close(full(h), dense, h, W)
    per_row = 2 if scales == torch.float16 else 4
    assert h8.nbytes_per_step() < hf.nbytes_per_step()
    assert h8.nbytes_per_step() - hf.nbytes_per_step() == (9 * 4 + 2) * (d + d // 32 * per_row - 4 * d)


@pytest.mark.parametrize("kernel", [True, False], ids=["kernel", "torch"])
def test_q8_activations_match_a_reference(monkeypatch, kernel):
    """q8_0_quantize follows llama.cpp's x86 rule (scale fp16(amax/127), x * 127/amax rounded to even) and the
    block products give sum_b int32(sum_j w_j q_j) * s_w * s_h, computed here independently in numpy; the
    compiled quantizer and the torch one alike."""
    if kernel and not _kernels.build():
        pytest.skip("no C++ compiler on this machine: the torch path is used (and tested everywhere else)")
    if not kernel:
        monkeypatch.setattr(_kernels, "q8_0_quantize", lambda *a: None)
    V, d = 200, 640
    W = q8_head(V, d, seed=3)
    _, _, hq = heads(W, K=50, p=6)
    g = torch.Generator().manual_seed(4)
    h = torch.randn(5, d, generator=g) * torch.rand(5, d // 32, 1, generator=g).repeat_interleave(32, 1).view(5, d)
    h[0, :32] = 0.0  # an all-zero block: scale 0, int8 0
    x = h.numpy().reshape(5, -1, 32)
    amax = np.abs(x).max(-1, keepdims=True)
    with np.errstate(divide="ignore"):
        mult = np.where(amax > 0, np.float32(127) / amax, np.float32(0)).astype(np.float32)
    q_ref = np.rint(x * mult).astype(np.int8).reshape(5, d)
    s_ref = (amax / np.float32(127)).astype(np.float16).astype(np.float32).reshape(5, -1)
    q, s = q8_0_quantize(h)
    assert np.array_equal(q.numpy(), q_ref) and np.array_equal(s.numpy(), s_ref)
    tie, _ = q8_0_quantize(torch.tensor([[127.0, 2.5, -3.5, 0.5] + [0.0] * 28]))  # 127/amax = 1: exact ties
    assert tie[0, :4].tolist() == [127, 2, -4, 0]  # half to even

    cl = hq.select_clusters(h)
    ids, logits = hq.candidates(h, cl)
    wq, ws = q8_0_rows(W)
    for n in range(5):
        for j in range(ids.shape[1]):
            t = int(ids[n, j])
            if t < 0:
                continue
            isum = (wq[t].numpy().astype(np.int64).reshape(-1, 32) * q_ref[n].astype(np.int64).reshape(-1, 32)).sum(1)
            ref = float(np.sum(isum * (ws[t].numpy().astype(np.float64) * s_ref[n].astype(np.float64))))
            assert abs(float(logits[n, j]) - ref) <= 1e-5 * max(1.0, abs(ref))


@pytest.mark.parametrize("quantize", [False, True], ids=["fp32-h", "q8-h"])
def test_q8_kernel_matches_the_torch_path(monkeypatch, quantize):
    if not _kernels.build():
        pytest.skip("no C++ compiler on this machine: the torch path is used (and tested everywhere else)")
    for d, scales in ((576, torch.float16), (640, torch.float32), (96, torch.float16)):
        W = q8_head(300, d, seed=d)
        _, h8, hq = heads(W, K=75, p=11, scales=scales)
        head = hq if quantize else h8
        h = torch.randn(6, d)
        cl = head.select_clusters(h)
        args = (head.rows, head.row_scales, cl)
        fused = (_kernels.q8q8_gather_gemv(*args, *q8_0_quantize(h)) if quantize
                 else _kernels.q8_gather_gemv(*args, h))
        assert fused is not None
        ids_k, logits_k = head.candidates(h, cl)
        with monkeypatch.context() as m:
            m.setattr(_kernels, "q8_gather_gemv", lambda *a: None)
            m.setattr(_kernels, "q8q8_gather_gemv", lambda *a: None)
            ids_t, logits_t = head.candidates(h, cl)
        assert torch.equal(ids_k, ids_t)
        assert_close(logits_k, logits_t, h, W, ids_k)


@pytest.mark.parametrize("quantize", [False, True], ids=["fp32-h", "q8-h"])
def test_q8_greedy_kernel_gives_the_torch_paths_tokens_and_tie_rule(monkeypatch, quantize):
    """The compiled greedy (stage 2, always-scored ids and argmax in one call) picks the torch path's tokens,
    an always-scored id that is the argmax included, and resolves an exact tie to the smallest id."""
    if not _kernels.build():
        pytest.skip("no C++ compiler on this machine: the torch path is used (and tested everywhere else)")
    W = q8_head(300, 640, seed=7)
    W[250] = W[40]  # two tokens with the same row: exact ties whenever one of them wins
    heads_ = heads(W, K=75, p=11, always=(3, 5, 40))
    head = heads_[2] if quantize else heads_[1]
    g = torch.Generator().manual_seed(8)
    h = torch.cat([torch.randn(6, 640, generator=g), W[[40, 3, 250]] * 50])  # rows 6..8: 40 (= 250) and 3 win
    assert _kernels.q8_greedy(head.rows, head.row_scales, head.slot_token, head.select_clusters(h), h,
                              head._always_slot, quantize, head._block_l1) is not None
    ids, logits = head.candidates(h[8:], head.select_clusters(h[8:]))
    assert float(logits[ids == 250]) == float(logits[ids == 40]) == float(logits.max())  # the tie is really met
    fused = head.greedy(h)
    monkeypatch.setattr(_kernels, "q8_greedy", lambda *a: None)
    ref = head.greedy(h)
    assert torch.equal(fused, ref)
    assert fused[6:].tolist() == [40, 3, 40]


def test_q8_greedy_with_fp32_h_rescores_what_q8_activations_would_get_wrong(monkeypatch):
    """The compiled fp32-h greedy scores in Q8_0 first and rescores only the slots that can still win: on
    near ties, where the Q8_0 activations' argmax differs from the fp32 one, it still gives the fp32 argmax."""
    if not _kernels.build():
        pytest.skip("no C++ compiler on this machine: the torch path is used (and tested everywhere else)")
    W = q8_head(512, 256, seed=3)
    W[300:400] = W[200:300]
    W[300:400, :32] = q8_head(100, 32, seed=4)  # 100 pairs of rows (200 + i, 300 + i) that differ in block 0
    _, head, quantized = heads(W, K=32, p=32)
    g = torch.Generator().manual_seed(5)
    h = W[200:300] * 40 + torch.randn(100, 256, generator=g)  # each pair on top
    diff = W[200:300, :32] - W[300:400, :32]
    tie = 1e-3 * (torch.rand(100, generator=g) - 0.5)  # pair i's logits apart by tie[i] only
    h[:, :32] -= ((diff * h[:, :32]).sum(1) - tie)[:, None] * diff / (diff * diff).sum(1, keepdim=True)
    fused, flipped = head.greedy(h), quantized.greedy(h)
    monkeypatch.setattr(_kernels, "q8_greedy", lambda *a: None)
    exact = head.greedy(h)  # every slot scored with the fp32 h, torch's argmax
    assert int((flipped != exact).sum()) >= 3  # Q8_0 activations really flip some of the pairs
    assert torch.equal(fused, exact)


def test_q8_0_block_l1_is_the_largest_block_sum_of_abs_weights():
    q, s = q8_0_rows(q8_head(100, 96, seed=2))
    want = (q8_0_dequantize(q, s).abs().view(100, 3, 32).double().sum(-1)).amax(0)
    assert torch.equal(q8_0_block_l1(q, s, chunk=7).double(), want)


@pytest.mark.parametrize("quantize", [False, True], ids=["fp32-h", "q8-h"])
def test_q8_stage2_is_batch_and_thread_invariant(quantize):
    _, h8, hq = heads(q8_head(512, 640, seed=1), K=64, p=13)
    head = hq if quantize else h8
    h = torch.randn(9, 640)
    cl = head.select_clusters(h)
    batched = head.candidates(h, cl)[1]  # stage 2, always-scored ids included
    rows = torch.cat([head.candidates(h[i:i + 1], cl[i:i + 1])[1] for i in range(9)])
    assert torch.equal(batched, rows)
    before = torch.get_num_threads()
    try:
        out = []
        for threads in (1, 2):
            torch.set_num_threads(threads)
            out.append(head.candidates(h, cl)[1])
    finally:
        torch.set_num_threads(before)
    assert torch.equal(out[0], out[1])


def test_q8_head_samples_and_casts():
    hf, h8, hq = heads(q8_head(256, 64), K=64, p=8)
    h = torch.randn(4, 64)
    g = torch.Generator().manual_seed(0)
    for head in (h8, hq):
        tok = head.sample(h, temperature=0.8, top_p=0.9, generator=g)
        assert tok.shape == (4,) and int(tok.min()) >= 0 and int(tok.max()) < 256
        head.temperature = 1.0
        assert head(h).shape == (4, 256)
        head.temperature = None
    scales = h8.row_scales.clone()
    h8.to(torch.bfloat16)  # a model cast must not round the scales
    assert h8.row_scales.dtype == torch.float16 and torch.equal(h8.row_scales, scales)


def test_q8_constructor_validation():
    hf, h8, _ = heads(q8_head(256, 64), K=64, p=8)
    args = (h8.slot_token, hf.centroids)
    kw = dict(out_features=256, n_probes=4)
    with pytest.raises(ValueError, match="int8 rows need row_scales"):
        FlashHead(h8.rows, *args, **kw)
    with pytest.raises(ValueError, match=r"row_scales must have shape \[K, cap, d // 32\]"):
        FlashHead(h8.rows, *args, row_scales=h8.row_scales[:, :, :1], **kw)
    with pytest.raises(ValueError, match="rows must be int8 Q8_0 rows"):
        FlashHead(hf.rows, *args, row_scales=h8.row_scales, **kw)
    with pytest.raises(ValueError, match="row_scales must be float16 or float32"):
        FlashHead(h8.rows, *args, row_scales=h8.row_scales.bfloat16(), **kw)
    with pytest.raises(ValueError, match="quantize_activations needs Q8_0 rows"):
        FlashHead(hf.rows, *args, quantize_activations=True, **kw)


def _tiny_q8_model(tied: bool, dtype: torch.dtype = torch.float32, embed_scale: float | None = None):
    """A 1-layer Llama whose head (tied or not) is exactly Q8_0, as a model converted from a Q8_0 GGUF; with
    ``embed_scale`` its input embedding multiplies by it (like Gemma's scaled word embedding)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=512, hidden_size=64, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                      num_key_value_heads=2, tie_word_embeddings=tied, pad_token_id=0)
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        model.get_output_embeddings().weight.copy_(q8_head(512, 64, seed=7) * 8)
        if embed_scale is not None:
            emb = model.get_input_embeddings()
            emb.embed_scale = torch.tensor(embed_scale)
            emb.forward = lambda ids, e=emb: torch.nn.functional.embedding(ids, e.weight) * e.embed_scale.to(e.weight.dtype)
    return model.to(dtype)


@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
def test_apply_keeps_only_the_int8_rows_and_remove_restores_the_head(tied):
    from flashhead.index import build_index
    from flashhead.integrations.transformers import apply, decoding, dense_logits, remove
    from flashhead.models import head_weight

    model = _tiny_q8_model(tied, embed_scale=8.0 if tied else None)
    weight = head_weight(model)
    before = weight.detach().clone()
    index = build_index(weight, 4, progress=False)
    assert index.config.stage2 == "q8_0"
    ids = torch.tensor([[5, 17, 300, 41, 9]])
    with torch.inference_mode():
        hidden = model.model(input_ids=ids).last_hidden_state
        dense = dense_logits(model, hidden)
        emb_ref = model.get_input_embeddings()(ids)
        scores = model(input_ids=ids).logits
        head = apply(model, index, n_probes=index.num_clusters)
        assert head.rows.dtype == torch.int8 and head.row_scales.dtype == torch.float16
        names = [n for n, _ in model.named_parameters()]
        assert not any(n.startswith("lm_head") for n in names)
        assert any(n.endswith("embed_tokens.weight") for n in names) != tied  # tied: the int8 rows serve it
        assert torch.equal(model.get_input_embeddings()(ids), emb_ref)
        assert torch.equal(model(input_ids=ids).logits, scores)  # scoring forwards stay exact
        with decoding(model):
            fast = model(input_ids=ids).logits.float()
        assert torch.equal(fast.argmax(-1), dense.argmax(-1))
        assert torch.allclose(fast, dense, rtol=0, atol=1e-4)
        assert torch.equal(dense_logits(model, hidden), dense)
        remove(model)
    assert torch.equal(head_weight(model).view(torch.int32), before.view(torch.int32))
    assert (model.get_input_embeddings().weight is head_weight(model)) == tied


def test_apply_falls_back_to_float_rows_when_the_copy_is_not_q8():
    """A bf16 copy of a Q8_0 head is not scale * int8 any more: its float rows serve; asking for Q8_0 is refused."""
    from flashhead.index import build_index
    from flashhead.integrations.transformers import apply, remove
    from flashhead.models import head_weight

    model = _tiny_q8_model(tied=True)
    index = build_index(head_weight(model), 4, progress=False)
    model.to(torch.bfloat16)
    head = apply(model, index)
    assert head.rows.dtype == torch.bfloat16 and head.row_scales is None
    remove(model)
    with pytest.raises(ValueError, match="needs a head that is exactly Q8_0"):
        apply(model, index, stage2="q8_0")
    assert getattr(model, "_flashhead", None) is None
