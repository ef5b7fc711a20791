"""Where a server's answers come from: this process's engine (:class:`LocalBackend`,
continuous batching over the personas' adapters) or any OpenAI-compatible engine that
serves each adapter under the persona's name (:class:`UpstreamBackend`: vLLM, SGLang,
another ``personatune serve``)."""

from __future__ import annotations

import asyncio
import json
import logging
import secrets
from collections import Counter
from collections.abc import AsyncIterator

import httpx
from starlette.concurrency import run_in_threadpool

from personatune.engine import (
    Delta,
    Done,
    Event,
    Failed,
    QueueFull,
    Registry,
    Request,
    Sampling,
    Scheduler,
    ServedPersona,
    encode,
)
from personatune.errors import PersonatuneError
from personatune.serve.api import ApiError, ChatRequest

log = logging.getLogger("uvicorn.error")


def answer_limit(req: ChatRequest, default: int) -> int:
    """The answer length in tokens the request asks for, else ``default``."""
    return req.max_completion_tokens or req.max_tokens or default


class LocalBackend:
    """Generation in this process: a :class:`personatune.engine.Scheduler` thread on the
    registry's model.

    Args:
        registry: from :func:`personatune.engine.load_registry`.
        max_batch: requests decoded together.
        max_queue: requests that may wait to join the batch; more get 429.
    """

    def __init__(self, registry: Registry, max_batch: int, max_queue: int):
        self.registry = registry
        self.personas = registry.personas
        self.base_model = registry.base_model
        self.scheduler = Scheduler(registry.model, max_batch, max_queue)

    async def start(self) -> None:
        self.scheduler.start()

    async def stop(self) -> None:
        """Finish queued and running requests (SIGTERM drain), then end the thread."""
        await run_in_threadpool(self.scheduler.stop)
        log.info("generation stopped after %d requests", sum(self.scheduler.finished.values()))

    def health(self) -> dict:
        s = self.scheduler
        return {
            "queue": s.waiting,
            "running": s.running,
            "max_queue": s.max_queue,
            "max_batch": s.max_batch,
            "finished": dict(s.finished),
        }

    async def open(
        self, persona: ServedPersona, conv: list[dict], req: ChatRequest, max_tokens: int
    ) -> AsyncIterator[Event]:
        """Queue the request; returns its events. Closing the iterator cancels it.

        Raises:
            ApiError: 400 (the chat template fails), 413 (prompt longer than the
                context), 429 (``max_queue`` requests wait already).
        """
        try:
            ids = await run_in_threadpool(encode, persona.tokenizer, conv)
        except PersonatuneError as e:
            raise ApiError(400, str(e), param="messages") from None
        context = self.registry.context_length
        room = context - len(ids)
        if room < 1:
            raise ApiError(
                413,
                f"This model's maximum context length is {context} tokens, but the "
                f"messages use {len(ids)} tokens; shorten the conversation",
                code="context_length_exceeded",
                param="messages",
            )
        loop = asyncio.get_running_loop()
        events: asyncio.Queue[Event] = asyncio.Queue()
        request = Request(
            ids,
            persona.tokenizer,
            persona.adapter,
            Sampling(
                max_tokens=min(answer_limit(req, max_tokens), room),
                temperature=1.0 if req.temperature is None else req.temperature,
                top_p=1.0 if req.top_p is None else req.top_p,
                seed=secrets.randbits(63) if req.seed is None else req.seed,
                stop=req.stop or [],
            ),
            emit=lambda ev: loop.call_soon_threadsafe(events.put_nowait, ev),
        )
        try:
            self.scheduler.submit(request)
        except QueueFull:
            raise ApiError(
                429,
                f"the server is busy: {self.scheduler.max_queue} requests are waiting; "
                "retry shortly",
                type="rate_limit_error",
                code="rate_limit_exceeded",
            ) from None
        return _drain(events, request)


async def _drain(events: asyncio.Queue, request: Request) -> AsyncIterator[Event]:
    try:
        while True:
            ev = await events.get()
            yield ev
            if isinstance(ev, (Done, Failed)):
                return
    finally:
        request.cancel.set()  # a no-op once finished; stops generation if the client left


class UpstreamBackend:
    """Generation forwarded to an OpenAI-compatible server that serves each persona's
    adapter under the persona's name (and the base model as ``base``). This server keeps
    the personas, system prompts and policy, API keys, the web chat and the error format;
    the upstream decodes. Upstream errors are passed through with their status and
    OpenAI error body; closing a response closes the upstream request.

    Args:
        url: the upstream's base URL, e.g. ``http://gpu-host:8000`` (``/v1`` is added).
        personas: from :func:`personatune.engine.describe_personas`.
        base_model: the base model's name, for ``/v1/models``.
        api_key: sent upstream as ``Authorization: Bearer``; None sends none.
        timeout: seconds to connect and between streamed chunks (default 600).
    """

    def __init__(
        self,
        url: str,
        personas: dict[str, ServedPersona],
        base_model: str,
        api_key: str | None = None,
        timeout: float = 600,
    ):
        self.url = url.rstrip("/").removesuffix("/v1")
        self.personas = personas
        self.base_model = base_model
        self.api_key = api_key
        self.timeout = timeout
        self.finished: Counter[str] = Counter()
        self.client: httpx.AsyncClient | None = None

    async def start(self) -> None:
        headers = {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}
        self.client = httpx.AsyncClient(
            base_url=self.url, headers=headers, timeout=self.timeout, limits=httpx.Limits(
                max_connections=None, max_keepalive_connections=64)
        )  # fmt: skip

    async def stop(self) -> None:
        if self.client is not None:
            await self.client.aclose()

    def health(self) -> dict:
        return {"upstream": self.url, "finished": dict(self.finished)}

    async def open(
        self, persona: ServedPersona, conv: list[dict], req: ChatRequest, max_tokens: int
    ) -> AsyncIterator[Event]:
        """Send the request upstream (always streamed, usage included); returns its
        events.

        Raises:
            ApiError: the upstream's own error (status and body passed through), or 502
                when it cannot be reached.
        """
        body: dict = {
            "model": persona.name,
            "messages": conv,
            "max_tokens": answer_limit(req, max_tokens),
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        body |= req.model_dump(include={"temperature", "top_p", "seed"}, exclude_none=True)
        if req.stop:
            body["stop"] = req.stop
        try:
            resp = await self.client.send(
                self.client.build_request("POST", "/v1/chat/completions", json=body), stream=True
            )
        except httpx.HTTPError as e:
            raise ApiError(
                502,
                f"the upstream {self.url} did not answer ({type(e).__name__}: {e}); "
                "check that it runs and serves this persona",
                type="server_error",
                code="upstream_unavailable",
            ) from None
        if resp.status_code != 200:
            raw = await resp.aread()
            await resp.aclose()
            raise _passed_through(resp.status_code, raw)
        return self._events(resp)

    async def _events(self, resp: httpx.Response) -> AsyncIterator[Event]:
        finish, counts, reason = None, {}, "cancelled"
        try:
            async for line in resp.aiter_lines():
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    break
                obj = json.loads(data)
                if "error" in obj:
                    reason = "error"
                    yield Failed(str((obj["error"] or {}).get("message", obj["error"])))
                    return
                for choice in obj.get("choices") or []:
                    if text := (choice.get("delta") or {}).get("content"):
                        yield Delta(text)
                    finish = choice.get("finish_reason") or finish
                counts = obj.get("usage") or counts
            reason = finish or "stop"
            yield Done(reason, counts.get("prompt_tokens", 0), counts.get("completion_tokens", 0))
        except (httpx.HTTPError, json.JSONDecodeError) as e:
            reason = "error"
            yield Failed(f"the upstream broke off ({type(e).__name__}: {e})")
        finally:
            self.finished[reason] += 1
            await resp.aclose()  # a client that left closes the upstream request here


def _passed_through(status: int, raw: bytes) -> ApiError:
    """An upstream error response as an :class:`ApiError` with the same status and the
    same OpenAI error fields (a body that is not one becomes the message)."""
    try:
        err = json.loads(raw)["error"]
        if isinstance(err, str):
            err = {"message": err}
    except (ValueError, KeyError, TypeError):
        err = {"message": raw.decode(errors="replace")[:500] or f"upstream HTTP {status}"}
    return ApiError(
        status,
        str(err.get("message", "")),
        type=err.get("type") or "upstream_error",
        code=err.get("code"),
        param=err.get("param"),
    )
