"""The Qwen3 variant in vLLM: a small randomly initialised Qwen3ForCausalLM with the real Qwen3 tokenizer
and vocabulary (no Qwen3 weights install here), with an untied head that is not Q8_0, so the plugin
serves float rows. Mechanics only, as tests/test_qwen3.py: random weights say nothing about fidelity.
"""

from __future__ import annotations

import pytest
from vllm_helpers import engine, folder_greedy, real_prompts

pytestmark = pytest.mark.slow
NEW_TOKENS = 12


@pytest.fixture(scope="module")
def qwen3_folder(tmp_path_factory):
    """A servable folder of a random Qwen3 (2 layers, hidden 128, 151,936 tokens), index built here."""
    import torch
    from transformers import AutoTokenizer, Qwen3Config, Qwen3ForCausalLM

    from flashhead.data import qwen3_tokenizer_dir
    from flashhead.integrations.transformers import build_for_model
    from flashhead.integrations.vllm.folder import export_folder

    tok = AutoTokenizer.from_pretrained(qwen3_tokenizer_dir(verbose=False))
    config = Qwen3Config(vocab_size=151_936, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, head_dim=64, max_position_embeddings=2048,
                         tie_word_embeddings=False, bos_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
                         pad_token_id=tok.pad_token_id, torch_dtype="float32")
    torch.manual_seed(0)
    model = Qwen3ForCausalLM(config).eval()
    src = tmp_path_factory.mktemp("qwen3") / "model"
    model.save_pretrained(src)
    tok.save_pretrained(src)
    index = build_for_model(model, tok, calibration_texts=["prideprejudice"], calibration_positions=512, iters=3,
                            model_name="qwen3-random-untied", progress=False)
    return export_folder(src, src.parent / "served", index)


def test_qwen3_greedy_in_vllm_matches_the_transformers_integration(qwen3_folder):
    import json

    from vllm import SamplingParams

    assert json.loads((qwen3_folder / "config.json").read_text())["architectures"] == ["FlashHeadQwen3ForCausalLM"]
    prompts = real_prompts(4)
    want = folder_greedy(qwen3_folder, prompts, NEW_TOKENS)
    with engine(qwen3_folder) as llm:
        assert type(llm.llm_engine.model_config.hf_config).__name__ == "Qwen3Config"
        greedy = llm.generate(prompts, SamplingParams(max_tokens=NEW_TOKENS, temperature=0.0, ignore_eos=True))
        sampled = llm.generate(prompts, SamplingParams(max_tokens=NEW_TOKENS, temperature=1.0, seed=1, ignore_eos=True))
        served = llm.apply_model(lambda m: (type(m).__name__, str(m.flashhead.head.rows.dtype)))
    assert len({t for ids in want for t in ids}) > 8  # not one token repeated: the comparison means something
    assert [list(o.outputs[0].token_ids) for o in greedy] == want
    assert served == [("FlashHeadQwen3ForCausalLM", "torch.float32")]  # float rows: the head is not Q8_0
    assert all(len(o.outputs[0].token_ids) == NEW_TOKENS for o in sampled)
    assert [list(o.outputs[0].token_ids) for o in sampled] != want  # sampling really sampled
