"""Shared helpers of the vLLM tests: real prompts, a servable folder, the transformers reference, one engine."""

from __future__ import annotations

import gc
from contextlib import contextmanager
from pathlib import Path

#: real text prompts (held-out novels: neither calibrates the index)
PROMPT_TEXTS = (("persuasion", 20_000), ("persuasion", 60_000), ("northangerabbey", 30_000), ("northangerabbey", 90_000))


def real_prompts(n: int = 4, words: int = 40) -> list[str]:
    """``n`` prompts of ``words`` words cut from held-out novels, each starting at a sentence."""
    from flashhead.data import load_text

    prompts = []
    for name, start in PROMPT_TEXTS[:n]:
        text = load_text(name)
        begin = text.index(". ", start) + 2
        prompts.append(" ".join(text[begin:].split()[:words]))
    return prompts


def export(model: str, out: Path) -> Path:
    """The servable folder of a built-in model (its cached index, built once if missing)."""
    from flashhead.integrations.transformers import index_for
    from flashhead.integrations.vllm.folder import export_folder
    from flashhead.models import load_model, local_dir

    m, tok = load_model(model, verbose=False)
    index = index_for(model, m, tok, progress=False)
    return export_folder(local_dir(model, verbose=False), out, index)


def reference(folder: Path, prompts: list[str], new_tokens: int) -> list[list[int]]:
    """Greedy tokens of the transformers integration on the servable folder (its flashhead/ index)."""
    import torch

    from flashhead.decode import generate
    from flashhead.integrations.transformers import from_pretrained

    torch.set_num_threads(1)
    model, tok = from_pretrained(folder)
    try:
        return [generate(model, tok, [p], max_new_tokens=new_tokens).token_ids[0] for p in prompts]
    finally:
        del model
        gc.collect()


@contextmanager
def engine(folder: Path, **kwargs):
    """One vLLM engine on ``folder`` (fp32, eager), shut down and freed on exit."""
    from vllm import LLM
    from vllm.distributed.parallel_state import cleanup_dist_env_and_memory

    llm = LLM(model=str(folder), dtype="float32", max_model_len=1024, enforce_eager=True, seed=0, **kwargs)
    try:
        yield llm
    finally:
        del llm
        cleanup_dist_env_and_memory()
        gc.collect()
