import os
import shutil
import time

import pytest
import torch

from flashhead import data, models
from flashhead.cli import main


def _top5(model, tok, prompt):
    ids = tok(prompt, return_tensors="pt").input_ids
    with torch.no_grad():
        logits = model(ids).logits[0, -1]
    return [tok.decode(int(i)) for i in logits.topk(5).indices]


def test_smollm2_knows_paris(smollm2):
    model, tok = smollm2
    assert model.dtype == torch.float32
    assert " Paris" in _top5(model, tok, "The capital of France is")


def test_gemma_knows_paris(gemma):
    model, tok = gemma
    assert model.get_output_embeddings().weight.shape == (262_144, 640)
    assert " Paris" in _top5(model, tok, "The capital of France is")


@pytest.mark.parametrize("fixture", ["smollm2", "gemma"])
def test_tokenizer_round_trips_austen(fixture, request):
    _, tok = request.getfixturevalue(fixture)
    text = data.load_text("emma")[5_000:25_000]
    ids = tok(text, add_special_tokens=False).input_ids
    assert len(ids) > 3_000
    assert tok.decode(ids) == text


def test_bf16_on_request():
    model, _ = models.load_model("smollm2-135m", dtype="bf16", verbose=False)
    assert model.dtype == torch.bfloat16


def test_unknown_model_is_explained():
    with pytest.raises(models.ModelNotAvailableError, match="unknown model 'llama-7b'.*smollm2-135m"):
        models.load_model("llama-7b")
    with pytest.raises(ValueError, match="unsupported dtype"):
        models.load_model("smollm2-135m", dtype="int3")


def test_damaged_cache_is_rebuilt_not_loaded(tmp_path, monkeypatch):
    gguf = models.BUILTIN_MODELS["smollm2-135m"].gguf_path()
    good = models.local_dir("smollm2-135m", verbose=False)
    monkeypatch.setenv("FLASHHEAD_CACHE", str(tmp_path))
    copy = models.converted_dir(gguf)
    shutil.copytree(good, copy)
    assert models.cache_is_valid(copy)
    weights = copy / "model.safetensors"
    size = weights.stat().st_size
    with open(weights, "r+b") as f:  # truncated file
        f.truncate(size // 2)
    assert not models.cache_is_valid(copy)
    assert models.local_dir("smollm2-135m", verbose=False) == copy  # rebuilt in place
    assert models.cache_is_valid(copy) and weights.stat().st_size == size
    with open(weights, "r+b") as f:  # same size, edited bytes: caught by the hash (mtime changed)
        f.seek(size // 2)
        f.write(b"\xff" * 64)
    os.utime(weights, ns=(time.time_ns(), time.time_ns()))
    assert not models.cache_is_valid(copy)


def test_models_command_lists_both_installed(capsys):
    assert main(["models"]) == 0
    out = capsys.readouterr().out
    for name in models.BUILTIN_MODELS:
        line = next(l for l in out.splitlines() if l.startswith(name))
        assert " yes " in line
    assert "262144" in out and "62.6%" in out and "49152" in out and "21.0%" in out
    assert "151936" in out and "21.6%" in out  # Qwen2.5-Coder: its own (untied) head counted once


def test_converted_dir_is_keyed_by_content_and_memoized(tmp_path, monkeypatch):
    monkeypatch.setenv("FLASHHEAD_CACHE", str(tmp_path / "cache"))
    first, second, other = (tmp_path / d / "m.gguf" for d in ("venv-a", "venv-b", "venv-c"))
    for f, body in ((first, b"GGUF same weights"), (second, b"GGUF same weights"), (other, b"GGUF other weights")):
        f.parent.mkdir()
        f.write_bytes(body)
    key = models.converted_dir(first)
    assert models.converted_dir(second) == key  # two checkouts, one converted copy
    assert models.converted_dir(other) != key
    assert key.name.startswith("m-") and key.parent == tmp_path / "cache" / "models"

    hashed = []
    real_sha256 = models.sha256_file
    monkeypatch.setattr(models, "sha256_file", lambda path: hashed.append(path) or real_sha256(path))
    assert models.converted_dir(first) == key and models.converted_dir(second) == key
    assert hashed == []  # memoized by (path, size, mtime): a second call reads no weights
    first.write_bytes(b"GGUF new weights!")  # same path, new content and mtime: hashed anew
    os.utime(first, ns=(time.time_ns(), time.time_ns() + 10**9))
    assert models.converted_dir(first) != key and hashed == [first.resolve()]
