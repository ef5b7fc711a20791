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
from collections.abc import AsyncIterator, Callable
from pathlib import Path

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, StreamingResponse
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException as StarletteHTTPException

from personatune.engine import DEFAULT_MAX_BATCH, DEFAULT_MAX_QUEUE, Delta, Done, Failed, Registry
from personatune.errors import PersonatuneError
from personatune.serve.api import (
    ApiError,
    ChatRequest,
    Message,
    SystemPolicy,
    chunk,
    conversation,
    model_card,
    usage,
    watch_disconnect,
)
from personatune.serve.backend import LocalBackend, UpstreamBackend

__all__ = ["ApiError", "Message", "bind", "conversation", "create_app", "run_server"]

log = logging.getLogger("uvicorn.error")  # uvicorn's server log, so the messages show
STATIC = Path(__file__).parent / "static"
Backend = LocalBackend | UpstreamBackend


def create_app(
    source: Registry | UpstreamBackend,
    *,
    api_key: str | None = None,
    system_prompt_policy: SystemPolicy = "request-wins",
    max_queue: int = DEFAULT_MAX_QUEUE,
    max_batch: int = DEFAULT_MAX_BATCH,
    max_tokens: int = 512,
) -> FastAPI:
    """Build the FastAPI app serving ``source``'s personas.

    Args:
        source: a registry from :func:`personatune.engine.load_registry` (generation in
            this process), or an :class:`UpstreamBackend` (generation forwarded).
        api_key: when set, ``/v1/*`` needs ``Authorization: Bearer <api_key>`` (else 401).
        system_prompt_policy: see :func:`personatune.serve.api.conversation`.
        max_queue: requests that may wait to join the running batch; more get 429.
        max_batch: requests decoded together (continuous batching).
        max_tokens: answer length in tokens when a request names none.

    The engine starts with the app and, on shutdown, finishes queued and running
    requests before the app exits (uvicorn first waits for open responses). Run one app
    per registry at a time: two engines on one model would switch adapters under each
    other.
    """
    backend = LocalBackend(source, max_batch, max_queue) if isinstance(source, Registry) else source
    app = FastAPI(title="personatune", lifespan=_lifespan(backend), redoc_url=None)
    app.state.backend = backend
    if isinstance(backend, LocalBackend):  # what tests and the health page look at
        app.state.registry, app.state.worker = backend.registry, backend.scheduler
    _add_error_handlers(app)
    check_key = _key_check(api_key)
    _add_model_routes(app, backend, check_key)
    _add_chat_route(app, backend, check_key, system_prompt_policy, max_tokens)
    _add_web_chat(app)
    return app


def _lifespan(backend: Backend):
    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        await backend.start()
        yield
        await backend.stop()

    return lifespan


def _add_error_handlers(app: FastAPI) -> None:
    """Every error in OpenAI's format; FastAPI's 422 becomes 400."""

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, e: ApiError):
        return e.response()

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, e: RequestValidationError):
        err = e.errors()[0]
        param = ".".join(str(p) for p in err.get("loc", ()) if p != "body")
        msg = err.get("msg", "invalid request")
        if err.get("type") == "json_invalid":
            msg, param = "the request body is not valid JSON", None
        return ApiError(400, f"{param}: {msg}" if param else msg, param=param).response()

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, e: StarletteHTTPException):
        kind = "not_found" if e.status_code == 404 else None
        return ApiError(e.status_code, str(e.detail), code=kind).response()


def _key_check(api_key: str | None) -> Callable[[Request], None]:
    """A dependency that answers 401 unless the request carries the API key."""

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

    return check_key


def _persona_of(backend: Backend, model: str):
    try:
        return backend.personas[model]
    except KeyError:
        names = ", ".join(backend.personas)
        raise ApiError(
            404,
            f"The model '{model}' does not exist; this server has: {names}",
            code="model_not_found",
            param="model",
        ) from None


def _add_model_routes(app: FastAPI, backend: Backend, check_key) -> None:
    """``/health`` (open) and ``/v1/models`` (behind the key)."""

    @app.get("/health")
    async def health():
        return {
            "status": "ok",
            "base_model": backend.base_model,
            "models": list(backend.personas),
            **backend.health(),
        }

    @app.get("/v1/models", dependencies=[Depends(check_key)])
    async def models():
        cards = [model_card(p, backend.base_model) for p in backend.personas.values()]
        return {"object": "list", "data": cards}

    @app.get("/v1/models/{model_id}", dependencies=[Depends(check_key)])
    async def model(model_id: str):
        return model_card(_persona_of(backend, model_id), backend.base_model)


def _add_chat_route(
    app: FastAPI, backend: Backend, check_key, policy: SystemPolicy, max_tokens: int
) -> None:
    """``/v1/chat/completions``: plain or streamed (server-sent events)."""

    @app.post("/v1/chat/completions", dependencies=[Depends(check_key)])
    async def chat_completions(req: ChatRequest, request: Request):
        persona = _persona_of(backend, req.model)
        conv = conversation(req.messages, persona.system_prompt, policy)
        events = await backend.open(persona, conv, req, max_tokens)
        cid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        if req.stream:
            with_usage = bool(req.stream_options and req.stream_options.include_usage)
            return StreamingResponse(
                _sse(events, cid, created, req.model, with_usage),
                media_type="text/event-stream",
                headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
            )
        return await _complete(request, events, cid, created, req.model)


def _add_web_chat(app: FastAPI) -> None:
    app.mount("/static", StaticFiles(directory=STATIC), name="static")

    @app.get("/", include_in_schema=False)
    async def index():
        return FileResponse(STATIC / "index.html")


async def _complete(
    request: Request, events: AsyncIterator, cid: str, created: int, model: str
) -> JSONResponse:
    """Wait for the whole answer; stop generating if the client disconnects meanwhile."""
    watcher = asyncio.create_task(watch_disconnect(request))
    text = ""
    try:
        while True:
            getter = asyncio.ensure_future(anext(events))
            await asyncio.wait({getter, watcher}, return_when=asyncio.FIRST_COMPLETED)
            if not getter.done():
                getter.cancel()
                with contextlib.suppress(asyncio.CancelledError, StopAsyncIteration):
                    await getter
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
        await events.aclose()  # cancels generation if it is still going
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
            "usage": usage(ev),
        }
    )


async def _sse(
    events: AsyncIterator, cid: str, created: int, model: str, include_usage: bool
) -> AsyncIterator[str]:
    """Server-sent events in OpenAI's chunk format, ending with ``data: [DONE]``. When
    the client goes away, Starlette cancels this generator and generation stops."""
    try:
        yield chunk(cid, created, model, {"role": "assistant", "content": ""})
        async for ev in events:
            if isinstance(ev, Delta):
                yield chunk(cid, created, model, {"content": ev.text})
            elif isinstance(ev, Failed):
                err = {"message": ev.message, "type": "server_error", "param": None, "code": None}
                yield f"data: {json.dumps({'error': err})}\n\n"
                break
            elif isinstance(ev, Done):
                yield chunk(cid, created, model, {}, ev.finish_reason)
                if include_usage:
                    data = {
                        "id": cid,
                        "object": "chat.completion.chunk",
                        "created": created,
                        "model": model,
                        "choices": [],
                        "usage": usage(ev),
                    }
                    yield f"data: {json.dumps(data)}\n\n"
                break
        yield "data: [DONE]\n\n"
    finally:
        await events.aclose()  # stops generation if the client left


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
