"""The compiled int4 stage 1 and top-p selection against torch's int4 kernel and torch.topk (docs/kernels.md,
docs/fidelity.md).

    python labs/int4_kernel_lab.py speed        # SmolLM2's stage 1 alone: warm, and after reading 300 MiB
    python labs/int4_kernel_lab.py containment  # 4,096 positions of each held-out novel, several p

speed: median of 100 calls per row (batch 1 and 8, 2 threads, real hidden states). containment: the share of
positions whose dense argmax lies in a probed cluster (or is always scored), with the stage-1 scores of the
compiled kernel (h per group in int8), of torch's int4 kernel (bf16 h, bf16 scores) and of float centroids.
"""
import statistics
import sys
import time

import torch

from flashhead import _kernels
from flashhead.data import load_text
from flashhead.integrations.transformers import apply, dense_logits, index_for, remove, text_states
from flashhead.models import load_model

MODEL = "smollm2-135m"
NOVELS = ("persuasion", "emma", "mansfieldpark", "northangerabbey")
PROBES = (64, 128, 173, 256, 347, 512, 694, 2425)
COMPILED = _kernels.int4_scores


def _stage1(compiled: bool) -> None:
    _kernels.int4_scores = COMPILED if compiled else (lambda *a: None)


def speed(model, tok, index) -> None:
    head = apply(model, index)
    states, _ = text_states(model, tok, load_text("persuasion"), 64)
    flush = torch.ones(300 * 2**20 // 4)
    for n in (1, 8):
        h = states[:n].contiguous()
        for cold in (False, True):
            times: dict[str, list[float]] = {}
            for _ in range(100):
                for name in ("compiled int4", "torch int4", "top_unsorted", "torch.topk"):
                    if cold:
                        flush.sum()
                    t = time.perf_counter()
                    if name.endswith("int4"):
                        _stage1(name.startswith("compiled"))
                        s = head.stage1_scores(h)
                    elif name == "top_unsorted":
                        _kernels.top_unsorted(s, head.n_probes)
                    else:
                        torch.topk(s, head.n_probes, dim=1, sorted=False)
                    times.setdefault(name, []).append((time.perf_counter() - t) * 1e3)
            _stage1(True)
            print(f"batch {n}, {'after reading 300 MiB' if cold else 'warm'}: " +
                  ", ".join(f"{k} {statistics.median(v):.3f} ms" for k, v in times.items()), flush=True)
    remove(model)


def containment(model, tok, index) -> None:
    cluster_of = torch.full((index.config.vocab_size,), -1, dtype=torch.long)
    real = index.slot_token >= 0
    cluster_of[index.slot_token[real]] = torch.arange(index.num_clusters).unsqueeze(1).expand_as(real)[real]
    always = torch.tensor(index.config.always_ids)
    print("| text | stage 1 | " + " | ".join(f"p = {p}" for p in PROBES) + " |")
    for text in NOVELS:
        states, _ = text_states(model, tok, load_text(text), 4096)
        top = dense_logits(model, states).argmax(-1)
        for name, stage1, compiled in (("compiled int4", None, True), ("torch int4", None, False),
                                       ("float", "float", True)):
            _stage1(compiled)
            head = apply(model, index, stage1=stage1)
            s = torch.cat([head.stage1_scores(states[i:i + 512]) for i in range(0, len(states), 512)])
            remove(model)
            rank = (s > s.gather(1, cluster_of[top].unsqueeze(1))).sum(1)  # clusters above the argmax's
            cells = [f"{100 * ((rank < p) | torch.isin(top, always)).float().mean():.2f}" for p in PROBES]
            print(f"| {text} | {name} | " + " | ".join(cells) + " |", flush=True)
        _stage1(True)


if __name__ == "__main__":
    torch.set_num_threads(2)
    if not _kernels.build():
        sys.exit("the compiled kernel is not available here")
    model, tok = load_model(MODEL, verbose=False)
    index = index_for(MODEL, model, tok)
    {"speed": speed, "containment": containment}[sys.argv[1] if len(sys.argv) > 1 else "speed"](model, tok, index)
