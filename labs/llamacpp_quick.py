"""Quick llama.cpp check (docs/benchmarks.md): llama.cpp dense, body only and body + FlashHead, 128 greedy
tokens from one held-out prompt, 3 interleaved rounds, n_threads = 2; median tok/s and the identical tokens.

    python labs/llamacpp_quick.py gemma3-270m
"""
import statistics, sys, time, torch
from flashhead.integrations.llamacpp import LlamaCpp
from flashhead.data import load_text
model = sys.argv[1]
torch.set_num_threads(2)
e = LlamaCpp(model, n_threads=2)
text = load_text("persuasion")[20000:20400]
ids = e.tokenize(text)[:48]
ref = e.generate(ids, 128, head="dense")
follow = ref.token_ids[0] + [ref.token_ids[0][-1]] * 128
res = {"dense": [], "body": [], "flashhead": []}
for r in range(3):
    for h in res:
        g = e.generate(ids, 128, head=h, follow=follow if h == "body" else None)
        res[h].append(g.new_tokens / g.seconds)
med = {h: statistics.median(v) for h, v in res.items()}
fl = e.generate(ids, 128, head="flashhead")
same = sum(a == b for a, b in zip(fl.token_ids[0], ref.token_ids[0]))
print(model, {h: round(v, 1) for h, v in med.items()}, "flash/dense %.2fx" % (med["flashhead"] / med["dense"]),
      "bound %.2fx" % (med["body"] / med["dense"]), "pct of bound %.0f%%" % (100 * (med["flashhead"] / med["dense"] - 1) / max(1e-9, med["body"] / med["dense"] - 1)),
      f"identical greedy prefix tokens {same}/{len(ref.token_ids[0])}", e.head_source)
