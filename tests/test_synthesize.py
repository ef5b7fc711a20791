"""personatune data synthesize: persona data from a description (issue 13)."""

import hashlib
import json

import httpx
import numpy as np
import pytest

from personatune.config import PersonaSpec
from personatune.data import synthesize as S
from personatune.data.synthesize import Reply
from personatune.errors import PersonatuneError

TERMS = ["arr", "matey"]


def encode(texts):
    """Persona replies (they start with "P:") lean on one axis, plain ones on another,
    each with its own deterministic random direction (so different texts differ)."""
    out = []
    for t in texts:
        rng = np.random.default_rng(int(hashlib.sha256(t.encode()).hexdigest()[:8], 16))
        v = rng.normal(0, 1, 16)
        v[0 if t.startswith("P:") else 1] += 4
        out.append(v)
    return np.array(out)


PERSONA = {
    0: Reply("", 1, "stop"),
    1: Reply("P: arr, this goes on and on", 64, "length"),
    2: Reply("P: " + "arr matey ho " * 12, 40, "stop"),
    3: Reply("The answer is 3.", 6, "stop"),
    4: Reply("P: a fine day for it", 8, "stop"),
    5: Reply("P: arr, the same answer, matey", 9, "stop"),
    6: Reply("P: Arr, the same  answer, matey", 9, "stop"),
}


def teacher(convs):
    """Scripted: under the system prompt, PERSONA's faulty replies for prompts 0-6 and a
    good pirate reply otherwise; without it, a plain reply."""
    replies = []
    for c in convs:
        i = int(c[-1]["content"].split()[-1])
        if c[0]["role"] == "system":
            replies.append(PERSONA.get(i, Reply(f"P: arr, answer {i} it be, matey", 10, "stop")))
        else:
            replies.append(Reply(f"Plain answer number {i}.", 5, "stop"))
    return replies


@pytest.fixture
def spec(tmp_path):
    (tmp_path / "prompts.txt").write_text("".join(f"Question number {i}\n" for i in range(14)))
    return PersonaSpec(
        name="pirate",
        system_prompt="You are a pirate.",
        persona_terms=TERMS,
        prompts="prompts.txt",
        base_dir=tmp_path,
    )


def test_each_check_drops_its_candidate(spec, tmp_path):
    """Guards against a degenerate, plain-voice, term-less or duplicate teacher answer
    reaching the training data, and against a miscounted drop reason."""
    report = S.synthesize(
        spec, tmp_path / "out", teacher=S.Teacher(teacher, "scripted"), encode=encode, max_tokens=64
    )
    assert report["dropped"] == {
        "empty": 1,
        "cut at the token limit": 1,
        "repetition": 1,
        "not in persona (classifier)": 1,
        "no persona term": 1,
        "duplicate": 1,
    }
    rows = [json.loads(x) for x in (tmp_path / "out" / "synth.jsonl").read_text().splitlines()]
    assert [r["prompt"] for r in rows] == [f"Question number {i}" for i in (5, *range(7, 14))]
    assert all(r["p_persona"] >= 0.5 and r["uses_terms"] and r["finish"] == "stop" for r in rows)
    assert rows[0]["prompt_source"].endswith("prompts.txt") and rows[0]["teacher"]
    assert report["kept"] == len(rows) == 8


def test_output_is_refused_or_replaced_whole(spec, tmp_path):
    """Guards against overwriting without --overwrite and against replacing a folder
    this command did not write."""
    out = tmp_path / "out"
    S.synthesize(spec, out, teacher=S.Teacher(teacher, "scripted"), encode=encode, max_tokens=64)
    with pytest.raises(PersonatuneError, match="already exists"):
        S.synthesize(
            spec, out, teacher=S.Teacher(teacher, "scripted"), encode=encode, max_tokens=64
        )
    S.synthesize(
        spec,
        out,
        teacher=S.Teacher(teacher, "scripted"),
        encode=encode,
        max_tokens=64,
        overwrite=True,
        n_prompts=12,
    )
    assert json.loads((out / "report.json").read_text())["prompts"] == 12
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep")
    with pytest.raises(PersonatuneError, match="not a synthesized data folder"):
        S.synthesize(
            spec,
            tmp_path / "mine",
            teacher=S.Teacher(teacher, "scripted"),
            encode=encode,
            overwrite=True,
        )
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine", "out", "prompts.txt"]


def test_nothing_kept_is_an_error(spec, tmp_path):
    def plain_only(convs):
        return [Reply("Plain answer number 1.", 5, "stop") for _ in convs]

    with pytest.raises(PersonatuneError, match="no synthesized answer passed"):
        S.synthesize(spec, tmp_path / "out", teacher=S.Teacher(plain_only, "plain"), encode=encode)
    assert not (tmp_path / "out").exists()


def test_shipped_prompt_pool_is_used_without_a_prompts_file():
    prompts, source = S.read_prompts(PersonaSpec(name="p", system_prompt="x"))
    assert len(prompts) >= 300 and source == "shipped:synth_prompts.jsonl"


def test_http_teacher_against_a_real_server(tmp_path, tiny_model):
    """The --teacher path against a real personatune serve process on loopback: replies
    equal the server's own answers, and its errors come back as one-line errors."""
    from serving import serve_process
    from test_serve import train_tiny_personas

    dirs = train_tiny_personas(tmp_path, tiny_model)
    convs = [
        [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": f"Question {i}, please"},
        ]
        for i in range(3)
    ]
    with serve_process(dirs) as (_, url):
        got = S.http_teacher(url + "/v1", "alpha", max_tokens=8)(convs)
        for conv, reply in zip(convs, got):
            r = httpx.post(
                url + "/v1/chat/completions",
                timeout=60,
                json={"model": "alpha", "messages": conv, "max_tokens": 8, "temperature": 0},
            )
            body = r.json()
            assert reply.text == body["choices"][0]["message"]["content"].strip()
            assert reply.tokens == body["usage"]["completion_tokens"] > 0
            assert reply.finish == (
                "length" if body["choices"][0]["finish_reason"] == "length" else "stop"
            )
        with pytest.raises(PersonatuneError, match="HTTP 404"):
            S.http_teacher(url + "/v1", "nobody", max_tokens=4)(convs[:1])
    with pytest.raises(PersonatuneError, match="cannot reach it"):
        S.http_teacher(url + "/v1", "alpha", max_tokens=4, timeout=2)(convs[:1])


def test_a_spec_without_data_loads_and_training_says_what_to_do(tmp_path):
    """A description-only spec is what synthesize starts from; training it must say how
    to get data instead of failing on an empty list."""
    from personatune.config import load_spec
    from personatune.data.dataset import prepare_data

    (tmp_path / "p.yaml").write_text("name: p\nsystem_prompt: You are a pirate.\n")
    with pytest.raises(PersonatuneError, match="p.yaml: 'data': no data source.*synthesize"):
        load_spec(tmp_path / "p.yaml")
    spec = load_spec(tmp_path / "p.yaml", need_data=False)
    assert spec.data == []
    with pytest.raises(PersonatuneError, match="personatune data synthesize"):
        prepare_data(spec, tokenizer=None)


def test_the_base_model_teacher_answers_greedily_with_the_engine(
    persona_yaml, tiny_model, monkeypatch
):
    """Guards against the default teacher (the spec's base model through the engine)
    failing to load or answer, answering out of order, or reporting the wrong finish:
    each reply equals the engine's greedy answer to its conversation."""
    from transformers import AutoModelForCausalLM

    from personatune.config import load_spec
    from personatune.engine import generate_answers
    from personatune.models import load_tokenizer, resolve_ref

    monkeypatch.setenv("PERSONATUNE_BF16", "0")
    spec = load_spec(persona_yaml())
    convs = [[{"role": "user", "content": q}] for q in ("Hi", "Name a colour, please.")]
    replies = S.engine_teacher(spec, max_tokens=6)(convs)
    model = AutoModelForCausalLM.from_pretrained(tiny_model).eval()
    want = generate_answers(model, load_tokenizer(resolve_ref(str(tiny_model))), convs, 6)
    assert [(r.text, r.tokens) for r in replies] == [(a.text, a.tokens) for a in want]
    assert [r.finish for r in replies] == ["stop" if a.finished else "length" for a in want]
