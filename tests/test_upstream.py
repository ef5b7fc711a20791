"""personatune serve --upstream against a second, real personatune serve process as the
upstream (tiny personas on 127.0.0.1), and --print-vllm."""

from __future__ import annotations

import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import openai
import pytest
import yaml
from test_serve import USER, train_tiny_personas
from typer.testing import CliRunner

from personatune import cli
from personatune.config import load_spec


def start_serve(*args: str, key: str | None = None) -> tuple[subprocess.Popen, str]:
    """Start ``personatune serve ARGS --port 0`` on 127.0.0.1; return it and its URL."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "PERSONATUNE_API_KEY": key or ""}
    cmd = [sys.executable, "-m", "personatune.cli", "serve", *args, "--port", "0"]
    proc = subprocess.Popen(
        [*cmd, "--host", "127.0.0.1", "--log-level", "warning"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    line = proc.stdout.readline()
    if "serving" not in line:
        proc.kill()
        raise AssertionError(proc.stderr.read())
    url = line.split(" on ")[1].split()[0]
    deadline = time.monotonic() + 60
    while True:
        try:
            if httpx.get(url + "/health").status_code == 200:
                return proc, url
        except httpx.TransportError:
            assert time.monotonic() < deadline, "server did not answer /health"
            time.sleep(0.1)


def stop(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(60)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


@pytest.fixture(scope="module")
def servers(tmp_path_factory, tiny_model):
    """(front URL, upstream URL, persona dirs): the upstream generates with the tiny
    personas (key ``up-key``); the front forwards to it (key ``front-key``)."""
    dirs = train_tiny_personas(tmp_path_factory.mktemp("upstream"), tiny_model)
    up, up_url = start_serve(*map(str, dirs), "--max-batch", "4", key="up-key")
    try:
        env_key = os.environ.get("PERSONATUNE_UPSTREAM_KEY")
        os.environ["PERSONATUNE_UPSTREAM_KEY"] = "up-key"
        try:
            front, url = start_serve(*map(str, dirs), "--upstream", up_url, key="front-key")
        finally:
            os.environ.pop("PERSONATUNE_UPSTREAM_KEY")
            if env_key is not None:
                os.environ["PERSONATUNE_UPSTREAM_KEY"] = env_key
        try:
            yield url, up_url, dirs
        finally:
            stop(front)
    finally:
        stop(up)


def _client(url: str, key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=url + "/v1", api_key=key, max_retries=0, timeout=120)


def test_plain_and_streamed_answers_equal_the_upstream(servers):
    """Guards against the forwarding server changing answers: wrong model name upstream,
    a lost or doubled system prompt, lost sampling settings, text lost in streaming, or
    missing usage and finish reasons."""
    url, up_url, dirs = servers
    name = load_spec(dirs[0] / "config.yaml").name
    front, up = _client(url, "front-key"), _client(up_url, "up-key")
    kw = {"model": name, "messages": USER, "max_tokens": 12, "temperature": 0.8, "seed": 5}
    direct = up.chat.completions.create(**kw)
    via = front.chat.completions.create(**kw)
    assert via.choices[0].message.content == direct.choices[0].message.content
    assert via.choices[0].finish_reason == direct.choices[0].finish_reason
    assert via.usage.completion_tokens == direct.usage.completion_tokens
    assert via.usage.prompt_tokens == direct.usage.prompt_tokens
    chunks = list(
        front.chat.completions.create(**kw, stream=True, stream_options={"include_usage": True})
    )
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == direct.choices[0].message.content
    assert chunks[-1].usage.completion_tokens == direct.usage.completion_tokens
    # the base model too, and the front's own listing with descriptions
    base = {"model": "base", "messages": USER, "max_tokens": 6, "temperature": 0}
    assert (
        front.chat.completions.create(**base).choices[0].message.content
        == up.chat.completions.create(**base).choices[0].message.content
    )
    cards = {m.id: m for m in front.models.list()}
    assert cards[name].model_extra["description"] == load_spec(dirs[0] / "config.yaml").description
    assert httpx.get(url + "/").status_code == 200  # the web chat is served by the front


def test_upstream_errors_pass_through(servers):
    """Guards against upstream errors becoming 500s or losing OpenAI's error fields, and
    against the front's own key checks and 404s being skipped."""
    url, _, _ = servers
    front = _client(url, "front-key")
    long = [{"role": "user", "content": "word " * 600}]  # over the tiny model's 512 tokens
    with pytest.raises(openai.APIStatusError) as e:
        front.chat.completions.create(model="alpha", messages=long, max_tokens=4)
    assert e.value.status_code == 413
    assert e.value.response.json()["error"]["code"] == "context_length_exceeded"
    with pytest.raises(openai.NotFoundError):
        front.chat.completions.create(model="nobody", messages=USER)
    with pytest.raises(openai.AuthenticationError):
        _client(url, "up-key").models.list()


def test_client_disconnect_closes_the_upstream_request(servers):
    """Guards against a forwarded request that keeps generating upstream after its
    client left (streamed and plain)."""
    url, up_url, _ = servers

    def cancelled() -> int:
        return httpx.get(up_url + "/health").json()["finished"].get("cancelled", 0)

    before = cancelled()
    body = {"model": "alpha", "messages": USER, "max_tokens": 400, "temperature": 1.0,
            "seed": 1, "stream": True}  # fmt: skip
    headers = {"Authorization": "Bearer front-key"}
    with httpx.stream(
        "POST", url + "/v1/chat/completions", json=body, headers=headers, timeout=60
    ) as resp:
        assert next(resp.iter_lines()).startswith("data: ")
    with pytest.raises(httpx.ReadTimeout):  # plain request, client gives up after 0.5 s
        httpx.post(
            url + "/v1/chat/completions",
            json={**body, "stream": False},
            headers=headers,
            timeout=httpx.Timeout(60, read=0.5),
        )
    deadline = time.monotonic() + 60
    while cancelled() < before + 2 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert cancelled() == before + 2


def test_unreachable_upstream_gives_502(tmp_path, tiny_model):
    """Guards against an upstream that is down hanging the request or answering 500."""
    dirs = train_tiny_personas(tmp_path / "p", tiny_model)
    import socket

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    front, url = start_serve(*map(str, dirs), "--upstream", f"http://127.0.0.1:{port}")
    try:
        r = httpx.post(url + "/v1/chat/completions", json={"model": "alpha", "messages": USER})
        assert r.status_code == 502 and r.json()["error"]["code"] == "upstream_unavailable"
    finally:
        stop(front)


def test_print_vllm_command(tmp_path, tiny_model):
    """Guards against a vLLM command that names adapters other than by persona name, a
    max LoRA rank below an adapter's or one vLLM refuses, or one adapter per batch."""
    dirs = train_tiny_personas(tmp_path / "p", tiny_model)
    result = CliRunner().invoke(cli.app, ["serve", *map(str, dirs), "--print-vllm"])
    assert result.exit_code == 0, result.output
    args = shlex.split(result.stdout.strip())
    assert args[:3] == ["vllm", "serve", str(Path(tiny_model).resolve())]
    mods = args[args.index("--lora-modules") + 1 : args.index("--max-lora-rank")]
    assert mods == [f"{load_spec(d / 'config.yaml').name}={d.resolve()}" for d in dirs]
    assert args[args.index("--max-lora-rank") + 1] == "16"  # rank 16 adapters
    assert args[args.index("--max-loras") + 1] == "2"
    assert args[args.index("--served-model-name") + 1] == "base"
    assert "--enable-lora" in args
    # a GGUF base (the embedded model) cannot be served by vLLM: a clear error
    gguf = tmp_path / "gguf"
    import shutil

    shutil.copytree(dirs[0], gguf)
    spec = yaml.safe_load((gguf / "config.yaml").read_text())
    spec["model"]["name"] = "embedded"
    (gguf / "config.yaml").write_text(yaml.safe_dump(spec))
    result = CliRunner().invoke(cli.app, ["serve", str(gguf), "--print-vllm"])
    assert result.exit_code == 2 and "GGUF" in result.output
