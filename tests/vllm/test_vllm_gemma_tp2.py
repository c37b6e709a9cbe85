"""Gemma-3-270M with tensor_parallel_size=2 on CPU (one engine, two worker processes): the vocab-parallel
head is gathered once at load, FlashHead is replicated on both ranks in Q8_0 and the gathered float copy
is dropped; greedy tokens equal the
transformers integration's, which test_vllm_gemma.py shows equal to TP=1's.

SmolLM2 cannot split in two (9 attention heads)."""

from __future__ import annotations

import os

import pytest
from vllm_helpers import engine, folder_greedy, head_facts, real_prompts

pytestmark = pytest.mark.slow
NEW_TOKENS = 32


@pytest.fixture(scope="module")
def expected(gemma_folder):
    return folder_greedy(gemma_folder, real_prompts(2), NEW_TOKENS)


@pytest.fixture(scope="module")
def llm(gemma_folder, expected):
    # one core per rank (../shared/engines.md: the automatic pinning reserves a core per rank, none is left)
    before = os.environ.get("VLLM_CPU_OMP_THREADS_BIND")
    os.environ["VLLM_CPU_OMP_THREADS_BIND"] = "0|1"
    try:
        with engine(gemma_folder, tensor_parallel_size=2) as llm:
            yield llm
    finally:
        os.environ["VLLM_CPU_OMP_THREADS_BIND"] = before or ""


def test_tp2_replicates_the_index_and_keeps_the_greedy_tokens(llm, expected):
    from vllm import SamplingParams

    facts = llm.apply_model(head_facts)
    assert len(facts) == 2 and all(f == facts[0] for f in facts)  # replicated: every rank holds the whole head
    assert facts[0]["K"] * facts[0]["cap"] == 262144 and facts[0]["rows_bytes"] == 262144 * 640  # int8
    assert facts[0]["stage2"] == "q8_0" and not facts[0]["dense_copy"]
    out = llm.generate(real_prompts(2), SamplingParams(max_tokens=NEW_TOKENS, temperature=0.0), use_tqdm=False)
    assert [list(o.outputs[0].token_ids) for o in out] == expected
