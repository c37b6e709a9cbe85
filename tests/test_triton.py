"""The Triton backend (flashhead/kernels/triton_stage*.py) against the torch reference, on CPU under Triton's
interpreter (TRITON_INTERPRET=1, set here before triton is imported; with TRITON_INTERPRET=0 on a CUDA machine the
same tests run on the GPU).

What must hold: the same greedy tokens; the same candidate ids and the same -inf entries (empty slots, always-scored
ids also probed); logits within ``kernel_helpers.logit_tolerance`` (one step of the rows' dtype plus 1e-5 relative:
another fp32 summation order); int8 stage-1 scores bit for bit, float and int4 within 1e-5 relative. The interpreter
runs ~8 ms per program, so the grids stay tiny: a few probes, batch 1 to 8.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

os.environ.setdefault("TRITON_INTERPRET", "1")  # read when triton's kernels are defined, so before the import
pytest.importorskip("triton", reason="triton is not installed (pip install -e '.[test]' brings it)")

from flashhead.kernels import KernelHead, backend, float_centroids, reference  # noqa: E402
from flashhead.kernels import triton_stage1 as t1  # noqa: E402
from flashhead.kernels import triton_stage2 as t2  # noqa: E402
from kernel_helpers import hidden, logit_tolerance, make_index  # noqa: E402

INTERPRETED = os.environ["TRITON_INTERPRET"] == "1"
DEVICE = "cpu" if INTERPRETED else "cuda"
if not INTERPRETED and not torch.cuda.is_available():
    pytest.skip("TRITON_INTERPRET=0 needs a CUDA device", allow_module_level=True)

ROWS = [torch.float32, torch.bfloat16, torch.float16, "q8"]


def _name(x) -> str:
    return str(x).replace("torch.", "")


def _h(kh: KernelHead, N: int, seed: int = 1) -> torch.Tensor:
    return hidden(N, kh.rows.shape[2], dtype=torch.float32 if kh.row_scales is not None else kh.rows.dtype,
                  seed=seed, device=DEVICE)


def _stage2_args(kh: KernelHead, h: torch.Tensor, clusters) -> tuple:
    return h, kh.rows, kh.row_scales, kh.slot_token, torch.as_tensor(clusters, device=DEVICE), kh.always_slot


def _random_clusters(N: int, K: int, p: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.stack([torch.randperm(K, generator=g)[:p] for _ in range(N)])


@pytest.mark.parametrize("stage1,centroid_dtype", [("float", None), ("float", torch.bfloat16),
                                                    ("float", torch.float16), ("int8", None), ("int4", None)],
                         ids=_name)
@pytest.mark.parametrize("N", [1, 5])
def test_stage1_scores(stage1, centroid_dtype, N):
    head, _ = make_index(K=40, cap=4, d=300, stage1=stage1)  # d = 300: a full and a masked block of 256
    kh = KernelHead.from_flashhead(head, centroid_dtype).to(DEVICE)
    h = _h(kh, N)
    ref, got = reference.stage1_scores(h, kh.centroids), t1.stage1_scores(h, kh.centroids)
    if stage1 == "int8":
        assert torch.equal(got, ref)
    else:
        assert torch.allclose(got, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("rows_dtype", ROWS, ids=_name)
@pytest.mark.parametrize("N", [1, 3, 8])
def test_stage2_and_greedy_match_the_reference(rows_dtype, N):
    """Empty slots and always-scored ids, some of them in a probed cluster; h in fp32, rounded to the rows' dtype by
    the kernels; d = 300 (float rows): a full and a masked block of 256, d = 288 (Q8_0): nine blocks of 32."""
    d = 288 if rows_dtype == "q8" else 300
    _, kh = make_index(K=10, cap=4, d=d, rows_dtype=rows_dtype, n_empty=3, always=(0, 3, 7, 11, 20), device=DEVICE)
    h = hidden(N, d, device=DEVICE)
    clusters = _random_clusters(N, 10, 3, seed=N)
    args = _stage2_args(kh, h, clusters)
    ids, logits = t2.cluster_logits(*args)
    r_ids, r_logits = reference.cluster_logits(*args)
    assert torch.equal(ids, r_ids) and (ids < 0).any()
    fin = torch.isfinite(r_logits)
    assert torch.equal(torch.isfinite(logits), fin)
    assert ((logits[fin] - r_logits[fin]).abs() <= logit_tolerance(r_logits[fin], rows_dtype)).all()
    if rows_dtype != "q8":  # logits in the rows' dtype, as the dense head gives them
        assert torch.equal(logits[fin], logits[fin].to(rows_dtype).float())
    assert torch.equal(t2.greedy(*args), reference.greedy(*args))


@pytest.mark.parametrize("rows_dtype", [torch.float32, torch.bfloat16], ids=_name)
def test_ties_go_to_the_smallest_id(rows_dtype):
    """Tokens 20 and 9 (one tile), 17 (another probe) and 2 (always-scored) share one row, so their logits are equal:
    the smallest id among the candidates wins, through the always-scored tile or its own probe. h = 0 makes every
    logit +-0.0: all equal."""
    slot = torch.tensor([[20, 9, 3, 14], [7, 17, 0, 22], [2, 11, 19, 5], [1, 4, 6, 8], [10, 12, 13, 15],
                         [16, 18, 21, 23]])
    rows = torch.randn(6, 4, 64, generator=torch.Generator().manual_seed(0))
    flat = rows.view(24, 64)
    where = {int(t): i for i, t in enumerate(slot.view(-1))}
    best = flat[where[9]] * 3
    for t in (20, 9, 17, 2):
        flat[where[t]] = best
    rows = rows.to(rows_dtype)
    h = torch.stack([best, torch.zeros(64)]).to(device=DEVICE, dtype=rows_dtype)

    def step(always, probes):
        kh = KernelHead(float_centroids(rows.float().mean(1)), rows, None, slot, torch.tensor(always, dtype=torch.int64),
                        3).to(DEVICE)
        args = _stage2_args(kh, h, [probes, probes])
        got = t2.greedy(*args)
        assert torch.equal(got, reference.greedy(*args))
        ids = reference.cluster_logits(*args)[0][1]
        assert got[1] == ids[ids >= 0].min()  # h = 0
        return got[0].item()

    assert step([], [0, 1, 3]) == 9
    assert step([where[2]], [0, 1, 3]) == 2  # through the always-scored tile
    assert step([where[2]], [0, 1, 2]) == 2  # probed as well: counted once


@pytest.mark.parametrize("rows_dtype", [torch.float32, "q8"], ids=_name)
def test_an_empty_slot_never_wins(rows_dtype):
    """With every real logit negative, an empty slot's zero row would win if its -inf were lost."""
    _, kh = make_index(K=4, cap=4, d=64, rows_dtype=rows_dtype, n_empty=3, always=())
    empty = (kh.slot_token < 0).any(1).nonzero().flatten().tolist()
    h = -kh.rows.float().sum((0, 1)) if rows_dtype != "q8" else -(kh.rows.float() * kh.row_scales.float()
                                                                   .repeat_interleave(32, -1)).sum((0, 1))
    h = (h / h.norm() * 50).to(DEVICE, torch.float32 if rows_dtype == "q8" else rows_dtype)[None]
    args = _stage2_args(kh, h, [empty + [k for k in range(4) if k not in empty][:1]])
    ids, logits = reference.cluster_logits(*args)
    assert (logits[ids >= 0] < 0).all()  # the premise: a zero row would beat every real one
    token = t2.greedy(*args)
    assert token.item() >= 0 and torch.equal(token, reference.greedy(*args))


def test_an_always_scored_id_outside_the_probes_can_win():
    head, kh = make_index(K=6, cap=4, d=64, n_empty=0, always=(13,), device=DEVICE)
    k13 = int(head.token_slot[13]) // 4
    h = (kh.rows.view(-1, 64)[head.token_slot[13]] * 4)[None]  # token 13's own row: it has the largest logit
    probes = [[k for k in range(6) if k != k13][:3]]
    assert t2.greedy(*_stage2_args(kh, h, probes)).item() == 13
    assert t2.greedy(*_stage2_args(kh, h, [[k13, *probes[0][:2]]])).item() == 13  # probed too: still once


@pytest.mark.parametrize("stage1", ["float", "int8", "int4"])
def test_whole_step_through_the_ops(monkeypatch, stage1):
    """KernelHead's greedy step dispatched to Triton (FLASHHEAD_KERNELS=triton) gives the reference's tokens, and
    torch.compile(fullgraph=True) traces around the Triton ops."""
    _, kh = make_index(K=24, cap=4, d=64, rows_dtype=torch.bfloat16, stage1=stage1, n_probes=3, device=DEVICE)
    h = _h(kh, 4)
    monkeypatch.setenv(backend.ENV, "reference")
    want = kh.greedy(h)
    monkeypatch.setenv(backend.ENV, "triton")
    assert torch.equal(kh.greedy(h), want)
    assert torch.equal(torch.compile(kh.greedy, fullgraph=True, backend="aot_eager")(h), want)


def test_every_launch_compiles_for_the_h200():
    """The interpreter never compiles: Triton's compiler builds each launch for sm_90 here (tests/triton_sm90_compile.py)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(Path(__file__).parents[1]), env.get("PYTHONPATH", "")])
    run = subprocess.run([sys.executable, str(Path(__file__).with_name("triton_sm90_compile.py"))], env=env,
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-4000:]
    assert "compiled 13 kernel launches for sm_90" in run.stdout
