"""The server's decode thread: one :class:`~flashhead.integrations.llamacpp_batch.Batcher`, fed by HTTP handlers.

Handlers run on asyncio; llama.cpp and FlashHead run on this one thread, which owns the engine. A handler
:meth:`Worker.submit`s a :class:`Job` and reads its events (``("text", str)`` pieces, then ``("done",
finish_reason)``) from the job's asyncio queue; :meth:`Worker.cancel` ends it between two decode steps
(prefill included, which runs ``n_batch`` tokens a step). Text is decoded incrementally (UTF-8 split across
tokens) and held back while it could still be the start of a stop string, so no stop string is ever sent.
"""

from __future__ import annotations

import asyncio
import codecs
import queue
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from ..integrations.llamacpp import LlamaCpp
from ..integrations.llamacpp_batch import Batcher, Request


class QueueFull(RuntimeError):
    """More requests than slots + queue limit: the caller answers 429."""


@dataclass(eq=False)
class Job:
    """One HTTP request's generation: settings in, events out (on the handler's event loop)."""

    prompt: list[int]
    max_tokens: int
    temperature: float | None
    top_k: int | None
    top_p: float | None
    seed: int
    stop: tuple[str, ...]
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    submitted: float = field(default_factory=time.perf_counter)
    first_token: float | None = None
    completion_tokens: int = 0
    finish_reason: str | None = None
    _request: Request | None = None
    _text: str = ""  # decoded so far
    _sent: int = 0  # characters of _text already sent
    _decoder: codecs.IncrementalDecoder = field(default_factory=lambda: codecs.getincrementaldecoder("utf-8")("replace"))

    @property
    def tokens(self) -> list[int]:
        """The answer's token ids so far."""
        return [] if self._request is None else list(self._request.tokens)


class Worker:
    """Owns the engine and its batcher; ``on_token(job, seconds_since_last)`` feeds the metrics."""

    def __init__(self, engine: LlamaCpp, n_slots: int, head: str, max_queue: int,
                 on_token: Callable[[Job, float | None], None] | None = None, invariant: bool = False) -> None:
        self.engine, self.max_queue = engine, max_queue
        self.batcher = Batcher(engine, n_slots=n_slots, head=head, invariant=invariant)
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._jobs: dict[int, Job] = {}
        self._pending = 0  # submitted, not finished (read by handlers for the queue limit)
        self._lock = threading.Lock()
        self._on_token = on_token
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._run, name="flashhead-decode", daemon=True)
        self._thread.start()

    # ---------------------------------------------------------------- handler side (event loop)
    def submit(self, prompt: list[int], max_tokens: int, *, temperature: float | None, top_k: int | None,
               top_p: float | None, seed: int, stop: Sequence[str]) -> Job:
        with self._lock:
            if self._pending >= self.batcher.n_slots + self.max_queue:
                raise QueueFull(f"{self._pending} requests are running or queued (limit {self.batcher.n_slots} "
                                f"slots + {self.max_queue} queued); retry later")
            self._pending += 1
        job = Job(prompt, max_tokens, temperature, top_k, top_p, seed, tuple(stop), asyncio.get_running_loop())
        self._inbox.put(("submit", job))
        return job

    def cancel(self, job: Job) -> None:
        self._inbox.put(("cancel", job))

    @property
    def depth(self) -> tuple[int, int]:
        """(running, queued) sequences, as last seen by the decode thread."""
        return self.batcher.running, self.batcher.queued

    def close(self, timeout: float = 10.0) -> None:
        self._stopping.set()
        self._inbox.put(("wake", None))
        self._thread.join(timeout)
        self.batcher.close()

    # ---------------------------------------------------------------- decode thread
    def _run(self) -> None:
        while not self._stopping.is_set():
            self._drain(block=self.batcher.idle)
            if self._stopping.is_set() or self.batcher.idle:
                continue
            last = time.perf_counter()
            try:
                produced = self.batcher.step()
            except Exception as e:  # noqa: BLE001 - a failed step ends its requests with an error, not the server
                for job in list(self._jobs.values()):
                    self.batcher.cancel(job._request)
                    self._finish(job, f"error: {e}")
                continue
            now = time.perf_counter()
            for req, tok in produced:
                job = self._jobs.get(req.id)
                if job is None:
                    continue
                gap = None if job.first_token is None else now - last
                if job.first_token is None:
                    job.first_token = now
                job.completion_tokens += 1
                if self._on_token is not None:
                    self._on_token(job, gap)
                self._text(job, self.engine.piece(tok), done=req.done)
                if req.done:
                    self._finish(job, req.finish_reason)
        for job in list(self._jobs.values()):  # shutting down
            self._finish(job, "cancelled")

    def _drain(self, block: bool) -> None:
        """Take the handlers' submits and cancels (waiting for one when there is nothing to decode)."""
        try:
            item = self._inbox.get(timeout=0.5) if block else self._inbox.get_nowait()
        except queue.Empty:
            return
        while True:
            kind, job = item
            if kind == "submit":
                try:
                    job._request = self.batcher.submit(job.prompt, job.max_tokens, temperature=job.temperature,
                                                       top_k=job.top_k, top_p=job.top_p, seed=job.seed, stop=job.stop)
                    self._jobs[job._request.id] = job
                except ValueError as e:
                    self._finish(job, f"error: {e}")
            elif kind == "cancel" and job._request is not None and job._request.id in self._jobs:
                self.batcher.cancel(job._request)
                self._finish(job, "cancelled")
            try:
                item = self._inbox.get_nowait()
            except queue.Empty:
                return

    def _text(self, job: Job, piece: bytes, done: bool) -> None:
        """Append a token's bytes; send what can no longer turn into a stop string (all of it once done,
        cut before the stop string that ended the request)."""
        job._text += job._decoder.decode(piece, final=done)
        text, end = job._text, len(job._text)
        if done:
            cuts = [i for i in (text.find(s) for s in job.stop) if i >= 0]
            end = min(cuts) if cuts else end
        elif job.stop:
            hold = max(len(s) for s in job.stop) - 1
            end = max(job._sent, end - hold)
        if end > job._sent:
            self._emit(job, ("text", text[job._sent:end]))
            job._sent = end

    def _finish(self, job: Job, reason: str) -> None:
        if job.finish_reason is not None:
            return
        job.finish_reason = reason
        if job._request is not None:
            self._jobs.pop(job._request.id, None)
        with self._lock:
            self._pending -= 1
        self._emit(job, ("done", reason))

    @staticmethod
    def _emit(job: Job, event: tuple[str, str]) -> None:
        try:
            job.loop.call_soon_threadsafe(job.events.put_nowait, event)
        except RuntimeError:  # the handler's loop is closed: nobody is listening any more
            pass
