"""The index's format on disk: file names, format version, ``IndexConfig``, checksum, ``AssetError``.

Its own module so that the builder (``index.py``) and the defensive reader (``validate.py``) share
the format without importing each other: index -> validate -> assets.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field

FORMAT_VERSION = 3  # 2: adds ``stage1`` (the stage-1 precision the default setting is calibrated for);
#                     3: adds ``stage2`` (the head is exactly Q8_0, so stage 2 reads int8 rows)
TENSORS_FILE = "index.safetensors"
CONFIG_FILE = "flashhead.json"
#: fields of IndexConfig that only inform (edits to them are allowed); all others are checksummed
INFORMATIONAL_FIELDS = ("model", "build")


class AssetError(ValueError):
    """Assets on disk are missing, damaged, or belong to another model."""


@dataclass
class IndexConfig:
    """Everything about an index that is not a tensor (saved as plain JSON)."""

    vocab_size: int  # rows of the head = width of its logits
    num_tokens: int  # rows that are real tokens (<= vocab_size); the rest are never returned
    hidden_size: int
    num_clusters: int
    cluster_size: int
    n_probes: int  # default probe count
    always_ids: list[int]  # token ids scored at every step (EOS, ...)
    fingerprint: str  # of the head weights the index was built from
    stage1: str = "int8"  # default stage-1 precision (n_probes is calibrated for its bytes)
    stage2: str = "float"  # "q8_0": the head is exactly int8 * fp16 scale per 32 weights (n_probes counts those bytes)
    model: str = ""  # human-readable name of that model, for error messages
    build: dict = field(default_factory=dict)  # parameters, calibration, objective, timings
    format_version: int = FORMAT_VERSION


def checksum(config: IndexConfig, tensors_sha256: str) -> str:
    """``sha256:...`` of the config fields that change results and of the tensor file's sha256."""
    fields = {k: v for k, v in asdict(config).items() if k not in INFORMATIONAL_FIELDS}
    fields["tensors_sha256"] = tensors_sha256
    return "sha256:" + hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()
