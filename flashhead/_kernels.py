"""A small compiled CPU kernel for stage 2: gather the probed clusters' rows and take their dot
products with the hidden state in one pass, without copying the rows anywhere.

Why: torch has no fused gather + GEMV; its best sequence (``index_select`` of ~1 MiB chunks into a
buffer, then ``mv``) reads every row from memory, writes it to the buffer and reads it again.
Measured on the dev machine (Gemma-3-270M, p = 559, LLC flushed, median of 60 greedy head calls):
2.25 -> 1.57 ms at batch 1 and 12.7 -> 7.8 ms at batch 8, same argmax on 512 real states.

The rows of a batch share most of their probed clusters (Gemma, batch 8: the union is 0.33-0.39 of
the B * p probes, ``benchmarks/batch_overlap_lab.py``), so the kernel visits the probes in cluster
order and reads each shared cluster from memory once. Kernel alone, real Gemma rows and states, LLC
flushed, median of 40 calls, row by row -> cluster order: p = 559: 1.06 -> 1.04 ms at batch 1,
7.58 -> 3.82 ms at batch 8; p = 1,118: 2.05 -> 1.66 ms and 14.66 -> 6.63 ms; bit-identical output.

The sorted pairs are split into one contiguous run per intra-op thread. On the first dev machine
(AMD EPYC) one thread already read at the machine's bandwidth; on dev-cpu-b (Intel Xeon VM) one
thread reads ~11 GB/s of 24.6, and two threads take Gemma's stage 2 (p = 1,372, 20 calls on real
states, LLC flushed, median) from 5.09 to 2.67 ms at batch 1 and 18.8 to 10.2 ms at batch 8, bit-
identical (docs/benchmarks.md).

The kernel is compiled once per machine with ``torch.utils.cpp_extension.load_inline`` (g++ and
ninja; ``scripts/setup.sh`` builds it) into ``<cache>/kernels/<key>``, the key covering the
source, the torch version and the CPU's instruction-set flags (it is built with
``-march=native``). Without a compiler, or with ``FLASHHEAD_NO_KERNEL=1``, :func:`gather_gemv`
returns None and the head uses its torch path (same results up to float rounding).
"""

from __future__ import annotations

import functools
import hashlib
import os
import platform
import warnings
from pathlib import Path

import torch

_SOURCE = r"""
#include <torch/extension.h>
#include <algorithm>
#include <utility>
#include <vector>
#include <ATen/Parallel.h>

// logits[n, j*cap + c] = rows[clusters[n, j], c, :] . h[n, :]   (fp32, one pass over the rows)
// The (row, probe) pairs are visited in ascending cluster order: a cluster probed by several rows of
// the batch is read from memory once and then served from cache, and the reads ascend through memory.
// Each logit is the same dot product in the same order as a row-by-row loop: same bits, any batch,
// any number of threads.
torch::Tensor gather_gemv(torch::Tensor rows, torch::Tensor clusters, torch::Tensor h) {
  const int64_t N = clusters.size(0), p = clusters.size(1), cap = rows.size(1), d = rows.size(2);
  auto out = torch::empty({N, p * cap}, h.options());
  const float* R = rows.data_ptr<float>();
  const int64_t* C = clusters.data_ptr<int64_t>();
  const float* H = h.data_ptr<float>();
  float* O = out.data_ptr<float>();
  std::vector<std::pair<int64_t, int64_t>> order(N * p);  // (cluster, flat index n * p + j)
  for (int64_t i = 0; i < N * p; ++i) order[i] = {C[i], i};
  std::sort(order.begin(), order.end());
  // one contiguous run of the sorted pairs per intra-op thread (torch.set_num_threads)
  const int64_t total = N * p, nt = at::get_num_threads();
  at::parallel_for(0, total, std::max<int64_t>(16, (total + nt - 1) / nt), [&](int64_t lo, int64_t hi) {
    for (int64_t q = lo; q < hi; ++q) {
      const int64_t k = order[q].first, i = order[q].second;
      const float* base = R + k * cap * d;
      const float* hn = H + (i / p) * d;
      float* o = O + i * cap;
      for (int64_t c = 0; c < cap; ++c) {
        const float* r = base + c * d;
        float acc = 0.f;
        #pragma omp simd reduction(+:acc)
        for (int64_t t = 0; t < d; ++t) acc += r[t] * hn[t];
        o[c] = acc;
      }
    }
  });
  return out;
}
"""


# -fopenmp: at::parallel_for splits the pairs over torch's intra-op threads; the extension links
# libgomp.so.1, which resolves to the copy torch has already loaded (one OpenMP runtime)
_CFLAGS = ["-O3", "-march=native", "-fopenmp"]


def _cpu_flags() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return line
    except OSError:
        pass
    return platform.processor()


@functools.lru_cache(maxsize=1)
def _module():
    """The compiled extension, or None when it cannot be built here (warns once)."""
    if os.environ.get("FLASHHEAD_NO_KERNEL") == "1":
        return None
    from torch.utils.cpp_extension import load_inline

    from ._io import cache_dir

    key = hashlib.sha256(f"{_SOURCE}|{_CFLAGS}|{torch.__version__}|{_cpu_flags()}".encode()).hexdigest()[:16]
    folder = cache_dir() / "kernels" / key
    folder.mkdir(parents=True, exist_ok=True)
    try:
        return load_inline(f"flashhead_stage2_{key}", cpp_sources=_SOURCE, functions=["gather_gemv"],
                           extra_cflags=_CFLAGS, extra_ldflags=["-fopenmp"], build_directory=str(folder),
                           verbose=False)
    except Exception as e:  # no compiler / ninja: the torch path is correct, only slower
        warnings.warn(f"flashhead: the stage-2 kernel could not be built ({type(e).__name__}: {e}); "
                      "using the slower torch path. Install g++ and ninja, or set FLASHHEAD_NO_KERNEL=1 to "
                      "silence this.", RuntimeWarning, stacklevel=3)
        return None


def gather_gemv(rows: torch.Tensor, clusters: torch.Tensor, h: torch.Tensor) -> torch.Tensor | None:
    """Stage-2 logits ``[N, p*cap]`` of fp32 CPU ``rows [K, cap, d]`` for ``clusters [N, p]`` (int64)
    and ``h [N, d]``, or None when the kernel does not apply (other dtype/device, or not built)."""
    if not (rows.device.type == "cpu" and rows.dtype == torch.float32 and rows.is_contiguous()):
        return None
    mod = _module()
    if mod is None:
        return None
    return mod.gather_gemv(rows, clusters.contiguous(), h.float().contiguous())


def build() -> bool:
    """Compile the kernel now (set-up calls this); True when it is available."""
    return _module() is not None
