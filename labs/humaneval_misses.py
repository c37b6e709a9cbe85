"""Why a FlashHead completion differs from dense on HumanEval (docs/fidelity.md, "Task accuracy").

    python labs/humaneval_misses.py REPORT.json [--head 1]

REPORT is `flashhead eval-task humaneval MODEL --engine llama.cpp --out REPORT.json`. For each problem whose
completion differs, the prompt and the dense completion up to the first differing token are teacher-forced
through llama.cpp: was the dense token inside FlashHead's probed clusters (a near tie) or outside (a
retrieval miss), and by how much did llama.cpp's own logits prefer it?
"""

from __future__ import annotations

import argparse
import json

import numpy as np
import torch

from flashhead import humaneval
from flashhead.integrations.llamacpp import LlamaCpp


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("report")
    p.add_argument("--head", type=int, default=1, help="which FlashHead setting of the report (1 = its first)")
    args = p.parse_args()
    r = json.load(open(args.report))
    if r["engine"] != "llama.cpp":
        raise SystemExit("this lab reads llama.cpp reports")
    dense, fh = r["heads"][0], r["heads"][args.head]
    items = humaneval.problems()
    engine = LlamaCpp(r["model"], n_threads=2, n_probes=fh["n_probes"])
    head, ctx = engine.head, engine._context("dense")
    members = head.slot_token.reshape(head.K, -1)
    for i, (a, b) in enumerate(zip(dense["token_ids"], fh["token_ids"])):
        if a == b:
            continue
        k = next(j for j in range(min(len(a), len(b))) if a[j] != b[j])
        ids = engine.tokenize(items[i]["prompt"]) + a[:k]
        h = engine.hidden_states(ids)[-1:]
        probed = set(members[head.select_clusters(h)[0]].reshape(-1).tolist())
        engine._prefill(ctx, ids, outputs="last")
        logits = torch.from_numpy(np.ctypeslib.as_array(engine.ll.llama_get_logits_ith(ctx, -1),
                                                        (engine.n_vocab,)).copy())
        kind = "near tie (dense token probed)" if a[k] in probed else "retrieval miss"
        print(f"HumanEval/{i} token {k}: dense {engine.piece(a[k])!r} vs FlashHead {engine.piece(b[k])!r}, "
              f"logit gap {float(logits[a[k]] - logits[b[k]]):.2f}: {kind}")


if __name__ == "__main__":
    main()
