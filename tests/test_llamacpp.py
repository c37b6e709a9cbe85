"""FlashHead driving llama.cpp, on the real SmolLM2 GGUF: the callback route, greedy and sampled decoding,
bad input. llama-cpp-python is part of the set-up: without it these tests fail (they never skip)."""

from __future__ import annotations

import importlib.util
import json
import math
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from flashhead.integrations.llamacpp import LLAMA_CPP_VERSION, LlamaCpp, ModelLoadError

pytestmark = pytest.mark.slow
MODEL = "smollm2-135m"


def test_engine_installed_at_the_pinned_version():
    assert importlib.util.find_spec("llama_cpp") is not None, \
        "llama.cpp is not installed: run `make setup` (it builds llama-cpp-python once, ~10-30 min)"
    import llama_cpp

    assert llama_cpp.__version__ == LLAMA_CPP_VERSION
    setup = (Path(__file__).parents[1] / "scripts" / "setup.sh").read_text()
    assert f"llama-cpp-python=={LLAMA_CPP_VERSION}" in setup  # set-up installs the version the route was checked on


@pytest.fixture(scope="session")
def engine(smol_llamacpp):
    return smol_llamacpp


@pytest.fixture(scope="session")
def prompts(engine):
    """Three real prompts: 24-token windows from the middle of a held-out novel."""
    from flashhead.data import load_text

    text = load_text("persuasion")
    ids = engine.tokenize(text[len(text) // 2: len(text) // 2 + 20000], add_special=False)
    return [engine.detokenize(ids[a:a + 24]) for a in (100, 1500, 3000)]


def test_stop_cuts_the_graph_and_keeps_the_state(engine, prompts):
    """The callback stops after the final norm (fewer graph nodes asked about) and the state it leaves is the
    full graph's, bit for bit."""
    ids = engine.tokenize(prompts[0])
    engine.hidden_states(ids)  # the body context exists from here on
    stop = engine._stop
    hits, asked = stop.hits, stop.asked
    cut = engine.hidden_states(ids, stop=True)
    hits_cut, asked_cut = stop.hits - hits, stop.asked - asked
    full = engine.hidden_states(ids, stop=False)
    hits_full, asked_full = stop.hits - hits - hits_cut, stop.asked - asked - asked_cut
    assert hits_cut == hits_full == 1  # one norm per decode, met both times
    assert asked_cut < asked_full  # with the stop, the nodes after the norm (the head) were never reached
    assert cut.shape == (len(ids), engine.d) and torch.isfinite(cut).all()
    assert torch.equal(cut, full)


def test_greedy_equals_llamacpp_dense(engine, prompts):
    for p in prompts:
        fast = engine.generate(p, 32, head="flashhead")
        dense = engine.generate(p, 32, head="dense")
        assert fast.token_ids == dense.token_ids, p
        assert fast.new_tokens == 32 and fast.texts[0] == engine.detokenize(fast.token_ids[0])


def test_teacher_forced_agreement(engine):
    from flashhead.bench.llamacpp import teacher_forced_agreement

    r = teacher_forced_agreement(engine, ["emma"], positions=256)
    assert r["positions"] >= 250
    assert r["fraction"] >= 0.99, r


def _chi2_sf(stat: float, dof: int) -> float:
    return float(1 - torch.distributions.Chi2(torch.tensor(float(dof))).cdf(torch.tensor(stat)))


def test_sampled_first_token_follows_flashheads_distribution(engine, prompts):
    """First sampled tokens of the engine (one generate() per seed) against FlashHead.sample on the same state:
    a chi-square test of homogeneity over the tokens both draw often."""
    temperature, top_p, n = 1.0, 0.9, 100
    ids = engine.tokenize(prompts[1])
    drawn = [engine.generate(ids, 1, temperature=temperature, top_p=top_p, seed=s).token_ids[0][0] for s in range(n)]
    h = engine.hidden_states(ids)[-1:]
    gen = torch.Generator().manual_seed(0)
    with torch.inference_mode():  # 2,000 draws of FlashHead's own sampler on the same state
        ref = torch.cat([engine.head.sample(h.expand(100, -1).contiguous(), temperature=temperature, top_p=top_p,
                                            generator=gen) for _ in range(20)])
    ref_counts = torch.bincount(ref, minlength=engine.n_vocab).double()
    got_counts = torch.bincount(torch.tensor(drawn), minlength=engine.n_vocab).double()
    p = ref_counts / ref_counts.sum()
    common = (p * n >= 5).nonzero().flatten()
    assert len(common) >= 3, "the prompt's distribution is too peaked for a test"
    exp = torch.cat([p[common], (1 - p[common].sum()).reshape(1)]) * n
    obs = torch.cat([got_counts[common], (n - got_counts[common].sum()).reshape(1)])
    keep = exp > 0
    stat = float(((obs - exp)[keep] ** 2 / exp[keep]).sum())
    assert _chi2_sf(stat, int(keep.sum()) - 1) > 1e-3, (stat, obs.tolist(), exp.tolist())


def test_sampling_is_seeded_and_runs_many_tokens(engine, prompts):
    a = engine.generate(prompts[2], 24, temperature=0.8, top_k=40, top_p=0.95, seed=3).token_ids[0]
    b = engine.generate(prompts[2], 24, temperature=0.8, top_k=40, top_p=0.95, seed=3).token_ids[0]
    c = engine.generate(prompts[2], 24, temperature=0.8, top_k=40, top_p=0.95, seed=4).token_ids[0]
    assert a == b and a != c and len(a) == 24


@pytest.mark.parametrize("kwargs", [dict(temperature=-1.0), dict(temperature=float("nan")), dict(top_p=0.5),
                                    dict(temperature=1.0, top_k=0), dict(temperature=1.0, top_p=1.5)])
def test_bad_sampling_arguments(engine, kwargs):
    with pytest.raises(ValueError):
        engine.generate("Hello", 4, **kwargs)


def test_prompt_longer_than_the_context(engine):
    with pytest.raises(ValueError, match="n_ctx"):
        engine.generate(list(range(10, 10 + engine.n_ctx)), 4)


def _copy_with_f16_head(src: Path, dst: Path) -> None:
    """The GGUF ``src`` with its tied head (token_embd) stored as F16 instead of Q8_0."""
    import gguf

    reader = gguf.GGUFReader(src)
    writer = gguf.GGUFWriter(dst, reader.fields["general.architecture"].contents())
    for f in reader.fields.values():
        if f.name == "general.architecture" or f.name.startswith("GGUF."):
            continue
        sub = f.types[-1] if f.types[0] == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(f.name, f.contents(), f.types[0], sub_type=sub)
    data = {}
    for t in reader.tensors:
        if t.name == "token_embd.weight":
            data[t.name] = gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float16)
            writer.add_tensor_info(t.name, data[t.name].shape, np.float16, data[t.name].nbytes,
                                   gguf.GGMLQuantizationType.F16)
        else:
            data[t.name] = t.data
            writer.add_tensor_info(t.name, t.data.shape, t.data.dtype, t.data.nbytes, t.tensor_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    for t in reader.tensors:
        writer.write_tensor_data(data[t.name])
    writer.close()


def test_head_not_8bit_falls_back_to_fp32_rows(engine, prompts, tmp_path, capfd):
    from flashhead.integrations.transformers import default_index_dir

    f16 = tmp_path / "smollm2-f16-head.gguf"
    _copy_with_f16_head(engine.path, f16)
    capfd.readouterr()
    # same rows up to fp16 rounding, so same signs: the SmolLM2 index fits
    other = LlamaCpp(f16, n_threads=1, index=default_index_dir(MODEL))
    try:
        err = capfd.readouterr().err
        lines = [line for line in err.splitlines() if "not 8-bit" in line]
        assert len(lines) == 1 and "F16" in lines[0] and "fp32 rows" in lines[0]
        assert other.head.rows.dtype == torch.float32
        fast = other.generate(prompts[0], 16, head="flashhead")
        dense = other.generate(prompts[0], 16, head="dense")
        assert fast.token_ids == dense.token_ids
    finally:
        other.close()


def test_gguf_llamacpp_cannot_load(engine, tmp_path):
    bad = tmp_path / "garbage.gguf"
    bad.write_bytes(b"GGUF" + bytes(range(256)) * 64)
    truncated = tmp_path / "truncated.gguf"
    with open(engine.path, "rb") as f:
        truncated.write_bytes(f.read(4 << 20))
    for path in (bad, truncated):
        with pytest.raises(ModelLoadError) as e:
            LlamaCpp(path)
        msg = str(e.value)
        assert "\n" not in msg and str(path) in msg and "llama.cpp could not load" in msg


def test_cli_generate_with_llamacpp(capsys):
    from flashhead.cli import main

    args = ["generate", MODEL, "--engine", "llama.cpp", "--prompt", "The capital of France is", "--max-new-tokens",
            "12", "--threads", "1", "--json"]
    assert main(args) == 0
    fast = json.loads(capsys.readouterr().out)
    assert main(args + ["--dense"]) == 0
    dense = json.loads(capsys.readouterr().out)
    assert fast["token_ids"] == dense["token_ids"] and len(fast["token_ids"]) >= 1
    assert fast["head"].startswith("llama.cpp + flashhead") and dense["head"] == "llama.cpp dense"
    assert main(args[:-1] + ["--temperature", "0.7", "--top-k", "20", "--seed", "1"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("The capital of France is") and re.search(r"tokens/s\]", out)
    assert not math.isnan(fast["tokens_per_second"])


def test_stop_strings_spanning_tokens(engine, prompts):
    """A stop string ends the generation at the token that completes it, also when it spans tokens; both heads
    follow the same rule. The stop strings are cut from each head's own free run, so no FlashHead == dense
    assumption is made."""
    for head in ("dense", "flashhead"):
        free = engine.generate(prompts[1], 24, head=head)
        text = free.texts[0]
        stop = text[len(text) // 2: len(text) // 2 + 3]  # three characters from the middle: often across tokens
        assert len(stop) == 3
        cut = engine.generate(prompts[1], 24, head=head, stop=[stop])
        ids = cut.token_ids[0]
        assert ids == free.token_ids[0][:len(ids)]  # the same run, ended early
        assert stop in cut.texts[0] and stop not in engine.detokenize(ids[:-1])  # the last token completed it
    with pytest.raises(ValueError, match="stop must be a list of non-empty strings"):
        engine.generate(prompts[1], 4, stop="\n")


def test_score_is_llamacpps_dense_head(engine, prompts):
    """score(): the log-softmax of llama.cpp's own logits over the same prefix, whatever head decodes; greedy flags
    from its argmax. The reference is computed here from dense_argmax's context, window by window."""
    ids = engine.tokenize(prompts[0] + prompts[2])
    start = 10
    logp, greedy = engine.score(ids, start)
    assert logp.shape == greedy.shape == (len(ids) - start,)
    assert torch.isfinite(logp).all() and (logp <= 0).all()
    dense = engine.dense_argmax(ids)  # llama.cpp's own greedy token after every prefix
    assert torch.equal(greedy, dense[start - 1:-1] == torch.tensor(ids[start:]))
    # the same numbers as one decode of each prefix through llama.cpp's dense context, for a few positions
    ctx = engine._context("dense")
    for j in (start, len(ids) // 2, len(ids) - 1):
        engine._prefill(ctx, ids[:j], outputs="last")
        addr = engine.ll.llama_get_logits_ith(ctx, -1)
        row = torch.from_numpy(np.ctypeslib.as_array(addr, (engine.n_vocab,)).copy()).double()
        assert math.isclose(float(row.log_softmax(0)[ids[j]]), float(logp[j - start]), rel_tol=0, abs_tol=1e-4)
    # scoring in batches of n_batch gives the same numbers as one batch
    small = LlamaCpp(MODEL, n_threads=1, n_batch=16, flashhead=False)
    try:
        logp16, greedy16 = small.score(ids, start)
    finally:
        small.close()
    assert torch.allclose(logp16, logp, atol=1e-4, rtol=0) and torch.equal(greedy16, greedy)
    with pytest.raises(ValueError, match="score needs 1 <= start"):
        engine.score(ids, 0)


PROMPTS_6 = ["The capital of France is", "def fibonacci(n):", "Once upon a time, there was a",
             "The best way to learn a new language is", "Water freezes at", "import numpy as np\n"]


@pytest.mark.parametrize("invariant", [False, True])
@pytest.mark.parametrize("head", ["flashhead", "dense"])
def test_batched_greedy_equals_batch_1(engine, head, invariant, greedy_or_tie):
    """Six sequences through four slots (two join as others finish, each with its own length): every sequence's
    greedy tokens equal a batch-1 run of its prompt, with FlashHead and with llama.cpp's own head; sharing each
    step, up to a near tie that llama.cpp's batch-dependent rounding may tip (conftest.TIE_NATS); with
    ``invariant`` (each sequence in its own decode) exactly."""
    from flashhead.integrations.llamacpp_batch import Batcher

    lengths = [24, 9, 17, 24, 5, 12]
    ref = [engine.generate(p, n, head=head).token_ids[0] for p, n in zip(PROMPTS_6, lengths)]
    b = Batcher(engine, n_slots=4, head=head, invariant=invariant)
    try:
        reqs = [b.submit(p, n) for p, n in zip(PROMPTS_6, lengths)]
        most = 0
        while not b.idle:
            b.step()
            most = max(most, b.running)
        assert most == 4 and b.queued == 0
        if invariant:  # premise: a sequence decoded alone in an n_slots context has the shapes of a run alone
            assert [r.tokens for r in reqs] == ref
        for r, want in zip(reqs, ref):
            greedy_or_tie(engine, r.prompt, r.tokens, want)
        assert all(r.finish_reason in ("length", "eog") for r in reqs)
    finally:
        b.close()


def test_the_near_tie_check_fails_on_a_wrong_token(engine, prompts, greedy_or_tie):
    ids = engine.tokenize(prompts[0])
    ref = engine.generate(ids, 8).token_ids[0]
    assert greedy_or_tie(engine, ids, ref, ref)
    wrong = ref[:1] + engine.tokenize(" zebra", add_special=False)[:1] + ref[2:]
    with pytest.raises(AssertionError, match="no near tie"):
        greedy_or_tie(engine, ids, wrong, ref)
    with pytest.raises(AssertionError, match="stopped early"):
        greedy_or_tie(engine, ids, ref[:4], ref)


def test_batcher_cancel_stop_sampling_and_long_prompts(engine, prompts, greedy_or_tie):
    from flashhead.integrations.llamacpp_batch import Batcher

    b = Batcher(engine, n_slots=2)
    try:
        first, second, third = (b.submit(p, 16) for p in prompts)
        b.step()
        b.cancel(first)  # frees its slot: the third joins at the next step
        assert first.finish_reason == "cancelled" and len(first.tokens) == 1
        b.run()
        for r, p in ((third, prompts[2]), (second, prompts[1])):
            greedy_or_tie(engine, r.prompt, r.tokens, engine.generate(p, 16).token_ids[0])
        # stop strings end a sequence at the token that completes them, as generate() does
        free = engine.generate(prompts[0], 20).texts[0]
        stop = free[len(free) // 2: len(free) // 2 + 3]
        s = b.submit(prompts[0], 20, stop=[stop])
        b.run()
        assert s.finish_reason == "stop" and s.tokens == engine.generate(prompts[0], 20, stop=[stop]).token_ids[0]
        # sampled sequences draw from their own seeded generator: the same seed draws the same tokens beside a
        # greedy neighbour (which draws nothing) as beside a sampled one (which draws every step)
        a1, g = b.submit(prompts[1], 12, temperature=0.8, seed=3), b.submit(prompts[2], 12)
        b.run()
        a2, _ = b.submit(prompts[1], 12, temperature=0.8, seed=3), b.submit(prompts[2], 12, temperature=0.8, seed=9)
        b.run()
        assert a1.tokens == a2.tokens
        greedy_or_tie(engine, g.prompt, g.tokens, engine.generate(prompts[2], 12).token_ids[0])
        with pytest.raises(ValueError, match="max_new_tokens must be an int"):
            b.submit(prompts[0], 0)
        with pytest.raises(ValueError, match="exceed n_ctx"):
            b.submit(prompts[0], engine.n_ctx)
    finally:
        b.close()
    # a prompt longer than one batch is prefilled over several steps
    small = LlamaCpp(MODEL, n_threads=1, n_batch=16)
    try:
        long_prompt = prompts[0] + prompts[1]
        ref = small.generate(long_prompt, 8).token_ids[0]
        b = Batcher(small, n_slots=2)
        r, other = b.submit(long_prompt, 8), b.submit(prompts[2], 8)
        b.run()
        greedy_or_tie(small, r.prompt, r.tokens, ref)
        greedy_or_tie(small, other.prompt, other.tokens, small.generate(prompts[2], 8).token_ids[0])
        b.close()
        b = Batcher(small, n_slots=2, invariant=True)  # alone: the prompt in n_batch chunks, as generate() does
        r, other = b.submit(long_prompt, 8), b.submit(prompts[2], 8)
        b.run()
        assert r.tokens == ref and other.tokens == small.generate(prompts[2], 8).token_ids[0]
        b.close()
    finally:
        small.close()
