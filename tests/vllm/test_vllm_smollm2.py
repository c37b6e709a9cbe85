"""SmolLM2-135M served by stock vLLM with flashhead's plugin: one engine for the whole module.

The transformers integration on the same folder is the reference; it runs first (one model in memory
at a time) and leaves only tokens and a few logits behind.
"""

from __future__ import annotations

import gc

import pytest
import torch
from vllm_helpers import engine, far_outside, grammar_words_outside, greedy_reference, head_facts, real_prompts, reference_model

pytestmark = pytest.mark.slow
NEW_TOKENS = 32
#: prompts with a flat next-token distribution; the sampling tests take the one whose exact tail mass (outside
#: FlashHead's candidates, on the index in hand) is largest, so their premise is measured, not hoped for
SAMPLE_PROMPTS = ("Here is a list of random English words: apple, river, window,",
                  "Random words, one after another: lantern, copper, meadow, violin,",
                  "She opened the old box and found")
SAMPLES = 3000
TEMPERATURE = 1.0


@pytest.fixture(scope="module")
def ref(smollm2_folder):
    """What the transformers integration does on the folder: greedy tokens of the real prompts; for
    the sample prompt's next token the candidates, the dense logits, SAMPLES draws of FlashHead's sampler and the
    tokens FlashHead cannot score there; and two grammar words whose first tokens it cannot score after the
    first real prompt (checked on this index, whichever clusters this machine's build produced)."""
    from flashhead.integrations.transformers import dense_logits, flashhead_of

    torch.set_num_threads(1)
    model, tok = reference_model(smollm2_folder)
    out = {"greedy": greedy_reference(model, tok, real_prompts(), NEW_TOKENS),
           "greedy64": greedy_reference(model, tok, real_prompts(64, words=20), 8)}
    from flashhead.evaluate import sampling_distribution

    head = flashhead_of(model)
    with torch.inference_mode():
        tails = []
        for prompt in SAMPLE_PROMPTS:
            ids = tok(prompt, return_tensors="pt").input_ids
            h = model.base_model(input_ids=ids).last_hidden_state[:, -1]
            cand, _ = head.candidates(h, head.select_clusters(h))
            q = sampling_distribution(head, h, dense_logits(model, h), TEMPERATURE)[0]
            inside = torch.zeros_like(q, dtype=torch.bool)
            inside[cand[cand >= 0]] = True
            tails.append((float(q[~inside].sum()), prompt))
        tail, out["sample_prompt"] = max(tails)
        assert SAMPLES * tail >= 40, f"no prompt puts a measurable mass outside the candidates: {tails}"
        ids = tok(out["sample_prompt"], return_tensors="pt").input_ids
        h = model.base_model(input_ids=ids).last_hidden_state[:, -1]
        cand, _ = head.candidates(h, head.select_clusters(h))
        out["candidates"] = set(cand[cand >= 0].tolist())
        out["dense"] = dense_logits(model, h)[0]
        gen = torch.Generator().manual_seed(0)
        out["samples"] = head.sample(h.expand(SAMPLES, -1), temperature=TEMPERATURE, generator=gen).tolist()
        out["outside"] = far_outside(head, h)
        ids = tok(real_prompts()[0], return_tensors="pt").input_ids
        h0 = model.base_model(input_ids=ids).last_hidden_state[:, -1]
        out["grammar_words"] = grammar_words_outside(tok, far_outside(head, h0))
    del model, head
    gc.collect()
    return out


@pytest.fixture(scope="module")
def llm(smollm2_folder, ref):
    with engine(smollm2_folder) as llm:
        yield llm


def _tokens(outputs) -> list[list[int]]:
    return [list(o.outputs[0].token_ids) for o in outputs]


def test_the_plugin_serves_the_folder(llm, smollm2_folder):
    import json

    [facts] = llm.apply_model(head_facts)
    block = json.loads((smollm2_folder / "config.json").read_text())["flashhead"]
    assert facts["arch"] == "FlashHeadLlamaForCausalLM" and facts["vocab"] == 49152
    assert (facts["K"], facts["cap"], facts["n_probes"], facts["stage1"]) == (24576, 2, block["n_probes"], "int4")
    # the GGUF's Q8_0 head read as int8 rows; the dense rows read the model's own tensor (TP=1)
    assert facts["stage2"] == "q8_0" and facts["dense_copy"] and facts["one_hot_greedy"]


def test_only_plain_greedy_requests_get_a_one_hot_row():
    """Penalties change which candidate wins, so a penalised greedy request keeps its candidates' logits."""
    from flashhead.integrations.vllm.requests import row_spec
    from vllm import SamplingParams

    assert row_spec(SamplingParams(temperature=0.0)) is None  # plain: one-hot at FlashHead's argmax
    for penalty in ({"repetition_penalty": 1.3}, {"presence_penalty": 0.5}, {"frequency_penalty": 0.5}):
        spec = row_spec(SamplingParams(temperature=0.0, **penalty))
        assert spec is not None and spec.temperature is None and not spec.dense


def test_greedy_tokens_equal_the_transformers_integration(llm, ref):
    from vllm import SamplingParams

    out = llm.generate(real_prompts(), SamplingParams(max_tokens=NEW_TOKENS, temperature=0.0), use_tqdm=False)
    assert _tokens(out) == ref["greedy"]


def test_64_greedy_requests_batched_together_give_the_transformers_tokens(llm, ref):
    """64 requests in one call: vLLM's continuous batching runs them as one batch of up to 64 rows."""
    from vllm import SamplingParams

    out = llm.generate(real_prompts(64, words=20), SamplingParams(max_tokens=8, temperature=0.0), use_tqdm=False)
    assert _tokens(out) == ref["greedy64"]


def _chi2_pvalue(a: list[int], b: list[int], bins: list) -> float:
    """Two-sample chi-square test of homogeneity over ``bins`` (lists of token ids, plus 'the rest')."""
    table = torch.zeros(2, len(bins) + 1, dtype=torch.float64)
    for row, draws in enumerate((a, b)):
        where = {t: i for i, ids in enumerate(bins) for t in ids}
        for t in draws:
            table[row, where.get(t, len(bins))] += 1
    table = table[:, table.sum(0) > 0]
    expected = table.sum(1, keepdim=True) * table.sum(0, keepdim=True) / table.sum()
    stat = ((table - expected) ** 2 / expected).sum()
    df = table.shape[1] - 1
    return float(torch.special.gammaincc(torch.tensor(df / 2, dtype=torch.float64), stat / 2))


def test_sampled_tokens_follow_the_transformers_integrations_distribution(llm, ref):
    """vLLM's sampler on the plugin's logits draws from FlashHead's sampling distribution: the candidates'
    exact softmax plus the tail cluster carrying the unprobed clusters' mass (so tokens outside the
    candidates are drawn, as often as the transformers integration draws them)."""
    from vllm import SamplingParams

    out = llm.generate([ref["sample_prompt"]] * SAMPLES, SamplingParams(max_tokens=1, temperature=TEMPERATURE),
                       use_tqdm=False)
    got = [o.outputs[0].token_ids[0] for o in out]
    want = ref["samples"]
    cand = ref["candidates"]
    tail_got, tail_want = (sum(t not in cand for t in x) for x in (got, want))
    assert tail_want >= 20, "the prompt should put a measurable mass outside the candidates"
    assert tail_got >= 0.5 * tail_want, (tail_got, tail_want)
    counts = torch.bincount(torch.tensor(want), minlength=ref["dense"].numel())
    frequent = [[t] for t in counts.argsort(descending=True)[:40].tolist() if counts[t] >= 10]
    bins = frequent + [sorted(cand - {t for [t] in frequent})]  # each frequent token; other candidates; tail
    assert _chi2_pvalue(got, want, bins) > 1e-3


def test_mixed_batch_of_greedy_sampled_and_constrained_requests(llm, ref):
    """One batch: greedy rows, seeded sampled rows (same tokens as alone), allowed_token_ids outside the
    candidates (scored exactly), a grammar whose first tokens are all outside the candidates (dense
    fallback), logprobs (dense row). Which tokens are outside is read off the index in hand (see ``ref``)."""
    from vllm import SamplingParams
    from vllm.sampling_params import StructuredOutputsParams

    prompts = real_prompts()
    ranked = ref["dense"].argsort(descending=True).tolist()
    outside = [t for t in ranked if ref["outside"][t]][:5]  # the dense head's favourites that FlashHead cannot score
    choices = ref["grammar_words"]
    batch = [
        (prompts[0], SamplingParams(max_tokens=NEW_TOKENS, temperature=0.0)),
        (prompts[1], SamplingParams(max_tokens=16, temperature=0.8, seed=1)),
        (prompts[2], SamplingParams(max_tokens=NEW_TOKENS, temperature=0.0)),
        (prompts[3], SamplingParams(max_tokens=16, temperature=1.2, top_p=0.9, top_k=50, seed=2)),
        (ref["sample_prompt"], SamplingParams(max_tokens=1, temperature=0.0, allowed_token_ids=outside)),
        (prompts[0], SamplingParams(max_tokens=8, temperature=0.0,
                                    structured_outputs=StructuredOutputsParams(choice=choices))),
        (ref["sample_prompt"], SamplingParams(max_tokens=1, temperature=0.0, logprobs=3)),
    ]
    [before] = llm.apply_model(head_facts)
    out = llm.generate([p for p, _ in batch], [s for _, s in batch], use_tqdm=False)
    [after] = llm.apply_model(head_facts)
    got = _tokens(out)
    assert got[0] == ref["greedy"][0] and got[2] == ref["greedy"][2]
    alone = _tokens(llm.generate([batch[1][0], batch[3][0]], [batch[1][1], batch[3][1]], use_tqdm=False))
    assert [got[1], got[3]] == alone
    dense = ref["dense"]
    assert got[4] == [max(outside, key=lambda t: dense[t])]
    assert out[5].outputs[0].text in choices
    assert after["dense_fallbacks"] > before["dense_fallbacks"]  # the grammar left no candidate at its first step
    top = out[6].outputs[0].logprobs[0]
    best = int(dense.argmax())
    assert got[6] == [best] and set(top) >= {best}
    assert abs(top[best].logprob - float(dense.log_softmax(0)[best])) < 1e-3
