"""Lab (not part of the library): a low-rank stage 1 at a fixed byte budget.

    python benchmarks/lowrank_lab.py smollm2-135m --cluster-size 4 [--ranks 576 448 384 320 256 192]

Stage 1 reads K centroids; on SmolLM2 with clusters of 4 (K = 12,288, int4) that is a third of the
bytes of a step. The centroid scores ``h . c`` (c minus the centroids' mean, which is
scored exactly) are approximated at rank r with the smallest mean square error over the model's
hidden states: with ``S = E[h h^T]`` (calibration states), ``X = S^(1/2) C^T`` and ``P`` its top-r
left singular vectors, ``h . c ~= (P^T S^(-1/2) h) . (P^T S^(1/2) c)``. Stage 1 then reads an r-wide
int4 matrix (the library's int4 stage 1, ``FlashHead(stage1="int4")``) plus the d x r projection in
bf16, and the saved bytes buy probes. For each rank the lab prints the largest probe
count in the budget and the top-1 containment of the dense argmax on the four held-out novels.
States are cached under --cache.

Measured 2026-11-30 on dev-cpu, SmolLM2, clusters of 4, default calibration, all 10 k-means iterations
(the run predates ``balanced_kmeans(tol=...)``, so a rerun builds a slightly different index)
(containment %, [p needed for 99.9%], Emma / Persuasion / Mansfield Park / Northanger Abbey; 4 min):
  int4 full rank (library)  3.52%, p = 777: 99.93 [698] / 99.93 [712] / 100.00 [477] / 99.80 [1011]
  float full rank (for the ranks only):               [809] /       [761] /        [492] /       [1025]
  rotated, rank 576 int4    4.10%, p = 705: 99.85 [805] / 99.83 [827] / 99.88 [732] / 99.61 [1206]
  rank 384 int4             2.74%, p = 873: 99.85 [1062] / 99.76 [1141] / 99.93 [780] / 99.78 [1279]
  rank 256 int4             1.82%, p = 984: 99.80 [1643] / 99.73 [1823] / 99.85 [1059] / 99.80 [1664]
  rank 192 int4             1.37%, p = 1040: 99.80 [1982] / 99.68 [2014] / 99.85 [1183] / 99.68 [1598]
Not kept: the probes it buys do not make up for the ranking it loses (even rank 448 keeps 99.84% of
the energy), and int4 in the rotated basis ranks worse than in the original one. Smaller clusters
were the lever that worked (docs/fidelity.md).
"""

from __future__ import annotations

import argparse
import os

import torch

from flashhead.data import HELD_OUT_TEXTS, load_text
from flashhead.head import FlashHead, stage1_nbytes
from flashhead.integrations.transformers import build_for_model, calibration_sets, dense_logits, text_states
from flashhead.models import head_weight, load_model


def containment(scores: torch.Tensor, target: torch.Tensor, hit: torch.Tensor, p: int) -> float:
    rank = (scores > scores.gather(1, target.unsqueeze(1))).sum(1)
    return 100 * float(((rank < p) | hit).float().mean())


def needed(scores: torch.Tensor, target: torch.Tensor, hit: torch.Tensor, goal: float = 0.999) -> int:
    rank = (scores > scores.gather(1, target.unsqueeze(1))).sum(1)
    rank = rank[~hit].sort().values
    allowed = int((1 - goal) * len(target))
    return int(rank[len(rank) - allowed - 1]) + 1 if len(rank) > allowed else 1


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("model")
    ap.add_argument("--ranks", type=int, nargs="+", default=[576, 448, 384, 320, 256, 192])
    ap.add_argument("--budget", type=float, default=0.10)
    ap.add_argument("--cluster-size", type=int, default=None, help="default: the library's for the vocabulary")
    ap.add_argument("--cache", default="/tmp/lowrank_lab")
    a = ap.parse_args()
    torch.set_num_threads(2)
    os.makedirs(a.cache, exist_ok=True)
    path = os.path.join(a.cache, f"{a.model}-{a.cluster_size or 'default'}.pt")
    model, tok = load_model(a.model, verbose=False)
    w = head_weight(model).detach().float()
    V, d = w.shape
    with torch.inference_mode():
        if os.path.exists(path):
            blob = torch.load(path)
        else:
            cal = calibration_sets(model, tok)
            texts = {}
            for name in HELD_OUT_TEXTS:
                h = text_states(model, tok, load_text(name), 4096)[0]
                texts[name] = (h, torch.cat([dense_logits(model, h[i:i + 512]).argmax(-1) for i in range(0, len(h), 512)]))
            index = build_for_model(model, tok, cluster_size=a.cluster_size, hidden_states=cal, progress=False)
            blob = {"cal": cal, "texts": texts, "slots": index.slot_token, "centroids": index.centroids,
                    "always": index.config.always_ids, "p": index.config.n_probes}
            torch.save(blob, path)
        slots, cents = blob["slots"], blob["centroids"]
        k, cap = slots.shape
        always = torch.tensor(blob["always"], dtype=torch.long)
        cluster_of = torch.full((V,), -1, dtype=torch.long)
        cluster_of[slots[slots >= 0]] = torch.arange(k).unsqueeze(1).expand_as(slots)[slots >= 0]
        rows = w[slots.clamp_min(0)] * (slots >= 0).unsqueeze(-1)
        head = FlashHead(rows, slots, cents, out_features=V, n_probes=1, always_ids=always, stage1="int4")
        dense = V * d * 4
        stage2 = head.nbytes_per_step(1) - stage1_nbytes(k, d, "int4")  # one probe + always rows
        per_probe = cap * (d * 4 + 8)

        def probes(s1_bytes: int) -> int:
            return int((a.budget * dense - s1_bytes - (stage2 - per_probe)) // per_probe)

        h0 = blob["cal"][0]
        S = h0.T @ h0 / h0.shape[0]
        ev, U = torch.linalg.eigh(S.double())
        ev = ev.clamp_min(ev.max() * 1e-10)
        s_half, s_ihalf = (U * ev.sqrt()) @ U.T, (U / ev.sqrt()) @ U.T
        mean = cents.mean(0)
        X = s_half @ (cents - mean).double().T  # [d, K]
        P, sv, _ = torch.linalg.svd(X, full_matrices=False)
        energy = (sv ** 2).cumsum(0) / (sv ** 2).sum()
        print(f"{a.model}: K = {k}, clusters of {cap}, budget {a.budget:.0%} of {dense / 1e6:.1f} MB; "
              f"default index p = {blob['p']}; containment % on {' / '.join(HELD_OUT_TEXTS)}; "
              "p needed for 99.9% in brackets", flush=True)
        texts = {n: (h, t, torch.isin(t, always)) for n, (h, t) in blob["texts"].items()}

        def report(label: str, s1_bytes: int, score) -> None:
            p = probes(s1_bytes)
            cells = []
            for h, t, hit in texts.values():
                sc = score(h)
                cells.append(f"{containment(sc, cluster_of[t], hit, p):.2f} [{needed(sc, cluster_of[t], hit)}]")
            print(f"{label:34s} stage 1 {100 * s1_bytes / dense:5.2f}%  p = {p:4d}:  " + " / ".join(cells), flush=True)

        report("int4 full rank (library kernel)", stage1_nbytes(k, d, "int4"), lambda h: head.stage1_scores(h))
        report("float full rank", k * d * 4, lambda h: h @ cents.T)
        for r in a.ranks:
            pr = P[:, :r]
            A = (s_ihalf @ pr).float().to(torch.bfloat16).float()  # [d, r], bf16
            B = (pr.T @ X).float().T.contiguous()  # [K, r]
            # the library's int4 stage 1 over the r-wide matrix (its own rounding, bf16 activations)
            low = FlashHead(torch.zeros(k, 1, r), torch.arange(k).view(k, 1), B, out_features=k, n_probes=1,
                            stage1="int4")
            s1 = stage1_nbytes(k, r, "int4") + d * r * 2 + d * 4
            report(f"rank {r} int4 ({100 * energy[r - 1]:.2f}% energy)", s1,
                   lambda h: low.stage1_scores(h @ A) + (h @ mean).unsqueeze(1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
