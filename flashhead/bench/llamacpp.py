"""Model level with llama.cpp (``flashhead bench MODEL --engine llama.cpp``), batch 1, in one run:

* ``llama.cpp-dense``: llama.cpp with its own head and greedy sampler (what an Ollama user runs);
* ``llama.cpp-body``: the body alone, stopped after the final norm, fed the dense run's tokens: the
  floor any head can reach, hence the exact Amdahl bound ``t(dense step) / t(body step)``;
* ``llama.cpp-flashhead-<stage1>``: the body, then FlashHead's greedy on its state;

timed interleaved (one call of each per round, the order rotated) next to transformers' dense and
FlashHead rows (``model.transformers_model_level`` at batch 1). Fidelity: llama.cpp's own argmax
against body + FlashHead's at every teacher-forced position of windows of the held-out novels.
"""

from __future__ import annotations

import dataclasses
import functools
import statistics
from collections.abc import Sequence

import torch

from .model import interleaved_rounds, match, transformers_model_level
from .timing import log

__all__ = ["llamacpp_model_level", "teacher_forced_agreement"]

#: teacher-forced positions per held-out novel (full run, quick run), in windows of WINDOW tokens
POSITIONS = (2048, 256)
WINDOW = 128
#: the issue's targets for llama.cpp: (key, description, threshold, models it applies to)
TARGETS = (
    ("llamacpp_b1", "llama.cpp + FlashHead / llama.cpp dense, tokens/s, batch 1", 1.8, ("gemma3-270m",)),
    ("llamacpp_teacher_forced", "greedy token = llama.cpp's own on teacher-forced held-out positions", 0.999,
     ("gemma3-270m",)),
    ("llamacpp_amdahl_b1", "llama.cpp + FlashHead decode speed-up / Amdahl bound, batch 1", 0.85, ("smollm2-135m",)),
)


def teacher_forced_agreement(engine, texts: Sequence[str], positions: int, window: int = WINDOW,
                             quiet: bool = True) -> dict:
    """Per text: positions where body + FlashHead's greedy token equals llama.cpp's own argmax, teacher-forced
    over consecutive windows of ``window`` tokens (the model's BOS first) from the start of the text."""
    from ..data import load_text

    bos = engine.tokenize("", add_special=True)
    body = window - len(bos)
    out = {}
    for name in texts:
        ids = engine.tokenize(load_text(name), add_special=False)
        same = total = 0
        for a in range(0, min(positions, len(ids) - body), body):
            win = bos + ids[a:a + body]
            ref = engine.dense_argmax(win)[len(bos):]
            with torch.inference_mode():
                got = engine.head.greedy(engine.hidden_states(win))[len(bos):]
            same += int((ref == got).sum())
            total += len(ref)
        out[name] = {"positions": total, "identical": same, "fraction": same / total}
        log(f"teacher-forced, {name}: {same}/{total} positions identical to llama.cpp's own argmax", quiet)
    same, total = sum(v["identical"] for v in out.values()), sum(v["positions"] for v in out.values())
    return {"texts": out, "positions": total, "identical": same, "fraction": same / total, "window": window}


def _time_rounds(engine, ids: list[int], st, quiet: bool) -> tuple[dict, dict, dict]:
    """Median seconds of the whole call (N new tokens) and of prefill + 1 token, per configuration, over
    interleaved rounds; and each configuration's tokens."""
    n = st.new_tokens
    dense_tokens = engine.generate(ids, n, head="dense").token_ids[0]
    follow = (dense_tokens * (n // max(1, len(dense_tokens)) + 1))[:n]  # the body replays llama.cpp's tokens
    calls = {
        "llama.cpp-dense": functools.partial(engine.generate, ids, head="dense"),
        "llama.cpp-body": functools.partial(engine.generate, ids, head="body", follow=follow),
        f"llama.cpp-flashhead-{engine.head.stage1}": functools.partial(engine.generate, ids, head="flashhead"),
    }
    full, pre, last = interleaved_rounds(calls, n, st.model_repeats)
    log(f"llama.cpp, batch 1: {st.model_repeats} interleaved rounds of {', '.join(calls)} done", quiet)
    return ({k: statistics.median(v) for k, v in full.items()}, {k: statistics.median(v) for k, v in pre.items()},
            {k: g.token_ids[0] for k, g in last.items()})


def llamacpp_model_level(model_ref: str, st, *, index, text: str, quiet: bool, model=None, tok=None) -> dict:
    """The model-level rows of ``model.py`` for transformers (batch 1) and llama.cpp, with llama.cpp's targets."""
    from ..data import HELD_OUT_TEXTS
    from ..integrations.llamacpp import LlamaCpp

    tf = transformers_model_level(model_ref, dataclasses.replace(st, model_batches=(1,)), index=index, text=text,
                                  quiet=quiet, model=model, tok=tok)
    log(f"llama.cpp: loading {model_ref} (n_threads={st.threads}) with its FlashHead index", quiet)
    engine = LlamaCpp(model_ref, n_threads=st.threads, index=st.index, verbose=False)
    ids = engine.tokenize(tf["prompts"][0])
    log(f"llama.cpp, batch 1: dense / body only / FlashHead, {len(ids)}-token prompt, {st.new_tokens} new tokens, "
        f"{st.model_repeats} interleaved rounds", quiet)
    full, pre, tokens = _time_rounds(engine, ids, st, quiet)
    names = list(full)
    steps = {k: 1e3 * (full[k] - pre[k]) / max(1, len(tokens[k]) - 1) for k in names}
    dense, body = "llama.cpp-dense", "llama.cpp-body"
    bound = steps[dense] / steps[body]
    rows = []
    for k in names:
        same, prefix = match([tokens[k]], [tokens[dense]])
        rows.append({
            "name": k, "batch": 1, "new_tokens": len(tokens[k]), "seconds_median": full[k],
            "tokens_per_second": len(tokens[k]) / full[k], "prefill_seconds": pre[k],
            "decode_tokens_per_second": 1e3 / steps[k], "step_ms": steps[k],
            "head_ms_per_step": steps[k] - steps[body], "identical_token_fraction": same,
            "identical_prefix_mean": prefix, "dense_head_share": 1 - steps[body] / steps[dense], "amdahl_bound": bound,
        })
    d = rows[0]
    for r in rows:
        r["speedup_vs_dense"] = r["tokens_per_second"] / d["tokens_per_second"]
        r["decode_speedup_vs_dense"] = r["decode_tokens_per_second"] / d["decode_tokens_per_second"]
        r["predicted_decode_speedup"] = r["decode_speedup_vs_dense"]  # measured, not predicted: the cut is exact
        r["fraction_of_amdahl"] = r["decode_speedup_vs_dense"] / bound
    for r in tf["rows"] + rows:
        r["speedup_vs_llamacpp_dense"] = r["tokens_per_second"] / d["tokens_per_second"]
    positions = POSITIONS[1] if st.quick else POSITIONS[0]
    log(f"teacher-forced agreement with llama.cpp's own argmax: {positions} positions of each of "
        f"{', '.join(HELD_OUT_TEXTS)}", quiet)
    tf_agree = teacher_forced_agreement(engine, HELD_OUT_TEXTS, positions, quiet=quiet)
    flash = rows[2]
    measured = {"llamacpp_b1": flash["speedup_vs_dense"], "llamacpp_teacher_forced": tf_agree["fraction"],
                "llamacpp_amdahl_b1": flash["fraction_of_amdahl"]}
    targets = [{"target": key, "description": desc, "threshold": thr, "measured": measured[key],
                "met": measured[key] >= thr} for key, desc, thr, models in TARGETS if model_ref in models]
    fh = engine.head
    engine.close()
    return {
        "rows": tf["rows"] + rows, "prompts": tf["prompts"], "teacher_forced": tf_agree, "targets": targets,
        "llamacpp": {"version": engine.ll.__version__, "n_threads": st.threads, "head_rows": engine.head_source,
                     "n_probes": fh.n_probes, "stage1": fh.stage1, "prompt_tokens": len(ids)},
        "method": tf["method"] + ". llama.cpp rows: LlamaCpp.generate, batch 1, greedy, its x columns against "
                  "llama.cpp-dense; step = (t(N new) - t(1 new)) / (N - 1); head ms = step - body step; Amdahl = "
                  "dense step / body step (the callback stop is the exact cut)",
    }
