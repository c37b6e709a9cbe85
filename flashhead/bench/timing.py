"""The timing harness: the machine, cache flushing, interleaved timing of head calls, bandwidth.

Before every timed call a buffer of twice the last-level cache (at least 64 MiB) is rewritten, so
no head weight is cache-resident, as in a real decode step; the calls cycle through a pool of
distinct real hidden states, so no two consecutive calls probe the same clusters. Configurations
are timed interleaved (the order rotated every round) and the median is reported: on a shared
machine only ratios within one run count.
"""

from __future__ import annotations

import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

__all__ = ["HeadConfig", "CacheFlusher", "time_interleaved", "time_head_level", "measure_bandwidth",
           "machine_info", "cpu_busy", "wait_for_quiet", "loadavg", "log"]


def log(msg: str, quiet: bool) -> None:
    if not quiet:
        print(f"[bench] {msg}", file=sys.stderr, flush=True)


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


def loadavg() -> list[float]:
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
        log(f"machine busy ({100 * busy:.0f}% of CPUs used by others); waiting", quiet)
        time.sleep(10)
        busy = cpu_busy()
    return busy


def machine_info(threads: int) -> dict:
    return {
        "cpu": _cpu_model(), "logical_cpus": os.cpu_count(), "llc_bytes": _llc_bytes(),
        "torch": torch.__version__, "threads": threads, "python": platform.python_version(),
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "loadavg_start": loadavg(),
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


# --------------------------------------------------------------------------------- head level
@dataclass
class HeadConfig:
    """One head-level contender: ``fn(h [B, d] float32) -> ids [B]`` and what it reads per step."""

    name: str
    kind: str  # dense | flashhead | peer
    fn: Callable
    bytes_fixed: int  # bytes read once per step whatever the batch (weights shared by the batch)
    bytes_per_query: int  # bytes read per query row
    rows_per_query: float  # rows scored per query (centroids + candidates; V for dense)
    info: dict = field(default_factory=dict)


def time_head_level(configs: list[HeadConfig], states: torch.Tensor, batches: tuple[int, ...], repeats: int,
                    warmup: int, read_bps: float, quiet: bool) -> list[dict]:
    """One row per (configuration, batch): median time with the LLC flushed, bytes, bandwidth floor,
    speed-up and bytes against dense fp32 (which must be among ``configs``)."""
    flusher = CacheFlusher()
    rows = []
    with torch.inference_mode():
        for B in batches:
            pool = [states[i:i + B] for i in range(0, len(states) - B + 1, B)]
            log(f"head level, batch {B}: {len(configs)} configurations x {repeats} rounds, LLC flushed "
                f"({flusher.nbytes >> 20} MiB) before each call", quiet)
            ts = time_interleaved({c.name: c.fn for c in configs}, pool, repeats, warmup, flusher)
            for c in configs:
                s = _stats(ts[c.name])
                nbytes = c.bytes_fixed + B * c.bytes_per_query
                floor = nbytes / read_bps * 1e6
                rows.append({"name": c.name, "kind": c.kind, "batch": B, **s, "bytes_per_step": nbytes,
                             "rows_per_query": c.rows_per_query, "floor_us": floor,
                             "floor_fraction": floor / s["median_us"], **c.info})
    base = {r["batch"]: r["median_us"] for r in rows if r["name"] == "dense-fp32"}
    dense_bytes = {r["batch"]: r["bytes_per_step"] for r in rows if r["name"] == "dense-fp32"}
    for r in rows:
        r["speedup_vs_dense_fp32"] = base[r["batch"]] / r["median_us"]
        r["bytes_vs_dense_fp32"] = r["bytes_per_step"] / dense_bytes[r["batch"]]
    return rows
