"""Reliability and safety (issue 7): bad input gets a clear error, nothing is lost, nothing is executed.

Each test names the row of docs/reliability.md it proves. Rows already proven elsewhere (FlashHead's
own argument checks in test_head.py, another model's assets in test_index.py, padded batches in
test_integration.py) are referenced there, not repeated here.
"""

from __future__ import annotations

import json
import os
import pickle
import random
import re
import signal
import subprocess
import sys
import textwrap
import threading
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from flashhead import _io
from flashhead.cli import main
from flashhead.decode import generate
from flashhead.index import (CONFIG_FILE, INFORMATIONAL_FIELDS, TENSORS_FILE, AssetError, FlashHeadIndex,
                             IndexConfig, build_index, checksum)
from flashhead.integrations.vllm import vendor as vllm
from flashhead.integrations.transformers import apply, decoding, dense_logits, remove
from flashhead.models import ModelNotAvailableError, head_weight, load_model

V, D, CAP = 512, 32, 16  # synthetic head: 32 clusters of 16
K = V // CAP


def _weight(seed: int = 0, v: int = V) -> torch.Tensor:
    return torch.randn(v, D, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def index() -> FlashHeadIndex:
    return build_index(_weight(), CAP, always_ids=[3], model_name="synthetic", progress=False)


@pytest.fixture
def assets(index: FlashHeadIndex, tmp_path: Path) -> Path:
    return index.save(tmp_path / "assets")


def _results(config: IndexConfig) -> dict:
    """The config fields that change results (all but the model name and the build record)."""
    return {k: v for k, v in asdict(config).items() if k not in INFORMATIONAL_FIELDS}


def _same_index(a: FlashHeadIndex, b: FlashHeadIndex) -> bool:
    return (torch.equal(a.slot_token, b.slot_token) and torch.equal(a.centroids, b.centroids)
            and _results(a.config) == _results(b.config))


def _write_assets(folder: Path, tensors: dict[str, torch.Tensor], config: dict) -> None:
    """Hand-made assets with a valid checksum (unless ``config`` brings its own), as a buggy writer
    would produce them: only the structural checks can refuse them."""
    folder.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(folder / TENSORS_FILE))
    if "checksum" not in config:
        try:
            config = {**config, "checksum": checksum(IndexConfig(**config), _io.sha256_file(folder / TENSORS_FILE))}
        except TypeError:  # missing or unknown keys: no IndexConfig, so no checksum either
            pass
    (folder / CONFIG_FILE).write_text(json.dumps(config))


def _listing(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


# ------------------------------------------------------------------------------------------
# damaged, truncated, hand-edited assets
# ------------------------------------------------------------------------------------------
def _tensors(index: FlashHeadIndex) -> dict[str, torch.Tensor]:
    return {"slot_token": index.slot_token.clone(), "centroids": index.centroids.clone()}


def _edit_slots(fn: Callable[[torch.Tensor], object]) -> Callable[[dict, dict], None]:
    """An edit of the tensors and config that only touches slot_token (in place)."""
    def edit(tensors: dict, config: dict) -> None:
        fn(tensors["slot_token"])
    return edit


BAD_TENSORS = {
    "missing tensor": (lambda t, c: t.pop("centroids"), "must hold exactly slot_token and centroids, found"),
    "extra tensor": (lambda t, c: t.update(extra=torch.zeros(1)), "must hold exactly slot_token and centroids"),
    "wrong shape slot_token": (lambda t, c: t.update(slot_token=t["slot_token"][:, :8].contiguous()),
                               rf"slot_token must be int64 \[{K}, {CAP}\], got torch.int64 \[{K}, 8\]"),
    "wrong shape centroids": (lambda t, c: t.update(centroids=t["centroids"][:-1].contiguous()),
                              rf"centroids must be float32 \[{K}, {D}\]"),
    "non-integer ids": (lambda t, c: t.update(slot_token=t["slot_token"].double()), "slot_token must be int64"),
    "int32 ids": (lambda t, c: t.update(slot_token=t["slot_token"].int()), "slot_token must be int64"),
    "fp16 centroids": (lambda t, c: t.update(centroids=t["centroids"].half()), "centroids must be float32"),
    "NaN centroid": (lambda t, c: t["centroids"].__setitem__((0, 0), float("nan")), "centroids hold NaN or Inf"),
    "id past the vocabulary": (_edit_slots(lambda s: s.__setitem__((0, 0), V)), r"ids outside -1\.\.511"),
    "id below -1": (_edit_slots(lambda s: s.__setitem__((0, 0), -2)), r"ids outside -1\.\.511"),
    "duplicated token": (_edit_slots(lambda s: s.__setitem__((0, 0), s[0, 1])), "exactly once.*511 distinct"),
    "unequal cluster sizes": (_edit_slots(lambda s: s.__setitem__((0, 0), -1)), "exactly once.*found 511 ids"),
}

BAD_CONFIG = {
    "missing key": (lambda t, c: c.pop("num_clusters"), "lacks num_clusters"),
    "unknown key": (lambda t, c: c.update(probes=3), r"unknown keys \['probes'\]"),
    "n_probes 0": (lambda t, c: c.update(n_probes=0), "n_probes must be a positive integer, got 0"),
    "n_probes > K": (lambda t, c: c.update(n_probes=K + 1), rf"n_probes {K + 1} is outside 1\.\.{K}"),
    "float field": (lambda t, c: c.update(cluster_size=16.0), "cluster_size must be a positive integer, got 16.0"),
    "bool field": (lambda t, c: c.update(hidden_size=True), "hidden_size must be a positive integer"),
    "cluster size edited": (lambda t, c: c.update(cluster_size=8), rf"slot_token must be int64 \[{K}, 8\]"),
    "too many tokens": (lambda t, c: c.update(num_tokens=V + 1), "513 tokens do not fit"),
    "always id out of range": (lambda t, c: c.update(always_ids=[V]),
                               r"always_ids must be a list of token ids in 0\.\.511"),
    "newer format version": (lambda t, c: c.update(format_version=4), "format version 4 is not 3"),
    "older format version": (lambda t, c: c.update(format_version=1),
                             r"format version 1 \(written by an older flashhead\) is not 3.*rebuild them"),
    "unknown stage 1": (lambda t, c: c.update(stage1="int2"), "stage1 must be one of float, int8, int4, got 'int2'"),
    "unknown stage 2": (lambda t, c: c.update(stage2="int4"), "stage2 must be 'float' or 'q8_0', got 'int4'"),
    "fingerprint not a string": (lambda t, c: c.update(fingerprint=7), "fingerprint must be a string"),
    "build not an object": (lambda t, c: c.update(build=[]), "'build' must be an object"),
    "bad checksum": (lambda t, c: c.update(checksum="md5:0"), "checksum must be 'sha256:'"),
}


@pytest.mark.parametrize("case", [*BAD_TENSORS, *BAD_CONFIG])
def test_hand_made_assets_are_refused(index, tmp_path, case):
    """Row 'assets: wrong tensors / wrong config'. Even with a matching checksum (a buggy writer), every
    structural fault is refused and named."""
    edit, match = {**BAD_TENSORS, **BAD_CONFIG}[case]
    tensors, config = _tensors(index), asdict(index.config)
    edit(tensors, config)
    folder = tmp_path / "a"
    _write_assets(folder, tensors, config)
    with pytest.raises(AssetError, match=match) as e:
        FlashHeadIndex.load(folder)
    assert str(folder) in str(e.value) and "rebuild them with `flashhead build`" in str(e.value)


@pytest.mark.parametrize("case, match", [
    ("tensors truncated", "not a readable safetensors file"),
    ("tensors empty", "not a readable safetensors file"),
    ("tensors missing", "index.safetensors is missing"),
    ("config truncated", "flashhead.json is not valid JSON"),
    ("config not an object", "must hold a JSON object"),
    ("config missing", "flashhead.json is missing"),
    ("config is a folder", "flashhead.json cannot be read"),
    ("centroid bit flipped", "checksum mismatch"),
    ("n_probes edited", "checksum mismatch"),
])
def test_damaged_asset_files_are_refused(assets, case, match):
    """Row 'assets: truncated / corrupted / hand-edited files'."""
    t, c = assets / TENSORS_FILE, assets / CONFIG_FILE
    if case == "tensors truncated":
        t.write_bytes(t.read_bytes()[: t.stat().st_size // 2])
    elif case == "tensors empty":
        t.write_bytes(b"")
    elif case == "tensors missing":
        t.unlink()
    elif case == "config truncated":
        c.write_bytes(c.read_bytes()[:100])
    elif case == "config not an object":
        c.write_text("[1, 2]")
    elif case == "config missing":
        c.unlink()
    elif case == "config is a folder":
        c.unlink()
        c.mkdir()
    elif case == "centroid bit flipped":
        data = bytearray(t.read_bytes())
        data[-5] ^= 0x01  # inside the last centroid: still a finite float, still a valid file
        t.write_bytes(bytes(data))
    elif case == "n_probes edited":
        c.write_text(c.read_text().replace('"n_probes": 1,', '"n_probes": 2,'))
    with pytest.raises(AssetError, match=match) as e:
        FlashHeadIndex.load(assets)
    assert "rebuild them with `flashhead build`" in str(e.value)


def test_a_valid_but_different_layout_is_caught_by_the_checksum(index, assets):
    """Row 'assets: token moved to another cluster': still a valid layout (every token once), so only the
    checksum written at save time can tell."""
    tensors = _tensors(index)
    s = tensors["slot_token"]
    s[0, 0], s[1, 0] = int(s[1, 0]), int(s[0, 0])
    save_file(tensors, str(assets / TENSORS_FILE))
    with pytest.raises(AssetError, match="changed after they were written \\(checksum mismatch\\)"):
        FlashHeadIndex.load(assets)


def test_informational_fields_may_be_edited(index, assets):
    """Row 'assets: hand-edited model name / build record': allowed, the checksum leaves them out."""
    c = assets / CONFIG_FILE
    c.write_text(c.read_text().replace('"model": "synthetic"', '"model": "my renamed model"'))
    loaded = FlashHeadIndex.load(assets, weight=_weight())
    assert loaded.config.model == "my renamed model" and _same_index(loaded, index)


def test_assets_without_checksum_still_load(index, assets):
    """Assets saved before checksums existed are checked for structure and load."""
    c = assets / CONFIG_FILE
    raw = json.loads(c.read_text())
    del raw["checksum"]
    c.write_text(json.dumps(raw))
    assert _same_index(FlashHeadIndex.load(assets, weight=_weight()), index)


def test_missing_folder_says_how_to_build(tmp_path):
    with pytest.raises(AssetError, match="no FlashHead assets at .*flashhead build MODEL --out"):
        FlashHeadIndex.load(tmp_path / "nowhere")


# ------------------------------------------------------------------------------------------
# fuzz: flipped, overwritten, inserted, deleted and truncated bytes of real asset files
# ------------------------------------------------------------------------------------------
def _mutate(data: bytes, rng: random.Random) -> bytes:
    """One random corruption of ``data``."""
    b = bytearray(data)
    pos = rng.randrange(len(b))
    kind = rng.choice(("bit", "byte", "burst", "truncate", "delete", "insert", "swap"))
    if kind == "bit":
        b[pos] ^= 1 << rng.randrange(8)
    elif kind == "byte":
        b[pos] = rng.randrange(256)
    elif kind == "burst":
        for i in range(pos, min(len(b), pos + rng.randint(2, 16))):
            b[i] = rng.randrange(256)
    elif kind == "truncate":
        del b[pos:]
    elif kind == "delete":
        del b[pos]
    elif kind == "insert":
        b.insert(pos, rng.randrange(256))
    else:  # swap two 8-byte words: e.g. two token ids, a permutation that still parses
        p, q = min(pos, len(b) - 8), rng.randrange(len(b) - 8)
        b[p:p + 8], b[q:q + 8] = b[q:q + 8], b[p:p + 8]
    return bytes(b)


def _fuzz(index: FlashHeadIndex, folder: Path, weight: torch.Tensor, cases: int, seed: int) -> dict[str, int]:
    """Load ``cases`` corrupted copies of the assets in ``folder``: each must load the same index
    or fail with an AssetError that names the folder and the fix. Returns outcome counts."""
    rng = random.Random(seed)
    original = {name: (folder / name).read_bytes() for name in (TENSORS_FILE, CONFIG_FILE)}
    counts = {"same": 0, "refused": 0}
    for case in range(cases):
        name = rng.choice(list(original))
        (folder / name).write_bytes(_mutate(original[name], rng))
        try:
            loaded = FlashHeadIndex.load(folder, weight=weight)
        except AssetError as e:
            assert str(folder) in str(e) and "flashhead build" in str(e), (case, str(e))
            counts["refused"] += 1
        else:
            assert _same_index(loaded, index), f"case {case}: a damaged {name} loaded as a different index"
            counts["same"] += 1
        (folder / name).write_bytes(original[name])
    return counts


def test_fuzz_synthetic_assets(index, assets):
    """Row 'assets: random corruption': 3000 seeded corruptions of index.safetensors and flashhead.json."""
    counts = _fuzz(index, assets, _weight(), cases=3000, seed=7)
    print(counts)
    assert counts["refused"] > 2000 and counts["same"] > 0  # harmless edits (JSON whitespace, build record) exist


@pytest.mark.slow
def test_fuzz_real_assets(smollm2, smol_index, tmp_path):
    """The same on the real SmolLM2-135M assets (thousands of clusters, megabytes of centroids)."""
    folder = smol_index.save(tmp_path / "smol")
    counts = _fuzz(smol_index, folder, head_weight(smollm2[0]), cases=60, seed=11)
    print(counts)
    assert counts["refused"] > 0


# ------------------------------------------------------------------------------------------
# nothing executed: pickles are refused, never unpickled
# ------------------------------------------------------------------------------------------
class _Payload:
    """Unpickling this creates ``path`` (a stand-in for arbitrary code)."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)

    def __reduce__(self):
        return open, (self.path, "w")


@pytest.mark.parametrize("kind", ["torch.save", "pickle protocol 0", "pickle protocol 5"])
@pytest.mark.parametrize("target", [TENSORS_FILE, CONFIG_FILE])
def test_pickles_are_refused_not_executed(index, assets, tmp_path, kind, target):
    """Row 'pickle in place of an asset file'."""
    marker = tmp_path / f"pwned-{kind.replace(' ', '-')}"
    payload = {"slot_token": index.slot_token, "centroids": index.centroids, "x": _Payload(marker)}
    if kind == "torch.save":
        torch.save(payload, assets / target)
    else:
        (assets / target).write_bytes(pickle.dumps(payload, protocol=int(kind[-1])))
    with pytest.raises(AssetError) as e:
        FlashHeadIndex.load(assets)
    assert not marker.exists()
    if kind != "pickle protocol 0":  # protocol 0 has no magic bytes; it is refused as unparsable instead
        assert "never unpickles" in str(e.value)
    pickle.loads(pickle.dumps(_Payload(marker))).close()  # the payload is real: unpickling it creates the file
    assert marker.exists()


def test_vllm_import_refuses_a_pickle(index, tmp_path):
    model_dir = _model_dir(tmp_path)
    vllm.export(index, model_dir)
    marker = tmp_path / "pwned"
    torch.save({"centroids": _Payload(marker)}, model_dir / vllm.ASSETS_DIR / vllm.CACHE_FILE)
    with pytest.raises(AssetError, match="never unpickles"):
        vllm.import_assets(model_dir, _weight())
    assert not marker.exists()


# ------------------------------------------------------------------------------------------
# parameters that cannot work
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("probes", [0, -1, K + 1, True, 2.0])
def test_build_refuses_unworkable_probe_counts(probes):
    """Row 'probe count <= 0 or > K' at build time (before clustering starts)."""
    with pytest.raises(ValueError, match=rf"n_probes must be an integer from 1 to K = {K}"):
        build_index(_weight(), CAP, n_probes=probes, progress=False)


def test_vllm_export_needs_a_cluster_size_dividing_the_vocab(tmp_path):
    """Row 'cluster size that cannot work' for the vLLM plugin (equal clusters over every head row)."""
    index = build_index(_weight(v=V + 8), CAP, progress=False)
    model_dir = _model_dir(tmp_path, vocab=V + 8)
    before = _listing(model_dir)
    with pytest.raises(AssetError, match="cluster size that divides 520"):
        vllm.export(index, model_dir)
    assert _listing(model_dir) == before and not (model_dir / vllm.ASSETS_DIR).exists()


# ------------------------------------------------------------------------------------------
# heads: tied and untied, fp32/bf16/fp16, non-contiguous; model-level arguments
# ------------------------------------------------------------------------------------------
def _tiny_model(tied: bool, dtype: torch.dtype = torch.float32):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=V, hidden_size=D, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                      num_key_value_heads=2, tie_word_embeddings=tied, pad_token_id=0)
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():  # a spread-out head, so that logits have clear winners
        model.get_output_embeddings().weight.normal_(0, 1)
    return model.to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
def test_tied_and_untied_heads_in_every_dtype(tied, dtype):
    """Rows 'tied and untied heads' and 'heads in fp16/bf16/fp32': with every cluster probed the patched
    model gives the dense logits, and remove() restores the original weights exactly."""
    model = _tiny_model(tied, dtype)
    weight = head_weight(model)
    assert (model.get_input_embeddings().weight is weight) == tied
    before = weight.detach().clone()
    index = build_index(weight, CAP, progress=False)  # built from this dtype's weights
    ids = torch.tensor([[5, 17, 300, 41, 9]])
    with torch.inference_mode():
        hidden = model.model(input_ids=ids).last_hidden_state
        dense = dense_logits(model, hidden)
        scores = model(input_ids=ids).logits
        head = apply(model, index, n_probes=K, stage1="float")
        assert torch.equal(model(input_ids=ids).logits, scores)  # scoring forwards stay exact, in the model dtype
        with decoding(model):
            fast = model(input_ids=ids).logits.float()
            h = hidden[0]
            assert torch.equal(head(h.t().contiguous().t()), head(h))  # non-contiguous hidden states
        assert torch.equal(fast.argmax(-1), dense.argmax(-1))
        assert torch.allclose(fast, dense, rtol=0, atol=1e-4 if dtype == torch.float32 else 0.1)
        remove(model)
    assert torch.equal(head_weight(model), before)
    assert (model.get_input_embeddings().weight is head_weight(model)) == tied


def test_assets_follow_the_model_not_its_dtype(index, tmp_path):
    """Row 'assets from another model: dtype': assets built from the fp32 head fit its bf16 copy and a
    non-contiguous view (same model), and the index does not depend on the layout."""
    w = _weight()
    folder = index.save(tmp_path / "a")
    for weight in (w.bfloat16(), w.t().contiguous().t()):
        FlashHeadIndex.load(folder, weight=weight)
    nc = w.t().contiguous().t()
    assert not nc.is_contiguous()
    assert _same_index(build_index(nc, CAP, always_ids=[3], progress=False), index)


def test_fp16_and_bf16_copies_of_the_same_head_are_accepted(index, tmp_path):
    """Row 'heads in fp16/bf16/fp32': assets built from the fp32 head fit its fp16 and bf16 copies."""
    folder = index.save(tmp_path / "a")
    for dtype in (torch.float16, torch.bfloat16):
        assert _same_index(FlashHeadIndex.load(folder, weight=_weight().to(dtype)), index)


def test_apply_checks_probes_and_leaves_the_model_alone_on_error():
    """Row 'probe count <= 0 or > K' in apply(): refused (0 used to mean 'the default'), model untouched."""
    model = _tiny_model(tied=True)
    index = build_index(head_weight(model), CAP, progress=False)
    for probes in (0, K + 1):
        with pytest.raises(ValueError, match=rf"n_probes must be in \[1, K={K}\]"):
            apply(model, index, n_probes=probes)
        assert getattr(model, "_flashhead", None) is None and not hasattr(model.lm_head, "n_probes")
    with pytest.raises(TypeError, match="index must be a FlashHeadIndex"):
        apply(model, "path/to/assets")


@pytest.mark.parametrize("kwargs, match", [
    (dict(temperature=0.0), "temperature must be a finite float > 0"),
    (dict(temperature=-1.0), "temperature must be a finite float > 0"),
    (dict(temperature=float("nan")), "temperature must be a finite float > 0"),
    (dict(temperature=1.0, top_p=0.0), r"top_p must be in \(0, 1\]"),
    (dict(temperature=1.0, top_p=1.5), r"top_p must be in \(0, 1\]"),
    (dict(temperature=1.0, top_p=float("nan")), r"top_p must be in \(0, 1\]"),
])
def test_patched_generate_checks_sampling_arguments(kwargs, match):
    """Rows 'temperature <= 0 or NaN' and 'top-p outside (0, 1]' through generate() (transformers itself
    silently ignores top_p > 1 and accepts 0 and NaN)."""
    model = _tiny_model(tied=True)
    apply(model, build_index(head_weight(model), CAP, progress=False))
    with pytest.raises(ValueError, match=match):
        model.generate(torch.tensor([[1, 2, 3]]), do_sample=True, max_new_tokens=2, **kwargs)


@pytest.mark.slow
@pytest.mark.parametrize("prompts", [[], [""], ["  "], ["ok", ""]])
def test_empty_prompts_are_refused(smollm2, prompts):
    """Row 'empty prompts'."""
    model, tok = smollm2
    with pytest.raises(ValueError, match="every prompt must be a non-empty string"):
        generate(model, tok, prompts)


def test_unknown_model_path(tmp_path):
    """Row 'unknown model name or path' (the name case is test_models.py::test_unknown_model_is_explained)."""
    with pytest.raises(ModelNotAvailableError, match="neither a model folder with config.json nor a .gguf file"):
        load_model(tmp_path)
    with pytest.raises(ModelNotAvailableError, match="unknown model .*transformers model folder, or a .gguf file"):
        load_model(tmp_path / "missing")


# ------------------------------------------------------------------------------------------
# nothing lost: interrupted builds, atomic writes, permissions
# ------------------------------------------------------------------------------------------
_BUILD = textwrap.dedent("""
    import signal, sys, time, torch
    signal.signal(signal.SIGINT, signal.default_int_handler)  # as in a terminal, whatever the parent set
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    import flashhead.index as fi
    phase, folder = sys.argv[1], sys.argv[2]

    def stall(real):  # run the real step, then wait to be interrupted right after it
        def wrapper(*args, **kwargs):
            out = real(*args, **kwargs)
            print("STALLED", flush=True)
            time.sleep(120)
            return out
        return wrapper

    if phase == "build":  # during clustering: nothing written yet
        fi.balanced_kmeans = stall(fi.balanced_kmeans)
    else:  # during saving: index.safetensors written into the temporary folder, flashhead.json not yet
        fi.save_file = stall(fi.save_file)
    weight = torch.randn(512, 32, generator=torch.Generator().manual_seed(99))
    fi.build_index(weight, 16, progress=False).save(folder)
""")


def _interrupted_build(folder: Path, phase: str, sig: signal.Signals) -> int:
    """Run a build into ``folder`` in a child process, send ``sig`` at ``phase``; returns its exit code."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-c", _BUILD, phase, str(folder)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env)
    watchdog = threading.Timer(120, proc.kill)  # never hang the test run
    watchdog.start()
    try:
        line = proc.stdout.readline()
        assert line.strip() == "STALLED", proc.communicate()[1]
        proc.send_signal(sig)
        proc.wait()
    finally:
        watchdog.cancel()
        proc.kill()
        proc.communicate()
    return proc.returncode


@pytest.mark.parametrize("phase", ["build", "write"])
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_interrupted_build_keeps_the_old_assets(index, assets, sig, phase):
    """Row 'build interrupted by Ctrl-C or SIGTERM': the old assets stay byte-identical, no temporary is
    left, the process still ends by that signal, and a rerun works."""
    before = _listing(assets)
    code = _interrupted_build(assets, phase, sig)
    assert code == -sig
    assert _listing(assets) == before
    assert sorted(p.name for p in assets.parent.iterdir()) == ["assets"]  # no .assets.*.tmp / .old left
    assert _same_index(FlashHeadIndex.load(assets, weight=_weight()), index)
    new = build_index(_weight(99), CAP, progress=False).save(assets)  # the rerun
    FlashHeadIndex.load(new, weight=_weight(99))
    assert sorted(p.name for p in assets.parent.iterdir()) == ["assets"]


def test_leftovers_of_a_killed_build_are_removed_by_the_next_write(index, assets):
    """Row 'build killed by SIGKILL': no handler runs, so a hidden temporary stays, next to intact old
    assets; the next write to the same folder removes it."""
    before = _listing(assets)
    assert _interrupted_build(assets, "write", signal.SIGKILL) == -signal.SIGKILL
    assert _listing(assets) == before
    left = [p.name for p in assets.parent.iterdir() if p.name != "assets"]
    assert len(left) == 1 and left[0].startswith(".assets.") and left[0].endswith(".tmp")
    index.save(assets)
    assert sorted(p.name for p in assets.parent.iterdir()) == ["assets"]


def test_failed_swap_puts_the_old_folder_back(index, assets, monkeypatch):
    """The swap is two renames; if the second fails the old assets are put back."""
    before = _listing(assets)
    real = os.replace

    def fail_second(src, dst):
        if Path(src).name.endswith(".tmp"):
            raise OSError("disk full")
        real(src, dst)

    monkeypatch.setattr(os, "replace", fail_second)
    with pytest.raises(OSError, match="disk full"):
        build_index(_weight(99), CAP, progress=False).save(assets)
    assert _listing(assets) == before
    assert sorted(p.name for p in assets.parent.iterdir()) == ["assets"]


def test_save_never_replaces_a_folder_of_other_files(index, tmp_path):
    """Row 'assets folder that holds user files': saving would replace the whole folder, so it refuses."""
    user = tmp_path / "documents"
    user.mkdir()
    (user / "thesis.tex").write_text("years of work")
    with pytest.raises(FileExistsError, match=r"holds files that are not FlashHead assets \(thesis.tex\)"):
        index.save(user)
    assert (user / "thesis.tex").read_text() == "years of work"
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match="is a file, not a folder"):
        index.save(tmp_path / "file")


def test_atomic_writes_respect_the_umask(index, tmp_path):
    """Written files get the mode open() would give them (not tempfile's 0600); a replaced file keeps its mode."""
    old = os.umask(0o027)
    try:
        folder = index.save(tmp_path / "a")
        _io.atomic_write_bytes(tmp_path / "new.txt", b"x")
        private = tmp_path / "private.json"
        private.write_text("{}")
        private.chmod(0o600)
        _io.atomic_write_json(private, {"a": 1})
    finally:
        os.umask(old)
    mode = lambda p: p.stat().st_mode & 0o777  # noqa: E731
    assert mode(folder) == 0o750
    assert mode(folder / TENSORS_FILE) == mode(folder / CONFIG_FILE) == mode(tmp_path / "new.txt") == 0o640
    assert mode(private) == 0o600 and json.loads(private.read_text()) == {"a": 1}


# ------------------------------------------------------------------------------------------
# export into a model folder
# ------------------------------------------------------------------------------------------
USER_CONFIG = {"architectures": ["LlamaForCausalLM"], "vocab_size": V, "my_note": "keep me", "rope_theta": 1e4}


def _model_dir(tmp_path: Path, vocab: int = V) -> Path:
    d = tmp_path / "model"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({**USER_CONFIG, "vocab_size": vocab}, indent=4))
    (d / "model.safetensors").write_bytes(b"user weights")
    return d


def test_export_refuses_without_force_and_keeps_user_keys_with_it(index, tmp_path):
    """Row 'export into a model folder': refuses without force (files byte-identical); with force only
    the FlashHead keys change; the original config.json is kept byte for byte."""
    model_dir = _model_dir(tmp_path)
    original = (model_dir / "config.json").read_bytes()
    vllm.export(index, model_dir)
    assert (model_dir / "config.json.before-flashhead").read_bytes() == original
    exported = _listing(model_dir)
    with pytest.raises(FileExistsError, match="pass --force"):
        vllm.export(index, model_dir)
    assert _listing(model_dir) == exported
    other = build_index(_weight(), CAP, n_probes=5, always_ids=[7], progress=False)
    vllm.export(other, model_dir, force=True)
    config = json.loads((model_dir / "config.json").read_text())
    assert config == {**USER_CONFIG, "architectures": ["FlashHeadLlamaForCausalLM"], "n_probes": 5,
                      "flash_head_cache_dir": vllm.ASSETS_DIR, "flash_head_special_token_ids": [7]}
    assert list(config)[:4] == list(USER_CONFIG)  # the user's key order too
    assert (model_dir / "config.json.before-flashhead").read_bytes() == original
    assert (model_dir / "model.safetensors").read_bytes() == b"user weights"


@pytest.mark.parametrize("crash", [OSError("disk full"), KeyboardInterrupt()], ids=["OSError", "Ctrl-C"])
def test_export_crash_while_writing_config_changes_nothing(index, tmp_path, monkeypatch, crash):
    """Row 'export interrupted while writing config.json': config.json is never half-written, the
    folder is as before (assets of this call removed), and a rerun works."""
    model_dir = _model_dir(tmp_path)
    before = _listing(model_dir)
    real = os.replace

    def crash_on_config(src, dst):
        if Path(dst).name == "config.json":
            raise crash
        real(src, dst)

    monkeypatch.setattr(os, "replace", crash_on_config)
    with pytest.raises(type(crash)):
        vllm.export(index, model_dir)
    monkeypatch.undo()
    assert _listing(model_dir) == before
    assert sorted(p.name for p in model_dir.iterdir()) == ["config.json", "model.safetensors"]
    vllm.export(index, model_dir)
    assert json.loads((model_dir / "config.json").read_text())["flash_head_cache_dir"] == vllm.ASSETS_DIR


@pytest.mark.parametrize("text, match", [("{not json", "is not valid JSON"), ("[]", "must hold a JSON object"),
                                         ('{"vocab_size": 1}', "no 'architectures' list")])
def test_export_explains_a_broken_config(index, tmp_path, text, match):
    model_dir = _model_dir(tmp_path)
    (model_dir / "config.json").write_text(text)
    with pytest.raises(ValueError, match=match):
        vllm.export(index, model_dir)
    assert (model_dir / "config.json").read_text() == text and not (model_dir / vllm.ASSETS_DIR).exists()


def test_vllm_import_refuses_unequal_clusters(index, tmp_path):
    """Row 'assets: cluster sizes not equal' in the plugin's format."""
    from safetensors.torch import load_file

    model_dir = _model_dir(tmp_path)
    vllm.export(index, model_dir)
    path = model_dir / vllm.ASSETS_DIR / vllm.CACHE_FILE
    tensors = load_file(str(path))
    tensors["cluster_assignments"][0] = (tensors["cluster_assignments"][0] + 1) % K
    save_file(tensors, str(path))
    with pytest.raises(AssetError, match="clusters must all have one size; found sizes from 15 to 17"):
        vllm.import_assets(model_dir, _weight())


# ------------------------------------------------------------------------------------------
# the command line: one clear line on stderr, non-zero exit, no traceback
# ------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def smol_assets(smol_index, tmp_path_factory) -> Path:
    return smol_index.save(tmp_path_factory.mktemp("cli") / "smol")


def _cli_error(capsys, argv: list[str]) -> str:
    """Run the CLI, check it failed with exit code 2 and one error line (after any progress bars of
    model loading), no traceback; returns that line."""
    code = main(argv)
    err = capsys.readouterr().err.strip()
    errors = [line for line in err.splitlines() if ": error:" in line]
    assert code == 2 and "Traceback" not in err and len(errors) == 1 and err.endswith(errors[0]), err
    return errors[0]


def _cli_generate(smol_assets: Path, *extra: str) -> list[str]:
    return ["generate", "smollm2-135m", "--prompt", "hi", "--max-new-tokens", "2", "--index", str(smol_assets), *extra]


@pytest.mark.slow
@pytest.mark.parametrize("beyond", [-1, 0, 1], ids=["negative", "zero", "K+1"])
def test_cli_generate_bad_probe_count(smol_index, smol_assets, capsys, beyond):
    """Row 'probe count <= 0 or > K' through `flashhead generate` (--probes 0 used to mean 'default')."""
    k = smol_index.num_clusters
    probes = k + 1 if beyond > 0 else beyond
    err = _cli_error(capsys, _cli_generate(smol_assets, "--probes", str(probes)))
    assert f"flashhead generate: error: n_probes must be in [1, K={k}], got {probes}" in err


@pytest.mark.slow
@pytest.mark.parametrize("extra, match", [
    (["--temperature", "-1"], "temperature must be a finite float > 0"),
    (["--temperature", "0"], "temperature must be a finite float > 0"),
    (["--temperature", "nan"], "temperature must be a finite float > 0"),
    (["--temperature", "1", "--top-p", "1.5"], r"top_p must be in \(0, 1\]"),
    (["--temperature", "1", "--top-p", "0"], r"top_p must be in \(0, 1\]"),
])
def test_cli_generate_bad_sampling_arguments(smol_assets, capsys, extra, match):
    """Rows 'temperature <= 0 or NaN' and 'top-p outside (0, 1]' through `flashhead generate`."""
    err = _cli_error(capsys, _cli_generate(smol_assets, *extra))
    assert err.startswith("flashhead generate: error:") and re.search(match, err), err


@pytest.mark.slow
def test_cli_generate_empty_prompt(capsys):
    err = _cli_error(capsys, ["generate", "smollm2-135m", "--dense", "--prompt", "", "--max-new-tokens", "2"])
    assert "every prompt must be a non-empty string" in err


@pytest.mark.slow
def test_cli_assets_of_another_model_or_damaged(index, assets, capsys):
    """Rows 'assets built for another model' and 'damaged assets' through the CLI."""
    argv = _cli_generate(assets)
    assert "built for a head of shape (512, 32) (synthetic)" in _cli_error(capsys, argv)
    (assets / TENSORS_FILE).write_bytes(b"garbage")
    assert "index.safetensors is not a readable safetensors file" in _cli_error(capsys, argv)


@pytest.mark.slow
def test_cli_export_refuses_to_overwrite_without_force(smollm2, tmp_path, capsys):
    """Row 'export into a model folder' through the CLI: the second export without --force is one line
    and exit code 2 (a FileExistsError used to escape as a traceback)."""
    model = _tiny_model(tied=True)
    model_dir = tmp_path / "tiny"
    model.save_pretrained(model_dir)
    smollm2[1].save_pretrained(model_dir)
    build_index(head_weight(model), CAP, progress=False).save(tmp_path / "assets")
    argv = ["export-vllm", str(model_dir), "--index", str(tmp_path / "assets")]
    assert main(argv) == 0
    exported = _listing(model_dir)
    assert "pass --force to replace them" in _cli_error(capsys, argv)
    assert _listing(model_dir) == exported
    assert main([*argv, "--force"]) == 0


def test_cli_unknown_model_in_a_fresh_process(tmp_path):
    """The installed entry point, as a user runs it: one line, exit code 2, no traceback."""
    for ref, match in (("llama-7b", "unknown model 'llama-7b'"), (str(tmp_path), "neither a model folder")):
        out = subprocess.run([sys.executable, "-m", "flashhead.cli", "generate", ref, "--prompt", "hi"],
                             capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
        assert out.returncode == 2 and match in out.stderr and "Traceback" not in out.stderr
        assert len(out.stderr.strip().splitlines()) == 1, out.stderr


@pytest.mark.parametrize("kwargs, match", [
    (dict(temperature=0.0), "temperature must be a finite float > 0"),
    (dict(temperature=float("nan")), "temperature must be a finite float > 0"),
    (dict(temperature=1.0, top_p=1.5), r"top_p must be in \(0, 1\]"),
    (dict(temperature=1.0, top_k=0), "top_k must be an int >= 1"),
])
def test_decode_generate_checks_sampling_arguments_before_the_model_runs(kwargs, match):
    """Rows 'temperature <= 0 or NaN' and 'top-p outside (0, 1]' for the dense path too (`generate --dense`):
    transformers would silently ignore some of these; the check happens before the model is touched."""
    from flashhead.decode import generate

    with pytest.raises(ValueError, match=match):
        generate(None, None, ["hi"], **kwargs)


def test_cli_build_calibration_texts_are_checked_at_parse_time(capsys):
    """`flashhead build --calibration` takes comma-separated built-in texts (or files) or 'none', and names the
    unknown one before any model loads."""
    from flashhead.cli import build_parser

    parse = build_parser().parse_args
    assert parse(["build", "smollm2-135m"]).calibration == ["code-tune+prideprejudice+multilingual-tune",
                                                          "sensesensibility"]
    assert parse(["build", "x", "--calibration", "code-tune+emma,brown"]).calibration == ["code-tune+emma", "brown"]
    assert parse(["build", "smollm2-135m", "--calibration", "brown, emma"]).calibration == ["brown", "emma"]
    assert parse(["build", "smollm2-135m", "--calibration", "none"]).calibration == ["none"]
    with pytest.raises(SystemExit):
        parse(["build", "smollm2-135m", "--calibration", "emma,foo"])
    assert "unknown text foo: neither a built-in text (prideprejudice" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        parse(["build", "smollm2-135m", "--calibration", "emma+bar"])
    assert "unknown text bar: neither a built-in text" in capsys.readouterr().err
