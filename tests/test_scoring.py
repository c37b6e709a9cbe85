"""Scoring stays exact after apply(): a forward that scores text gets the dense head's logits bit for bit, while
generate() (and decoding()) keep FlashHead. Real models: SmolLM2 (tied, Q8_0 rows and float rows) and Qwen2.5-Coder
(untied, with embedding padding rows past the tokenizer's ids)."""

import pytest
import torch
import torch.nn.functional as F

import flashhead
from flashhead.integrations.transformers import apply, decoding, remove


def _text_ids(tok, n_tokens: int = 96) -> torch.Tensor:
    """Two windows of real text (Emma), ``n_tokens`` each."""
    ids = tok(flashhead.load_text("emma")[20_000:40_000], add_special_tokens=False).input_ids
    return torch.tensor([ids[:n_tokens], ids[n_tokens:2 * n_tokens]])


def _nll(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten(), reduction="none")


def _scores(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.inference_mode():
        return model(input_ids=ids).logits


@pytest.mark.parametrize("stage2", [None, "float"], ids=["index-default-rows", "float-rows"])
def test_scoring_equals_dense_bit_for_bit_tied(smollm2, smol_index, stage2):
    model, tok = smollm2
    ids = _text_ids(tok)
    dense = _scores(model, ids)
    head = apply(model, smol_index, stage2=stage2)
    try:
        assert (head.row_scales is not None) == (stage2 is None and smol_index.config.stage2 == "q8_0")
        after = _scores(model, ids)
        assert torch.equal(after, dense) and torch.equal(_nll(after, ids), _nll(dense, ids))
        with decoding(model):  # FlashHead: -inf outside its candidates, so not the dense scores
            fast = _scores(model, ids)
        assert bool(torch.isinf(fast).any()) and not torch.equal(fast, dense)
        assert torch.equal(_scores(model, ids), dense)  # the context restores exact scoring
    finally:
        remove(model)


def test_scoring_equals_dense_bit_for_bit_untied(qwen, qwen_index):
    model, tok = qwen
    ids = _text_ids(tok, 48)
    dense = _scores(model, ids)
    apply(model, qwen_index)
    try:
        after = _scores(model, ids)
        assert torch.equal(after, dense) and torch.equal(_nll(after, ids), _nll(dense, ids))
    finally:
        remove(model)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
def test_scoring_covers_padding_rows_past_the_tokenizer(tied, dtype):
    """Rows past the tokenizer's ids own no slot and are never candidates, yet their logits are part of the dense
    softmax: scoring includes them (a small model with 8 padding rows and 3 empty slots)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from flashhead.index import build_index
    from flashhead.models import head_weight

    cfg = LlamaConfig(vocab_size=461, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                      num_key_value_heads=2, tie_word_embeddings=tied)
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg).eval().to(dtype)
    ids = torch.randint(0, 453, (2, 24))
    dense = _scores(model, ids)
    head = apply(model, build_index(head_weight(model), 16, num_tokens=453, progress=False))
    try:
        assert head.padding_rows.shape[0] == 8 and bool((head.slot_token < 0).any())
        assert torch.equal(_scores(model, ids), dense)
        with decoding(model):
            assert bool(torch.isinf(_scores(model, ids)[..., 453:]).all())
    finally:
        remove(model)


def test_generate_keeps_flashhead_and_its_tokens(smollm2, smol_index):
    """Every head call of greedy generate() is FlashHead's (not exact, -inf outside the candidates), one per new
    token, and each new token is FlashHead's greedy pick of the hidden state the head saw."""
    model, tok = smollm2
    head = apply(model, smol_index)
    calls = []
    hook = head.register_forward_hook(lambda m, args, out: calls.append((m.exact, args[0].detach().clone(), out)))
    try:
        enc = tok(["It is a truth universally acknowledged, that"], return_tensors="pt")
        with torch.inference_mode():
            out = model.generate(**enc, max_new_tokens=12, do_sample=False, pad_token_id=tok.eos_token_id)
        new = out[0, enc.input_ids.shape[1]:]
        assert len(calls) == len(new) == 12
        budget = head.n_probes * head.cap + head.always_ids.numel()
        for (exact, h, logits), token in zip(calls, new):
            assert not exact and int(torch.isfinite(logits).sum()) <= budget
            assert int(head.greedy(h.reshape(-1, head.d))[-1]) == int(token)
        assert head.exact  # back to exact scoring after generate()
    finally:
        hook.remove()
        remove(model)


def test_dense_logits_in_chunks_is_the_same_bits(smollm2, smol_index):
    """The chunk size that bounds the transient copy of rows does not change a bit."""
    model, tok = smollm2
    head = apply(model, smol_index)
    try:
        with torch.inference_mode():
            h = model.model(input_ids=_text_ids(tok, 32)).last_hidden_state
            a, b, c = head.dense_logits(h, chunk=1000), head.dense_logits(h, chunk=50_000), head.dense_logits(h)
            assert torch.equal(a, c) and torch.equal(b, c)
    finally:
        remove(model)


def test_exact_needs_every_row():
    """A head without rows for its unslotted ids cannot score exactly: a clear error, not wrong numbers."""
    from flashhead.head import FlashHead

    rows = torch.randn(4, 2, 8)
    slot_token = torch.arange(8).view(4, 2)
    head = FlashHead(rows, slot_token, rows.mean(1), out_features=10, n_probes=2)
    with pytest.raises(ValueError, match="2 ids own no slot"):
        head.exact = True
    with pytest.raises(ValueError, match="not the last 1 ids"):
        FlashHead(rows, slot_token, rows.mean(1), out_features=10, n_probes=2, padding_rows=torch.randn(1, 8))
    padded = FlashHead(rows, slot_token, rows.mean(1), out_features=10, n_probes=2, padding_rows=torch.randn(2, 8))
    padded.exact = True
    h = torch.randn(3, 8)
    weight = torch.cat([rows.view(8, 8), padded.padding_rows])
    assert torch.equal(padded(h), F.linear(h, weight))
