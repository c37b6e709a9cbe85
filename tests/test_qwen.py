"""FlashHead on Qwen2.5-Coder-0.5B-Instruct, the built-in model whose head is NOT tied to its embedding."""

from __future__ import annotations

import gc
import hashlib
import json
import weakref

import pytest
import torch

from flashhead.cli import main
from flashhead.data import load_text
from flashhead.evaluate import EvalConfig, evaluate
from flashhead.head import FlashHead
from flashhead.integrations.transformers import apply, dense_logits, from_pretrained, remove, save_pretrained
from flashhead.models import head_weight

PROMPT = "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n"


def _sha(t: torch.Tensor) -> str:
    return hashlib.sha256(memoryview(t.detach().contiguous().numpy()).cast("B")).hexdigest()


def _greedy(model, tok, n: int = 8) -> list[int]:
    ids = tok(PROMPT, return_tensors="pt")
    with torch.inference_mode():
        out = model.generate(**ids, max_new_tokens=n, do_sample=False, temperature=None, top_p=None, top_k=None)
    return out[0, ids.input_ids.shape[1]:].tolist()


def test_qwen_head_is_untied_and_knows_code(qwen):
    model, tok = qwen
    emb, head = model.get_input_embeddings().weight, head_weight(model)
    assert head.shape == emb.shape == (151_936, 896)
    assert head.data_ptr() != emb.data_ptr() and not torch.equal(head[:1000], emb[:1000])
    assert model.config.tie_word_embeddings is False
    assert tok.chat_template and tok.eos_token == "<|im_end|>"
    ids = tok("import numpy as", return_tensors="pt").input_ids
    with torch.inference_mode():
        top = model(ids).logits[0, -1].topk(3).indices
    assert " np" in [tok.decode(int(i)) for i in top]


def test_apply_replaces_only_the_head_and_remove_restores_it_bit_for_bit(qwen, qwen_index):
    model, tok = qwen
    emb = model.get_input_embeddings()
    emb_weight, emb_ptr, emb_sha = emb.weight, emb.weight.data_ptr(), _sha(emb.weight)
    head_sha = _sha(head_weight(model))
    dense = _greedy(model, tok)
    original = weakref.ref(head_weight(model))
    params_before = sum(p.numel() for p in model.parameters())
    head = apply(model, qwen_index)
    try:
        gc.collect()
        assert original() is None  # the dense head's tensor is gone: FlashHead's storage is the only copy
        assert isinstance(model.lm_head, FlashHead)
        assert emb.weight is emb_weight and emb.weight.data_ptr() == emb_ptr and _sha(emb.weight) == emb_sha
        assert not emb._forward_pre_hooks  # untied: token ids reach the embedding unchanged
        # the head's rows now live once, in FlashHead's cluster-ordered storage (plus a few zero slots)
        rows = model._flashhead["storage"]
        assert rows.shape[0] - 151_936 < qwen_index.cluster_size
        assert qwen_index.config.stage2 == "q8_0" and rows.dtype == torch.int8  # GGUF's Q8_0 head: int8 rows only
        assert sum(p.numel() for p in model.parameters()) == params_before - 151_936 * 896
        assert head.n_probes == qwen_index.config.n_probes
        # every cluster probed: exactly the dense head, so greedy decoding is identical
        head.n_probes = qwen_index.num_clusters
        assert _greedy(model, tok) == dense
    finally:
        remove(model)
    assert type(model.lm_head) is torch.nn.Linear and _sha(head_weight(model)) == head_sha
    assert model.get_input_embeddings().weight is emb_weight and _sha(emb_weight) == emb_sha


def test_dense_logits_need_no_second_copy(qwen, qwen_index):
    model, tok = qwen
    h = torch.randn(3, 896)
    ref = dense_logits(model, h)
    apply(model, qwen_index)
    try:
        assert torch.equal(dense_logits(model, h), ref)
    finally:
        remove(model)


def test_sampled_generation_at_batch_4(qwen, qwen_index):
    model, tok = qwen
    tok.padding_side = "left"
    batch = tok([PROMPT, "import os\n", "class Stack:\n", "# sort a list\n"], return_tensors="pt", padding=True)
    apply(model, qwen_index)
    try:
        torch.manual_seed(0)
        with torch.inference_mode():
            out = model.generate(**batch, max_new_tokens=8, do_sample=True, temperature=0.8, top_p=None, top_k=None)
    finally:
        remove(model)
    new = out[:, batch.input_ids.shape[1]:]
    assert new.shape == (4, 8) and int(new.max()) < len(tok)  # only real tokens are drawn, never padding rows


def test_save_and_load_keep_the_untied_head(qwen, qwen_index, tmp_path):
    model, tok = qwen
    head_sha, emb_sha = _sha(head_weight(model)), _sha(model.get_input_embeddings().weight)
    dense = _greedy(model, tok)
    apply(model, qwen_index)
    try:
        save_pretrained(model, tmp_path / "saved")
        assert isinstance(model.lm_head, FlashHead)  # still applied after saving
    finally:
        remove(model)
    tok.save_pretrained(tmp_path / "saved")
    assert json.loads((tmp_path / "saved" / "config.json").read_text())["tie_word_embeddings"] is False
    loaded, ltok = from_pretrained(tmp_path / "saved")
    try:
        assert isinstance(loaded.lm_head, FlashHead)
        assert _sha(loaded.get_input_embeddings().weight) == emb_sha
        loaded.lm_head.n_probes = qwen_index.num_clusters
        assert _greedy(loaded, ltok) == dense
        remove(loaded)
        assert _sha(head_weight(loaded)) == head_sha
    finally:
        del loaded
        gc.collect()
    assert main(["export-vllm", str(tmp_path / "saved")]) == 0  # the saved FlashHead assets, in vLLM's format


def test_eval_on_held_out_code_runs_on_the_untied_head(qwen, qwen_index):
    model, tok = qwen
    small = EvalConfig(positions=256, prompts=2, prompt_tokens=16, new_tokens=4, tv_positions=8)
    report = evaluate(model, tok, qwen_index, load_text("code-heldout"), [qwen_index.config.n_probes],
                      config=small, progress=False)
    row = report["settings"][0]
    assert row["bytes_fraction"] <= 0.10 and row["agreement"] <= row["containment"] + 1e-9
    assert isinstance(model.lm_head, torch.nn.Linear)  # evaluate leaves the model as it found it
