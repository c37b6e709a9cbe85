"""The servable model folder of flashhead's vLLM plugin: writing it, and reading its settings back.

A servable folder is an ordinary transformers model folder (weights, tokenizer, ``config.json``) plus

- ``flashhead/``: the index in flashhead's own format (:meth:`FlashHeadIndex.save`; the same
  sub-folder :func:`flashhead.integrations.transformers.from_pretrained` applies);
- in ``config.json``: ``"architectures": ["FlashHead<Base>"]`` (vLLM picks the plugin's class by
  it) and a ``"flashhead"`` block: ``{"index": "flashhead", "n_probes": p, "stage1": "int8",
  "vocab_size": V}``.

Folders written for the vendor's plugin (``"flash_head_cache_dir"``, see :mod:`.vendor`) are read
too. Everything a folder says is checked before anything is served: the architecture has a FlashHead
variant, the probes lie in 1..K, the index was built for this vocabulary and this head (fingerprint).
Nothing here imports vLLM.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..._io import WouldOverwriteError, atomic_dir
from ...head import STAGE1_MODES
from ...index import AssetError, FlashHeadIndex
from . import vendor

#: vLLM architectures that have a FlashHead variant (``FlashHead`` + name)
BASES = ("LlamaForCausalLM", "Gemma3ForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM")
PREFIX = vendor.PREFIX
CONFIG_KEY = "flashhead"  # the block in config.json
INDEX_DIR = "flashhead"  # the index sub-folder (transformers.ASSETS_SUBDIR)
_NOT_COPIED = {"config.json", "config.json.before-flashhead", "flashhead-manifest.json"}


@dataclass(frozen=True)
class ServingSpec:
    """What a model folder's config asks of the plugin."""

    kind: str  # "flashhead" (our index) or "vendor" (the vendor's clustering cache)
    model_dir: Path
    n_probes: int | None  # None: the index's default
    stage1: str | None  # None: the index's default
    vocab_size: int | None  # the vocabulary the folder was exported for (flashhead kind)


def flashhead_architecture(architectures: Any) -> str:
    """``FlashHead<Base>`` for a config's ``architectures`` list; ValueError when no FlashHead variant exists."""
    if not isinstance(architectures, list) or not architectures or not all(isinstance(a, str) for a in architectures):
        raise ValueError(f"config.json has no 'architectures' list (got {architectures!r}); give a causal LM folder")
    base = architectures[0].removeprefix(PREFIX)
    if base not in BASES:
        raise ValueError(f"architecture {architectures[0]!r} has no FlashHead variant in vLLM; supported: "
                         f"{', '.join(BASES)}")
    return PREFIX + base


def _check_probes(value: Any, where: str) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise AssetError(f"{where}: n_probes must be a positive integer, got {value!r}; fix config.json or "
                         "export the folder again")
    return value


def read_spec(config: Mapping[str, Any], model_dir: str | Path) -> ServingSpec:
    """The plugin's settings from a model's config (a dict, or vLLM's ``hf_config``) and its folder.

    Our ``flashhead`` block wins over the vendor's keys; a folder with neither is an error.
    """
    model_dir = Path(model_dir)
    where = f"{model_dir / 'config.json'}"
    block = config.get(CONFIG_KEY)
    if block is not None:
        if not isinstance(block, Mapping):
            raise AssetError(f"{where}: '{CONFIG_KEY}' must be an object, got {block!r}")
        unknown = sorted(set(block) - {"index", "n_probes", "stage1", "vocab_size"})
        if unknown:
            raise AssetError(f"{where}: unknown keys {unknown} in '{CONFIG_KEY}'; allowed: index, n_probes, stage1, "
                             "vocab_size")
        if block.get("index", INDEX_DIR) != INDEX_DIR:
            raise AssetError(f"{where}: '{CONFIG_KEY}.index' must be {INDEX_DIR!r} (the index sub-folder), got "
                             f"{block.get('index')!r}")
        stage1 = block.get("stage1")
        if stage1 is not None and stage1 not in STAGE1_MODES:
            raise AssetError(f"{where}: stage1 must be one of {', '.join(STAGE1_MODES)}, got {stage1!r}")
        vocab = block.get("vocab_size")
        if vocab is not None and (isinstance(vocab, bool) or not isinstance(vocab, int)):
            raise AssetError(f"{where}: vocab_size must be an integer, got {vocab!r}")
        return ServingSpec("flashhead", model_dir, _check_probes(block.get("n_probes"), where), stage1, vocab)
    if config.get("flash_head_cache_dir") is not None:
        if config["flash_head_cache_dir"] != vendor.ASSETS_DIR:
            raise AssetError(f"{where}: flash_head_cache_dir must be {vendor.ASSETS_DIR!r}, got "
                             f"{config['flash_head_cache_dir']!r}")
        return ServingSpec("vendor", model_dir, _check_probes(config.get("n_probes"), where), None, None)
    raise AssetError(f"{model_dir} has a FlashHead architecture but no FlashHead settings in config.json (no "
                     f"'{CONFIG_KEY}' block); write the folder with `flashhead export-vllm MODEL --out FOLDER`")


def load_index(spec: ServingSpec, weight: torch.Tensor) -> FlashHeadIndex:
    """The index ``spec`` names, checked against the served head ``weight`` [V, d] (token order).

    The probe count and stage 1 of the config replace the index's defaults.
    """
    vocab = weight.shape[0]
    if spec.kind == "vendor":
        index = vendor.import_assets(spec.model_dir, weight)
    else:
        if spec.vocab_size is not None and spec.vocab_size != vocab:
            raise AssetError(f"{spec.model_dir} was exported for a vocabulary of {spec.vocab_size} tokens, but the "
                             f"model served has {vocab}; export the folder again for this model")
        index = FlashHeadIndex.load(spec.model_dir / INDEX_DIR, weight=weight)
    c = index.config
    if spec.n_probes is not None:
        if spec.n_probes > c.num_clusters:
            raise AssetError(f"{spec.model_dir / 'config.json'}: n_probes {spec.n_probes} is out of range: the index "
                             f"has {c.num_clusters} clusters (use 1..{c.num_clusters})")
        c.n_probes = spec.n_probes
    if spec.stage1 is not None:
        c.stage1 = spec.stage1
    return index


def _link_or_copy(src: Path, dst: Path) -> None:
    """Hard-link ``src`` (weights are large and never edited in place), or copy it across file systems."""
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def export_folder(model_dir: str | Path, out: str | Path, index: FlashHeadIndex, *, n_probes: int | None = None,
                  stage1: str | None = None, force: bool = False) -> Path:
    """Write a folder that ``vllm serve`` / ``LLM()`` runs with FlashHead: the files of the transformers
    folder ``model_dir``, ``index`` under ``flashhead/``, and config.json with the FlashHead architecture.

    ``index`` must belong to the model (checked by the caller against its head weight). ``out`` is
    written atomically and must be new or empty unless ``force``.
    """
    model_dir, out = Path(model_dir), Path(out)
    config = vendor.parse_model_config(model_dir / "config.json", (model_dir / "config.json").read_bytes())
    arch = flashhead_architecture(config.get("architectures"))
    c = index.config
    if config.get("vocab_size", c.vocab_size) != c.vocab_size:
        raise AssetError(f"the index was built for a vocabulary of {c.vocab_size} tokens but {model_dir} has "
                         f"{config['vocab_size']}; build an index for this model with `flashhead build`")
    p = _check_probes(n_probes, "--probes")
    if p is not None and p > c.num_clusters:
        raise ValueError(f"--probes {p} is out of range: the index has {c.num_clusters} clusters (use 1..{c.num_clusters})")
    if stage1 is not None and stage1 not in STAGE1_MODES:
        raise ValueError(f"stage1 must be one of {', '.join(STAGE1_MODES)}, got {stage1!r}")
    if out.resolve() == model_dir.resolve():
        raise ValueError(f"--out must be a new folder, not the model folder {model_dir}")
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not force:
        raise WouldOverwriteError(f"{out} exists and is not empty; choose a new folder or pass --force to replace it")
    for key in ("flash_head_cache_dir", "flash_head_special_token_ids", "n_probes"):
        config.pop(key, None)  # a vendor export in the source folder: ours replaces it
    config["architectures"] = [arch]
    config[CONFIG_KEY] = {"index": INDEX_DIR, "n_probes": p or c.n_probes, "stage1": stage1 or c.stage1,
                          "vocab_size": c.vocab_size}
    with atomic_dir(out) as tmp:
        for f in sorted(model_dir.iterdir()):
            if f.is_file() and f.name not in _NOT_COPIED:
                _link_or_copy(f, tmp / f.name)
        index.save(tmp / INDEX_DIR)
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    return out
