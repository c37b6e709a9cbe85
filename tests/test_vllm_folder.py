"""The servable vLLM folder (flashhead/integrations/vllm/folder.py): written whole, and every bad setting in
it refused with one clear message before anything is served. No vLLM needed (the plugin calls these at load)."""

import json

import pytest
import torch

from flashhead._io import WouldOverwriteError
from flashhead.index import AssetError, build_index
from flashhead.integrations.vllm import vendor
from flashhead.integrations.vllm.folder import INDEX_DIR, export_folder, load_index, read_spec

V, D, CAP = 512, 32, 16


def _weight(seed: int = 0, v: int = V) -> torch.Tensor:
    return torch.randn(v, D, generator=torch.Generator().manual_seed(seed))


@pytest.fixture
def model_dir(tmp_path):
    d = tmp_path / "model"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"], "vocab_size": V}))
    (d / "model.safetensors").write_bytes(b"weights")
    (d / "tokenizer.json").write_text("{}")
    (d / "flashhead-manifest.json").write_text("{}")
    return d


@pytest.fixture
def index():
    return build_index(_weight(), CAP, always_ids=[3], progress=False)


def _config(folder):
    return json.loads((folder / "config.json").read_text())


def test_export_writes_a_servable_folder_and_reads_back(model_dir, index, tmp_path):
    out = export_folder(model_dir, tmp_path / "served", index, n_probes=5, stage1="float")
    assert sorted(p.name for p in out.iterdir()) == ["config.json", INDEX_DIR, "model.safetensors", "tokenizer.json"]
    cfg = _config(out)
    assert cfg["architectures"] == ["FlashHeadLlamaForCausalLM"]
    assert cfg["flashhead"] == {"index": INDEX_DIR, "n_probes": 5, "stage1": "float", "vocab_size": V}
    back = load_index(read_spec(cfg, out), _weight())
    assert torch.equal(back.slot_token, index.slot_token) and back.config.n_probes == 5
    assert back.config.stage1 == "float"
    assert _config(model_dir)["architectures"] == ["LlamaForCausalLM"]  # the source folder is untouched


def test_export_refuses_what_vllm_could_not_serve(model_dir, index, tmp_path):
    cfg = _config(model_dir)
    (model_dir / "config.json").write_text(json.dumps({**cfg, "architectures": ["Phi3ForCausalLM"]}))
    with pytest.raises(ValueError, match="'Phi3ForCausalLM' has no FlashHead variant in vLLM; supported: "):
        export_folder(model_dir, tmp_path / "a", index)
    (model_dir / "config.json").write_text(json.dumps({**cfg, "vocab_size": V + 64}))
    with pytest.raises(AssetError, match=f"built for a vocabulary of {V} tokens but .* has {V + 64}"):
        export_folder(model_dir, tmp_path / "b", index)
    (model_dir / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="--probes 33 is out of range: the index has 32 clusters"):
        export_folder(model_dir, tmp_path / "c", index, n_probes=33)
    export_folder(model_dir, tmp_path / "d", index)
    with pytest.raises(WouldOverwriteError, match="not empty; choose a new folder or pass --force"):
        export_folder(model_dir, tmp_path / "d", index)
    assert not any((tmp_path / x).exists() for x in "abc")


@pytest.fixture
def served(model_dir, index, tmp_path):
    return export_folder(model_dir, tmp_path / "served", index)


@pytest.mark.parametrize("change, match", [
    (dict(n_probes=0), "n_probes must be a positive integer, got 0"),
    (dict(n_probes="8"), "n_probes must be a positive integer, got '8'"),
    (dict(stage1="int2"), "stage1 must be one of float, int8, int4, got 'int2'"),
    (dict(index="elsewhere"), "'flashhead.index' must be 'flashhead'"),
    (dict(probes=4), r"unknown keys \['probes'\]"),
])
def test_bad_settings_in_config_are_refused(served, change, match):
    cfg = _config(served)
    cfg["flashhead"].update(change)
    with pytest.raises(AssetError, match=match):
        read_spec(cfg, served)


def test_what_the_index_does_not_fit_is_refused_at_load(served):
    cfg = _config(served)
    cfg["flashhead"]["n_probes"] = 33
    with pytest.raises(AssetError, match="n_probes 33 is out of range: the index has 32 clusters"):
        load_index(read_spec(cfg, served), _weight())
    cfg = _config(served)
    with pytest.raises(AssetError, match=f"exported for a vocabulary of {V} tokens, but the model served has {V + 64}"):
        load_index(read_spec(cfg, served), _weight(v=V + 64))
    with pytest.raises(AssetError, match="belong to another model"):  # same shape, another head: fingerprint
        load_index(read_spec(cfg, served), _weight(seed=1))
    (served / INDEX_DIR / "index.safetensors").write_bytes(b"garbage")
    with pytest.raises(AssetError, match="not a readable safetensors file"):
        load_index(read_spec(cfg, served), _weight())


def test_a_folder_without_settings_or_assets_is_refused(served):
    with pytest.raises(AssetError, match="no FlashHead settings in config.json"):
        read_spec({"architectures": ["FlashHeadLlamaForCausalLM"]}, served)
    import shutil

    shutil.rmtree(served / INDEX_DIR)
    with pytest.raises(AssetError):
        load_index(read_spec(_config(served), served), _weight())


def test_the_vendor_format_is_read_too(model_dir, index):
    vendor.export(index, model_dir)
    spec = read_spec(_config(model_dir), model_dir)
    assert spec.kind == "vendor" and spec.n_probes == index.config.n_probes
    back = load_index(spec, _weight())
    assert back.num_clusters == index.num_clusters and back.config.always_ids == [3]
    cfg = {**_config(model_dir), "n_probes": 99}
    with pytest.raises(AssetError, match="n_probes 99 is out of range"):
        load_index(read_spec(cfg, model_dir), _weight())
