"""Shared helpers of the vLLM tests: real prompts, a servable folder, the transformers reference, one engine."""

from __future__ import annotations

import gc
from contextlib import contextmanager
from pathlib import Path

#: real text prompts (held-out novels: neither calibrates the index)
PROMPT_TEXTS = (("persuasion", 20_000), ("persuasion", 60_000), ("northangerabbey", 30_000), ("northangerabbey", 90_000))


def real_prompts(n: int = 4, words: int = 40) -> list[str]:
    """``n`` prompts of ``words`` words cut from held-out novels, each starting at a sentence (beyond the
    first four, 3,000 characters further on at each round)."""
    from flashhead.data import load_text

    prompts = []
    for i in range(n):
        name, start = PROMPT_TEXTS[i % len(PROMPT_TEXTS)]
        text = load_text(name)
        begin = text.index(". ", start + 3000 * (i // len(PROMPT_TEXTS))) + 2
        prompts.append(" ".join(text[begin:].split()[:words]))
    return prompts


def export(model: str, out: Path) -> Path:
    """The servable folder of a built-in model (its cached index, built once if missing)."""
    from flashhead.integrations.transformers import index_for
    from flashhead.integrations.vllm.folder import export_folder
    from flashhead.models import load_model, local_dir

    m, tok = load_model(model, verbose=False)
    index = index_for(model, m, tok, progress=False)
    return export_folder(local_dir(model, verbose=False), out, index)


def reference_model(folder: Path):
    """The transformers integration on the servable folder: its flashhead/ index at the folder's setting."""
    import json

    from flashhead.integrations.transformers import from_pretrained

    block = json.loads((folder / "config.json").read_text())["flashhead"]
    return from_pretrained(folder, n_probes=block["n_probes"], stage1=block["stage1"])


def greedy_reference(model, tok, prompts: list[str], new_tokens: int) -> list[list[int]]:
    """Greedy tokens of the transformers integration, one prompt at a time (no padding)."""
    from flashhead.decode import generate

    return [generate(model, tok, [p], max_new_tokens=new_tokens).token_ids[0] for p in prompts]


def folder_greedy(folder: Path, prompts: list[str], new_tokens: int) -> list[list[int]]:
    """The transformers integration's greedy tokens on ``folder`` (one thread), its model freed before an
    engine starts: one model in memory at a time."""
    import torch

    torch.set_num_threads(1)
    model, tok = reference_model(folder)
    try:
        return greedy_reference(model, tok, prompts, new_tokens)
    finally:
        del model
        gc.collect()


@contextmanager
def engine(folder: Path, **kwargs):
    """One vLLM engine on ``folder`` (fp32, eager), shut down and freed on exit."""
    from vllm import LLM
    from vllm.distributed.parallel_state import cleanup_dist_env_and_memory

    llm = LLM(model=str(folder), dtype="float32", max_model_len=1024, enforce_eager=True, seed=0, **kwargs)
    try:
        yield llm
    finally:
        del llm
        cleanup_dist_env_and_memory()
        gc.collect()


def head_facts(model) -> dict:
    """What a worker's model serves (run with ``LLM.apply_model``)."""
    fh = model.flashhead
    head = fh.head
    return {"arch": type(model).__name__, "K": head.K, "cap": head.cap, "stage1": head.stage1,
            "n_probes": head.n_probes, "rows_bytes": head.rows.numel() * head.rows.element_size(),
            "stage2": "float" if head.row_scales is None else "q8_0", "one_hot_greedy": fh.one_hot_greedy,
            "dense_copy": fh._dense_w is not None, "vocab": fh.vocab, "dense_fallbacks": fh.dense_fallbacks}


def far_outside(head, h, margin: int = 4):
    """``[V]`` bool: the tokens FlashHead cannot score for hidden state ``h [1, d]`` with any float rounding
    in between: their clusters rank beyond ``margin`` times the probe count under the head's own stage 1
    (vLLM's h differs from transformers' in the last bits), and they are not always scored."""
    import torch

    wide = head.select_clusters(h, n_probes=min(head.K, margin * head.n_probes))
    cand, _ = head.candidates(h, wide)
    out = torch.ones(head.out_features, dtype=torch.bool)
    out[cand[cand >= 0]] = False
    out[head.always_ids] = False
    return out


def grammar_words_outside(tok, outside, n: int = 2) -> list[str]:
    """``n`` ASCII words whose every possible first token (each vocabulary entry that spells a prefix of the
    word) is in ``outside``: a grammar choosing among them leaves FlashHead no candidate at its first step."""
    spelled: dict[str, list[int]] = {}
    for i in range(len(outside)):
        piece = tok.decode([i])
        if piece.isascii() and piece.isalpha():
            spelled.setdefault(piece, []).append(i)
    words = []
    for word in sorted(w for w in spelled if len(w) >= 5):  # deterministic order
        starts = [i for j in range(1, len(word) + 1) for i in spelled.get(word[:j], ())]
        if all(bool(outside[i]) for i in starts):
            words.append(word)
            if len(words) == n:
                return words
    raise AssertionError(f"found only {len(words)} words whose first tokens FlashHead cannot score")


def free_port() -> int:
    """A free TCP port on the loopback interface."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until_healthy(proc, base: str, log: Path, timeout: float) -> None:
    """Wait for a started ``vllm serve`` (``proc``, logging to ``log``) to answer ``base``/health with 200."""
    import time
    import urllib.error
    import urllib.request

    deadline = time.monotonic() + timeout
    while True:
        assert proc.poll() is None, f"vllm serve exited with {proc.returncode}:\n{log.read_text()[-3000:]}"
        try:
            with urllib.request.urlopen(f"{base}/health", timeout=5) as r:
                if r.status == 200:
                    return
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass
        assert time.monotonic() < deadline, f"vllm serve did not start in {timeout} s:\n{log.read_text()[-3000:]}"
        time.sleep(2)


def post_json(url: str, body: dict) -> dict:
    """POST ``body`` as JSON and return the JSON answer."""
    import json
    import urllib.request

    req = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=300) as r:
        return json.loads(r.read())
