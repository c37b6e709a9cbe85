"""Calibration on the model's own samples (flashhead/integrations/samples.py), with real tokenizers and SmolLM2."""

from __future__ import annotations

import unicodedata

import pytest
import torch

from flashhead.integrations.samples import MIN_SCRIPT_TOKENS, sample_states, seed_tokens, vocab_scripts


def test_vocab_scripts_sorts_real_tokens_by_script(gemma):
    _, tok = gemma
    scripts = vocab_scripts(tok)
    special = set(tok.added_tokens_decoder)
    ids = [i for v in scripts.values() for i in v]
    assert len(ids) == len(set(ids)) and not special & set(ids)
    # Gemma's vocabulary holds many scripts; each id sits under the script of its first letter
    assert {"LATIN", "CYRILLIC", "GREEK", "THAI", "HEBREW", "DEVANAGARI", "HANGUL", "CJK"} <= set(scripts)
    for script in ("GREEK", "THAI", "CYRILLIC"):
        for i in scripts[script][:50]:
            letter = next(c for c in tok.decode([i]) if unicodedata.category(c).startswith("L"))
            assert unicodedata.name(letter).startswith(script)


def test_seed_tokens_spread_over_scripts_and_repeat(gemma):
    _, tok = gemma
    ids, per_script = seed_tokens(tok, 512, alpha=0.3, seed=1)
    assert len(ids) == 512 and sum(per_script.values()) == 512
    assert ids == seed_tokens(tok, 512, alpha=0.3, seed=1)[0] and ids != seed_tokens(tok, 512, alpha=0.3, seed=2)[0]
    scripts = vocab_scripts(tok)
    # alpha < 1 flattens the vocabulary's shares: Latin is 58% of Gemma's tokens but far less of the seeds
    latin = len(scripts["LATIN"]) / sum(len(v) for v in scripts.values())
    assert latin > 0.5 and per_script["LATIN"] / 512 < latin / 2
    assert len(per_script) >= 25
    assert all(len(scripts[s]) >= MIN_SCRIPT_TOKENS for s in per_script)
    # alpha = 1: in proportion to the vocabulary
    _, flat = seed_tokens(tok, 2000, alpha=1.0, seed=1)
    assert abs(flat["LATIN"] / 2000 - latin) < 0.05


def test_sample_states_shape_record_and_rng(smollm2):
    model, tok = smollm2
    before = torch.random.get_rng_state()
    h, record = sample_states(model, tok, 20, length=4, seed=3, progress=False)
    assert torch.equal(torch.random.get_rng_state(), before)  # the caller's RNG is left alone
    assert h.shape == (20, model.config.hidden_size) and h.dtype == torch.float32 and torch.isfinite(h).all()
    assert record["texts"] == 5 and record["length"] == 4 and sum(record["seed_scripts"].values()) == 5
    again, _ = sample_states(model, tok, 20, length=4, seed=3, progress=False)
    assert torch.equal(h, again)
    # the first state of each text is the seed's: the model's state after <start> seed, as a forward gives it
    seeds, _ = seed_tokens(tok, 5, seed=3)
    start = tok("", add_special_tokens=True).input_ids or [tok.bos_token_id]
    with torch.inference_mode():
        ref = model.base_model(input_ids=torch.tensor([[*start, seeds[0]]])).last_hidden_state[0, -1]
    assert torch.allclose(h[0], ref.float(), atol=1e-5)


def test_sample_states_refuses_bad_input(smollm2, smol_index):
    from flashhead.integrations.transformers import apply, remove

    model, tok = smollm2
    for bad in (0, -3, 2.5, True):
        with pytest.raises(ValueError, match="positions"):
            sample_states(model, tok, bad, progress=False)
    with pytest.raises(ValueError, match="alpha"):
        sample_states(model, tok, 8, alpha=1.5, progress=False)
    apply(model, smol_index)
    try:
        with pytest.raises(ValueError, match="dense head"):
            sample_states(model, tok, 8, progress=False)
    finally:
        remove(model)


def test_build_records_the_samples_and_uses_them_in_the_geometry(smollm2):
    from flashhead.integrations.transformers import build_for_model

    model, tok = smollm2
    kw = dict(calibration_texts=["prideprejudice"], calibration_positions=256, iters=2, progress=False)
    with_samples = build_for_model(model, tok, samples=64, **kw)
    without = build_for_model(model, tok, samples=0, **kw)
    rec = with_samples.config.build["calibration"]["samples"]
    assert rec["positions"] == 64 and rec["texts"] == 8
    assert "samples" not in without.config.build["calibration"]
    assert "own samples" in with_samples.config.build["geometry"] and "own samples" not in without.config.build["geometry"]
    assert not torch.equal(with_samples.slot_token, without.slot_token)  # the samples moved the geometry
    with pytest.raises(ValueError, match="samples"):
        build_for_model(model, tok, samples=-1, **kw)
