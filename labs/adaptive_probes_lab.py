"""Lab (not part of the library): would a probe count that adapts per step beat a fixed one at the same bytes?

    python labs/adaptive_probes_lab.py gemma3-270m [--positions 2048] [--json out.json]

For every held-out text of labs/multilingual_lab.py (states cached there) and the model's default index, each
position's stage-1 scores (as applied: int8/int4) give the rank of the cluster that holds the dense argmax; a
position is contained at probe count p when that rank is below p (or the token is always scored), which is
greedy agreement up to exact ties. Rules, each tuned so that its mean probe count over all texts (equal weight
per text) equals the fixed default:

* ``fixed``: the default p at every step;
* ``margin``: every cluster whose score is within delta of the best (at least p_min, at most K);
* ``mass``: the fewest clusters, best first, whose estimated mass n_k exp(s_k) reaches a share q of the total;
* ``entropy-A``: p0' exp(A (H - mean H)), H the entropy of softmax(s) over clusters, p0' tuned (A = 0.5, 1, 2).

Prints per rule the agreement on every text and the mean p per text (the bytes follow p). docs/fidelity.md cites it.
"""

from __future__ import annotations

import argparse
import json

import torch

from flashhead._io import atomic_write_bytes
from flashhead.corpora import MULTILINGUAL_HELD_OUT
from flashhead.integrations.transformers import apply, flashhead_of, index_for, remove
from flashhead.models import load_model

from multilingual_lab import BASELINE_HELD_OUT, held_out_states


def position_stats(head, states: dict) -> dict:
    """Per position: the rank of the dense argmax's cluster among the stage-1 scores (-1 where the token is always
    scored), the scores sorted best first relative to the best, the estimated mass share of the best j clusters
    (sorted by mass) and the entropy of softmax(s) over clusters."""
    h, top = states["h"], states["top"]
    with torch.inference_mode():
        scores = torch.cat([head.stage1_scores(h[a:a + 256]) for a in range(0, len(h), 256)])
    own = head.token_slot[top] // head.cap
    rank = (scores > scores.gather(1, own[:, None])).sum(1).masked_fill(torch.isin(top, head.always_ids), -1)
    logp = scores.log_softmax(1)
    entropy = -(logp.exp() * logp).sum(1)
    gap = scores.sort(1, descending=True).values
    gap = gap[:, :1] - gap  # >= 0, ascending
    share = (scores + head._log_count).sort(1, descending=True).values.softmax(1).cumsum(1)
    return {"rank": rank, "gap": gap, "share": share, "entropy": entropy}


def probes(rule: str, st: dict, x: float, p_min: int, mean_h: float) -> torch.Tensor:
    """The probe count of every position under ``rule`` with parameter ``x``."""
    K = st["gap"].shape[1]
    if rule == "fixed":
        return torch.full_like(st["rank"], int(x))
    if rule == "margin":  # every cluster within x of the best
        p = torch.searchsorted(st["gap"], torch.full((len(st["gap"]), 1), x), right=True).squeeze(1)
    elif rule == "mass":  # the fewest clusters carrying a share x of the estimated mass
        p = torch.searchsorted(st["share"], torch.full((len(st["share"]), 1), x)).squeeze(1) + 1
    else:  # "entropy-A": x exp(A (H - mean H))
        a = float(rule.split("-", 1)[1])
        p = (x * torch.exp(a * (st["entropy"] - mean_h))).round().long()
    return p.clamp(min=p_min, max=K)


def tune(rule: str, target: float, lo: float, hi: float, stats: list[dict], p_min: int, mean_h: float) -> float:
    """The rule's parameter (monotone in the mean probe count) whose mean p over the texts is ``target``."""
    def mean_p(x: float) -> float:
        return sum(float(probes(rule, st, x, p_min, mean_h).float().mean()) for st in stats) / len(stats)
    for _ in range(40):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if mean_p(mid) < target else (lo, mid)
    return (lo + hi) / 2


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("model")
    ap.add_argument("--positions", type=int, default=2048)
    ap.add_argument("--probes", type=int, help="the fixed probe count to match (default: the index's)")
    ap.add_argument("--json")
    a = ap.parse_args()
    torch.set_num_threads(2)
    model, tok = load_model(a.model, verbose=False)
    names = [*MULTILINGUAL_HELD_OUT, *BASELINE_HELD_OUT]
    states = {n: held_out_states(model, tok, a.model, n, a.positions) for n in names}
    index = index_for(a.model, model, tok, progress=True)
    apply(model, index)
    head = flashhead_of(model)
    p0 = a.probes or head.n_probes
    stats = [position_stats(head, states[n]) for n in names]
    remove(model)
    mean_h = sum(float(st["entropy"].mean()) for st in stats) / len(stats)
    p_min = p0 // 4
    rules = {"fixed": None, "margin": (0.0, 50.0), "mass": (0.0, 1.0),
             **{f"entropy-{e}": (1.0, 4.0 * p0) for e in (0.5, 1.0, 2.0)}}
    report = {"model": a.model, "n_probes": p0, "p_min": p_min, "positions": a.positions, "rules": {}}
    for rule, bounds in rules.items():
        x = float(p0) if bounds is None else tune(rule, p0, *bounds, stats, p_min, mean_h)
        rows = {}
        for n, st in zip(names, stats):
            p = probes(rule, st, x, 1 if rule == "fixed" else p_min, mean_h)
            rows[n] = {"agreement": float((st["rank"] < p).float().mean()), "mean_p": float(p.float().mean())}
        report["rules"][rule] = {"param": x, "texts": rows}
        worst = min(rows, key=lambda n: rows[n]["agreement"])
        print(f"\n{rule} (param {x:.4g}): worst {worst} {100 * rows[worst]['agreement']:.2f}%", flush=True)
        for n, r in rows.items():
            print(f"  {n:24s} {100 * r['agreement']:6.2f}%  mean p {r['mean_p']:7.0f}", flush=True)
    if a.json:
        atomic_write_bytes(a.json, json.dumps(report, indent=1).encode())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
