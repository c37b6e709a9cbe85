"""Lab (not part of the library): how many probed clusters do the rows of one decode batch share?

    python benchmarks/batch_overlap_lab.py gemma3-270m [--batch 8] [--probes 559 1118]

Stage 2 reads every row's p clusters separately, so at batch B it reads B * p clusters. A stage 2 that
read each probed cluster once per batch would read only the union. Prints union / (B * p) over 50
batches of real hidden states (Persuasion), drawn at random positions and as consecutive positions.

Measured 2026-11-28, Gemma-3-270M default index, B = 8: 0.39 (random) / 0.37 (consecutive) at
p = 559, 0.33 / 0.33 at p = 1,118. Hence the stage-2 kernel (``flashhead/_kernels.py``) visits a
batch's probes in cluster order, reading each shared cluster from memory once.
"""

from __future__ import annotations

import argparse

import torch

from flashhead.data import load_text
from flashhead.integrations.transformers import apply, index_for, text_states
from flashhead.models import load_model


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("model")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--probes", type=int, nargs="+", default=[559, 1118])
    a = ap.parse_args()
    torch.set_num_threads(2)
    model, tok = load_model(a.model, verbose=False)
    head = apply(model, index_for(a.model, model, tok, progress=False))
    h = text_states(model, tok, load_text("persuasion"), 4096)[0]
    g = torch.Generator().manual_seed(0)
    for p in a.probes:
        shares = {"random": [], "consecutive": []}
        for _ in range(50):
            picks = {"random": torch.randint(0, len(h), (a.batch,), generator=g),
                     "consecutive": torch.randint(0, len(h) - a.batch, (1,), generator=g) + torch.arange(a.batch)}
            for kind, rows in picks.items():
                sel = head.select_clusters(h[rows], p)
                shares[kind].append(sel.unique().numel() / sel.numel())
        print(f"p = {p}, batch {a.batch}: union / (B * p) = "
              + ", ".join(f"{sum(v) / len(v):.2f} ({k})" for k, v in shares.items()), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
