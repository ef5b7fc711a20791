"""Every data loader, format detection, and each bad-input error."""

import json

import pytest

from personatune.config import DataSource
from personatune.data.loaders import load_source
from personatune.errors import PersonatuneError


def load(tmp_path, name, content, **kw):
    p = tmp_path / name
    p.write_bytes(content if isinstance(content, bytes) else content.encode())
    return load_source(DataSource(path=name, **kw), tmp_path)


def test_csv_quoting_edge_cases(tmp_path):
    """Guards against naive comma splitting: commas, doubled quotes and newlines in fields."""
    text = (
        "\ufeffprompt,response\n"
        '"Hi, you","Arr, he said ""ahoy"", matey"\n'
        '"Code?","line one\nline two"\n'
    )
    ex = load(tmp_path, "a.csv", text)
    assert ex[0].messages == [
        {"role": "user", "content": "Hi, you"},
        {"role": "assistant", "content": 'Arr, he said "ahoy", matey'},
    ]
    assert ex[1].messages[1]["content"] == "line one\nline two"


def test_csv_custom_columns_and_encoding(tmp_path):
    ex = load(
        tmp_path,
        "a.csv",
        "q,a\ncaf\xe9,ol\xe9\n".encode("cp1252"),
        prompt_column="q",
        response_column="a",
        encoding="cp1252",
    )
    assert ex[0].messages[0]["content"] == "café"


def test_bad_encoding_names_file_and_line(tmp_path):
    with pytest.raises(PersonatuneError, match=r"a.csv: line 3 is not valid utf-8.*encoding"):
        load(tmp_path, "a.csv", b"prompt,response\nx,y\ncaf\xe9,z\n")


def test_empty_field_names_row(tmp_path):
    with pytest.raises(PersonatuneError, match=r"a.csv:row 2: field 'response' is empty"):
        load(tmp_path, "a.csv", "prompt,response\nx,y\nq,  \n")


def test_missing_column_is_reported(tmp_path):
    with pytest.raises(PersonatuneError, match="cannot tell the format"):
        load(tmp_path, "a.csv", "question,answer\nx,y\n")


def test_ragged_csv_row(tmp_path):
    with pytest.raises(PersonatuneError, match=r"a.csv:row 1: has more fields"):
        load(tmp_path, "a.csv", "prompt,response\nx,y,z\n")


def test_jsonl_pairs_and_bad_json(tmp_path):
    ex = load(
        tmp_path,
        "a.jsonl",
        '{"prompt": "p", "response": "r"}\n\n{"prompt": "q", "response": "s"}\n',
    )
    assert len(ex) == 2
    with pytest.raises(PersonatuneError, match=r"b.jsonl:line 2: invalid JSON"):
        load(tmp_path, "b.jsonl", '{"prompt": "p", "response": "r"}\n{oops\n')


def test_non_string_field(tmp_path):
    with pytest.raises(
        PersonatuneError, match=r"a.jsonl:line 1: field 'response' must be a string"
    ):
        load(tmp_path, "a.jsonl", '{"prompt": "p", "response": 3}\n')


def test_json_list_alpaca(tmp_path):
    data = [
        {"instruction": "Add", "input": "2 and 3", "output": "5"},
        {"instruction": "Say hi", "input": "", "output": "Hi"},
    ]
    ex = load(tmp_path, "a.json", json.dumps(data))
    assert ex[0].messages[0]["content"] == "Add\n\n2 and 3"
    assert ex[1].messages == [
        {"role": "user", "content": "Say hi"},
        {"role": "assistant", "content": "Hi"},
    ]


def test_openai_messages_multiturn(tmp_path):
    rec = {
        "messages": [
            {"role": "system", "content": "s"},
            {"role": "user", "content": "a"},
            {"role": "assistant", "content": "b"},
            {"role": "user", "content": "c"},
            {"role": "assistant", "content": "d"},
        ]
    }
    ex = load(tmp_path, "a.jsonl", json.dumps(rec))
    assert [m["role"] for m in ex[0].messages] == [
        "system",
        "user",
        "assistant",
        "user",
        "assistant",
    ]
    bad = {"messages": [{"role": "robot", "content": "x"}]}
    with pytest.raises(PersonatuneError, match="message 1: unknown role 'robot'"):
        load(tmp_path, "b.jsonl", json.dumps(bad))
    with pytest.raises(PersonatuneError, match="no assistant turn"):
        load(tmp_path, "c.jsonl", json.dumps({"messages": [{"role": "user", "content": "x"}]}))


def test_sharegpt(tmp_path):
    rec = {"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "ahoy"}]}
    ex = load(tmp_path, "a.jsonl", json.dumps(rec))
    assert ex[0].messages[1] == {"role": "assistant", "content": "ahoy"}


def test_personachat_parlai_schema(tmp_path):
    """Persona facts go to the system prompt; history alternates; gold candidate is last."""
    rec = {
        "personality": ["i like cats.", "i live on a boat."],
        "utterances": [
            {"history": ["hello!"], "candidates": ["no", "hi there."]},
            {
                "history": ["hello!", "hi there.", "do you have pets?"],
                "candidates": ["wrong", "yes, two cats."],
            },
        ],
    }
    ex = load(tmp_path, "a.jsonl", json.dumps(rec))[0]
    assert ex.persona_facts == ["i like cats.", "i live on a boat."]
    assert ex.messages == [
        {"role": "user", "content": "hello!"},
        {"role": "assistant", "content": "hi there."},
        {"role": "user", "content": "do you have pets?"},
        {"role": "assistant", "content": "yes, two cats."},
    ]


def test_personachat_cynaptics_flavour(tmp_path):
    rec = {
        "persona_b": ["I am a chef."],
        "dialogue": ["Persona A: What do you do?", "Persona B: I cook.", "Persona A: What?"],
        "reference": "Persona B: Pasta, mostly.",
    }
    ex = load(tmp_path, "a.jsonl", json.dumps(rec))[0]
    assert ex.persona_facts == ["I am a chef."]
    assert [m["role"] for m in ex.messages] == ["user", "assistant", "user", "assistant"]
    assert ex.messages[-1]["content"] == "Pasta, mostly."


def test_explicit_format_override(tmp_path):
    """A file whose keys would auto-detect as text can be forced to pairs with columns."""
    ex = load(
        tmp_path,
        "a.jsonl",
        '{"text": "t", "q": "a", "r": "b"}\n',
        format="pairs",
        prompt_column="q",
        response_column="r",
    )
    assert ex[0].messages[1]["content"] == "b"
    ex = load(tmp_path, "b.jsonl", '{"text": "raw corpus chunk"}\n')
    assert ex[0].text == "raw corpus chunk"


def test_missing_file(tmp_path):
    with pytest.raises(PersonatuneError, match="no such data file"):
        load_source(DataSource(path="nope.csv"), tmp_path)
