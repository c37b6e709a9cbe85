"""lm-evaluation-harness with the `flashhead` model type, offline, on small local tasks: log-likelihoods equal
--model hf's to the last digit on the same model (SmolLM2), and generate_until decodes with FlashHead."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")  # before datasets is imported: local files only
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import pytest  # noqa: E402

import lm_eval  # noqa: E402  (installed by the set-up: flashhead[eval])
from lm_eval.models.huggingface import HFLM  # noqa: E402
from lm_eval.tasks import TaskManager  # noqa: E402

from flashhead.head import FlashHead  # noqa: E402
from flashhead.integrations.lm_eval import FlashHeadLlamaCppLM, FlashHeadLM  # noqa: E402
from flashhead.models import local_dir  # noqa: E402

QUESTIONS = [
    ("The capital of France is", [" Paris", " London", " Rome", " Madrid"], 0),
    ("Water freezes at a temperature of zero degrees", [" Fahrenheit", " Celsius", " Kelvin"], 1),
    ("The largest planet in the solar system is", [" Mars", " Venus", " Jupiter", " Mercury"], 2),
    ("It is a truth universally acknowledged, that a single man in possession of a good fortune, must be in want "
     "of a", [" wife", " horse", " house", " sword"], 0),
    ("def add(a, b):\n    return a", [" + b", " - b", " * b"], 0),
    ("The opposite of hot is", [" cold", " warm", " red", " loud"], 0),
]
PROMPTS = ["The capital of France is", "Once upon a time, there was a", "def fibonacci(n):"]


def _write_tasks(folder: Path) -> None:
    mc = folder / "mc.jsonl"
    mc.write_text("".join(json.dumps({"question": q, "choices": c, "answer": a}) + "\n" for q, c, a in QUESTIONS))
    gen = folder / "gen.jsonl"
    gen.write_text("".join(json.dumps({"prompt": p, "answer": ""}) + "\n" for p in PROMPTS))
    common = "dataset_path: json\ntest_split: test\n"
    (folder / "mc.yaml").write_text(
        f"task: flashhead_local_mc\n{common}dataset_kwargs:\n  data_files:\n    test: {mc}\n"
        "output_type: multiple_choice\ndoc_to_text: '{{question}}'\ndoc_to_choice: '{{choices}}'\n"
        "doc_to_target: '{{answer}}'\nmetric_list:\n  - metric: acc\n")
    (folder / "gen.yaml").write_text(
        f"task: flashhead_local_gen\n{common}dataset_kwargs:\n  data_files:\n    test: {gen}\n"
        "output_type: generate_until\ndoc_to_text: '{{prompt}}'\ndoc_to_target: '{{answer}}'\n"
        "generation_kwargs:\n  until: [\"\\n\\n\"]\n  max_gen_toks: 12\n  do_sample: false\n"
        "metric_list:\n  - metric: exact_match\n")


@pytest.fixture(scope="module")
def tasks(tmp_path_factory):
    folder = tmp_path_factory.mktemp("lm_eval_tasks")
    _write_tasks(folder)
    return TaskManager(include_path=str(folder))


def _run(lm, tasks, name):
    out = lm_eval.simple_evaluate(model=lm, tasks=[name], task_manager=tasks, log_samples=True, bootstrap_iters=0)
    return out["results"][name], out["samples"][name]


def test_loglikelihoods_equal_hf_to_the_last_digit(tasks):
    hf = HFLM(pretrained=str(local_dir("smollm2-135m", verbose=False)), device="cpu", dtype="float32", batch_size=1)
    ref, ref_samples = _run(hf, tasks, "flashhead_local_mc")
    del hf
    lm = FlashHeadLM(pretrained="smollm2-135m", batch_size=1)
    assert isinstance(lm.model.lm_head, FlashHead) and lm.model.lm_head.exact  # applied, after HFLM's set-up
    got, samples = _run(lm, tasks, "flashhead_local_mc")
    assert len(samples) == len(QUESTIONS)
    for a, b in zip(ref_samples, samples):
        assert a["resps"] == b["resps"]  # every (log-likelihood, is-greedy) pair, bit for bit
    assert got["acc,none"] == ref["acc,none"] >= 0.5


def test_generate_until_decodes_with_flashhead(tasks):
    lm = FlashHeadLM(pretrained="smollm2-135m", batch_size=1)
    head = lm.model.lm_head
    modes = []
    hook = head.register_forward_hook(lambda m, a, o: modes.append(m.exact))
    try:
        _, samples = _run(lm, tasks, "flashhead_local_gen")
    finally:
        hook.remove()
    assert len(samples) == len(PROMPTS) and all(s["resps"][0][0].strip() for s in samples)
    assert modes and not any(modes)  # every head call of the generation tasks is FlashHead's decoding


def test_dense_and_engine_arguments():
    lm = FlashHeadLM(pretrained="smollm2-135m", dense=True)
    assert not isinstance(lm.model.lm_head, FlashHead)
    with pytest.raises(ValueError, match="for llama.cpp use FlashHeadLlamaCppLM"):
        FlashHeadLM(pretrained="smollm2-135m", engine="llama.cpp")
    with pytest.raises(ValueError, match="engine='vllm' is not one of"):
        FlashHeadLM.create_from_arg_string("pretrained=smollm2-135m,engine=vllm")
    for engine in ("transformers", "llama.cpp"):  # refused before anything loads
        with pytest.raises(ValueError, match=f"model args nprobes are not known .* engine={engine}; known: .*probes"):
            FlashHeadLM.create_from_arg_string(f"pretrained=smollm2-135m,engine={engine},nprobes=10")


def test_a_hub_task_offline_gets_a_one_line_error():
    out = subprocess.run([sys.executable, "-m", "flashhead.cli", "lm-eval", "run", "--model", "flashhead",
                          "--model_args", "pretrained=smollm2-135m,dense=true", "--tasks", "arc_easy", "--limit", "1"],
                         capture_output=True, text=True, timeout=600,
                         env={**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"})
    assert out.returncode == 2
    last = out.stderr.strip().splitlines()[-1]
    assert last.startswith("flashhead lm-eval: error: arc_easy: the dataset is on the Hugging Face hub") \
        and "local copy" in last


@pytest.fixture(scope="module")
def llamacpp_lm():
    lm = FlashHeadLM.create_from_arg_string("pretrained=smollm2-135m,engine=llama.cpp,threads=1",
                                            {"batch_size": 1, "device": None})
    assert isinstance(lm, FlashHeadLlamaCppLM) and lm.engine.head is not None
    yield lm
    lm.engine.close()


def test_llamacpp_loglikelihoods_are_llamacpps_own(tasks, llamacpp_lm):
    """engine=llama.cpp: each choice's log-likelihood is llama-cpp-python's own (its high-level Llama with
    logits_all, an independent route to the same dense head, same bits), whatever head decodes."""
    from llama_cpp import Llama

    _, samples = _run(llamacpp_lm, tasks, "flashhead_local_mc")
    # flash attention as in LlamaCpp's contexts (llama.cpp's default, auto = on for the CPU); llama-cpp-python's
    # Llama turns it off by default, which moves these log-likelihoods by ~0.1
    ref = Llama(model_path=str(llamacpp_lm.engine.path), n_ctx=512, n_threads=1, logits_all=True, flash_attn=True,
                verbose=False)
    try:
        for s in samples:
            for resp, (context, continuation) in zip(s["resps"], s["arguments"]):
                loglik = resp[0][0]
                ctx = ref.tokenize(context.encode(), add_bos=True, special=False)
                whole = ref.tokenize((context + continuation).encode(), add_bos=True, special=False)
                ref.reset()
                ref.eval(whole)
                logits = np.asarray(ref.scores[:len(whole)], dtype=np.float64)
                logp = logits - logits.max(1, keepdims=True)
                logp -= np.log(np.exp(logp).sum(1, keepdims=True))
                expected = sum(logp[j - 1, whole[j]] for j in range(len(ctx), len(whole)))
                assert math.isclose(loglik, expected, rel_tol=0, abs_tol=1e-6), (context, continuation)
    finally:
        ref.close()


def test_llamacpp_generate_until_decodes_with_flashhead(tasks, llamacpp_lm, monkeypatch):
    calls = []
    greedy = FlashHead.greedy
    monkeypatch.setattr(FlashHead, "greedy", lambda self, h: calls.append(1) or greedy(self, h))
    _, samples = _run(llamacpp_lm, tasks, "flashhead_local_gen")
    assert len(samples) == len(PROMPTS) and all(s["resps"][0][0].strip() for s in samples)
    assert len(calls) >= len(PROMPTS)  # every continuation picked its tokens with FlashHead
    assert all("\n\n" not in s["resps"][0][0] for s in samples)  # cut at the task's stop string


def test_the_launcher_is_lm_evals_cli():
    out = subprocess.run([sys.executable, "-m", "flashhead.cli", "lm-eval", "run", "--help"], capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0 and "--model_args" in out.stdout + out.stderr
