"""Continuous batching in llama.cpp: several sequences per decode step, FlashHead picking all their tokens at once.

:class:`Batcher` keeps up to ``n_slots`` sequences in one llama.cpp context (``n_seq_max = n_slots``, each
sequence its own ``n_ctx`` positions of KV cache). Each :meth:`Batcher.step` builds one ``llama_batch``:
the last token of every decoding sequence, then as many prompt tokens of newly admitted sequences as fit
(a long prompt is prefilled over several steps). After the decode, the greedy sequences get their next
tokens from one batched :meth:`FlashHead.greedy` call over their normed states (llama.cpp's sampler per
sequence with ``head="dense"``); sampled sequences draw row by row with their own seed. A finished or
cancelled sequence's KV cells are removed and its slot admits the next waiting one.

llama.cpp's CPU kernels are not batch-invariant: a row's state depends, beyond rounding, on how many rows its
batch holds, so a greedy sequence decoded beside others may take the other token of a near tie
(docs/design.md). ``invariant=True`` decodes each sequence in its own ``llama_decode`` with the shapes of a
run alone (its one token; its prompt in ``n_batch`` chunks from position 0), so its tokens are those of a
batch-1 run whatever else is running; FlashHead still picks all the next tokens in one call.
"""

from __future__ import annotations

import ctypes
import itertools
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from .llamacpp import LlamaCpp, _check_sampling


@dataclass(eq=False)
class Request:
    """One sequence in the batcher: its prompt, settings and the tokens it has produced so far."""

    prompt: list[int]
    max_new_tokens: int
    temperature: float | None = None
    top_k: int | None = None
    top_p: float | None = None
    seed: int = 0
    stop: tuple[str, ...] = ()
    tokens: list[int] = field(default_factory=list)
    finish_reason: str | None = None  # "eog", "stop", "length" or "cancelled" once done
    id: int = 0
    _slot: int = -1
    _fed: int = 0  # prompt tokens already in the KV cache
    _watch: object = None
    _sampler: object = None
    _generator: torch.Generator | None = None

    @property
    def done(self) -> bool:
        return self.finish_reason is not None


class Batcher:
    """Up to ``n_slots`` sequences decoded together on ``engine``'s model, with FlashHead (``head="flashhead"``)
    or llama.cpp's own head and sampler (``"dense"``). Submit sequences, then call :meth:`step` until
    :attr:`idle`; sequences may be submitted and cancelled between steps. ``invariant``: each sequence in its
    own llama.cpp decode, so its tokens equal a batch-1 run (slower with many sequences)."""

    def __init__(self, engine: LlamaCpp, n_slots: int = 4, head: str = "flashhead", invariant: bool = False) -> None:
        if isinstance(n_slots, bool) or not isinstance(n_slots, int) or n_slots < 1:
            raise ValueError(f"n_slots must be an int >= 1, got {n_slots!r}")
        if head not in ("flashhead", "dense"):
            raise ValueError(f"head must be 'flashhead' or 'dense', got {head!r}")
        if head == "flashhead" and engine.head is None:
            raise ValueError("this LlamaCpp was loaded with flashhead=False; use head='dense'")
        self.engine, self.n_slots, self.head, self.invariant = engine, n_slots, head, bool(invariant)
        ll = engine.ll
        self._ll, self._ctx = ll, engine._context("body" if head == "flashhead" else "dense", n_seq=n_slots)
        self._mem = ll.llama_get_memory(self._ctx)
        ll.llama_memory_clear(self._mem, True)
        n = engine.n_batch
        self._batch = ll.llama_batch_init(n, 0, 1)
        self._token = np.ctypeslib.as_array(self._batch.token, (n,))
        self._pos = np.ctypeslib.as_array(self._batch.pos, (n,))
        self._logits = np.ctypeslib.as_array(self._batch.logits, (n,))
        np.ctypeslib.as_array(self._batch.n_seq_id, (n,))[:] = 1
        self._seq = [self._batch.seq_id[i] for i in range(n)]
        self._slots: list[Request | None] = [None] * n_slots
        self._waiting: deque[Request] = deque()
        self._ids = itertools.count()

    def close(self) -> None:
        """Cancel what is running or waiting and free the batch (the context stays with the engine)."""
        for s in [*self._waiting, *(s for s in self._slots if s is not None)]:
            if self.engine._model:  # the engine's context still exists
                self.cancel(s)
        if getattr(self, "_batch", None) is not None:
            self._ll.llama_batch_free(self._batch)
            self._batch = None

    # ---------------------------------------------------------------- requests
    def submit(self, prompt: str | Sequence[int], max_new_tokens: int = 32, *, temperature: float | None = None,
               top_k: int | None = None, top_p: float | None = None, seed: int = 0,
               stop: Sequence[str] = ()) -> Request:
        """Queue a sequence (text, or ids with their BOS); it joins the batch at the next step with a free slot."""
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be an int >= 1, got {max_new_tokens!r}")
        _check_sampling(temperature, top_k, top_p)
        if isinstance(stop, str) or any(not isinstance(x, str) or not x for x in stop):
            raise ValueError(f"stop must be a list of non-empty strings, got {stop!r}")
        ids = self.engine.tokenize(prompt) if isinstance(prompt, str) else [int(t) for t in prompt]
        if not ids:
            raise ValueError("the prompt is empty")
        if len(ids) + max_new_tokens > self.engine.n_ctx:
            raise ValueError(f"prompt ({len(ids)} tokens) + max_new_tokens ({max_new_tokens}) exceed n_ctx="
                             f"{self.engine.n_ctx} per sequence; pass a larger n_ctx or fewer tokens")
        seq = Request(ids, max_new_tokens, temperature, top_k, top_p, int(seed), tuple(stop), id=next(self._ids))
        self._waiting.append(seq)
        return seq

    def cancel(self, seq: Request) -> None:
        """End ``seq`` now (waiting or running): its slot and KV cells are freed before the next step."""
        if seq.done:
            return
        if seq in self._waiting:
            self._waiting.remove(seq)
        seq.finish_reason = "cancelled"
        if seq._slot >= 0:
            self._release(seq)

    @property
    def idle(self) -> bool:
        return not self._waiting and all(s is None for s in self._slots)

    @property
    def running(self) -> int:
        return sum(s is not None for s in self._slots)

    @property
    def queued(self) -> int:
        return len(self._waiting)

    # ---------------------------------------------------------------- the step
    def _admit(self) -> None:
        for slot, s in enumerate(self._slots):
            if s is None and self._waiting:
                seq = self._waiting.popleft()
                seq._slot = slot
                self._slots[slot] = seq
                seq._watch = self.engine._stop_watch(seq.stop)
                if self.head == "dense":
                    seq._sampler = self.engine._sampler(seq.temperature, seq.top_k, seq.top_p, seq.seed)
                elif seq.temperature is not None:
                    seq._generator = torch.Generator().manual_seed(seq.seed)

    def _release(self, seq: Request) -> None:
        self._ll.llama_memory_seq_rm(self._mem, seq._slot, -1, -1)
        if seq._sampler is not None:
            self._ll.llama_sampler_free(seq._sampler)
            seq._sampler = None
        self._slots[seq._slot] = None
        seq._slot = -1

    def step(self) -> list[tuple[Request, int]]:
        """One decode step over every running sequence; returns the ``(sequence, token)`` pairs it produced."""
        self._admit()
        produced = self._step_alone() if self.invariant else self._step_shared()
        for seq, tok in produced:
            seq.tokens.append(tok)
            if self.engine.is_eog(tok):
                seq.finish_reason = "eog"
            elif seq._watch is not None and seq._watch(tok):
                seq.finish_reason = "stop"
            elif len(seq.tokens) >= seq.max_new_tokens:
                seq.finish_reason = "length"
            if seq.done:
                self._release(seq)
        return produced

    def _step_shared(self) -> list[tuple[Request, int]]:
        """One llama_batch: a token for every decoding sequence, then prompt tokens of new ones as far as fit."""
        room, n, outputs = self.engine.n_batch, 0, []
        for seq in self._slots:  # decoding sequences first: one token each
            if seq is not None and seq.tokens:
                outputs.append((n, seq))
                n = self._put_last(seq, n)
        for seq in self._slots:  # then prompt tokens, as many as fit
            if seq is None or seq.tokens or n == room:
                continue
            n = self._put_prompt(seq, n, room - n)
            if seq._fed == len(seq.prompt):
                outputs.append((n - 1, seq))
        if n == 0:
            return []
        self._decode(n)
        if self.head == "dense":
            return [(s, self._dense_token(s, i)) for i, s in outputs]
        seqs = [s for _, s in outputs]
        return list(zip(seqs, self._flash_tokens(seqs, self._states([i for i, _ in outputs]))))

    def _step_alone(self) -> list[tuple[Request, int]]:
        """Every sequence in its own decode, shaped as in a batch-1 run; the states are copied out before the next
        decode overwrites them, then FlashHead picks all tokens at once."""
        seqs, tokens, states = [], [], []
        for seq in self._slots:
            if seq is None:
                continue
            n = self._put_last(seq, 0) if seq.tokens else self._put_prompt(seq, 0, self.engine.n_batch)
            self._decode(n)
            if seq._fed < len(seq.prompt):  # more of its prompt to come, in the next steps
                continue
            seqs.append(seq)
            if self.head == "dense":
                tokens.append(self._dense_token(seq, n - 1))
            else:
                states.append(self._states([n - 1]))
        if self.head == "flashhead" and seqs:
            tokens = self._flash_tokens(seqs, torch.cat(states))
        return list(zip(seqs, tokens))

    def _put_last(self, seq: Request, n: int) -> int:
        """Put ``seq``'s last token at batch row ``n`` (its logits wanted); returns the next free row."""
        self._put(n, seq.tokens[-1], len(seq.prompt) + len(seq.tokens) - 1, seq._slot, True)
        return n + 1

    def _put_prompt(self, seq: Request, n: int, room: int) -> int:
        """Put up to ``room`` of ``seq``'s prompt tokens from batch row ``n``; returns the next free row."""
        take = min(room, len(seq.prompt) - seq._fed)
        for j in range(seq._fed, seq._fed + take):
            self._put(n, seq.prompt[j], j, seq._slot, j == len(seq.prompt) - 1)
            n += 1
        seq._fed += take
        return n

    def _decode(self, n: int) -> None:
        self._batch.n_tokens = n
        rc = self._ll.llama_decode(self._ctx, self._batch)
        if rc != 0:
            raise RuntimeError(f"llama_decode returned {rc} with {n} tokens of {self.running} sequences")

    def _put(self, i: int, token: int, pos: int, seq_id: int, logits: bool) -> None:
        self._token[i], self._pos[i], self._logits[i] = token, pos, logits
        self._seq[i][0] = seq_id

    def _dense_token(self, seq: Request, row: int) -> int:
        """llama.cpp's own sampler for ``seq`` on output ``row`` of the last decode."""
        return int(self._ll.llama_sampler_sample(seq._sampler, self._ctx, row))

    def _states(self, rows: list[int]) -> torch.Tensor:
        """``[len(rows), d]`` copies of the body's normed states at those outputs of the last decode."""
        d = self.engine.d
        h = torch.empty(len(rows), d)
        for r, i in enumerate(rows):
            addr = ctypes.cast(self._ll.llama_get_embeddings_ith(self._ctx, i), ctypes.c_void_p).value
            h[r] = torch.frombuffer((ctypes.c_float * d).from_address(addr), dtype=torch.float32)
        return h

    def _flash_tokens(self, seqs: list[Request], h: torch.Tensor) -> list[int]:
        """FlashHead's next token for each row of ``h``: the greedy rows in one batched call, the sampled ones row
        by row with their own generator."""
        fh = self.engine.head
        out = [0] * len(seqs)
        greedy = [r for r, s in enumerate(seqs) if s.temperature is None]
        if greedy:
            for r, tok in zip(greedy, fh.greedy(h[greedy]).tolist()):
                out[r] = tok
        for r, s in enumerate(seqs):
            if s.temperature is not None:
                out[r] = int(fh.sample(h[r:r + 1], temperature=s.temperature, top_k=s.top_k, top_p=s.top_p,
                                       generator=s._generator))
        return out

    def run(self) -> None:
        """Step until every submitted request is done."""
        while not self.idle:
            self.step()
