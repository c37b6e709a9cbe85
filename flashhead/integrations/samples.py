"""Calibration on the model's own samples: hidden states of short texts a transformers model writes itself.

Each text starts from the model's start token (if its tokenizer has one) and one token of its own vocabulary, and the model goes on
at T = 1. The seed's script (the Unicode script of its first letter, e.g. LATIN, GREEK, THAI, CJK) is drawn
with probability proportional to (the script's tokens)^alpha and the token uniformly within it, so every
script the vocabulary holds gets states, in proportion to how much of the vocabulary it is, flattened by
alpha. No language list and no text in those languages is involved: a multilingual tokenizer says what the
model speaks. Short texts (``length`` tokens) cover more scripts than few long ones for the same positions.
Why and how much it helps: docs/fidelity.md, "Languages, scripts and registers".
"""

from __future__ import annotations

import math
import unicodedata

import torch
from tqdm.auto import tqdm

__all__ = ["DEFAULT_ALPHA", "DEFAULT_LENGTH", "DEFAULT_POSITIONS", "sample_states", "seed_tokens", "vocab_scripts"]

#: positions the default build draws (docs/fidelity.md: as many as the first calibration set's)
DEFAULT_POSITIONS = 6144
DEFAULT_LENGTH = 8
DEFAULT_ALPHA = 0.3
#: scripts with fewer tokens than this are left out of the seeds (stray letters of a script, not a language)
MIN_SCRIPT_TOKENS = 32
_BATCH = 64


def vocab_scripts(tokenizer) -> dict[str, list[int]]:
    """Token ids by the Unicode script of their first letter ("none": digits, punctuation, symbols), leaving
    out special and added tokens, whitespace-only tokens and partial UTF-8 bytes."""
    skip = set(getattr(tokenizer, "added_tokens_decoder", {}))
    out: dict[str, list[int]] = {}
    for i in range(len(tokenizer)):
        if i in skip:
            continue
        s = tokenizer.decode([i])
        if not s.strip() or "\ufffd" in s:
            continue
        letter = next((c for c in s if unicodedata.category(c).startswith("L")), None)
        script = unicodedata.name(letter, "UNKNOWN LETTER").split()[0] if letter else "none"
        out.setdefault(script, []).append(i)
    return out


def seed_tokens(tokenizer, n: int, alpha: float = DEFAULT_ALPHA, seed: int = 0) -> tuple[list[int], dict[str, int]]:
    """``n`` seed token ids drawn as the module docstring says, and how many came from each script."""
    scripts = {k: v for k, v in vocab_scripts(tokenizer).items() if len(v) >= MIN_SCRIPT_TOKENS}
    if not scripts:
        raise ValueError("the tokenizer has no script with enough tokens to seed samples from")
    names = sorted(scripts)
    gen = torch.Generator().manual_seed(seed)
    weight = torch.tensor([len(scripts[k]) ** alpha for k in names], dtype=torch.float64)
    picks = torch.multinomial(weight / weight.sum(), n, replacement=True, generator=gen).tolist()
    within = torch.rand(n, generator=gen, dtype=torch.float64).tolist()
    ids = [scripts[names[j]][int(u * len(scripts[names[j]]))] for j, u in zip(picks, within)]
    return ids, {k: c for k, c in ((k, picks.count(j)) for j, k in enumerate(names)) if c}


def sample_states(model, tokenizer, positions: int, *, length: int = DEFAULT_LENGTH, alpha: float = DEFAULT_ALPHA,
                  seed: int = 0, progress: bool = True) -> tuple[torch.Tensor, dict]:
    """Final hidden states [positions, d] (float32) of the model's own seeded samples, and a record of how
    they were drawn (for the index's build record). The model must use its dense head (build before
    ``apply``); the global RNG is left as it was."""
    if getattr(model, "_flashhead", None) is not None:
        raise ValueError("the model already uses FlashHead: draw calibration samples with its dense head "
                         "(flashhead.integrations.transformers.remove first)")
    if isinstance(positions, bool) or not isinstance(positions, int) or positions < 1:
        raise ValueError(f"sample positions must be a positive integer, got {positions!r}")
    if isinstance(length, bool) or not isinstance(length, int) or length < 1:
        raise ValueError(f"sample length must be a positive integer, got {length!r}")
    if not 0 <= alpha <= 1:
        raise ValueError(f"alpha must be from 0 (every script alike) to 1 (by its share of the vocabulary), got {alpha!r}")
    n = math.ceil(positions / length)
    seeds, per_script = seed_tokens(tokenizer, n, alpha, seed)
    bos = tokenizer.bos_token_id
    start = tokenizer("", add_special_tokens=True).input_ids or ([bos] if bos is not None else [])
    ids = torch.tensor([[*start, s] for s in seeds])
    pad = model.generation_config.pad_token_id
    states = []
    with torch.random.fork_rng(devices=[]), torch.inference_mode():
        torch.manual_seed(seed)
        for a in tqdm(range(0, n, _BATCH), desc="own samples", unit="batch", disable=not progress):
            part = ids[a:a + _BATCH]
            out = model.generate(input_ids=part, attention_mask=torch.ones_like(part), do_sample=True,
                                 temperature=1.0, top_k=0, top_p=1.0, max_new_tokens=length,
                                 min_new_tokens=length, pad_token_id=0 if pad is None else pad)
            # the states at the seed and the first length - 1 new tokens: each predicts the next one
            h = model.base_model(input_ids=out[:, :-1]).last_hidden_state[:, len(start):]
            states.append(h.float().flatten(0, 1))
    record = {"positions": positions, "texts": n, "length": length, "alpha": alpha, "seed": seed,
              "seed_scripts": per_script}
    return torch.cat(states)[:positions], record
