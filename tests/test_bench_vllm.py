"""`flashhead bench --engine vllm` in an environment without vLLM: one clear line naming the fix."""

import pytest

from flashhead.bench import vllm as bench_vllm
from flashhead.bench.model import ENGINES


def test_vllm_engine_is_registered_and_needs_the_vllm_environment(monkeypatch, tmp_path):
    assert ENGINES["vllm"] == "vllm:vllm_model_level"
    monkeypatch.setattr(bench_vllm.importlib.util, "find_spec", lambda name: None)  # as in .venv
    monkeypatch.setenv("FLASHHEAD_VLLM_PYTHON", str(tmp_path / "missing" / "python"))
    with pytest.raises(RuntimeError, match="no vLLM environment at .*: run `make setup`"):
        bench_vllm._vllm_python()


def test_targets_are_read_from_the_rows():
    rows = [{"name": "flashhead-int8", "batch": 1, "speedup_vs_dense": 1.7, "fraction_of_amdahl": 0.5},
            {"name": "flashhead-int8", "batch": 8, "speedup_vs_dense": 1.4, "fraction_of_amdahl": 0.5}]
    got = {t["target"]: (t["measured"], t["met"]) for t in bench_vllm._targets("gemma3-270m", rows, "int8")}
    assert got == {"vllm_b1": (1.7, True), "vllm_b8": (1.4, False)}
