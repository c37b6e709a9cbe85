"""SmolLM2-135M served by stock vLLM with flashhead's plugin: one engine for the whole module."""

from __future__ import annotations

import pytest
from vllm_helpers import engine, export, real_prompts, reference

pytestmark = pytest.mark.slow
NEW_TOKENS = 32


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return export("smollm2-135m", tmp_path_factory.mktemp("smol") / "served")


@pytest.fixture(scope="module")
def expected(folder):
    """The transformers integration's greedy tokens (computed before the engine starts: one model at a time)."""
    return reference(folder, real_prompts(), NEW_TOKENS)


@pytest.fixture(scope="module")
def llm(folder, expected):
    with engine(folder) as llm:
        yield llm


def test_the_plugin_serves_the_folder(llm):
    model = llm.llm_engine.model_executor.driver_worker.worker.model_runner.model
    assert type(model).__name__ == "FlashHeadLlamaForCausalLM"
    head = model.flashhead.head
    assert head.K == 24576 and head.cap == 2 and head.stage1 == "int4"


def test_greedy_tokens_equal_the_transformers_integration(llm, expected):
    from vllm import SamplingParams

    out = llm.generate(real_prompts(), SamplingParams(max_tokens=NEW_TOKENS, temperature=0.0), use_tqdm=False)
    got = [list(o.outputs[0].token_ids) for o in out]
    assert got == expected
