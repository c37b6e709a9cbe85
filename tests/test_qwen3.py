"""Qwen3 architecture coverage: a small randomly initialised Qwen3ForCausalLM with the real Qwen3 tokenizer.

No Qwen3 weights install here, so these tests check mechanics only (build, apply, generate, remove,
save, load), never fidelity: random weights say nothing about how well FlashHead approximates a
trained head. Both head layouts Qwen3 ships are covered: tied (the small Qwen3 models) and untied.
"""

from __future__ import annotations

import hashlib

import pytest
import torch

from flashhead.data import qwen3_tokenizer_dir
from flashhead.head import FlashHead
from flashhead.integrations.transformers import apply, build_for_model, from_pretrained, remove, save_pretrained
from flashhead.models import head_weight

PROMPTS = ["def add(a, b):", "The capital of France is", "import numpy as np\n", "Once upon a time"]


def _sha(t: torch.Tensor) -> str:
    return hashlib.sha256(memoryview(t.detach().contiguous().numpy()).cast("B")).hexdigest()


@pytest.fixture(scope="module")
def qwen3_tokenizer():
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(qwen3_tokenizer_dir(verbose=False))
    tok.padding_side = "left"
    return tok


@pytest.fixture(scope="module", params=[True, False], ids=["tied", "untied"])
def qwen3(request, qwen3_tokenizer):
    """(model, tokenizer, index): 2 layers, hidden 64, Qwen3's real vocabulary size 151,936, random weights."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    tok = qwen3_tokenizer
    config = Qwen3Config(vocab_size=151_936, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=512,
                         tie_word_embeddings=request.param, bos_token_id=tok.pad_token_id,
                         eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    model = Qwen3ForCausalLM(config).eval()
    model.generation_config.pad_token_id = tok.pad_token_id
    index = build_for_model(model, tok, calibration_texts=["prideprejudice"], calibration_positions=512, iters=3,
                            model_name=f"qwen3-random-{request.param}", progress=False)
    return model, tok, index


def _generate(model, tok, prompts: list[str], **kwargs) -> torch.Tensor:
    batch = tok(prompts, return_tensors="pt", padding=True)
    with torch.inference_mode():
        out = model.generate(**batch, max_new_tokens=6, top_p=None, top_k=None, **kwargs)
    return out[:, batch.input_ids.shape[1]:]


def test_build_covers_the_tokenizer_not_the_padding_rows(qwen3):
    model, tok, index = qwen3
    assert len(tok) == 151_669 and index.config.vocab_size == 151_936
    assert index.config.num_tokens == 151_669 and index.cluster_size == 16
    placed = index.slot_token[index.slot_token >= 0]
    assert placed.numel() == 151_669 and torch.unique(placed).numel() == 151_669
    assert tok.eos_token_id in index.config.always_ids


@pytest.mark.parametrize("batch", [1, 4])
def test_greedy_generate_matches_dense_when_every_cluster_is_probed(qwen3, batch):
    model, tok, index = qwen3
    dense = _generate(model, tok, PROMPTS[:batch], do_sample=False, temperature=None)
    head = apply(model, index)
    try:
        fast = _generate(model, tok, PROMPTS[:batch], do_sample=False, temperature=None)  # the default setting
        assert fast.shape == (batch, 6) and int(fast.max()) < len(tok)
        head.n_probes = index.num_clusters
        assert torch.equal(_generate(model, tok, PROMPTS[:batch], do_sample=False, temperature=None), dense)
    finally:
        remove(model)


@pytest.mark.parametrize("batch", [1, 4])
def test_sampled_generate(qwen3, batch):
    model, tok, index = qwen3
    head = apply(model, index)
    try:
        torch.manual_seed(1)
        first = _generate(model, tok, PROMPTS[:batch], do_sample=True, temperature=1.0)
        torch.manual_seed(1)
        again = _generate(model, tok, PROMPTS[:batch], do_sample=True, temperature=1.0)
        assert head.temperature is None  # reset after the call
    finally:
        remove(model)
    assert first.shape == (batch, 6) and int(first.max()) < len(tok)  # padding rows are never drawn
    assert torch.equal(first, again)  # same seed, same draws


def test_apply_remove_save_load(qwen3, tmp_path):
    model, tok, index = qwen3
    tied = model.config.tie_word_embeddings
    emb = model.get_input_embeddings().weight
    head_sha, emb_sha = _sha(head_weight(model)), _sha(emb)
    assert (head_weight(model).data_ptr() == emb.data_ptr()) == tied
    apply(model, index)
    try:
        assert isinstance(model.lm_head, FlashHead)
        if not tied:  # untied: the embedding is not touched at all
            assert model.get_input_embeddings().weight is emb and _sha(emb) == emb_sha
        save_pretrained(model, tmp_path / "m")
        tok.save_pretrained(tmp_path / "m")
    finally:
        remove(model)
    assert _sha(head_weight(model)) == head_sha and _sha(model.get_input_embeddings().weight) == emb_sha
    dense = _generate(model, tok, PROMPTS, do_sample=False, temperature=None)
    loaded, ltok = from_pretrained(tmp_path / "m")
    assert type(loaded).__name__ == "Qwen3ForCausalLM" and isinstance(loaded.lm_head, FlashHead)
    assert loaded.config.tie_word_embeddings == tied
    loaded.lm_head.n_probes = index.num_clusters
    ltok.padding_side = "left"
    assert torch.equal(_generate(loaded, ltok, PROMPTS, do_sample=False, temperature=None), dense)
    remove(loaded)
    assert _sha(head_weight(loaded)) == head_sha
