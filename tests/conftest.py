"""Shared fixtures: the real models are loaded once per test session."""

from __future__ import annotations

import pytest
import torch

torch.set_num_threads(2)


@pytest.fixture(scope="session")
def smollm2():
    from flashhead.models import load_model

    return load_model("smollm2-135m", verbose=False)


@pytest.fixture(scope="session")
def gemma():
    from flashhead.models import load_model

    return load_model("gemma3-270m", verbose=False)


@pytest.fixture(scope="session")
def smol_index(smollm2):
    """A real SmolLM2 index with the default build settings (calibrated on two Austen novels)."""
    from flashhead.integrations.transformers import build_for_model

    model, tok = smollm2
    return build_for_model(model, tok, model_name="smollm2-135m", progress=False)


@pytest.fixture(scope="session")
def qwen():
    """Qwen2.5-Coder-0.5B-Instruct: the built-in model with an untied head (its own 151,936 x 896 lm_head)."""
    from flashhead.models import load_model

    return load_model("qwen2.5-coder-0.5b", verbose=False)


@pytest.fixture(scope="session")
def qwen_index(qwen):
    """The Qwen index with the default build settings, from the cache (built once there if missing)."""
    from flashhead.integrations.transformers import index_for

    model, tok = qwen
    return index_for("qwen2.5-coder-0.5b", model, tok, progress=False)


@pytest.fixture(scope="session")
def smol_llamacpp():
    """SmolLM2's GGUF in flashhead's llama.cpp engine, one thread (correctness only: one thread never waits in a
    barrier on a busy machine)."""
    from flashhead.integrations.llamacpp import LlamaCpp

    e = LlamaCpp("smollm2-135m", n_threads=1)
    yield e
    e.close()


# llama.cpp's CPU kernels are not batch-invariant (docs/design.md, "Several sequences per llama.cpp step"): a
# sequence decoded beside others may take the other token of a near tie. The largest gap measured there is
# 0.34 nats (Gemma-3-270M, 8 slots: labs/batch_invariance.py); a mixed-up request or a wrong state differs by
# whole nats.
TIE_NATS = 0.5


@pytest.fixture(scope="session")
def greedy_or_tie():
    """``check(engine, prompt_ids, got, ref)``: a batched run's greedy tokens ``got`` equal the batch-1 run's
    ``ref``, or first differ at a near tie: the two tokens' log-probabilities, scored at batch 1 by llama.cpp's
    dense head after the common prefix, within TIE_NATS. Returns whether they were equal."""

    def check(engine, prompt_ids: list[int], got: list[int], ref: list[int]) -> bool:
        i = next((j for j, (a, b) in enumerate(zip(got, ref)) if a != b), None)
        if i is None:
            assert len(got) == len(ref), f"equal tokens, then one run stopped early: {len(got)} vs {len(ref)}"
            return True
        prefix = list(prompt_ids) + list(ref[:i])
        lp_got, lp_ref = (float(engine.score(prefix + [t], len(prefix))[0][0]) for t in (got[i], ref[i]))
        assert abs(lp_got - lp_ref) <= TIE_NATS, (
            f"token {i} differs from the batch-1 run ({got[i]} vs {ref[i]}) and is no near tie: log-probs "
            f"{lp_got:.4f} vs {lp_ref:.4f}")
        return False

    return check
