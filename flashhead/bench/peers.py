"""The contenders FlashHead is timed against: dense heads (fp32, bf16, int8) and two peer indexes.

The peers work on the same row budget as FlashHead: HNSW over the head rows (hnswlib, inner product,
or L2 on MIPS-augmented rows; ``ef`` tuned so that the distance computations per query match
FlashHead's scored rows) and IVF with ordinary unbalanced k-means (faiss ``IndexIVFFlat``, inner
product, ``nlist = K``; ``nprobe = p`` and ``nprobe`` matched to the row budget). Peer indexes are
built once per head and cached.
"""

from __future__ import annotations

import json
import os
import statistics
import time
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from .timing import HeadConfig, log

if TYPE_CHECKING:
    from ..index import IndexConfig
    from .settings import Settings

__all__ = ["dense_heads", "dense_configs", "peer_configs", "peer_dir", "mips_augment", "build_hnsw", "build_ivf",
           "HnswCounter", "tune_hnsw_ef", "tune_ivf_nprobe"]


def dense_heads(weight: torch.Tensor) -> dict:
    """Dense baselines: ``fn(h [B, d]) -> ids [B]`` and the bytes each reads per step."""
    W = weight.detach().float().contiguous()
    V, d = W.shape
    Wb = W.to(torch.bfloat16)
    s = (W.abs().amax(1).clamp_min(1e-30) / 127.0)
    Wq = torch.round(W / s[:, None]).clamp_(-127, 127).to(torch.int8).contiguous()
    s_bf = s.to(torch.bfloat16)

    def fp32(h):
        return F.linear(h, W).argmax(-1)

    def bf16(h):
        return F.linear(h.to(torch.bfloat16), Wb).argmax(-1)

    def int8_wo(h):  # weight-only int8; the kernel's fast path wants bf16 activations
        return torch._weight_int8pack_mm(h.to(torch.bfloat16), Wq, s_bf).argmax(-1)

    def int8_dyn(h):  # int8 weights and dynamically quantized int8 activations (W8A8), int32 accumulation
        a = h.abs().amax(1, keepdim=True).clamp_min(1e-30) / 127.0
        hq = torch.round(h / a).to(torch.int8)
        return torch._int_mm(hq, Wq.t()).float().mul_(s).argmax(-1)

    return {
        "dense-fp32": (fp32, V * d * 4, {"dtype": "float32"}),
        "dense-bf16": (bf16, V * d * 2, {"dtype": "bfloat16"}),
        "dense-int8wo": (int8_wo, V * d + V * 2, {"dtype": "int8 weight-only (bf16 act)"}),
        "dense-int8dyn": (int8_dyn, V * d + V * 4, {"dtype": "int8 W8A8 (dynamic act)"}),
    }


def dense_configs(weight: torch.Tensor) -> list[HeadConfig]:
    """The dense baselines as head-level configurations (every one scores all V rows)."""
    V = weight.shape[0]
    return [HeadConfig(name, "dense", fn, nbytes, 0, V, info)
            for name, (fn, nbytes, info) in dense_heads(weight).items()]


def peer_dir(model_ref: str, fingerprint: str) -> Path:
    """Cache folder of one head's peer indexes."""
    from .._io import cache_dir
    from ..integrations.transformers import default_index_dir

    return cache_dir() / "peers" / f"{default_index_dir(model_ref).name}-{fingerprint[:12]}"


def _atomic_save(path: Path, save) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    save(str(tmp))
    os.replace(tmp, path)


def mips_augment(rows_np):
    """The MIPS -> nearest-neighbour reduction: ``[w, sqrt(R^2 - |w|^2)]`` with ``R = max |w|``, so that
    the L2-nearest augmented row to ``[h, 0]`` is the row of largest inner product with ``h``."""
    import numpy as np

    sq = (rows_np.astype(np.float64) ** 2).sum(1)
    extra = np.sqrt(np.maximum(sq.max() - sq, 0.0)).astype(np.float32)
    return np.ascontiguousarray(np.concatenate([rows_np, extra[:, None]], 1))


def build_hnsw(rows_np, folder: Path, m: int, ef_construction: int, threads: int, space: str = "ip"):
    """hnswlib index over the head rows (``space`` "ip", or "l2" on MIPS-augmented rows), cached in ``folder``."""
    import hnswlib
    import numpy as np

    n, d = rows_np.shape
    path = folder / f"hnsw-{space}-M{m}-efc{ef_construction}.bin"
    meta = folder / (path.name + ".json")
    index = hnswlib.Index(space=space, dim=d)
    if path.is_file() and meta.is_file():
        index.load_index(str(path), max_elements=n)
        return index, json.loads(meta.read_text())["build_seconds"], True
    t0 = time.perf_counter()
    index.init_index(max_elements=n, M=m, ef_construction=ef_construction, random_seed=0)
    index.add_items(rows_np, np.arange(n), num_threads=threads)
    secs = time.perf_counter() - t0
    _atomic_save(path, index.save_index)
    meta.write_text(json.dumps({"build_seconds": secs, "M": m, "ef_construction": ef_construction, "space": space}))
    return index, secs, False


def build_ivf(rows_np, folder: Path, nlist: int, niter: int, threads: int):
    """faiss IndexIVFFlat (inner product, ordinary k-means, unbalanced lists), cached in ``folder``."""
    import faiss

    faiss.omp_set_num_threads(threads)
    n, d = rows_np.shape
    path = folder / f"ivfflat-ip-nlist{nlist}-iter{niter}.faiss"
    meta = folder / (path.name + ".json")
    if path.is_file() and meta.is_file():
        return faiss.read_index(str(path)), json.loads(meta.read_text())["build_seconds"], True
    t0 = time.perf_counter()
    quantizer = faiss.IndexFlatIP(d)
    index = faiss.IndexIVFFlat(quantizer, d, nlist, faiss.METRIC_INNER_PRODUCT)
    index.cp.niter = niter
    index.cp.seed = 0
    index.train(rows_np)
    index.add(rows_np)
    secs = time.perf_counter() - t0
    _atomic_save(path, lambda p: faiss.write_index(index, p))
    meta.write_text(json.dumps({"build_seconds": secs, "nlist": nlist, "niter": niter}))
    return index, secs, False


class HnswCounter:
    """Replays hnswlib's search on its own graph (read through ``__getstate__``) to count the
    distance computations of one query at a given ``ef``: hnswlib itself does not expose them."""

    def __init__(self, index, rows_np, space: str = "ip") -> None:
        import numpy as np

        self.space = space

        st = index.__getstate__()[0]
        n, size = st["cur_element_count"], st["size_data_per_element"]
        lvl0 = np.asarray(st["data_level0"], dtype=np.uint8)[: n * size].reshape(n, size)
        m0, m = st["max_M0"], st["max_M"]
        links0 = np.ascontiguousarray(lvl0[:, : 4 * (1 + m0)]).view(np.uint32)
        self.cnt0 = (links0[:, 0] & 0xFFFF).astype(np.int64)
        self.nbr0 = links0[:, 1:].astype(np.int64)
        lo = st["label_offset"]
        self.label = np.ascontiguousarray(lvl0[:, lo:lo + 8]).view(np.uint64)[:, 0].astype(np.int64)
        self.rows = rows_np
        self.levels = np.asarray(st["element_levels"], dtype=np.int64)[:n]
        self.links = np.asarray(st["link_lists"], dtype=np.uint8)
        self.size_links = st["size_links_per_element"]
        self.m, self.m0 = m, m0
        sizes = np.where(self.levels > 0, self.levels * self.size_links, 0)
        self.link_off = np.concatenate([[0], np.cumsum(sizes)[:-1]])
        self.enter = st["enterpoint_node"]
        self.max_level = st["max_level"]

    def _upper(self, node: int, level: int):
        import numpy as np

        off = self.link_off[node] + (level - 1) * self.size_links
        blob = self.links[off: off + 4 * (1 + self.m)].view(np.uint32)
        return blob[1: 1 + (blob[0] & 0xFFFF)].astype(np.int64)

    def _dist(self, q, ids):
        x = self.rows[self.label[ids]]
        if self.space == "ip":
            return 1.0 - x @ q
        return ((x - q) ** 2).sum(1)

    def count(self, q, ef: int) -> tuple[int, int]:
        """(distance computations, nodes expanded) of one k=1 query."""
        import heapq

        ndis = 1
        cur = self.enter
        cur_d = float(self._dist(q, [cur])[0])
        for level in range(self.max_level, 0, -1):
            changed = True
            while changed:
                changed = False
                nb = self._upper(cur, level)
                ndis += len(nb)
                if len(nb):
                    ds = self._dist(q, nb)
                    for c, dd in zip(nb.tolist(), ds.tolist()):
                        if dd < cur_d:
                            cur_d, cur, changed = dd, c, True
        visited = {cur}
        top = [(-cur_d, cur)]
        cand = [(cur_d, cur)]
        lower = cur_d
        expanded = 0
        while cand:
            dc, c = heapq.heappop(cand)
            if dc > lower and len(top) == ef:
                break
            expanded += 1
            nb = [x for x in self.nbr0[c, : self.cnt0[c]].tolist() if x not in visited]
            if not nb:
                continue
            visited.update(nb)
            ndis += len(nb)
            for x, dd in zip(nb, self._dist(q, nb).tolist()):
                if len(top) < ef or lower > dd:
                    heapq.heappush(cand, (dd, x))
                    heapq.heappush(top, (-dd, x))
                    if len(top) > ef:
                        heapq.heappop(top)
                    lower = -top[0][0]
        return ndis, expanded

    def mean(self, queries, ef: int) -> tuple[float, float]:
        res = [self.count(q, ef) for q in queries]
        return statistics.fmean(r[0] for r in res), statistics.fmean(r[1] for r in res)


def tune_hnsw_ef(counter: HnswCounter, queries, budget: float, ef_max: int = 1 << 14) -> dict:
    """The ``ef`` whose mean distance computations per query best match ``budget``.

    If the search saturates below the budget (every node reachable from the entry point visited:
    a known failure of HNSW graphs built on raw inner products, whose links point to a few
    large-norm rows), the smallest ``ef`` within 1% of the saturated count is returned, with
    ``saturated=True``.
    """
    lo, lo_n = 1, counter.mean(queries, 1)
    if lo_n[0] >= budget:
        return {"ef": 1, "dist": lo_n[0], "expanded": lo_n[1], "saturated": False}
    hi = 2
    hi_n = counter.mean(queries, hi)
    saturated = False
    while hi_n[0] < budget and hi < ef_max:
        if hi >= 64 and hi_n[0] < 1.01 * lo_n[0]:
            saturated = True
            break
        lo, lo_n = hi, hi_n
        hi = min(hi * 2, ef_max)
        hi_n = counter.mean(queries, hi)
    target = 0.99 * hi_n[0] if saturated or hi_n[0] < budget else budget
    if saturated:
        lo, lo_n = 1, counter.mean(queries, 1)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        mid_n = counter.mean(queries, mid)
        if mid_n[0] < target:
            lo, lo_n = mid, mid_n
        else:
            hi, hi_n = mid, mid_n
    best, n = (lo, lo_n) if not saturated and target - lo_n[0] <= hi_n[0] - target else (hi, hi_n)
    return {"ef": best, "dist": n[0], "expanded": n[1], "saturated": saturated or n[0] < 0.9 * budget}


def _ivf_ndis(index, queries_np) -> float:
    import faiss

    faiss.cvar.indexIVF_stats.reset()
    index.search(queries_np, 1)
    return faiss.cvar.indexIVF_stats.ndis / queries_np.shape[0]


def tune_ivf_nprobe(index, queries_np, budget: float) -> tuple[int, float]:
    """``nprobe`` whose mean scanned rows per query match ``budget`` (rows of the probed lists)."""
    lo, hi = 1, index.nlist
    cache = {}

    def nd(p):
        if p not in cache:
            index.nprobe = p
            cache[p] = _ivf_ndis(index, queries_np)
        return cache[p]

    while hi - lo > 1:
        mid = (lo + hi) // 2
        if nd(mid) < budget:
            lo = mid
        else:
            hi = mid
    best = lo if budget - nd(lo) <= nd(hi) - budget else hi
    return best, nd(best)



def peer_configs(model_ref: str, weight: torch.Tensor, states: torch.Tensor, cfg: IndexConfig, st: Settings,
                 quiet: bool) -> tuple[list[HeadConfig], dict]:
    """HNSW and IVF configurations tuned to FlashHead's default row budget, and the metadata the
    memory subprocesses need to load the same peer indexes."""
    import faiss
    import numpy as np

    from ..index import fingerprint

    K, cap, d = cfg.num_clusters, cfg.cluster_size, cfg.hidden_size
    p0, n_always = cfg.n_probes, len(cfg.always_ids)
    budget = K + p0 * cap + n_always  # rows FlashHead scores per query at its default
    faiss.omp_set_num_threads(st.threads)
    rows_np = np.ascontiguousarray(weight[: cfg.num_tokens].float().numpy())
    folder = peer_dir(model_ref, fingerprint(weight))
    tune_q = states.numpy()[:: max(1, len(states) // st.tune_queries)][: st.tune_queries]
    configs = []
    for space in st.hnsw_spaces:
        name = "hnsw" if space == "ip" else "hnsw-mips"
        log(f"{name} peer (hnswlib space={space}, M={st.hnsw_m}, ef_construction={st.hnsw_ef_construction}; "
            f"cached in {folder})", quiet)
        data = rows_np if space == "ip" else mips_augment(rows_np)
        hnsw, hnsw_secs, hnsw_cached = build_hnsw(data, folder, st.hnsw_m, st.hnsw_ef_construction, st.threads,
                                                  space)
        hnsw.set_num_threads(st.threads)
        q = tune_q if space == "ip" else np.concatenate([tune_q, np.zeros((len(tune_q), 1), np.float32)], 1)
        tuned = tune_hnsw_ef(HnswCounter(hnsw, data, space), q.astype(np.float64), budget)
        hnsw.set_ef(tuned["ef"])
        h_bytes = int(tuned["dist"] * data.shape[1] * 4 + tuned["expanded"] * (st.hnsw_m * 2 + 1) * 4)
        del data

        def hnsw_fn(h, index=hnsw, aug=space != "ip"):
            x = h.numpy()
            if aug:
                x = np.concatenate([x, np.zeros((x.shape[0], 1), np.float32)], 1)
            return index.knn_query(x, k=1)[0][:, 0]

        configs.append(HeadConfig(name, "peer", hnsw_fn, 0, h_bytes, tuned["dist"],
                                  {"library": "hnswlib", "space": space, "M": st.hnsw_m,
                                   "ef_construction": st.hnsw_ef_construction, "ef": tuned["ef"],
                                   "dist_per_query": tuned["dist"], "expanded_per_query": tuned["expanded"],
                                   "saturated": tuned["saturated"], "build_seconds": hnsw_secs,
                                   "cached": hnsw_cached}))
    log(f"IVF peer (faiss IndexIVFFlat, IP, nlist={K}, k-means {st.ivf_niter} iterations)", quiet)
    ivf, ivf_secs, ivf_cached = build_ivf(rows_np, folder, K, st.ivf_niter, st.threads)
    q_np = states.numpy()[: min(len(states), 512)]
    sizes = np.array([ivf.invlists.list_size(i) for i in range(K)])
    ivf_info = {"library": "faiss", "nlist": K, "niter": st.ivf_niter, "build_seconds": ivf_secs,
                "cached": ivf_cached, "list_size_max": int(sizes.max()), "list_size_min": int(sizes.min()),
                "empty_lists": int((sizes == 0).sum())}
    ivf.nprobe = p0
    nd_p = _ivf_ndis(ivf, q_np)
    np_b, nd_b = tune_ivf_nprobe(ivf, q_np, p0 * cap + n_always)
    for name, npb, nd in (("ivf-nprobe=p", p0, nd_p), ("ivf-budget", np_b, nd_b)):
        def ivf_fn(h, index=ivf, nprobe=npb):
            index.nprobe = nprobe
            return index.search(h.numpy(), 1)[1][:, 0]

        configs.append(HeadConfig(name, "peer", ivf_fn, K * d * 4, int(nd * (d * 4 + 8)), K + nd,
                                  {**ivf_info, "nprobe": npb, "rows_scanned_per_query": nd}))
    meta = {"n": cfg.num_tokens, "M": st.hnsw_m, "efc": st.hnsw_ef_construction, "nlist": K, "niter": st.ivf_niter}
    return configs, meta
