"""The greedy call over Q8_0 rows with an fp32 hidden state: every slot scored with fp32 h (as before
2026-12-01) against Q8_0 scoring plus exact rescoring of the slots within the margin (docs/kernels.md).

    python labs/q8_greedy_lab.py speed    # Gemma's greedy pieces at batch 1, 8 and 32, both ways, interleaved
    python labs/q8_greedy_lab.py margin   # how many slots get rescored, and how tight the margin is

speed: real hidden states of Persuasion, rows spread 64 positions apart (as unrelated requests of a
batch), 2 threads, median of 30 calls per piece, the pieces interleaved, 300 MiB read before
each call (as the model body evicts the head between two steps). margin: 1,024 positions each of two held-out novels at the index's default probes.
"""
import statistics
import sys
import time

import torch

from flashhead import _kernels
from flashhead.data import load_text
from flashhead.integrations.transformers import apply, index_for, text_states
from flashhead.models import load_model

MODEL = "gemma3-270m"


def _all_fp32(head, clusters: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    """Every slot's logit with fp32 h (the head's own stage 2), then the argmax, ties to the smallest id:
    the greedy call before."""
    ids, logits = head._candidates(h, clusters)
    return torch.where(logits == logits.amax(1, keepdim=True), ids, torch.iinfo(torch.int64).max).amin(1)


def speed(model, tok, head) -> None:
    states, _ = text_states(model, tok, load_text("persuasion"), 2048)
    flush = torch.empty(300 << 20, dtype=torch.uint8)
    args = lambda h, cl: (head.rows, head.row_scales, head.slot_token, cl, h, head._always_slot)  # noqa: E731
    print(f"{MODEL}: K={head.K}, p={head.n_probes}, stage 1 {head.stage1}; ms per call, median of 30")
    for n in (1, 8, 32):
        h = states[::64][:n].contiguous()
        cl = head._select(h, head.n_probes, ordered=False)[0]  # as the greedy call selects
        pieces = {
            "stage 1 + top-p": lambda: head._select(h, head.n_probes, ordered=False),
            "stage 2, all fp32 h": lambda: _all_fp32(head, cl, h),
            "stage 2, Q8_0 + rescoring": lambda: _kernels.q8_greedy(*args(h, cl), False, head._block_l1),
            "stage 2, Q8_0 h only": lambda: _kernels.q8_greedy(*args(h, cl), True, head._block_l1),
        }
        assert torch.equal(pieces["stage 2, all fp32 h"](), pieces["stage 2, Q8_0 + rescoring"]())
        times: dict[str, list[float]] = {k: [] for k in pieces}
        for _ in range(30):
            for name, fn in pieces.items():
                flush.max()  # read only: the model body reads weights, it writes little
                t = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - t)
        row = ", ".join(f"{k} {statistics.median(v) * 1e3:.2f}" for k, v in times.items())
        print(f"batch {n:2d} ({cl.unique().numel()} distinct clusters): {row}")


def margin(model, tok, head) -> None:
    rows, sc, slot = head.rows, head.row_scales, head.slot_token
    nb = head.d // 32
    l1 = (rows.view(head.K, head.cap, nb, 32).to(torch.int16).abs().sum(-1).float() * sc.float())  # per row
    for novel in ("persuasion", "emma"):
        h, _ = text_states(model, tok, load_text(novel), 1024)
        cl = head.select_clusters(h)
        exact = _kernels.q8_gather_gemv(rows, sc, cl, h)
        hq, hs = _kernels.q8_0_quantize(h)
        approx = _kernels.q8q8_gather_gemv(rows, sc, cl, hq, hs)
        e = (h - (hq.view(-1, nb, 32).float() * hs.unsqueeze(-1)).view_as(h)).abs().view(-1, nb, 32).amax(-1)
        half = (e @ head._block_l1)[:, None]  # the kernel's margin / 2, without the rounding slack
        ok = (slot[cl] >= 0).view(len(h), -1)
        err = (exact - approx).abs()[ok]
        own = (l1[cl] * e[:, None, None, :]).sum(-1).view(len(h), -1)  # the same bound with each row's own sums
        best = torch.where(ok, approx, float("-inf")).amax(1, keepdim=True)
        rescored = ((approx >= best - 2 * half) & ok).sum(1).float()
        flips = (torch.where(ok, approx, -1e30).argmax(1) != torch.where(ok, exact, -1e30).argmax(1)).float().mean()
        print(f"{novel}: |Q8_0 h - fp32 h| logit max {err.max():.3f}, at most {float((err / half.expand_as(exact)[ok]).max()):.0%} "
              f"of the margin / 2 (own-row bound: {float((err / own[ok]).max()):.0%}); slots rescored per row: mean "
              f"{rescored.mean():.1f}, p99 {rescored.quantile(0.99):.0f}, max {rescored.max():.0f} of {int(ok[0].sum())}; "
              f"Q8_0 h alone would change {flips:.2%} of the tokens")


if __name__ == "__main__":
    what = sys.argv[1] if len(sys.argv) > 1 else "speed"
    if what not in ("speed", "margin"):
        sys.exit("usage: python labs/q8_greedy_lab.py [speed|margin]")
    torch.set_num_threads(2)
    model, tok = load_model(MODEL, verbose=False)
    head = apply(model, index_for(MODEL, model, tok), stage2="q8_0")
    {"speed": speed, "margin": margin}[what](model, tok, head)
