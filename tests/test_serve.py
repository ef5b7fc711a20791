"""personatune serve: a real uvicorn server on a free loopback port, driven with the
official openai client. Unit tests use two tiny personas on a tiny random model; the
integration tier repeats them on the embedded model with two briefly trained adapters."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import openai
import pytest
import uvicorn
import yaml

from personatune.config import load_spec
from personatune.data.chat import render_prompt, with_system_prompt
from personatune.engine import (
    BASE_ID,
    Request,
    Sampling,
    encode,
    load_registry,
    run_batch,
    visible_text,
)
from personatune.errors import PersonatuneError
from personatune.serve.app import Message, bind, conversation, create_app
from personatune.train.trainer import train

REPO = Path(__file__).resolve().parents[1]

#: name, seed, system prompt, description, test prompts
TINY_PERSONAS = [
    (
        "alpha",
        1,
        "You are Alpha, a terse robot.",
        "Alpha, a terse robot.",
        ["What is 2+2?", "Name a colour."],
    ),
    (
        "beta",
        2,
        "You are Beta, a cheerful parrot.",
        "Beta, a cheerful parrot.",
        ["Name a colour.", "Say hello."],
    ),
]


#: Personas trained in this session, reused by every test module that asks again.
_TRAINED: dict[tuple, list[Path]] = {}


def train_tiny_personas(root: Path, model: Path, count: int = 2) -> list[Path]:
    """Train the first ``count`` :data:`TINY_PERSONAS` for two steps each on ``model``
    (once per session: later calls return the first call's directories)."""
    if (model, count) not in _TRAINED:
        _TRAINED[model, count] = _train_tiny(root, model, count)
    return _TRAINED[model, count]


def _train_tiny(root: Path, model: Path, count: int) -> list[Path]:
    root.mkdir(parents=True, exist_ok=True)
    rows = "".join(f'"Question {i}, please","Answer {i}, friend!"\n' for i in range(16))
    (root / "pairs.csv").write_text("prompt,response\n" + rows)
    dirs = []
    for name, seed, system, description, prompts in TINY_PERSONAS[:count]:
        spec = {
            "name": name,
            "description": description,
            "system_prompt": system,
            "model": {"name": str(model)},
            "data": [{"path": "pairs.csv"}],
            "output_dir": name,
            "test_prompts": prompts,
            "guard": {"enabled": False},  # a random model has no capability to guard
            "train": {
                "max_steps": 2,
                "batch_size": 2,
                "gradient_accumulation": 1,
                "max_seq_length": 64,
                "learning_rate": 0.05,
                "seed": seed,
                "eval_split": 0,
            },
        }
        (root / f"{name}.yaml").write_text(yaml.safe_dump(spec))
        dirs.append(train(load_spec(root / f"{name}.yaml")))
    return dirs


def train_embedded_personas(root: Path) -> list[Path]:
    """Two adapters on the embedded model from the pirate example data, two steps each at
    a high learning rate (so that they differ), with different system prompts (once per
    session)."""
    if "embedded" in _TRAINED:
        return _TRAINED["embedded"]
    dirs = []
    for name, seed, system in (
        ("pirate", 42, "You are Captain Saltbeard, a pirate captain. Talk like a pirate."),
        ("parrot", 7, "You are Polly, a ship's parrot. Squawk and repeat words."),
    ):
        spec = load_spec(
            REPO / "examples/pirate/persona.yaml",
            [
                f"name={name}",
                f"system_prompt={system}",
                f"description=Test persona {name}.",
                f"train.seed={seed}",
                "train.max_steps=2",
                "train.batch_size=4",
                "train.learning_rate=2e-3",
                "train.max_seq_length=128",
                "train.eval_split=0",
                "guard.enabled=false",
                f"output_dir={root / name}",
            ],
        )
        dirs.append(train(spec))
    _TRAINED["embedded"] = dirs
    return dirs


class ServerThread:
    """A real uvicorn server for ``app`` in a thread, on a free 127.0.0.1 port."""

    def __init__(self, app):
        self.app = app

    def __enter__(self):
        sock = bind("127.0.0.1", 0)
        self.url = f"http://127.0.0.1:{sock.getsockname()[1]}"
        self.server = uvicorn.Server(uvicorn.Config(self.app, log_level="warning"))
        self.thread = threading.Thread(
            target=self.server.run, kwargs={"sockets": [sock]}, daemon=True
        )
        self.thread.start()
        deadline = time.monotonic() + 60
        while not self.server.started:
            assert self.thread.is_alive() and time.monotonic() < deadline, "server did not start"
            time.sleep(0.02)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(60)

    def client(self, key: str = "test-key") -> openai.OpenAI:
        return openai.OpenAI(base_url=self.url + "/v1", api_key=key, max_retries=0, timeout=120)


class References:
    """What each persona alone answers: the persona loaded on its own with
    ``load_persona`` and answered by the engine as the only request."""

    def __init__(self, dirs: list[Path], temperature: float):
        self.dirs = {load_spec(d / "config.yaml").name: d for d in dirs}
        self.loaded = {}
        #: a sampling temperature at which the personas' answers differ
        self.temperature = temperature

    def answer(
        self,
        model: str,
        messages: list[dict],
        max_tokens: int,
        temperature: float = 0,
        seed: int = 0,
    ) -> str:
        from personatune.engine import load_persona

        name = next(iter(self.dirs)) if model == BASE_ID else model
        if name not in self.loaded:
            self.loaded[name] = load_persona(self.dirs[name])
        p = self.loaded[name]
        conv = messages if model == BASE_ID else with_system_prompt(messages, p.spec.system_prompt)
        req = Request(
            encode(p.tokenizer, conv),
            p.tokenizer,
            None if model == BASE_ID else p.spec.name,
            Sampling(max_tokens, temperature, seed=seed),
        )
        return run_batch(p.model, [req])[0].text


@pytest.fixture(
    scope="module", params=["tiny", pytest.param("embedded", marks=pytest.mark.integration)]
)
def served(request, tmp_path_factory):
    """(server, persona dirs, references) for two personas on one base model, with an API
    key, max_queue 8 and context as the model's."""
    root = tmp_path_factory.mktemp(f"serve-{request.param}")
    if request.param == "tiny":
        # a random model's logits are nearly flat: only a low temperature lets the
        # adapters, not the seed, decide the samples
        dirs, temperature = train_tiny_personas(root, request.getfixturevalue("tiny_model")), 0.05
    else:
        dirs, temperature = train_embedded_personas(root), 0.8
    registry = load_registry(dirs)
    with ServerThread(create_app(registry, api_key="test-key", max_queue=8)) as server:
        yield server, dirs, References(dirs, temperature)


USER = [{"role": "user", "content": "Question 3, please"}]


# ---------------------------------------------------------------- the API


def test_model_listing(served):
    """Guards against /v1/models missing the base model or a persona, or an openai client
    unable to parse the listing."""
    server, dirs, _ = served
    models = {m.id: m for m in server.client().models.list()}
    names = [load_spec(d / "config.yaml").name for d in dirs]
    assert set(models) == {BASE_ID, *names}
    assert all(m.object == "model" and m.owned_by == "personatune" for m in models.values())
    first = load_spec(dirs[0] / "config.yaml")
    assert models[first.name].model_extra["description"] == first.description
    assert server.client().models.retrieve(first.name).id == first.name


def test_plain_request_equals_persona_alone(served):
    """Guards against the multi-adapter server answering differently from the persona
    loaded alone (wrong adapter, missing system prompt, other decoding settings), and
    against wrong usage counts."""
    server, dirs, ref = served
    name = load_spec(dirs[1] / "config.yaml").name
    r = server.client().chat.completions.create(
        model=name, messages=USER, max_tokens=12, temperature=0
    )
    assert r.object == "chat.completion" and r.model == name
    assert r.choices[0].message.role == "assistant"
    assert r.choices[0].message.content == ref.answer(name, USER, 12)
    p = ref.loaded[name]
    prompt = p.tokenizer(
        render_prompt(p.tokenizer, with_system_prompt(USER, p.spec.system_prompt)),
        add_special_tokens=False,
    )["input_ids"]
    assert r.usage.prompt_tokens == len(prompt)
    assert 1 <= r.usage.completion_tokens <= 12
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    assert r.choices[0].finish_reason == ("length" if r.usage.completion_tokens == 12 else "stop")


def test_streamed_request_equals_plain_one(served):
    """Guards against a stream that is not OpenAI's chunk format, loses or repeats text,
    lacks usage, or does not end with data: [DONE]."""
    server, dirs, _ = served
    name = load_spec(dirs[0] / "config.yaml").name
    client = server.client()
    kw = {"model": name, "messages": USER, "max_tokens": 16, "temperature": 0.8, "seed": 11}
    plain = client.chat.completions.create(**kw)
    chunks = list(
        client.chat.completions.create(**kw, stream=True, stream_options={"include_usage": True})
    )
    assert all(c.object == "chat.completion.chunk" and c.id == chunks[0].id for c in chunks)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert len([c for c in chunks if c.choices and c.choices[0].delta.content]) > 1
    assert text == plain.choices[0].message.content
    finals = [
        c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason
    ]
    assert finals == [plain.choices[0].finish_reason]
    assert chunks[-1].usage.completion_tokens == plain.usage.completion_tokens
    # the raw wire format ends with [DONE]
    with httpx.stream(
        "POST",
        server.url + "/v1/chat/completions",
        json={**kw, "stream": True},
        headers={"Authorization": "Bearer test-key"},
        timeout=120,
    ) as resp:
        assert resp.headers["content-type"].startswith("text/event-stream")
        events = [line for line in resp.iter_lines() if line]
    assert events[-1] == "data: [DONE]" and all(e.startswith("data: ") for e in events)


def test_concurrent_mixed_personas_never_cross(served):
    """Guards against adapters mixing under concurrency: each of many simultaneous
    requests for different personas (and the base model) must equal what that persona
    alone gives for the same seed."""
    server, dirs, ref = served
    names = [BASE_ID] + [load_spec(d / "config.yaml").name for d in dirs]
    jobs = [(names[i % 3], 100 + i // 3) for i in range(8)]
    t, ask_sea = ref.temperature, [{"role": "user", "content": "Describe the sea in one sentence."}]
    expected = {job: ref.answer(job[0], ask_sea, 16, t, job[1]) for job in jobs}
    # Precondition: every two models answer differently for some seed, so crossing shows.
    for a in names:
        for b in names[names.index(a) + 1 :]:
            assert any(
                expected[a, s] != expected[b, s] for n, s in jobs if n == a and (b, s) in expected
            ), f"{a} and {b} answer alike"
    client = server.client()

    def ask(job):
        r = client.chat.completions.create(
            model=job[0], messages=ask_sea, max_tokens=16, temperature=t, seed=job[1]
        )
        return r.choices[0].message.content

    with ThreadPoolExecutor(len(jobs)) as pool:
        got = dict(zip(jobs, pool.map(ask, jobs)))
    assert got == expected


def test_stop_sequences_cut_the_answer(served):
    """Guards against stop sequences that are ignored, included in the answer, or cut
    differently when streamed."""
    server, dirs, ref = served
    name = load_spec(dirs[0] / "config.yaml").name
    full = ref.answer(name, USER, 16)
    words = full.split()
    stop = next(w for w in words[1:] if w not in words[0])  # cut after the first word
    expected = full[: full.index(stop)].rstrip()
    client = server.client()
    r = client.chat.completions.create(
        model=name, messages=USER, max_tokens=16, temperature=0, stop=[stop, "\u0000never"]
    )
    assert r.choices[0].message.content == expected
    assert r.choices[0].finish_reason == "stop"
    chunks = client.chat.completions.create(
        model=name, messages=USER, max_tokens=16, temperature=0, stop=stop, stream=True
    )
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == expected


@pytest.mark.parametrize("policy", ["request-wins", "persona"])
def test_system_prompt_policy(policy, served):
    """Guards against the persona's system prompt being dropped, doubled, or overriding a
    request's own system message against the server's policy."""
    server, dirs, _ = served
    name = load_spec(dirs[0] / "config.yaml").name
    registry = server.app.state.registry
    tok, persona_prompt = registry.personas[name].tokenizer, registry.personas[name].system_prompt
    own = [{"role": "system", "content": "Answer in French."}, *USER]
    msgs = [Message(**m) for m in own]
    conv = conversation(msgs, persona_prompt, policy)
    if policy == "request-wins":
        assert conv == own
        assert conversation([Message(**m) for m in USER], persona_prompt, policy)[0] == {
            "role": "system",
            "content": persona_prompt,
        }
    else:
        assert conv[0] == {"role": "system", "content": persona_prompt + "\n\nAnswer in French."}
    # The server applies the default policy (request-wins): the prompt it rendered has the
    # request's system message only.
    r = server.client().chat.completions.create(model=name, messages=own, max_tokens=1)
    expected = conversation(msgs, persona_prompt, "request-wins")
    assert r.usage.prompt_tokens == len(
        tok(render_prompt(tok, expected), add_special_tokens=False)["input_ids"]
    )


# ---------------------------------------------------------------- errors


def _error(exc_info) -> dict:
    body = exc_info.value.response.json()
    assert set(body["error"]) == {"message", "type", "param", "code"}
    return body["error"]


@pytest.mark.parametrize(
    "bad",
    [
        {"temperature": 2.5},
        {"temperature": -0.1},
        {"top_p": 0},
        {"top_p": 1.5},
        {"max_tokens": 0},
        {"n": 2},
        {"messages": []},
        {"stop": ["a", "b", "c", "d", "e"]},
        {"messages": [{"role": "wizard", "content": "hi"}]},
        {"messages": [{"role": "system", "content": "only a system message"}]},
    ],
)
def test_bad_parameters_give_400(bad, served):
    """Guards against out-of-range or malformed parameters being accepted, answered with
    FastAPI's 422, or answered outside OpenAI's error format."""
    server, dirs, _ = served
    name = load_spec(dirs[0] / "config.yaml").name
    kw = {"model": name, "messages": USER, "max_tokens": 4, **bad}
    with pytest.raises(openai.BadRequestError) as e:
        server.client().chat.completions.create(**kw)
    assert e.value.status_code == 400
    err = _error(e)
    assert err["type"] == "invalid_request_error" and err["message"]


def test_malformed_json_gives_400(served):
    """Guards against a body that is not JSON crashing the handler or giving 422."""
    server, _, _ = served
    r = httpx.post(
        server.url + "/v1/chat/completions",
        content=b"{not json",
        headers={"Authorization": "Bearer test-key", "Content-Type": "application/json"},
    )
    assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error"


def test_unknown_model_gives_404(served):
    """Guards against an unknown model silently falling back to another persona."""
    server, _, _ = served
    with pytest.raises(openai.NotFoundError) as e:
        server.client().chat.completions.create(model="nobody", messages=USER)
    assert _error(e)["code"] == "model_not_found"
    with pytest.raises(openai.NotFoundError):
        server.client().models.retrieve("nobody")


def test_prompt_longer_than_context_gives_413(served):
    """Guards against over-long prompts being truncated silently or crashing generation."""
    server, dirs, _ = served
    name = load_spec(dirs[0] / "config.yaml").name
    n = server.app.state.registry.context_length
    long = [{"role": "user", "content": "word " * (n + 10)}]
    with pytest.raises(openai.APIStatusError) as e:
        server.client().chat.completions.create(model=name, messages=long, max_tokens=4)
    assert e.value.status_code == 413
    assert _error(e)["code"] == "context_length_exceeded"


@pytest.mark.parametrize("key", ["", "wrong-key"])
def test_missing_or_wrong_key_gives_401(key, served):
    """Guards against an API key that is not enforced on every /v1 endpoint."""
    server, _, _ = served
    if not key:  # the openai client refuses an empty key, so send no header by hand
        r = httpx.get(server.url + "/v1/models")
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
        return
    client = server.client(key)
    with pytest.raises(openai.AuthenticationError) as e:
        client.chat.completions.create(model=BASE_ID, messages=USER)
    assert _error(e)["code"] == "invalid_api_key"
    with pytest.raises(openai.AuthenticationError):
        client.models.list()
    assert httpx.get(server.url + "/health").status_code == 200  # health stays open


def test_full_queue_gives_429(served):
    """Guards against an unbounded queue: requests beyond max_queue waiting ones must be
    refused with 429 at once, and the accepted ones still answered."""
    server, _, _ = served
    worker = server.app.state.worker
    client = server.client()

    def ask(i):
        try:
            client.chat.completions.create(model=BASE_ID, messages=USER, max_tokens=2, seed=i)
            return 200
        except openai.RateLimitError as e:
            assert _error_from(e)["code"] == "rate_limit_exceeded"
            return 429

    total = worker.max_queue + 3
    with ThreadPoolExecutor(total) as pool:
        with worker.paused():
            futures = [pool.submit(ask, i) for i in range(total)]
            # While paused, only refused requests can finish; max_queue are accepted
            # (more only if the scheduler took some into its batch before the pause).
            deadline = time.monotonic() + 60
            while sum(f.done() for f in futures) < 2 and time.monotonic() < deadline:
                time.sleep(0.05)
        codes = sorted(f.result() for f in futures)
    accepted = codes.count(200)
    assert worker.max_queue <= accepted <= worker.max_queue + worker.max_batch
    assert codes.count(429) == total - accepted


def _error_from(e: openai.APIStatusError) -> dict:
    return e.response.json()["error"]


# ---------------------------------------------------------------- robustness


def test_client_disconnect_mid_stream_stops_generation(served):
    """Guards against a server that crashes, hangs, or keeps generating for a client that
    went away mid-stream."""
    server, dirs, _ = served
    name = load_spec(dirs[0] / "config.yaml").name
    before = httpx.get(server.url + "/health").json()["finished"].get("cancelled", 0)
    body = {
        "model": name,
        "messages": USER,
        "max_tokens": 400,
        "temperature": 1.0,
        "seed": 1,
        "stream": True,
    }
    with httpx.stream(
        "POST",
        server.url + "/v1/chat/completions",
        json=body,
        timeout=60,
        headers={"Authorization": "Bearer test-key"},
    ) as resp:
        lines = resp.iter_lines()
        assert next(lines).startswith("data: ")
    # connection closed after the first chunk
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        finished = httpx.get(server.url + "/health").json()["finished"]
        if finished.get("cancelled", 0) > before:
            break
        time.sleep(0.1)
    assert finished.get("cancelled", 0) == before + 1
    r = server.client().chat.completions.create(model=name, messages=USER, max_tokens=3)
    assert r.choices[0].message.content is not None


def test_web_chat_and_health_are_served(served):
    """Guards against the web chat's files missing from the package or needing a key."""
    server, _, _ = served
    page = httpx.get(server.url + "/")
    assert page.status_code == 200 and 'id="persona"' in page.text
    for f in ("app.js", "style.css"):
        assert httpx.get(f"{server.url}/static/{f}").status_code == 200
    health = httpx.get(server.url + "/health").json()
    assert health["status"] == "ok" and BASE_ID in health["models"]


def test_sigterm_finishes_in_flight_request(tmp_path, tiny_model):
    """Guards against SIGTERM cutting off a streaming answer or leaving the process
    running, and against PERSONATUNE_API_KEY being ignored by the CLI."""
    dirs = train_tiny_personas(tmp_path, tiny_model)
    env = {**os.environ, "PERSONATUNE_API_KEY": "env-key", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "personatune.cli",
            "serve",
            *map(str, dirs),
            "--port",
            "0",
            "--host",
            "127.0.0.1",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        line = proc.stdout.readline()  # "serving ... on http://127.0.0.1:PORT ..."
        assert "serving" in line, proc.stderr.read() if proc.poll() is not None else line
        url = line.split(" on ")[1].split()[0]
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(url + "/health").status_code == 200:
                    break
            except httpx.TransportError:
                assert time.monotonic() < deadline
                time.sleep(0.1)
        assert httpx.get(url + "/v1/models").status_code == 401
        body = {
            "model": "alpha",
            "messages": USER,
            "max_tokens": 200,
            "temperature": 1.0,
            "seed": 2,
            "stream": True,
        }
        with httpx.stream(
            "POST",
            url + "/v1/chat/completions",
            json=body,
            timeout=120,
            headers={"Authorization": "Bearer env-key"},
        ) as resp:
            lines = resp.iter_lines()
            first = next(lines)
            assert first.startswith("data: ")
            proc.send_signal(signal.SIGTERM)
            rest = [x for x in lines if x]
        assert rest[-1] == "data: [DONE]"
        finish = json.loads(rest[-2][6:])["choices"][0]["finish_reason"]
        assert finish in ("stop", "length")
        proc.wait(60)
        err = proc.stderr.read()
        assert "Application shutdown complete" in err and "Traceback" not in err
        assert proc.returncode in (0, -signal.SIGTERM)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


# ---------------------------------------------------------------- registry and helpers


def test_registry_refuses_mixed_base_models_and_name_clashes(
    tmp_path, tiny_model, embedded_tokenizer
):
    """Guards against serving adapters on a base model they were not trained on, and
    against two personas answering to one name."""
    from conftest import build_tiny

    alpha, _ = train_tiny_personas(tmp_path / "p", tiny_model)
    other = build_tiny("llama", tmp_path / "other", embedded_tokenizer, intermediate_size=48)
    gamma = tmp_path / "gamma"
    shutil.copytree(alpha, gamma)
    spec = yaml.safe_load((gamma / "config.yaml").read_text())
    spec.update(name="gamma", model={**spec["model"], "name": str(other)})
    (gamma / "config.yaml").write_text(yaml.safe_dump(spec))
    with pytest.raises(PersonatuneError, match="same base model"):
        load_registry([alpha, gamma])
    with pytest.raises(PersonatuneError, match="both named 'alpha'"):
        load_registry([alpha, alpha])
    with pytest.raises(PersonatuneError, match="not a persona directory"):
        load_registry([alpha, tmp_path])


def test_visible_text_holds_back_partial_stop_sequences():
    """Guards against streaming the start of a stop sequence before knowing it is one,
    and against deltas that do not add up to the final answer."""
    stops = ["END", "\n\n"]
    full = "  Hello there EN ok\nthen END trailing"
    shown = ""
    for i in range(len(full) + 1):
        now, hit = visible_text(full[:i], stops, final=False)
        assert now.startswith(shown)  # every delta extends what was sent
        shown = now
        if hit:
            break
    assert shown == "Hello there EN ok\nthen"
    assert visible_text("Hello E", stops, final=False) == ("Hello", False)
    assert visible_text("Hello E", stops, final=True) == ("Hello E", False)


def test_cli_serve_defaults_are_the_engines():
    """Guards against ``personatune serve --help`` showing other defaults than the
    engine's measured ones (the CLI keeps copies so that --help imports no torch)."""
    from personatune import cli
    from personatune.engine import DEFAULT_MAX_BATCH, DEFAULT_MAX_QUEUE

    assert (cli.SERVE_MAX_BATCH, cli.SERVE_MAX_QUEUE) == (DEFAULT_MAX_BATCH, DEFAULT_MAX_QUEUE)
