"""The HTTP server: an OpenAI-compatible ``/v1/chat/completions`` and ``/v1/models``,
``/health``, and the web chat at ``/`` (FastAPI + uvicorn)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import secrets
import socket
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Literal

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, StreamingResponse
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel, ConfigDict, Field, field_validator
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from personatune.data.chat import render_prompt
from personatune.errors import PersonatuneError
from personatune.serve.adapters import (
    Delta,
    Done,
    Failed,
    Job,
    QueueFull,
    Registry,
    ServedPersona,
    Worker,
)

log = logging.getLogger("uvicorn.error")  # uvicorn's server log, so the messages show
STATIC = Path(__file__).parent / "static"
SystemPolicy = Literal["request-wins", "persona"]


class ApiError(Exception):
    """An error answered in OpenAI's format: ``{"error": {message, type, param, code}}``."""

    def __init__(
        self,
        status: int,
        message: str,
        type: str = "invalid_request_error",
        code: str | None = None,
        param: str | None = None,
    ):
        super().__init__(message)
        self.status, self.message, self.type, self.code, self.param = (
            status,
            message,
            type,
            code,
            param,
        )

    def response(self) -> JSONResponse:
        body = {
            "error": {
                "message": self.message,
                "type": self.type,
                "param": self.param,
                "code": self.code,
            }
        }
        headers = {"WWW-Authenticate": "Bearer"} if self.status == 401 else None
        return JSONResponse(body, status_code=self.status, headers=headers)


# ---------------------------------------------------------------- request schema


class TextPart(BaseModel):
    """A text part of a message's content list (other part types are refused)."""

    type: Literal["text"]
    text: str


class Message(BaseModel):
    """One chat message. ``developer`` is OpenAI's newer name for ``system``."""

    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart]

    def text(self) -> str:
        return (
            self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)
        )


class StreamOptions(BaseModel):
    include_usage: bool = False
    """Send a last chunk with token usage before ``data: [DONE]``."""


class ChatRequest(BaseModel):
    """The fields of OpenAI's chat completion request that personatune honours. Other
    fields OpenAI clients send (``user``, ``metadata``) are ignored; ones that would change
    the answer and are not supported (``tools``, ``n`` > 1, ``logprobs``) are refused."""

    model_config = ConfigDict(extra="ignore")
    model: str
    messages: list[Message] = Field(min_length=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    stop: str | list[str] | None = None
    seed: int | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = Field(1, ge=1, le=1)
    tools: list | None = None
    logprobs: bool | None = None

    @field_validator("stop")
    @classmethod
    def _stops(cls, v):
        stops = [v] if isinstance(v, str) else (v or [])
        if len(stops) > 4 or any(not s for s in stops):
            raise ValueError("give at most 4 non-empty stop sequences")
        return stops

    @field_validator("tools", "logprobs")
    @classmethod
    def _unsupported(cls, v, info):
        if v:
            raise ValueError(f"{info.field_name} are not supported by personatune serve")
        return v


# ---------------------------------------------------------------- helpers


def conversation(messages: list[Message], system_prompt: str, policy: SystemPolicy) -> list[dict]:
    """The conversation the model sees.

    ``request-wins``: the persona's system prompt is prepended unless the request has a
    system message of its own. ``persona``: the persona's system prompt always comes
    first; a request's system messages are appended to it, in one system message.
    """
    system = [m.text() for m in messages if m.role in ("system", "developer")]
    rest = [
        {"role": m.role, "content": m.text()}
        for m in messages
        if m.role not in ("system", "developer")
    ]
    if not rest:
        raise ApiError(
            400, "messages: give at least one user or assistant message", param="messages"
        )
    if policy == "persona":
        system = [system_prompt, *system] if system_prompt else system
    elif not system and system_prompt:
        system = [system_prompt]
    head = [{"role": "system", "content": "\n\n".join(system)}] if system else []
    return head + rest


def _error_param(loc: tuple) -> str:
    return ".".join(str(p) for p in loc if p != "body")


def _chunk(cid: str, created: int, model: str, delta: dict, finish: str | None = None) -> str:
    data = {
        "id": cid,
        "object": "chat.completion.chunk",
        "created": created,
        "model": model,
        "system_fingerprint": None,
        "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}],
    }
    return f"data: {json.dumps(data)}\n\n"


def _usage(done: Done) -> dict:
    return {
        "prompt_tokens": done.prompt_tokens,
        "completion_tokens": done.completion_tokens,
        "total_tokens": done.prompt_tokens + done.completion_tokens,
    }


def _model_card(p: ServedPersona, base_model: str) -> dict:
    return {
        "id": p.name,
        "object": "model",
        "created": p.created,
        "owned_by": "personatune",
        "description": p.description,
        "base_model": base_model,
        "persona": p.adapter is not None,
    }


async def _watch_disconnect(request: Request) -> None:
    # After the body is read, the next ASGI message is http.disconnect.
    while (await request.receive())["type"] != "http.disconnect":
        pass


# ---------------------------------------------------------------- the app


def create_app(
    registry: Registry,
    *,
    api_key: str | None = None,
    system_prompt_policy: SystemPolicy = "request-wins",
    max_queue: int = 16,
    max_tokens: int = 512,
) -> FastAPI:
    """Build the FastAPI app serving ``registry``'s personas.

    Args:
        registry: from :func:`personatune.serve.adapters.load_registry`.
        api_key: when set, ``/v1/*`` needs ``Authorization: Bearer <api_key>`` (else 401).
        system_prompt_policy: see :func:`conversation`.
        max_queue: requests that may wait for the generation worker; more get 429.
        max_tokens: answer length in tokens when a request names none.

    The generation worker starts with the app and, on shutdown, finishes queued requests
    before the app exits (uvicorn first waits for open responses). Run one app per
    registry at a time: two workers on one model would switch adapters under each other.
    """

    worker = Worker(registry.model, max_queue)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        worker.start()
        yield
        await run_in_threadpool(worker.stop)
        log.info("generation worker stopped after %d requests", sum(worker.finished.values()))

    app = FastAPI(title="personatune", lifespan=lifespan, docs_url="/docs", redoc_url=None)
    app.state.registry = registry
    app.state.worker = worker

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, e: ApiError):
        return e.response()

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, e: RequestValidationError):
        err = e.errors()[0]
        param = _error_param(err.get("loc", ()))
        msg = err.get("msg", "invalid request")
        if err.get("type") == "json_invalid":
            msg, param = "the request body is not valid JSON", None
        return ApiError(400, f"{param}: {msg}" if param else msg, param=param).response()

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, e: StarletteHTTPException):
        kind = "not_found" if e.status_code == 404 else None
        return ApiError(e.status_code, str(e.detail), code=kind).response()

    def check_key(request: Request) -> None:
        if not api_key:
            return
        given = request.headers.get("authorization", "")
        if not secrets.compare_digest(given.encode(), f"Bearer {api_key}".encode()):
            what = "Incorrect API key provided" if given else "Missing API key"
            raise ApiError(
                401,
                f"{what}: send the header 'Authorization: Bearer <key>' with "
                "the key the server was started with",
                code="invalid_api_key",
            )

    def persona_of(model: str) -> ServedPersona:
        try:
            return registry.personas[model]
        except KeyError:
            names = ", ".join(registry.personas)
            raise ApiError(
                404,
                f"The model '{model}' does not exist; this server has: {names}",
                code="model_not_found",
                param="model",
            ) from None

    @app.get("/health")
    async def health():
        return {
            "status": "ok",
            "base_model": registry.base_model,
            "models": list(registry.personas),
            "queue": worker.waiting,
            "max_queue": max_queue,
            "finished": dict(worker.finished),
        }

    @app.get("/v1/models", dependencies=[Depends(check_key)])
    async def models():
        return {
            "object": "list",
            "data": [_model_card(p, registry.base_model) for p in registry.personas.values()],
        }

    @app.get("/v1/models/{model_id}", dependencies=[Depends(check_key)])
    async def model(model_id: str):
        return _model_card(persona_of(model_id), registry.base_model)

    @app.post("/v1/chat/completions", dependencies=[Depends(check_key)])
    async def chat_completions(req: ChatRequest, request: Request):
        persona = persona_of(req.model)
        conv = conversation(req.messages, persona.system_prompt, system_prompt_policy)

        def tokenize() -> list[int]:
            try:
                text = render_prompt(persona.tokenizer, conv)
            except PersonatuneError as e:
                raise ApiError(400, str(e), param="messages") from None
            return persona.tokenizer(text, add_special_tokens=False)["input_ids"]

        ids = await run_in_threadpool(tokenize)
        room = registry.context_length - len(ids)
        if room < 1:
            raise ApiError(
                413,
                f"This model's maximum context length is "
                f"{registry.context_length} tokens, but the messages use {len(ids)} "
                "tokens; shorten the conversation",
                code="context_length_exceeded",
                param="messages",
            )
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()
        job = Job(
            adapter=persona.adapter,
            tokenizer=persona.tokenizer,
            input_ids=ids,
            max_new_tokens=min(req.max_completion_tokens or req.max_tokens or max_tokens, room),
            temperature=1.0 if req.temperature is None else req.temperature,
            top_p=1.0 if req.top_p is None else req.top_p,
            # transformers.set_seed needs 0 <= seed < 2**32; OpenAI allows any integer
            seed=secrets.randbits(31) if req.seed is None else req.seed % 2**32,
            stop=req.stop or [],
            emit=lambda ev: loop.call_soon_threadsafe(events.put_nowait, ev),
        )
        try:
            worker.submit(job)
        except QueueFull:
            raise ApiError(
                429,
                f"the server is busy: {max_queue} requests are waiting; retry shortly",
                type="rate_limit_error",
                code="rate_limit_exceeded",
            ) from None
        cid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        if req.stream:
            usage = bool(req.stream_options and req.stream_options.include_usage)
            return StreamingResponse(
                _sse(job, events, cid, created, req.model, usage),
                media_type="text/event-stream",
                headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
            )
        return await _complete(request, job, events, cid, created, req.model)

    app.mount("/static", StaticFiles(directory=STATIC), name="static")

    @app.get("/", include_in_schema=False)
    async def index():
        return FileResponse(STATIC / "index.html")

    return app


async def _complete(
    request: Request, job: Job, events: asyncio.Queue, cid: str, created: int, model: str
) -> JSONResponse:
    """Wait for the whole answer; stop generating if the client disconnects meanwhile."""
    watcher = asyncio.create_task(_watch_disconnect(request))
    text = ""
    try:
        while True:
            getter = asyncio.create_task(events.get())
            await asyncio.wait({getter, watcher}, return_when=asyncio.FIRST_COMPLETED)
            if not getter.done():
                getter.cancel()
                job.cancel.set()
                raise ApiError(499, "client closed the request")
            ev = getter.result()
            if isinstance(ev, Delta):
                text += ev.text
            elif isinstance(ev, Failed):
                raise ApiError(500, ev.message, type="server_error")
            elif isinstance(ev, Done):
                break
    finally:
        watcher.cancel()
    return JSONResponse(
        {
            "id": cid,
            "object": "chat.completion",
            "created": created,
            "model": model,
            "system_fingerprint": None,
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": text},
                    "logprobs": None,
                    "finish_reason": ev.finish_reason,
                }
            ],
            "usage": _usage(ev),
        }
    )


async def _sse(
    job: Job, events: asyncio.Queue, cid: str, created: int, model: str, include_usage: bool
) -> AsyncIterator[str]:
    """Server-sent events in OpenAI's chunk format, ending with ``data: [DONE]``. When
    the client goes away, Starlette cancels this generator and generation stops."""
    try:
        yield _chunk(cid, created, model, {"role": "assistant", "content": ""})
        while True:
            ev = await events.get()
            if isinstance(ev, Delta):
                yield _chunk(cid, created, model, {"content": ev.text})
            elif isinstance(ev, Failed):
                err = {"message": ev.message, "type": "server_error", "param": None, "code": None}
                yield f"data: {json.dumps({'error': err})}\n\n"
                break
            elif isinstance(ev, Done):
                yield _chunk(cid, created, model, {}, ev.finish_reason)
                if include_usage:
                    data = {
                        "id": cid,
                        "object": "chat.completion.chunk",
                        "created": created,
                        "model": model,
                        "choices": [],
                        "usage": _usage(ev),
                    }
                    yield f"data: {json.dumps(data)}\n\n"
                break
        yield "data: [DONE]\n\n"
    finally:
        job.cancel.set()  # a no-op once finished; stops generation if the client left


def bind(host: str, port: int) -> socket.socket:
    """A listening TCP socket on ``host:port`` (port 0 picks a free one).

    Raises:
        PersonatuneError: the address is taken or cannot be bound.
    """
    try:
        return socket.create_server((host, port), reuse_port=False)
    except OSError as e:
        raise PersonatuneError(
            f"cannot listen on {host}:{port} ({e.strerror}); "
            "pick another --port or stop the other server"
        ) from None


def run_server(app: FastAPI, sock: socket.socket, log_level: str = "info") -> None:
    """Serve ``app`` on ``sock`` with uvicorn until SIGINT or SIGTERM. Shutdown is
    graceful: no new connections, open responses finish, then queued jobs finish. The
    process then exits with status 0: uvicorn re-raises the signal it caught into the
    handler that was there before it, and the default one would end the process with 143
    (128 + SIGTERM), which systemd and Kubernetes read as a failure."""
    import signal
    import threading

    import uvicorn

    config = uvicorn.Config(app, log_level=log_level, timeout_graceful_shutdown=None)
    main = threading.current_thread() is threading.main_thread()  # signals: main thread only
    signals = (signal.SIGINT, signal.SIGTERM) if main else ()
    before = {sig: signal.signal(sig, lambda *_: None) for sig in signals}
    try:
        uvicorn.Server(config).run(sockets=[sock])
    finally:
        for sig, handler in before.items():
            signal.signal(sig, handler)
