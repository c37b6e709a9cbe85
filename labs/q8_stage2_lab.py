"""Stage 2 in Q8_0 (int8 rows + one fp16 scale per 32 weights) against fp32 rows, on a real model.

Per held-out novel (4,096 teacher-forced positions): the logit error of the int8 stage 2 against the
dense fp32 head (max and mean over every candidate logit at the index's default probe count), greedy
agreement of both stage-2 precisions with the dense argmax, and the containment / bytes front over the
probe count (containment does not depend on stage 2's precision: the candidates are scored exactly up
to float rounding). Then head speed side by side (greedy head calls, a 64 MiB buffer rewritten before
each, interleaved rounds, median) and whole-model greedy decode tokens/s.

    python labs/q8_stage2_lab.py gemma3-270m --json out.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time

import torch

from flashhead.data import load_text
from flashhead.head import stage1_nbytes
from flashhead.index import DEFAULTS_REVISION
from flashhead.integrations.transformers import apply, index_for, remove, text_states
from flashhead.models import head_weight, load_model

NOVELS = ("persuasion", "emma", "mansfieldpark", "northangerabbey")
FACTORS = (0.25, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0)


def front(head, index, states: torch.Tensor, top: torch.Tensor, dense_bytes: int, probes: list[int]) -> list[dict]:
    """Containment of the dense argmax and bytes per step (fp32 rows and Q8_0 rows) at each probe count."""
    c = index.config
    k, cap, d = c.num_clusters, c.cluster_size, c.hidden_size
    cluster_of = torch.full((c.vocab_size,), -1, dtype=torch.long)
    real = index.slot_token >= 0
    cluster_of[index.slot_token[real]] = torch.arange(k).unsqueeze(1).expand_as(real)[real]
    scores = torch.cat([head.stage1_scores(states[a:a + 512]) for a in range(0, len(states), 512)])
    rank = (scores > scores.gather(1, cluster_of[top].unsqueeze(1))).sum(1)
    rank[torch.isin(top, torch.tensor(c.always_ids))] = 0
    s1 = stage1_nbytes(k, d, head.stage1)
    rows = [(p, p * cap + len(c.always_ids)) for p in probes]
    return [{"n_probes": p, "containment": float((rank < p).float().mean()),
             "bytes_fraction_fp32_rows": (s1 + n * (4 * d + 8)) / dense_bytes,
             "bytes_fraction_q8_rows": (s1 + n * (d + d // 32 * 2 + 8)) / dense_bytes,
             "rows_fraction": n / c.vocab_size} for p, n in rows]


def fidelity(model, tok, index, text: str, positions: int) -> dict:
    states, _ = text_states(model, tok, text, positions)
    W = head_weight(model).detach().float().clone()  # the dense fp32 head, the reference
    top = torch.cat([(states[a:a + 256] @ W.T).argmax(1) for a in range(0, len(states), 256)])
    out = {}
    dense_bytes = index.config.vocab_size * index.config.hidden_size * 4
    for stage2 in ("float", "q8_0"):
        head = apply(model, index, stage2=stage2)
        try:
            errs_max, errs_sum, n = 0.0, 0.0, 0
            agree = 0
            for a in range(0, len(states), 256):
                h = states[a:a + 256]
                ids, logits = head.candidates(h, head.select_clusters(h))
                ref = h @ W.T
                ok = ids >= 0
                err = (logits - ref.gather(1, ids.clamp_min(0)))[ok].abs()
                errs_max, errs_sum, n = max(errs_max, float(err.max())), errs_sum + float(err.sum()), n + err.numel()
                agree += int((head.greedy(h) == top[a:a + 256]).sum())
            out[stage2] = {"agreement": agree / len(states), "logit_error_max": errs_max,
                           "logit_error_mean": errs_sum / n, "candidate_logits": n,
                           "bytes_fraction": head.nbytes_per_step() / dense_bytes}
            if stage2 == "q8_0":
                p0 = index.config.n_probes
                probes = sorted({max(1, min(index.num_clusters, round(p0 * f))) for f in FACTORS})
                out["front"] = front(head, index, states, top, dense_bytes, probes)
        finally:
            remove(model)
    return out


def head_speed(model, index, states: torch.Tensor, rounds: int = 15) -> dict:
    """Median ms of greedy head calls per batch: dense fp32, FlashHead fp32 rows, FlashHead Q8_0 rows."""
    weight = head_weight(model).detach().clone()
    buf = torch.empty(64 << 20, dtype=torch.uint8)
    heads = {}
    for stage2 in ("float", "q8_0"):
        head = apply(model, index, stage2=stage2)
        heads[stage2] = head
        remove(model)  # the head keeps its own storage alive
    fns = {"dense-fp32": lambda h: (h @ weight.T).argmax(1), "flashhead-fp32-rows": heads["float"].greedy,
           "flashhead-q8_0-rows": heads["q8_0"].greedy}
    out = {}
    for B in (1, 8):
        times = {k: [] for k in fns}
        with torch.inference_mode():
            for r in range(rounds + 2):
                names = list(fns)[r % 3:] + list(fns)[:r % 3]
                for name in names:
                    h = states[(r * B) % (len(states) - B):][:B]
                    buf.add_(1)  # evict the head from the cache, as the body's weights do
                    t = time.perf_counter()
                    fns[name](h)
                    if r >= 2:
                        times[name].append(time.perf_counter() - t)
        med = {k: statistics.median(v) * 1e3 for k, v in times.items()}
        out[f"b{B}"] = {k: {"ms": v, "speedup_vs_dense": med["dense-fp32"] / v} for k, v in med.items()}
    return out


def decode_speed(model, tok, index, new_tokens: int = 64, rounds: int = 3) -> dict:
    """Greedy generate() tokens/s at batch 1: dense, FlashHead fp32 rows, FlashHead Q8_0 rows, interleaved."""
    ids = tok(["It was a truth universally acknowledged that"], return_tensors="pt").input_ids
    setups = {"dense-fp32": None, "flashhead-fp32-rows": "float", "flashhead-q8_0-rows": "q8_0"}
    times = {k: [] for k in setups}
    tokens = {}
    for r in range(rounds):
        for name, stage2 in setups.items():
            if stage2 is not None:
                apply(model, index, stage2=stage2)
            try:
                with torch.inference_mode():
                    t = time.perf_counter()
                    out = model.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
                    times[name].append(time.perf_counter() - t)
                tokens[name] = out[0, ids.shape[1]:].tolist()
            finally:
                if stage2 is not None:
                    remove(model)
    tps = {k: new_tokens / statistics.median(v) for k, v in times.items()}
    return {k: {"tok_s": v, "speedup_vs_dense": v / tps["dense-fp32"],
                "identical_tokens": sum(a == b for a, b in zip(tokens[k], tokens["dense-fp32"])) / new_tokens}
            for k, v in tps.items()}


def embed_speed(model, index, rounds: int = 200) -> dict:
    """Median us of the input-embedding lookup, the original module against the int8 one (tied heads)."""
    out = {}
    for shape in ((1, 1), (8, 1), (1, 512)):
        ids = torch.randint(0, index.config.num_tokens, shape)
        for name, stage2 in (("original", None), ("q8_0", "q8_0")):
            if stage2 is not None:
                apply(model, index, stage2=stage2)
            try:
                emb = model.get_input_embeddings()
                with torch.inference_mode():
                    for _ in range(10):
                        emb(ids)
                    ts = []
                    for _ in range(rounds):
                        t = time.perf_counter()
                        emb(ids)
                        ts.append(time.perf_counter() - t)
                out[f"{name} {shape[0]}x{shape[1]}"] = statistics.median(ts) * 1e6
            finally:
                if stage2 is not None:
                    remove(model)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model")
    ap.add_argument("--positions", type=int, default=4096)
    ap.add_argument("--texts", default=",".join(NOVELS), help="comma-separated held-out texts")
    ap.add_argument("--skip-speed", action="store_true")
    ap.add_argument("--json", help="write the report here")
    a = ap.parse_args()
    torch.set_num_threads(2)
    model, tok = load_model(a.model, verbose=False)
    index = index_for(a.model, model, tok)
    report = {"model": a.model, "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
              "machine": platform.processor() or platform.machine(), "load_start": os.getloadavg(),
              "defaults_revision": DEFAULTS_REVISION, "stage2": index.config.stage2,
              "n_probes": index.config.n_probes, "defaults": index.config.build.get("defaults", {}), "texts": {}}
    for name in a.texts.split(","):
        report["texts"][name] = fidelity(model, tok, index, load_text(name), a.positions)
        print(name, json.dumps({k: v for k, v in report["texts"][name].items() if k != "front"}), flush=True)
    if not a.skip_speed:
        states, _ = text_states(model, tok, load_text(a.texts.split(",")[0]), 512)
        report["head_speed"] = head_speed(model, index, states)
        print(json.dumps(report["head_speed"]), flush=True)
        report["decode_speed"] = decode_speed(model, tok, index)
        print(json.dumps(report["decode_speed"]), flush=True)
        if index.config.stage2 == "q8_0":
            report["embedding_us"] = embed_speed(model, index)
            print(json.dumps(report["embedding_us"]), flush=True)
    report["load_end"] = os.getloadavg()
    if a.json:
        from flashhead._io import atomic_write_json

        atomic_write_json(a.json, report)


if __name__ == "__main__":
    main()
