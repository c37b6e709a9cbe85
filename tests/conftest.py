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
