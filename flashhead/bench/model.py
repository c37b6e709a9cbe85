"""Model level, per engine: whole-model decode speed, FlashHead against the dense head, in one run.

``ENGINES`` maps an engine name (``flashhead bench --engine``) to its model-level function
``fn(model_ref, settings, *, index, text, quiet, model=None, tok=None) -> dict`` returning
``{"rows": [...], "prompts": [...], "method": str}``: one row per (configuration name, batch) with
at least ``name`` ("dense-fp32" or "flashhead-<stage1>"), ``batch``, ``tokens_per_second``,
``decode_tokens_per_second``, ``head_ms_per_step``, ``step_ms``, ``identical_token_fraction`` and
``identical_prefix_mean``; ``add_ratios`` then adds the speed-ups and the Amdahl bound. ``model`` and
``tok`` are the dense transformers model and tokenizer the head level already loaded (reusable).
"""

from __future__ import annotations

import functools
import importlib
import statistics
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from .timing import log

if TYPE_CHECKING:
    from ..index import FlashHeadIndex
    from .settings import Settings

__all__ = ["ENGINES", "model_level_of", "transformers_model_level", "interleaved_rounds", "add_ratios",
           "prompts_of_length", "match"]


def prompts_of_length(tok, text: str, n: int, length: int, start: int) -> list[str]:
    """``n`` prompts that each tokenize (with the tokenizer's special prefix) to exactly ``length`` tokens."""
    ids = tok(text[start:start + 400_000], add_special_tokens=False).input_ids
    out, pos = [], 0
    while len(out) < n and pos + length < len(ids):
        for k in range(length, 0, -1):
            s = tok.decode(ids[pos:pos + k])
            if s.strip() and len(tok(s, add_special_tokens=True).input_ids) == length:
                out.append(s)
                break
        pos += 997  # far apart: unrelated contexts
    if len(out) < n:
        raise ValueError(f"could not cut {n} prompts of {length} tokens from the text")
    return out


class HeadTimer:
    """Forward hooks on a model's output head: wall time of each call inside generate(), and the
    time from one call's start to the next one's (a whole decode step, generate()'s loop included)."""

    def __init__(self, module) -> None:
        self.times: list[float] = []
        self.starts: list[float] = []
        self._t0 = 0.0
        self._h = [module.register_forward_pre_hook(self._pre), module.register_forward_hook(self._post)]

    def _pre(self, *_):
        self._t0 = time.perf_counter()
        self.starts.append(self._t0)

    def _post(self, *_):
        self.times.append(time.perf_counter() - self._t0)

    def close(self):
        for h in self._h:
            h.remove()


def match(a: list[list[int]], b: list[list[int]]) -> tuple[float, float]:
    """(fraction of identical tokens position by position, mean identical-prefix length)."""
    same = total = 0
    prefixes = []
    for x, y in zip(a, b):
        total += len(x)
        same += sum(u == v for u, v in zip(x, y))
        k = 0
        while k < min(len(x), len(y)) and x[k] == y[k]:
            k += 1
        prefixes.append(k)
    return (same / total if total else float("nan")), statistics.fmean(prefixes)


def interleaved_rounds(calls: dict[str, Callable], new_tokens: int, repeats: int
                       ) -> tuple[dict[str, list[float]], dict[str, list[float]], dict]:
    """Time ``calls[name](max_new_tokens=...)`` (each returns an object with ``seconds``) side by side:
    a 4-token warm-up each, then ``repeats`` rounds in an order rotated every round, each a
    ``new_tokens`` call and a 1-token call (the prefill's share). Returns the seconds of the long
    calls, the seconds of the 1-token calls, and each name's last long result."""
    names = list(calls)
    for n in names:  # warm-up
        calls[n](max_new_tokens=4)
    full: dict[str, list[float]] = {n: [] for n in names}
    pre: dict[str, list[float]] = {n: [] for n in names}
    last = {}
    for r in range(repeats):
        for j in range(len(names)):
            n = names[(j + r) % len(names)]
            g = calls[n](max_new_tokens=new_tokens)
            full[n].append(g.seconds)
            last[n] = g
            pre[n].append(calls[n](max_new_tokens=1).seconds)
    return full, pre, last


def add_ratios(rows: list[dict]) -> None:
    """Add, to each row, its speed-ups against dense fp32 at the same batch, the dense head's share
    of a step, the Amdahl bound it implies, and how much of that bound the row reaches."""
    for r in rows:
        d = next(x for x in rows if x["name"] == "dense-fp32" and x["batch"] == r["batch"])
        r["speedup_vs_dense"] = r["tokens_per_second"] / d["tokens_per_second"]
        r["decode_speedup_vs_dense"] = r["decode_tokens_per_second"] / d["decode_tokens_per_second"]
        f = d["head_ms_per_step"] / d["step_ms"] if d["step_ms"] > 0 else float("nan")
        r["dense_head_share"] = f
        r["amdahl_bound"] = 1.0 / (1.0 - f) if f < 1 else float("inf")
        # what the step would cost with this head, from the in-situ head times
        pred = d["step_ms"] / (d["step_ms"] - d["head_ms_per_step"] + r["head_ms_per_step"])
        r["predicted_decode_speedup"] = pred
        r["fraction_of_amdahl"] = r["decode_speedup_vs_dense"] / r["amdahl_bound"]


def transformers_model_level(model_ref: str, st: Settings, *, index: FlashHeadIndex, text: str, quiet: bool,
                             model=None, tok=None) -> dict:
    """generate() tokens/s, FlashHead vs dense, interleaved; identical tokens; in-situ head time."""
    from ..decode import generate
    from ..integrations.transformers import apply
    from ..models import load_model

    if model is None or tok is None:
        model, tok = load_model(model_ref, verbose=not quiet)
    prompts = prompts_of_length(tok, text, max(st.model_batches), st.prompt_tokens, start=len(text) // 2)
    models = {"dense-fp32": model}
    for s in st.model_flash_modes or (index.config.stage1,):
        m, _ = load_model(model_ref, verbose=False)
        apply(m, index, stage1=s)
        models[f"flashhead-{s}"] = m
    names = list(models)
    rows = []
    for B in st.model_batches:
        ps = prompts[:B]
        log(f"model level, batch {B}: {', '.join(names)}, {st.prompt_tokens}-token prompts, {st.new_tokens} new "
            f"tokens, {st.model_repeats} interleaved rounds", quiet)
        full, pre, gens = interleaved_rounds(
            {n: functools.partial(generate, models[n], tok, ps) for n in names}, st.new_tokens, st.model_repeats)
        # in-situ head time per decode step (hooks; a separate, untimed run)
        insitu = {}
        for n in names:
            m = models[n]
            timer = HeadTimer(m.get_output_embeddings())
            try:
                generate(m, tok, ps, max_new_tokens=st.new_tokens)
            finally:
                timer.close()
            # decode steps (the first head call is the prefill's): a step runs from the start of one
            # head call to the start of the next, so each step holds its head call and the head's
            # share stays below 1 by construction (a difference of two timed runs did not)
            steps = [b - a for a, b in zip(timer.starts[1:], timer.starts[2:])]
            dec = timer.times[1:1 + len(steps)]
            insitu[n] = {"head_ms_per_step": statistics.median(dec) * 1e3 if dec else float("nan"),
                         "steps": len(dec), "step_ms": statistics.median(steps) * 1e3 if steps else float("nan")}
        dense = gens["dense-fp32"]
        for n in names:
            g = gens[n]
            t_full, t_pre = statistics.median(full[n]), statistics.median(pre[n])
            steps = st.new_tokens - 1
            same, prefix = match(g.token_ids, dense.token_ids)
            rows.append({
                "name": n, "batch": B, "new_tokens": g.new_tokens, "seconds_median": t_full,
                "seconds_all": full[n], "tokens_per_second": g.new_tokens / t_full,
                "decode_tokens_per_second": B * steps / max(1e-9, t_full - t_pre),
                "prefill_seconds": t_pre, "identical_token_fraction": same, "identical_prefix_mean": prefix,
                **insitu[n],
            })
    add_ratios(rows)
    return {"rows": rows, "prompts": prompts[: max(st.model_batches)],
            "method": "flashhead.decode.generate (transformers generate, greedy, fp32), wall time of the call; "
                      "decode tokens/s = B*(N-1) / (t(N new) - t(1 new)); medians over interleaved rounds"}


# engine name -> "module:function" in flashhead.bench, imported on use (an engine's optional packages
# are only needed when it runs, and its module may import the helpers above without a cycle)
ENGINES: dict[str, str] = {
    "transformers": "model:transformers_model_level",
    "vllm": "vllm:vllm_model_level",
    "llama.cpp": "llamacpp:llamacpp_model_level",
}


def model_level_of(engine: str) -> Callable[..., dict]:
    """The model-level function of ``engine`` (a key of ``ENGINES``)."""
    if engine not in ENGINES:
        raise ValueError(f"unknown engine {engine!r}: choose one of {', '.join(ENGINES)}")
    module, func = ENGINES[engine].split(":")
    return getattr(importlib.import_module(f"{__package__}.{module}"), func)
