"""How far llama.cpp's greedy tokens depend on the batch shape (docs/design.md, "Several sequences per llama.cpp
step"), on the prompts of labs/serve_bench.py:

    python labs/batch_invariance.py gemma3-270m [--tokens 64] [--slots 8]

1. prefill against decode: each prompt's batch-1 greedy run (dense head), teacher-forced in one prefill: the
   positions where the prefill's argmax is another token;
2. batched against batch-1: all prompts through one Batcher of ``--slots`` slots, per head, sharing each step
   and with ``invariant=True`` (each sequence in its own decode); each sequence's first token that differs from
   its batch-1 run, and the gap there (batch-1 scoring);
3. FlashHead against llama.cpp's head under the same (shared) batch schedule: sequences with identical tokens.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from serve_bench import PROMPTS  # noqa: E402

from flashhead.integrations.llamacpp import LlamaCpp  # noqa: E402
from flashhead.integrations.llamacpp_batch import Batcher  # noqa: E402


def gap(engine: LlamaCpp, prefix: list[int], a: int, b: int) -> float:
    """log p(a) - log p(b) after ``prefix``, from llama.cpp's dense head at batch 1."""
    la, lb = (float(engine.score(prefix + [t], len(prefix))[0][0]) for t in (a, b))
    return la - lb


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("model", nargs="?", default="gemma3-270m")
    p.add_argument("--tokens", type=int, default=64)
    p.add_argument("--slots", type=int, default=8)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    e = LlamaCpp(args.model, n_threads=args.threads, n_ctx=1024)
    prompts = [e.tokenize(t) for t in PROMPTS]

    flips, total = 0, 0
    for ids in prompts:
        toks = e.generate(ids, args.tokens, head="dense").token_ids[0]
        _, greedy = e.score(ids + toks, len(ids))
        flips, total = flips + int((~greedy).sum()), total + len(toks)
    print(f"1. prefill argmax != batch-1 decode's token at {flips}/{total} positions")

    batched = {}
    for head, invariant in (("flashhead", False), ("dense", False), ("flashhead", True), ("dense", True)):
        ref = [e.generate(ids, args.tokens, head=head).token_ids[0] for ids in prompts]
        b = Batcher(e, n_slots=args.slots, head=head, invariant=invariant)
        reqs = [b.submit(ids, args.tokens) for ids in prompts]
        b.run()
        b.close()
        if not invariant:
            batched[head] = [r.tokens for r in reqs]
        firsts = []
        for ids, got, want in zip(prompts, [r.tokens for r in reqs], ref):
            i = next((j for j, (x, y) in enumerate(zip(got, want)) if x != y), None)
            if i is not None:
                firsts.append(f"token {i} ({gap(e, ids + want[:i], got[i], want[i]):+.3f})")
        print(f"2. {head}{', invariant' if invariant else ''}: {len(firsts)}/{len(prompts)} batched sequences "
              f"differ from batch-1; first differences (gap, nats): {', '.join(firsts) or 'none'}")
    same = sum(a == b for a, b in zip(batched["flashhead"], batched["dense"]))
    print(f"3. same batch schedule: FlashHead's tokens equal llama.cpp's head's in {same}/{len(prompts)} sequences")
    e.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
