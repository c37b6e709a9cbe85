import json

import pytest
import torch
from safetensors.torch import load_file

from flashhead.index import AssetError, FlashHeadIndex, build_index, fingerprint
from flashhead.integrations.vllm import vendor as vllm


def _head(v=600, d=24, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(v, d, generator=g)


def _states(n=500, d=24, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g) @ torch.randn(d, d, generator=g)


def test_every_cluster_has_exactly_the_requested_size():
    w = _head()
    index = build_index(w, 16, hidden_states=_states(), progress=False)
    assert index.slot_token.shape == (38, 16)  # ceil(600 / 16)
    real = index.slot_token[index.slot_token >= 0]
    assert real.numel() == 600 and torch.unique(real).numel() == 600
    assert int((index.slot_token < 0).sum()) == 38 * 16 - 600


def test_padding_rows_never_enter_the_index():
    w = _head(640)
    index = build_index(w, 16, num_tokens=610, progress=False)
    real = index.slot_token[index.slot_token >= 0]
    assert real.max() < 610 and real.numel() == 610
    assert index.config.vocab_size == 640 and index.config.num_tokens == 610


def test_same_seed_same_bytes(tmp_path):
    w, h = _head(), _states()
    a = build_index(w, 8, hidden_states=h, seed=3, progress=False).save(tmp_path / "a")
    b = build_index(w, 8, hidden_states=h, seed=3, progress=False).save(tmp_path / "b")
    assert (a / "index.safetensors").read_bytes() == (b / "index.safetensors").read_bytes()
    ja, jb = (json.loads((p / "flashhead.json").read_text()) for p in (a, b))
    for j in (ja, jb):  # timings differ between runs; everything else is the same
        j["build"] = {k: v for k, v in j["build"].items() if not k.startswith("seconds")}
    assert ja == jb


def test_save_load_round_trip(tmp_path):
    w = _head()
    index = build_index(w, 16, always_ids=[5, 1], progress=False)
    loaded = FlashHeadIndex.load(index.save(tmp_path / "assets"), weight=w)
    assert torch.equal(loaded.slot_token, index.slot_token)
    assert torch.equal(loaded.centroids, index.centroids)
    assert loaded.config == index.config and loaded.config.always_ids == [1, 5]


def test_assets_of_one_model_are_refused_on_another(tmp_path):
    w = _head()
    folder = build_index(w, 16, model_name="model-A", progress=False).save(tmp_path / "a")
    with pytest.raises(AssetError, match=r"belong to another model \(model-A\)"):
        FlashHeadIndex.load(folder, weight=_head(seed=7))
    with pytest.raises(AssetError, match=r"built for a head of shape \(600, 24\) \(model-A\)"):
        FlashHeadIndex.load(folder, weight=_head(601))


def test_fingerprint_ignores_dtype_but_not_values():
    w = _head()
    assert fingerprint(w) == fingerprint(w.to(torch.bfloat16)) == fingerprint(w.half())
    w2 = w.clone()
    w2[::7] += 0.5
    assert fingerprint(w2) != fingerprint(w)


def test_centroids_are_cluster_means():
    w = _head()
    index = build_index(w, 16, progress=False)
    k = 3
    members = index.slot_token[k][index.slot_token[k] >= 0]
    assert torch.allclose(index.centroids[k], w[members].mean(0), atol=1e-6)


@pytest.mark.parametrize("bad, match", [(1, "cluster_size must be an integer from 2"), (400, "from 2 to 300"),
                                        (16.0, "cluster_size must be an integer")])
def test_unworkable_cluster_sizes(bad, match):
    with pytest.raises(ValueError, match=match):
        build_index(_head(), bad, progress=False)


def test_vllm_layout_keys_shapes_dtypes(tmp_path):
    w = _head(640)
    index = build_index(w, 16, always_ids=[2], progress=False)
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    (model_dir / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"], "vocab_size": 640}))
    vllm.export(index, model_dir)
    tensors = load_file(str(model_dir / "flash_head_assets" / "clustering_cache.safetensors"))
    assert set(tensors) == {"centroids", "cluster_assignments"}
    assert tensors["centroids"].shape == (24, 40) and tensors["centroids"].dtype == torch.float32
    assign = tensors["cluster_assignments"]
    assert assign.shape == (640,) and assign.dtype == torch.int64
    assert torch.bincount(assign).tolist() == [16] * 40
    config = json.loads((model_dir / "config.json").read_text())
    assert config["architectures"] == ["FlashHeadLlamaForCausalLM"]
    assert config["flash_head_cache_dir"] == "flash_head_assets"
    assert config["flash_head_special_token_ids"] == [2] and config["n_probes"] == index.config.n_probes
    with pytest.raises(FileExistsError, match="--force"):
        vllm.export(index, model_dir)
    back = vllm.import_assets(model_dir, w)
    assert torch.equal(back.slot_token, torch.sort(index.slot_token, dim=1).values)
    assert torch.equal(back.centroids, index.centroids)


def test_default_setting_is_calibrated_on_the_calibration_states():
    """The frequent dense argmax tokens are always scored, the default probe count fills the byte budget,
    and the recorded need is the smallest count that contains the argmax on DEFAULT_CONTAINMENT of the
    calibration states (checked here with the head itself)."""
    from flashhead.head import FlashHead
    from flashhead.index import DEFAULT_CONTAINMENT

    w, h = _head(1200, 24), _states(2000, 24)
    index = build_index(w, 8, hidden_states=h, frequent=5, progress=False)
    top = (h @ w.T).argmax(1)
    common = torch.bincount(top, minlength=1200).argsort(descending=True, stable=True)[:5]
    assert set(common.tolist()) <= set(index.config.always_ids)
    defaults = index.config.build["defaults"]
    slot = index.slot_token
    rows = w[slot.clamp_min(0)] * (slot >= 0).unsqueeze(-1)

    def containment(p):
        head = FlashHead(rows, slot, index.centroids, out_features=1200, n_probes=p, always_ids=index.config.always_ids)
        ids, _ = head.candidates(h, head.select_clusters(h))
        return float((ids == top.unsqueeze(1)).any(1).double().mean())  # exact for n = 2000

    p, need = index.config.n_probes, defaults["probes_needed"]
    assert p == defaults["probes_max_in_budget"]  # the default fills the byte budget
    assert containment(need) >= DEFAULT_CONTAINMENT  # the recorded need is the smallest p reaching the target
    if need > 1:
        assert containment(need - 1) < DEFAULT_CONTAINMENT
    assert containment(p) == pytest.approx(defaults["calibration_containment_at_default"][0])


def test_validation_states_can_only_raise_the_recorded_need():
    """Every calibration text's states are checked: the recorded need is the largest per-text need, and
    states that the clustering never saw (another seed's draw) need at least as many probes here; the
    default probe count is the budget's either way."""
    w, h = _head(1200, 24), _states(2000, 24)
    alone = build_index(w, 8, hidden_states=h, frequent=5, progress=False)
    other = _states(2000, 24, seed=5)
    both = build_index(w, 8, hidden_states=h, validation_states=[other], frequent=5, progress=False)
    assert torch.equal(alone.slot_token, both.slot_token) and alone.config.always_ids == both.config.always_ids
    d = both.config.build["defaults"]
    assert d["probes_needed_per_text"][0] == alone.config.build["defaults"]["probes_needed"]
    assert d["probes_needed"] == max(d["probes_needed_per_text"]) >= alone.config.build["defaults"]["probes_needed"]
    assert both.config.n_probes == d["probes_max_in_budget"] == alone.config.n_probes
    with pytest.raises(ValueError, match=r"validation_states\[0\] must be finite \[n, 24\]"):
        build_index(w, 8, hidden_states=h, validation_states=[other[:, :5]], progress=False)


def test_default_probes_fill_the_byte_budget_of_the_default_stage1():
    """Small vocabularies default to int4 stage 1; the probe cap is the largest p whose bytes per step (as the
    head counts them) stay within DEFAULT_BYTES_BUDGET of the dense fp32 head, for each stage-1 precision."""
    from flashhead.head import FlashHead
    from flashhead.index import DEFAULT_BYTES_BUDGET, default_cluster_size, default_stage1

    assert (default_cluster_size(49152), default_stage1(49152)) == (2, "int4")
    assert (default_cluster_size(262144), default_stage1(262144)) == (16, "int8")
    w, h = _head(1200, 24), _states(2000, 24)
    dense_bytes = 1200 * 24 * 4
    caps = {}
    for stage1 in (None, "int8"):
        index = build_index(w, 8, hidden_states=h, frequent=5, stage1=stage1, progress=False)
        mode = index.config.stage1
        assert mode == (stage1 or "int4")
        p_max = index.config.build["defaults"]["probes_max_in_budget"]
        head = FlashHead(w[index.slot_token].contiguous(), index.slot_token, index.centroids, out_features=1200,
                         n_probes=1, always_ids=index.config.always_ids, stage1=mode)
        assert head.nbytes_per_step(p_max) <= DEFAULT_BYTES_BUDGET * dense_bytes < head.nbytes_per_step(p_max + 1)
        assert index.config.n_probes == p_max
        caps[mode] = p_max
    assert caps["int4"] > caps["int8"]
    with pytest.raises(ValueError, match="stage1 must be one of"):
        build_index(w, 8, hidden_states=h, stage1="int2", progress=False)


def test_rows_cap_holds_only_where_the_calibration_texts_reach_the_target():
    """With a Q8_0 head the byte budget allows more probes than DEFAULT_ROWS_BUDGET's rows: the default keeps the
    rows cap where the calibration states, all sets together, keep DEFAULT_ROWS_CAP_CONTAINMENT within it, else takes
    the byte budget's."""
    from flashhead.index import DEFAULT_ROWS_CAP_CONTAINMENT

    g = torch.Generator().manual_seed(3)
    w = torch.randn(1200, 1, 32, generator=g)
    amax = w.abs().amax(-1, keepdim=True)
    w = ((torch.round(w * (127 / amax)) + 0.0) * (amax / 127).half().float()).view(1200, 32)  # exactly Q8_0
    spread = _states(2000, 32)
    easy = w[torch.arange(2000) % 3] * 10  # the argmax is one of 3 tokens, always scored: 1 probe suffices
    for h, capped in ((easy, True), (spread, False)):
        d = build_index(w, 8, hidden_states=h, frequent=5, progress=False).config
        defaults = d.build["defaults"]
        assert d.stage2 == "q8_0" and defaults["probes_max_in_bytes"] > defaults["probes_max_in_rows"]
        assert (defaults["containment_at_rows_cap"] >= DEFAULT_ROWS_CAP_CONTAINMENT) == capped
        assert d.n_probes == (defaults["probes_max_in_rows"] if capped else
                              min(d.num_clusters, defaults["probes_max_in_bytes"]))
        assert ("not capped" in defaults["rule"]) != capped


def test_shrinkage_mixes_the_geometry_with_its_scaled_identity():
    w, h = _head(), _states()
    plain = build_index(w, 8, hidden_states=h, progress=False)
    assert torch.equal(build_index(w, 8, hidden_states=h, shrinkage=0.0, progress=False).slot_token, plain.slot_token)
    # shrinkage 1 is the identity geometry: the same partition as states whose E[h h^T] is a multiple of I
    iso = torch.eye(24).repeat(3, 1) * 5.0
    full = build_index(w, 8, hidden_states=h, shrinkage=1.0, progress=False)
    assert torch.equal(full.slot_token, build_index(w, 8, hidden_states=iso, progress=False).slot_token)
    assert not torch.equal(full.slot_token, plain.slot_token)
    assert "shrunk by 1 towards I" in full.config.build["geometry"]
    rows = build_index(w, 8, hidden_states=h, shrinkage=1.0, shrink_to="rows", progress=False)
    assert torch.equal(rows.slot_token, build_index(w, 8, hidden_states=w, progress=False).slot_token)  # E[w w^T]
    for bad in (-0.1, 1.5, True, "0.2"):
        with pytest.raises(ValueError, match="shrinkage must be a number from 0"):
            build_index(w, 8, hidden_states=h, shrinkage=bad, progress=False)
    with pytest.raises(ValueError, match="shrink_to must be 'identity' or 'rows'"):
        build_index(w, 8, hidden_states=h, shrinkage=0.5, shrink_to="sphere", progress=False)
