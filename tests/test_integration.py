"""FlashHead inside real transformers models: exactness at p = K, batching, sampling, remove, save/load."""

import pytest
import torch
from transformers import LogitsProcessor, LogitsProcessorList

import flashhead
from flashhead.decode import generate
from flashhead.head import FlashHead
from flashhead.integrations.transformers import (apply, calibration_states, dense_logits,
                                                 flashhead_of, remove)

PROMPTS = ["The capital of France is", "It is a truth universally acknowledged, that a single man",
           "Once upon a time", "Mr. Darcy walked into the room and"]


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
    """SmolLM2's head is Q8_0 in its GGUF: the head and the tied embedding share ONE int8 storage (and its
    scales), and no float copy of the head stays (the embedding's weight parameter is gone too)."""
    model, _, head = patched
    emb = model.get_input_embeddings()
    assert head.rows.dtype == torch.int8 and head.row_scales is not None
    assert head.rows.data_ptr() == emb.rows.data_ptr() and head.row_scales.data_ptr() == emb.scales.data_ptr()
    names = dict(model.named_parameters())
    assert "lm_head.weight" not in names and not any(n.endswith("embed_tokens.weight") for n in names)


def test_q8_embedding_and_logits_equal_the_float_head(smollm2, smol_index, smol_states):
    """The int8 stage 2 against the fp32 head on real hidden states (Emma): every candidate logit within
    float rounding, the same greedy tokens as the float rows, and the tied embedding's output bit for bit."""
    model, tok = smollm2
    ids = tok(PROMPTS, return_tensors="pt", padding=True).input_ids
    h = smol_states[:256]
    with torch.no_grad():
        emb_dense = model.get_input_embeddings()(ids)
        ref = dense_logits(model, h)
    head_f = apply(model, smol_index, stage2="float")
    try:
        cl = head_f.select_clusters(h)
        ids_f, logits_f = head_f.candidates(h, cl)
        greedy_f = head_f.greedy(h)
    finally:
        remove(model)
    head = apply(model, smol_index)
    try:
        with torch.no_grad():
            assert torch.equal(model.get_input_embeddings()(ids), emb_dense)
        ids_8, logits_8 = head.candidates(h, cl)
        assert torch.equal(ids_8, ids_f) and torch.equal(head.greedy(h), greedy_f)
        fin = torch.isfinite(logits_f)
        assert torch.equal(fin, torch.isfinite(logits_8))
        # float rounding (measured ~1e-5 on logits up to ~30), not a quantization error (~1e-2)
        assert float((logits_8 - logits_f).abs()[fin].max()) < 1e-4
        assert torch.equal(dense_logits(model, h), ref)
    finally:
        remove(model)


def test_batched_equals_per_row(patched, smol_states):
    _, _, head = patched
    h = smol_states[:64]
    for stage1 in ("int8", "int4"):
        head_q = type(head)(head.rows, head.slot_token, head.centroids, out_features=head.out_features,
                            n_probes=head.n_probes, always_ids=head.always_ids, stage1=stage1,
                            row_scales=head.row_scales)
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


def test_sampling_with_all_probes_matches_dense_distribution(smollm2, smol_states):
    """Chi-square test, 20,000 draws, fixed seed, on the real head's 1,024 likeliest rows for a real state.

    (The whole 49k-row head at p = K costs a full gather per draw; the 1,024 likeliest rows carry the
    real logit distribution and keep the test fast.) Bins: the 30 likeliest tokens + the rest. Under the
    null (FlashHead samples exactly the dense softmax) the test fails with probability 1e-4.
    """
    model, _ = smollm2
    h = smol_states[100:101]
    weight = model.get_output_embeddings().weight.detach()
    top = (h @ weight.T)[0].topk(1024).indices
    rows = weight[top].view(64, 16, -1)
    head = FlashHead(rows, torch.arange(1024).view(64, 16), rows.mean(1), out_features=1024, n_probes=64)
    dense = torch.softmax(h @ rows.reshape(1024, -1).T, -1)[0].double()
    draws = head.sample(h.expand(20_000, -1).contiguous(), temperature=1.0, generator=torch.Generator().manual_seed(1234))
    bins = dense.topk(30).indices
    expected = torch.cat([dense[bins], (1 - dense[bins].sum()).unsqueeze(0)]) * draws.numel()
    counts = torch.stack([(draws == t).sum() for t in bins] + [(~torch.isin(draws, bins)).sum()]).double()
    chi2 = float(((counts - expected) ** 2 / expected).sum())
    assert chi2 < 67.6  # chi-square 0.9999 quantile at 30 degrees of freedom


def test_seeded_sampling_is_reproducible(patched):
    model, tok, _ = patched
    a = generate(model, tok, PROMPTS, max_new_tokens=12, temperature=0.9, top_p=0.95, seed=7)
    b = generate(model, tok, PROMPTS, max_new_tokens=12, temperature=0.9, top_p=0.95, seed=7)
    assert _same(a, b)


@pytest.mark.parametrize("stage1", ["int8", "int4"])
def test_quantized_stage1_ranks_best_cluster_first(patched, smol_states, stage1):
    """docs/fidelity.md claims: on real SmolLM2 hidden states (Emma) and its default index (K = 24,576),
    int8 and int4 (per group of 64) rank float's best cluster first >= 90% of the time (measured 94% and
    98%), and keep float's best cluster in their top 8 (measured: always). The bounds leave room for another
    machine's index (other near-tie centroid pairs); what the head relies on, float's best cluster among
    the probed ones, is held tighter."""
    _, _, head = patched

    def like(mode):
        return FlashHead(head.rows, head.slot_token, head.centroids, out_features=head.out_features,
                         n_probes=head.n_probes, always_ids=head.always_ids, stage1=mode, row_scales=head.row_scales)

    best = like("float").stage1_scores(smol_states).argmax(1)
    scores = like(stage1).stage1_scores(smol_states)
    agree = (scores.argmax(1) == best).float().mean().item()
    within8 = (scores.topk(8, dim=1).indices == best.unsqueeze(1)).any(1).float().mean().item()
    probed = (scores.topk(head.n_probes, dim=1).indices == best.unsqueeze(1)).any(1).float().mean().item()
    print(f"{stage1}: top-1 agreement {agree:.4f}, float's best in top 8: {within8:.4f}, probed: {probed:.4f}")
    assert agree >= 0.90
    assert within8 >= 0.995
    assert probed >= 0.999


def test_save_and_load_keep_the_assets(patched, tmp_path):
    model, tok, head = patched
    dense_free = generate(model, tok, PROMPTS[:2], max_new_tokens=10)
    model.save_pretrained(tmp_path / "m")
    tok.save_pretrained(tmp_path / "m")
    assert (tmp_path / "m" / "flashhead" / "index.safetensors").is_file()
    assert flashhead_of(model) is not None  # still patched after saving
    loaded, _ = flashhead.integrations.transformers.from_pretrained(tmp_path / "m")
    assert flashhead_of(loaded) is not None
    assert _same(dense_free, generate(loaded, tok, PROMPTS[:2], max_new_tokens=10))


def test_calibration_sets_one_per_text(smollm2):
    """The default build calibrates on two sets: all positions of the first (code, a novel and the multilingual
    calibration texts, equal parts), half as many of the second (a novel)."""
    from flashhead.data import DEFAULT_CALIBRATION_TEXTS
    from flashhead.integrations.transformers import calibration_sets

    model, tok = smollm2
    first, second = calibration_sets(model, tok, positions=300)
    assert len(DEFAULT_CALIBRATION_TEXTS) == 2
    assert first.shape == (300, model.config.hidden_size) and second.shape == (150, model.config.hidden_size)
    assert torch.equal(second, calibration_states(model, tok, flashhead.load_text(DEFAULT_CALIBRATION_TEXTS[1]), 150))
    with pytest.raises(ValueError, match="2 positions"):
        calibration_sets(model, tok, ["emma"], positions=1)
    (mixed,) = calibration_sets(model, tok, ["emma+persuasion"], positions=300)  # half the positions each
    assert torch.equal(mixed, torch.cat([calibration_states(model, tok, flashhead.load_text(t), 150)
                                         for t in ("emma", "persuasion")]))
