"""Balanced (equal-size) k-means for FlashHead's cluster index.

``balanced_kmeans(x, K, cap)`` splits the ``n`` rows of ``x`` into ``K`` clusters of
exactly ``cap`` slots each and minimises the plain k-means objective
``mean_i ||x_i - c(i)||^2``.  The caller picks the geometry (FlashHead maps head rows
``w`` to ``S^(1/2) w`` with ``S = E[h h^T]``, so the objective is the expected squared
logit error ``E[(h . (w_i - c_w))^2]``); here it is plain squared L2.

Algorithm (chosen by measurement, ``labs/cluster_lab.py``)
----------------------------------------------------------------
Lloyd iterations whose assignment step is an (eps-)optimal capacity-constrained
assignment, made affordable by solving it inside groups of ``group_clusters`` (256)
neighbouring clusters:

1. *Start.*  Balanced recursive bisection along the principal direction (estimated on a
   4096-row sample) cuts the rows into groups of consecutive clusters, each holding
   exactly the rows its clusters can take; inside a group the centroids are distinct
   random rows.
2. *Assignment.*  A row may join any cluster of its group: ``n x 256`` distances from
   one GEMM per group (never the ``n x K`` matrix: 17 GB and 5.5 TFLOP per iteration for
   Gemma).  They are assigned by a forward auction (Bertsekas' auction for assignment
   with similar objects: a cluster is ``cap`` identical slots with prices; unassigned
   rows bid on their best cluster, paying their margin over the second best plus ``eps``;
   a full cluster evicts its lowest bidder, who bids again elsewhere).  Early iterations
   use ``eps = 0.1 * objective`` and stop with 0.1 % of the rows unplaced, the last two
   ``eps = 0.03 * objective`` and 0.01 %; leftovers go greedily to the nearest cluster of
   their group with room.  The auction runs as one compiled call (``flashhead._kernels``)
   that replays these rounds bit for bit; the torch code is the fallback and the reference.
3. *Regrouping.*  Before every later iteration the centroids are themselves grouped by a
   short balanced k-means (this function, recursively, random start), so group borders
   move and rows migrate anywhere over the iterations (fixed groups: objective +2 %).
4. *Update.*  The centroids are the means, but the next assignment uses over-relaxed
   centroids ``c <- c + 2 (mean - c)``: under capacity constraints plain Lloyd creeps
   (a cluster's move is held back by the prices of its neighbours) and relaxation about
   doubles the progress per iteration.  If the objective rises, the next step restarts from
   the best means with the relaxation halved; the best partition seen is returned.

Why not the greedy fill (pairs by distance, first come first served): rows that find all
their near clusters full must take a far one, and a far row is lost to retrieval; the
auction displaces whichever row loses least.  The lab figures behind these choices (objective,
containment, group sizes, wall time, memory) are in docs/benchmarks.md, "Building an index".

Empty slots: the ``E = K * cap - n`` (``< cap``) empty slots are spread as evenly as
possible over the *last* clusters, at the end of their rows: with ``E <= K`` (always when
``cap <= K``) the last ``E`` clusters each hold ``cap - 1`` rows and
``slots[K - E:, cap - 1] == -1``.  Rows inside a cluster are in increasing index order.

Determinism: all randomness comes from a ``torch.Generator`` seeded with ``seed``; sorts
are stable and ties are broken by index, so the same input and seed give bit-identical
``slots`` and ``centroids`` (also across 1 and 2 torch threads, checked on x86).
"""
from __future__ import annotations

import contextlib
import math
import numbers
import time
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from . import _kernels

__all__ = ["Clustering", "balanced_kmeans"]


@dataclass(frozen=True)
class Clustering:
    """Result of :func:`balanced_kmeans`.

    Attributes:
        slots: ``[K, cap]`` int64 row indices into ``x``; ``-1`` marks an empty slot.
        centroids: ``[K, d]`` float32 mean of each cluster's real rows, in ``x``'s space.
        objective: mean over rows of ``||x_i - c(i)||^2`` (what the algorithm minimises).
        history: objective after each iteration.
    """

    slots: torch.Tensor
    centroids: torch.Tensor
    objective: float
    history: list[float]


#: run the auction as one compiled call (flashhead._kernels.auction, the same bits) when it is available;
#: the tests turn it off to compare with the torch code
_COMPILED_AUCTION = True

# Tuned defaults (see the module docstring).  ``labs/cluster_lab.py`` overrides them
# through ``_balanced_kmeans(..., **knobs)``; they are not public API.
_DEFAULTS = dict(
    group_clusters=256,  # clusters per group; a row is assigned among its group's clusters
    regroup_iters=2,  # balanced k-means iterations of the centroid grouping
    relax=2.0,  # over-relaxation of the centroids used for the next assignment
    guard=0.5,  # on an objective rise: restart from the best means, relax = 1 + (relax-1)*guard
    polish_tau=4.0,  # final swaps for rows farther than this times the objective ...
    polish_rows=2000,  # ... at most this many rows per sweep
    polish_sweeps=3,
    eps_first=0.3,  # auction eps relative to the objective, first iteration (random centroids)
    stop_first=1e-2,  # ... and the fraction of rows it may leave unplaced
    eps_rel=0.1,  # auction eps relative to the objective (early iterations)
    stop_frac=1e-3,  # early iterations stop the auction with this fraction of rows unplaced
    fine_last=2,  # the last iterations use eps_last / stop_last
    eps_last=0.03,
    stop_last=1e-4,
    max_rounds=3000,  # hard cap on auction rounds (leftovers are placed greedily)
    patience=200,  # ... and stop when the unplaced count has not hit a new low for this long
    chunk=16384,  # rows per block for dense work
    tol=0.0,  # see balanced_kmeans; 0 here so that the regrouping runs its iterations
)


def balanced_kmeans(
    x: torch.Tensor,
    num_clusters: int,
    cluster_size: int,
    *,
    iters: int = 10,
    seed: int = 0,
    progress: bool = True,
    tol: float = 1e-3,
) -> Clustering:
    """Partition the rows of ``x`` into ``num_clusters`` clusters of exactly ``cluster_size`` slots.

    Minimises ``mean_i ||x_i - c(i)||^2`` (squared L2 to the cluster mean); see the module
    docstring for the algorithm.

    Args:
        x: ``[n, d]`` real tensor (used as float32 on the CPU), with
            ``(num_clusters - 1) * cluster_size < n <= num_clusters * cluster_size``.
        num_clusters: ``K``, the number of clusters.
        cluster_size: ``cap``, the slots per cluster.
        iters: Lloyd iterations (assignment + centroid update); ``0`` returns the start
            partition (balanced bisection + random centroids, one assignment).
        seed: seeds the ``torch.Generator`` behind every random choice.
        progress: show a tqdm bar over the iterations with the current objective.
        tol: once two iterations in a row improve the best objective by less than ``tol``
            (relative), skip to the final fine iterations: with clusters of 2 the partition is
            settled after one iteration (SmolLM2: 1.3461 after the first, 1.3453 after ten),
            while clusters of 16 still gain 0.3% per iteration at the tenth (Gemma).  ``0``
            always runs ``iters`` iterations.

    Returns:
        :class:`Clustering`.  Every row index ``0..n-1`` appears exactly once in ``slots``;
        the ``K * cap - n`` empty slots (``-1``) are spread over the last clusters, one
        per cluster (at slot ``cap - 1``) when ``K * cap - n <= K``.

    Raises:
        ValueError: bad type, shape, dtype, non-finite values, or sizes that do not fit.
    """
    if isinstance(tol, bool) or not isinstance(tol, numbers.Real) or not 0 <= tol < 1:
        raise ValueError(f"tol must be a number in [0, 1) (relative objective improvement), got {tol!r}")
    return _balanced_kmeans(x, num_clusters, cluster_size, iters=iters, seed=seed, progress=progress, tol=float(tol))


# --------------------------------------------------------------------------- validation


def _check_int(name: str, value, lo: int, hi: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ValueError(f"{name} must be an int, got {type(value).__name__} ({value!r})")
    value = int(value)
    if value < lo or (hi is not None and value >= hi):
        rng = f">= {lo}" if hi is None else f"in [{lo}, {hi})"
        raise ValueError(f"{name} must be {rng}, got {value}")
    return value


def _validate(x, num_clusters, cluster_size, iters, seed):
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"x must be a torch.Tensor of shape [n, d], got {type(x).__name__}; "
                         "wrap arrays with torch.as_tensor(x, dtype=torch.float32)")
    if x.dim() != 2:
        raise ValueError(f"x must be 2-D [n, d], got shape {tuple(x.shape)}")
    if x.is_complex() or not x.is_floating_point():
        raise ValueError(f"x must be a real floating tensor, got dtype {x.dtype}; convert it with x.float()")
    k = _check_int("num_clusters", num_clusters, 1)
    cap = _check_int("cluster_size", cluster_size, 1)
    iters = _check_int("iters", iters, 0)
    seed = _check_int("seed", seed, -(2**63), 2**64)
    n, d = x.shape
    if n == 0 or d == 0:
        raise ValueError(f"x must have at least one row and one column, got shape {tuple(x.shape)}")
    if not (k - 1) * cap < n <= k * cap:
        raise ValueError(
            f"{n} rows do not fit {k} clusters of {cap} slots: need "
            f"(num_clusters - 1) * cluster_size < n <= num_clusters * cluster_size, i.e. "
            f"{(k - 1) * cap} < n <= {k * cap}; use num_clusters = ceil(n / cluster_size) = "
            f"{math.ceil(n / cap)}")
    x = x.detach().to(device="cpu", dtype=torch.float32).contiguous()
    for a in range(0, n, 8192):
        ok = torch.isfinite(x[a:a + 8192]).all(1)
        if not bool(ok.all()):
            bad = a + int((~ok).nonzero()[0])
            raise ValueError(f"x contains NaN or inf (first bad row: {bad}); clean the input first")
    return x, k, cap, iters, seed


# --------------------------------------------------------------------------- partitions


def _capacities(k: int, cap: int, n: int) -> torch.Tensor:
    """Rows per cluster: the ``k * cap - n`` empty slots spread as evenly as possible over
    the trailing clusters (one each in the last ones when there are at most ``k``)."""
    empty = k * cap - n
    e = torch.full((k,), empty // k, dtype=torch.long)
    if empty % k:
        e[k - empty % k:] += 1
    return cap - e


def _slots(owner: torch.Tensor, capacity: torch.Tensor, cap: int) -> torch.Tensor:
    """``[K, cap]`` rows of each cluster in increasing index order, ``-1`` padded at the end."""
    k = capacity.numel()
    slots = torch.full((k, cap), -1, dtype=torch.long)
    slots[torch.arange(cap)[None, :] < capacity[:, None]] = torch.argsort(owner, stable=True)
    return slots


def _means(x: torch.Tensor, slots: torch.Tensor, chunk: int) -> torch.Tensor:
    """Mean of each cluster's rows.

    Gathers ``[clusters, cap, d]`` blocks and sums over the slot axis: a fixed summation
    order, so the result does not depend on the thread count.
    """
    k, cap = slots.shape
    cents = torch.empty(k, x.shape[1])
    step = max(1, chunk // cap)
    for a in range(0, k, step):
        s = slots[a:a + step]
        rows = x[s.clamp_min(0)]
        pad = s < 0
        if bool(pad.any()):
            rows[pad] = 0.0
        torch.div(rows.sum(1), (~pad).sum(1, keepdim=True), out=cents[a:a + step])
    return cents


def _objective_fast(xsq_sum: float, cents: torch.Tensor, capacity: torch.Tensor, n: int) -> float:
    """``sum_i ||x_i||^2 - sum_k n_k ||c_k||^2`` over ``n`` (exact for mean centroids; x is
    centred, so the cancellation is mild).  Used for the history; the result is direct."""
    csq = cents.double().pow(2).sum(1)
    return max(0.0, (xsq_sum - float((csq * capacity.double()).sum())) / n)


def _objective(x: torch.Tensor, cents: torch.Tensor, slots: torch.Tensor, chunk: int) -> float:
    """``mean_i ||x_i - c(i)||^2``, computed directly in blocks."""
    k, cap = slots.shape
    step = max(1, chunk // cap)
    total = 0.0
    for a in range(0, k, step):
        s = slots[a:a + step]
        rows = x[s.clamp_min(0)] - cents[a:a + step].unsqueeze(1)
        rows[s < 0] = 0.0
        total += float(torch.linalg.vector_norm(rows, dtype=torch.float64) ** 2)
    return total / int((slots >= 0).sum())


def _principal(xs: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Leading principal direction of the rows of ``xs`` (a few power iterations)."""
    mu = xs.mean(0)
    v = torch.randn(xs.shape[1], generator=gen)
    for _ in range(4):
        v = xs.T @ (xs @ v - mu @ v)
        v = v / v.norm().clamp_min(1e-30)
    return v


def _start_groups(x, capacity, group_clusters, gen, chunk, sample=4096):
    """Recursive balanced bisection into groups of at most ``group_clusters`` consecutive
    clusters, each with exactly as many rows as its clusters hold.

    A node with clusters ``a:b`` is split at ``mid`` by sorting its rows along their
    principal direction (estimated on a random subsample): the first rows, as many as
    clusters ``a:mid`` hold, go left.  All nodes of a level are projected with one GEMM.
    Returns ``gstart`` (group g owns clusters ``gstart[g]:gstart[g+1]``) and the group of
    every row.
    """
    k, n = capacity.numel(), x.shape[0]
    ccap = torch.cat([torch.zeros(1, dtype=torch.long), torch.cumsum(capacity, 0)]).tolist()
    ranges = [(0, k)]
    node = torch.zeros(n, dtype=torch.long)  # node of every row at the current level
    while any(b - a > group_clusters for a, b in ranges):
        order = torch.argsort(node, stable=True)
        counts = torch.bincount(node, minlength=len(ranges)).tolist()
        dirs = torch.zeros(x.shape[1], len(ranges))
        segs, pos = [], 0
        for i, (a, b) in enumerate(ranges):
            rows = order[pos:pos + counts[i]]
            pos += counts[i]
            segs.append(rows)
            if b - a > group_clusters:
                pick = rows if rows.numel() <= sample else \
                    rows[torch.randperm(rows.numel(), generator=gen)[:sample].sort().values]
                dirs[:, i] = _principal(x[pick], gen)
        score = torch.empty(n)
        for a in range(0, n, chunk):
            score[a:a + chunk] = (x[a:a + chunk] @ dirs).gather(1, node[a:a + chunk, None]).squeeze(1)
        new_ranges = []
        for i, (a, b) in enumerate(ranges):
            rows = segs[i]
            if b - a <= group_clusters:
                node[rows] = len(new_ranges)
                new_ranges.append((a, b))
                continue
            mid = a + (b - a) // 2
            srt = rows[torch.argsort(score[rows], stable=True)]
            cut = ccap[mid] - ccap[a]
            node[srt[:cut]] = len(new_ranges)
            node[srt[cut:]] = len(new_ranges) + 1
            new_ranges += [(a, mid), (mid, b)]
        ranges = new_ranges
    gstart = torch.tensor([a for a, _ in ranges] + [k], dtype=torch.long)
    return gstart, node


def _regroup(cents, group_clusters, gen, iters):
    """Group the centroids into balanced groups of ``group_clusters`` by a short balanced
    k-means from a random start (so group borders move between calls).

    Returns ``[G, group_clusters]`` member cluster ids, ``-1`` padded.
    """
    k = cents.shape[0]
    if k <= group_clusters:
        return torch.arange(k)[None, :]
    seed = int(torch.randint(0, 2**62, (1,), generator=gen))
    res = _balanced_kmeans(cents, math.ceil(k / group_clusters), group_clusters, iters=iters,
                           seed=seed, progress=False, fine_last=0, stop_frac=0.01, relax=1.0,
                           polish_rows=0)
    return res.slots


# --------------------------------------------------------------------------- assignment


def _group_costs(x, cents, members, group_of_row):
    """Costs of every row against every cluster of its group, rows sorted by group.

    Returns ``order`` (rows sorted by group, stable), ``cost [n, width]`` with
    ``cost[r, j] = ||c||^2 - 2 x.c`` for row ``order[r]`` and ``c = cents[members[g, j]]``
    (the row's own ``||x||^2`` is a per-row constant and left out; ``inf`` on padding), and
    the group of each sorted row.
    """
    g_num, width = members.shape
    csq = cents.pow(2).sum(1)
    order = torch.argsort(group_of_row, stable=True)
    counts = torch.bincount(group_of_row, minlength=g_num)
    cost = torch.empty(x.shape[0], width)
    pos = 0
    for g, cnt in enumerate(counts.tolist()):
        if cnt == 0:
            continue
        mem = members[g]
        ids = mem.clamp_min(0)
        out = cost[pos:pos + cnt]
        torch.addmm(csq[ids], x[order[pos:pos + cnt]], cents[ids].T, alpha=-2.0, out=out)
        if bool((mem < 0).any()):
            out[:, mem < 0] = math.inf
        pos += cnt
    return order, cost, torch.repeat_interleave(torch.arange(g_num), counts)


def _rank_in_runs(keys: torch.Tensor) -> torch.Tensor:
    """Position of each element inside its run of equal consecutive ``keys``."""
    _, cnt = torch.unique_consecutive(keys, return_counts=True)
    return torch.arange(keys.numel()) - torch.repeat_interleave(torch.cumsum(cnt, 0) - cnt, cnt)


def _best_two(cost, members, row_group, price, todo, block=32768):
    """For rows ``todo``: lowest and second lowest ``cost + price`` and the best cluster
    (in blocks of rows, to bound the temporaries)."""
    c1 = torch.empty(todo.numel())
    c2 = torch.full((todo.numel(),), math.inf)
    kb = torch.empty(todo.numel(), dtype=torch.long)
    for a in range(0, todo.numel(), block):
        t = todo[a:a + block]
        kc = members[row_group[t]]
        c = cost[t] + price[kc]
        v, j = c.min(1)
        c1[a:a + block] = v
        kb[a:a + block] = kc.gather(1, j[:, None]).squeeze(1)
        if c.shape[1] >= 2:
            c.scatter_(1, j[:, None], math.inf)
            c2[a:a + block] = c.min(1).values
    return c1, c2, kb


@contextlib.contextmanager
def _one_thread():
    """Run a block with one intra-op thread (restored afterwards).

    The auction is thousands of rounds of small tensor ops; their OpenMP fork/join costs
    more than it saves, and on a busy machine each join can stall for milliseconds.
    """
    before = torch.get_num_threads()
    if before == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _auction(cost, members, row_group, capacity, eps, big, stop_below, max_rounds, patience):
    """Assign every row to a cluster of its group, respecting ``capacity`` exactly.

    Forward auction for assignment with similar objects (Bertsekas): cluster k is
    ``capacity[k]`` identical slots with prices; every unassigned row bids on its best
    candidate (lowest ``cost + cheapest slot price``), raising that price by its margin
    over the second best plus ``eps``; a cluster keeps its highest bids and evicts the
    rest.  Jacobi rounds (all unassigned rows bid at once); stable sorts with index
    tie-breaks.  Run to the end it is within ``eps`` per row of the optimal assignment.
    It stops once at most ``stop_below`` rows are unplaced (or after ``max_rounds``); those
    rows are then placed greedily (nearest cluster of their group with a free slot).  It
    also stops when the number of unplaced rows has not reached a new low for ``patience``
    rounds: the long price wars of (near-)duplicate rows and single-row eviction chains.

    Needs every group to own exactly as many slots as it has rows, which holds because
    groups are unions of full clusters.  Returns the cluster of every row and the rounds.
    """
    members = torch.where(members < 0, members[:, :1], members)  # padding: any member, inf cost
    if _COMPILED_AUCTION and (fused := _kernels.auction(cost, members, row_group, capacity, eps, big, stop_below,
                                                        max_rounds, patience)) is not None:
        return fused  # the same rounds in one compiled call
    n = cost.shape[0]
    k, cap = capacity.numel(), int(capacity.max())
    slot_pr = torch.zeros((k, cap))
    slot_pr[torch.arange(cap)[None, :] >= capacity[:, None]] = math.inf  # slots that do not exist
    slot_pt = torch.full((k, cap), -1, dtype=torch.long)
    price = slot_pr.min(1).values  # the price of a cluster is its cheapest slot
    owner = torch.full((n,), -1, dtype=torch.long)
    todo = torch.arange(n)
    rounds, low, low_round = 0, n + 1, 0
    while todo.numel() > stop_below and rounds < max_rounds and rounds - low_round <= patience:
        if todo.numel() < low:
            low, low_round = todo.numel(), rounds
        rounds += 1
        c1, c2, kb = _best_two(cost, members, row_group, price, todo)
        bid = price[kb] + (c2 - c1).clamp(max=big) + eps
        # bids grouped by cluster, highest first (ties: earlier in `todo` first)
        o = torch.argsort(-bid, stable=True)
        o = o[torch.argsort(kb[o], stable=True)]
        kb, bid, who = kb[o], bid[o], todo[o]
        uniq, cnt = torch.unique_consecutive(kb, return_counts=True)
        nb = uniq.numel()
        row = torch.repeat_interleave(torch.arange(nb), cnt)
        rank = torch.arange(kb.numel()) - torch.repeat_interleave(torch.cumsum(cnt, 0) - cnt, cnt)
        keep = rank < cap
        inc_pr = torch.full((nb, cap), -math.inf)
        inc_pt = torch.full((nb, cap), -1, dtype=torch.long)
        inc_pr[row[keep], rank[keep]] = bid[keep]
        inc_pt[row[keep], rank[keep]] = who[keep]
        all_pr = torch.cat([slot_pr[uniq], inc_pr], 1)
        all_pt = torch.cat([slot_pt[uniq], inc_pt], 1)
        srt = torch.argsort(-all_pr, dim=1, stable=True)  # ties keep the incumbents
        new_pr = all_pr.gather(1, srt[:, :cap])
        new_pt = all_pt.gather(1, srt[:, :cap])
        out_pt = all_pt.gather(1, srt[:, cap:])
        slot_pr[uniq] = new_pr
        slot_pt[uniq] = new_pt
        price[uniq] = new_pr.min(1).values
        out_pt = out_pt[out_pt >= 0]
        owner[out_pt] = -1
        held = new_pt >= 0
        owner[new_pt[held]] = uniq[:, None].expand(nb, cap)[held]
        todo = torch.cat([out_pt, who[~keep]])
    if todo.numel():
        # greedy completion: rounds of "propose to the nearest cluster of the group with a
        # free slot; each cluster takes its nearest proposers up to its free count"
        free = capacity - torch.bincount(owner[owner >= 0], minlength=k)
        todo = todo.sort().values
        while todo.numel():
            kc = members[row_group[todo]]
            c1, j = cost[todo].masked_fill(free[kc] <= 0, math.inf).min(1)
            if not bool(torch.isfinite(c1).all()):
                raise RuntimeError("balanced_kmeans: internal error, a group ran out of slots")
            kb = kc.gather(1, j[:, None]).squeeze(1)
            o = torch.argsort(c1, stable=True)
            o = o[torch.argsort(kb[o], stable=True)]
            ok = _rank_in_runs(kb[o]) < free[kb[o]]
            owner[todo[o[ok]]] = kb[o[ok]]
            free -= torch.bincount(kb[o[ok]], minlength=k)
            todo = todo[o[~ok]].sort().values
    return owner, rounds


# --------------------------------------------------------------------------- polish


def _polish(x, slots, cents, chunk, tau, max_rows, sweeps):
    """Exact-objective swaps for the rows farthest from their centroid (in place on ``slots``).

    Lloyd with capacities can park several isolated rows (high-norm tokens such as
    punctuation) together in one "junk" cluster far from all of them: the mean objective
    hardly notices, but retrieval of those (frequent) tokens fails.  For each row farther
    than ``tau`` times the objective from its centroid (at most ``max_rows``, farthest
    first) this tries every swap with a member of its ``candidates`` nearest other clusters
    and makes the one that lowers the exact objective (cluster SSEs with moved means) the
    most (``512 // cap`` clusters, 32 for ``cap = 16``).  Each accepted swap lowers the
    objective, so this can only help it.
    Returns the number of swaps.
    """
    k, cap = slots.shape
    if k < 2:  # one cluster: nothing to swap with
        return 0
    candidates = max(1, 512 // cap)  # swap partners tried per row: candidates * cap
    n = int((slots >= 0).sum())
    real = slots >= 0
    cnt = real.sum(1).double()
    xsq = torch.zeros(x.shape[0], dtype=torch.float64)
    sums = torch.zeros(k, x.shape[1], dtype=torch.float64)
    step = max(1, chunk // cap)
    for a in range(0, k, step):
        s = slots[a:a + step]
        rows = x[s.clamp_min(0)].double() * (s >= 0).unsqueeze(-1)
        sums[a:a + step] = rows.sum(1)
        xsq[s[s >= 0]] = rows.pow(2).sum(-1)[s >= 0]
    sq = (xsq[slots.clamp_min(0)] * real).sum(1)
    cluster_of = torch.empty(x.shape[0], dtype=torch.long)
    cluster_of[slots[real]] = torch.arange(k)[:, None].expand_as(slots)[real]

    def sse(s_, q_, c_):
        return q_ - s_.pow(2).sum(-1) / c_

    swaps = 0
    for _ in range(sweeps):
        cents = (sums / cnt[:, None]).float()
        obj = float(sse(sums, sq, cnt).sum()) / n
        dist = torch.cat([(x[a:a + chunk] - cents[cluster_of[a:a + chunk]]).pow(2).sum(1)
                          for a in range(0, x.shape[0], chunk)])
        far = (dist > tau * obj).nonzero().squeeze(1)
        if far.numel() == 0:
            break
        far = far[torch.argsort(-dist[far], stable=True)][:max_rows]
        m = min(candidates + 1, k)
        csq = cents.pow(2).sum(1)
        near = torch.addmm(csq, x[far], cents.T, alpha=-2.0).topk(m, dim=1, largest=False).indices
        moved = 0
        for o, cand in zip(far.tolist(), near):
            a = int(cluster_of[o])
            cand = cand[cand != a][: m - 1]
            mem = slots[cand]  # [c, cap]
            ok = mem >= 0
            xm = x[mem.clamp_min(0)].double()  # [c, cap, d]
            xo = x[o].double()
            qm = xsq[mem.clamp_min(0)]
            old = sse(sums[a], sq[a], cnt[a]) + sse(sums[cand], sq[cand], cnt[cand])[:, None]
            new = sse(sums[a] - xo + xm, sq[a] - xsq[o] + qm, cnt[a]) + \
                sse(sums[cand][:, None] - xm + xo, sq[cand][:, None] - qm + xsq[o], cnt[cand][:, None])
            delta = torch.where(ok, new - old, math.inf).reshape(-1)
            best = int(delta.argmin())
            if not float(delta[best]) < -1e-9 * max(obj, 1e-30):
                continue
            b, j = int(cand[best // cap]), int(mem.reshape(-1)[best])
            xj = x[j].double()
            sums[a] += xj - xo
            sums[b] += xo - xj
            sq[a] += xsq[j] - xsq[o]
            sq[b] += xsq[o] - xsq[j]
            slots[a][slots[a] == o] = j
            slots[b][slots[b] == j] = o
            cluster_of[o], cluster_of[j] = b, a
            moved += 1
        swaps += moved
        if moved == 0:
            break
    # rows inside a cluster stay in increasing index order
    slots.copy_(torch.where(slots >= 0, slots, torch.iinfo(torch.long).max).sort(1).values)
    slots[slots == torch.iinfo(torch.long).max] = -1
    return swaps


# --------------------------------------------------------------------------- driver


def _balanced_kmeans(x, num_clusters, cluster_size, *, iters=10, seed=0, progress=True, stats=None,
                     **knobs) -> Clustering:
    t_start = time.perf_counter()
    x, k, cap, iters, seed = _validate(x, num_clusters, cluster_size, iters, seed)
    unknown = set(knobs) - set(_DEFAULTS)
    if unknown:
        raise ValueError(f"unknown options {sorted(unknown)}; known: {sorted(_DEFAULTS)}")
    opt = {**_DEFAULTS, **knobs}
    chunk, kg = int(opt["chunk"]), int(opt["group_clusters"])
    n = x.shape[0]
    capacity = _capacities(k, cap, n)
    gen = torch.Generator().manual_seed(seed)

    # k-means is shift invariant; centring keeps ||c||^2 - 2 x.c well conditioned
    shift = (sum(x[a:a + chunk].sum(0, dtype=torch.float64) for a in range(0, n, chunk)) / n).float()
    x = x - shift
    xsq_sum = sum(float(x[a:a + chunk].pow(2).sum(dtype=torch.float64)) for a in range(0, n, chunk))

    # start: balanced bisection into groups of consecutive clusters; inside each group
    # distinct random rows as centroids and an arbitrary (feasible) assignment
    gstart, group_of_row = _start_groups(x, capacity, kg, gen, chunk)
    g_num = gstart.numel() - 1
    gsize = (gstart[1:] - gstart[:-1]).tolist()
    members = gstart[:-1, None] + torch.arange(max(gsize))[None, :]
    members[members >= gstart[1:, None]] = -1
    order = torch.argsort(group_of_row, stable=True)
    gcount = torch.bincount(group_of_row, minlength=g_num).tolist()
    picks, pos = [], 0
    for g in range(g_num):
        rows = order[pos:pos + gcount[g]]
        pick = torch.randperm(gcount[g], generator=gen)[: gsize[g]]
        picks.append(rows[pick.sort().values])
        pos += gcount[g]
    cents = x[torch.cat(picks)]
    owner = torch.empty(n, dtype=torch.long)
    owner[order] = torch.repeat_interleave(torch.arange(k), capacity)  # groups own consecutive clusters

    if stats is not None:
        stats.append(dict(it=-1, t_start=time.perf_counter() - t_start))
    history: list[float] = []
    obj = None
    best_obj, best_owner, best_means = math.inf, owner, cents
    omega = float(opt["relax"])
    bar = tqdm(total=iters, desc="balanced k-means", unit="it", disable=not progress, leave=False)
    end, flat, fine = max(iters, 1), 0, int(opt["fine_last"])
    try:
        it = 0
        while it < end:  # ``end`` moves closer once the objective has settled
            t0 = time.perf_counter()
            if it > 0 and k > kg:
                members = _regroup(cents, kg, gen, int(opt["regroup_iters"]))
            group_of_cluster = torch.empty(k, dtype=torch.long)
            real = members >= 0
            group_of_cluster[members[real]] = torch.arange(members.shape[0])[:, None].expand_as(members)[real]
            order, cost, row_group = _group_costs(x, cents, members, group_of_cluster[owner])
            t1 = time.perf_counter()
            last = 0 < it and it >= end - fine  # the random start is never fine
            scale = obj if obj is not None else float((cost.min(1).values.double().sum() + xsq_sum) / n)
            scale = max(scale, 1e-30)
            eps, stop = (opt["eps_last"], opt["stop_last"]) if last else (opt["eps_rel"], opt["stop_frac"])
            if it == 0:  # from random centroids: a rough assignment is enough
                eps, stop = opt["eps_first"], opt["stop_first"]
            with _one_thread():
                got, rounds = _auction(cost, members, row_group, capacity, eps=float(eps) * scale,
                                       big=1e3 * scale, stop_below=int(float(stop) * n),
                                       max_rounds=int(opt["max_rounds"]), patience=int(opt["patience"]))
            del cost, row_group
            owner = torch.empty_like(owner)
            owner[order] = got
            if iters == 0:
                break
            t2 = time.perf_counter()
            means = _means(x, _slots(owner, capacity, cap), chunk)
            obj = _objective_fast(xsq_sum, means, capacity, n)
            history.append(obj)
            overshoot = obj >= best_obj
            flat = flat + 1 if it > 0 and best_obj - obj < opt["tol"] * best_obj else 0
            if flat >= 2 and not last and end > it + 1 + fine:
                end = it + 1 + fine  # settled: finish with the fine iterations
                bar.total = end
            if not overshoot:
                best_obj, best_owner, best_means = obj, owner, means
            elif opt["guard"]:
                omega = 1.0 + (omega - 1.0) * float(opt["guard"])
            if it == 0 or omega == 1.0:
                cents = means
            elif overshoot and opt["guard"]:
                cents = best_means  # restart from the best partition
            else:
                cents = torch.lerp(cents, means, omega)  # over-relaxed step
            if stats is not None:
                stats.append(dict(it=it, rounds=rounds, objective=obj, t_cost=t1 - t0,
                                  t_auction=t2 - t1, t_rest=time.perf_counter() - t2))
            bar.set_postfix(objective=f"{obj:.5g}", refresh=False)
            bar.update(1)
            it += 1
    finally:
        bar.close()
    if history:
        owner = best_owner
    slots = _slots(owner, capacity, cap)
    if history and opt["polish_rows"]:
        if _polish(x, slots, best_means, chunk, float(opt["polish_tau"]), int(opt["polish_rows"]),
                   int(opt["polish_sweeps"])):
            best_means = _means(x, slots, chunk)
    cents = best_means if history else _means(x, slots, chunk)
    obj = _objective(x, cents, slots, chunk)
    if stats is not None:
        stats.append(dict(it=iters, t_total=time.perf_counter() - t_start))
    return Clustering(slots=slots, centroids=(cents + shift).contiguous(), objective=obj, history=history)
