"""Gemma-3-270M served by stock vLLM with flashhead's plugin (one engine): greedy tokens, real prompts."""

from __future__ import annotations

import pytest
from vllm_helpers import engine, folder_greedy, head_facts, real_prompts

pytestmark = pytest.mark.slow
NEW_TOKENS = 32


@pytest.fixture(scope="module")
def expected(gemma_folder):
    """The transformers integration's greedy tokens (before the engine starts: one model at a time)."""
    return folder_greedy(gemma_folder, real_prompts(), NEW_TOKENS)


@pytest.fixture(scope="module")
def llm(gemma_folder, expected):
    with engine(gemma_folder) as llm:
        yield llm


def test_gemma_greedy_tokens_equal_the_transformers_integration(llm, expected):
    from vllm import SamplingParams

    [facts] = llm.apply_model(head_facts)
    assert facts["arch"] == "FlashHeadGemma3ForCausalLM" and (facts["K"], facts["cap"]) == (16384, 16)
    out = llm.generate(real_prompts(), SamplingParams(max_tokens=NEW_TOKENS, temperature=0.0), use_tqdm=False)
    assert [list(o.outputs[0].token_ids) for o in out] == expected
