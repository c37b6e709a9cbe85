"""Peak and steady resident memory of each head configuration, one fresh process per configuration.

A fresh process per configuration, so that no configuration inherits another's peak; the weights
are copied into anonymous memory first, so that file-mapped pages do not blur the counts (Linux).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch

__all__ = ["rss_kb", "materialize", "reset_peak", "measure_memory", "memory_child"]


def rss_kb() -> dict:
    """Resident-memory counters of this process in kB (Linux /proc/self/status)."""
    out = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(("VmRSS:", "VmHWM:", "RssAnon:", "RssFile:")):
            out[line.split(":")[0]] = int(line.split()[1])
    return out


def materialize(model) -> None:
    """Copy every weight into anonymous memory, so that no tensor keeps the safetensors file mapped:
    otherwise pages of weights that a configuration drops (FlashHead re-lays the head out) stay
    counted in the RSS as long as the file mapping lives, and dense weights count as file pages."""
    import gc

    with torch.no_grad():
        for t in [*model.parameters(), *model.buffers()]:
            t.data = t.data.clone()
    gc.collect()


def reset_peak() -> bool:
    """Reset this process's peak RSS (VmHWM) to its current RSS; False where the kernel cannot."""
    try:  # Linux >= 4.0: "5" resets VmHWM to the current RSS
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def memory_child(model_ref: str, config: str, threads: int) -> dict:
    """Runs in a fresh process: load (weights copied into anonymous memory), reset the peak, set the
    head up, decode 16 tokens; report RSS figures (MB)."""
    torch.set_num_threads(threads)
    from ..decode import generate
    from ..integrations.transformers import apply, index_for
    from ..models import head_weight, load_model
    from .peers import build_hnsw, build_ivf, peer_dir

    base = rss_kb()["VmRSS"]
    dtype = torch.bfloat16 if config == "dense-bf16" else torch.float32
    model, tok = load_model(model_ref, dtype=dtype, verbose=False)
    materialize(model)
    loaded = rss_kb()["VmRSS"]
    peak_reset = reset_peak()
    keep = None  # peer index, alive until the end
    if config.startswith("flashhead-"):
        index = index_for(model_ref, model, tok, os.environ.get("FLASHHEAD_BENCH_INDEX"), progress=False)
        apply(model, index, stage1=config.split("-", 1)[1])
    elif config in ("hnsw", "ivf"):
        import numpy as np

        from ..index import fingerprint

        folder = peer_dir(model_ref, fingerprint(head_weight(model)))
        meta = json.loads(os.environ["FLASHHEAD_BENCH_PEER"])
        rows = np.ascontiguousarray(head_weight(model).detach().float().numpy()[: meta["n"]])
        if config == "hnsw":
            keep = build_hnsw(rows, folder, meta["M"], meta["efc"], threads, "ip")[0]
        else:
            keep = build_ivf(rows, folder, meta["nlist"], meta["niter"], threads)[0]
        del rows
    generate(model, tok, ["It is a truth universally acknowledged, that"], max_new_tokens=16)
    r = rss_kb()
    del keep
    mb = 1024.0
    return {"config": config, "rss_before_load_mb": base / mb, "rss_after_load_mb": loaded / mb,
            "peak_since": "after load" if peak_reset else "process start",
            "rss_steady_mb": r["VmRSS"] / mb, "rss_peak_mb": r["VmHWM"] / mb,
            "rss_anon_mb": r.get("RssAnon", 0) / mb, "rss_file_mb": r.get("RssFile", 0) / mb}


def measure_memory(model_ref: str, configs: list[str], threads: int, peer_meta: dict | None,
                   index: str | None = None) -> list[dict]:
    """Peak (VmHWM) and steady (VmRSS) resident memory of each configuration, one fresh process each
    (``index``: the FlashHead assets folder; None = the model's default index)."""
    out = []
    env = dict(os.environ)
    if index is not None:
        env["FLASHHEAD_BENCH_INDEX"] = str(index)
    if peer_meta:
        env["FLASHHEAD_BENCH_PEER"] = json.dumps(peer_meta)
    for cfg in configs:
        if cfg in ("hnsw", "ivf") and not peer_meta:
            continue
        cmd = [sys.executable, "-m", "flashhead.bench", "--memory-child", model_ref, cfg, str(threads)]
        p = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900)
        lines = [x for x in p.stdout.splitlines() if x.startswith("{")]
        if p.returncode != 0 or not lines:
            out.append({"config": cfg, "error": (p.stderr or p.stdout).strip().splitlines()[-1:] or ["failed"]})
            continue
        out.append(json.loads(lines[-1]))
    return out
