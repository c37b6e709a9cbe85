"""``flashhead serve``: an OpenAI- and Ollama-compatible HTTP server over llama.cpp + FlashHead.

FastAPI routes (request bodies validated by pydantic, errors in OpenAI's shape), uvicorn as the server,
prometheus-client for ``/metrics``; the decoding is one :class:`~.worker.Worker` thread with continuous
batching over ``--parallel`` slots. The model loads in the background: ``/health`` answers 503 until it
is ready, then 200.
"""

from __future__ import annotations

import asyncio
import json
import sys
import threading
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any, Literal

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

from .chat import ChatTemplate, NoChatTemplate
from .worker import Job, QueueFull, Worker

FINISH = {"eog": "stop", "stop": "stop", "length": "length"}  # our reasons -> OpenAI's / Ollama's


@dataclass
class ServeConfig:
    model: str
    parallel: int = 4
    dense: bool = False
    batch_invariant: bool = False  # each request in its own llama.cpp decode: greedy tokens as if served alone
    threads: int = 2
    n_ctx: int = 2048
    max_queue: int = 64
    timeout: float = 600.0  # seconds a request may take, queueing included
    index: str | None = None
    probes: int | None = None


class ApiError(Exception):
    def __init__(self, status: int, message: str, kind: str = "invalid_request_error", param: str | None = None):
        super().__init__(message)
        self.status, self.message, self.kind, self.param = status, message, kind, param


# ------------------------------------------------------------------------------------ request bodies
class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore")


class _OpenAISampling(_Body):
    """The fields OpenAI's completions and chat completions share."""

    model: str | None = None
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(1.0, ge=0.0, le=2.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    top_k: int | None = Field(None, ge=1)  # not OpenAI's, as in vLLM and llama-server
    seed: int | None = None
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: dict[str, Any] | None = None


class CompletionBody(_OpenAISampling):
    prompt: str | list[str]
    max_tokens: int | None = Field(16, ge=1)  # OpenAI's default for completions


class Message(_Body):
    role: Literal["system", "user", "assistant", "tool"]
    content: str


class ChatBody(_OpenAISampling):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)


class OllamaOptions(_Body):
    temperature: float | None = Field(None, ge=0.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    top_k: int | None = Field(None, ge=1)
    seed: int | None = None
    num_predict: int | None = None
    stop: list[str] | None = None


class OllamaGenerate(_Body):
    model: str | None = None
    prompt: str = ""
    system: str | None = None
    raw: bool = False
    stream: bool = True
    options: OllamaOptions = Field(default_factory=OllamaOptions)


class OllamaChat(_Body):
    model: str | None = None
    messages: list[Message] = Field(min_length=1)
    stream: bool = True
    options: OllamaOptions = Field(default_factory=OllamaOptions)


# ------------------------------------------------------------------------------------ the app
class _Metrics:
    def __init__(self) -> None:
        self.registry = r = CollectorRegistry()
        self.requests = Counter("flashhead_requests", "HTTP requests by route and status", ["route", "status"],
                                registry=r)
        self.tokens = Counter("flashhead_generated_tokens", "tokens generated", registry=r)
        self.prompt_tokens = Counter("flashhead_prompt_tokens", "prompt tokens prefilled", registry=r)
        self.running = Gauge("flashhead_running_sequences", "sequences in the batch", registry=r)
        self.queued = Gauge("flashhead_queued_sequences", "sequences waiting for a slot", registry=r)
        self.ttft = Histogram("flashhead_time_to_first_token_seconds", "submission to first token", registry=r,
                              buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30))
        self.itl = Histogram("flashhead_inter_token_latency_seconds", "decode step time per token", registry=r,
                             buckets=(0.002, 0.005, 0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28))

    def on_token(self, job: Job, gap: float | None) -> None:
        self.tokens.inc()
        if gap is None:
            self.ttft.observe(job.first_token - job.submitted)
        else:
            self.itl.observe(gap)


class Server:
    """State of one serving process: the config, the engine once loaded, the worker and the metrics."""

    def __init__(self, config: ServeConfig) -> None:
        self.config, self.metrics = config, _Metrics()
        self.worker: Worker | None = None
        self.template: ChatTemplate | None = None
        self.engine = None
        self.load_error: str | None = None
        self.created = int(time.time())
        self.name = config.model

    def load(self) -> None:
        from ..integrations.llamacpp import LlamaCpp

        try:
            c = self.config
            self.engine = LlamaCpp(c.model, n_threads=c.threads, n_ctx=c.n_ctx, index=c.index, n_probes=c.probes,
                                   flashhead=not c.dense, verbose=False)
            self.template = ChatTemplate(self.engine)
            self.worker = Worker(self.engine, c.parallel, "dense" if c.dense else "flashhead", c.max_queue,
                                 on_token=self.metrics.on_token, invariant=c.batch_invariant)
        except Exception as e:  # noqa: BLE001 - reported by /health, and the process keeps answering
            self.load_error = f"{type(e).__name__}: {e}"

    def close(self) -> None:
        if self.worker is not None:
            self.worker.close()
        if self.engine is not None:
            self.engine.close()

    def ready(self) -> Worker:
        if self.worker is None:
            raise ApiError(503, self.load_error or "the model is still loading; retry shortly", "unavailable")
        return self.worker

    # ------------------------------------------------------------ generation shared by all routes
    def prompt_ids(self, text: str | None = None, messages: list[Message] | None = None) -> list[int]:
        engine = self.engine
        if messages is not None:
            try:
                text = self.template.render([m.model_dump() for m in messages])
            except NoChatTemplate as e:
                raise ApiError(400, str(e)) from None
            except Exception as e:  # noqa: BLE001 - a template that rejects the conversation
                raise ApiError(400, f"the chat template rejected these messages: {e}", param="messages") from None
            bos = engine.ll.llama_vocab_bos(engine._vocab)
            ids = engine.tokenize(text, add_special=True, parse_special=True)
            if len(ids) > 1 and ids[0] == ids[1] == bos:  # the template wrote BOS as well
                ids = ids[1:]
            return ids
        return engine.tokenize(text, add_special=True)

    def submit(self, ids: list[int], max_tokens: int | None, temperature: float | None, top_k: int | None,
               top_p: float | None, seed: int | None, stop: str | list[str] | None) -> Job:
        worker, n_ctx = self.ready(), self.config.n_ctx
        if len(ids) >= n_ctx:
            raise ApiError(400, f"the prompt has {len(ids)} tokens; this server's context holds {n_ctx} per request "
                                "(flashhead serve --n-ctx)", param="prompt")
        room = n_ctx - len(ids)
        max_tokens = room if max_tokens is None else max_tokens
        if max_tokens > room:
            raise ApiError(400, f"prompt ({len(ids)} tokens) + max_tokens ({max_tokens}) exceed the context of "
                                f"{n_ctx} tokens; lower max_tokens", param="max_tokens")
        stops = [stop] if isinstance(stop, str) else [s for s in (stop or []) if s]
        sample = temperature is not None and temperature > 0
        try:
            job = worker.submit(ids, max_tokens, temperature=temperature if sample else None,
                                top_k=top_k if sample else None, top_p=top_p if sample and top_p != 1.0 else None,
                                seed=0 if seed is None else seed, stop=stops)
        except QueueFull as e:
            raise ApiError(429, str(e), "rate_limit_exceeded") from None
        self.metrics.prompt_tokens.inc(len(ids))
        return job

    async def events(self, job: Job, request: Request) -> AsyncIterator[tuple[str, str]]:
        """The job's events until done; cancels it if the client goes away or the time-out passes."""
        deadline = job.submitted + self.config.timeout
        try:
            while True:
                try:
                    kind, value = await asyncio.wait_for(job.events.get(), timeout=0.25)
                except asyncio.TimeoutError:
                    if await request.is_disconnected():
                        return
                    if time.perf_counter() > deadline:
                        raise ApiError(504, f"the request took longer than {self.config.timeout:g} s", "timeout")
                    continue
                if kind == "done" and value.startswith("error: "):
                    raise ApiError(400, value[len("error: "):])
                yield kind, value
                if kind == "done":
                    return
        finally:
            if job.finish_reason is None:
                self.worker.cancel(job)

    async def collect(self, job: Job, request: Request) -> tuple[str, str]:
        parts, reason = [], "cancelled"
        async for kind, value in self.events(job, request):
            if kind == "text":
                parts.append(value)
            else:
                reason = value
        return "".join(parts), FINISH.get(reason, reason)


def create_app(config: ServeConfig) -> FastAPI:
    """The ASGI app; the model starts loading when the app starts."""
    server = Server(config)

    async def lifespan(app: FastAPI):
        threading.Thread(target=server.load, name="flashhead-load", daemon=True).start()
        yield
        server.close()
        print("flashhead serve: stopped; decode thread and llama.cpp closed", file=sys.stderr, flush=True)

    app = FastAPI(title="flashhead serve", lifespan=lifespan)
    app.state.server = server
    m = server.metrics

    def error(status: int, message: str, kind: str = "invalid_request_error", param: str | None = None):
        return JSONResponse({"error": {"message": message, "type": kind, "param": param, "code": None}},
                            status_code=status)

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, e: ApiError):
        return error(e.status, e.message, e.kind, e.param)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, e: RequestValidationError):
        problems = []
        for err in e.errors():
            where = ".".join(str(x) for x in err.get("loc", ()) if x != "body") or "body"
            problems.append(f"{where}: {err.get('msg')}")
        return error(400, "invalid request: " + "; ".join(problems))

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, e: StarletteHTTPException):
        return error(e.status_code, str(e.detail), "not_found" if e.status_code == 404 else "invalid_request_error")

    @app.middleware("http")
    async def _count(request: Request, call_next):
        response = await call_next(request)
        m.requests.labels(request.url.path, str(response.status_code)).inc()
        return response

    # ------------------------------------------------------------ operations
    @app.get("/health")
    async def health():
        if server.worker is None:
            status = "error" if server.load_error else "loading"
            return JSONResponse({"status": status, "error": server.load_error}, status_code=503)
        return {"status": "ok", "model": server.name, "head": "dense" if config.dense else "flashhead",
                "parallel": config.parallel, "batch_invariant": config.batch_invariant}

    @app.get("/metrics")
    async def metrics():
        if server.worker is not None:
            running, queued = server.worker.depth
            m.running.set(running)
            m.queued.set(queued)
        return Response(generate_latest(m.registry), media_type=CONTENT_TYPE_LATEST)

    # ------------------------------------------------------------ OpenAI
    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": server.name, "object": "model", "created": server.created,
                                            "owned_by": "flashhead"}]}

    def usage(job: Job) -> dict:
        return {"prompt_tokens": len(job.prompt), "completion_tokens": job.completion_tokens,
                "total_tokens": len(job.prompt) + job.completion_tokens}

    def sse(obj: dict | str) -> str:
        return f"data: {obj if isinstance(obj, str) else json.dumps(obj)}\n\n"

    @app.post("/v1/completions")
    async def completions(body: CompletionBody, request: Request):
        prompt = body.prompt
        if isinstance(prompt, list):
            if len(prompt) != 1:
                raise ApiError(400, "this server takes one prompt per request", param="prompt")
            prompt = prompt[0]
        if not prompt:
            raise ApiError(400, "the prompt is empty", param="prompt")
        server.ready()
        job = server.submit(server.prompt_ids(prompt), body.max_tokens, body.temperature, body.top_k, body.top_p,
                            body.seed, body.stop)
        rid, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
        head = {"id": rid, "object": "text_completion", "created": created, "model": server.name}
        if not body.stream:
            text, reason = await server.collect(job, request)
            return {**head, "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": reason}],
                    "usage": usage(job)}

        async def stream():
            async for kind, value in server.events(job, request):
                choice = {"index": 0, "text": value if kind == "text" else "", "logprobs": None,
                          "finish_reason": FINISH.get(value, value) if kind == "done" else None}
                yield sse({**head, "choices": [choice]})
            if (body.stream_options or {}).get("include_usage"):
                yield sse({**head, "choices": [], "usage": usage(job)})
            yield sse("[DONE]")

        return await _streaming(stream(), "text/event-stream")

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatBody, request: Request):
        server.ready()
        job = server.submit(server.prompt_ids(messages=body.messages), body.max_completion_tokens or body.max_tokens,
                            body.temperature, body.top_k, body.top_p, body.seed, body.stop)
        rid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        head = {"id": rid, "created": created, "model": server.name}
        if not body.stream:
            text, reason = await server.collect(job, request)
            return {**head, "object": "chat.completion", "usage": usage(job),
                    "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                                 "finish_reason": reason, "logprobs": None}]}

        async def stream():
            chunk = {**head, "object": "chat.completion.chunk"}
            yield sse({**chunk, "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""},
                                             "finish_reason": None}]})
            async for kind, value in server.events(job, request):
                if kind == "text":
                    choice = {"index": 0, "delta": {"content": value}, "finish_reason": None}
                else:
                    choice = {"index": 0, "delta": {}, "finish_reason": FINISH.get(value, value)}
                yield sse({**chunk, "choices": [choice]})
            if (body.stream_options or {}).get("include_usage"):
                yield sse({**chunk, "choices": [], "usage": usage(job)})
            yield sse("[DONE]")

        return await _streaming(stream(), "text/event-stream")

    # ------------------------------------------------------------ Ollama
    @app.get("/")
    async def root():
        return PlainTextResponse("Ollama is running (flashhead serve)")

    @app.get("/api/tags")
    async def tags():
        path = server.engine.path if server.engine is not None else None
        size = path.stat().st_size if path is not None else 0
        return {"models": [{"name": server.name, "model": server.name, "modified_at": _iso(server.created),
                            "size": size, "digest": "", "details": {"format": "gguf", "family": "",
                                                                    "parameter_size": "", "quantization_level": ""}}]}

    def ollama_settings(o: OllamaOptions) -> dict:
        temperature = 0.8 if o.temperature is None else o.temperature  # Ollama's default
        max_tokens = None if o.num_predict is None or o.num_predict < 0 else max(1, o.num_predict)
        return dict(max_tokens=max_tokens, temperature=temperature, top_k=o.top_k, top_p=o.top_p, seed=o.seed,
                    stop=o.stop)

    async def ollama_reply(job: Job, request: Request, stream: bool, chat: bool):
        start = time.time_ns()

        def piece(text: str) -> dict:
            out = {"model": server.name, "created_at": _iso(time.time()), "done": False}
            return {**out, "message": {"role": "assistant", "content": text}} if chat else {**out, "response": text}

        def final(reason: str, text: str = "") -> dict:
            out = {**piece(text), "done": True, "done_reason": FINISH.get(reason, reason),
                   "total_duration": time.time_ns() - start, "prompt_eval_count": len(job.prompt),
                   "eval_count": job.completion_tokens}
            return {**out, "context": list(job.prompt) + job.tokens} if not chat else out  # Ollama's token ids

        if not stream:
            text, reason = await server.collect(job, request)
            return final(reason, text)

        async def lines():
            async for kind, value in server.events(job, request):
                yield json.dumps(piece(value) if kind == "text" else final(value)) + "\n"

        return await _streaming(lines(), "application/x-ndjson")

    @app.post("/api/generate")
    async def ollama_generate(body: OllamaGenerate, request: Request):
        server.ready()
        if not body.prompt:  # Ollama answers an empty prompt by loading the model
            return {"model": server.name, "created_at": _iso(time.time()), "response": "", "done": True,
                    "done_reason": "load"}
        if body.raw:
            ids = server.prompt_ids(body.prompt)
        else:
            msgs = ([Message(role="system", content=body.system)] if body.system else [])
            ids = server.prompt_ids(messages=[*msgs, Message(role="user", content=body.prompt)])
        job = server.submit(ids, **ollama_settings(body.options))
        return await ollama_reply(job, request, body.stream, chat=False)

    @app.post("/api/chat")
    async def ollama_chat(body: OllamaChat, request: Request):
        server.ready()
        job = server.submit(server.prompt_ids(messages=body.messages), **ollama_settings(body.options))
        return await ollama_reply(job, request, body.stream, chat=True)

    return app


async def _streaming(chunks: AsyncIterator[str], media_type: str) -> Response:
    """A streamed response whose first chunk is awaited here, so an error before the first token (a bad request
    found by the decode thread) is still answered with its status instead of a broken stream."""
    it = chunks.__aiter__()
    try:
        first = await it.__anext__()
    except StopAsyncIteration:
        first = ""

    async def rest():
        yield first
        async for c in it:
            yield c

    return StreamingResponse(rest(), media_type=media_type)


def _iso(t: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t))
