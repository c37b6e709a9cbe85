"""Small compiled CPU kernels. Stage 2: gather the probed clusters' rows and take their dot
products with the hidden state in one pass, without copying the rows anywhere.

Why: torch has no fused gather + GEMV; its best sequence (``index_select`` into a buffer, then ``mv``)
reads every row, writes it to the buffer and reads it again. The kernel visits a batch's (row, probe)
pairs in cluster order, so a cluster probed by several rows of the batch is read from memory once,
and splits the sorted pairs over torch's intra-op threads; every logit is the same dot product in the
same order whatever the batch or thread count. Three row formats: fp32 rows; Q8_0 rows (int8 plus one
scale per 32 weights, the GGUF layout) dotted with an fp32 hidden state; and Q8_0 rows dotted with a
Q8_0 hidden state as ggml's q8_0 x q8_0 product does. Stage 1: int8 or int4 centroids times an int8
hidden state, one pass over the centroids (torch's int4 kernel packs for GEMMs and reads them at about
half that speed for one row), and the top p of the scores by radix selection (several times faster
than ``torch.topk``). Building: the balanced k-means' auction, thousands of rounds of
small steps, replayed bit for bit in one call. Measurements: docs/kernels.md, docs/benchmarks.md.

Compiled once per environment with ``torch.utils.cpp_extension.load_inline`` (g++ and ninja;
``scripts/setup.sh`` builds it) into ``<cache>/kernels/<key>``, the key covering the source, the
torch version and install path (one build per environment), the target and the CPU's instruction-set
flags. The target is this CPU (``-march=native``) unless ``FLASHHEAD_KERNEL_ARCH`` names another gcc
``-march`` target: ``x86-64-v3`` (AVX2 + FMA, what AMD Zen 2/3 and many laptops run), ``x86-64-v2`` (no
AVX2: the scalar paths) or ``cascadelake`` (AVX-512 VNNI without AVX-VNNI); ``make test`` runs the kernel
tests once per target this CPU can execute (:func:`runnable_archs`), so every instruction-set path runs in CI.
Without a compiler, or with ``FLASHHEAD_NO_KERNEL=1``, the functions return None and the head uses its
torch path.
"""

from __future__ import annotations

import functools
import hashlib
import os
import platform
import re
import warnings
from pathlib import Path

import torch

_SOURCE = r"""
#include <torch/extension.h>
#include <algorithm>
#include <tuple>
#include <cmath>
#include <cstring>
#include <limits>
#include <utility>
#include <vector>
#include <ATen/Parallel.h>

// Asks for the cache lines of [p, p + bytes) ahead of their use
static inline void prefetch(const void* p, int64_t bytes) {
  for (int64_t l = 0; l < bytes; l += 64) __builtin_prefetch(static_cast<const char*>(p) + l);
}

// Calls dot(k, n, out) for every (row n, probe j) pair, k = clusters[n, j], out = the
// cap logits of that pair, in ascending cluster order: a cluster probed by several rows of the batch is
// read from memory once and then served from cache, and the reads ascend through memory. One
// contiguous run of the sorted pairs per intra-op thread (torch.set_num_threads). Two pairs ahead,
// dot(k, -1, nullptr) only prefetches cluster k: the clusters lie scattered through memory in steps the
// hardware prefetchers do not follow (measured 15-20% faster from DRAM at batch 1, docs/kernels.md).
template <typename F>
torch::Tensor for_pairs(const torch::Tensor& clusters, int64_t K, int64_t cap, F dot) {
  const int64_t N = clusters.size(0), p = clusters.size(1), total = N * p;
  auto out = torch::empty({N, p * cap}, torch::dtype(torch::kFloat32));
  const int64_t* C = clusters.data_ptr<int64_t>();
  float* O = out.data_ptr<float>();
  // flat indices n * p + j by cluster, then index (a counting sort: no comparisons)
  std::vector<int64_t> start(K + 1, 0), order(total);
  for (int64_t i = 0; i < total; ++i) {
    TORCH_CHECK(C[i] >= 0 && C[i] < K, "flashhead: cluster id ", C[i], " out of range [0, ", K, ")");
    ++start[C[i] + 1];
  }
  for (int64_t k = 0; k < K; ++k) start[k + 1] += start[k];
  for (int64_t i = 0; i < total; ++i) order[start[C[i]]++] = i;
  const int64_t nt = at::get_num_threads();
  at::parallel_for(0, total, std::max<int64_t>(16, (total + nt - 1) / nt), [&](int64_t lo, int64_t hi) {
    for (int64_t q = lo; q < hi; ++q) {
      if (q + 2 < hi) dot(C[order[q + 2]], -1, nullptr);
      dot(C[order[q]], order[q] / p, O + order[q] * cap);
    }
  });
  return out;
}

// fp32 rows [K, cap, d] . h [N, d]
torch::Tensor gather_gemv(torch::Tensor rows, torch::Tensor clusters, torch::Tensor h) {
  const int64_t cap = rows.size(1), d = rows.size(2);
  const float* R = rows.data_ptr<float>();
  const float* H = h.data_ptr<float>();
  return for_pairs(clusters, rows.size(0), cap, [&](int64_t k, int64_t n, float* o) {
    if (!o) return prefetch(R + k * cap * d, cap * d * 4);
    const float* hn = H + n * d;
    for (int64_t c = 0; c < cap; ++c) {
      const float* r = R + (k * cap + c) * d;
      float acc = 0.f;
      #pragma omp simd reduction(+:acc)
      for (int64_t t = 0; t < d; ++t) acc += r[t] * hn[t];
      o[c] = acc;
    }
  });
}

#if defined(__AVX2__) && defined(__F16C__) && defined(__FMA__)
#define FH_AVX2 1
#include <immintrin.h>
#endif

static inline float scale_at(const float* s, int64_t b) { return s[b]; }
#ifdef FH_AVX2
static inline float scale_at(const at::Half* s, int64_t b) { return _cvtsh_ss(s[b].x); }
static inline __m128 scales4(const float* s) { return _mm_loadu_ps(s); }
static inline __m128 scales4(const at::Half* s) {
  return _mm_cvtph_ps(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(s)));
}
static inline float hsum8(__m256 v) {
  __m128 x = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  x = _mm_add_ps(x, _mm_movehl_ps(x, x));
  return _mm_cvtss_f32(_mm_add_ss(x, _mm_movehdup_ps(x)));
}
// u8 x s8 dot products of 4 bytes, added into 8 int32 lanes: VNNI where the CPU has it, else the same sums
// in two steps (no saturation: 2 x 127 x 127 and 2 x 15 x 127 fit int16)
static inline __m256i dot4(__m256i acc, __m256i u, __m256i s) {
#if defined(__AVXVNNI__)
  return _mm256_dpbusd_avx_epi32(acc, u, s);
#elif defined(__AVX512VNNI__) && defined(__AVX512VL__)
  return _mm256_dpbusd_epi32(acc, u, s);
#else
  return _mm256_add_epi32(acc, _mm256_madd_epi16(_mm256_maddubs_epi16(u, s), _mm256_set1_epi16(1)));
#endif
}
#else
static inline float scale_at(const at::Half* s, int64_t b) { return static_cast<float>(s[b]); }
#endif

// Which instruction-set path this build compiled (the tests check that a named target gets its own)
std::string isa_path() {
#if defined(FH_AVX2) && defined(__AVXVNNI__)
  return "avx2+avx-vnni";
#elif defined(FH_AVX2) && defined(__AVX512VNNI__) && defined(__AVX512VL__)
  return "avx2+avx512-vnni";
#elif defined(FH_AVX2)
  return "avx2";
#else
  return "scalar";
#endif
}

// One Q8_0 row (int8 r [d], scales s [d/32]) . fp32 h [d]: per block the sum of int8 * h (fp32), times the
// block's scale, added into running sum b % 2 (two independent chains), the two added at the end.
template <typename S>
static inline float q8_dot(const int8_t* r, const S* s, const float* h, int64_t nb) {
#ifdef FH_AVX2
  __m256 acc[2] = {_mm256_setzero_ps(), _mm256_setzero_ps()};
  for (int64_t b = 0; b < nb; ++b) {
    const int8_t* rb = r + b * 32;
    const float* hb = h + b * 32;
    const auto k = [&](int u) {
      return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(rb + u * 8))));
    };
    __m256 t = _mm256_mul_ps(k(0), _mm256_loadu_ps(hb));
    t = _mm256_fmadd_ps(k(1), _mm256_loadu_ps(hb + 8), t);
    t = _mm256_fmadd_ps(k(2), _mm256_loadu_ps(hb + 16), t);
    t = _mm256_fmadd_ps(k(3), _mm256_loadu_ps(hb + 24), t);
    acc[b & 1] = _mm256_fmadd_ps(_mm256_set1_ps(scale_at(s, b)), t, acc[b & 1]);
  }
  return hsum8(_mm256_add_ps(acc[0], acc[1]));
#else
  float acc[2] = {0.f, 0.f};
  for (int64_t b = 0; b < nb; ++b) {
    float t = 0.f;
    for (int j = 0; j < 32; ++j) t += static_cast<float>(r[b * 32 + j]) * h[b * 32 + j];
    acc[b & 1] += scale_at(s, b) * t;
  }
  return acc[0] + acc[1];
#endif
}

// One Q8_0 row . Q8_0 h (int8 q [d] in [-127, 127], fp32 qs [d/32] holding fp16 values): per block the
// exact int32 sum of the 32 int8 products, times scale_w * scale_h (two fp16 values: an exact product in
// fp32); block b is added into running sum b % 4, and the four are added at the end.
template <typename S>
static inline float q8q8_dot(const int8_t* r, const S* s, const int8_t* q, const float* qs, int64_t nb) {
  float acc[4] = {0.f, 0.f, 0.f, 0.f};
  int64_t b = 0;
#ifdef FH_AVX2
  // 8 int32 partial sums of one block: |r| (unsigned) times q with r's sign, int16 pairs, then int32
  const auto block = [&](int64_t i) {
    const __m256i x = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(r + i * 32));
    const __m256i y = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(q + i * 32));
    return dot4(_mm256_setzero_si256(), _mm256_sign_epi8(x, x), _mm256_sign_epi8(y, x));
  };
  __m128 acc4 = _mm_setzero_ps();
  for (; b + 4 <= nb; b += 4) {
    const __m256i s0123 = _mm256_hadd_epi32(_mm256_hadd_epi32(block(b), block(b + 1)),
                                            _mm256_hadd_epi32(block(b + 2), block(b + 3)));
    const __m128i isum = _mm_add_epi32(_mm256_castsi256_si128(s0123), _mm256_extracti128_si256(s0123, 1));
    const __m128 dd = _mm_mul_ps(scales4(s + b), _mm_loadu_ps(qs + b));
    acc4 = _mm_add_ps(acc4, _mm_mul_ps(_mm_cvtepi32_ps(isum), dd));
  }
  _mm_storeu_ps(acc, acc4);
#endif
  for (; b < nb; ++b) {
    int32_t isum = 0;
    for (int j = 0; j < 32; ++j) isum += static_cast<int16_t>(r[b * 32 + j]) * static_cast<int16_t>(q[b * 32 + j]);
    acc[b % 4] = acc[b % 4] + static_cast<float>(isum) * (scale_at(s, b) * qs[b]);
  }
  return (acc[0] + acc[1]) + (acc[2] + acc[3]);
}

// for_pairs' prefetch of cluster k's Q8_0 rows and scales
template <typename S>
static inline void prefetch_q8(const int8_t* R, const S* SC, int64_t k, int64_t cap, int64_t d, int64_t nb) {
  prefetch(R + k * cap * d, cap * d);
  prefetch(SC + k * cap * nb, cap * nb * sizeof(S));
}

// Q8_0 rows (int8 [K, cap, d], scales [K, cap, d/32]) . fp32 h [N, d]
template <typename S>
torch::Tensor q8_gemv(const torch::Tensor& rows, const torch::Tensor& scales, const torch::Tensor& clusters,
                      const torch::Tensor& h) {
  const int64_t cap = rows.size(1), d = rows.size(2), nb = d / 32;
  const int8_t* R = rows.data_ptr<int8_t>();
  const S* SC = scales.data_ptr<S>();
  const float* H = h.data_ptr<float>();
  return for_pairs(clusters, rows.size(0), cap, [&](int64_t k, int64_t n, float* o) {
    if (!o) return prefetch_q8(R, SC, k, cap, d, nb);
    for (int64_t c = 0; c < cap; ++c) o[c] = q8_dot(R + (k * cap + c) * d, SC + (k * cap + c) * nb, H + n * d, nb);
  });
}

// Q8_0 rows . Q8_0 h (int8 hq [N, d], fp32 hs [N, d/32])
template <typename S>
torch::Tensor q8q8_gemv(const torch::Tensor& rows, const torch::Tensor& scales, const torch::Tensor& clusters,
                        const torch::Tensor& hq, const torch::Tensor& hs) {
  const int64_t cap = rows.size(1), d = rows.size(2), nb = d / 32;
  const int8_t* R = rows.data_ptr<int8_t>();
  const S* SC = scales.data_ptr<S>();
  const int8_t* Q = hq.data_ptr<int8_t>();
  const float* QS = hs.data_ptr<float>();
  return for_pairs(clusters, rows.size(0), cap, [&](int64_t k, int64_t n, float* o) {
    if (!o) return prefetch_q8(R, SC, k, cap, d, nb);
    for (int64_t c = 0; c < cap; ++c)
      o[c] = q8q8_dot(R + (k * cap + c) * d, SC + (k * cap + c) * nb, Q + n * d, QS + n * nb, nb);
  });
}

// Exact int32 sums of one int8 row r [D] with R int8 rows x [R, D] (isum [R]); |r| taken once for the R rows
template <int R>
static inline void int8_tile(const int8_t* r, const int8_t* x, int64_t D, int32_t* isum) {
  int64_t t = 0;
  for (int i = 0; i < R; ++i) isum[i] = 0;
#ifdef FH_AVX2
  __m256i acc[R];
  for (int i = 0; i < R; ++i) acc[i] = _mm256_setzero_si256();
  for (; t + 32 <= D; t += 32) {  // |r| (unsigned) times x with r's sign
    const __m256i u = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(r + t)), au = _mm256_sign_epi8(u, u);
    for (int i = 0; i < R; ++i)
      acc[i] = dot4(acc[i], au, _mm256_sign_epi8(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(x + i * D + t)), u));
  }
  for (int i = 0; i < R; ++i) {
    __m128i s4 = _mm_add_epi32(_mm256_castsi256_si128(acc[i]), _mm256_extracti128_si256(acc[i], 1));
    s4 = _mm_hadd_epi32(s4, s4);
    isum[i] = _mm_cvtsi128_si32(_mm_hadd_epi32(s4, s4));
  }
#endif
  for (; t < D; ++t)
    for (int i = 0; i < R; ++i) isum[i] += static_cast<int32_t>(r[t]) * static_cast<int32_t>(x[i * D + t]);
}

// Stage 1 in int8: per-centroid int8 q [K, D] (scale s [K]) . per-row int8 hq [N, D] (scale a [N]):
// float(exact int32 sum) * a[n] * s[k], as torch._int_mm(hq, q.t()).float() * a * s. Parallel over K,
// 4 rows of hq at a time; every score is the same integer sum and the same two roundings whatever the
// batch or thread count.
torch::Tensor int8_scores(torch::Tensor q, torch::Tensor s, torch::Tensor hq, torch::Tensor a) {
  const int64_t K = q.size(0), D = q.size(1), N = hq.size(0);
  auto out = torch::empty({N, K}, torch::dtype(torch::kFloat32));
  const int8_t* Q = q.data_ptr<int8_t>();
  const int8_t* H = hq.data_ptr<int8_t>();
  const float* S = s.data_ptr<float>();
  const float* A = a.data_ptr<float>();
  float* O = out.data_ptr<float>();
  at::parallel_for(0, K, 256, [&](int64_t lo, int64_t hi) {
    int32_t isum[4];
    for (int64_t k = lo; k < hi; ++k) {
      for (int64_t n = 0; n < N;) {
        const int64_t R = N - n >= 4 ? 4 : 1;  // as int4_scores: 4 rows at a time, the rest one by one
        if (R == 4) int8_tile<4>(Q + k * D, H + n * D, D, isum);
        else int8_tile<1>(Q + k * D, H + n * D, D, isum);
        for (int64_t i = 0; i < R; ++i, ++n) O[n * K + k] = static_cast<float>(isum[i]) * A[n] * S[k];
      }
    }
  });
  return out;
}

// x [n] in int8 with one scale, as Q8_0 rounds a block: int8 = round-half-even(x * (127 / amax)); returns amax
static inline float int8_block(const float* x, int64_t n, int8_t* q) {
  float amax = 0.f;
  for (int64_t j = 0; j < n; ++j) amax = std::max(amax, std::fabs(x[j]));
  const float mult = amax > 0.f ? 127.f / amax : 0.f;
  for (int64_t j = 0; j < n; ++j) q[j] = static_cast<int8_t>(std::nearbyint(x[j] * mult));
  return amax;
}

#ifdef FH_AVX2
static inline __m256 bf16x8(const uint16_t* p) {
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))), 16));
}

// int4_scores for R rows of h against one block of 8 centroids (R x 8 scores into res): each row's sums in the
// same order whatever R, the block's nibbles unpacked once for the R rows
template <int R>
static inline void int4_tile(const uint8_t* qb, const uint16_t* szb, const int8_t* x, const float* a, const int32_t* S,
                             const float* H, const float* hm, int64_t D, int64_t G, int64_t g, float* res) {
  const __m256i nib = _mm256_set1_epi8(0x0F);
  __m256 acc[R];
  for (int r = 0; r < R; ++r) acc[r] = _mm256_set1_ps(hm[r]);
  for (int64_t gi = 0; gi < G; ++gi) {
    __m256i isum[R];
    for (int r = 0; r < R; ++r) isum[r] = _mm256_setzero_si256();
    for (int64_t j = gi * g / 8; j < (gi + 1) * g / 8; ++j) {
      const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(qb + j * 32));
      const __m256i lo = _mm256_and_si256(v, nib), hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), nib);
      for (int r = 0; r < R; ++r) {
        int32_t h0, h1;
        std::memcpy(&h0, x + r * D + 8 * j, 4);
        std::memcpy(&h1, x + r * D + 8 * j + 4, 4);
        isum[r] = dot4(dot4(isum[r], lo, _mm256_set1_epi32(h0)), hi, _mm256_set1_epi32(h1));
      }
    }
    const __m256 s = bf16x8(szb + gi * 16), z = bf16x8(szb + gi * 16 + 8);
    for (int r = 0; r < R; ++r) {
      const __m256i centred = _mm256_sub_epi32(isum[r], _mm256_set1_epi32(8 * S[r * G + gi]));
      acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(centred), _mm256_mul_ps(s, _mm256_set1_ps(a[r * G + gi])), acc[r]);
      acc[r] = _mm256_fmadd_ps(z, _mm256_set1_ps(H[r * G + gi]), acc[r]);
    }
  }
  for (int r = 0; r < R; ++r) _mm256_storeu_ps(res + 8 * r, acc[r]);
}
#endif

// Stage 1 in int4 (head.py, int4 mode): the centroids minus their mean in G groups of g weights (g % 8 == 0), codes
// q in [0, 15] with a bf16 scale s and zero z per group, c = (q - 8) s + z, centroids taken 8 at a time (K padded to
// 8). q4 [K8 / 8, D * 4] bytes: per block of 8 centroids, per 8 weights 8j..8j+7, 32 bytes, byte 4c + b holding
// weight 8j + b of centroid c (low nibble) and weight 8j + 4 + b (high nibble). sz [K8 / 8, G, 2, 8]: scales, then
// zeros, of the block's 8 centroids. The centred codes q - 8 take h per group in int8 (a_g = amax / 127, round half
// even), the zeros take it in fp32: score[n, k] = h . mean + sum_g (s_kg a_g (I_kg - 8 S_g) + z_kg H_g), with I the
// exact int32 sum of q * hq over the group, S_g that of hq and H_g the fp32 sum of h. Every score is computed alone,
// in one order, whatever the batch or thread count.
torch::Tensor int4_scores(torch::Tensor q4, torch::Tensor sz, torch::Tensor mean, torch::Tensor h, int64_t K) {
  const int64_t nblk = q4.size(0), D = q4.size(1) / 4, G = sz.size(1), g = D / G, N = h.size(0), d = h.size(1);
  TORCH_CHECK(g % 8 == 0 && D == G * g && d <= D && mean.numel() == d && K <= nblk * 8, "int4_scores: bad shapes");
  auto hq_t = torch::zeros({N, D}, torch::dtype(torch::kInt8));
  std::vector<float> a(N * G, 0.f), H(N * G, 0.f), hm(N);
  std::vector<int32_t> S(N * G, 0);
  const float* X = h.data_ptr<float>();
  const float* M = mean.data_ptr<float>();
  int8_t* HQ = hq_t.data_ptr<int8_t>();
  for (int64_t n = 0; n < N; ++n) {
    const float* x = X + n * d;
    float m = 0.f;
    for (int64_t t = 0; t < d; ++t) m += x[t] * M[t];
    hm[n] = m;
    for (int64_t gi = 0; gi < G; ++gi) {
      const int64_t t0 = gi * g, t1 = std::min(d, t0 + g);
      a[n * G + gi] = int8_block(x + t0, t1 - t0, HQ + n * D + t0) / 127.f;
      for (int64_t t = t0; t < t1; ++t) {
        S[n * G + gi] += HQ[n * D + t];
        H[n * G + gi] += x[t];
      }
    }
  }
  auto out = torch::empty({N, K}, torch::dtype(torch::kFloat32));
  const uint8_t* Q = q4.data_ptr<uint8_t>();
  const uint16_t* SZ = reinterpret_cast<const uint16_t*>(sz.data_ptr<at::BFloat16>());
  float* O = out.data_ptr<float>();
  at::parallel_for(0, nblk, 32, [&](int64_t lo, int64_t hi) {
    for (int64_t blk = lo; blk < hi; ++blk) {
      const uint8_t* qb = Q + blk * D * 4;
      const uint16_t* szb = SZ + blk * G * 16;
      if (blk + 4 < hi) prefetch(qb + 4 * D * 4, D * 4);  // 4 blocks ahead: measured ~20% faster from DRAM
      for (int64_t n = 0; n < N;) {
        float res[4 * 8];
#ifdef FH_AVX2
        const int64_t R = N - n >= 4 ? 4 : 1;  // 4 rows share each unpacked block; the same sums either way
        if (R == 4) int4_tile<4>(qb, szb, HQ + n * D, &a[n * G], &S[n * G], &H[n * G], &hm[n], D, G, g, res);
        else int4_tile<1>(qb, szb, HQ + n * D, &a[n * G], &S[n * G], &H[n * G], &hm[n], D, G, g, res);
#else
        const int64_t R = 1;
        const int8_t* x = HQ + n * D;
        const auto bf16 = [](uint16_t v) { uint32_t u = static_cast<uint32_t>(v) << 16; float f; std::memcpy(&f, &u, 4); return f; };
        for (int c = 0; c < 8; ++c) {
          float acc = hm[n];
          for (int64_t gi = 0; gi < G; ++gi) {
            int32_t isum = 0;
            for (int64_t j = gi * g / 8; j < (gi + 1) * g / 8; ++j)
              for (int b = 0; b < 4; ++b) {
                const uint8_t byte = qb[j * 32 + 4 * c + b];
                isum += static_cast<int32_t>(byte & 0x0F) * x[8 * j + b] + static_cast<int32_t>(byte >> 4) * x[8 * j + 4 + b];
              }
            const float s = bf16(szb[gi * 16 + c]), z = bf16(szb[gi * 16 + 8 + c]);
            acc = std::fma(static_cast<float>(isum - 8 * S[n * G + gi]), s * a[n * G + gi], acc);
            acc = std::fma(z, H[n * G + gi], acc);
          }
          res[c] = acc;
        }
#endif
        for (int64_t r = 0; r < R; ++r, ++n)
          for (int64_t c = 0; c < 8 && blk * 8 + c < K; ++c) O[n * K + blk * 8 + c] = res[r * 8 + c];
      }
    }
  });
  return out;
}

// The p largest scores of each row [N, K] (p < K), in no particular order; of the scores equal to the p-th largest,
// the smallest ids. Radix selection on the scores' bits mapped to an order-preserving uint32, digits of 11, 11 and
// 10 bits: a histogram of the candidates' digit finds the bin holding the p-th largest, a branch-free pass takes
// every candidate above that bin and keeps the bin's own (in id order) as the next digit's candidates. No
// data-dependent branch, unlike a sort or nth_element. torch.topk(sorted=False) picks the same set up to ties.
torch::Tensor top_unsorted(torch::Tensor scores, int64_t p) {
  const int64_t N = scores.size(0), K = scores.size(1);
  TORCH_CHECK(p >= 1 && p < K && K < (int64_t(1) << 31), "top_unsorted: need 1 <= p < K < 2^31");
  auto out = torch::empty({N, p}, torch::dtype(torch::kInt64));
  const float* S = scores.data_ptr<float>();
  int64_t* O = out.data_ptr<int64_t>();
  // scratch kept between calls: fresh buffers this size would be fresh pages from the OS, faulted in every call
  thread_local std::vector<uint32_t> key;
  thread_local std::vector<int32_t> cand, next;
  thread_local std::vector<int32_t> hist(4 * 2048);  // four interleaved histograms: no chain of increments to one bin
  key.resize(K);
  cand.resize(K);
  next.resize(K);
  for (int64_t n = 0; n < N; ++n) {
    const uint32_t* u = reinterpret_cast<const uint32_t*>(S + n * K);
    for (int64_t k = 0; k < K; ++k) {  // larger float, larger key; -0 (key 2^31 - 1) taken as +0 (key 2^31)
      const uint32_t v = u[k] ^ (static_cast<uint32_t>(static_cast<int32_t>(u[k]) >> 31) | 0x80000000u);
      key[k] = v + (v == 0x7FFFFFFFu);
    }
    int64_t* o = O + n * p;
    int64_t m = K, taken = 0, need = p;  // taken + need == p; some candidate always remains needed
    for (const int sh : {21, 10, 0}) {
      const uint32_t mask = sh == 0 ? 1023u : 2047u;
      const bool all = sh == 21;  // the first digit's candidates are all K ids, in order
      std::fill(hist.begin(), hist.end(), 0);
      for (int64_t q = 0; q < m; ++q) ++hist[(q & 3) * 2048 + ((key[all ? q : cand[q]] >> sh) & mask)];
      uint32_t bin = mask;
      for (;; --bin) {
        const int64_t c = hist[bin] + hist[2048 + bin] + hist[4096 + bin] + hist[6144 + bin];
        if (need <= c) break;
        need -= c;
      }
      int64_t kept = 0;
      for (int64_t q = 0; q < m; ++q) {  // write, then advance only the list the candidate belongs to
        const int32_t k = all ? static_cast<int32_t>(q) : cand[q];
        const uint32_t digit = (key[k] >> sh) & mask;
        o[taken] = k;
        taken += digit > bin;
        next[kept] = k;
        kept += digit == bin;
      }
      cand.swap(next);
      m = kept;
    }
    std::copy(cand.begin(), cand.begin() + need, o + taken);  // equal scores: the smallest ids
  }
  return out;
}

// h [N, d] fp32 in Q8_0, as head.q8_0_quantize: per block of 32, amax = max |x|, int8 = round-half-even
// (x * (127 / amax)), scale = fp16(amax / 127) held in fp32.
std::vector<torch::Tensor> q8_0_quantize(torch::Tensor x) {
  const int64_t N = x.size(0), d = x.size(1), nb = d / 32;
  auto q = torch::empty({N, d}, torch::dtype(torch::kInt8));
  auto s = torch::empty({N, nb}, torch::dtype(torch::kFloat32));
  const float* X = x.data_ptr<float>();
  int8_t* Q = q.data_ptr<int8_t>();
  float* S = s.data_ptr<float>();
  for (int64_t b = 0; b < N * nb; ++b)
    S[b] = static_cast<float>(at::Half(int8_block(X + b * 32, 32, Q + b * 32) / 127.f));
  return {q, s};
}

// Greedy token per row over Q8_0 rows: the logits of the probed clusters' slots (as q8[q8]_gather_gemv) and of
// the always-scored slots, the largest wins, ties to the smallest token id as torch.argmax over dense logits
// does; empty slots (id -1) never compete. One call instead of ~20 small torch ops per decode step.
// With margin (per row), logits holds approximations within margin[n] / 2 of the logits dot(slot, n) gives:
// only the slots within margin[n] of the row's best approximation can hold the largest dot(slot, n), so only
// they are rescored with dot, and the token is the one scoring every slot with dot would pick.
template <typename Dot>
torch::Tensor q8_greedy_impl(const torch::Tensor& logits, const torch::Tensor& slot_token, const torch::Tensor& clusters,
                             const torch::Tensor& always_slots, int64_t cap, Dot dot, const float* margin) {
  const int64_t N = clusters.size(0), p = clusters.size(1), A = always_slots.size(0);
  auto best = torch::empty({N}, torch::dtype(torch::kInt64));
  const float* L = logits.data_ptr<float>();
  const int64_t* T = slot_token.data_ptr<int64_t>();
  const int64_t* C = clusters.data_ptr<int64_t>();
  const int64_t* AS = always_slots.data_ptr<int64_t>();
  int64_t* B = best.data_ptr<int64_t>();
  const float inf = std::numeric_limits<float>::infinity();
  at::parallel_for(0, N, 1, [&](int64_t n0, int64_t n1) {
    for (int64_t n = n0; n < n1; ++n) {
      float top = -inf, cut = -inf;
      int64_t id = std::numeric_limits<int64_t>::max();
      const auto offer = [&](float v, int64_t t) {
        if (v > top || (v == top && t < id)) { top = v; id = t; }
      };
      if (margin) {
        for (int64_t j = 0; j < p; ++j) {
          const int64_t* ts = T + C[n * p + j] * cap;
          const float* l = L + (n * p + j) * cap;
          for (int64_t c = 0; c < cap; ++c) if (ts[c] >= 0) cut = std::max(cut, l[c]);
        }
        cut -= margin[n];
      }
      for (int64_t j = 0; j < p; ++j) {
        const int64_t k = C[n * p + j];
        const int64_t* ts = T + k * cap;
        const float* l = L + (n * p + j) * cap;
        for (int64_t c = 0; c < cap; ++c) {
          if (ts[c] < 0) continue;
          if (!margin) offer(l[c], ts[c]);
          else if (l[c] >= cut) offer(dot(k * cap + c, n), ts[c]);
        }
      }
      for (int64_t a = 0; a < A; ++a) offer(dot(AS[a], n), T[AS[a]]);
      B[n] = id;
    }
  });
  return best;
}

torch::Tensor q8_gather_gemv(torch::Tensor rows, torch::Tensor scales, torch::Tensor clusters, torch::Tensor h) {
  if (scales.scalar_type() == torch::kFloat16) return q8_gemv<at::Half>(rows, scales, clusters, h);
  return q8_gemv<float>(rows, scales, clusters, h);
}

torch::Tensor q8q8_gather_gemv(torch::Tensor rows, torch::Tensor scales, torch::Tensor clusters, torch::Tensor hq,
                               torch::Tensor hs) {
  if (scales.scalar_type() == torch::kFloat16) return q8q8_gemv<at::Half>(rows, scales, clusters, hq, hs);
  return q8q8_gemv<float>(rows, scales, clusters, hq, hs);
}

template <typename S>
torch::Tensor q8_greedy_t(const torch::Tensor& rows, const torch::Tensor& scales, const torch::Tensor& slot_token,
                          const torch::Tensor& clusters, const torch::Tensor& h, const torch::Tensor& always_slots,
                          bool quantize, const torch::Tensor& block_l1) {
  const int64_t N = h.size(0), cap = rows.size(1), d = rows.size(2), nb = d / 32;
  const int8_t* R = rows.data_ptr<int8_t>();
  const S* SC = scales.data_ptr<S>();
  const float* H = h.data_ptr<float>();
  const auto act = q8_0_quantize(h);
  const int8_t* Q = act[0].data_ptr<int8_t>();
  const float* QS = act[1].data_ptr<float>();
  const auto approx = q8q8_gemv<S>(rows, scales, clusters, act[0], act[1]);
  if (quantize)
    return q8_greedy_impl(approx, slot_token, clusters, always_slots, cap, [&](int64_t slot, int64_t n) {
      return q8q8_dot(R + slot * d, SC + slot * nb, Q + n * d, QS + n * nb, nb);
    }, nullptr);
  // fp32 h, at about the cost of int8 products: a row's Q8_0-h logit differs from its fp32-h logit by at most
  // sum_b l1_b * e_b (l1_b: the largest sum |w| over block b of any row, block_l1; e_b: the largest
  // |h - dequantized h| in block b), plus both kernels' float rounding: each sums terms whose sizes add up
  // to about sum_b l1_b * amax_b (amax_b = max |h| in block b) with under nb + 12 roundings, so
  // (3 nb + 24) * 2^-23 of that covers both with room. Twice the total is the margin.
  const float* L1 = block_l1.data_ptr<float>();
  const float slack = (3.f * nb + 24.f) * std::ldexp(1.f, -23);
  std::vector<float> margin(N);
  for (int64_t n = 0; n < N; ++n) {
    float m = 0.f;
    for (int64_t b = 0; b < nb; ++b) {
      float amax = 0.f, e = 0.f;
      for (int64_t j = b * 32; j < b * 32 + 32; ++j) {
        amax = std::max(amax, std::fabs(H[n * d + j]));
        e = std::max(e, std::fabs(H[n * d + j] - Q[n * d + j] * QS[n * nb + b]));
      }
      m += L1[b] * (e + slack * amax);
    }
    margin[n] = 2.f * m * (1.f + slack);
  }
  return q8_greedy_impl(approx, slot_token, clusters, always_slots, cap, [&](int64_t slot, int64_t n) {
    return q8_dot(R + slot * d, SC + slot * nb, H + n * d, nb);
  }, margin.data());
}

// Balanced k-means' forward auction (flashhead/cluster.py, _auction, which documents it): the same rounds,
// stable orders and float32 arithmetic as that torch code, so the same owners bit for bit, in one call
// instead of ~30 small tensor ops per round (thousands of rounds per build). members: padding already
// replaced by a real member (its cost is inf). Returns (owner [n], rounds).
std::tuple<torch::Tensor, int64_t> auction(torch::Tensor cost, torch::Tensor members, torch::Tensor row_group,
                                           torch::Tensor capacity, double eps, double big, int64_t stop_below,
                                           int64_t max_rounds, int64_t patience) {
  const int64_t n = cost.size(0), W = cost.size(1), K = capacity.size(0);
  const float* CO = cost.data_ptr<float>();
  const int64_t* MB = members.data_ptr<int64_t>();
  const int64_t* RG = row_group.data_ptr<int64_t>();
  const int64_t* CP = capacity.data_ptr<int64_t>();
  const float inf = std::numeric_limits<float>::infinity();
  const float epsf = static_cast<float>(eps), bigf = static_cast<float>(big);
  const int64_t cap = *std::max_element(CP, CP + K);
  std::vector<float> slot_pr(K * cap, 0.f), price(K);
  std::vector<int64_t> slot_pt(K * cap, -1);
  for (int64_t k = 0; k < K; ++k) {
    for (int64_t j = CP[k]; j < cap; ++j) slot_pr[k * cap + j] = inf;  // slots that do not exist
    price[k] = *std::min_element(&slot_pr[k * cap], &slot_pr[k * cap] + cap);
  }
  auto owner = torch::full({n}, -1, torch::dtype(torch::kInt64));
  int64_t* OW = owner.data_ptr<int64_t>();
  std::vector<int64_t> todo(n);
  for (int64_t i = 0; i < n; ++i) todo[i] = i;
  struct Bid { int64_t k; float bid; int64_t pos; int64_t who; };
  std::vector<Bid> bids;
  std::vector<int64_t> next, out;
  std::vector<std::pair<float, int64_t>> merged;  // (price, column) of a cluster's incumbents then bids
  int64_t rounds = 0, low = n + 1, low_round = 0;
  while (static_cast<int64_t>(todo.size()) > stop_below && rounds < max_rounds && rounds - low_round <= patience) {
    if (static_cast<int64_t>(todo.size()) < low) { low = todo.size(); low_round = rounds; }
    ++rounds;
    bids.resize(todo.size());
    for (size_t q = 0; q < todo.size(); ++q) {  // best and second best cost + price (first minimum wins)
      const int64_t t = todo[q];
      const int64_t* kc = MB + RG[t] * W;
      const float* c = CO + t * W;
      float c1 = inf, c2 = inf;
      int64_t j1 = 0;
      for (int64_t j = 0; j < W; ++j) {
        const float v = c[j] + price[kc[j]];
        if (v < c1 || (j == 0)) { if (j > 0) c2 = std::min(c2, c1); c1 = v; j1 = j; }
        else c2 = std::min(c2, v);
      }
      if (W < 2) c2 = inf;
      const float margin = std::min(c2 - c1, bigf);
      bids[q] = {kc[j1], (price[kc[j1]] + margin) + epsf, static_cast<int64_t>(q), t};
    }
    std::stable_sort(bids.begin(), bids.end(), [](const Bid& a, const Bid& b) {  // by cluster, then highest bid
      return a.k != b.k ? a.k < b.k : a.bid > b.bid;
    });
    next.clear();
    out.clear();
    for (size_t a = 0; a < bids.size();) {
      size_t e = a;
      while (e < bids.size() && bids[e].k == bids[a].k) ++e;
      const int64_t k = bids[a].k, kept = std::min<int64_t>(e - a, cap);
      merged.clear();
      for (int64_t j = 0; j < cap; ++j) merged.push_back({slot_pr[k * cap + j], j});
      for (int64_t j = 0; j < cap; ++j) merged.push_back({j < kept ? bids[a + j].bid : -inf, cap + j});
      std::stable_sort(merged.begin(), merged.end(), [](const auto& x, const auto& y) { return x.first > y.first; });
      std::vector<int64_t> pt(2 * cap);
      for (int64_t j = 0; j < cap; ++j) { pt[j] = slot_pt[k * cap + j]; pt[cap + j] = j < kept ? bids[a + j].who : -1; }
      float lowest = inf;
      for (int64_t j = 0; j < cap; ++j) {
        slot_pr[k * cap + j] = merged[j].first;
        slot_pt[k * cap + j] = pt[merged[j].second];
        lowest = std::min(lowest, merged[j].first);
      }
      price[k] = lowest;
      for (int64_t j = cap; j < 2 * cap; ++j) {
        const int64_t w = pt[merged[j].second];
        if (w >= 0) { out.push_back(w); OW[w] = -1; }
      }
      for (int64_t j = 0; j < cap; ++j) if (slot_pt[k * cap + j] >= 0) OW[slot_pt[k * cap + j]] = k;
      for (size_t r = a + kept; r < e; ++r) next.push_back(bids[r].who);
      a = e;
    }
    out.insert(out.end(), next.begin(), next.end());  // the evicted, then the bids no slot took
    todo.swap(out);
  }
  if (!todo.empty()) {  // greedy completion: nearest cluster of the group with a free slot
    std::vector<int64_t> free_(CP, CP + K);
    for (int64_t i = 0; i < n; ++i) if (OW[i] >= 0) --free_[OW[i]];
    std::sort(todo.begin(), todo.end());
    struct Pick { int64_t k; float c; int64_t pos; int64_t who; };
    std::vector<Pick> picks;
    while (!todo.empty()) {
      picks.clear();
      for (size_t q = 0; q < todo.size(); ++q) {
        const int64_t t = todo[q];
        const int64_t* kc = MB + RG[t] * W;
        float c1 = inf;
        int64_t j1 = 0;
        for (int64_t j = 0; j < W; ++j) {
          const float v = free_[kc[j]] <= 0 ? inf : CO[t * W + j];
          if (v < c1 || j == 0) { c1 = v; j1 = j; }
        }
        TORCH_CHECK(std::isfinite(c1), "balanced_kmeans: internal error, a group ran out of slots");
        picks.push_back({kc[j1], c1, static_cast<int64_t>(q), t});
      }
      std::stable_sort(picks.begin(), picks.end(), [](const Pick& a, const Pick& b) {
        return a.k != b.k ? a.k < b.k : a.c < b.c;
      });
      std::vector<int64_t> rest;
      std::vector<int64_t> taken(K, 0);
      for (size_t a = 0; a < picks.size();) {
        size_t e = a;
        while (e < picks.size() && picks[e].k == picks[a].k) ++e;
        const int64_t k = picks[a].k;
        for (size_t r = a; r < e; ++r) {
          if (static_cast<int64_t>(r - a) < free_[k]) { OW[picks[r].who] = k; ++taken[k]; }
          else rest.push_back(picks[r].who);
        }
        a = e;
      }
      for (int64_t k = 0; k < K; ++k) free_[k] -= taken[k];
      std::sort(rest.begin(), rest.end());
      todo.swap(rest);
    }
  }
  return {owner, rounds};
}

torch::Tensor q8_greedy(torch::Tensor rows, torch::Tensor scales, torch::Tensor slot_token, torch::Tensor clusters,
                        torch::Tensor h, torch::Tensor always_slots, bool quantize, torch::Tensor block_l1) {
  if (scales.scalar_type() == torch::kFloat16)
    return q8_greedy_t<at::Half>(rows, scales, slot_token, clusters, h, always_slots, quantize, block_l1);
  return q8_greedy_t<float>(rows, scales, slot_token, clusters, h, always_slots, quantize, block_l1);
}
"""

_FUNCTIONS = ["isa_path", "gather_gemv", "q8_gather_gemv", "q8q8_gather_gemv", "int8_scores", "int4_scores", "top_unsorted",
              "q8_0_quantize", "q8_greedy", "auction"]
#: named targets whose instruction sets are checked against this CPU before a build (/proc/cpuinfo flag names);
#: each selects one of the kernels' instruction-set paths (``dot4``, ``FH_AVX2``), named in ARCH_PATH
ARCH_CPU_FLAGS = {
    "x86-64-v2": ("ssse3", "sse4_1", "sse4_2", "popcnt"),
    "x86-64-v3": ("avx", "avx2", "fma", "f16c", "bmi1", "bmi2", "movbe", "abm"),
    "cascadelake": ("avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512cd", "avx512dq", "avx512vl", "avx512_vnni"),
}
ARCH_PATH = {"x86-64-v2": "scalar", "x86-64-v3": "avx2", "cascadelake": "avx2+avx512-vnni"}


def _cpu_flags() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return line
    except OSError:
        pass
    return platform.processor()


def runnable_archs() -> list[str]:
    """The named targets of :data:`ARCH_CPU_FLAGS` this CPU can execute (none off x86)."""
    flags = set(_cpu_flags().split())
    return [a for a, need in ARCH_CPU_FLAGS.items() if set(need) <= flags]


def native_path() -> str:
    """The instruction-set path a ``-march=native`` build takes on this CPU (see ``isa_path``)."""
    flags = set(_cpu_flags().split())
    if not {"avx2", "fma", "f16c"} <= flags:
        return "scalar"
    if "avx_vnni" in flags:
        return "avx2+avx-vnni"
    return "avx2+avx512-vnni" if {"avx512_vnni", "avx512vl"} <= flags else "avx2"


def other_path_archs() -> list[str]:
    """The runnable named targets whose path differs from the native build's: what ``make test`` reruns the
    kernel tests with, so every path this CPU can execute runs once."""
    return [a for a in runnable_archs() if ARCH_PATH[a] != native_path()]


def _arch() -> str:
    """The ``-march`` target: ``FLASHHEAD_KERNEL_ARCH``, else ``native``; a named target this CPU cannot
    execute is refused (a build for it would stop the process with an illegal instruction)."""
    arch = os.environ.get("FLASHHEAD_KERNEL_ARCH", "").strip() or "native"
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.+-]*", arch):
        raise ValueError(f"FLASHHEAD_KERNEL_ARCH={arch!r} is not a gcc -march target name (e.g. x86-64-v3)")
    missing = [f for f in ARCH_CPU_FLAGS.get(arch, ()) if f not in _cpu_flags().split()]
    if missing:
        raise ValueError(f"FLASHHEAD_KERNEL_ARCH={arch} needs CPU features this machine lacks ({', '.join(missing)}); "
                         f"choose one of {runnable_archs() or ['native']} or unset it")
    return arch


def _cflags() -> list[str]:
    # -fopenmp: at::parallel_for splits the pairs over torch's intra-op threads; the extension links
    # libgomp.so.1, which resolves to the copy torch has already loaded (one OpenMP runtime)
    return ["-O3", f"-march={_arch()}", "-fopenmp"]


@functools.lru_cache(maxsize=1)
def _module():
    """The compiled extension, or None when it cannot be built here (warns once)."""
    if os.environ.get("FLASHHEAD_NO_KERNEL") == "1":
        return None
    from torch.utils.cpp_extension import load_inline

    from ._io import cache_dir

    # torch's install path too: two environments sharing the cache would rebuild each other's build folder
    torch_at = Path(torch.__file__).parent
    cflags = _cflags()
    key = hashlib.sha256(f"{_SOURCE}|{cflags}|{torch.__version__}|{torch_at}|{_cpu_flags()}".encode()).hexdigest()[:16]
    folder = cache_dir() / "kernels" / key
    folder.mkdir(parents=True, exist_ok=True)
    try:
        return load_inline(f"flashhead_stage2_{key}", cpp_sources=_SOURCE, functions=_FUNCTIONS,
                           extra_cflags=cflags, extra_ldflags=["-fopenmp"], build_directory=str(folder),
                           verbose=False)
    except Exception as e:  # no compiler / ninja: the torch path is correct, only slower
        warnings.warn(f"flashhead: the stage-2 kernel could not be built ({type(e).__name__}: {e}); "
                      "using the slower torch path. Install g++ and ninja, or set FLASHHEAD_NO_KERNEL=1 to "
                      "silence this.", RuntimeWarning, stacklevel=3)
        return None


def _on_cpu(*tensors: torch.Tensor) -> bool:
    return all(t.device.type == "cpu" and t.is_contiguous() for t in tensors)


def gather_gemv(rows: torch.Tensor, clusters: torch.Tensor, h: torch.Tensor) -> torch.Tensor | None:
    """Stage-2 logits ``[N, p*cap]`` of fp32 CPU ``rows [K, cap, d]`` for ``clusters [N, p]`` (int64)
    and ``h [N, d]``, or None when the kernel does not apply (other dtype/device, or not built)."""
    if not (rows.dtype == torch.float32 and _on_cpu(rows)):
        return None
    mod = _module()
    if mod is None:
        return None
    return mod.gather_gemv(rows, clusters.contiguous(), h.float().contiguous())


def _q8_applies(rows: torch.Tensor, scales: torch.Tensor) -> bool:
    return (rows.dtype == torch.int8 and scales.dtype in (torch.float16, torch.float32) and _on_cpu(rows, scales)
            and rows.shape[-1] % 32 == 0)


def q8_gather_gemv(rows: torch.Tensor, scales: torch.Tensor, clusters: torch.Tensor, h: torch.Tensor
                   ) -> torch.Tensor | None:
    """Stage-2 logits ``[N, p*cap]`` of Q8_0 rows (int8 ``rows [K, cap, d]``, ``scales [K, cap, d/32]``
    fp16 or fp32) and fp32 ``h [N, d]``, or None when the kernel does not apply."""
    if not _q8_applies(rows, scales):
        return None
    mod = _module()
    if mod is None:
        return None
    return mod.q8_gather_gemv(rows, scales, clusters.contiguous(), h.float().contiguous())


def q8q8_gather_gemv(rows: torch.Tensor, scales: torch.Tensor, clusters: torch.Tensor, hq: torch.Tensor,
                     hs: torch.Tensor) -> torch.Tensor | None:
    """As :func:`q8_gather_gemv` with ``h`` in Q8_0 too (int8 ``hq [N, d]``, fp32 ``hs [N, d/32]``
    holding fp16 values), or None when the kernel does not apply."""
    if not _q8_applies(rows, scales):
        return None
    mod = _module()
    if mod is None:
        return None
    return mod.q8q8_gather_gemv(rows, scales, clusters.contiguous(), hq.contiguous(), hs.float().contiguous())


def int8_scores(q: torch.Tensor, scale: torch.Tensor, hq: torch.Tensor, a: torch.Tensor) -> torch.Tensor | None:
    """Stage-1 int8 scores ``[N, K]``: int8 centroids ``q [K, D]`` with fp32 ``scale [K]``, int8 ``hq [N, D]``
    with fp32 ``a [N]``; the bits of ``torch._int_mm(hq, q.t()).float() * a * scale``, at the bandwidth of one
    pass over ``q`` (``_int_mm`` reads it at about half of that for N = 1). None when the kernel does not apply."""
    if not (q.dtype == hq.dtype == torch.int8 and _on_cpu(q, scale, hq) and scale.dtype == torch.float32):
        return None
    mod = _module()
    if mod is None:
        return None
    return mod.int8_scores(q, scale, hq, a.float().reshape(-1).contiguous())


def int4_scores(q4: torch.Tensor, sz: torch.Tensor, mean: torch.Tensor, h: torch.Tensor, K: int) -> torch.Tensor | None:
    """Stage-1 int4 scores ``[N, K]`` (the kernel's comment gives the layout): nibbles ``q4 [K8/8, D*4]`` (uint8)
    and bf16 ``sz [K8/8, G, 2, 8]`` (scales, zeros) of the centroids 8 at a time, fp32 ``mean [d]`` and
    ``h [N, d]``, h taken per group in int8. None when the kernel does not apply."""
    if not (q4.dtype == torch.uint8 and sz.dtype == torch.bfloat16 and _on_cpu(q4, sz, mean)):
        return None
    mod = _module()
    if mod is None:
        return None
    return mod.int4_scores(q4, sz, mean.float().contiguous(), h.float().contiguous(), int(K))


def top_unsorted(scores: torch.Tensor, p: int) -> torch.Tensor | None:
    """Ids ``[N, p]`` of the ``p`` largest of each row of fp32 CPU ``scores [N, K]`` (``p < K``), in no particular
    order; ties at the p-th value go to the smallest ids (``torch.topk``'s set, up to ties). None when the
    kernel does not apply."""
    if not (scores.dtype == torch.float32 and scores.dim() == 2 and _on_cpu(scores)):
        return None
    mod = _module()
    return None if mod is None else mod.top_unsorted(scores, int(p))


def q8_0_quantize(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
    """:func:`flashhead.head.q8_0_quantize` of fp32 ``x [N, d]`` (d % 32 == 0) bit for bit, in one call; None
    when the kernel does not apply."""
    if not (x.dtype == torch.float32 and _on_cpu(x) and x.dim() == 2 and x.shape[1] % 32 == 0):
        return None
    mod = _module()
    return None if mod is None else tuple(mod.q8_0_quantize(x))


def q8_greedy(rows: torch.Tensor, scales: torch.Tensor, slot_token: torch.Tensor, clusters: torch.Tensor,
              h: torch.Tensor, always_slots: torch.Tensor, quantize: bool, block_l1: torch.Tensor) -> torch.Tensor | None:
    """Greedy tokens ``[N]`` over Q8_0 rows (``rows [K, cap, d]``, ``scales``, ``slot_token [K, cap]``): the
    probed ``clusters [N, p]`` plus the flat ``always_slots [A]``, fp32 ``h [N, d]`` taken as is or in Q8_0
    (``quantize``); the largest logit, ties to the smallest id. None when the kernel does not apply.

    With fp32 ``h`` every slot is scored in Q8_0 first and only those that can still win are rescored with
    ``h`` (``block_l1``: :func:`flashhead.head.q8_0_block_l1` of the rows bounds the difference): the same
    token as scoring them all with ``h``, at about the cost of int8 products."""
    if not (_q8_applies(rows, scales) and h.dtype == torch.float32 and _on_cpu(h, slot_token)):
        return None
    mod = _module()
    if mod is None:
        return None
    return mod.q8_greedy(rows, scales, slot_token, clusters.contiguous(), h, always_slots.contiguous(), bool(quantize),
                         block_l1.float().contiguous())


def auction(cost: torch.Tensor, members: torch.Tensor, row_group: torch.Tensor, capacity: torch.Tensor, eps: float,
            big: float, stop_below: int, max_rounds: int, patience: int) -> tuple[torch.Tensor, int] | None:
    """Balanced k-means' auction (:func:`flashhead.cluster._auction`'s owners and rounds, the same bits) in
    one compiled call; None when the kernel is not available. ``members``: padding already replaced."""
    if not (cost.dtype == torch.float32 and cost.is_contiguous() and _on_cpu(cost, members)):
        return None
    mod = _module()
    if mod is None:
        return None
    long = lambda t: t.to(torch.int64).contiguous()  # noqa: E731
    owner, rounds = mod.auction(cost, long(members), long(row_group), long(capacity), float(eps), float(big),
                                int(stop_below), int(max_rounds), int(patience))
    return owner, int(rounds)


def build() -> bool:
    """Compile the kernel now (set-up calls this); True when it is available."""
    return _module() is not None


def isa_path() -> str | None:
    """The instruction-set path of the build in use ("avx2+avx-vnni", "avx2+avx512-vnni", "avx2" or "scalar"),
    or None without a compiled kernel."""
    mod = _module()
    return None if mod is None else mod.isa_path()
