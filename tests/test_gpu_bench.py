"""labs/gpu_bench.py runs end to end on CPU with tiny models of the four shapes, so that its one run on a GPU
machine does not fail for the first time there."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import torch

LAB = Path(__file__).parents[1] / "labs" / "gpu_bench.py"


def _bench():
    spec = importlib.util.spec_from_file_location("gpu_bench", LAB)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    return bench


def test_gpu_bench_runs_on_cpu(tmp_path):
    bench = _bench()
    threads = torch.get_num_threads()
    try:
        assert bench.main([str(tmp_path), "--device", "cpu", "--tiny", "--batches", "1,2", "--context", "64"]) == 0
    finally:
        torch.set_num_threads(threads)
    report = json.loads((tmp_path / "gpu_bench.json").read_text())
    assert [s["shape"] for s in report["shapes"]] == list(bench.SHAPES)
    for s in report["shapes"]:
        assert [r["batch"] for r in s["head"]] == [r["batch"] for r in s["model"]] == [1, 2]
        times = [r[k] for r in s["head"] for k in ("dense_us", "flashhead_bf16_us", "flashhead_int8_us")]
        rates = [r[k] for r in s["model"] for k in ("body_tok_s", "dense_tok_s", "flashhead_tok_s")]
        assert all(math.isfinite(x) and x > 0 for x in times + rates)
        assert [c["backend"] for c in s["check"]] == ["reference", "reference"]  # Triton runs only on CUDA
    md = (tmp_path / "gpu_bench.md").read_text()
    assert bench.NOTE in md and "## Head level" in md and "## Whole model" in md
    assert md.count("| llama-3.2-1b |") == 4  # two batches in each table


def test_decode_step_reads_no_value_on_the_host():
    """A CUDA graph cannot capture a step that reads a tensor's value on the host; on the meta device such a read
    raises, so the bench's decode body (two steps, rewinding the static cache) runs there for each shape."""
    bench = _bench()
    meta = torch.device("meta")
    with torch.inference_mode():
        for name in bench.SHAPES:
            body = bench.decode_body(bench.build_model(name, True, meta), 2, 64, meta)
            assert body().shape == body().shape == (2, 64)
