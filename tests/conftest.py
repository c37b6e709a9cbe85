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
