"""FlashHead against the dense head on a GPU, in one run: head alone and whole-model decode (issue #25).

    PYTHONPATH=. python3 labs/gpu_bench.py OUT_DIR                     # on a CUDA machine, nothing installed
    python labs/gpu_bench.py OUT_DIR --device cpu --tiny --batches 1,2  # the CI smoke run (tests/test_gpu_bench.py)

It needs torch, transformers (5.17 or later) and, for the Triton backend, triton; on one H200 it is planned to
take well under the 6 minutes it must fit in (not yet run on a GPU).

For each model shape (Llama-3.2-1B, Qwen3-0.6B, Gemma-3-1B, Gemma-3-270M, built from their configs with random
bf16 weights) and batch 1, 8 and 32 it measures:

* head level: cuBLAS's dense head (``F.linear`` + ``argmax``) against FlashHead's greedy step
  (:class:`flashhead.kernels.KernelHead`: stage 1 with bf16 or int8 centroids, top p, fused stage 2 + argmax);
* whole model: decode steps with a static cache (one token per sequence at position ``--context // 2``):
  body alone (no head: the Amdahl bound), body + dense head + argmax, body + FlashHead;
* a check: FlashHead's tokens from the Triton backend equal the torch reference's on the same device.

Timing: each step is captured in a CUDA graph and replayed, timed with CUDA events, median of 5 runs of ~25 ms;
a step that cannot be captured is timed eagerly and the table says why. On CPU: eager steps, wall clock.

Random weights show speed only: what the model computes is noise, so greedy tokens say nothing of fidelity, which
does not depend on the device and is measured on CPU with real models (docs/fidelity.md). The index is a random
balanced assignment (every cluster ``cap`` = 16 random tokens, centroid = their mean), not
``flashhead.index.build_index``: for random rows no clustering is better than another, the cost of a step depends
only on the shapes (K, cap, p, d), and a real build of 262,144 rows would take minutes of the run's six.
Probes: p = 256 for Llama-3.2-1B (the paper's), K / 16 elsewhere (the vendor plugin's default).

Writes ``OUT_DIR/gpu_bench.json`` and ``OUT_DIR/gpu_bench.md`` after every shape, so a run cut short keeps what it
measured.
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import platform
import statistics
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

from flashhead.head import FlashHead
from flashhead.kernels import KernelHead, backend

CAP = 16
REPEATS = 5
RUN_S = 0.025  # each timed run replays the step for about this long
NOTE = ("Random bf16 weights: these tables show speed only. Fidelity does not depend on the device; it is measured "
        "on CPU with real models (docs/fidelity.md).")

# name: (transformers config class, model class, V, d, layers, heads, kv heads, head dim, ffn, extra config)
SHAPES = {
    "llama-3.2-1b": ("LlamaConfig", "LlamaForCausalLM", 128256, 2048, 16, 32, 8, 64, 8192, {}),
    "qwen3-0.6b": ("Qwen3Config", "Qwen3ForCausalLM", 151936, 1024, 28, 16, 8, 128, 3072, {}),
    "gemma-3-1b": ("Gemma3TextConfig", "Gemma3ForCausalLM", 262144, 1152, 26, 4, 1, 256, 6912,
                   {"sliding_window": 512}),
    "gemma-3-270m": ("Gemma3TextConfig", "Gemma3ForCausalLM", 262144, 640, 18, 4, 1, 256, 2048,
                     {"sliding_window": 512}),
}
PAPER_PROBES = {"llama-3.2-1b": 256}


def build_model(name: str, tiny: bool, device: torch.device) -> torch.nn.Module:
    """A randomly initialised bf16 model of ``name``'s shape (``tiny``: the same architecture, a few MB)."""
    import transformers

    cfg_cls, model_cls, V, d, layers, heads, kv, head_dim, ffn, extra = SHAPES[name]
    if tiny:
        V, d, layers, heads, kv, head_dim, ffn = 4096, 64, 2, 2, 1, 32, 128
    cfg = getattr(transformers, cfg_cls)(vocab_size=V, hidden_size=d, num_hidden_layers=layers,
                                         num_attention_heads=heads, num_key_value_heads=kv, head_dim=head_dim,
                                         intermediate_size=ffn, tie_word_embeddings=True, **extra)
    torch.manual_seed(0)
    with torch.device(device):
        model = getattr(transformers, model_cls)._from_config(cfg, dtype=torch.bfloat16,
                                                              attn_implementation="sdpa")
    return model.eval()


def random_index(weight: torch.Tensor, probes: int, stage1: str) -> KernelHead:
    """FlashHead over ``weight [V, d]`` with a random balanced assignment (see the module docstring)."""
    V, d = weight.shape
    perm = torch.randperm(V, generator=torch.Generator().manual_seed(0)).to(weight.device)
    rows = weight[perm].view(V // CAP, CAP, d)
    slot = perm.view(V // CAP, CAP)
    head = FlashHead(rows, slot, rows.float().mean(1), out_features=V, n_probes=probes,
                     always_ids=torch.tensor([0, 1]), stage1="int8" if stage1 == "int8" else "float")
    return KernelHead.from_flashhead(head, torch.bfloat16 if stage1 == "bf16" else None)


def _capture(step: Callable[[], object]) -> tuple[Callable[[], object], str]:
    """(what to time, how it runs): the step captured in a CUDA graph, or itself when capture fails."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up off the default stream, as capture wants it
        for _ in range(3):
            step()
    torch.cuda.current_stream().wait_stream(side)
    try:
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            step()
        return graph.replay, "CUDA graph"
    except Exception as e:  # noqa: BLE001 - which op broke the capture is the result
        torch.cuda.synchronize()
        return step, f"eager: capture failed ({type(e).__name__}: {str(e).splitlines()[0][:160]})"


def measure(step: Callable[[], object], device: torch.device) -> tuple[float, str]:
    """(median seconds per step over runs of ~RUN_S, how it ran): on CUDA a replayed graph timed by CUDA events."""
    if device.type == "cuda":
        run, how = _capture(step)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    else:
        run, how = step, "eager (cpu)"
        run()

    def timed(n: int) -> float:
        if device.type != "cuda":
            t = time.perf_counter()
            for _ in range(n):
                run()
            return (time.perf_counter() - t) / n
        start.record()
        for _ in range(n):
            run()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3 / n

    n = max(1 if device.type != "cuda" else 10, min(2000, int(RUN_S / max(timed(1), 1e-7))))
    return statistics.median(timed(n) for _ in range(REPEATS)), how


def _with_backend(name: str, fn: Callable[[], torch.Tensor]) -> torch.Tensor:
    old = os.environ.get(backend.ENV)
    os.environ[backend.ENV] = name
    try:
        return fn()
    finally:
        if old is None:
            del os.environ[backend.ENV]
        else:
            os.environ[backend.ENV] = old


@torch.inference_mode()
def bench_shape(name: str, args: argparse.Namespace, device: torch.device) -> dict:
    """Head-level, model-level and check rows of one shape."""
    model = build_model(name, args.tiny, device)
    W = model.get_output_embeddings().weight.detach()
    V, d = W.shape
    K = V // CAP
    probes = PAPER_PROBES.get(name, K // 16) if not args.tiny else K // 16
    heads = {s: random_index(W, probes, s) for s in ("bf16", "int8")}
    out = {"shape": name, "V": V, "d": d, "K": K, "cap": CAP, "probes": probes, "head": [], "model": [], "check": []}
    g = torch.Generator().manual_seed(1)
    for B in args.batches:
        h = torch.randn(B, d, generator=g).to(device=device, dtype=torch.bfloat16)
        dense_s, how = measure(lambda: F.linear(h, W).argmax(-1), device)
        row = {"batch": B, "dense_us": dense_s * 1e6, "dense_run": how}
        for s, kh in heads.items():
            t, how = measure(lambda kh=kh: kh.greedy(h), device)
            row[f"flashhead_{s}_us"], row[f"flashhead_{s}_run"] = t * 1e6, how
        out["head"].append(row)
        kh = heads["bf16"]
        same = torch.equal(kh.greedy(h), _with_backend("reference", lambda: kh.greedy(h)))
        out["check"].append({"batch": B, "backend": backend.backend_for(device).name, "tokens_equal_reference": same})
    for B in args.batches:
        out["model"].append(bench_decode(model, heads["bf16"], B, args.context, device))
    del model, heads
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return out


def _rewind(cache, position: int) -> None:
    """Puts every layer of a static cache back at ``position``: a replayed graph advances the write index too, so
    each step starts by resetting it and writes the same slot (transformers 5.x keeps it in ``cumulative_length``,
    and a sliding layer's branch in a Python int beside it)."""
    for layer in cache.layers:
        if isinstance(getattr(layer, "cumulative_length", None), torch.Tensor):
            layer.cumulative_length.fill_(position)
        if hasattr(layer, "cumulative_length_int"):
            layer.cumulative_length_int = position


def decode_body(model: torch.nn.Module, B: int, context: int, device: torch.device) -> Callable[[], torch.Tensor]:
    """One decode step of the body with a static cache: the final hidden states ``[B, d]`` of one token per sequence
    at position ``context // 2``, the same slot at every call."""
    from transformers import StaticCache

    cache = StaticCache(config=model.config, max_cache_len=context)
    # the cache's keyword: ``cache`` from transformers 5.2x, ``past_key_values`` before (the GPU machine's 5.17)
    cache_kw = "cache" if "cache" in inspect.signature(model.model.forward).parameters else "past_key_values"
    ids = torch.zeros(B, 1, dtype=torch.int64, device=device)
    pos = torch.full((B, 1), context // 2, dtype=torch.int64, device=device)

    def body() -> torch.Tensor:
        _rewind(cache, context // 2)
        return model.model(input_ids=ids, position_ids=pos, use_cache=True, **{cache_kw: cache}).last_hidden_state[:, -1]

    return body


def bench_decode(model: torch.nn.Module, kh: KernelHead, B: int, context: int, device: torch.device) -> dict:
    """Decode-step times of the body alone, body + dense head, body + FlashHead."""
    body = decode_body(model, B, context, device)
    row = {"batch": B}
    for part, step in (("body", body), ("dense", lambda: model.lm_head(body()).argmax(-1)),
                       ("flashhead", lambda: kh.greedy(body()))):
        t, how = measure(step, device)
        row[f"{part}_tok_s"], row[f"{part}_run"] = B / t, how
    row["flashhead_over_dense"] = row["flashhead_tok_s"] / row["dense_tok_s"]
    row["flashhead_of_bound"] = row["flashhead_tok_s"] / row["body_tok_s"]
    return row


def markdown(report: dict) -> str:
    """The report's tables."""
    m = report["meta"]
    lines = [f"# GPU benchmark: {m['device']}", "", NOTE, "",
             f"{m['date']}; torch {m['torch']}, triton {m['triton']}; command: `{m['command']}`.", "",
             "## Head level (us per greedy call; speed-up = dense / FlashHead)", "",
             "| shape | p | batch | dense | FlashHead bf16 stage 1 | speed-up | FlashHead int8 stage 1 | speed-up | "
             "Triton = reference tokens |", "|---|---:|---:|---:|---:|---:|---:|---:|---|"]
    runs = set()
    for s in report["shapes"]:
        for r, c in zip(s["head"], s["check"]):
            lines.append(f"| {s['shape']} | {s['probes']} | {r['batch']} | {r['dense_us']:.1f} | "
                         f"{r['flashhead_bf16_us']:.1f} | {r['dense_us'] / r['flashhead_bf16_us']:.2f}x | "
                         f"{r['flashhead_int8_us']:.1f} | {r['dense_us'] / r['flashhead_int8_us']:.2f}x | "
                         f"{'yes' if c['tokens_equal_reference'] else 'NO'} ({c['backend']}) |")
            runs |= {r["dense_run"], r["flashhead_bf16_run"], r["flashhead_int8_run"]}
    lines += ["", "## Whole model (decode tokens/s, static cache; bound = body alone, no head)", "",
              "| shape | batch | body alone | dense | FlashHead | FlashHead / dense | FlashHead / bound |",
              "|---|---:|---:|---:|---:|---:|---:|"]
    for s in report["shapes"]:
        for r in s["model"]:
            lines.append(f"| {s['shape']} | {r['batch']} | {r['body_tok_s']:.0f} | {r['dense_tok_s']:.0f} | "
                         f"{r['flashhead_tok_s']:.0f} | {r['flashhead_over_dense']:.2f}x | "
                         f"{r['flashhead_of_bound']:.1%} |")
            runs |= {r["body_run"], r["dense_run"], r["flashhead_run"]}
    lines += ["", "How the steps ran: " + "; ".join(sorted(runs)) + "."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("out", type=Path, help="folder for gpu_bench.json and gpu_bench.md")
    ap.add_argument("--device", default="cuda", help="cuda (default) or cpu")
    ap.add_argument("--shapes", default=",".join(SHAPES), help="comma-separated, from: " + ", ".join(SHAPES))
    ap.add_argument("--batches", default="1,8,32", help="comma-separated batch sizes")
    ap.add_argument("--context", type=int, default=512, help="static cache length; decode at half of it")
    ap.add_argument("--tiny", action="store_true", help="tiny models of the same architectures (CI on CPU)")
    args = ap.parse_args(argv)
    args.batches = [int(b) for b in args.batches.split(",")]
    shapes = args.shapes.split(",")
    if unknown := [s for s in shapes if s not in SHAPES]:
        ap.error(f"unknown shape(s) {unknown}; choose from {list(SHAPES)}")
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda but torch sees no CUDA device; use --device cpu --tiny for a smoke run")
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = "not installed"
    if device.type == "cpu":
        torch.set_num_threads(1)  # a smoke run: one thread never waits for a descheduled one on a busy machine
    args.out.mkdir(parents=True, exist_ok=True)
    report = {"meta": {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor()
                       or "cpu", "torch": torch.__version__, "triton": triton_version, "note": NOTE,
                       "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
                       "command": " ".join(["python", "labs/gpu_bench.py", *(argv or sys.argv[1:])])}, "shapes": []}
    for name in shapes:
        t = time.perf_counter()
        report["shapes"].append(bench_shape(name, args, device))
        (args.out / "gpu_bench.json").write_text(json.dumps(report, indent=1))
        (args.out / "gpu_bench.md").write_text(markdown(report))
        print(f"{name}: {time.perf_counter() - t:.0f} s", flush=True)
    print(markdown(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
