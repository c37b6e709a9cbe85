"""Smoke test of ``flashhead bench``: one quick run on SmolLM2, then the report's fields and sanity.

Nothing here asserts a speed: the machine may be shared. Needs the SmolLM2 index in the cache (built
on first use, ~10 s) and builds the quick peers' indexes once (cached, ~20 s).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import math

import pytest

from flashhead import bench

pytestmark = pytest.mark.slow

MODEL = "smollm2-135m"


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="flashhead bench")
    bench.configure_parser(p)
    return p


@pytest.fixture(scope="module")
def run_files(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("bench")
    args = _parser().parse_args([MODEL, "--quick", "--repeats", "2", "--model-repeats", "1", "--new-tokens", "8",
                                 "--out", str(tmp / "report.json"), "--plot", str(tmp / "plot.png")])
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert args.func(args) == 0
    return json.loads((tmp / "report.json").read_text()), out.getvalue(), tmp


@pytest.fixture(scope="module")
def report(run_files):
    return run_files[0]


def _pos(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x) and x > 0


def test_parser_wires_run_and_defaults():
    args = _parser().parse_args([MODEL])
    assert args.func is bench.run and args.model == MODEL
    assert not args.json and not args.quick and args.plot is None and args.threads == 2


def test_table_and_plot_written(run_files):
    _, text, tmp = run_files
    assert "Head level" in text and "Model level" in text and "dense-fp32" in text and "flashhead-int4" in text
    assert (tmp / "plot.png").stat().st_size > 1000


def test_json_flag_prints_json(monkeypatch, capsys, report):
    monkeypatch.setattr(bench, "run_benchmark", lambda *a, **k: report)
    args = _parser().parse_args([MODEL, "--json"])
    assert bench.run(args) == 0
    assert json.loads(capsys.readouterr().out)["schema"] == bench.SCHEMA


def test_report_header(report):
    assert report["schema"] == bench.SCHEMA and report["model"] == MODEL and report["quick"]
    m = report["machine"]
    assert m["cpu"] and m["threads"] == 2 and m["torch"] and m["logical_cpus"] >= 1
    assert _pos(report["bandwidth"]["read_gbps"]) and _pos(report["bandwidth"]["copy_gbps"])
    idx = report["index"]
    assert idx["K"] * idx["cap"] >= idx["num_tokens"] and 0 < idx["rows_share"] < 1


def test_head_level_rows(report):
    rows = report["head"]
    batches = set(report["settings"]["batches"])
    names = {r["name"] for r in rows}
    s0 = report["index"]["stage1"]  # the index's default stage 1 (int4 for SmolLM2)
    assert s0 == "int4"
    assert {"dense-fp32", "dense-bf16", "dense-int8wo", "flashhead-int8", "flashhead-int4", "flashhead-float",
            f"flashhead-{s0}-forward", "hnsw", "ivf-nprobe=p", "ivf-budget"} <= names
    for n in names:
        assert {r["batch"] for r in rows if r["name"] == n} == batches
    for r in rows:
        assert _pos(r["median_us"]) and _pos(r["speedup_vs_dense_fp32"]) and _pos(r["bytes_per_step"])
        assert _pos(r["floor_us"]) and _pos(r["floor_fraction"]) and 0.0 <= r["agreement"] <= 1.0
        assert r["p25_us"] <= r["median_us"] <= r["p75_us"]
        if r["name"] == "dense-fp32":
            assert r["speedup_vs_dense_fp32"] == 1.0 and r["agreement"] == 1.0
        if r["kind"] == "flashhead":
            assert r["rows_per_query"] < report["index"]["V"]
            if r["batch"] == 1:  # per-row gathers: at large batches FlashHead may read more than dense
                assert r["bytes_vs_dense_fp32"] < 1.0
            assert r["agreement"] > 0.8  # a sane index; the fidelity itself is measured elsewhere
        if r["kind"] == "flashhead" and "containment" in r:
            assert abs(r["containment"] - r["agreement"]) < 0.02  # exact stage 2: the same up to ties


def test_peers_on_the_row_budget(report):
    rows = {r["name"]: r for r in report["head"] if r["batch"] == 1}
    budget = report["index"]["rows_per_query"]
    h = rows["hnsw"]
    assert h["ef"] >= 1 and _pos(h["dist_per_query"])
    assert h["saturated"] or abs(h["dist_per_query"] - budget) < 0.25 * budget
    ivf = rows["ivf-nprobe=p"]
    assert ivf["nprobe"] == report["index"]["n_probes"] and ivf["nlist"] == report["index"]["K"]
    assert rows["ivf-budget"]["rows_scanned_per_query"] > 0


def test_model_level_rows(report):
    rows = report["model_level"]["rows"]
    assert {(r["name"], r["batch"]) for r in rows} == {(n, b) for n in ("dense-fp32", "flashhead-int4")
                                                     for b in report["settings"]["model_batches"]}
    for r in rows:
        assert _pos(r["tokens_per_second"]) and _pos(r["speedup_vs_dense"]) and _pos(r["decode_tokens_per_second"])
        assert 0.0 <= r["identical_token_fraction"] <= 1.0 and r["amdahl_bound"] >= 1.0
        assert 0.0 < r["dense_head_share"] < 1.0 and _pos(r["head_ms_per_step"]) and _pos(r["step_ms"])
        if r["name"] == "dense-fp32":
            assert r["identical_token_fraction"] == 1.0


def test_memory_and_targets(report):
    mem = {r["config"]: r for r in report["memory"]}
    assert {"dense-fp32", "flashhead-int4"} <= set(mem)
    for r in mem.values():
        assert "error" not in r, r
        assert r["rss_peak_mb"] >= r["rss_steady_mb"] > r["rss_before_load_mb"] > 0
    keys = {t["target"] for t in report["targets"]}
    assert keys == {"head_b1", "amdahl_b1"}
    for t in report["targets"]:
        assert isinstance(t["met"], bool) and _pos(t["measured"])


def test_engine_targets_join_the_report():
    """An engine's own targets (llama.cpp, vLLM: checked where it is timed) are reported with the others."""
    from flashhead.bench.report import evaluate_targets

    t = {"target": "llamacpp_b1", "description": "llama.cpp + FlashHead / llama.cpp dense", "threshold": 1.8,
         "measured": 2.0, "met": True}
    rep = {"model": "gemma3-270m", "index": {"stage1": "int8"}, "head": [], "model_level": {"rows": [], "targets": [t]}}
    assert evaluate_targets(rep) == [t]
