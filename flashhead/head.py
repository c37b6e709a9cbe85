"""FlashHead: a retrieval-based drop-in replacement for an LM's dense output head.

The dense head computes ``logits = h @ W.T`` over all ``V`` vocabulary rows.  FlashHead
stores the rows cluster by cluster as one dense ``rows[K, cap, d]`` tensor (``slot_token``
maps every slot to its token id, ``-1`` = empty slot whose row is zero) plus one float32
centroid per cluster, and at each decode step

1. *stage 1* scores the ``K`` centroids (``h . c_k``, optionally with int8/int4 centroids)
   and keeps the top ``p = n_probes`` clusters;
2. *stage 2* computes exact logits for the ``p * cap`` rows of those clusters plus a few
   always-scored ids (e.g. EOS), at the head's own precision: float rows in the model dtype, or a
   Q8_0 head's own int8 blocks (optionally with Q8_0 activations, as llama.cpp computes its head).
   Stage 2 adds no quantization of its own.
3. *sampling* (temperature ``T``) draws from the exact softmax over those candidates plus a
   *tail*: every unprobed cluster ``k`` gets an estimated probability mass
   ``n_k exp(s_k / T + g)`` (``n_k`` tokens, centroid score ``s_k``), where the per-step
   correction ``g`` is the mean log ratio of exact to estimated mass over the lower-scored
   half of the probed clusters (the estimate from the centroid alone misses the spread of
   logits inside a cluster: Jensen's inequality).  One tail cluster is drawn in proportion
   to its estimated mass, its ``cap`` rows are scored exactly, and their logits are shifted
   so that together they carry the whole estimated tail mass.  So any token can be sampled,
   the probed part is exact, and the error is only that of the tail's mass estimates.

Everything outside the candidates is ``-inf``, so ``forward`` can stand in for the dense
head under ``transformers``' ``generate()`` (logits processors/warpers keep working), while
``greedy``/``sample`` are fast paths that never build a vocabulary-wide tensor.

Kernels, each chosen by measurement on CPU (tables and labs: docs/kernels.md):

* stage 1 ``"float"``: fp32 ``h @ Ct``, centroids stored pre-transposed ``[d, K]``;
  ``"int8"``: per-centroid symmetric int8, activations quantized per row, exact int32 sums (the
  compiled ``int8_scores`` on CPU, with ``torch._int_mm``'s bits; ``_int_mm`` without it);
  ``"int4"``: the centroids minus their mean (scored exactly), int4 per group of 64 with a bf16
  scale and zero: half of int8's bytes. On CPU the compiled ``int4_scores`` (h per group in int8
  against the centred codes, exact integer sums; 8 centroids at a time); without a compiler
  ``aten._weight_int4pack_mm_for_cpu`` with bf16 activations, whose scores come out rounded to
  bf16. On other devices the quantized modes dequantize and matmul.
* top-p (greedy and sampling alike): the compiled ``top_unsorted`` (radix selection) on CPU, else ``torch.topk``.
* stage 2: fp32 and Q8_0 rows on CPU go through compiled fused gather + dot kernels
  (``_kernels.py``) that read each probed row once, a batch's probes in cluster order; otherwise
  each row gathers its clusters in ~1 MiB chunks into a reused buffer, one GEMV per chunk.
* ``greedy`` on Q8_0 rows runs stage 2, the always-scored ids and the argmax in one compiled call.
* ``forward`` pays for its full-width tensor with the ``-inf`` fill; ``scatter_reduce(amax)``
  is deterministic, and empty slots' ``-inf`` never hides a real logit.

Batch invariance: stage 2 and the int8/int4 stage 1 compute each row independently; the
fp32 stage 1 uses a GEMV for N=1 and a GEMM otherwise, which may differ in the last ulp,
so a near-tie between two centroids can resolve differently inside and outside a batch.
"""

from __future__ import annotations

import math
import numbers
import threading
import warnings

import torch
import torch.nn.functional as F

from . import _kernels

__all__ = ["FlashHead", "Q8_BLOCK", "STAGE1_MODES", "q8_0_dequantize", "q8_0_from_blocks", "q8_0_quantize", "q8_0_rows",
           "stage1_nbytes"]

STAGE1_MODES = ("float", "int8", "int4")
Q8_BLOCK = 32  #: weights per scale in Q8_0 (GGUF): int8 values, one fp16 scale per block
_FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_NEG_INF = float("-inf")
_INT64_MAX = torch.iinfo(torch.int64).max
#: stage 2 gathers the probed clusters' rows this many bytes at a time into a cache-resident
#: scratch buffer (see ``FlashHead._candidates``)
_STAGE2_CHUNK_BYTES = 1 << 20
#: intra-op threads for stage 2's gather/GEMV loop (None = leave torch's setting).  Its ops are
#: small (one ~1 MiB chunk each), so a second thread buys nothing even on an idle machine, and
#: on a shared one every parallel region can wait a scheduler tick for a descheduled thread
_STAGE2_THREADS: int | None = 1
_SCRATCH = threading.local()  # per-thread scratch buffer of stage 2 (never shared between threads)


def _scratch(numel: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A per-thread reusable buffer of at least ``numel`` elements (no allocation per call)."""
    buf = getattr(_SCRATCH, "buf", None)
    if buf is None or buf.numel() < numel or buf.dtype != dtype or buf.device != device:
        with torch.inference_mode(False):  # a normal tensor: writable in and out of inference mode
            buf = torch.empty(numel, dtype=dtype, device=device)
        _SCRATCH.buf = buf
    return buf[:numel]


def _int4_layout(d: int) -> tuple[int, int]:
    """(padded width, group size) of int4 stage 1: d padded to a multiple of 32, groups of 64 where
    that divides it (measured as good as float for ranking on SmolLM2), else 32."""
    d_pad = _round_up(d, 32)
    return d_pad, 64 if d_pad % 64 == 0 else 32


def stage1_nbytes(num_clusters: int, d: int, stage1: str) -> int:
    """Bytes stage 1 reads per step: the centroids in ``stage1`` precision plus their scales."""
    if stage1 == "float":
        return num_clusters * d * 4
    if stage1 == "int8":
        return num_clusters * (_round_up(d, 8) + 4)  # int8 weights (d padded to 8) + an fp32 scale
    if stage1 == "int4":
        d_pad, group = _int4_layout(d)
        return num_clusters * (d_pad // 2 + d_pad // group * 4)  # nibbles + bf16 (scale, zero) per group
    raise ValueError(f"stage1 must be one of {STAGE1_MODES}, got {stage1!r}")


def q8_0_rows(weight: torch.Tensor, chunk: int = 8192) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The exact Q8_0 decomposition ``(int8 [V, d], fp16 scales [V, d // 32])`` of a float head, or None.

    Found as ggml's quantizer makes it (scale = block amax / 127, so the largest weight is +-127 * scale)
    and accepted only when the scales are fp16 values and ``scale * int8`` gives every weight back bit for
    bit in fp32: true of a head dequantized from a Q8_0 GGUF, never of one rounded to bf16 since.
    """
    if weight.dim() != 2 or not weight.is_floating_point() or weight.shape[1] % Q8_BLOCK:
        return None
    V, d = weight.shape
    qs, ss = [], []
    for a in range(0, V, chunk):  # ~chunk x d fp32 temporaries at a time
        w = weight.detach()[a:a + chunk].float().reshape(-1, d // Q8_BLOCK, Q8_BLOCK)
        scale = _block_amax(w) / torch.full((), 127.0)
        s16 = scale.half()
        # |w| <= amax = 127 * scale, so |k| <= 127; an all-zero block has k = 0
        k = (w / scale.clamp_min(torch.finfo(torch.float32).tiny)).round_().to(torch.int8)
        if not (torch.equal(s16.float(), scale) and torch.equal((k * scale).view(torch.int32), w.view(torch.int32))):
            return None  # (k is an int8 here: -0.0 in w does not survive, as it cannot in a GGUF)
        qs.append(k.view(-1, d))
        ss.append(s16.view(-1, d // Q8_BLOCK))
    return torch.cat(qs), torch.cat(ss)


def q8_0_block_l1(q: torch.Tensor, scales: torch.Tensor, chunk: int = 8192) -> torch.Tensor:
    """``[d // 32]`` fp32: per block of 32 columns, the largest ``scale * sum |int8|`` over the Q8_0 rows
    ``q [..., d]``, ``scales [..., d // 32]``: by how much rounding ``h`` in that block by ``e`` can move any
    row's logit, per unit of ``e`` (the greedy kernel's margin; exact: 12-bit sums times fp16 scales)."""
    d = q.shape[-1]
    q, scales = q.reshape(-1, d // Q8_BLOCK, Q8_BLOCK), scales.reshape(-1, d // Q8_BLOCK)
    out = torch.zeros(d // Q8_BLOCK)
    for a in range(0, q.shape[0], chunk):
        l1 = q[a:a + chunk].to(torch.int16).abs_().sum(-1, dtype=torch.int32).float() * scales[a:a + chunk].float()
        out = torch.maximum(out, l1.amax(0))
    return out


def _block_amax(w: torch.Tensor) -> torch.Tensor:
    """``|w|.amax(-1, keepdim=True)`` over blocks of 32 by halving (torch's reduction over a short last
    dimension is ~10x slower)."""
    m = w.abs()
    while m.shape[-1] > 1:
        half = m.shape[-1] // 2
        m = torch.maximum(m[..., :half], m[..., half:])
    return m


def q8_0_from_blocks(blocks, d: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Split raw GGUF Q8_0 blocks (uint8 ``[V, d // 32 * 34]``, or flat: per block an fp16 scale then 32
    int8, little-endian) into ``(int8 [V, d], fp16 scales [V, d // 32])``, without a float copy."""
    with warnings.catch_warnings():  # a read-only memmap (GGUFReader): only read, then copied below
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        raw = torch.as_tensor(blocks)
    if raw.dtype != torch.uint8 or d % Q8_BLOCK or raw.numel() % (d // Q8_BLOCK * 34):
        raise ValueError(f"Q8_0 blocks must be uint8 with d // 32 * 34 bytes per row (d = {d}, a multiple of "
                         f"32), got {raw.dtype} with {raw.numel()} bytes; pass the tensor's raw GGUF data")
    nb = d // Q8_BLOCK
    b = raw.reshape(-1, nb, 2 + Q8_BLOCK)
    return b[..., 2:].contiguous().view(torch.int8).view(-1, d), b[..., :2].contiguous().view(torch.float16).view(-1, nb)


def q8_0_dequantize(q: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``scale * int8`` per block of 32 (exact in fp32): ``[..., d]`` from ``q [..., d]``, ``scales [..., d // 32]``."""
    w = q.view(*q.shape[:-1], -1, Q8_BLOCK).float() * scales.float().unsqueeze(-1)
    return w.view(q.shape).to(dtype)


def q8_0_quantize(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``x [N, d]`` in Q8_0 as llama.cpp quantizes activations for its Q8_0 products on x86:
    ``(int8 [N, d], fp32 [N, d // 32] holding fp16 scales)``.

    Per block of 32: scale = fp16(amax / 127), int8 = round(x * (127 / amax)), ties to even (ggml's AVX
    code; its portable reference uses 1 / scale and rounds ties away from zero, which differs only when
    ``x * 127 / amax`` lies within an ulp of a half-integer).
    """
    if (fused := _kernels.q8_0_quantize(x)) is not None:  # the same bits in one call
        return fused
    N, d = x.shape
    xb = x.float().reshape(N, d // Q8_BLOCK, Q8_BLOCK)
    amax = _block_amax(xb)
    mult = torch.where(amax > 0, torch.full_like(amax, 127.0) / amax, 0.0)
    q = torch.round(xb * mult).to(torch.int8).view(N, d)
    return q, (amax / torch.full_like(amax, 127.0)).half().float().view(N, -1)


def _round_up(x: int, m: int) -> int:
    return (x + m - 1) // m * m


def _gumbel_like(x: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """Standard Gumbel noise ``-log(-log U)`` shaped like ``x`` (float32).

    Built from ``uniform_`` because ``Tensor.exponential_`` is ~4x slower on CPU (3.9 ms vs
    0.95 ms for 16 x 16384 draws): with Gemma-size K it dominated sampling.  U = 0 (prob.
    2^-24 per draw) would give -inf; it is clamped to a finite value so that a lone
    surviving candidate (top_k=1, tiny top_p) can never be lost.
    """
    u = torch.empty(x.shape, dtype=torch.float32, device=x.device).uniform_(generator=generator)
    return u.log_().neg_().log_().neg_().clamp_(min=-30.0)


def _check_row_scales(rows: torch.Tensor, scales: torch.Tensor | None, quantize_activations: bool) -> None:
    """Refuse Q8_0 rows and scales that do not fit each other (or activations quantized without them)."""
    if scales is None:
        if quantize_activations:
            raise ValueError("quantize_activations needs Q8_0 rows: pass int8 rows with row_scales")
        return
    K, cap, d = rows.shape
    if rows.dtype != torch.int8 or d % Q8_BLOCK:
        raise ValueError(f"with row_scales, rows must be int8 Q8_0 rows with d a multiple of {Q8_BLOCK}, "
                         f"got {rows.dtype} with d = {d}; use q8_0_rows(weight) to split a float head")
    if not isinstance(scales, torch.Tensor) or tuple(scales.shape) != (K, cap, d // Q8_BLOCK):
        got = tuple(scales.shape) if isinstance(scales, torch.Tensor) else type(scales).__name__
        raise ValueError(f"row_scales must have shape [K, cap, d // 32] = [{K}, {cap}, {d // Q8_BLOCK}], got {got}")
    if scales.dtype not in (torch.float16, torch.float32) or scales.device != rows.device:
        raise ValueError(f"row_scales must be float16 or float32 on {rows.device}, got {scales.dtype} on {scales.device}")
    if scales.stride(-1) != 1 or not bool(torch.isfinite(scales).all()):
        raise ValueError("row_scales must be finite with a unit stride in its last dimension")


class FlashHead(torch.nn.Module):
    """Two-stage (centroids, then exact rows of the probed clusters) LM output head.

    Args:
        rows: ``[K, cap, d]`` head rows grouped by cluster, in the model dtype (fp32, bf16
            or fp16).  Kept by reference and never copied, so it may be a view of the
            model's (tied) embedding weight.  Empty slots must hold zeros.
        slot_token: ``[K, cap]`` integer token id of every slot, ``-1`` for an empty slot
            (at most ``cap - 1`` empty slots in total, every token at most once).
        centroids: ``[K, d]`` one centroid per cluster (stored as float32).
        out_features: width of the logits the dense head produces (``>= max id + 1``);
            ids without a slot (e.g. embedding padding rows) always get ``-inf``.
        n_probes: number of clusters ``p`` scored exactly per query, ``1 <= p <= K``.
        always_ids: token ids scored at every step whatever the probes (e.g. EOS); each
            must own a slot.
        stage1: ``"float"``, ``"int8"`` or ``"int4"`` centroids for stage 1.
        row_scales: ``[K, cap, d // 32]`` fp16 or fp32 scales when ``rows`` is int8 in Q8_0 blocks
            (each weight is ``scale * int8``; :func:`q8_0_rows`, :func:`q8_0_from_blocks`).  Stage 2
            then reads the int8 rows: ~3.8x fewer bytes than fp32, the same logits up to rounding.
        quantize_activations: with Q8_0 rows, quantize ``h`` to Q8_0 too (:func:`q8_0_quantize`) and
            take int8 x int8 block products as llama.cpp's Q8_0 head does, so as to pick its tokens.
        padding_rows: rows of the ids that own no slot (they must be the last ``n`` ids, e.g. an embedding's
            padding), ``[n, d]`` like ``rows``; with ``row_scales``, ``padding_scales`` ``[n, d // 32]`` too.
            With them the head knows every row of the dense head, so :attr:`exact` can be switched on.

    :attr:`exact` (default False) chooses what ``forward`` returns: False, FlashHead's candidates (decoding);
    True, the dense head's logits computed from these same rows, bit for bit what the dense ``Linear`` gave
    (scoring: perplexity, log-likelihoods). ``greedy`` and ``sample`` are FlashHead whatever it says.
    """

    def __init__(
        self,
        rows: torch.Tensor,
        slot_token: torch.Tensor,
        centroids: torch.Tensor,
        *,
        out_features: int,
        n_probes: int,
        always_ids: torch.Tensor | None = None,
        stage1: str = "float",
        row_scales: torch.Tensor | None = None,
        quantize_activations: bool = False,
        padding_rows: torch.Tensor | None = None,
        padding_scales: torch.Tensor | None = None,
    ) -> None:
        super().__init__()
        if not isinstance(rows, torch.Tensor) or rows.dim() != 3:
            raise ValueError(
                f"rows must be a [K, cap, d] tensor, got "
                f"{tuple(rows.shape) if isinstance(rows, torch.Tensor) else type(rows).__name__}; "
                "reshape the cluster-ordered head weight to [K, cap, d]"
            )
        _check_row_scales(rows, row_scales, quantize_activations)
        if row_scales is None and rows.dtype not in _FLOAT_DTYPES:
            raise ValueError(f"rows must be float32, bfloat16 or float16 (the model dtype), got {rows.dtype}; "
                             "int8 rows need row_scales (Q8_0)")
        if rows.stride(-1) != 1:
            raise ValueError(
                "rows must have a unit stride in its last (hidden) dimension; "
                "pass a view of a row-major weight, e.g. weight.view(K, cap, d)"
            )
        K, cap, d = rows.shape
        if K < 1 or cap < 1 or d < 1:
            raise ValueError(f"rows has an empty dimension: shape {tuple(rows.shape)}")
        device = rows.device

        if not isinstance(slot_token, torch.Tensor) or tuple(slot_token.shape) != (K, cap):
            raise ValueError(
                f"slot_token must have shape [K, cap] = [{K}, {cap}] matching rows, got "
                f"{tuple(slot_token.shape) if isinstance(slot_token, torch.Tensor) else type(slot_token).__name__}"
            )
        if slot_token.dtype.is_floating_point or slot_token.dtype == torch.bool or slot_token.is_complex():
            raise ValueError(f"slot_token must be an integer tensor, got {slot_token.dtype}")
        slot_token = slot_token.to(device=device, dtype=torch.int64).contiguous()

        out_features = int(out_features)
        if out_features < 1:
            raise ValueError(f"out_features must be >= 1, got {out_features}")
        if bool((slot_token < -1).any()):
            raise ValueError("slot_token holds ids < -1; use -1 (and only -1) to mark an empty slot")
        max_id = int(slot_token.max())
        if max_id >= out_features:
            raise ValueError(
                f"slot_token holds id {max_id} but out_features={out_features}; "
                "out_features must be >= max token id + 1 (the dense head's logit width)"
            )
        if max_id < 0:
            raise ValueError("slot_token has no token at all (every slot is -1)")
        valid = slot_token >= 0
        n_empty = int((~valid).sum())
        if n_empty > cap - 1:
            raise ValueError(
                f"{n_empty} empty slots but at most cap - 1 = {cap - 1} are allowed "
                "(every cluster must hold at least one token); rebuild the index"
            )
        ids_flat = slot_token[valid]
        if ids_flat.unique().numel() != ids_flat.numel():
            raise ValueError("slot_token lists a token id more than once; every token must own exactly one slot")

        if not isinstance(centroids, torch.Tensor) or tuple(centroids.shape) != (K, d):
            raise ValueError(
                f"centroids must have shape [K, d] = [{K}, {d}], got "
                f"{tuple(centroids.shape) if isinstance(centroids, torch.Tensor) else type(centroids).__name__}"
            )
        if not centroids.dtype.is_floating_point:
            raise ValueError(f"centroids must be a float tensor, got {centroids.dtype}")
        centroids = centroids.detach().to(device=device, dtype=torch.float32)
        if not bool(torch.isfinite(centroids).all()):
            raise ValueError("centroids contain NaN/Inf; rebuild the index")

        if stage1 not in STAGE1_MODES:
            raise ValueError(f"stage1 must be one of {STAGE1_MODES}, got {stage1!r}")

        # token id -> flat slot (k * cap + j), -1 when the token owns no slot
        token_slot = torch.full((out_features,), -1, dtype=torch.int64, device=device)
        token_slot[ids_flat] = torch.arange(K * cap, device=device)[valid.flatten()]

        if always_ids is None:
            always = torch.empty(0, dtype=torch.int64, device=device)
        else:
            always = torch.as_tensor(always_ids, device=device)
            if always.dtype.is_floating_point or always.dtype == torch.bool:
                raise ValueError(f"always_ids must be integer token ids, got {always.dtype}")
            always = always.to(torch.int64).flatten().unique()
            if always.numel() and (int(always.min()) < 0 or int(always.max()) >= out_features):
                raise ValueError(f"always_ids must lie in [0, out_features={out_features}), got {always.tolist()}")
            missing = always[token_slot[always] < 0]
            if missing.numel():
                raise ValueError(
                    f"always_ids {missing.tolist()} own no slot in slot_token, so their rows are unknown; "
                    "put them in the index or drop them from always_ids"
                )
        always_slot = token_slot[always]

        self.K, self.cap, self.d = K, cap, d
        self.out_features = out_features
        self.stage1 = stage1
        # rows: a reference, never copied, never saved (it is the model's weight).
        self.register_buffer("rows", rows, persistent=False)
        self.register_buffer("row_scales", row_scales, persistent=False)  # None: float rows
        self.register_buffer("_block_l1", None if row_scales is None else q8_0_block_l1(rows, row_scales),
                             persistent=False)
        self.quantize_activations = bool(quantize_activations)
        self.register_buffer("slot_token", slot_token, persistent=False)
        self._has_empty = n_empty > 0
        self.register_buffer("_log_count", valid.sum(1).float().log(), persistent=False)  # log tokens per cluster
        self.register_buffer("token_slot", token_slot, persistent=False)
        self.register_buffer("always_ids", always, persistent=False)
        self.register_buffer("always_cluster", always_slot // cap, persistent=False)
        self.register_buffer("always_pos", always_slot % cap, persistent=False)
        self.register_buffer("_always_slot", always_slot, persistent=False)  # flat k * cap + j
        self._build_stage1(centroids)
        self._set_padding(padding_rows, padding_scales)
        self._exact = False

        self._n_probes = 1
        self.n_probes = n_probes
        self._temperature: float | None = None
        #: generator used by ``forward`` when ``temperature`` is set (None = global RNG)
        self.generator: torch.Generator | None = None

    # ------------------------------------------------------------------ setup
    def _build_stage1(self, c: torch.Tensor) -> None:
        """Precompute the stage-1 weight in the layout its fastest kernel wants."""
        K, d = c.shape
        if self.stage1 == "float":
            self.register_buffer("_c_t", c.t().contiguous(), persistent=False)  # [d, K]
        elif self.stage1 == "int8":
            s = c.abs().amax(1).clamp_min(1e-30) / 127.0
            q = torch.round(c / s[:, None]).clamp_(-127, 127).to(torch.int8)
            # d padded to a multiple of 8 with zeros: torch._int_mm (2.13, CPU) returns garbage
            # for an inner dimension of 1, and real models have d % 8 == 0 anyway (no cost)
            self._int8_dpad = _round_up(d, 8)
            self.register_buffer("_q", F.pad(q, (0, self._int8_dpad - d)).contiguous(), persistent=False)  # [K, d8]
            self.register_buffer("_scale", s, persistent=False)
        else:  # int4, asymmetric per group, of the centroids minus their mean (see the module docstring)
            d_pad, group = _int4_layout(d)
            mean = c.mean(0)
            self.register_buffer("_mean", mean, persistent=False)  # [d] float32, scored exactly
            cg = F.pad(c - mean, (0, d_pad - d)).view(K, d_pad // group, group)
            lo, hi = cg.amin(-1), cg.amax(-1)
            s = ((hi - lo) / 15).clamp_min(1e-30).to(torch.bfloat16)
            z = (lo + 8 * s.float()).to(torch.bfloat16)
            q = torch.round((cg - z.float()[..., None]) / s.float()[..., None]).add_(8).clamp_(0, 15)
            self._int4_group, self._int4_dpad = group, d_pad
            # codes two per byte and bf16 (scale, zero) per group, 8 centroids at a time (K padded to 8), in the
            # compiled kernel's layout (_kernels.py, int4_scores); _int4_codes() gives them back plainly
            blk = _round_up(K, 8) // 8
            qq = F.pad(q.to(torch.uint8).view(K, d_pad), (0, 0, 0, blk * 8 - K)).view(blk, 8, d_pad // 8, 2, 4)
            qq = qq.permute(0, 2, 1, 3, 4)  # [block, 8 weights, centroid, low/high half, 4 weights]
            self.register_buffer("_q4", (qq[..., 0, :] | (qq[..., 1, :] << 4)).reshape(blk, d_pad * 4).contiguous(),
                                 persistent=False)
            sz = F.pad(torch.stack([s, z], -1), (0, 0, 0, 0, 0, blk * 8 - K)).view(blk, 8, -1, 2)
            self.register_buffer("_sz", sz.permute(0, 2, 3, 1).contiguous(), persistent=False)  # [block, G, 2, 8]
            self.register_buffer("_int4_packed", None, persistent=False)
            self.register_buffer("_int4_sz", None, persistent=False)
            if c.device.type == "cpu":  # torch's int4 kernel: the fallback without the compiled one
                K_pad = _round_up(K, 16)
                qp = torch.zeros(K_pad, d_pad, dtype=torch.int32)
                codes, sz_plain = self._int4_codes()
                qp[:K] = codes
                packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(qp.contiguous(), 1)
                sz = torch.zeros(d_pad // group, K_pad, 2, dtype=torch.bfloat16)
                sz[:, :K] = sz_plain.transpose(0, 1)
                sz[:, K:, 0] = 1.0
                self.register_buffer("_int4_packed", packed, persistent=False)
                self.register_buffer("_int4_sz", sz, persistent=False)

    def _set_padding(self, rows: torch.Tensor | None, scales: torch.Tensor | None) -> None:
        """Check and keep the rows of the ids without a slot (see the class docstring)."""
        if rows is None:
            if scales is not None:
                raise ValueError("padding_scales given without padding_rows")
            self._rows_missing = int((self.token_slot < 0).sum())  # ids whose dense logit is unknown
            self.register_buffer("padding_rows", None, persistent=False)
            self.register_buffer("padding_scales", None, persistent=False)
            return
        n = rows.shape[0] if rows.dim() == 2 else -1
        if n < 0 or rows.shape[1] != self.d or rows.dtype != self.rows.dtype or rows.device != self.rows.device:
            raise ValueError(f"padding_rows must be [n, d={self.d}] {self.rows.dtype} on {self.rows.device} like the "
                             f"rows, got {tuple(rows.shape)} {rows.dtype} on {rows.device}")
        unslotted = (self.token_slot < 0).nonzero().flatten()
        if not torch.equal(unslotted, torch.arange(self.out_features - n, self.out_features, device=unslotted.device)):
            raise ValueError(f"padding_rows holds {n} rows but the ids without a slot are not the last {n} ids "
                             f"({unslotted.numel()} ids own no slot); give one row for each of them, in id order")
        if (scales is None) != (self.row_scales is None) or (
                scales is not None and (scales.shape != (n, self.row_scales.shape[-1]) or scales.dtype != self.row_scales.dtype)):
            raise ValueError("padding_scales must be given exactly when the rows are Q8_0, shaped "
                             "[n, d // 32] in the dtype of row_scales")
        self.register_buffer("padding_rows", rows, persistent=False)
        self.register_buffer("padding_scales", scales, persistent=False)
        self._rows_missing = 0

    def _apply(self, fn, recurse=True):  # type: ignore[override]
        """Keep stage-1 tensors in their dtypes (losslessly) when the module is cast
        (``model.half()``, ``.to(torch.bfloat16)``); device moves apply as usual."""
        keep = {n: b for n, b in self._buffers.items()
                if n in ("_c_t", "_scale", "_sz", "_mean", "_int4_sz", "row_scales", "_block_l1", "padding_scales")
                and b is not None}
        super()._apply(fn, recurse)
        for name, old in keep.items():
            new = self._buffers[name]
            if new is not None and new.dtype != old.dtype:
                self._buffers[name] = old.to(device=new.device)
        return self

    # ------------------------------------------------------------- properties
    @property
    def centroids(self) -> torch.Tensor:
        """``[K, d]`` float32 centroids stage 1 really uses (dequantized for int8/int4)."""
        if self.stage1 == "float":
            return self._c_t.t()
        if self.stage1 == "int8":
            return self._q[:, : self.d].float() * self._scale[:, None]
        K, g = self.K, self._int4_group
        codes, sz = self._int4_codes()
        sz = sz.float()
        q = codes.view(K, -1, g).float() - 8
        return (q * sz[..., :1] + sz[..., 1:]).view(K, -1)[:, : self.d] + self._mean

    def _int4_codes(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The int4 stage 1 plainly: codes ``[K, d_pad]`` uint8 (0..15) and bf16 (scale, zero) ``[K, G, 2]``."""
        blk = self._q4.shape[0]
        b = self._q4.view(blk, -1, 8, 1, 4)  # [block, 8 weights, centroid, 1, 4 weights]
        codes = torch.cat([b & 15, b >> 4], 3).permute(0, 2, 1, 3, 4).reshape(blk * 8, -1)[: self.K]
        return codes, self._sz.permute(0, 3, 1, 2).reshape(blk * 8, -1, 2)[: self.K]

    @property
    def n_probes(self) -> int:
        """Number of clusters scored exactly per query (1..K)."""
        return self._n_probes

    @n_probes.setter
    def n_probes(self, value: int) -> None:
        self._n_probes = self._check_probes(value)

    @property
    def temperature(self) -> float | None:
        """Sampling temperature for ``forward``: None = greedy candidates only; a float adds the
        sampling tail (one tail cluster, see the module docstring) at that temperature."""
        return self._temperature

    @temperature.setter
    def temperature(self, value: float | None) -> None:
        self._temperature = None if value is None else self._check_temperature(value)

    @property
    def exact(self) -> bool:
        """True: ``forward`` returns the dense head's exact logits (scoring); False: FlashHead's (decoding)."""
        return self._exact

    @exact.setter
    def exact(self, value: bool) -> None:
        if value:
            self._check_every_row()
        self._exact = bool(value)

    def _check_every_row(self) -> None:
        if self._rows_missing:
            raise ValueError(f"{self._rows_missing} ids own no slot and no padding_rows were given, "
                             "so their dense logits are unknown; build the head with padding_rows")

    def extra_repr(self) -> str:
        return (
            f"K={self.K}, cap={self.cap}, d={self.d}, out_features={self.out_features}, "
            f"n_probes={self.n_probes}, always={self.always_ids.numel()}, stage1={self.stage1!r}, "
            f"dtype={self.rows.dtype}" + ("" if self.row_scales is None else
                                          f", q8_0 (scales {self.row_scales.dtype}), "
                                          f"quantize_activations={self.quantize_activations}")
        )

    # ------------------------------------------------------------- validation
    def _check_probes(self, value: int | None) -> int:
        if value is None:
            return self._n_probes
        if isinstance(value, torch.Tensor) and value.numel() == 1 and not value.dtype.is_floating_point:
            value = int(value)
        if isinstance(value, bool) or not isinstance(value, numbers.Integral):
            raise ValueError(f"n_probes must be an int in [1, K={self.K}], got {value!r}")
        value = int(value)
        if not 1 <= value <= self.K:
            raise ValueError(f"n_probes must be in [1, K={self.K}], got {value}; clamp it to that range")
        return value

    @staticmethod
    def _check_temperature(value: float) -> float:
        try:
            t = float(value)
        except (TypeError, ValueError):
            raise ValueError(f"temperature must be a positive float, got {value!r}") from None
        if not (t > 0.0 and math.isfinite(t)):
            raise ValueError(
                f"temperature must be a finite float > 0, got {value!r}; "
                "use greedy()/temperature=None for T -> 0"
            )
        return t

    def _check_hidden(self, h: torch.Tensor, *, two_d: bool) -> torch.Tensor:
        """Validate hidden states; returns a contiguous ``[N, d]`` tensor."""
        if not isinstance(h, torch.Tensor):
            raise ValueError(f"hidden states must be a torch.Tensor, got {type(h).__name__}")
        if not h.dtype.is_floating_point:
            raise ValueError(f"hidden states must be a float tensor, got {h.dtype}")
        if h.dim() == 0 or h.shape[-1] != self.d:
            raise ValueError(
                f"hidden states must have last dim d={self.d} (the head's input width), got shape "
                f"{tuple(h.shape)}; pass the final-norm output of the same model"
            )
        if two_d and h.dim() != 2:
            raise ValueError(f"expected [N, d={self.d}] hidden states, got shape {tuple(h.shape)}; use h.reshape(-1, d)")
        if h.device != self.rows.device:
            raise ValueError(f"hidden states are on {h.device} but the head is on {self.rows.device}; move one of them")
        h = h.reshape(-1, self.d)
        # a finite sum (one op, the per-token case) clears it; otherwise look at every value
        if not math.isfinite(h.sum().item()) and not bool(torch.isfinite(h).all()):
            raise ValueError(
                "hidden states contain NaN or Inf; the model overflowed (fp16?) or diverged -- "
                "fix the model/dtype, the head cannot rank non-finite inputs"
            )
        return h.contiguous()

    # ---------------------------------------------------------------- stage 1
    def stage1_scores(self, h: torch.Tensor) -> torch.Tensor:
        """Centroid scores ``h . c_k`` ([N, d] -> [N, K] float32) with the stage-1 kernel."""
        h = self._check_hidden(h, two_d=True)
        return self._scores(h)

    def _scores(self, h: torch.Tensor) -> torch.Tensor:
        h32 = h.float()
        if self.stage1 == "float":
            return h32 @ self._c_t
        cpu = h.device.type == "cpu"
        if self.stage1 == "int8":
            if not cpu:
                return (h32 @ self._q[:, : self.d].t().float()) * self._scale
            a = h32.abs().amax(1, keepdim=True).clamp_min(1e-30) / 127.0
            hq = torch.round(h32 / a).to(torch.int8)
            if self._int8_dpad != self.d:
                hq = F.pad(hq, (0, self._int8_dpad - self.d))
            fused = _kernels.int8_scores(self._q, self._scale, hq, a)
            if fused is not None:
                return fused
            return torch._int_mm(hq, self._q.t()).float().mul_(a).mul_(self._scale)
        # int4
        if cpu and (fused := _kernels.int4_scores(self._q4, self._sz, self._mean, h32, self.K)) is not None:
            return fused
        if not cpu or self._int4_packed is None:
            return h32.to(torch.bfloat16).float() @ self.centroids.t()
        hb = h32.to(torch.bfloat16)
        if self._int4_dpad != self.d:
            hb = F.pad(hb, (0, self._int4_dpad - self.d))
        out = torch.ops.aten._weight_int4pack_mm_for_cpu(hb, self._int4_packed, self._int4_group, self._int4_sz)
        return out[:, : self.K].float().add_((h32 @ self._mean).unsqueeze(1))

    def select_clusters(self, h: torch.Tensor, n_probes: int | None = None) -> torch.Tensor:
        """Stage 1: ``[N, p]`` ids of the top-p clusters by centroid score, best first."""
        h = self._check_hidden(h, two_d=True)
        return self._select(h, self._check_probes(n_probes), ordered=True)[0]

    def _select(self, h: torch.Tensor, p: int, ordered: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(top-p clusters [N, p], best first if ``ordered`` (the sampling tail needs the order;
        greedy does not, and an unsorted top-k is cheaper), stage-1 scores [N, K] or None when p = K)."""
        if p == self.K:  # every cluster: no ranking needed
            return torch.arange(self.K, device=h.device).expand(h.shape[0], self.K), None
        scores = self._scores(h)
        top = _kernels.top_unsorted(scores, p)  # the same set for greedy and sampling: one rule for ties
        if top is None:
            return torch.topk(scores, p, dim=1, sorted=ordered).indices, scores
        if ordered:  # best first; equal scores by id
            top = top.sort(1).values
            top = top.gather(1, scores.gather(1, top).sort(dim=1, descending=True, stable=True).indices)
        return top, scores

    # ---------------------------------------------------------------- sampling tail
    def tail_log_mass(self, h: torch.Tensor, temperature: float, n_probes: int | None = None
                      ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The sampling plan: top-p clusters ``[N, p]`` and the estimated log mass at temperature
        ``T`` of every cluster ``[N, K]`` (``-inf`` for the probed ones; None when p = K).

        Log masses share the scale of ``logits / T`` of the candidates, so the sampled
        distribution is ``softmax`` over the candidates' ``logits / T`` plus, for each unprobed
        cluster, its log mass spread over its tokens by their exact softmax (see ``sample``).
        """
        h = self._check_hidden(h, two_d=True)
        t = self._check_temperature(temperature)
        clusters, scores = self._select(h, self._check_probes(n_probes), ordered=True)
        if scores is None:
            return clusters, None
        _, logits = self._cluster_logits(h, clusters)
        return clusters, self._tail(scores, clusters, logits, t)

    def _tail(self, scores: torch.Tensor, clusters: torch.Tensor, logits: torch.Tensor, t: float) -> torch.Tensor:
        """Estimated log mass ``log n_k + s_k / T + g`` of every cluster, ``-inf`` where probed.

        ``g``: mean over the lower-scored half of the probed clusters (``clusters`` is sorted
        best first) of log(exact mass / estimate), computed from their exact ``logits``.
        """
        N, p = clusters.shape
        est = scores.div(t).add_(self._log_count)
        exact = logits.view(N, p, self.cap).div(t).logsumexp(-1)  # empty slots are -inf
        low = slice(p // 2, p) if p > 1 else slice(0, 1)
        g = (exact - est.gather(1, clusters))[:, low].mean(1, keepdim=True)
        return est.add_(g).scatter_(1, clusters, _NEG_INF)

    def _with_tail(self, h: torch.Tensor, ids: torch.Tensor, logits: torch.Tensor, clusters: torch.Tensor,
                   scores: torch.Tensor | None, t: float, generator: torch.Generator | None
                   ) -> tuple[torch.Tensor, torch.Tensor]:
        """Append one tail cluster per row, drawn by estimated mass, its exact logits shifted so
        that its tokens carry the whole estimated tail mass (logits stay in the 1/T-free scale)."""
        if scores is None:  # p = K: nothing outside the candidates
            return ids, logits
        N, p = clusters.shape
        mass = self._tail(scores, clusters, logits[:, : p * self.cap], t)  # [N, K]
        total = mass.logsumexp(1, keepdim=True)  # log of the whole tail's mass
        pick = (mass + _gumbel_like(mass, generator)).argmax(1, keepdim=True)  # [N, 1], by mass
        t_ids, t_logits = self._cluster_logits(h, pick)
        if self.always_ids.numel():  # always-scored ids are among the candidates already
            t_logits = t_logits.masked_fill(torch.isin(t_ids, self.always_ids), _NEG_INF)
        own = t_logits.div(t).logsumexp(1, keepdim=True)
        shift = torch.where(torch.isfinite(own), total - own, _NEG_INF) * t
        t_logits = t_logits + shift
        t_ids = t_ids.masked_fill(torch.isinf(t_logits), -1)
        return torch.cat([ids, t_ids], 1), torch.cat([logits, t_logits], 1)

    # ---------------------------------------------------------------- stage 2
    def candidates(self, h: torch.Tensor, clusters: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Stage 2: exact logits of the probed clusters' rows plus the always-scored ids.

        Returns ``(token_ids [N, M] int64, logits [N, M] float32)`` with
        ``M = p * cap + len(always_ids)``.  Empty slots, and always-scored ids that are also
        in a probed cluster (so that every token appears once), have id ``-1`` and logit
        ``-inf``.
        """
        h = self._check_hidden(h, two_d=True)
        if not isinstance(clusters, torch.Tensor) or clusters.dim() != 2 or clusters.shape[0] != h.shape[0]:
            raise ValueError(
                f"clusters must be a [N={h.shape[0]}, p] integer tensor (from select_clusters), got "
                f"{tuple(clusters.shape) if isinstance(clusters, torch.Tensor) else type(clusters).__name__}"
            )
        if clusters.dtype.is_floating_point or clusters.dtype == torch.bool:
            raise ValueError(f"clusters must hold integer cluster ids, got {clusters.dtype}")
        clusters = clusters.to(device=h.device, dtype=torch.int64)
        if clusters.numel() and (int(clusters.min()) < 0 or int(clusters.max()) >= self.K):
            raise ValueError(f"cluster ids must lie in [0, K={self.K})")
        return self._candidates(h, clusters.contiguous())

    def _candidates(self, h: torch.Tensor, clusters: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        q8 = self.row_scales is not None
        act = q8_0_quantize(h.float()) if q8 and self.quantize_activations else None  # once for both parts
        ids, logits = self._cluster_logits(h, clusters, act)
        if self.always_ids.numel():
            a_rows = self.rows[self.always_cluster, self.always_pos]  # [A, d]
            if not q8:
                a_logits = (h.to(self.rows.dtype) @ a_rows.t()).float()  # [N, A]
            else:  # A one-row "clusters", through the same kernel as the probed rows
                A = a_rows.shape[0]
                a_scales = self.row_scales[self.always_cluster, self.always_pos]
                a_logits = self._q8_cluster_logits(h.float(), torch.arange(A, device=h.device).expand(h.shape[0], A),
                                                   act, a_rows.view(A, 1, -1), a_scales.view(A, 1, -1))
            probed = torch.zeros(h.shape[0], self.K, dtype=torch.bool, device=h.device)
            dup = probed.scatter_(1, clusters, True)[:, self.always_cluster]  # [N, A]: also in a probed cluster
            a_logits.masked_fill_(dup, _NEG_INF)
            a_ids = self.always_ids.expand(h.shape[0], -1).masked_fill(dup, -1)
            ids = torch.cat([ids, a_ids], 1)
            logits = torch.cat([logits, a_logits], 1)
        return ids, logits

    def _cluster_logits(self, h: torch.Tensor, clusters: torch.Tensor,
                        act: tuple[torch.Tensor, torch.Tensor] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Exact logits of the rows of ``clusters`` [N, p]: (ids [N, p*cap], logits float32 [N, p*cap]);
        ``act``: ``h`` already in Q8_0 (Q8_0 rows with quantized activations), else quantized here."""
        N, p = clusters.shape
        cap, d = self.cap, self.d
        M = p * cap
        hc = h.to(self.rows.dtype) if self.row_scales is None else h.float()
        rows = self.rows
        if N == 0:
            logits = torch.empty(0, M, dtype=torch.float32, device=h.device)
        elif self.row_scales is not None:
            logits = self._q8_cluster_logits(hc, clusters, act)
        elif torch.is_grad_enabled() and (rows.requires_grad or hc.requires_grad):
            # autograd path (rows may be a view of a trainable weight): no out= buffers
            logits = torch.stack(
                [torch.mv(rows.index_select(0, clusters[i]).view(M, d), hc[i]) for i in range(N)]
            ).float()
        elif (fused := _kernels.gather_gemv(rows, clusters, hc)) is not None:
            logits = fused  # fp32 on CPU: one pass over the rows, no copy (flashhead/_kernels.py)
        else:
            # per row, chunk by chunk: gather ~1 MiB of that row's clusters into a reused scratch
            # buffer (stays in L2) and run one GEMV on it straight into the logits.  Rows are read
            # from memory once; gathering all p clusters at once wrote and re-read p*cap*d values
            # (21 MB per row for Gemma at p=512) through freshly allocated pages.  Each row is
            # computed with the same chunking whatever the batch, so results stay batch-invariant.
            C = max(1, min(p, _STAGE2_CHUNK_BYTES // (cap * d * rows.element_size())))
            buf = _scratch(C * cap * d, rows.dtype, rows.device).view(C, cap, d)
            logits = torch.empty(N, M, dtype=rows.dtype, device=h.device)
            threads = torch.get_num_threads()
            narrow = rows.device.type == "cpu" and _STAGE2_THREADS is not None and threads > _STAGE2_THREADS
            if narrow:
                torch.set_num_threads(_STAGE2_THREADS)
            try:
                for i in range(N):
                    cl, out, hi = clusters[i], logits[i], hc[i]
                    for s in range(0, p, C):
                        n = min(C, p - s)
                        b = buf[:n]
                        torch.index_select(rows, 0, cl[s:s + n], out=b)
                        torch.mv(b.view(n * cap, d), hi, out=out[s * cap:(s + n) * cap])
            finally:
                if narrow:
                    torch.set_num_threads(threads)
            logits = logits.float()
        ids = self.slot_token.index_select(0, clusters.reshape(-1)).view(N, M)
        if self._has_empty:  # empty slots (zero rows) must not compete: only when K * cap > V
            logits.masked_fill_(ids < 0, _NEG_INF)
        return ids, logits

    def _q8_cluster_logits(self, h: torch.Tensor, clusters: torch.Tensor,
                           act: tuple[torch.Tensor, torch.Tensor] | None = None, rows: torch.Tensor | None = None,
                           scales: torch.Tensor | None = None) -> torch.Tensor:
        """Logits [N, p*cap] float32 of Q8_0 rows (the head's, or the given ``rows [k, c, d]`` and ``scales``):
        the compiled kernel, else per row ~1 MiB of int8 rows at a time, gathered and scored by
        :meth:`_q8_logits`."""
        N, p = clusters.shape
        rows = self.rows if rows is None else rows
        scales = self.row_scales if scales is None else scales
        if act is None and self.quantize_activations:
            act = q8_0_quantize(h)
        if not (torch.is_grad_enabled() and h.requires_grad):
            fused = (_kernels.q8_gather_gemv(rows, scales, clusters, h) if act is None
                     else _kernels.q8q8_gather_gemv(rows, scales, clusters, *act))
            if fused is not None:
                return fused
        C = max(1, min(p, _STAGE2_CHUNK_BYTES // (rows.shape[1] * self.d)))
        out = []
        for i in range(N):
            a = None if act is None else (act[0][i:i + 1], act[1][i:i + 1])
            cl = clusters[i]
            out.append(torch.cat([
                self._q8_logits(h[i:i + 1], rows.index_select(0, cl[s:s + C]).view(-1, self.d),
                                scales.index_select(0, cl[s:s + C]).view(-1, self.d // Q8_BLOCK), a)
                for s in range(0, p, C)], 1))
        return torch.cat(out)

    def _q8_logits(self, h: torch.Tensor, q: torch.Tensor, scales: torch.Tensor,
                   act: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        """Logits [N, M] float32 of Q8_0 rows ``q [M, d]`` (int8), ``scales [M, d // 32]`` in torch: the
        rows dequantized (exact) and multiplied by ``h [N, d]``, or with Q8_0 activations (``act``, else
        quantized here when the head does so) the int32 block sums times both scales, summed over the
        blocks in the kernel's order (running sum b % 4)."""
        if not self.quantize_activations:  # one GEMV per row: the same bits whatever the batch
            w = q8_0_dequantize(q, scales)
            return torch.stack([torch.mv(w, hi) for hi in h.float()])
        hq, hs = q8_0_quantize(h.float()) if act is None else act
        N, M, nb = hq.shape[0], q.shape[0], self.d // Q8_BLOCK
        isum = (hq.view(N, 1, nb, Q8_BLOCK).int() * q.view(1, M, nb, Q8_BLOCK).int()).sum(-1)  # [N, M, nb]
        t = F.pad(isum.float() * (scales.float().unsqueeze(0) * hs.unsqueeze(1)), (0, -nb % 4))
        acc = torch.zeros(N, M, 4, device=h.device)
        for g in t.view(N, M, -1, 4).unbind(2):
            acc = acc + g
        return (acc[..., 0] + acc[..., 1]) + (acc[..., 2] + acc[..., 3])

    # ---------------------------------------------------------------- outputs
    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        """Full-width logits ``[..., out_features]`` float32, ``-inf`` outside the candidates; with
        :attr:`exact` set, the dense head's logits instead (:meth:`dense_logits`).

        With ``self.temperature`` set (sampled ``generate()``) the candidates include one tail
        cluster whose shifted logits carry the estimated mass of all unprobed clusters, so the
        softmax at that temperature is FlashHead's sampling distribution.
        """
        if self._exact:
            return self.dense_logits(hidden)
        h = self._check_hidden(hidden, two_d=False)
        clusters, scores = self._select(h, self._n_probes, ordered=self._temperature is not None)
        ids, logits = self._candidates(h, clusters)
        if self._temperature is not None:
            ids, logits = self._with_tail(h, ids, logits, clusters, scores, self._temperature, self.generator)
        out = torch.full((h.shape[0], self.out_features), _NEG_INF, dtype=torch.float32, device=h.device)
        # -1 (empty/duplicate) entries carry -inf: send them to column 0 with amax so they
        # can never overwrite a real logit, whatever the scatter order.
        out.scatter_reduce_(1, ids.clamp(min=0), logits, reduce="amax", include_self=True)
        return out.view(*hidden.shape[:-1], self.out_features)

    def dense_logits(self, hidden: torch.Tensor, chunk: int = 8192) -> torch.Tensor:
        """The dense head's logits ``[..., out_features]`` in ``hidden``'s dtype, as ``F.linear(hidden, W)`` gives them
        bit for bit: ids in near-equal chunks of ``chunk`` to ``2 * chunk``, starting at multiples of 64, their rows gathered in id order (Q8_0 rows
        dequantized, exactly), so no second copy of the head is ever whole. Every chunk stays wide (``chunk`` >= 256):
        BLAS takes another kernel, with other bits, for a product only a few columns wide. Needs every id's row
        (``padding_rows`` for the ids without a slot)."""
        if not isinstance(hidden, torch.Tensor) or hidden.dim() == 0 or hidden.shape[-1] != self.d:
            raise ValueError(f"hidden states must be a tensor with last dim d={self.d}, got "
                             f"{tuple(hidden.shape) if isinstance(hidden, torch.Tensor) else type(hidden).__name__}")
        if chunk < 256:
            raise ValueError(f"chunk must be >= 256 ids, got {chunk}")
        self._check_every_row()
        q8 = self.row_scales is not None
        flat = self.rows.view(-1, self.d)
        scales = self.row_scales.view(flat.shape[0], -1) if q8 else None
        n_pad = 0 if self.padding_rows is None else self.padding_rows.shape[0]
        slotted = self.out_features - n_pad

        def weight(a: int, b: int) -> torch.Tensor:  # rows of ids [a, b) in id order, in the dense head's dtype
            slots = self.token_slot[a:min(b, slotted)]
            rows, sc = flat[slots], (scales[slots] if q8 else None)
            if b > slotted:  # the padding rows past the slotted ids
                p = slice(max(a, slotted) - slotted, b - slotted)
                rows = torch.cat([rows, self.padding_rows[p]])
                sc = torch.cat([sc, self.padding_scales[p]]) if q8 else None
            return q8_0_dequantize(rows, sc, hidden.dtype) if q8 else rows

        out = hidden.new_empty(*hidden.shape[:-1], self.out_features)
        n = max(1, self.out_features // chunk)
        # chunk starts on multiples of 64 ids: BLAS's few-row kernels give other bits from a misaligned start
        bounds = [i * self.out_features // n // 64 * 64 for i in range(n)] + [self.out_features]
        for a, b in zip(bounds, bounds[1:]):
            out[..., a:b] = F.linear(hidden, weight(a, b))
        return out

    def greedy(self, h: torch.Tensor) -> torch.Tensor:
        """Argmax token ``[N]`` over the top-p candidates, without a vocabulary-wide tensor.

        Ties resolve to the smallest token id, as ``torch.argmax`` does over dense logits.
        """
        h = self._check_hidden(h, two_d=True)
        clusters = self._select(h, self._n_probes, ordered=False)[0]
        if self.row_scales is not None and not (torch.is_grad_enabled() and h.requires_grad):
            fused = _kernels.q8_greedy(self.rows, self.row_scales, self.slot_token, clusters, h.float(),
                                       self._always_slot, self.quantize_activations, self._block_l1)
            if fused is not None:  # stage 2, the always-scored ids and the argmax in one compiled call
                return fused
        ids, logits = self._candidates(h, clusters)
        best = logits.amax(1, keepdim=True)
        return torch.where(logits == best, ids, _INT64_MAX).amin(1)

    def sample(
        self,
        h: torch.Tensor,
        *,
        temperature: float,
        top_k: int | None = None,
        top_p: float | None = None,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Sample one token per row ``[N]`` from ``softmax(logits / T)`` over the candidates and
        one tail cluster (module docstring, point 3), after top-k then top-p filtering (same
        rules as transformers' TopK/TopP warpers)."""
        h = self._check_hidden(h, two_d=True)
        t = self._check_temperature(temperature)
        if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, numbers.Integral) or top_k < 1):
            raise ValueError(f"top_k must be an int >= 1 or None (None = no top-k), got {top_k!r}")
        if top_p is not None:
            if isinstance(top_p, bool) or not isinstance(top_p, numbers.Real) or not (0.0 < float(top_p) <= 1.0):
                raise ValueError(f"top_p must be in (0, 1] or None (None or 1.0 = no nucleus cut), got {top_p!r}")
            top_p = float(top_p)
        clusters, scores = self._select(h, self._n_probes, ordered=True)
        ids, logits = self._candidates(h, clusters)
        ids, logits = self._with_tail(h, ids, logits, clusters, scores, t, generator)
        z = logits.div_(t)
        if top_k is not None and int(top_k) < z.shape[1]:
            kth = torch.topk(z, int(top_k), dim=1).values[:, -1:]
            z = z.masked_fill(z < kth, _NEG_INF)
        if top_p is not None and top_p < 1.0:
            sz, si = torch.sort(z, dim=1, descending=False)
            cum = sz.softmax(1).cumsum(1)
            drop = cum <= (1.0 - top_p)
            drop[:, -1] = False  # keep at least the best token
            z = z.masked_fill(torch.zeros_like(drop).scatter_(1, si, drop), _NEG_INF)
        pick = (z + _gumbel_like(z, generator)).argmax(1, keepdim=True)  # Gumbel-max == softmax(z) draw
        return ids.gather(1, pick).squeeze(1)

    # ------------------------------------------------------------------ costs
    def nbytes_per_step(self, n_probes: int | None = None) -> int:
        """Bytes one query row reads: stage-1 weights (+ scales) and stage-2 rows + token ids."""
        p = self._check_probes(n_probes)
        s1 = stage1_nbytes(self.K, self.d, self.stage1)
        row = self.d * self.rows.element_size()
        if self.row_scales is not None:
            row += self.d // Q8_BLOCK * self.row_scales.element_size()
        n_rows = p * self.cap + int(self.always_ids.numel())
        return int(s1 + n_rows * (row + 8))
