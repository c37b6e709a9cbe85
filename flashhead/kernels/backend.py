"""Which backend computes a step on a given device: Triton on CUDA, the torch reference elsewhere.

``FLASHHEAD_KERNELS`` overrides the choice: ``reference`` anywhere (to compare or to debug), ``triton`` on
CUDA, or on CPU tensors under ``TRITON_INTERPRET=1`` (Triton's interpreter, how CI runs the kernels).
On a CUDA device without an importable Triton the reference runs instead, after one warning.
"""

from __future__ import annotations

import functools
import os
import warnings
from dataclasses import dataclass
from typing import Callable

import torch

from . import reference

__all__ = ["Backend", "backend_for", "triton_backend"]

ENV = "FLASHHEAD_KERNELS"
_CHOICES = ("", "auto", "reference", "triton")


@dataclass(frozen=True)
class Backend:
    """One implementation of each step (signatures as in :mod:`flashhead.kernels.reference`)."""

    name: str
    stage1_scores: Callable
    cluster_logits: Callable
    greedy: Callable


REFERENCE = Backend("reference", reference.stage1_scores, reference.cluster_logits, reference.greedy)


@functools.cache
def triton_backend() -> Backend | None:
    """The Triton backend, or None when Triton cannot be imported."""
    try:
        from . import triton_stage1, triton_stage2
    except ImportError:
        return None
    return Backend("triton", triton_stage1.stage1_scores, triton_stage2.cluster_logits, triton_stage2.greedy)


@functools.cache
def _warn_no_triton() -> None:
    warnings.warn("flashhead: triton is not importable, so FlashHead on CUDA runs its torch reference kernels "
                  "(correct, several times slower); pip install triton", RuntimeWarning, stacklevel=3)


def backend_for(device: torch.device) -> Backend:
    """The backend that runs the kernels for tensors on ``device`` (see the module docstring)."""
    choice = os.environ.get(ENV, "").strip().lower()
    if choice not in _CHOICES:
        raise ValueError(f"{ENV} must be one of reference, triton or auto, got {choice!r}")
    if choice == "reference":
        return REFERENCE
    if choice == "triton":
        if device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
            raise ValueError(f"{ENV}=triton on {device.type} tensors needs TRITON_INTERPRET=1 (Triton's interpreter)")
        backend = triton_backend()
        if backend is None:
            raise ValueError(f"{ENV}=triton but triton is not importable; pip install triton")
        return backend
    if device.type != "cuda":
        return REFERENCE
    backend = triton_backend()
    if backend is None:
        _warn_no_triton()
        return REFERENCE
    return backend
