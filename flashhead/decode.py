"""Timed generation with transformers ``generate()``: the measurement behind the CLI and the demo."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Generation:
    texts: list[str]  # continuation of each prompt
    token_ids: list[list[int]]  # new token ids of each prompt (up to EOS)
    seconds: float  # wall time of the generate() call
    new_tokens: int  # new tokens produced, all rows together

    @property
    def tokens_per_second(self) -> float:
        return self.new_tokens / self.seconds if self.seconds > 0 else float("nan")


def generate(model, tokenizer, prompts: list[str], *, max_new_tokens: int = 32, temperature: float | None = None,
             top_k: int | None = None, top_p: float | None = None, seed: int = 0) -> Generation:
    """Generate from a batch of prompts (left-padded); greedy unless ``temperature`` is given."""
    if not prompts or any(not isinstance(p, str) or not p.strip() for p in prompts):
        raise ValueError("every prompt must be a non-empty string")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    # transformers silently ignores some out-of-range sampling arguments: refuse them here
    if temperature is not None and not (math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"temperature must be a finite float > 0, got {temperature!r}; omit it for greedy decoding")
    if top_p is not None and not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1], got {top_p!r}")
    if top_k is not None and top_k < 1:
        raise ValueError(f"top_k must be an int >= 1, got {top_k!r}")
    tokenizer.padding_side = "left"
    enc = tokenizer(prompts, return_tensors="pt", padding=True)
    sampling = temperature is not None
    kwargs = dict(max_new_tokens=max_new_tokens, do_sample=sampling, pad_token_id=tokenizer.pad_token_id)
    if sampling:
        kwargs.update(temperature=temperature, top_k=top_k or 0, top_p=1.0 if top_p is None else top_p)
    else:  # silence generation-config defaults that only apply to sampling
        kwargs.update(temperature=None, top_k=None, top_p=None)
    torch.manual_seed(seed)
    t0 = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(**enc, **kwargs)
    seconds = time.perf_counter() - t0
    new = out[:, enc["input_ids"].shape[1]:]
    ids = []
    for row in new.tolist():
        if tokenizer.eos_token_id in row:
            row = row[: row.index(tokenizer.eos_token_id) + 1]
        ids.append(row)
    texts = [tokenizer.decode(r, skip_special_tokens=True) for r in ids]
    return Generation(texts, ids, seconds, sum(len(r) for r in ids))
