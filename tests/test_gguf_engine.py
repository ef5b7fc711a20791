"""The llama.cpp engine (--engine llama-cpp): the same answers as the torch engine for
every persona and the base model in one process (per-request adapters), through the batch
API, the scheduler's events, personatune chat and personatune serve."""

from __future__ import annotations

import pytest
from test_serve import USER, ServerThread, train_tiny_personas
from typer.testing import CliRunner

from personatune.cli import app
from personatune.engine import BASE_ID, Delta, Done, Request, Sampling, ask, load_registry

pytest.importorskip("llama_cpp", reason="needs llama-cpp-python (extra llama-cpp)")

from personatune.engine import llama_cpp as engine_llama  # noqa: E402

runner = CliRunner()


@pytest.fixture(scope="module")
def dirs(tmp_path_factory, tiny_model):
    return train_tiny_personas(tmp_path_factory.mktemp("llama-engine"), tiny_model, count=2)


@pytest.fixture(scope="module", autouse=True)
def cache(tmp_path_factory):
    """A cache of this module's own: the GGUFs load_llama_cpp writes once and reuses."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("PERSONATUNE_CACHE", str(tmp_path_factory.mktemp("cache")))
        yield


@pytest.fixture(scope="module")
def torch_answers(dirs):
    reg = load_registry(dirs)
    items = [(n, USER) for n in reg.personas]  # both personas and the base model
    return items, [a.text for a in ask(reg, items, Sampling(12))]


def test_llama_cpp_engine_answers_like_the_torch_engine(dirs, torch_answers):
    """Guards against the llama.cpp engine answering with the wrong adapter (adapters are
    switched per request on one context), without the persona's system prompt, with a
    KV cache left over from the previous request, or with another end-of-turn rule."""
    items, want = torch_answers
    reg = engine_llama.load_llama_cpp(dirs, threads=1, quant="f32")
    assert set(reg.personas) == {BASE_ID, *(n for n, _ in items if n != BASE_ID)}
    got = engine_llama.ask(reg, items + items[::-1], Sampling(12))  # switch back and forth
    assert [a.text for a in got] == want + want[::-1]
    assert len(set(want)) == len(want)  # the personas and the base really differ


def test_llama_cpp_scheduler_streams_the_answer(dirs, torch_answers):
    """Guards against the llama.cpp scheduler losing deltas, not sending Done, or not
    draining its queue on stop."""
    items, want = torch_answers
    reg = engine_llama.load_llama_cpp(dirs, threads=1, quant="f32")
    sched = engine_llama.LlamaCppScheduler(reg.model)
    sched.start()
    events = {n: [] for n, _ in items}
    for name, conv in items:
        p = reg.personas[name]
        req = engine_llama.persona_request(p, conv, Sampling(12), events[name].append)
        assert isinstance(req, Request)
        sched.submit(req)
    sched.stop(timeout=120)
    for (name, _), text in zip(items, want):
        evs = events[name]
        assert isinstance(evs[-1], Done) and evs[-1].completion_tokens >= 1
        assert "".join(e.text for e in evs if isinstance(e, Delta)) == text
    assert sum(sched.finished.values()) == len(items)


def test_chat_and_serve_with_llama_cpp_engine(dirs, torch_answers, monkeypatch):
    """Guards against --engine llama-cpp being ignored or answering differently from the
    torch engine in personatune chat, and against the server not running on it."""
    from personatune.serve.app import create_app
    from personatune.serve.llama_cpp import LlamaCppBackend

    items, want = torch_answers
    name = items[1][0]
    args = ["chat", str(dirs[0]), str(dirs[1]), "--prompt", USER[0]["content"]]
    monkeypatch.setattr(engine_llama, "BASE_QUANT", "f32")
    result = runner.invoke(app, [*args, "--engine", "llama-cpp", "--max-tokens", "12"])
    assert result.exit_code == 0, result.output
    assert want[1] in result.output  # chat answers as the first persona (items[1])
    result = runner.invoke(app, [*args, "--engine", "vulkan"])
    assert result.exit_code == 2 and "--engine vulkan" in result.stderr

    reg = engine_llama.load_llama_cpp(dirs, threads=1, quant="f32")
    with ServerThread(create_app(LlamaCppBackend(reg, max_queue=4))) as server:
        r = server.client().chat.completions.create(
            model=name, messages=USER, max_tokens=12, temperature=0
        )
    assert r.choices[0].message.content == dict(zip([n for n, _ in items], want))[name]
