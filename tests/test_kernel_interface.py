"""The kernel interface (flashhead/kernels) with its torch reference backend: it agrees with FlashHead, its ops
trace under torch.compile(fullgraph=True) and read no value on the host, and bad input gets a clear error.
The Triton backend's tests: tests/test_triton.py."""

from __future__ import annotations

import warnings

import pytest
import torch

from flashhead import kernels
from flashhead.kernels import KernelHead, backend, reference
from kernel_helpers import hidden, make_index


@pytest.fixture(autouse=True)
def _auto_backend(monkeypatch):
    monkeypatch.delenv(backend.ENV, raising=False)


@pytest.mark.parametrize("rows_dtype", [torch.float32, torch.bfloat16, "q8"])
@pytest.mark.parametrize("stage1", ["float", "int8", "int4"])
def test_reference_step_matches_flashhead(rows_dtype, stage1):
    head, kh = make_index(K=24, cap=4, d=64, rows_dtype=rows_dtype, stage1=stage1, n_probes=5)
    h = hidden(6, 64, dtype=torch.float32 if rows_dtype == "q8" else rows_dtype)
    if stage1 == "int8":  # the same arithmetic as the head's int8 stage 1, bit for bit
        assert torch.equal(kernels.stage1_scores(h, kh.centroids), head.stage1_scores(h))
    clusters = head.select_clusters(h)
    ids, logits = kh.candidates(h, clusters)
    h_ids, h_logits = head.candidates(h, clusters)
    assert torch.equal(ids, h_ids)
    assert torch.allclose(logits, h_logits, rtol=1e-5, atol=1e-5)
    if stage1 != "int4":  # the head's compiled int4 kernel quantizes h per group: other scores than the spec's
        assert torch.equal(kh.greedy(h), head.greedy(h))


def test_p_equal_k_scores_every_cluster():
    head, kh = make_index(K=8, cap=4, d=32, n_probes=8)
    h = hidden(3, 32)
    clusters, scores = kh.select(h)
    assert scores is None and torch.equal(clusters, torch.arange(8).expand(3, 8))
    assert torch.equal(kh.greedy(h), head.greedy(h))


def test_ops_pass_torch_library_opcheck():
    _, kh = make_index(K=8, cap=4, d=32)
    h = hidden(2, 32)
    clusters = torch.tensor([[1, 5, 2], [0, 7, 3]])
    stage2 = (h, kh.rows, kh.row_scales, kh.slot_token, clusters, kh.always_slot)
    c = kh.centroids
    torch.library.opcheck(torch.ops.flashhead.stage1_scores.default, (h, c.weight, c.scale, c.mean, c.mode))
    torch.library.opcheck(torch.ops.flashhead.cluster_logits.default, stage2)
    torch.library.opcheck(torch.ops.flashhead.greedy.default, stage2)


def test_greedy_step_compiles_fullgraph():
    _, kh = make_index(K=16, cap=4, d=32, n_probes=4)
    h = hidden(3, 32)
    compiled = torch.compile(kh.greedy, fullgraph=True, backend="aot_eager")  # the fake impls trace the ops
    assert torch.equal(compiled(h), kh.greedy(h))


@pytest.mark.parametrize("rows_dtype", [torch.bfloat16, "q8"])
def test_step_reads_no_value_on_the_host(rows_dtype):
    """On the meta device a tensor has no values: a step that read one on the host (a sync on CUDA) would raise."""
    _, kh = make_index(K=16, cap=4, d=64, rows_dtype=rows_dtype, stage1="int8", device="meta")
    h = torch.empty(4, 64, dtype=torch.float32 if rows_dtype == "q8" else rows_dtype, device="meta")
    assert kh.greedy(h).shape == (4,)  # the ops' fake impls
    clusters = torch.zeros(4, 3, dtype=torch.int64, device="meta")
    args = (h, kh.rows, kh.row_scales, kh.slot_token, clusters, kh.always_slot)
    assert reference.greedy(*args).shape == (4,)  # the reference itself, op by op
    assert reference.cluster_logits(*args)[1].shape == (4, 3 * 4 + 3)
    for mode in kernels.MODES:
        _, kh = make_index(K=16, cap=4, d=64, stage1=mode, device="meta")
        assert reference.stage1_scores(h.float(), kh.centroids).shape == (4, 16)


def test_cuda_without_triton_falls_back_with_one_warning(monkeypatch):
    monkeypatch.setattr(backend, "triton_backend", lambda: None)
    backend._warn_no_triton.cache_clear()
    with pytest.warns(RuntimeWarning, match="triton is not importable") as record:
        assert backend.backend_for(torch.device("cuda")) is backend.REFERENCE
        assert backend.backend_for(torch.device("cuda")) is backend.REFERENCE
    assert len(record) == 1
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert backend.backend_for(torch.device("cpu")) is backend.REFERENCE  # no warning off CUDA


def test_backend_override_is_checked(monkeypatch):
    monkeypatch.setenv(backend.ENV, "fast")
    with pytest.raises(ValueError, match="FLASHHEAD_KERNELS must be one of"):
        backend.backend_for(torch.device("cpu"))
    monkeypatch.setenv(backend.ENV, "triton")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="needs TRITON_INTERPRET=1"):
        backend.backend_for(torch.device("cpu"))
    monkeypatch.setenv(backend.ENV, "reference")
    assert backend.backend_for(torch.device("cuda")) is backend.REFERENCE


def test_bad_input_gets_a_clear_error():
    head, kh = make_index(K=8, cap=4, d=32, rows_dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="hidden states are torch.float32 but the index rows are torch.bfloat16"):
        kh.greedy(hidden(2, 32))
    with pytest.raises(ValueError, match="hidden states are on meta but the index is on cpu"):
        kh.greedy(torch.empty(2, 32, dtype=torch.bfloat16, device="meta"))
    with pytest.raises(ValueError, match="the index is split across devices"):
        KernelHead(kh.centroids, kh.rows, None, kh.slot_token.to("meta"), kh.always_slot, 2)
    with pytest.raises(ValueError, match=r"hidden states must be a float \[N, d=32\]"):
        kernels.stage1_scores(torch.zeros(2, 31), kh.centroids)
    with pytest.raises(ValueError, match="clusters must be int64"):
        kernels.greedy(hidden(2, 32, dtype=torch.bfloat16), kh.rows, None, kh.slot_token,
                       torch.zeros(2, 3, dtype=torch.int32), kh.always_slot)
    with pytest.raises(ValueError, match="rows must be contiguous"):
        kernels.greedy(hidden(2, 32, dtype=torch.bfloat16), kh.rows.transpose(0, 1), None, kh.slot_token,
                       torch.zeros(2, 3, dtype=torch.int64), kh.always_slot)
    with pytest.raises(ValueError, match="n_probes must be in"):
        KernelHead(kh.centroids, kh.rows, None, kh.slot_token, kh.always_slot, 9)
    head.quantize_activations = True
    with pytest.raises(ValueError, match="quantize_activations=True"):
        KernelHead.from_flashhead(head)
