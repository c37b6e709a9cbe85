"""The FlashHead index: equal-size clusters of head rows, as assets on disk.

An index is built once per model (:func:`build_index`) and saved as two files in a folder:
``index.safetensors`` (``slot_token`` [K, cap] int64, -1 = empty slot; ``centroids`` [K, d] float32)
and ``flashhead.json`` (format version, sizes, default probe count, always-scored ids, build
parameters and timings, a fingerprint of the head it was built from, and a checksum). Loading refuses
assets whose fingerprint or shapes do not match the model they are applied to, and assets changed
after they were written: the checksum covers the tensor file's bytes and every field of
``flashhead.json`` that changes results (all but the informational ``model`` and ``build``).

Geometry. The error of scoring token ``w`` through its centroid ``c`` is ``h.(w - c)``; its mean
square over the hidden states a model produces is ``(w - c)^T S (w - c)`` with ``S = E[h h^T]``.
So, given calibration hidden states, rows are clustered after the map ``w -> S^(1/2) w`` where plain
squared L2 is exactly that error. Without calibration the rows are clustered on the unit sphere
(cosine), the better of the two raw-row geometries we measured.
"""

from __future__ import annotations

import hashlib
import json
import math
import numbers
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file

from ._io import WouldOverwriteError, atomic_dir, sha256_file
from .assets import (CONFIG_FILE, FORMAT_VERSION, INFORMATIONAL_FIELDS, TENSORS_FILE, AssetError,  # the format,
                     IndexConfig, checksum)  # also imported from here by callers
from .cluster import balanced_kmeans
from .head import Q8_BLOCK, STAGE1_MODES, q8_0_rows, stage1_nbytes
from .validate import read_assets

#: revision of the build defaults (cluster size, probe rule); 2: clusters of 2 below 131,072 tokens and
#: probes filling the byte budget; 3: Q8_0 heads are recorded (stage 2 reads int8 rows) and the probes
#: are also capped at DEFAULT_ROWS_BUDGET; 4: that rows cap holds only where the calibration texts reach
#: DEFAULT_CONTAINMENT within it (else the byte budget's probes), and the first calibration set mixes Python
#: code and prose (data.DEFAULT_CALIBRATION_TEXTS); 5: the first set is Python code, a novel and the ten
#: multilingual calibration texts (man pages in six languages, a Chinese FAQ, C, JavaScript, Rust), 512
#: positions each; 6: the rows cap holds where all calibration states together keep DEFAULT_ROWS_CAP_CONTAINMENT
#: within it (a per-text quantile resting on 2 positions flipped Gemma's default between two CPUs); 7: the model's
#: own short samples, seeded across its vocabulary's scripts, join the first set in the geometry
#: (integrations/samples.py). Cached indexes are kept per revision, so new defaults build anew.
DEFAULTS_REVISION = 7


def fingerprint(weight: torch.Tensor) -> str:
    """A dtype-independent fingerprint of a head weight: its shape and the sign bits of ~4k rows.

    Casting between fp32, bf16 and fp16 never changes a sign bit (rounding to bf16 did not work:
    fp32 -> fp16 -> bf16 rounds differently from fp32 -> bf16), while a retrained, fine-tuned or
    different head flips the signs of some of its ~2.6M sampled near-zero weights.
    """
    rows = weight.shape[0]
    step = max(1, rows // 4096)
    sample = np.packbits(torch.signbit(weight.detach()[::step]).cpu().numpy())
    h = hashlib.sha256(f"{tuple(weight.shape)}".encode())
    h.update(sample.tobytes())
    return h.hexdigest()[:32]


@dataclass
class FlashHeadIndex:
    """Cluster layout of a head: which token sits in which slot, and each cluster's centroid."""

    slot_token: torch.Tensor  # [K, cap] int64, -1 = empty slot
    centroids: torch.Tensor  # [K, d] float32, mean of the cluster's head rows
    config: IndexConfig

    @property
    def num_clusters(self) -> int:
        return self.config.num_clusters

    @property
    def cluster_size(self) -> int:
        return self.config.cluster_size

    def check_weight(self, weight: torch.Tensor) -> None:
        """Refuse a head this index was not built from, saying which model it belongs to."""
        c = self.config
        if not isinstance(weight, torch.Tensor) or tuple(weight.shape) != (c.vocab_size, c.hidden_size):
            got = tuple(weight.shape) if isinstance(weight, torch.Tensor) else type(weight).__name__
            raise AssetError(
                f"these FlashHead assets were built for a head of shape ({c.vocab_size}, {c.hidden_size})"
                f"{f' ({c.model})' if c.model else ''}, but this model's head is {got}; "
                "build an index for this model with `flashhead build`"
            )
        if fingerprint(weight) != c.fingerprint:
            raise AssetError(
                f"these FlashHead assets belong to another model{f' ({c.model})' if c.model else ''}: the head "
                "weights differ from the ones they were built from; build an index for this model with `flashhead build`"
            )

    def save(self, folder: str | Path) -> Path:
        """Write the assets into ``folder`` atomically (the old assets stay until the new ones are whole).

        ``folder`` must be new, empty or hold FlashHead assets only: the whole folder is replaced.
        """
        folder = Path(folder)
        check_save_target(folder)
        with atomic_dir(folder) as tmp:
            save_file({"slot_token": self.slot_token.contiguous(), "centroids": self.centroids.contiguous()},
                      str(tmp / TENSORS_FILE), metadata={"format": f"flashhead-{FORMAT_VERSION}"})  # one key: header order stays fixed
            raw = {**asdict(self.config), "checksum": checksum(self.config, sha256_file(tmp / TENSORS_FILE))}
            (tmp / CONFIG_FILE).write_text(json.dumps(raw, indent=2) + "\n")
        return folder

    @classmethod
    def load(cls, folder: str | Path, weight: torch.Tensor | None = None) -> FlashHeadIndex:
        """Read assets from ``folder`` and validate them (and, given ``weight``, that they fit it)."""
        index = cls(*read_assets(Path(folder)))  # the checks live in one place: validate.py
        if weight is not None:
            try:
                index.check_weight(weight)
            except AssetError as e:
                raise AssetError(f"{folder}: {e}") from None
        return index


def check_save_target(folder: Path) -> None:
    """Refuse a ``folder`` that :meth:`FlashHeadIndex.save` must not replace: a file, or a folder holding
    anything but FlashHead assets (saving replaces the whole folder). Call it before a long build."""
    if folder.exists() and not folder.is_dir():
        raise WouldOverwriteError(f"{folder} is a file, not a folder; save the FlashHead assets to a new folder")
    if not folder.is_dir():
        return
    others = sorted(p.name for p in folder.iterdir() if p.name not in (TENSORS_FILE, CONFIG_FILE))
    if others:
        raise WouldOverwriteError(
            f"{folder} holds files that are not FlashHead assets ({', '.join(others[:3])}"
            f"{', ...' if len(others) > 3 else ''}); saving replaces the whole folder, so choose a new or empty one")


def _sqrt_psd(s: torch.Tensor) -> torch.Tensor:
    vals, vecs = torch.linalg.eigh(s.double())
    return ((vecs * vals.clamp_min(0).sqrt()) @ vecs.T).float()


#: the default setting is set at build time (see :func:`build_index`): as many probes as fit in
#: DEFAULT_BYTES_BUDGET of the dense head's bytes per step (the default stage 1, fp32 rows), plus the
#: DEFAULT_FREQUENT tokens most often the dense argmax on the first calibration text's states as
#: always-scored ids. The probes each calibration text needs for DEFAULT_CONTAINMENT are recorded
#: but do not set the default: that quantile rests on the 3rd-worst of ~4k positions and did not carry
#: over -- Gemma's p from it moved from 1,137 to 712 between two set-ups whose unpinned packages
#: differed (same objective to 4 digits), and held-out novels needed up to twice what Pride and
#: Prejudice gave (docs/fidelity.md). The budget is the operating point the targets are stated at;
#: fewer probes are a speed choice (``n_probes``; ``flashhead eval`` shows the trade).
DEFAULT_CONTAINMENT = 0.9995
DEFAULT_BYTES_BUDGET = 0.10
#: and at most this fraction of the vocabulary's rows scored in stage 2: with fp32 rows the bytes bind
#: first; with Q8_0 rows (~3.8x fewer bytes each) this does, so the bytes saved become speed, not more
#: probes (docs/fidelity.md, "Stage 2 in Q8_0"). A speed preference only: where the calibration states,
#: all sets together, hold the dense argmax among the candidates at fewer than DEFAULT_ROWS_CAP_CONTAINMENT
#: of their positions within it, the default takes the byte budget's probes instead (Qwen2.5-Coder:
#: 99.76% at its 945 probes; Gemma 99.95%, SmolLM2 100%; docs/design.md, "The default probe count").
DEFAULT_ROWS_BUDGET = 0.10
#: the containment at the rows cap that keeps it: the agreement target itself
DEFAULT_ROWS_CAP_CONTAINMENT = 0.999
DEFAULT_FREQUENT = 64
#: vocabularies below this size get small clusters and int4 stage 1 (see :func:`default_cluster_size`)
SMALL_VOCAB = 131072


def default_cluster_size(num_tokens: int) -> int:
    """2 tokens per cluster below 131,072 tokens, else 16.

    At a fixed byte budget, smaller clusters rank the dense argmax's cluster better: on SmolLM2 at
    10% of the dense bytes with int4 stage 1 the dense argmax's cluster is probed on 99.32-99.78% of
    held-out positions with clusters of 16, 99.80-100% with 4 and 99.98-100% with 2
    (``labs/budget_lab.py``, docs/fidelity.md). Their cost is stage-1 work: K = V/2 centroids.
    For Gemma (262k tokens) that would be 131,072 centroids to score and rank per step (in int8 more
    bytes than the whole budget), and clusters of 16 meet the target there.
    """
    return 2 if num_tokens < SMALL_VOCAB else 16


def default_stage1(num_tokens: int) -> str:
    """int4 (per group of 64) below 131,072 tokens, else int8.

    With small clusters, int8 centroids alone take most of a 10% byte budget (clusters of 2: 12.6%);
    int4 takes half and ranks as well as float (SmolLM2). torch's int4 kernel is a
    per-row GEMV, twice as slow as int8's ``_int_mm`` at batch 8 on Gemma's 16,384 centroids, so large
    vocabularies keep int8.
    """
    return "int4" if num_tokens < SMALL_VOCAB else "int8"


def build_index(weight: torch.Tensor, cluster_size: int | None = None, *, hidden_states: torch.Tensor | None = None,
                validation_states: Sequence[torch.Tensor] = (), num_tokens: int | None = None,
                n_probes: int | None = None, stage1: str | None = None, always_ids: list[int] | tuple = (),
                frequent: int = DEFAULT_FREQUENT, iters: int = 10, seed: int = 0, model_name: str = "",
                calibration: dict | None = None, shrinkage: float = 0.0, shrink_to: str = "identity",
                geometry_states: torch.Tensor | None = None, progress: bool = True) -> FlashHeadIndex:
    """Cluster the rows of a head ``weight`` [V, d] into K equal clusters of ``cluster_size`` tokens.

    ``num_tokens`` (default V) rows are clustered; rows past it (embedding padding beyond the
    tokenizer) are left out and never returned. When ``num_tokens`` is not a multiple of
    ``cluster_size`` (default :func:`default_cluster_size`), K = ceil(num_tokens / cluster_size) and
    the K*cap - num_tokens empty slots (fewer than cap) are marked -1. ``hidden_states`` [n, d]
    select the S^(1/2) geometry (see the module docstring) and calibrate the default setting: the
    ``frequent`` tokens most often the dense argmax join ``always_ids``, and ``n_probes`` (unless
    given) is the most that fit DEFAULT_BYTES_BUDGET with stage 1 in ``stage1`` precision (default
    :func:`default_stage1`) and stage 2 in the head's stored precision (``config.stage2``: "q8_0" when the
    head is exactly int8 times an fp16 scale per 32 weights, else "float"), and DEFAULT_ROWS_BUDGET of its
    rows; the probes reaching DEFAULT_CONTAINMENT on them and on each of the
    ``validation_states`` (hidden states of other texts, [n_i, d]) are recorded. Without hidden states
    ``n_probes`` defaults to K/32. ``shrinkage`` (0..1) mixes S with a target of the same trace, for
    directions the calibration states barely visit: ``shrink_to`` "identity" (every direction alike) or
    "rows" (``W^T W / V``: the directions in which the head's rows differ). ``geometry_states`` [m, d] (e.g.
    the model's own samples) join ``hidden_states`` in S only: the always-scored tokens and the probe rule
    stay on the texts' states.
    """
    if weight.dim() != 2 or not weight.is_floating_point():
        raise ValueError(f"head weight must be a 2-D float tensor [vocab, hidden], got {tuple(weight.shape)} {weight.dtype}")
    vocab, hidden = weight.shape
    num_tokens = vocab if num_tokens is None else int(num_tokens)
    if not 0 < num_tokens <= vocab:
        raise ValueError(f"num_tokens must be in 1..{vocab} (the head's rows), got {num_tokens}")
    if cluster_size is None:
        cluster_size = default_cluster_size(num_tokens)
    if stage1 is None:
        stage1 = default_stage1(num_tokens)
    if stage1 not in STAGE1_MODES:
        raise ValueError(f"stage1 must be one of {STAGE1_MODES} (the default stage-1 precision), got {stage1!r}")
    if isinstance(frequent, bool) or not isinstance(frequent, int) or frequent < 0:
        raise ValueError(f"frequent must be an integer >= 0 (always-scored frequent argmax tokens), got {frequent!r}")
    if not isinstance(cluster_size, int) or cluster_size < 2 or cluster_size > num_tokens // 2:
        raise ValueError(f"cluster_size must be an integer from 2 to {num_tokens // 2} (half the tokens) so that "
                         f"there are at least two clusters; got {cluster_size!r} (16 is the usual choice)")
    bad = [i for i in always_ids if not 0 <= int(i) < num_tokens]
    if bad:
        raise ValueError(f"always_ids {bad} are not token ids (0..{num_tokens - 1})")
    if isinstance(shrinkage, bool) or not isinstance(shrinkage, numbers.Real) or not 0 <= shrinkage <= 1:
        raise ValueError(f"shrinkage must be a number from 0 (S as calibrated) to 1 (the target), got {shrinkage!r}")
    if shrink_to not in ("identity", "rows"):
        raise ValueError(f"shrink_to must be 'identity' or 'rows', got {shrink_to!r}")
    if geometry_states is not None and hidden_states is None:
        raise ValueError("geometry_states join the calibration hidden states in S: give hidden_states too")
    k = math.ceil(num_tokens / cluster_size)
    if n_probes is not None and (isinstance(n_probes, bool) or not isinstance(n_probes, numbers.Integral)
                                 or not 1 <= n_probes <= k):
        raise ValueError(f"n_probes must be an integer from 1 to K = {k} (the number of clusters), got {n_probes!r}")
    t0 = time.perf_counter()
    w = weight.detach()[:num_tokens].float()
    if hidden_states is not None:
        h = hidden_states.detach().float()
        g = h if geometry_states is None else torch.cat([h, geometry_states.detach().float()])
        checks = [("hidden_states", h)] + [(f"validation_states[{i}]", v) for i, v in enumerate(validation_states)]
        checks += [] if geometry_states is None else [("geometry_states", geometry_states)]
        for what, x in checks:
            if x.dim() != 2 or x.shape[0] < 1 or x.shape[1] != hidden or not torch.isfinite(x).all():
                raise ValueError(f"{what} must be finite [n, {hidden}] hidden states, got {tuple(x.shape)}")
        s = g.T @ g / g.shape[0]
        del g
        if shrinkage:
            target = torch.eye(hidden) if shrink_to == "identity" else w.T @ w / num_tokens
            s = (1 - shrinkage) * s + shrinkage * (s.trace() / target.trace()) * target
        x = w @ _sqrt_psd(s)
        geometry = "S^(1/2) w, S = E[h h^T] over calibration hidden states" + (
            " and the model's own samples" if geometry_states is not None else "") + (
            f", shrunk by {shrinkage:g} towards {'I' if shrink_to == 'identity' else 'W^T W / V'}, same trace"
            if shrinkage else "")
    else:
        x = torch.nn.functional.normalize(w, dim=1)
        geometry = "spherical (unit-norm rows)"
    t_map = time.perf_counter() - t0
    stage2 = "q8_0" if q8_0_rows(weight[:num_tokens]) is not None else "float"  # int8 rows, exactly
    result = balanced_kmeans(x, k, cluster_size, iters=iters, seed=seed, progress=progress)
    del x
    t_cluster = time.perf_counter() - t0 - t_map
    slots = result.slots
    filled = slots.clamp_min(0)
    mask = (slots >= 0).unsqueeze(-1).float()
    centroids = (w[filled] * mask).sum(1) / mask.sum(1)
    always = {int(i) for i in always_ids}
    defaults: dict = {"rule": "K/32 (no calibration states)"}
    if hidden_states is not None:
        always, p_cal, defaults = _calibrate_defaults(w, centroids, slots, [h, *validation_states], always, frequent,
                                                      vocab, stage1, stage2)
        n_probes = p_cal if n_probes is None else n_probes
    elif n_probes is None:
        n_probes = default_probes(k)
    config = IndexConfig(
        vocab_size=vocab, num_tokens=num_tokens, hidden_size=hidden, num_clusters=k, cluster_size=cluster_size,
        n_probes=int(n_probes), always_ids=sorted(always), fingerprint=fingerprint(weight), stage1=stage1,
        stage2=stage2,
        model=model_name,
        build={"seed": seed, "iters": iters, "geometry": geometry, "calibration": calibration or None,
               "objective": result.objective, "objective_history": result.history,
               "seconds_map": round(t_map, 3), "seconds_cluster": round(t_cluster, 3), "defaults": defaults},
    )
    return FlashHeadIndex(slots, centroids.contiguous(), config)


def _calibrate_defaults(w: torch.Tensor, centroids: torch.Tensor, slots: torch.Tensor, sets: list[torch.Tensor],
                        always: set[int], frequent: int, vocab: int, stage1: str, stage2: str
                        ) -> tuple[set[int], int, dict]:
    """Always-scored ids (from the first set of calibration states), the default probe count (the byte
    budget's) and what each set of states needs for DEFAULT_CONTAINMENT (recorded, see above)."""
    k, cap = slots.shape
    d = w.shape[1]
    tops = [torch.cat([(h[a:a + 256] @ w.T).argmax(1) for a in range(0, h.shape[0], 256)]) for h in sets]
    counts = torch.bincount(tops[0], minlength=w.shape[0])
    common = [int(i) for i in counts.argsort(descending=True, stable=True)[:frequent] if counts[i] > 0]
    always = always | set(common)
    always_t = torch.tensor(sorted(always), dtype=torch.long)
    cluster_of = torch.empty(w.shape[0], dtype=torch.long)
    cluster_of[slots[slots >= 0]] = torch.arange(k).unsqueeze(1).expand_as(slots)[slots >= 0]
    ranks = []
    for h, top in zip(sets, tops):
        scores = h @ centroids.T  # [n, K]
        rank = (scores > scores.gather(1, cluster_of[top].unsqueeze(1))).sum(1)  # probes needed: rank + 1
        rank[torch.isin(top, always_t)] = 0  # scored at every step anyway
        ranks.append(rank)
    needs = [int(r.sort().values[math.ceil(DEFAULT_CONTAINMENT * len(r)) - 1]) + 1 for r in ranks]
    need = max(needs)
    # bytes per step / dense fp32 bytes: stage 1 + the candidates' rows (fp32, or int8 + fp16 scales) and int64 ids
    room = DEFAULT_BYTES_BUDGET * vocab * d * 4 - stage1_nbytes(k, d, stage1)
    row = d + d // Q8_BLOCK * 2 if stage2 == "q8_0" else 4 * d
    p_bytes = int((room / (row + 8) - len(always)) // cap)
    p_rows = int((DEFAULT_ROWS_BUDGET * vocab - len(always)) // cap)
    at_cap = float((torch.cat(ranks) < p_rows).float().mean())  # all sets' positions together
    rows_cap = at_cap >= DEFAULT_ROWS_CAP_CONTAINMENT
    p_max = max(1, min(k, p_bytes, p_rows if rows_cap else k))
    rule = f"the most probes within {DEFAULT_BYTES_BUDGET:.0%} of the dense head's bytes with {stage1} stage 1 and {stage2} rows"
    return always, p_max, {
        "rule": rule + (f", and {DEFAULT_ROWS_BUDGET:.0%} of its rows" if rows_cap else
                        f" (not capped at {DEFAULT_ROWS_BUDGET:.0%} of its rows: the calibration texts keep only "
                        f"{at_cap:.3%} containment there, under {DEFAULT_ROWS_CAP_CONTAINMENT:.1%})"),
        "containment_at_rows_cap": at_cap,
        "probes_max_in_bytes": p_bytes, "probes_max_in_rows": p_rows,
        "frequent_argmax_ids": common, "probes_needed": need, "probes_needed_per_text": needs,
        "probes_needed_containment": DEFAULT_CONTAINMENT, "probes_max_in_budget": p_max,
        "calibration_containment_at_default": [float((r < p_max).float().mean()) for r in ranks]}


def default_probes(num_clusters: int) -> int:
    """Default probe count: K/32 clusters (at cap 16, half as many candidate rows as centroids)."""
    return max(1, num_clusters // 32)
