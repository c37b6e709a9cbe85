"""The vLLM plugin's tests: they run in the vLLM environment (.venv-vllm; `make test` runs them there).

In an environment without vLLM (the main .venv) this folder is not collected, and the header of the
run says so. Each module starts one engine and stops it before the next module starts its own
(helpers: vllm_helpers.py).
"""

from __future__ import annotations

import importlib.util
import os
import tempfile

import pytest

# This folder is itself a namespace package named "vllm" on pytest's path: only a real package (one with
# an origin file) counts.
_spec = importlib.util.find_spec("vllm")
HAVE_VLLM = _spec is not None and _spec.origin is not None
if not HAVE_VLLM:
    collect_ignore_glob = ["test_*.py"]

# One process, fast start (../shared/engines.md): no engine-core subprocess, no core pinning, a small
# KV cache, and nothing fetched from a hub.
os.environ.update(VLLM_ENABLE_V1_MULTIPROCESSING="0", VLLM_CPU_OMP_THREADS_BIND="nobind", HF_HUB_OFFLINE="1",
                  VLLM_CPU_KVCACHE_SPACE="1")
os.environ.setdefault("VLLM_CACHE_ROOT", tempfile.mkdtemp(prefix="flashhead-vllm-cache-"))


@pytest.fixture(scope="session")
def gemma_folder(tmp_path_factory):
    """Gemma-3-270M's servable folder, exported once per session (read only: every module's engine serves it)."""
    from vllm_helpers import export

    return export("gemma3-270m", tmp_path_factory.mktemp("gemma") / "served")


@pytest.fixture(scope="session")
def smollm2_folder(tmp_path_factory):
    """SmolLM2-135M's servable folder, exported once per session (read only)."""
    from vllm_helpers import export

    return export("smollm2-135m", tmp_path_factory.mktemp("smol") / "served")


def pytest_report_header(config):
    if not HAVE_VLLM:
        return "tests/vllm: not collected (vLLM is not installed here; `make test` runs them in .venv-vllm)"
    return None
