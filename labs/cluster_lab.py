"""Lab for flashhead.cluster: measure balanced k-means time, memory and containment.

Not part of the library. Two steps:

    python labs/cluster_lab.py prep smollm2-135m    # hidden states -> the cache (labs/)
    python labs/cluster_lab.py prep gemma3-270m
    python labs/cluster_lab.py eval smollm2-135m [--iters 10] [--threads 2] [--opt relax=1.0]
    python labs/cluster_lab.py greedy smollm2-135m --iters 8   # the earlier greedy method

``prep`` loads the built-in model, computes final hidden states (the head's input) on Pride and
Prejudice (calibration, S = E[h h^T]) and on Emma (held out), and saves them with the head matrix
as safetensors under the cache (``<cache>/labs``). ``eval`` maps the head rows into the S^(1/2)
geometry, runs ``balanced_kmeans`` with K clusters of 16 rows (the table of ``flashhead/cluster.py``)
and reports wall time, peak RSS growth and top-1 containment of the dense argmax in the top-p
clusters.
"""
from __future__ import annotations

import argparse
import os
import threading
import time
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save

from flashhead._io import atomic_write_bytes, cache_dir

MODELS = {"smollm2-135m": 3072, "gemma3-270m": 16384}  # K: clusters of 16 rows


def _states_file(name: str) -> Path:
    return cache_dir() / "labs" / f"cluster_lab-{name}.safetensors"


def prep(name: str) -> None:
    from flashhead.data import load_text
    from flashhead.integrations.transformers import calibration_states
    from flashhead.models import head_weight, load_model

    t0 = time.time()
    model, tok = load_model(name)
    hcal = calibration_states(model, tok, load_text("prideprejudice"), 8192)
    hval = calibration_states(model, tok, load_text("emma"), 4096)
    w = head_weight(model).detach().float().contiguous()
    path = _states_file(name)
    atomic_write_bytes(path, save({"w": w, "hcal": hcal.contiguous(), "hval": hval.contiguous()}))
    print(f"saved {path}: W {tuple(w.shape)} hcal {tuple(hcal.shape)} hval {tuple(hval.shape)} "
          f"in {time.time() - t0:.0f}s")


def _load(name: str) -> dict[str, torch.Tensor]:
    path = _states_file(name)
    if not path.is_file():
        raise SystemExit(f"no states for {name} at {path}: run `python labs/cluster_lab.py prep {name}` first")
    return load_file(str(path))


def sqrt_psd(s: torch.Tensor) -> torch.Tensor:
    e, q = torch.linalg.eigh(s.double())
    return ((q * e.clamp_min(0).sqrt()) @ q.T).float()


def rss_mb() -> float:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


class PeakRSS:
    """Samples RSS every 20 ms in a thread; reports the peak growth over the start value."""

    def __enter__(self):
        self.base = self.peak = rss_mb()
        self.stop = False
        self.t = threading.Thread(target=self._run, daemon=True)
        self.t.start()
        return self

    def _run(self):
        while not self.stop:
            self.peak = max(self.peak, rss_mb())
            time.sleep(0.02)

    def __exit__(self, *a):
        self.stop = True
        self.t.join()
        self.extra = self.peak - self.base


def containment(w, centroids_w, slots, hval, ps, chunk=512):
    """Fraction of held-out positions whose dense argmax token is in the top-p clusters."""
    n = w.shape[0]
    cl = torch.empty(n, dtype=torch.long)
    real = slots >= 0
    cl[slots[real]] = torch.arange(slots.shape[0]).unsqueeze(1).expand_as(slots)[real]
    ranks = []
    for i in range(0, hval.shape[0], chunk):
        h = hval[i:i + chunk]
        top = (h @ w.T).argmax(1)
        sc = h @ centroids_w.T
        mine = sc.gather(1, cl[top].unsqueeze(1))
        ranks.append((sc > mine).sum(1))  # rank of the argmax token's cluster (0 = best)
    ranks = torch.cat(ranks)
    return {p: (ranks < p).float().mean().item() for p in ps}


def evaluate(name, iters, threads, seed, extra):
    torch.set_num_threads(threads)
    from flashhead.cluster import _balanced_kmeans as balanced_kmeans
    data = _load(name)
    w, hcal, hval = data["w"], data["hcal"], data["hval"]
    k = MODELS[name]
    s = hcal.T @ hcal / hcal.shape[0]
    r = sqrt_psd(s)
    x = (w @ r).contiguous()  # rows r^T w_i = S^(1/2) w_i (S symmetric)
    cap = -(-x.shape[0] // k)
    with PeakRSS() as mem:
        t0, c0 = time.time(), time.process_time()
        stats = []
        res = balanced_kmeans(x, k, cap, iters=iters, seed=seed, progress=False, stats=stats, **extra)
        dt, cpu = time.time() - t0, time.process_time() - c0
    # centroids in w space: mean of member rows
    real = res.slots >= 0
    rows = w[res.slots.clamp_min(0)] * real.unsqueeze(-1)
    cw = rows.sum(1) / real.sum(1, keepdim=True)
    cont = containment(w, cw, res.slots, hval, [32, 64, 128, 256, 512, 1024])
    print(f"{name}: n={x.shape[0]} d={x.shape[1]} K={k} cap={cap} iters={iters} threads={threads}")
    print(f"  wall {dt:.1f}s  cpu {cpu:.1f}s  peak extra RSS {mem.extra:.0f} MB  objective {res.objective:.5g}")
    print("  history " + " ".join(f"{v:.5g}" for v in res.history))
    print(f"  start {stats[0]['t_start']:.2f}s, inside the call {stats[-1]['t_total']:.1f}s")
    its = stats[1:-1]
    for key in ("t_cost", "t_auction", "t_rest"):
        print(f"  {key} " + " ".join(f"{s_[key]:.2f}" for s_ in its))
    print("  rounds " + " ".join(str(s_['rounds']) for s_ in its))
    print("  containment " + "  ".join(f"p={p}: {100 * c:.2f}%" for p, c in cont.items()))
    return res, cont


def greedy_baseline(name, iters=8, m=32, seed=0, threads=2):
    """Flat balanced k-means with a greedy capacity-constrained assignment (the earlier
    throw-away method): each row's ``m`` nearest centroids, all (row, centroid) pairs in
    order of distance, fill; rows whose candidates are all full take the nearest centroid
    with room.  Needs the full n x K distances: only practical for SmolLM2."""
    torch.set_num_threads(threads)
    data = _load(name)
    w, hcal, hval = data["w"], data["hcal"], data["hval"]
    x = (w @ sqrt_psd(hcal.T @ hcal / hcal.shape[0])).contiguous()
    n, d = x.shape
    k = MODELS[name]
    cap = n // k
    g = torch.Generator().manual_seed(seed)
    cents = x[torch.randperm(n, generator=g)[:k]].clone()
    xsq = x.pow(2).sum(1)
    t0 = time.time()
    for it in range(iters):
        csq = cents.pow(2).sum(1)
        vals, idx = [], []
        for a in range(0, n, 8192):
            dd = torch.addmm(csq, x[a:a + 8192], cents.T, alpha=-2) + xsq[a:a + 8192, None]
            v, i = dd.topk(m, dim=1, largest=False)
            vals.append(v)
            idx.append(i)
        v, i = torch.cat(vals).numpy(), torch.cat(idx).numpy()
        o = np.argsort(v.ravel(), kind="stable")
        owner, fill = np.full(n, -1), np.zeros(k, int)
        for p, c in zip((o // m).tolist(), i.ravel()[o].tolist()):
            if owner[p] < 0 and fill[c] < cap:
                owner[p] = c
                fill[c] += 1
        for p in np.nonzero(owner < 0)[0]:
            dd = ((cents - x[p]) ** 2).sum(1).numpy()
            dd[fill >= cap] = np.inf
            c = int(dd.argmin())
            owner[p] = c
            fill[c] += 1
        owner = torch.from_numpy(owner)
        cents = torch.zeros(k, d).index_add_(0, owner, x) / cap
        obj = ((x - cents[owner]) ** 2).sum(1).mean().item()
        print(f"  iter {it}: objective {obj:.4f} ({time.time() - t0:.0f}s)", flush=True)
    slots = torch.argsort(owner, stable=True).view(k, cap)
    cont = containment(w, w[slots].mean(1), slots, hval, [32, 64, 128, 256, 512, 1024])
    print("  containment " + "  ".join(f"p={p}: {100 * c:.2f}%" for p, c in cont.items()))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("cmd", choices=["prep", "eval", "greedy"])
    ap.add_argument("model", choices=list(MODELS))
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--opt", action="append", default=[], help="extra kwarg key=value (lab only)")
    a = ap.parse_args()
    if a.cmd == "prep":
        prep(a.model)
    elif a.cmd == "greedy":
        greedy_baseline(a.model, iters=a.iters, seed=a.seed, threads=a.threads)
    else:
        extra = {}
        for kv in a.opt:
            k, v = kv.split("=")
            extra[k] = type(eval(v))(eval(v))
        evaluate(a.model, a.iters, a.threads, a.seed, extra)


if __name__ == "__main__":
    main()
