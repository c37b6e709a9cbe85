"""FlashHead inside real transformers models: exactness at p = K, batching, sampling, remove, save/load."""

import pytest
import torch
from transformers import LogitsProcessor, LogitsProcessorList

import flashhead
from flashhead.decode import generate
from flashhead.integrations.transformers import (apply, build_for_model, calibration_states, dense_logits,
                                                 flashhead_of, remove)

PROMPTS = ["The capital of France is", "It is a truth universally acknowledged, that a single man",
           "Once upon a time", "Mr. Darcy walked into the room and"]


@pytest.fixture(scope="module")
def smol_index(smollm2):
    model, tok = smollm2
    return build_for_model(model, tok, model_name="smollm2-135m", progress=False)


@pytest.fixture(scope="module")
def smol_states(smollm2):
    model, tok = smollm2
    return calibration_states(model, tok, flashhead.load_text("emma")[:60_000], positions=1024)


@pytest.fixture
def patched(smollm2, smol_index):
    model, tok = smollm2
    head = apply(model, smol_index)
    yield model, tok, head
    remove(model)


def _same(a, b):
    return a.token_ids == b.token_ids


@pytest.mark.parametrize("prompts", [PROMPTS[:1], PROMPTS], ids=["batch1", "batch4-padded"])
def test_all_probes_greedy_equals_dense(smollm2, smol_index, prompts):
    model, tok = smollm2
    dense = generate(model, tok, prompts, max_new_tokens=20)
    apply(model, smol_index, n_probes=smol_index.num_clusters)
    try:
        fast = generate(model, tok, prompts, max_new_tokens=20)
    finally:
        remove(model)
    assert _same(dense, fast)


def test_remove_restores_exact_dense(smollm2, smol_index):
    model, tok = smollm2
    before = model.get_output_embeddings().weight.clone()
    dense = generate(model, tok, PROMPTS, max_new_tokens=12)
    apply(model, smol_index)
    remove(model)
    after = model.get_output_embeddings()
    assert torch.equal(after.weight, before) and after.weight is model.get_input_embeddings().weight
    assert _same(dense, generate(model, tok, PROMPTS, max_new_tokens=12))


def test_head_memory_is_not_doubled(patched):
    model, _, head = patched
    emb = model.get_input_embeddings().weight
    assert head.rows.data_ptr() == emb.data_ptr()  # one storage, shared with the embedding
    assert "lm_head.weight" not in dict(model.named_parameters())


def test_batched_equals_per_row(patched, smol_states):
    _, _, head = patched
    h = smol_states[:64]
    for stage1 in ("int8", "int4"):
        head_q = type(head)(head.rows, head.slot_token, head.centroids, out_features=head.out_features,
                            n_probes=head.n_probes, always_ids=head.always_ids, stage1=stage1)
        batched = head_q.greedy(h)
        assert torch.equal(batched, torch.cat([head_q.greedy(h[i:i + 1]) for i in range(h.shape[0])]))


def test_logits_processors_see_candidates_only_and_still_apply(patched):
    model, tok, head = patched

    class Spy(LogitsProcessor):
        def __init__(self):
            self.finite = []

        def __call__(self, input_ids, scores):
            self.finite.append(int(torch.isfinite(scores).sum()))
            return scores

    spy = Spy()
    enc = tok(PROMPTS[:1], return_tensors="pt")
    free = model.generate(**enc, max_new_tokens=1, do_sample=False)
    banned = int(free[0, -1])
    out = model.generate(**enc, max_new_tokens=1, do_sample=False, suppress_tokens=[banned],
                         logits_processor=LogitsProcessorList([spy]))
    assert int(out[0, -1]) != banned
    most = head.n_probes * head.rows.shape[1] + head.always_ids.numel()
    assert spy.finite and all(0 < n <= most for n in spy.finite)


def test_sampling_with_all_probes_matches_dense_distribution(patched, smol_states):
    """Chi-square test on the 30 likeliest tokens + the rest, 20,000 draws, fixed seed.

    Under the null (FlashHead samples exactly the dense softmax) the test fails with probability
    1e-4 for a random seed; with the fixed seed the outcome is reproducible.
    """
    model, _, head = patched
    head.n_probes = head.rows.shape[0]
    h = smol_states[100:101]
    dense_probs = torch.softmax(dense_logits(model, h)[0], -1)
    g = torch.Generator().manual_seed(1234)
    draws = head.sample(h.expand(20_000, -1).contiguous(), temperature=1.0, generator=g)
    top = dense_probs.topk(30).indices
    expected = torch.cat([dense_probs[top], (1 - dense_probs[top].sum()).unsqueeze(0)]) * draws.numel()
    counts = torch.stack([(draws == t).sum() for t in top] + [(~torch.isin(draws, top)).sum()]).double()
    chi2 = float(((counts - expected.double()) ** 2 / expected.double()).sum())
    assert chi2 < 68.0  # chi-square 0.9999 quantile at 30 degrees of freedom is 67.6


def test_seeded_sampling_is_reproducible(patched):
    model, tok, _ = patched
    a = generate(model, tok, PROMPTS, max_new_tokens=12, temperature=0.9, top_p=0.95, seed=7)
    b = generate(model, tok, PROMPTS, max_new_tokens=12, temperature=0.9, top_p=0.95, seed=7)
    assert _same(a, b)


@pytest.mark.parametrize("stage1", ["int8", "int4"])
def test_quantized_stage1_ranks_best_cluster_first(patched, smol_states, stage1):
    """The docs claim int8 picks float's best cluster >= 99% of the time, int4 >= 95% (SmolLM2, Emma)."""
    _, _, head = patched
    quant = type(head)(head.rows, head.slot_token, head.centroids, out_features=head.out_features,
                       n_probes=head.n_probes, always_ids=head.always_ids, stage1=stage1)
    best = head.stage1_scores(smol_states).argmax(1)
    agree = (quant.stage1_scores(smol_states).argmax(1) == best).float().mean().item()
    assert agree >= {"int8": 0.99, "int4": 0.95}[stage1]


def test_save_and_load_keep_the_assets(patched, tmp_path):
    model, tok, head = patched
    dense_free = generate(model, tok, PROMPTS[:2], max_new_tokens=10)
    model.save_pretrained(tmp_path / "m")
    assert (tmp_path / "m" / "flashhead" / "index.safetensors").is_file()
    assert flashhead_of(model) is not None  # still patched after saving
    loaded, _ = flashhead.integrations.transformers.from_pretrained(tmp_path / "m")
    assert flashhead_of(loaded) is not None
    assert _same(dense_free, generate(loaded, tok, PROMPTS[:2], max_new_tokens=10))
