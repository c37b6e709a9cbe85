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
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .._io import atomic_dir, atomic_write_json
from ..index import AssetError, FlashHeadIndex, IndexConfig, fingerprint

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


def export(index: FlashHeadIndex, model_dir: str | Path, *, force: bool = False) -> Path:
    """Write the plugin's assets and config keys into a transformers model folder.

    Refuses (without ``force``) when the folder already has FlashHead assets or keys. The original
    config.json is kept once as ``config.json.before-flashhead``; every file is written atomically.
    """
    model_dir = Path(model_dir)
    cfg_path = model_dir / "config.json"
    if not cfg_path.is_file():
        raise ValueError(f"{model_dir} is not a model folder (no config.json); give the folder of a saved model")
    config = json.loads(cfg_path.read_text())
    archs = config.get("architectures") or []
    if not archs:
        raise ValueError(f"{cfg_path} has no 'architectures' entry to prefix with {PREFIX!r}")
    already = (model_dir / ASSETS_DIR).exists() or "flash_head_cache_dir" in config
    if already and not force:
        raise FileExistsError(f"{model_dir} already has FlashHead assets or config keys; pass --force to replace them")
    tensors = to_vllm_tensors(index)
    with atomic_dir(model_dir / ASSETS_DIR) as tmp:
        save_file(tensors, str(tmp / CACHE_FILE))
    backup = model_dir / "config.json.before-flashhead"
    if not backup.exists():
        atomic_write_json(backup, config)
    config["architectures"] = [a if a.startswith(PREFIX) else PREFIX + a for a in archs]
    config["flash_head_cache_dir"] = ASSETS_DIR
    config["flash_head_special_token_ids"] = list(index.config.always_ids)
    config["n_probes"] = index.config.n_probes
    atomic_write_json(cfg_path, config)
    return model_dir / ASSETS_DIR


def import_assets(model_dir: str | Path, weight: torch.Tensor, *, num_tokens: int | None = None) -> FlashHeadIndex:
    """Read a plugin-format model folder into a :class:`FlashHeadIndex` for the head ``weight``.

    The plugin's files carry no fingerprint, so the index is bound to ``weight`` here; its shapes
    must match. Centroids are taken as stored (the plugin's may be normalized).
    """
    model_dir = Path(model_dir)
    path = model_dir / ASSETS_DIR / CACHE_FILE
    try:
        tensors = load_file(str(path))
        config = json.loads((model_dir / "config.json").read_text())
    except FileNotFoundError as e:
        raise AssetError(f"{model_dir} has no vLLM FlashHead assets ({e.filename} is missing)") from None
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise AssetError(f"{path} is not a readable FlashHead clustering cache ({e})") from None
    if set(tensors) != {"centroids", "cluster_assignments"}:
        raise AssetError(f"{path} must hold centroids and cluster_assignments, found {sorted(tensors)}")
    vocab, hidden = weight.shape
    cents = tensors["centroids"].squeeze()  # leading size-1 dimensions are allowed
    assign = tensors["cluster_assignments"]
    if cents.dim() != 2 or cents.shape[0] != hidden or not cents.is_floating_point():
        raise AssetError(f"centroids must be float [{hidden}, K], got {cents.dtype} {list(tensors['centroids'].shape)}")
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
    special = [int(i) for i in config.get("flash_head_special_token_ids", []) if 0 <= int(i) < num_tokens]
    n_probes = int(config.get("n_probes", max(1, k // 16)))  # the plugin's own default is K/16
    cfg = IndexConfig(vocab_size=vocab, num_tokens=num_tokens, hidden_size=hidden, num_clusters=k, cluster_size=cap,
                      n_probes=min(max(n_probes, 1), k), always_ids=special, fingerprint=fingerprint(weight),
                      model=str(model_dir), build={"imported_from": f"vLLM plugin assets in {model_dir}"})
    return FlashHeadIndex(slots.contiguous(), cents.T.float().contiguous(), cfg)
