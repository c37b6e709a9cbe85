"""Interoperability with Embedl's vLLM plugin, through its file format only.

A model folder is served by that plugin when its ``config.json`` has ``"flash_head_cache_dir":
"flash_head_assets"`` (optionally ``"flash_head_special_token_ids"`` and ``"n_probes"``) and an
``architectures`` entry prefixed with ``FlashHead``; ``flash_head_assets/clustering_cache.safetensors``
holds ``centroids`` [d, K] and ``cluster_assignments`` [V] (cluster id of every token, all clusters of
one size). Note the plugin ranks clusters by h against column-normalized centroids, not by h . c as
flashhead does; `flashhead eval` measures what that costs.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file

from ..._io import WouldOverwriteError, atomic_dir, atomic_write_bytes
from ...index import AssetError, FlashHeadIndex, IndexConfig, fingerprint
from ...validate import read_safetensors

ASSETS_DIR = "flash_head_assets"
CACHE_FILE = "clustering_cache.safetensors"
PREFIX = "FlashHead"


def to_vllm_tensors(index: FlashHeadIndex) -> dict[str, torch.Tensor]:
    """The plugin's two tensors for ``index``; rows past the tokenizer fill the empty slots."""
    c = index.config
    slots = index.slot_token.clone()
    empty = (slots < 0).nonzero()
    extra = torch.arange(c.num_tokens, c.vocab_size)
    if empty.shape[0] != extra.numel():
        raise AssetError(
            f"the vLLM plugin needs every cluster to hold exactly {c.cluster_size} of the {c.vocab_size} head rows; "
            f"this index has {empty.shape[0]} empty slots for {extra.numel()} non-token rows. Rebuild with a "
            f"cluster size that divides {c.vocab_size}"
        )
    slots[empty[:, 0], empty[:, 1]] = extra
    assignments = torch.empty(c.vocab_size, dtype=torch.int64)
    assignments[slots.flatten()] = torch.arange(c.num_clusters).repeat_interleave(c.cluster_size)
    return {"centroids": index.centroids.T.contiguous(), "cluster_assignments": assignments}


def parse_model_config(cfg_path: Path, data: bytes) -> dict:
    """The model's config.json (bytes ``data``) as a dict, or a ValueError saying what is wrong with it."""
    try:
        config = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise ValueError(f"{cfg_path} is not valid JSON ({e}); fix or restore the model's config.json") from None
    if not isinstance(config, dict):
        raise ValueError(f"{cfg_path} must hold a JSON object; fix or restore the model's config.json")
    return config


def export(index: FlashHeadIndex, model_dir: str | Path, *, force: bool = False) -> Path:
    """Write the plugin's assets and config keys into a transformers model folder.

    Refuses (without ``force``) when the folder already has FlashHead assets or keys; only the
    FlashHead keys of config.json change, the others keep their values and order. The original
    config.json is kept once, byte for byte, as ``config.json.before-flashhead``. Every file is
    written atomically, and if config.json cannot be written the assets written by this call are
    removed again, so the folder is as before.
    """
    model_dir = Path(model_dir)
    cfg_path = model_dir / "config.json"
    if not cfg_path.is_file():
        raise ValueError(f"{model_dir} is not a model folder (no config.json); give the folder of a saved model")
    original = cfg_path.read_bytes()
    config = parse_model_config(cfg_path, original)
    archs = config.get("architectures")
    if not archs or not isinstance(archs, list) or not all(isinstance(a, str) for a in archs):
        raise ValueError(f"{cfg_path} has no 'architectures' list of class names to prefix with {PREFIX!r}")
    assets = model_dir / ASSETS_DIR
    had_assets = assets.exists()
    if (had_assets or "flash_head_cache_dir" in config) and not force:
        raise WouldOverwriteError(f"{model_dir} already has FlashHead assets or config keys; "
                                  "pass --force to replace them")
    tensors = to_vllm_tensors(index)
    backup = model_dir / "config.json.before-flashhead"
    made_backup = not backup.exists()
    with atomic_dir(assets) as tmp:
        save_file(tensors, str(tmp / CACHE_FILE))
    try:
        if made_backup:
            atomic_write_bytes(backup, original)
        config["architectures"] = [a if a.startswith(PREFIX) else PREFIX + a for a in archs]
        config["flash_head_cache_dir"] = ASSETS_DIR
        config["flash_head_special_token_ids"] = list(index.config.always_ids)
        config["n_probes"] = index.config.n_probes
        atomic_write_bytes(cfg_path, (json.dumps(config, indent=2) + "\n").encode())
    except BaseException:
        if not had_assets:
            shutil.rmtree(assets, ignore_errors=True)
        if made_backup:
            backup.unlink(missing_ok=True)
        raise
    return assets


def import_assets(model_dir: str | Path, weight: torch.Tensor, *, num_tokens: int | None = None) -> FlashHeadIndex:
    """Read a plugin-format model folder into a :class:`FlashHeadIndex` for the head ``weight``.

    The plugin's files carry no fingerprint, so the index is bound to ``weight`` here; its shapes
    must match. Centroids are taken as stored (the plugin's may be normalized).
    """
    model_dir = Path(model_dir)
    path = model_dir / ASSETS_DIR / CACHE_FILE
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
        raise ValueError("weight must be the model's head weight, a [vocab, hidden] tensor")
    try:
        tensors, _ = read_safetensors(path)
        config = parse_model_config(model_dir / "config.json", (model_dir / "config.json").read_bytes())
    except FileNotFoundError as e:
        raise AssetError(f"{model_dir} has no vLLM FlashHead assets ({e.filename} is missing)") from None
    except (OSError, ValueError) as e:
        raise AssetError(f"{path} is not a readable FlashHead clustering cache: {e}") from None
    if set(tensors) != {"centroids", "cluster_assignments"}:
        raise AssetError(f"{path} must hold centroids and cluster_assignments, found {sorted(tensors)}")
    vocab, hidden = weight.shape
    cents = tensors["centroids"].squeeze()  # leading size-1 dimensions are allowed
    assign = tensors["cluster_assignments"]
    if cents.dim() != 2 or cents.shape[0] != hidden or not cents.is_floating_point():
        raise AssetError(f"centroids must be float [{hidden}, K], got {cents.dtype} {list(tensors['centroids'].shape)}")
    if not torch.isfinite(cents).all():
        raise AssetError(f"{path}: centroids hold NaN or Inf")
    k = cents.shape[1]
    if assign.dim() != 1 or assign.shape[0] != vocab or assign.is_floating_point():
        raise AssetError(f"cluster_assignments must be integer [{vocab}], got {assign.dtype} {list(assign.shape)}")
    assign = assign.long()
    if assign.min() < 0 or assign.max() >= k:
        raise AssetError(f"cluster_assignments hold ids outside 0..{k - 1}")
    sizes = torch.bincount(assign, minlength=k)
    if (sizes != sizes[0]).any():
        raise AssetError(f"clusters must all have one size; found sizes from {int(sizes.min())} to {int(sizes.max())}")
    cap = int(sizes[0])
    order = torch.sort(assign, stable=True).indices  # tokens grouped by cluster, ascending id inside
    slots = order.view(k, cap)
    num_tokens = vocab if num_tokens is None else num_tokens
    slots = torch.where(slots < num_tokens, slots, torch.full_like(slots, -1))
    special = config.get("flash_head_special_token_ids", [])
    n_probes = config.get("n_probes", max(1, k // 16))  # the plugin's own default is K/16
    if not isinstance(special, list) or any(type(i) is not int for i in special) or type(n_probes) is not int:
        raise AssetError(f"{model_dir / 'config.json'}: flash_head_special_token_ids must be a list of token ids "
                         f"and n_probes an integer, got {special!r} and {n_probes!r}")
    special = [i for i in special if 0 <= i < num_tokens]
    cfg = IndexConfig(vocab_size=vocab, num_tokens=num_tokens, hidden_size=hidden, num_clusters=k, cluster_size=cap,
                      n_probes=min(max(n_probes, 1), k), always_ids=sorted(set(special)),
                      fingerprint=fingerprint(weight), model=str(model_dir),
                      build={"imported_from": f"vLLM plugin assets in {model_dir}"})
    return FlashHeadIndex(slots.contiguous(), cents.T.float().contiguous(), cfg)
