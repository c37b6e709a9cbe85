"""Reading FlashHead assets defensively: every way a file can be wrong gets a clear AssetError.

Assets are read only through safetensors and JSON, never pickle, so a file cannot execute code on
load; anything else (a pickle, truncated bytes, a hand-edited JSON) is refused with the reason. The
checksum in ``flashhead.json`` (written by :meth:`FlashHeadIndex.save`) catches the damage that
still parses, such as a flipped bit in a centroid; assets saved before checksums existed are
checked for structure only.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors

from .assets import CONFIG_FILE, FORMAT_VERSION, TENSORS_FILE, AssetError, IndexConfig, checksum
from .head import STAGE1_MODES

_INT_FIELDS = ("vocab_size", "num_tokens", "hidden_size", "num_clusters", "cluster_size", "n_probes", "format_version")
_CHECKSUM = re.compile(r"sha256:[0-9a-f]{64}")
#: how pickles start: protocol 2+ opcode PROTO, or the zip archive torch.save writes
_PICKLE_MAGIC = (b"\x80", b"PK\x03\x04")
#: what a malformed safetensors file can raise while being parsed
_PARSE_ERRORS = (SafetensorError, ValueError, RuntimeError, TypeError, OverflowError, KeyError)


def _fail(folder: Path, what: str) -> AssetError:
    return AssetError(f"FlashHead assets in {folder} are not usable: {what}; rebuild them with `flashhead build`")


def refuse_pickle(data: bytes, path: Path) -> str | None:
    """Why ``data`` (the bytes of ``path``) must not be read, if it is a pickle or a torch.save file."""
    if data.startswith(_PICKLE_MAGIC):
        return (f"{path.name} is a pickle or torch.save file, not safetensors; flashhead never unpickles files "
                "(unpickling can run arbitrary code)")
    return None


def read_safetensors(path: Path) -> tuple[dict[str, torch.Tensor], bytes]:
    """The tensors of a safetensors file and its raw bytes; ValueError with the reason if they do not
    parse (OSError if the file cannot be read)."""
    data = path.read_bytes()
    why = refuse_pickle(data, path)
    if why:
        raise ValueError(why)
    try:
        return load_safetensors(data), data
    except _PARSE_ERRORS as e:
        raise ValueError(f"{path.name} is not a readable safetensors file ({e})") from None


def _read_config(folder: Path) -> tuple[IndexConfig, str | None]:
    """The index config and its checksum (None for assets saved before checksums existed)."""
    path = folder / CONFIG_FILE
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise _fail(folder, f"{CONFIG_FILE} is missing") from None
    except OSError as e:
        raise _fail(folder, f"{CONFIG_FILE} cannot be read ({e})") from None
    why = refuse_pickle(data, path)
    if why:
        raise _fail(folder, why)
    try:
        raw = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise _fail(folder, f"{CONFIG_FILE} is not valid JSON ({e})") from None
    if not isinstance(raw, dict):
        raise _fail(folder, f"{CONFIG_FILE} must hold a JSON object")
    missing = [f for f in (*_INT_FIELDS, "always_ids", "fingerprint") if f not in raw]
    if missing:
        raise _fail(folder, f"{CONFIG_FILE} lacks {', '.join(missing)}")
    for f in _INT_FIELDS:
        if type(raw[f]) is not int or raw[f] < 1:  # bool is not int here
            raise _fail(folder, f"{CONFIG_FILE}: {f} must be a positive integer, got {raw[f]!r}")
    if raw["format_version"] != FORMAT_VERSION:
        older = " (written by an older flashhead)" if raw["format_version"] < FORMAT_VERSION else ""
        raise _fail(folder, f"format version {raw['format_version']}{older} is not {FORMAT_VERSION}, the one this flashhead reads")
    ids = raw["always_ids"]
    if not isinstance(ids, list) or any(type(i) is not int or not 0 <= i < raw["num_tokens"] for i in ids):
        raise _fail(folder, f"always_ids must be a list of token ids in 0..{raw['num_tokens'] - 1}")
    if not isinstance(raw["fingerprint"], str):
        raise _fail(folder, "fingerprint must be a string")
    if raw.get("stage1", "int8") not in STAGE1_MODES:
        raise _fail(folder, f"stage1 must be one of {', '.join(STAGE1_MODES)}, got {raw['stage1']!r}")
    if raw.get("stage2", "float") not in ("float", "q8_0"):
        raise _fail(folder, f"stage2 must be 'float' or 'q8_0', got {raw['stage2']!r}")
    digest = raw.pop("checksum", None)
    if digest is not None and (not isinstance(digest, str) or not _CHECKSUM.fullmatch(digest)):
        raise _fail(folder, f"checksum must be 'sha256:' and 64 hex digits, got {digest!r}")
    known = set(IndexConfig.__dataclass_fields__)
    extra = set(raw) - known
    if extra:
        raise _fail(folder, f"{CONFIG_FILE} has unknown keys {sorted(extra)}")
    if not isinstance(raw.get("build", {}), dict) or not isinstance(raw.get("model", ""), str):
        raise _fail(folder, "'build' must be an object and 'model' a string")
    return IndexConfig(**raw), digest


def read_assets(folder: Path) -> tuple[torch.Tensor, torch.Tensor, IndexConfig]:
    """``(slot_token, centroids, config)`` of an index folder written by :meth:`FlashHeadIndex.save`,
    checked; :meth:`FlashHeadIndex.load` is the way callers read an index."""
    if not folder.is_dir():
        raise AssetError(f"no FlashHead assets at {folder}: build them with `flashhead build MODEL --out {folder}`")
    c, digest = _read_config(folder)
    path = folder / TENSORS_FILE
    if not path.is_file():
        raise _fail(folder, f"{TENSORS_FILE} is missing")
    try:
        tensors, data = read_safetensors(path)
    except (OSError, ValueError) as e:
        raise _fail(folder, str(e)) from None
    if set(tensors) != {"slot_token", "centroids"}:
        raise _fail(folder, f"{TENSORS_FILE} must hold exactly slot_token and centroids, found {sorted(tensors)}")
    slots, cents = tensors["slot_token"], tensors["centroids"]
    k, cap, d = c.num_clusters, c.cluster_size, c.hidden_size
    if slots.dtype != torch.int64 or tuple(slots.shape) != (k, cap):
        raise _fail(folder, f"slot_token must be int64 [{k}, {cap}], got {slots.dtype} {list(slots.shape)}")
    if cents.dtype != torch.float32 or tuple(cents.shape) != (k, d):
        raise _fail(folder, f"centroids must be float32 [{k}, {d}], got {cents.dtype} {list(cents.shape)}")
    if not torch.isfinite(cents).all():
        raise _fail(folder, "centroids hold NaN or Inf")
    if c.num_tokens > c.vocab_size or not (k - 1) * cap < c.num_tokens <= k * cap:
        raise _fail(folder, f"{c.num_tokens} tokens do not fit {k} clusters of {cap} (vocab {c.vocab_size})")
    if not 1 <= c.n_probes <= k:
        raise _fail(folder, f"n_probes {c.n_probes} is outside 1..{k}")
    real = slots[slots >= 0]
    if (slots < -1).any() or (real >= c.num_tokens).any():
        raise _fail(folder, f"slot_token holds ids outside -1..{c.num_tokens - 1}")
    if real.numel() != c.num_tokens or torch.unique(real).numel() != c.num_tokens:
        raise _fail(folder, f"slot_token must list each of the {c.num_tokens} tokens exactly once "
                            f"(found {real.numel()} ids, {torch.unique(real).numel()} distinct)")
    if digest is not None and digest != checksum(c, hashlib.sha256(data).hexdigest()):
        raise _fail(folder, f"{TENSORS_FILE} or {CONFIG_FILE} changed after they were written (checksum mismatch): "
                            "the files are damaged or were edited")
    return slots, cents, c
