"""One benchmark run, end to end: bandwidth, head level, model level, memory, targets."""

from __future__ import annotations

import time

import torch
import torch.nn.functional as F

from .memory import measure_memory
from .model import model_level_of
from .peers import dense_configs, peer_configs
from .report import evaluate_targets
from .settings import Settings
from .timing import HeadConfig, cpu_busy, loadavg, log, machine_info, measure_bandwidth, time_head_level, wait_for_quiet

__all__ = ["SCHEMA", "HELD_OUT_TEXT", "run_benchmark"]

SCHEMA = "flashhead-bench/1"
HELD_OUT_TEXT = "persuasion"  # never used to build an index (data.DEFAULT_CALIBRATION_TEXTS)


def _flashhead_configs(head, index, st: Settings) -> tuple[list[HeadConfig], dict]:
    """FlashHead at each stage 1 at the default probe count, the default stage 1 at other probe
    counts, and the full-width ``forward`` + argmax that ``generate()`` calls; also the heads by name."""
    from ..head import FlashHead, stage1_nbytes

    cfg = index.config
    K, cap, d, V = cfg.num_clusters, cfg.cluster_size, cfg.hidden_size, cfg.vocab_size
    p0, s0, n_always = cfg.n_probes, cfg.stage1, len(cfg.always_ids)
    configs: list[HeadConfig] = []
    heads: dict = {}
    variants = [(s, p0) for s in st.stage1_modes]
    for f in st.probe_factors:
        p = max(1, min(K, int(round(p0 * f))))
        if (s0, p) not in variants:
            variants.append((s0, p))
    for s, p in variants:
        fh = FlashHead(head.rows, head.slot_token, index.centroids, out_features=V, n_probes=p,
                       always_ids=head.always_ids, stage1=s, row_scales=head.row_scales)  # Q8_0 rows: their scales
        name = f"flashhead-{s}" + ("" if p == p0 else f"-p{p}")
        heads[name] = fh
        fixed = stage1_nbytes(K, d, s)  # centroids: read once per step, shared by the batch
        configs.append(HeadConfig(name, "flashhead", fh.greedy, fixed, fh.nbytes_per_step(p) - fixed,
                                  K + p * cap + n_always, {"stage1": s, "n_probes": p}))
    fh0 = heads[f"flashhead-{s0}"]
    fixed0 = stage1_nbytes(K, d, s0)

    def fwd_argmax(h, fh=fh0):
        return fh(h).argmax(-1)

    configs.append(HeadConfig(f"flashhead-{s0}-forward", "flashhead", fwd_argmax, fixed0,
                              fh0.nbytes_per_step() - fixed0 + V * 4, K + p0 * cap + n_always,
                              {"stage1": s0, "n_probes": p0, "path": "forward (full-width -inf logits) + argmax"}))
    return configs, heads


def _agreement(configs: list[HeadConfig], heads: dict, states: torch.Tensor, ref: torch.Tensor, cap: int) -> None:
    """Each configuration's agreement with the dense fp32 argmax ``ref`` on the whole pool, and its
    top-1 containment (FlashHead: the dense token's cluster probed; peers score exactly: = agreement)."""
    import numpy as np

    with torch.inference_mode():
        for c in configs:
            pred = torch.cat([torch.as_tensor(np.asarray(c.fn(states[i:i + 64]))).long()
                              for i in range(0, len(states), 64)])
            c.info["agreement"] = float((pred == ref).float().mean())
            if c.kind == "flashhead" and "path" not in c.info:
                fh = heads[c.name]
                cl = fh.select_clusters(states)
                tok_cluster = fh.token_slot[ref] // cap
                inside = (cl == tok_cluster[:, None]).any(1) | torch.isin(ref, fh.always_ids)
                c.info["containment"] = float(inside.float().mean())
            elif c.kind == "peer":
                c.info["containment"] = c.info["agreement"]  # exact scores: top-1 of candidates


def run_benchmark(model_ref: str, settings: Settings, *, quiet: bool = False, engine: str = "transformers") -> dict:
    """Everything in one run; returns the report (a JSON-able dict). ``engine`` runs the model level."""
    from ..data import load_text
    from ..integrations.transformers import apply, calibration_states, index_for, remove
    from ..models import head_weight, load_model

    st = settings
    model_level = model_level_of(engine)
    torch.set_num_threads(st.threads)
    busy = wait_for_quiet(st.wait_quiet, quiet=quiet) if st.wait_quiet > 0 else cpu_busy(0.5)
    t_start = time.perf_counter()
    report: dict = {"schema": SCHEMA, "model": model_ref, "quick": st.quick, "machine": machine_info(st.threads)}
    report["machine"]["cpu_busy_before_start"] = busy
    report["settings"] = {k: (list(v) if isinstance(v, tuple) else v) for k, v in st.__dict__.items()}

    sections: dict[str, float] = {}
    report["section_seconds"] = sections
    t_sec = time.perf_counter()

    def section(name: str) -> None:
        nonlocal t_sec
        now = time.perf_counter()
        sections[name] = round(now - t_sec, 2)
        t_sec = now

    log("measuring memory bandwidth", quiet)
    report["bandwidth"] = bw = measure_bandwidth(st.threads, repeats=3 if st.quick else 7)
    section("bandwidth")

    log(f"loading {model_ref} and its FlashHead index", quiet)
    model, tok = load_model(model_ref, verbose=not quiet)
    index = index_for(model_ref, model, tok, st.index, progress=not quiet)
    cfg = index.config
    K, cap, V = cfg.num_clusters, cfg.cluster_size, cfg.vocab_size
    p0, s0, n_always = cfg.n_probes, cfg.stage1, len(cfg.always_ids)
    weight = head_weight(model).detach()  # token order; kept alive for the dense baselines
    text = load_text(HELD_OUT_TEXT)
    log(f"{st.states} real hidden states from '{HELD_OUT_TEXT}'", quiet)
    states = calibration_states(model, tok, text, positions=st.states).contiguous()
    with torch.inference_mode():
        ref = torch.cat([F.linear(states[i:i + 128], weight).argmax(-1) for i in range(0, len(states), 128)])
    budget = K + p0 * cap + n_always  # rows FlashHead scores per query at its default
    report["index"] = {"K": K, "cap": cap, "d": cfg.hidden_size, "V": V, "num_tokens": cfg.num_tokens,
                       "n_probes": p0, "stage1": s0, "always_ids": n_always, "rows_per_query": budget,
                       "rows_share": budget / V,
                       "build_seconds": cfg.build.get("seconds_total") or
                       (cfg.build.get("seconds_map", 0) + cfg.build.get("seconds_cluster", 0))}
    section("load_model_index_states")

    with torch.inference_mode():
        configs = dense_configs(weight)
        head = apply(model, index)  # rows in the real (model-owned) cluster layout
        flash, heads = _flashhead_configs(head, index, st)
        configs += flash
    peer_meta = None
    if st.peers:
        peers, peer_meta = peer_configs(model_ref, weight, states, cfg, st, quiet)
        configs += peers
        section("peers_build_tune")

    log("agreement with the dense fp32 argmax", quiet)
    _agreement(configs, heads, states, ref, cap)
    section("agreement")

    report["head"] = time_head_level(configs, states, st.batches, st.repeats, st.warmup, bw["read_gbps"] * 1e9, quiet)
    report["machine"]["loadavg_after_head"] = loadavg()
    section("head_level")

    remove(model)
    del configs, flash, heads, head
    report["model_level"] = model_level(model_ref, st, index=index, text=text, quiet=quiet, model=model, tok=tok)
    report["machine"]["loadavg_after_model"] = loadavg()
    section("model_level")

    if st.memory:
        mem_cfgs = ["dense-fp32", "dense-bf16"] + [f"flashhead-{s}" for s in st.stage1_modes] + ["hnsw", "ivf"]
        if st.quick:
            mem_cfgs = ["dense-fp32", f"flashhead-{s0}"]
        log(f"peak memory: one fresh process per configuration ({', '.join(mem_cfgs)})", quiet)
        report["memory"] = measure_memory(model_ref, mem_cfgs, st.threads, peer_meta, st.index)
        section("memory")
    report["targets"] = evaluate_targets(report)
    report["machine"]["loadavg_end"] = loadavg()
    report["seconds"] = time.perf_counter() - t_start
    return report
