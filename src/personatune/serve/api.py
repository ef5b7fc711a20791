"""The OpenAI-compatible wire format of ``personatune serve``: the request schema, errors
in OpenAI's format, the conversation a persona sees, and response chunks."""

from __future__ import annotations

import json
from typing import Literal

from fastapi import Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, field_validator

from personatune.engine import Done, ServedPersona

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
        self.status, self.message = status, message
        self.type, self.code, self.param = type, code, param

    def response(self) -> JSONResponse:
        err = {"message": self.message, "type": self.type, "param": self.param, "code": self.code}
        headers = {"WWW-Authenticate": "Bearer"} if self.status == 401 else None
        return JSONResponse({"error": err}, status_code=self.status, headers=headers)


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


def chunk(cid: str, created: int, model: str, delta: dict, finish: str | None = None) -> str:
    data = {
        "id": cid,
        "object": "chat.completion.chunk",
        "created": created,
        "model": model,
        "system_fingerprint": None,
        "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}],
    }
    return f"data: {json.dumps(data)}\n\n"


def usage(done: Done) -> dict:
    return {
        "prompt_tokens": done.prompt_tokens,
        "completion_tokens": done.completion_tokens,
        "total_tokens": done.prompt_tokens + done.completion_tokens,
    }


def model_card(p: ServedPersona, base_model: str) -> dict:
    return {
        "id": p.name,
        "object": "model",
        "created": p.created,
        "owned_by": "personatune",
        "description": p.description,
        "base_model": base_model,
        "persona": p.adapter is not None,
    }


async def watch_disconnect(request: Request) -> None:
    # After the body is read, the next ASGI message is http.disconnect.
    while (await request.receive())["type"] != "http.disconnect":
        pass
