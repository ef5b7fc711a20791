"""The generation engine: continuous batching over mixed personas must not change any
row's answer, and per-request settings (stop, end-of-turn, seed, cancel) stay per row."""

from __future__ import annotations

import threading

import pytest
from test_serve import train_tiny_personas

from personatune.engine import (
    BASE_ID,
    Delta,
    Done,
    Failed,
    Request,
    Sampling,
    Scheduler,
    encode,
    load_registry,
    persona_request,
    run_batch,
)
from personatune.engine.batcher import PrefixCache

PROMPTS = [
    "Question 3, please",
    "Describe the sea in one sentence.",
    "Hi",
    "What is the longest river in the world, and why do people argue about it?",
    "Name a colour.",
    "Say hello.",
]


@pytest.fixture(scope="module")
def registry(tmp_path_factory, tiny_model):
    dirs = train_tiny_personas(tmp_path_factory.mktemp("engine"), tiny_model)
    return load_registry(dirs)


def _requests(registry, sampling=None, prompts=PROMPTS):
    names = list(registry.personas)  # base, alpha, beta
    return [
        persona_request(
            registry.personas[names[i % len(names)]],
            [{"role": "user", "content": q}],
            sampling or Sampling(max_tokens=12),
        )
        for i, q in enumerate(prompts)
    ]


def _alone(registry, reqs):
    return [run_batch(registry.model, [r])[0] for r in reqs]


def _generated(registry, req) -> list[int]:
    """The first two tokens ``req`` generates alone."""
    from personatune.engine import batcher

    alone = batcher.Batch(registry.model)
    alone.add(req)
    alone.step()
    alone.restore()
    return alone.rows[0].ids


@pytest.mark.parametrize("max_batch", [6, 4, 2])
def test_batched_greedy_equals_alone(registry, max_batch):
    """Guards against rows leaking into each other in a mixed-persona batch: wrong left
    padding, attention mask or position ids for rows that join at different times (a
    max_batch below the request count makes rows join mid-way), a KV cache row dropped
    or kept wrongly, or an adapter applied to the wrong row. Greedy answers in CPU fp32
    must be exactly the ones each request gets alone."""
    reqs = _requests(registry)
    alone = _alone(registry, reqs)
    # Precondition: the three models answer the first prompts differently.
    assert len({a.text for a in alone[:3]}) == 3
    batched = run_batch(registry.model, _requests(registry), max_batch)
    assert batched == alone
    assert {a.finish_reason for a in alone} <= {"stop", "length"}


def test_a_next_turn_reuses_the_kv_cache_of_the_last_and_answers_the_same(registry, monkeypatch):
    """Guards against reusing a finished request's KV cache wrongly: the wrong columns
    kept (the last sampled token was never fed when an answer is cut at the limit), an
    entry of another persona (the KV depends on the adapter), reused prefixes of
    different lengths padded into one prefill at wrong positions, or no reuse at all.
    Each second turn must reuse at least its first turn's prompt, and its greedy answer
    (CPU fp32) must equal the one it gets alone without a prefix cache."""
    from personatune.engine import batcher

    end = _generated(registry, _requests(registry, Sampling(max_tokens=8))[0])[1]
    real = batcher.end_of_turn_ids
    monkeypatch.setattr(batcher, "end_of_turn_ids", lambda model, t: real(model, t) | {end})
    prefixes = PrefixCache()
    first = _requests(registry, Sampling(max_tokens=8))
    answers = run_batch(registry.model, first, 6, prefixes=prefixes)
    assert {a.finish_reason for a in answers} == {"stop", "length"}  # both ways to end
    names = list(registry.personas)

    def second():
        return [
            persona_request(
                registry.personas[names[i % len(names)]],
                [
                    {"role": "user", "content": q},
                    {"role": "assistant", "content": a.text},
                    {"role": "user", "content": "And why?" if i % 2 else "Say more."},
                ],
                Sampling(max_tokens=12),
            )
            for i, (q, a) in enumerate(zip(PROMPTS, answers))
        ]

    reused = []
    take = prefixes.take

    def spy(adapter, ids):
        n, kv = take(adapter, ids)
        reused.append(n)
        return n, kv

    monkeypatch.setattr(prefixes, "take", spy)
    got = run_batch(registry.model, second(), 2, prefixes=prefixes)
    assert all(n >= len(r.input_ids) for n, r in zip(reused, first))
    assert got == _alone(registry, second())


def test_prefix_cache_takes_the_longest_prefix_of_the_same_adapter_and_evicts_the_oldest():
    """Guards against a prefix cache that hands one persona's KV cache to another, picks
    a shorter prefix than it holds, lets a request reuse all its tokens (one must be
    prefilled for its first logits) or grows without bound."""
    c = PrefixCache(max_tokens=12)
    c.put("a", [1, 2, 3], ["short"])
    c.put("b", [1, 2, 3, 4], ["other persona"])
    c.put("a", [1, 2, 3, 4, 5], ["long"])
    assert c.take("a", [1, 2, 3, 4, 9]) == (4, ["long"])
    assert c.take("a", [1, 2, 3]) == (2, ["short"])
    assert c.take("a", [1, 2]) == (0, None)
    c.put("a", [7] * 9, ["big"])  # 4 + 9 tokens > 12: the oldest ("b") goes
    assert [e[2] for e in c.entries] == [["big"]]


def test_seeded_sampling_is_reproducible_per_request(registry):
    """Guards against one request's sampling drawing from a shared random stream: a
    seeded request must give the same answer alone and next to other sampled rows."""
    s = [Sampling(max_tokens=12, temperature=1.0, top_p=0.9, seed=i) for i in range(len(PROMPTS))]
    reqs = _requests(registry)
    for r, si in zip(reqs, s):
        r.sampling = si
    alone = _alone(registry, reqs)
    batched = run_batch(registry.model, reqs, 4)
    assert batched == alone
    greedy = _alone(registry, _requests(registry))
    assert [a.text for a in alone] != [a.text for a in greedy]  # it did sample


def test_stop_sequences_and_end_of_turn_per_row(registry):
    """Guards against a stop sequence or an end-of-turn token of one row ending (or
    cutting) other rows, and against the stop string leaking into the answer."""
    reqs = _requests(registry, Sampling(max_tokens=16))
    full = _alone(registry, reqs)
    words = full[1].text.split()
    stop = next(w for w in words[1:] if w not in words[0])
    reqs = _requests(registry, Sampling(max_tokens=16))
    reqs[1].sampling = Sampling(max_tokens=16, stop=[stop])
    out = run_batch(registry.model, reqs)
    assert out[1].text == full[1].text[: full[1].text.index(stop)].rstrip()
    assert out[1].finish_reason == "stop" and out[1].finished
    assert [a for i, a in enumerate(out) if i != 1] == [a for i, a in enumerate(full) if i != 1]


def test_end_of_turn_token_ends_only_its_row(registry, monkeypatch):
    """Guards against an end-of-turn token ending the whole batch or being counted in
    the answer: treat the first answer's second token as end-of-turn for that row's
    tokenizer only (its second token)."""
    import copy

    from personatune.engine import batcher

    reqs = _requests(registry, Sampling(max_tokens=12))
    full = _alone(registry, reqs)
    ids = _generated(registry, reqs[0])
    tok = reqs[0].tokenizer
    special = copy.copy(tok)  # its own tokenizer object, so only row 0 gets the new end
    real = batcher.end_of_turn_ids
    monkeypatch.setattr(
        batcher,
        "end_of_turn_ids",
        lambda model, t: real(model, t) | ({ids[1]} if t is special else set()),
    )
    reqs = _requests(registry, Sampling(max_tokens=12))
    reqs[0].tokenizer = special
    out = run_batch(registry.model, reqs)
    assert out[0].finish_reason == "stop" and out[0].finished and out[0].tokens == 1
    assert out[1:] == full[1:]


def test_cancelling_one_row_leaves_the_others_unchanged(registry):
    """Guards against a cancelled request (client disconnect) taking its neighbours'
    KV cache rows or positions with it when it leaves the batch."""
    reqs = _requests(registry, Sampling(max_tokens=16))
    alone = _alone(registry, reqs)
    reqs = _requests(registry, Sampling(max_tokens=16))
    seen = []

    def emit(ev):
        seen.append(ev)
        if isinstance(ev, Delta) and len(seen) == 2:
            reqs[1].cancel.set()

    reqs[1].emit = emit
    out = run_batch(registry.model, reqs)
    assert out[1].finish_reason == "cancelled" and not out[1].finished
    assert isinstance(seen[-1], Done) and seen[-1].finish_reason == "cancelled"
    assert [a for i, a in enumerate(out) if i != 1] == [a for i, a in enumerate(alone) if i != 1]


def test_streamed_deltas_add_up_to_the_answer(registry):
    """Guards against streamed text that repeats, loses or reorders pieces, or ends
    without a Done event carrying the usage counts."""
    req = _requests(registry, Sampling(max_tokens=16))[1]
    events = []
    req.emit = events.append
    ans = run_batch(registry.model, [req])[0]
    assert "".join(e.text for e in events if isinstance(e, Delta)) == ans.text
    done = events[-1]
    assert isinstance(done, Done) and done.prompt_tokens == len(req.input_ids)
    assert done.completion_tokens == ans.tokens + (ans.finish_reason == "stop")


def _scheduled(registry, reqs, max_batch, on_delta=None) -> tuple[dict[int, list], Scheduler]:
    """Queue ``reqs`` on a scheduler while it is paused (so they share batches), wait for
    every one to end, and return each request's events and the stopped scheduler.
    ``on_delta(i)`` runs before request ``i``'s text deltas are recorded."""
    events: dict[int, list] = {i: [] for i in range(len(reqs))}
    ended = threading.Semaphore(0)

    def collect(i):
        def emit(ev):
            if on_delta and isinstance(ev, Delta):
                on_delta(i)
            events[i].append(ev)
            if isinstance(ev, (Done, Failed)):
                ended.release()

        return emit

    sched = Scheduler(registry.model, max_batch=max_batch, max_queue=8)
    sched.start()
    try:
        with sched.paused():
            for i, r in enumerate(reqs):
                r.emit = collect(i)
                sched.submit(r)
        for _ in reqs:
            assert ended.acquire(timeout=120)
    finally:
        sched.stop(60)
    return events, sched


def test_scheduler_failing_request_does_not_take_others_down(registry):
    """Guards against one request's failure (here its event callback raises) ending the
    generation thread or the other requests in its batch."""
    reqs = _requests(registry, Sampling(max_tokens=10))
    alone = _alone(registry, _requests(registry, Sampling(max_tokens=10)))

    def broken(i):
        if i == 2:
            raise RuntimeError("client callback broke")

    results, sched = _scheduled(registry, reqs, 4, broken)
    assert isinstance(results[2][-1], Failed)
    for i, a in enumerate(alone):
        if i != 2:
            text = "".join(e.text for e in results[i] if isinstance(e, Delta))
            assert text == a.text and isinstance(results[i][-1], Done)
    assert sched.finished["error"] == 1 and sum(sched.finished.values()) == len(reqs)


@pytest.mark.parametrize("prefill_tokens", [8192, 1])
def test_a_prefill_that_raises_fails_only_its_request(registry, monkeypatch, prefill_tokens):
    """Guards against a batched prefill that raises (here the forward pass, for any pass
    that holds request 1) failing every request that joined with it, or a request being
    decoded twice after a retry one by one (with one pass per request, request 0 has
    joined before request 1's pass raises)."""
    from personatune.engine import batcher

    monkeypatch.setattr(batcher, "PREFILL_TOKENS", prefill_tokens)
    reqs = _requests(registry, Sampling(max_tokens=8))
    alone = _alone(registry, _requests(registry, Sampling(max_tokens=8)))
    bad = reqs[1].input_ids
    real = batcher.Batch._forward

    def forward(self, ids, mask, positions, cache, adapters):
        if ids.shape[1] > 1 and any(
            row[-len(bad) :].tolist() == bad and int(m.sum()) == len(bad)
            for row, m in zip(ids, mask)
        ):
            raise RuntimeError("out of memory")
        return real(self, ids, mask, positions, cache, adapters)

    monkeypatch.setattr(batcher.Batch, "_forward", forward)
    events, sched = _scheduled(registry, reqs, 6)  # all six join at once
    assert isinstance(events[1][-1], Failed) and "out of memory" in events[1][-1].message
    for i, a in enumerate(alone):
        if i != 1:
            done = [e for e in events[i] if isinstance(e, (Done, Failed))]
            text = "".join(e.text for e in events[i] if isinstance(e, Delta))
            assert len(done) == 1 and isinstance(done[0], Done) and text == a.text
    assert sched.finished["error"] == 1 and sum(sched.finished.values()) == len(reqs)


def test_encode_matches_chat_template(registry):
    """Guards against the engine adding a second BOS or dropping the assistant header."""
    p = registry.personas[BASE_ID]
    conv = [{"role": "user", "content": "Hi"}]
    ids = encode(p.tokenizer, conv)
    assert p.tokenizer.decode(ids).endswith("assistant\n")
    assert isinstance(Request(ids, p.tokenizer), Request)


def test_a_persona_name_with_a_dot_loads_and_answers(registry, tmp_path):
    """peft turns the adapter name into a torch module name, which may not contain a dot;
    the recipes' names do (``qwen2.5-0.5b-pirate``), and eval and serve crashed with
    ``KeyError: module name can't contain "."``. The persona keeps its name; only the
    adapter name changes."""
    import shutil

    import yaml

    from personatune.engine import load_persona
    from personatune.persona import SPEC

    src = registry.personas["alpha"].path
    dotted = shutil.copytree(src, tmp_path / "dotted")
    spec = yaml.safe_load((dotted / SPEC).read_text())
    spec["name"] = "qwen2.5-alpha"
    (dotted / SPEC).write_text(yaml.safe_dump(spec))
    reg = load_registry([dotted])
    p = reg.personas["qwen2.5-alpha"]
    assert p.name == "qwen2.5-alpha" and "." not in p.adapter
    dotted_answer = run_batch(reg.model, [persona_request(p, [{"role": "user", "content": "Hi"}])])
    alpha = registry.personas["alpha"]
    alpha_answer = run_batch(
        registry.model, [persona_request(alpha, [{"role": "user", "content": "Hi"}])]
    )
    assert dotted_answer[0].text == alpha_answer[0].text  # the same adapter, applied
    assert load_persona(dotted).spec.name == "qwen2.5-alpha"
