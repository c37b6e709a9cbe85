"""Speed of FlashHead side by side with the dense head and with peer methods, in one run.

``flashhead bench MODEL [--json] [--plot FILE] [--quick]`` measures, on this machine, with one
thread count and one dtype for everything:

* **head level** -- one decode step's head, hidden state -> token id, at batch 1/4/16/64: FlashHead
  (stage 1 int8/int4/float at the index's default probe count, the default stage 1 at other probe counts, and the
  full-width ``forward`` + argmax that ``generate()`` calls), the dense head in fp32, bf16, int8
  weight-only and int8 dynamic-activation (last position only, argmax, no softmax or sort), and two
  peers on the same row budget: HNSW over the head rows (hnswlib, inner product, ``ef`` tuned so that
  the distance computations per query match FlashHead's scored rows) and IVF with ordinary unbalanced
  k-means (faiss ``IndexIVFFlat``, inner product, ``nlist = K``, ``nprobe = p``, and ``nprobe``
  matched to the row budget). Agreement = how often a method's token equals the dense fp32 argmax on
  real held-out hidden states; every method here scores its candidates exactly, so this is also the
  top-1 containment.
* **model level** -- ``generate()`` tokens/s for 128 new tokens after a 32-token prompt at batch 1
  and 8, FlashHead vs dense, fp32, greedy, plus the share of identical tokens; the head's in-situ
  time per step (forward hooks) gives the head's share of a step and the Amdahl bound.
* **bytes and bandwidth** -- bytes each head reads per step, the machine's measured read bandwidth,
  hence each head's bandwidth floor and how close it gets.
* **peak memory** -- VmHWM/VmRSS of a fresh subprocess per configuration.

How cache-hot illusions are avoided (head level): before every timed call a buffer of twice the
last-level cache (at least 64 MiB) is rewritten, so no head weight is cache-resident, as in a real
decode step where the model's other weights stream through the cache between two head calls; and
the calls cycle through a pool of distinct real hidden states (from the held-out text
``persuasion``), so no two consecutive calls probe the same clusters. Configurations are timed
interleaved (one call of each per round, the order rotated every round) after a warm-up, and the
median over the rounds is reported: the machine is shared, so ratios within a run are what count.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

__all__ = [
    "configure_parser", "run", "run_benchmark", "measure_bandwidth", "format_report", "plot_report",
    "CacheFlusher", "time_interleaved", "TARGETS",
]

SCHEMA = "flashhead-bench/1"
HELD_OUT_TEXT = "persuasion"  # never used to build an index (those are calibrated on prideprejudice and sensesensibility)

# targets of the speed issue, per built-in model: (key, description, threshold)
TARGETS = {
    "gemma3-270m": [
        ("head_b1", "head level, batch 1, FlashHead (default setting) vs dense fp32", 10.0),
        ("model_b1", "whole model, batch 1, tokens/s FlashHead / dense", 1.8),
        ("model_b8", "whole model, batch 8, tokens/s FlashHead / dense", 2.0),
    ],
    "smollm2-135m": [
        ("head_b1", "head level, batch 1, FlashHead (default setting) vs dense fp32", 5.0),
        ("amdahl_b1", "whole model, batch 1, speed-up / Amdahl bound", 0.9),
    ],
}


@dataclass
class Settings:
    threads: int = 2
    batches: tuple[int, ...] = (1, 4, 16, 64)
    repeats: int = 15  # timed rounds per head configuration and batch
    warmup: int = 2
    states: int = 2048  # real hidden states in the pool
    probe_factors: tuple[float, ...] = (0.25, 0.5, 2.0, 4.0)  # extra probe counts (default stage 1), x default
    stage1_modes: tuple[str, ...] = ("int8", "int4", "float")
    model_batches: tuple[int, ...] = (1, 8)
    prompt_tokens: int = 32
    new_tokens: int = 128
    model_repeats: int = 5
    model_flash_modes: tuple[str, ...] = ()  # stage-1 modes at model level; () = the index's default
    hnsw_m: int = 16
    hnsw_spaces: tuple[str, ...] = ("ip", "l2")  # "l2" = on MIPS-augmented rows (the standard reduction)
    hnsw_ef_construction: int = 100
    ivf_niter: int = 10
    tune_queries: int = 48
    memory: bool = True
    peers: bool = True
    quick: bool = False
    wait_quiet: float = 0.0  # seconds to wait at most for other processes to leave the CPUs idle

    @classmethod
    def for_mode(cls, quick: bool, threads: int = 2) -> Settings:
        if not quick:
            return cls(threads=threads)
        return cls(threads=threads, batches=(1, 16), repeats=5, warmup=1, states=256, probe_factors=(0.5, 2.0),
                   model_batches=(1, 8), new_tokens=32, model_repeats=2, hnsw_ef_construction=48, ivf_niter=4,
                   hnsw_spaces=("ip",),
                   tune_queries=16, memory=True, quick=True)


# ---------------------------------------------------------------------------------------- machine
def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _llc_bytes() -> int:
    """Size of the largest CPU cache (sysfs), 32 MiB if unknown."""
    best = 0
    base = Path("/sys/devices/system/cpu/cpu0/cache")
    for idx in base.glob("index*"):
        try:
            txt = (idx / "size").read_text().strip().upper()
            mult = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(txt[-1], 1)
            best = max(best, int(txt.rstrip("KMG")) * mult)
        except (OSError, ValueError):
            continue
    return best or 32 << 20


def _loadavg() -> list[float]:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return []


def cpu_busy(interval: float = 1.0) -> float:
    """Fraction of all CPUs busy (any process) over ``interval`` seconds, from /proc/stat; nan if unknown."""
    def snap():
        vals = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
        idle = vals[3] + (vals[4] if len(vals) > 4 else 0)
        return sum(vals), idle

    try:
        t0, i0 = snap()
        time.sleep(interval)
        t1, i1 = snap()
        return 1.0 - (i1 - i0) / max(1, t1 - t0)
    except (OSError, ValueError, IndexError):
        return float("nan")


def wait_for_quiet(max_seconds: float, threshold: float = 0.15, quiet: bool = False) -> float:
    """Wait (at most ``max_seconds``) until other processes leave the CPUs ``threshold`` busy or less."""
    end = time.monotonic() + max_seconds
    busy = cpu_busy()
    while busy > threshold and time.monotonic() < end:
        _log(f"machine busy ({100 * busy:.0f}% of CPUs used by others); waiting", quiet)
        time.sleep(10)
        busy = cpu_busy()
    return busy


def machine_info(threads: int) -> dict:
    return {
        "cpu": _cpu_model(), "logical_cpus": os.cpu_count(), "llc_bytes": _llc_bytes(),
        "torch": torch.__version__, "threads": threads, "python": platform.python_version(),
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "loadavg_start": _loadavg(),
    }


# -------------------------------------------------------------------------------------- timing
class CacheFlusher:
    """Evicts the last-level cache by rewriting a buffer of ``2 x LLC`` (at least 64 MiB)."""

    def __init__(self, nbytes: int | None = None) -> None:
        self.nbytes = int(nbytes or max(2 * _llc_bytes(), 64 << 20))
        self._buf = torch.ones(self.nbytes // 4, dtype=torch.float32)

    def __call__(self) -> None:
        self._buf.add_(1.0)


def _stats(ts: list[float]) -> dict:
    s = sorted(ts)
    q = statistics.quantiles(s, n=4) if len(s) >= 2 else [s[0], s[0], s[0]]
    return {"median_us": statistics.median(s) * 1e6, "p25_us": q[0] * 1e6, "p75_us": q[2] * 1e6,
            "min_us": s[0] * 1e6, "n": len(s)}


def time_interleaved(fns: dict, inputs: list, repeats: int, warmup: int = 1, flush=None) -> dict[str, list[float]]:
    """Wall seconds of single calls ``fn(inputs[i])``, one call per configuration per round.

    The order of the configurations rotates every round (so no configuration always follows the
    same one), every call gets the next input of the pool, and ``flush()`` (if given) runs before
    each call, untimed.
    """
    names = list(fns)
    for _ in range(warmup):
        for i, name in enumerate(names):
            fns[name](inputs[i % len(inputs)])
    out: dict[str, list[float]] = {n: [] for n in names}
    k = 0
    for r in range(repeats):
        for j in range(len(names)):
            name = names[(j + r) % len(names)]
            x = inputs[k % len(inputs)]
            k += 1
            if flush is not None:
                flush()
            t0 = time.perf_counter()
            fns[name](x)
            out[name].append(time.perf_counter() - t0)
    return out


def measure_bandwidth(threads: int, nbytes: int = 512 << 20, repeats: int = 7) -> dict:
    """Memory bandwidth with torch: a large read (sum) and a large copy (read + write counted)."""
    torch.set_num_threads(threads)
    src = torch.ones(nbytes // 4, dtype=torch.float32)
    dst = torch.empty_like(src)
    dst.copy_(src)
    reads, copies = [], []
    for _ in range(repeats):
        t0 = time.perf_counter()
        src.sum()
        t1 = time.perf_counter()
        dst.copy_(src)
        t2 = time.perf_counter()
        reads.append(t1 - t0)
        copies.append(t2 - t1)
    r, c = statistics.median(reads), statistics.median(copies)
    return {"bytes": nbytes, "read_gbps": nbytes / r / 1e9, "copy_gbps": 2 * nbytes / c / 1e9,
            "best_read_gbps": nbytes / min(reads) / 1e9, "method": "torch sum (read) / copy_ (read+write) of "
            f"{nbytes >> 20} MiB fp32, median of {repeats}, {threads} threads"}


# ------------------------------------------------------------------------------------ dense heads
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


# ----------------------------------------------------------------------------------------- peers
def _peer_dir(model_ref: str, fingerprint: str) -> Path:
    from ._io import cache_dir
    from .integrations.transformers import default_index_dir

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


# ------------------------------------------------------------------------------------- model level
def _prompts(tok, text: str, n: int, length: int, start: int) -> list[str]:
    """``n`` prompts that each tokenize (with the tokenizer's special prefix) to exactly ``length`` tokens."""
    ids = tok(text[start:start + 400_000], add_special_tokens=False).input_ids
    out, pos = [], 0
    while len(out) < n and pos + length < len(ids):
        for k in range(length, 0, -1):
            s = tok.decode(ids[pos:pos + k])
            if s.strip() and len(tok(s, add_special_tokens=True).input_ids) == length:
                out.append(s)
                break
        pos += 997  # far apart: unrelated contexts
    if len(out) < n:
        raise ValueError(f"could not cut {n} prompts of {length} tokens from the text")
    return out


class _HeadTimer:
    """Forward hooks on a model's output head: wall time of each call inside generate(), and the
    time from one call's start to the next one's (a whole decode step, generate()'s loop included)."""

    def __init__(self, module) -> None:
        self.times: list[float] = []
        self.starts: list[float] = []
        self._t0 = 0.0
        self._h = [module.register_forward_pre_hook(self._pre), module.register_forward_hook(self._post)]

    def _pre(self, *_):
        self._t0 = time.perf_counter()
        self.starts.append(self._t0)

    def _post(self, *_):
        self.times.append(time.perf_counter() - self._t0)

    def close(self):
        for h in self._h:
            h.remove()


def _match(a: list[list[int]], b: list[list[int]]) -> tuple[float, float]:
    """(fraction of identical tokens position by position, mean identical-prefix length)."""
    same = total = 0
    prefixes = []
    for x, y in zip(a, b):
        total += len(x)
        same += sum(u == v for u, v in zip(x, y))
        k = 0
        while k < min(len(x), len(y)) and x[k] == y[k]:
            k += 1
        prefixes.append(k)
    return (same / total if total else float("nan")), statistics.fmean(prefixes)


# ------------------------------------------------------------------------------------------ memory
def rss_kb() -> dict:
    """Resident-memory counters of this process in kB (Linux /proc/self/status)."""
    out = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(("VmRSS:", "VmHWM:", "RssAnon:", "RssFile:")):
            out[line.split(":")[0]] = int(line.split()[1])
    return out


def materialize(model) -> None:
    """Copy every weight into anonymous memory, so that no tensor keeps the safetensors file mapped:
    otherwise pages of weights that a configuration drops (FlashHead re-lays the head out) stay
    counted in the RSS as long as the file mapping lives, and dense weights count as file pages."""
    import gc

    with torch.no_grad():
        for t in [*model.parameters(), *model.buffers()]:
            t.data = t.data.clone()
    gc.collect()


def reset_peak() -> bool:
    """Reset this process's peak RSS (VmHWM) to its current RSS; False where the kernel cannot."""
    try:  # Linux >= 4.0: "5" resets VmHWM to the current RSS
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def _memory_child(model_ref: str, config: str, threads: int) -> dict:
    """Runs in a fresh process: load (weights copied into anonymous memory), reset the peak, set the
    head up, decode 16 tokens; report RSS figures (MB)."""
    torch.set_num_threads(threads)
    from .decode import generate
    from .integrations.transformers import apply, index_for
    from .models import head_weight, load_model

    base = rss_kb()["VmRSS"]
    dtype = torch.bfloat16 if config == "dense-bf16" else torch.float32
    model, tok = load_model(model_ref, dtype=dtype, verbose=False)
    materialize(model)
    loaded = rss_kb()["VmRSS"]
    peak_reset = reset_peak()
    keep = None  # peer index, alive until the end
    if config.startswith("flashhead-"):
        apply(model, index_for(model_ref, model, tok, progress=False), stage1=config.split("-", 1)[1])
    elif config in ("hnsw", "ivf"):
        import numpy as np

        from .index import fingerprint

        folder = _peer_dir(model_ref, fingerprint(head_weight(model)))
        meta = json.loads(os.environ["FLASHHEAD_BENCH_PEER"])
        rows = np.ascontiguousarray(head_weight(model).detach().float().numpy()[: meta["n"]])
        if config == "hnsw":
            keep = build_hnsw(rows, folder, meta["M"], meta["efc"], threads, "ip")[0]
        else:
            keep = build_ivf(rows, folder, meta["nlist"], meta["niter"], threads)[0]
        del rows
    generate(model, tok, ["It is a truth universally acknowledged, that"], max_new_tokens=16)
    r = rss_kb()
    del keep
    mb = 1024.0
    return {"config": config, "rss_before_load_mb": base / mb, "rss_after_load_mb": loaded / mb,
            "peak_since": "after load" if peak_reset else "process start",
            "rss_steady_mb": r["VmRSS"] / mb, "rss_peak_mb": r["VmHWM"] / mb,
            "rss_anon_mb": r.get("RssAnon", 0) / mb, "rss_file_mb": r.get("RssFile", 0) / mb}


def measure_memory(model_ref: str, configs: list[str], threads: int, peer_meta: dict | None) -> list[dict]:
    """Peak (VmHWM) and steady (VmRSS) resident memory of each configuration, one fresh process each."""
    out = []
    env = dict(os.environ)
    if peer_meta:
        env["FLASHHEAD_BENCH_PEER"] = json.dumps(peer_meta)
    for cfg in configs:
        if cfg in ("hnsw", "ivf") and not peer_meta:
            continue
        cmd = [sys.executable, "-m", "flashhead.bench", "--memory-child", model_ref, cfg, str(threads)]
        p = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900)
        lines = [x for x in p.stdout.splitlines() if x.startswith("{")]
        if p.returncode != 0 or not lines:
            out.append({"config": cfg, "error": (p.stderr or p.stdout).strip().splitlines()[-1:] or ["failed"]})
            continue
        out.append(json.loads(lines[-1]))
    return out


# --------------------------------------------------------------------------------------- benchmark
@dataclass
class _Cfg:
    name: str
    kind: str  # dense | flashhead | peer
    fn: object  # h [B, d] float32 -> ids [B]
    bytes_fixed: int  # bytes read once per step whatever the batch (weights shared by the batch)
    bytes_per_query: int  # bytes read per query row
    rows_per_query: float  # rows scored per query (centroids + candidates; V for dense)
    info: dict = field(default_factory=dict)


def _log(msg: str, quiet: bool) -> None:
    if not quiet:
        print(f"[bench] {msg}", file=sys.stderr, flush=True)


def run_benchmark(model_ref: str, settings: Settings, *, quiet: bool = False) -> dict:
    """Everything in one run; returns the report (a JSON-able dict)."""
    import numpy as np

    from .data import load_text
    from .decode import generate
    from .head import FlashHead, stage1_nbytes
    from .index import fingerprint
    from .integrations.transformers import apply, calibration_states, flashhead_of, index_for, remove
    from .models import head_weight, load_model

    st = settings
    torch.set_num_threads(st.threads)
    busy = wait_for_quiet(st.wait_quiet, quiet=quiet) if st.wait_quiet > 0 else cpu_busy(0.5)
    t_start = time.perf_counter()
    report: dict = {"schema": SCHEMA, "model": model_ref, "quick": st.quick, "machine": machine_info(st.threads)}
    report["machine"]["cpu_busy_before_start"] = busy
    report["settings"] = {k: (list(v) if isinstance(v, tuple) else v) for k, v in st.__dict__.items()}

    sections: dict[str, float] = {}
    report["section_seconds"] = sections
    t_sec = time.perf_counter()

    def section(name: str) -> None:
        nonlocal t_sec
        now = time.perf_counter()
        sections[name] = round(now - t_sec, 2)
        t_sec = now

    _log("measuring memory bandwidth", quiet)
    report["bandwidth"] = bw = measure_bandwidth(st.threads, repeats=3 if st.quick else 7)
    read_bps = bw["read_gbps"] * 1e9

    section("bandwidth")
    _log(f"loading {model_ref} and its FlashHead index", quiet)
    model, tok = load_model(model_ref, verbose=not quiet)
    index = index_for(model_ref, model, tok, progress=not quiet)
    cfg = index.config
    K, cap, d, V = cfg.num_clusters, cfg.cluster_size, cfg.hidden_size, cfg.vocab_size
    p0, s0 = cfg.n_probes, cfg.stage1
    weight = head_weight(model).detach()  # token order; kept alive for the dense baselines
    text = load_text(HELD_OUT_TEXT)
    _log(f"{st.states} real hidden states from '{HELD_OUT_TEXT}'", quiet)
    states = calibration_states(model, tok, text, positions=st.states).contiguous()
    with torch.inference_mode():
        ref = torch.cat([F.linear(states[i:i + 128], weight).argmax(-1) for i in range(0, len(states), 128)])
    n_always = len(cfg.always_ids)
    budget = K + p0 * cap + n_always  # rows FlashHead scores per query at its default
    report["index"] = {"K": K, "cap": cap, "d": d, "V": V, "num_tokens": cfg.num_tokens, "n_probes": p0, "stage1": s0,
                       "always_ids": n_always, "rows_per_query": budget, "rows_share": budget / V,
                       "build_seconds": cfg.build.get("seconds_total") or
                       (cfg.build.get("seconds_map", 0) + cfg.build.get("seconds_cluster", 0))}

    section("load_model_index_states")
    configs: list[_Cfg] = []
    with torch.inference_mode():
        for name, (fn, nbytes, info) in dense_heads(weight).items():
            configs.append(_Cfg(name, "dense", fn, nbytes, 0, V, info))

        head = apply(model, index)  # rows in the real (model-owned) cluster layout
        heads: dict[str, FlashHead] = {}

        def make(stage1: str, p: int) -> FlashHead:
            return FlashHead(head.rows, head.slot_token, index.centroids, out_features=V, n_probes=p,
                             always_ids=head.always_ids, stage1=stage1)

        variants = [(s, p0) for s in st.stage1_modes]
        for f in st.probe_factors:
            p = max(1, min(K, int(round(p0 * f))))
            if (s0, p) not in variants:
                variants.append((s0, p))
        for s, p in variants:
            fh = make(s, p)
            name = f"flashhead-{s}" + ("" if p == p0 else f"-p{p}")
            heads[name] = fh
            fixed = stage1_nbytes(K, d, s)  # centroids: read once per step, shared by the batch
            configs.append(_Cfg(name, "flashhead", fh.greedy, fixed, fh.nbytes_per_step(p) - fixed,
                                K + p * cap + n_always, {"stage1": s, "n_probes": p}))
        fh0 = heads[f"flashhead-{s0}"]
        fixed0 = stage1_nbytes(K, d, s0)

        def fwd_argmax(h, fh=fh0):
            return fh(h).argmax(-1)

        configs.append(_Cfg(f"flashhead-{s0}-forward", "flashhead", fwd_argmax, fixed0,
                            fh0.nbytes_per_step() - fixed0 + V * 4, K + p0 * cap + n_always,
                            {"stage1": s0, "n_probes": p0, "path": "forward (full-width -inf logits) + argmax"}))

    # ---- peers
    peer_meta = None
    if st.peers:
        import faiss

        faiss.omp_set_num_threads(st.threads)
        rows_np = np.ascontiguousarray(weight[: cfg.num_tokens].float().numpy())
        folder = _peer_dir(model_ref, fingerprint(weight))
        tune_q = states.numpy()[:: max(1, len(states) // st.tune_queries)][: st.tune_queries]
        for space in st.hnsw_spaces:
            name = "hnsw" if space == "ip" else "hnsw-mips"
            _log(f"{name} peer (hnswlib space={space}, M={st.hnsw_m}, ef_construction={st.hnsw_ef_construction}; "
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

            configs.append(_Cfg(name, "peer", hnsw_fn, 0, h_bytes, tuned["dist"],
                                {"library": "hnswlib", "space": space, "M": st.hnsw_m,
                                 "ef_construction": st.hnsw_ef_construction, "ef": tuned["ef"],
                                 "dist_per_query": tuned["dist"], "expanded_per_query": tuned["expanded"],
                                 "saturated": tuned["saturated"], "build_seconds": hnsw_secs, "cached": hnsw_cached}))
        _log(f"IVF peer (faiss IndexIVFFlat, IP, nlist={K}, k-means {st.ivf_niter} iterations)", quiet)
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

            configs.append(_Cfg(name, "peer", ivf_fn, K * d * 4, int(nd * (d * 4 + 8)), K + nd,
                                {**ivf_info, "nprobe": npb, "rows_scanned_per_query": nd}))
        peer_meta = {"n": cfg.num_tokens, "M": st.hnsw_m, "efc": st.hnsw_ef_construction, "nlist": K,
                     "niter": st.ivf_niter}
        del rows_np
        section("peers_build_tune")

    # ---- agreement with the dense fp32 argmax on the whole pool (and FlashHead's top-1 containment)
    _log("agreement with the dense fp32 argmax", quiet)
    with torch.inference_mode():
        for c in configs:
            pred = torch.cat([torch.as_tensor(np.asarray(c.fn(states[i:i + 64]))).long()
                              for i in range(0, len(states), 64)])
            c.info["agreement"] = float((pred == ref).float().mean())
            if c.kind == "flashhead" and "path" not in c.info:
                fh = heads[c.name]
                cl = fh.select_clusters(states)
                tok_cluster = fh.token_slot[ref] // cap
                inside = (cl == tok_cluster[:, None]).any(1) | torch.isin(ref, fh.always_ids)
                c.info["containment"] = float(inside.float().mean())
            elif c.kind == "peer":
                c.info["containment"] = c.info["agreement"]  # exact scores: top-1 of candidates

    section("agreement")
    # ---- head-level timing
    flusher = CacheFlusher()
    head_rows = []
    with torch.inference_mode():
        for B in st.batches:
            pool = [states[i:i + B] for i in range(0, len(states) - B + 1, B)]
            _log(f"head level, batch {B}: {len(configs)} configurations x {st.repeats} rounds, LLC flushed "
                 f"({flusher.nbytes >> 20} MiB) before each call", quiet)
            ts = time_interleaved({c.name: c.fn for c in configs}, pool, st.repeats, st.warmup, flusher)
            for c in configs:
                s = _stats(ts[c.name])
                nbytes = c.bytes_fixed + B * c.bytes_per_query
                floor = nbytes / read_bps * 1e6
                head_rows.append({"name": c.name, "kind": c.kind, "batch": B, **s, "bytes_per_step": nbytes,
                                  "rows_per_query": c.rows_per_query, "floor_us": floor,
                                  "floor_fraction": floor / s["median_us"], **c.info})
    base = {r["batch"]: r["median_us"] for r in head_rows if r["name"] == "dense-fp32"}
    dense_bytes = {r["batch"]: r["bytes_per_step"] for r in head_rows if r["name"] == "dense-fp32"}
    for r in head_rows:
        r["speedup_vs_dense_fp32"] = base[r["batch"]] / r["median_us"]
        r["bytes_vs_dense_fp32"] = r["bytes_per_step"] / dense_bytes[r["batch"]]
    report["head"] = head_rows
    del flusher
    report["machine"]["loadavg_after_head"] = _loadavg()
    section("head_level")

    # ---- model level
    remove(model)
    del configs, heads, fh0, head
    report["model_level"] = model_level(model_ref, model, tok, index, text, st, quiet)
    report["machine"]["loadavg_after_model"] = _loadavg()
    section("model_level")

    # ---- memory
    if st.memory:
        mem_cfgs = ["dense-fp32", "dense-bf16"] + [f"flashhead-{s}" for s in st.stage1_modes] + ["hnsw", "ivf"]
        if st.quick:
            mem_cfgs = ["dense-fp32", f"flashhead-{s0}"]
        _log(f"peak memory: one fresh process per configuration ({', '.join(mem_cfgs)})", quiet)
        report["memory"] = measure_memory(model_ref, mem_cfgs, st.threads, peer_meta)
        section("memory")
    report["targets"] = evaluate_targets(report)
    report["machine"]["loadavg_end"] = _loadavg()
    report["seconds"] = time.perf_counter() - t_start
    return report


def model_level(model_ref: str, dense_model, tok, index, text: str, st: Settings, quiet: bool) -> dict:
    """generate() tokens/s, FlashHead vs dense, interleaved; identical tokens; in-situ head time."""
    from .decode import generate
    from .integrations.transformers import apply
    from .models import load_model

    prompts = _prompts(tok, text, max(st.model_batches), st.prompt_tokens, start=len(text) // 2)
    models = {"dense-fp32": dense_model}
    for s in st.model_flash_modes or (index.config.stage1,):
        m, _ = load_model(model_ref, verbose=False)
        apply(m, index, stage1=s)
        models[f"flashhead-{s}"] = m
    names = list(models)
    rows = []
    for B in st.model_batches:
        ps = prompts[:B]
        _log(f"model level, batch {B}: {', '.join(names)}, {st.prompt_tokens}-token prompts, {st.new_tokens} new "
             f"tokens, {st.model_repeats} interleaved rounds", quiet)
        for n in names:  # warm-up
            generate(models[n], tok, ps, max_new_tokens=4)
        full = {n: [] for n in names}
        pre = {n: [] for n in names}
        gens = {}
        for r in range(st.model_repeats):
            for j in range(len(names)):
                n = names[(j + r) % len(names)]
                g = generate(models[n], tok, ps, max_new_tokens=st.new_tokens)
                full[n].append(g.seconds)
                gens[n] = g
                pre[n].append(generate(models[n], tok, ps, max_new_tokens=1).seconds)
        # in-situ head time per decode step (hooks; a separate, untimed run)
        insitu = {}
        for n in names:
            m = models[n]
            timer = _HeadTimer(m.get_output_embeddings())
            try:
                generate(m, tok, ps, max_new_tokens=st.new_tokens)
            finally:
                timer.close()
            # decode steps (the first head call is the prefill's): a step runs from the start of one
            # head call to the start of the next, so each step holds its head call and the head's
            # share stays below 1 by construction (a difference of two timed runs did not)
            steps = [b - a for a, b in zip(timer.starts[1:], timer.starts[2:])]
            dec = timer.times[1:1 + len(steps)]
            insitu[n] = {"head_ms_per_step": statistics.median(dec) * 1e3 if dec else float("nan"),
                         "steps": len(dec), "step_ms": statistics.median(steps) * 1e3 if steps else float("nan")}
        dense = gens["dense-fp32"]
        for n in names:
            g = gens[n]
            t_full, t_pre = statistics.median(full[n]), statistics.median(pre[n])
            steps = st.new_tokens - 1
            same, prefix = _match(g.token_ids, dense.token_ids)
            rows.append({
                "name": n, "batch": B, "new_tokens": g.new_tokens, "seconds_median": t_full,
                "seconds_all": full[n], "tokens_per_second": g.new_tokens / t_full,
                "decode_tokens_per_second": B * steps / max(1e-9, t_full - t_pre),
                "prefill_seconds": t_pre, "identical_token_fraction": same, "identical_prefix_mean": prefix,
                **insitu[n],
            })
    for r in rows:
        d = next(x for x in rows if x["name"] == "dense-fp32" and x["batch"] == r["batch"])
        r["speedup_vs_dense"] = r["tokens_per_second"] / d["tokens_per_second"]
        r["decode_speedup_vs_dense"] = r["decode_tokens_per_second"] / d["decode_tokens_per_second"]
        f = d["head_ms_per_step"] / d["step_ms"] if d["step_ms"] > 0 else float("nan")
        r["dense_head_share"] = f
        r["amdahl_bound"] = 1.0 / (1.0 - f) if f < 1 else float("inf")
        # what the step would cost with this head, from the in-situ head times
        pred = d["step_ms"] / (d["step_ms"] - d["head_ms_per_step"] + r["head_ms_per_step"])
        r["predicted_decode_speedup"] = pred
        r["fraction_of_amdahl"] = r["decode_speedup_vs_dense"] / r["amdahl_bound"]
    for n, m in models.items():
        if n != "dense-fp32":
            del m
    return {"rows": rows, "prompts": prompts[: max(st.model_batches)],
            "method": "flashhead.decode.generate (transformers generate, greedy, fp32), wall time of the call; "
                      "decode tokens/s = B*(N-1) / (t(N new) - t(1 new)); medians over interleaved rounds"}


def evaluate_targets(report: dict) -> list[dict]:
    out = []
    main = f"flashhead-{report['index']['stage1']}"  # the default setting
    for key, desc, thr in TARGETS.get(report["model"], []):
        val = None
        if key == "head_b1":
            val = next((r["speedup_vs_dense_fp32"] for r in report["head"]
                        if r["name"] == main and r["batch"] == 1), None)
        elif key.startswith("model_b"):
            b = int(key[7:])
            val = next((r["speedup_vs_dense"] for r in report["model_level"]["rows"]
                        if r["name"] == main and r["batch"] == b), None)
        elif key == "amdahl_b1":
            r = next((r for r in report["model_level"]["rows"] if r["name"] == main and r["batch"] == 1), None)
            val = None if r is None else r["speedup_vs_dense"] / r["amdahl_bound"]
        if val is not None:
            out.append({"target": key, "description": desc, "threshold": thr, "measured": val, "met": val >= thr})
    return out


# ------------------------------------------------------------------------------------------ output
def format_report(rep: dict) -> str:
    m, idx, bw = rep["machine"], rep["index"], rep["bandwidth"]
    L = []
    L.append(f"FlashHead benchmark: {rep['model']}  ({'quick' if rep['quick'] else 'full'} run, {rep['seconds']:.0f} s)")
    L.append(f"machine: {m['cpu']}, {m['logical_cpus']} logical CPUs, LLC {m['llc_bytes'] >> 20} MiB, torch "
             f"{m['torch']}, {m['threads']} threads, {m['date']}; load average start {m['loadavg_start']} "
             f"end {m.get('loadavg_end')}; CPUs busy before start {100 * m.get('cpu_busy_before_start', float('nan')):.0f}%")
    L.append(f"index: V={idx['V']} d={idx['d']} K={idx['K']} cap={idx['cap']} default p={idx['n_probes']} "
             f"-> {idx['rows_per_query']} rows scored per query ({100 * idx['rows_share']:.1f}% of V)")
    L.append(f"memory bandwidth (torch, {m['threads']} threads): read {bw['read_gbps']:.1f} GB/s, copy "
             f"{bw['copy_gbps']:.1f} GB/s")
    batches = sorted({r["batch"] for r in rep["head"]})
    names = list(dict.fromkeys(r["name"] for r in rep["head"]))
    by = {(r["name"], r["batch"]): r for r in rep["head"]}
    L.append("")
    L.append("Head level: one decode step's head (hidden -> token), LLC flushed before each call, median us "
             "(x = speed-up vs dense fp32 at that batch)")
    hdr = f"{'config':<24} {'agree':>6} {'rows/q':>8} {'MB/step':>8}"
    for b in batches:
        hdr += f" {'b' + str(b) + ' us':>10} {'x':>6}"
    hdr += f" {'floor b1':>9} {'%floor':>6}"
    L.append(hdr)
    for n in names:
        r1 = by[(n, batches[0])]
        line = f"{n:<24} {100 * r1['agreement']:>5.1f}% {r1['rows_per_query']:>8.0f} {r1['bytes_per_step'] / 1e6:>8.2f}"
        for b in batches:
            r = by[(n, b)]
            line += f" {r['median_us']:>10.0f} {r['speedup_vs_dense_fp32']:>6.2f}"
        line += f" {r1['floor_us']:>9.0f} {100 * r1['floor_fraction']:>5.0f}%"
        L.append(line)
    L.append("  agree = token equals the dense fp32 argmax on held-out real hidden states (= top-1 containment, "
             "candidates are scored exactly); MB/step and floor at the first batch; %floor = bandwidth floor / "
             "measured time")
    peers = [by[(n, batches[0])] for n in names if by[(n, batches[0])]["kind"] == "peer"]
    for r in peers:
        extra = (f"space={r['space']}{' (MIPS-augmented rows)' if r['space'] == 'l2' else ''}, ef={r['ef']} "
                 f"({r['dist_per_query']:.0f} distances/query{', SATURATED: the graph reaches no more' if r['saturated'] else ''}"
                 f"; M={r['M']}, build {r['build_seconds']:.0f} s)"
                 if r["name"].startswith("hnsw") else
                 f"nprobe={r['nprobe']} ({r['rows_scanned_per_query']:.0f} rows scanned/query; lists {r['list_size_min']}"
                 f"..{r['list_size_max']} rows, {r['empty_lists']} empty; build {r['build_seconds']:.0f} s)")
        L.append(f"  {r['name']}: {extra}")
    mr = rep["model_level"]["rows"]
    L.append("")
    L.append("Model level: generate(), fp32, greedy, 32-token prompts -> "
             f"{rep['settings']['new_tokens']} new tokens, median of {rep['settings']['model_repeats']} interleaved rounds")
    L.append(f"{'config':<20} {'batch':>5} {'tok/s':>8} {'x':>6} {'decode tok/s':>12} {'x':>6} {'head ms':>8} "
             f"{'step ms':>8} {'ident.':>7} {'prefix':>7} {'Amdahl':>7} {'%Amdahl':>8}")
    for r in mr:
        L.append(f"{r['name']:<20} {r['batch']:>5} {r['tokens_per_second']:>8.1f} {r['speedup_vs_dense']:>6.2f} "
                 f"{r['decode_tokens_per_second']:>12.1f} {r['decode_speedup_vs_dense']:>6.2f} "
                 f"{r['head_ms_per_step']:>8.2f} {r['step_ms']:>8.2f} {100 * r['identical_token_fraction']:>6.1f}% "
                 f"{r['identical_prefix_mean']:>7.1f} {r['amdahl_bound']:>7.2f} "
                 + (f"{'-':>8}" if r["name"] == "dense-fp32" else f"{100 * r['fraction_of_amdahl']:>7.0f}%"))
    L.append("  head ms = in-situ head time per decode step (forward hooks); Amdahl = 1 / (1 - dense head share "
             "of a step); ident. = identical tokens vs dense, prefix = mean identical prefix length")
    if rep.get("memory"):
        L.append("")
        L.append("Memory: one fresh process per configuration: load, copy the weights into anonymous memory, reset "
                 "the peak, set the head up, decode 16 tokens; RSS in MB (peak = VmHWM from after load)")
        L.append(f"{'config':<18} {'after load':>10} {'steady':>8} {'anon':>8} {'peak':>8}")
        for r in rep["memory"]:
            if "error" in r:
                L.append(f"{r['config']:<18} error: {r['error']}")
            else:
                L.append(f"{r['config']:<18} {r['rss_after_load_mb']:>10.0f} {r['rss_steady_mb']:>8.0f} "
                         f"{r['rss_anon_mb']:>8.0f} {r['rss_peak_mb']:>8.0f}")
    if rep.get("targets"):
        L.append("")
        L.append("Targets:")
        for t in rep["targets"]:
            L.append(f"  {'MET ' if t['met'] else 'MISS'} {t['description']}: {t['measured']:.2f} "
                     f"(target >= {t['threshold']})")
    return "\n".join(L)


def plot_report(rep: dict, path: str | Path) -> None:
    """Speed-up vs dense fp32 (log) against agreement with the dense argmax, one panel per batch."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    batches = sorted({r["batch"] for r in rep["head"]})
    fig, axes = plt.subplots(1, len(batches), figsize=(4.2 * len(batches), 4.2), squeeze=False)
    colors = {"dense": "tab:gray", "flashhead": "tab:blue", "peer": "tab:orange"}
    for ax, b in zip(axes[0], batches):
        for r in (r for r in rep["head"] if r["batch"] == b):
            ax.scatter(100 * r["agreement"], r["speedup_vs_dense_fp32"], color=colors[r["kind"]], s=22)
            ax.annotate(r["name"].replace("flashhead-", "fh-"), (100 * r["agreement"], r["speedup_vs_dense_fp32"]),
                        fontsize=6, xytext=(3, 2), textcoords="offset points")
        ax.set_yscale("log")
        ax.set_title(f"{rep['model']}, head level, batch {b}", fontsize=9)
        ax.set_xlabel("agreement with dense fp32 argmax (%)")
        ax.set_ylabel("speed-up vs dense fp32 (x)")
        ax.axhline(1.0, color="k", lw=0.5)
        ax.grid(alpha=0.3, which="both")
    handles = [plt.Line2D([], [], marker="o", ls="", color=c, label=k) for k, c in colors.items()]
    axes[0][0].legend(handles=handles, fontsize=7, loc="lower left")
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)


# --------------------------------------------------------------------------------------------- CLI
def configure_parser(p: argparse.ArgumentParser) -> None:
    """Arguments of ``flashhead bench``; also sets ``func=run`` on the parser."""
    from .models import BUILTIN_MODELS

    p.description = __doc__.split("\n\n")[0]
    p.add_argument("model", help=f"built-in name ({', '.join(BUILTIN_MODELS)}) or model folder / .gguf file")
    p.add_argument("--json", action="store_true", help="print the report as JSON on stdout instead of the table")
    p.add_argument("--out", metavar="FILE", help="also write the JSON report to FILE")
    p.add_argument("--plot", metavar="FILE", help="write a speed-vs-agreement plot (PNG/PDF/SVG) to FILE")
    p.add_argument("--quick", action="store_true", help="fewer repeats, batches and configurations (a couple of "
                   "minutes; for smoke tests, not for numbers)")
    p.add_argument("--threads", type=int, default=2, help="torch/faiss/hnswlib threads (default 2)")
    p.add_argument("--repeats", type=int, help="timed rounds per head configuration (default 15, quick 5)")
    p.add_argument("--model-repeats", type=int, help="interleaved generate() rounds (default 5, quick 2)")
    p.add_argument("--new-tokens", type=int, help="new tokens per generate() (default 128, quick 32)")
    p.add_argument("--batches", type=int, nargs="+", metavar="B", help="head-level batch sizes (default 1 4 16 64)")
    p.add_argument("--no-peers", action="store_true", help="skip the HNSW / IVF peers")
    p.add_argument("--no-memory", action="store_true", help="skip the per-configuration memory subprocesses")
    p.add_argument("--wait-quiet", type=float, default=0.0, metavar="SECONDS",
                   help="on a shared machine, first wait up to SECONDS for other processes to leave the CPUs idle")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    st = Settings.for_mode(args.quick, args.threads)
    if args.threads < 1:
        raise ValueError("--threads must be >= 1")
    for attr, key in (("repeats", "repeats"), ("model_repeats", "model_repeats"), ("new_tokens", "new_tokens")):
        v = getattr(args, attr, None)
        if v is not None:
            if v < 1:
                raise ValueError(f"--{attr.replace('_', '-')} must be >= 1, got {v}")
            setattr(st, key, v)
    if getattr(args, "batches", None):
        if any(b < 1 for b in args.batches):
            raise ValueError("--batches must be >= 1")
        st.batches = tuple(args.batches)
    st.peers = not args.no_peers
    st.wait_quiet = max(0.0, float(getattr(args, "wait_quiet", 0.0) or 0.0))
    st.memory = not args.no_memory
    rep = run_benchmark(args.model, st, quiet=args.json)
    text = json.dumps(rep, indent=1, default=float)
    if args.out:
        from ._io import atomic_write_bytes

        atomic_write_bytes(Path(args.out), (text + "\n").encode())
    if args.plot:
        plot_report(rep, args.plot)
    print(text if args.json else format_report(rep))
    return 0


if __name__ == "__main__":
    if len(sys.argv) == 5 and sys.argv[1] == "--memory-child":
        print(json.dumps(_memory_child(sys.argv[2], sys.argv[3], int(sys.argv[4]))))
        sys.exit(0)
    _p = argparse.ArgumentParser(prog="python -m flashhead.bench")
    configure_parser(_p)
    sys.exit(run(_p.parse_args()))
