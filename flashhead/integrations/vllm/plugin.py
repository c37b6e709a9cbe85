"""The ``vllm.general_plugins`` entry point: registers the FlashHead architectures with vLLM.

vLLM calls :func:`register` in every process it starts (API server, engine core, workers), so it
is idempotent. The classes are registered by name (``module:Class``) and imported only when a
folder names one of them. An architecture another plugin registered first (the vendor's uses the
same names) is left to it, with a warning.
"""

from __future__ import annotations

import logging

from .folder import BASES, PREFIX

logger = logging.getLogger("vllm.flashhead")  # vLLM shows plugin log lines only under "vllm."

#: architecture name -> "module:Class" of its FlashHead variant
ARCHITECTURES = {PREFIX + base: f"{__package__}.model:{PREFIX + base}" for base in BASES}


def register() -> None:
    """Register every FlashHead architecture that is not registered yet."""
    from vllm import ModelRegistry

    known = ModelRegistry.get_supported_archs()
    for arch, target in ARCHITECTURES.items():
        if arch not in known:
            ModelRegistry.register_model(arch, target)
            continue
        entry = ModelRegistry.models[arch]
        owner = getattr(entry, "module_name", None) or getattr(getattr(entry, "model_cls", None), "__module__", "?")
        if owner != target.split(":")[0]:
            logger.warning("%s is already registered by another plugin (%s); flashhead's plugin leaves it",
                           arch, owner)
