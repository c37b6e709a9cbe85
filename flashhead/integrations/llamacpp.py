"""FlashHead driving llama.cpp: llama.cpp runs the body (attention, MLP, KV cache), FlashHead picks the
next token from the final normed hidden state.

``LlamaCpp(model)`` loads a GGUF file (a built-in name or a path) with llama-cpp-python's low-level
API. Two contexts share the weights:

* the *body* context runs in embeddings mode with an eval callback (:mod:`._llamacpp_stop`) that
  stops the graph right after the final norm, so llama.cpp never computes its head; the normed state
  is read in place (``llama_get_embeddings_ith``) and handed to :class:`~flashhead.head.FlashHead`
  (greedy or sampled, with FlashHead's own sampling; nothing is re-implemented here);
* the *dense* context is llama.cpp as its users run it, its own head and sampler: the reference.

The index is flashhead's usual one for that model (the cache folder of
:func:`~flashhead.integrations.transformers.default_index_dir`, built with transformers when missing);
its token order is the vocabulary order of the GGUF's head rows. The head rows come from the GGUF
itself: ``output.weight`` if present, else the tied ``token_embd.weight``.

The decode loop keeps Python per token small: one reused ``llama_batch`` (two numpy stores per
token), the hidden state read through a cached tensor view over llama.cpp's output buffer, no
per-token allocation on our side.
"""

from __future__ import annotations

import ctypes
import logging
import math
import numbers
import os
import sys
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..decode import Generation
from ..head import FlashHead, q8_0_from_blocks
from ..index import FlashHeadIndex
from ..models import DEFAULT_MODEL, resolve

#: the llama-cpp-python release the callback route was checked on (scripts/setup.sh installs it)
LLAMA_CPP_VERSION = "0.3.36"
#: the three ways to pick tokens: FlashHead on the body's state, llama.cpp's own head, or none (body only)
HEADS = ("flashhead", "dense", "body")


class EngineNotInstalledError(RuntimeError):
    """llama-cpp-python is not installed."""


class ModelLoadError(ValueError):
    """llama.cpp could not load the GGUF file."""


def _llama():
    """The ``llama_cpp`` module, or a one-line error saying how to install it."""
    try:
        import llama_cpp
    except ImportError:
        raise EngineNotInstalledError(
            f"llama.cpp is not installed: run scripts/setup.sh (it builds llama-cpp-python=={LLAMA_CPP_VERSION}, "
            "~10-30 min the first time, cached after)") from None
    if llama_cpp.__version__ != LLAMA_CPP_VERSION:
        warnings.warn(f"flashhead: llama-cpp-python {llama_cpp.__version__} is installed, the callback route was "
                      f"checked on {LLAMA_CPP_VERSION}; each load re-checks that the stop still fires",
                      RuntimeWarning, stacklevel=3)
    return llama_cpp


# ------------------------------------------------------------------------------------ GGUF head
@dataclass(frozen=True)
class GgufHead:
    """The head rows of a GGUF file as stored: ``data`` is the raw (memory-mapped) tensor."""

    name: str  # output.weight, or token_embd.weight when the head is tied
    qtype: str  # GGML type name: Q8_0, F16, Q4_K, ...
    vocab: int
    hidden: int
    data: np.ndarray

    @property
    def is_q8_0(self) -> bool:
        return self.qtype == "Q8_0"

    def dequantized(self) -> torch.Tensor:
        """fp32 ``[vocab, hidden]`` rows, exactly what transformers loads from the same file."""
        from gguf import GGMLQuantizationType
        from gguf.quants import dequantize

        rows = dequantize(self.data, GGMLQuantizationType[self.qtype])
        return torch.from_numpy(np.ascontiguousarray(rows, dtype=np.float32)).view(self.vocab, self.hidden)


def gguf_head(path: str | os.PathLike) -> tuple[GgufHead, dict]:
    """The head tensor of a GGUF file and the file's scalar metadata (arch, soft caps, ...)."""
    from gguf import GGUFReader, GGUFValueType

    reader = GGUFReader(path)
    tensors = {t.name: t for t in reader.tensors}
    name = "output.weight" if "output.weight" in tensors else "token_embd.weight"
    if name not in tensors:
        raise ModelLoadError(f"{path} has neither output.weight nor token_embd.weight: no head for FlashHead")
    t = tensors[name]
    hidden, vocab = (int(x) for x in t.shape)  # GGUF lists dimensions fastest-first
    meta = {}
    for f in reader.fields.values():
        if f.types and f.types[0] != GGUFValueType.ARRAY:
            v = f.contents()
            meta[f.name] = v
    return GgufHead(name, t.tensor_type.name, vocab, hidden, t.data), meta


def _refuse_logit_transforms(meta: dict, path: Path) -> None:
    """FlashHead returns raw logits h . w: a GGUF whose head soft-caps or scales its logits is refused."""
    arch = meta.get("general.architecture", "")
    cap, scale = meta.get(f"{arch}.final_logit_softcapping"), meta.get(f"{arch}.logit_scale")
    if cap or scale not in (None, 1.0):
        what = f"final_logit_softcapping = {cap}" if cap else f"logit_scale = {scale}"
        raise ValueError(f"{path.name} sets {what}: FlashHead does not support a head that transforms its logits; "
                         "use the dense head")


def in_cluster_order(index: FlashHeadIndex, rows: torch.Tensor) -> torch.Tensor:
    """``rows`` (one per token, in token order; float rows or raw Q8_0 blocks) laid out slot by slot in the
    index's cluster order, ``[K * cap, ...]``; empty slots are zero rows (zero bytes: a Q8_0 block of zeros)."""
    slots = index.slot_token.reshape(-1)
    out = rows.index_select(0, slots.clamp(min=0))
    out[slots < 0] = 0
    return out


def load_index(model_ref: str, weight: torch.Tensor, folder: str | os.PathLike | None = None,
               progress: bool = True) -> FlashHeadIndex:
    """flashhead's index for ``model_ref`` (the cached one unless ``folder`` is given), checked against the
    GGUF's head ``weight``; when there is none yet it is built once with transformers, as ``flashhead build``
    would."""
    from .transformers import default_index_dir, index_for

    target = Path(folder) if folder is not None else default_index_dir(model_ref)
    if target.is_dir():
        return FlashHeadIndex.load(target, weight=weight)
    from ..models import load_model

    model, tok = load_model(model_ref, verbose=progress)
    try:
        return index_for(model_ref, model, tok, target, progress=progress)
    finally:
        del model


# ------------------------------------------------------------------------------------ the engine
def _extra_buffers_usable(ll) -> bool:
    """False when this llama.cpp build multiplies with AMX tiles: on a VM that advertises AMX without
    granting it (the project's 2-core machine), the first tile instruction kills the process (SIGILL).
    Off, llama.cpp keeps its weights as stored in the GGUF (no repacked or AMX layouts)."""
    return "AMX_INT8 = 1" not in ll.llama_print_system_info().decode()


def _return_freed_memory() -> None:
    """Give the heap's free pages back to the OS: glibc keeps those of the fp32 rows and the copies that building
    the head frees (~300 MB of resident memory on Gemma-3-270M). A no-op where libc has no malloc_trim."""
    trim = getattr(ctypes.CDLL(None), "malloc_trim", None)
    if trim is not None:
        trim(0)


def _check_sampling(temperature: float | None, top_k: int | None, top_p: float | None) -> None:
    if temperature is None:
        if top_k is not None or top_p is not None:
            raise ValueError("top_k/top_p apply to sampling: give a temperature too (omit all three for greedy)")
        return
    if isinstance(temperature, bool) or not isinstance(temperature, numbers.Real) or \
            not (math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"temperature must be a finite float > 0, got {temperature!r}; omit it for greedy decoding")
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, numbers.Integral) or top_k < 1):
        raise ValueError(f"top_k must be an int >= 1, got {top_k!r}")
    if top_p is not None and (isinstance(top_p, bool) or not isinstance(top_p, numbers.Real) or not 0 < top_p <= 1):
        raise ValueError(f"top_p must be in (0, 1], got {top_p!r}")


class LlamaCpp:
    """A GGUF model in llama.cpp, decoding with FlashHead (``head="flashhead"``), with llama.cpp's own head
    (``"dense"``), or with no head at all (``"body"``, teacher-forced: the floor a head can reach).

    Args:
        model: built-in name or ``.gguf`` path.
        n_threads: llama.cpp threads for the body (default 2).
        n_ctx: context length of each of the two contexts (prompt + new tokens).
        n_batch: tokens per prefill batch (also the longest teacher-forced window).
        index: FlashHead assets folder (default: the model's index in the cache, built once if missing).
        n_probes, stage1: FlashHead setting (default: the index's).
        flashhead: False loads llama.cpp alone (no index, dense and body only).
        extra_buffers: llama.cpp's extra weight buffers (repacked layouts, AMX tiles); default: on unless
            this llama.cpp build uses AMX (see :func:`_extra_buffers_usable`).
        verbose: show llama.cpp's own log.
    """

    def __init__(self, model: str | os.PathLike = DEFAULT_MODEL, *, n_threads: int = 2, n_ctx: int = 2048,
                 n_batch: int = 512, index: str | os.PathLike | None = None, n_probes: int | None = None,
                 stage1: str | None = None, flashhead: bool = True, extra_buffers: bool | None = None,
                 verbose: bool = False) -> None:
        ll = _llama()
        for what, v in (("n_threads", n_threads), ("n_ctx", n_ctx), ("n_batch", n_batch)):
            if isinstance(v, bool) or not isinstance(v, numbers.Integral) or v < 1:
                raise ValueError(f"{what} must be an integer >= 1, got {v!r}")
        kind, path = resolve(model)
        if kind == "dir":
            raise ValueError(f"{model} is a transformers folder; llama.cpp runs GGUF files: give a built-in name or "
                             "a .gguf path")
        self.ll, self.path, self.model_ref = ll, path, str(model)
        self._contexts: dict[tuple[str, int], object] = {}  # set before anything can fail: close() reads it
        self.n_threads, self.n_ctx, self.n_batch = int(n_threads), int(n_ctx), int(n_batch)
        logging.getLogger("llama-cpp-python").setLevel(logging.DEBUG if verbose else logging.CRITICAL + 1)
        ll.llama_backend_init()
        mp = ll.llama_model_default_params()
        mp.use_extra_bufts = _extra_buffers_usable(ll) if extra_buffers is None else bool(extra_buffers)
        self.extra_buffers = bool(mp.use_extra_bufts)
        self._model = ll.llama_model_load_from_file(str(path).encode(), mp)
        if not self._model:
            raise ModelLoadError(f"llama.cpp could not load {path}: it is not a GGUF file llama.cpp "
                                 f"{ll.__version__} can run (damaged, truncated, or an unsupported architecture); "
                                 "check the file, or pass verbose=True to see llama.cpp's log")
        self._vocab = ll.llama_model_get_vocab(self._model)
        self.d = int(ll.llama_model_n_embd(self._model))
        self.n_vocab = int(ll.llama_vocab_n_tokens(self._vocab))
        self._stop = None  # the body context's callback state
        self._keep: list = []  # ctypes objects llama.cpp points to
        self._batch = ll.llama_batch_init(self.n_batch, 0, 1)
        self._b_token = np.ctypeslib.as_array(self._batch.token, (self.n_batch,))
        self._b_pos = np.ctypeslib.as_array(self._batch.pos, (self.n_batch,))
        self._b_logits = np.ctypeslib.as_array(self._batch.logits, (self.n_batch,))
        np.ctypeslib.as_array(self._batch.n_seq_id, (self.n_batch,))[:] = 1
        for i in range(self.n_batch):
            self._batch.seq_id[i][0] = 0
        self._views: dict[int, torch.Tensor] = {}
        self._piece_buf = ctypes.create_string_buffer(64)
        self.head: FlashHead | None = None
        self.head_source = ""
        if flashhead:
            self.head, self.head_source = self._flashhead(index, n_probes, stage1, verbose)
            _return_freed_memory()

    # ---------------------------------------------------------------- set-up
    def _flashhead(self, index, n_probes, stage1, verbose) -> tuple[FlashHead, str]:
        """FlashHead over the GGUF's own head rows: its Q8_0 blocks as they are (int8 + fp16 scales, h quantized
        to Q8_0 as llama.cpp's head product does), else fp32 rows dequantized from them."""
        head, meta = gguf_head(self.path)
        _refuse_logit_transforms(meta, self.path)
        if head.hidden != self.d:
            raise ModelLoadError(f"{self.path.name}: head {head.name} has width {head.hidden}, the body {self.d}")
        if not head.is_q8_0:
            print(f"flashhead: {self.path.name}'s head ({head.name}) is {head.qtype}, not 8-bit Q8_0: FlashHead "
                  "uses fp32 rows dequantized from it (same logits, ~3.8x the stage-2 bytes)", file=sys.stderr)
        weight = head.dequantized()  # the index's fingerprint is checked on the values transformers loads
        idx = load_index(self.model_ref, weight, index, progress=verbose or index is None)
        if idx.config.vocab_size != head.vocab:
            raise ModelLoadError(f"the FlashHead index has {idx.config.vocab_size} rows, {head.name} {head.vocab}")
        c = idx.config
        shape = (c.num_clusters, c.cluster_size, c.hidden_size)
        if head.is_q8_0:
            del weight
            with warnings.catch_warnings():  # a read-only memmap, only read (index_select copies)
                warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
                blocks = torch.from_numpy(np.asarray(head.data, dtype=np.uint8).reshape(head.vocab, -1))
            q, scales = q8_0_from_blocks(in_cluster_order(idx, blocks), head.hidden)
            rows = q.view(shape)
            kw = dict(row_scales=scales.view(*shape[:2], -1), quantize_activations=True)
            source = f"{head.name} Q8_0 as stored (int8 rows + fp16 scales, h in Q8_0)"
        else:
            rows, kw, source = in_cluster_order(idx, weight).view(shape), {}, f"{head.name} {head.qtype} -> fp32 rows"
            del weight
        fh = FlashHead(rows, idx.slot_token, idx.centroids, out_features=c.vocab_size,
                       n_probes=c.n_probes if n_probes is None else n_probes,
                       always_ids=torch.tensor(c.always_ids, dtype=torch.long),
                       stage1=c.stage1 if stage1 is None else stage1, **kw)
        return fh, source

    def _context(self, which: str, n_seq: int = 1):
        """The ``"dense"`` (logits) or ``"body"`` (embeddings, stop after the final norm) context; with ``n_seq``
        sequences (:mod:`.llamacpp_batch`) it holds ``n_ctx`` positions for each of them."""
        ctx = self._contexts.get((which, n_seq))
        if ctx is not None:
            return ctx
        ll = self.ll
        p = ll.llama_context_default_params()
        p.n_ctx, p.n_batch, p.n_ubatch, p.n_seq_max = self.n_ctx * n_seq, self.n_batch, self.n_batch, n_seq
        p.n_threads = p.n_threads_batch = self.n_threads
        p.no_perf = True
        stop = None
        if which == "body":
            from ._llamacpp_stop import StopState, callback_address

            stop = StopState(stop=1, hits=0)
            cb = ll.ggml_backend_sched_eval_callback(callback_address())
            self._keep += [stop, cb]
            p.embeddings = True
            p.pooling_type = ll.LLAMA_POOLING_TYPE_NONE
            p.cb_eval = cb
            p.cb_eval_user_data = ctypes.cast(ctypes.pointer(stop), ctypes.c_void_p)
            if n_seq == 1:
                self._stop = stop  # hidden_states() turns this one's stop off and on
        ctx = ll.llama_init_from_model(self._model, p)
        if not ctx:
            raise RuntimeError(f"llama.cpp could not create a context (n_ctx={self.n_ctx} x {n_seq} sequences, "
                               f"n_batch={self.n_batch}); try a smaller n_ctx")
        self._contexts[(which, n_seq)] = ctx
        if stop is not None:
            self._check_stop(ctx, stop)
        return ctx

    def _check_stop(self, ctx, stop) -> None:
        """One decode through a body context: the callback must have met the final norm, else this llama.cpp
        no longer names it or no longer asks the callback, and the head would run unseen."""
        self._prefill(ctx, self.tokenize("The"), outputs="last")
        if stop.hits < 1:
            raise RuntimeError(f"llama.cpp {self.ll.__version__}: the eval callback never met the final norm "
                               "('result_norm'/'result_embd_pooled'), so the head cannot be skipped; install "
                               f"llama-cpp-python=={LLAMA_CPP_VERSION} (scripts/setup.sh)")

    def close(self) -> None:
        """Free llama.cpp's contexts, batch and model (also done when the object is collected)."""
        ll = getattr(self, "ll", None)
        if ll is None:
            return
        for ctx in self._contexts.values():
            ll.llama_free(ctx)
        self._contexts = {}
        if getattr(self, "_batch", None) is not None:
            ll.llama_batch_free(self._batch)
            self._batch = None
        if getattr(self, "_model", None):
            ll.llama_model_free(self._model)
            self._model = None

    def __del__(self, _finalizing=sys.is_finalizing):
        # at interpreter exit module globals (llama_cpp's, this one's) may already be gone, so the check is bound
        # here; the process frees the memory anyway
        if not _finalizing():
            self.close()

    # ---------------------------------------------------------------- text
    def tokenize(self, text: str, add_special: bool = True, parse_special: bool = False) -> list[int]:
        """llama.cpp's tokens for ``text`` (with the model's BOS when ``add_special``; special tokens written in
        the text, e.g. a chat template's ``<|im_start|>``, read as such when ``parse_special``)."""
        raw = text.encode()
        n_max = len(raw) + 8
        buf = (ctypes.c_int32 * n_max)()
        n = self.ll.llama_tokenize(self._vocab, raw, len(raw), buf, n_max, add_special, parse_special)
        if n < 0:
            raise RuntimeError(f"llama_tokenize failed ({n})")
        return list(buf[:n])

    def detokenize(self, ids: Sequence[int]) -> str:
        """Text of ``ids`` (special tokens left out)."""
        arr = (ctypes.c_int32 * max(1, len(ids)))(*ids)
        size = 8 * len(ids) + 16
        while True:
            out = ctypes.create_string_buffer(size)
            n = self.ll.llama_detokenize(self._vocab, arr, len(ids), out, size, True, False)
            if n >= 0:
                return out.raw[:n].decode("utf-8", errors="replace")
            size = -n + 1

    def is_eog(self, token: int) -> bool:
        return bool(self.ll.llama_vocab_is_eog(self._vocab, token))

    def piece(self, token: int) -> bytes:
        """The bytes ``token`` adds to a text (special tokens add none): pieces join into the detokenized text."""
        buf = self._piece_buf
        n = self.ll.llama_token_to_piece(self._vocab, int(token), buf, len(buf), 0, False)
        if n < 0:  # longer than the buffer: grow it once
            self._piece_buf = buf = ctypes.create_string_buffer(-n)
            n = self.ll.llama_token_to_piece(self._vocab, int(token), buf, len(buf), 0, False)
        return buf.raw[:n]

    # ---------------------------------------------------------------- decoding primitives
    def _decode(self, ctx, n: int) -> None:
        self._batch.n_tokens = n
        rc = self.ll.llama_decode(ctx, self._batch)
        if rc != 0:
            raise RuntimeError(f"llama_decode returned {rc} (1: the context of {self.n_ctx} tokens is full; pass a "
                               "larger n_ctx)")

    def _prefill(self, ctx, ids: Sequence[int], outputs: str, start: int = 0) -> None:
        """Decode ``ids`` from position ``start`` after clearing the context's memory when ``start`` is 0;
        ``outputs``: "last" or "all" positions (embeddings mode outputs all anyway)."""
        if start == 0:
            self.ll.llama_memory_clear(self.ll.llama_get_memory(ctx), True)
        if not ids:
            raise ValueError("the prompt is empty")
        if start + len(ids) > self.n_ctx:
            raise ValueError(f"{start + len(ids)} tokens do not fit the context of {self.n_ctx}; pass a larger n_ctx")
        for a in range(0, len(ids), self.n_batch):
            n = min(self.n_batch, len(ids) - a)
            self._b_token[:n] = ids[a:a + n]
            self._b_pos[:n] = np.arange(start + a, start + a + n)
            self._b_logits[:n] = 1 if outputs == "all" else 0
            if a + n == len(ids):
                self._b_logits[n - 1] = 1
            self._decode(ctx, n)

    def _hidden(self, ctx, row: int = -1) -> torch.Tensor:
        """``[1, d]`` view of the body's normed state at output ``row``, in llama.cpp's buffer (no copy)."""
        addr = ctypes.cast(self.ll.llama_get_embeddings_ith(ctx, row), ctypes.c_void_p).value
        if not addr:
            raise RuntimeError(f"llama.cpp returned no embeddings for output {row}")
        view = self._views.get(addr)
        if view is None:
            view = torch.frombuffer((ctypes.c_float * self.d).from_address(addr), dtype=torch.float32).view(1, self.d)
            self._views[addr] = view
        return view

    def _sampler(self, temperature: float | None, top_k: int | None, top_p: float | None, seed: int):
        """llama.cpp's own sampler chain, in FlashHead's order: temperature, top-k, top-p, draw."""
        ll = self.ll
        chain = ll.llama_sampler_chain_init(ll.llama_sampler_chain_default_params())
        if temperature is None:
            ll.llama_sampler_chain_add(chain, ll.llama_sampler_init_greedy())
            return chain
        ll.llama_sampler_chain_add(chain, ll.llama_sampler_init_temp(float(temperature)))
        if top_k is not None:
            ll.llama_sampler_chain_add(chain, ll.llama_sampler_init_top_k(int(top_k)))
        if top_p is not None:
            ll.llama_sampler_chain_add(chain, ll.llama_sampler_init_top_p(float(top_p), 1))
        ll.llama_sampler_chain_add(chain, ll.llama_sampler_init_dist(int(seed) & 0xFFFFFFFF))
        return chain

    # ---------------------------------------------------------------- generation
    def generate(self, prompt: str | Sequence[int], max_new_tokens: int = 32, *, temperature: float | None = None,
                 top_k: int | None = None, top_p: float | None = None, seed: int = 0, head: str = "flashhead",
                 follow: Sequence[int] | None = None, stop: Sequence[str] = ()) -> Generation:
        """Continue ``prompt`` (text, or token ids with their BOS) by up to ``max_new_tokens`` tokens, stopping
        at an end-of-generation token or once the new text contains one of the ``stop`` strings (they may span
        tokens; the text and ids returned end with the token that completed it); greedy unless ``temperature``
        is given.

        ``head``: ``"flashhead"`` (FlashHead's greedy/sample on the body's state), ``"dense"`` (llama.cpp's
        own head and sampler) or ``"body"`` (no head: feeds ``follow``'s tokens, to time the floor).
        ``seconds`` covers prefill and decode, as for transformers' ``generate()``.
        """
        if head not in HEADS:
            raise ValueError(f"head must be one of {HEADS}, got {head!r}")
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, numbers.Integral) or max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be an int >= 1, got {max_new_tokens!r}")
        _check_sampling(temperature, top_k, top_p)
        if head == "flashhead" and self.head is None:
            raise ValueError("this LlamaCpp was loaded with flashhead=False; use head='dense'")
        if isinstance(stop, str) or any(not isinstance(x, str) or not x for x in stop):
            raise ValueError(f"stop must be a list of non-empty strings, got {stop!r}")
        if head == "body" and (follow is None or len(follow) < max_new_tokens):
            raise ValueError(f"head='body' feeds given tokens: pass follow= with at least {max_new_tokens} ids")
        ids = self.tokenize(prompt) if isinstance(prompt, str) else [int(t) for t in prompt]
        if len(ids) + max_new_tokens > self.n_ctx:
            raise ValueError(f"prompt ({len(ids)} tokens) + max_new_tokens ({max_new_tokens}) exceed n_ctx={self.n_ctx}; "
                             "pass a larger n_ctx")
        ctx = self._context("dense" if head == "dense" else "body")
        pick = self._picker(head, ctx, temperature, top_k, top_p, seed, follow)
        try:
            t0 = time.perf_counter()
            out = self._loop(ctx, ids, max_new_tokens, pick, stop_at_eog=head != "body", stop=self._stop_watch(stop))
            seconds = time.perf_counter() - t0
        finally:
            pick.close()
        return Generation([self.detokenize(out)], [out], seconds, len(out))

    def _picker(self, head, ctx, temperature, top_k, top_p, seed, follow) -> _Picker:
        if head == "dense":
            chain = self._sampler(temperature, top_k, top_p, seed)
            sample = self.ll.llama_sampler_sample
            return _Picker(lambda: int(sample(chain, ctx, -1)), lambda: self.ll.llama_sampler_free(chain))
        if head == "body":
            it = iter(follow)
            return _Picker(lambda: int(next(it)))
        fh, hidden = self.head, self._hidden
        if temperature is None:
            return _Picker(lambda: int(fh.greedy(hidden(ctx))))
        gen = torch.Generator().manual_seed(int(seed))
        return _Picker(lambda: int(fh.sample(hidden(ctx), temperature=temperature, top_k=top_k, top_p=top_p,
                                             generator=gen)))

    def _stop_watch(self, stop: Sequence[str]) -> Callable[[int], bool] | None:
        """None without stop strings, else a function fed each new token that says when the new text holds one.
        It keeps the bytes so far and searches only the tail a new piece can complete."""
        if not stop:
            return None
        needles = [x.encode() for x in stop]
        longest = max(map(len, needles))
        text = bytearray()

        def seen(token: int) -> bool:
            start = max(0, len(text) - longest + 1)
            text.extend(self.piece(token))
            tail = bytes(text[start:])
            return any(n in tail for n in needles)

        return seen

    def _loop(self, ctx, ids: list[int], max_new: int, pick: _Picker, stop_at_eog: bool,
              stop: Callable[[int], bool] | None = None) -> list[int]:
        """Prefill, then one token per step: pick, check EOG and stop strings, decode it (the hot loop)."""
        self._views.clear()
        self._prefill(ctx, ids, outputs="last")
        out: list[int] = []
        next_token, decode, is_eog = pick.next, self._decode, self.ll.llama_vocab_is_eog
        b_token, b_pos, vocab = self._b_token, self._b_pos, self._vocab
        self._b_logits[0] = 1
        pos = len(ids)
        for step in range(max_new):
            tok = next_token()
            out.append(tok)
            if step == max_new - 1 or (stop_at_eog and is_eog(vocab, tok)) or (stop is not None and stop(tok)):
                break
            b_token[0] = tok
            b_pos[0] = pos
            pos += 1
            decode(ctx, 1)
        return out

    # ---------------------------------------------------------------- teacher forcing
    def hidden_states(self, ids: Sequence[int], stop: bool = True) -> torch.Tensor:
        """Normed states ``[n, d]`` (a copy) at every position of ``ids`` from the body context: with the stop
        after the final norm (``stop=True``) or from the whole graph, head included (``False``)."""
        ctx = self._context("body")
        self._check_window(ids)
        self._stop.stop = int(stop)
        try:
            self._prefill(ctx, ids, outputs="all")
        finally:
            self._stop.stop = 1
        addr = ctypes.cast(self.ll.llama_get_embeddings(ctx), ctypes.c_void_p).value
        buf = (ctypes.c_float * (len(ids) * self.d)).from_address(addr)
        return torch.frombuffer(buf, dtype=torch.float32).view(len(ids), self.d).clone()

    def dense_argmax(self, ids: Sequence[int]) -> torch.Tensor:
        """llama.cpp's own greedy token ``[n]`` after every prefix of ``ids`` (its dense head, one window)."""
        ctx = self._context("dense")
        self._check_window(ids)
        self._prefill(ctx, ids, outputs="all")
        addr = ctypes.cast(self.ll.llama_get_logits(ctx), ctypes.c_void_p).value
        logits = np.ctypeslib.as_array((ctypes.c_float * (len(ids) * self.n_vocab)).from_address(addr))
        return torch.from_numpy(logits.reshape(len(ids), self.n_vocab).argmax(1))

    def score(self, ids: Sequence[int], start: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Log-probabilities ``[n - start]`` (float64) of ``ids[start:]``, each given the ids before it, and whether
        each is the greedy token (llama.cpp's argmax), both from llama.cpp's own dense head: scoring is exact
        whatever head decodes (docs/design.md, "Scoring"). ``1 <= start < len(ids) <= n_ctx``."""
        if not 1 <= start < len(ids) <= self.n_ctx:
            raise ValueError(f"score needs 1 <= start < len(ids) <= n_ctx={self.n_ctx}, got start={start} and "
                             f"{len(ids)} ids; pass a larger n_ctx or a shorter text")
        ctx = self._context("dense")
        self.ll.llama_memory_clear(self.ll.llama_get_memory(ctx), True)
        ids = [int(t) for t in ids]
        target = torch.tensor(ids[start:], dtype=torch.long)
        logp, greedy = torch.empty(len(target), dtype=torch.float64), torch.empty(len(target), dtype=torch.bool)
        # position j's logits predict ids[j + 1]: positions start-1 .. n-2 are wanted; the last id is never fed
        for a in range(0, len(ids) - 1, self.n_batch):
            n = min(self.n_batch, len(ids) - 1 - a)
            self._b_token[:n] = ids[a:a + n]
            self._b_pos[:n] = np.arange(a, a + n)
            first = max(start - 1 - a, 0)  # first row of this batch whose logits are wanted
            self._b_logits[:n] = np.arange(n) >= first
            self._decode(ctx, n)
            m = n - first
            if m <= 0:
                continue
            addr = ctypes.cast(self.ll.llama_get_logits(ctx), ctypes.c_void_p).value
            rows = torch.from_numpy(np.ctypeslib.as_array((ctypes.c_float * (m * self.n_vocab)).from_address(addr))
                                    .reshape(m, self.n_vocab)).double()
            at = slice(a + first - (start - 1), a + n - (start - 1))
            want = target[at]
            logp[at] = rows.log_softmax(1).gather(1, want[:, None])[:, 0]
            greedy[at] = rows.argmax(1) == want
        return logp, greedy

    def _check_window(self, ids: Sequence[int]) -> None:
        if not 0 < len(ids) <= min(self.n_batch, self.n_ctx):
            raise ValueError(f"a teacher-forced window holds 1..{min(self.n_batch, self.n_ctx)} tokens (n_batch), "
                             f"got {len(ids)}")


class _Picker:
    """How the loop gets its next token, and what to free afterwards."""

    __slots__ = ("next", "_close")

    def __init__(self, next_token: Callable[[], int], close: Callable[[], None] | None = None) -> None:
        self.next, self._close = next_token, close

    def close(self) -> None:
        if self._close is not None:
            self._close()
