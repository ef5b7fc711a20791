"""Property-based: any bytes in a CSV, JSONL or JSON data file either load or raise
PersonatuneError (a one-line message naming the file), never another exception.

Guards against tracebacks on malformed data (issue 11): a header the csv module cannot
read, a JSON file holding a number, a Persona-Chat row whose candidates are not a list.
"""

from __future__ import annotations

import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from personatune.config import DataSource
from personatune.data.loaders import load_source
from personatune.errors import PersonatuneError

#: Keys the format detector and the parsers look at, so that random records reach them.
KEYS = [
    "prompt", "response", "instruction", "input", "output", "messages", "conversations",
    "role", "content", "from", "value", "text", "personality", "utterances", "history",
    "candidates", "persona_b", "dialogue", "reference",
]  # fmt: skip

SETTINGS = settings(
    max_examples=300,
    deadline=None,
    derandomize=True,  # the same cases in CI every time
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=12),
    lambda inner: (
        st.lists(inner, max_size=4)
        | st.dictionaries(st.sampled_from(KEYS) | st.text(max_size=5), inner, max_size=5)
    ),
    max_leaves=20,
)
records = st.dictionaries(st.sampled_from(KEYS), json_values, max_size=6)


def _check(tmp_path, name: str, data: bytes, **source) -> None:
    path = tmp_path / name
    path.write_bytes(data)
    try:
        examples = load_source(DataSource(path=name, **source), tmp_path)
    except PersonatuneError as e:
        assert "\n" not in str(e), str(e)
        assert str(e), "an empty message"
        return
    assert examples
    for ex in examples:  # what loaded is well formed
        assert ex.text is not None or ex.messages
        assert all(isinstance(m["content"], str) and m["role"] for m in ex.messages)


@SETTINGS
@given(data=st.binary(max_size=300))
def test_random_bytes_as_csv(tmp_path, data):
    """Random bytes (invalid UTF-8, NUL, stray quotes) never raise anything else."""
    _check(tmp_path, "d.csv", data)


@SETTINGS
@given(
    rows=st.lists(
        st.lists(st.text(alphabet='ab,"\n\r\x00é ', max_size=8), min_size=1, max_size=4),
        max_size=6,
    ),
    header=st.sampled_from(["prompt,response", "instruction,input,output", "text", "a,b"]),
)
def test_csv_made_of_quotes_commas_and_newlines(tmp_path, header, rows):
    """CSV built from the characters that break quoting, under real headers."""
    body = "\n".join(",".join(r) for r in rows)
    _check(tmp_path, "d.csv", (header + "\n" + body).encode())


@SETTINGS
@given(data=st.binary(max_size=300))
def test_random_bytes_as_jsonl_and_json(tmp_path, data):
    """Random bytes as JSONL and JSON: a number, a string or deep nesting must not crash."""
    _check(tmp_path, "d.jsonl", data)
    _check(tmp_path, "d.json", data)


@SETTINGS
@given(rows=st.lists(records | json_values, min_size=1, max_size=5))
def test_random_records_as_jsonl(tmp_path, rows):
    """Records with the keys of every format and values of any JSON type: malformed
    messages, Persona-Chat utterances or ShareGPT turns are errors, not crashes."""
    _check(tmp_path, "d.jsonl", "\n".join(json.dumps(r) for r in rows).encode())


@SETTINGS
@given(
    value=json_values | st.lists(records, max_size=4),
    fmt=st.sampled_from(["auto", "messages", "sharegpt", "personachat", "alpaca", "text"]),
)
def test_random_json_documents_in_every_format(tmp_path, value, fmt):
    """A format: set by hand on records that lack its keys was a KeyError."""
    _check(tmp_path, "d.json", json.dumps(value).encode(), format=fmt)


@pytest.mark.parametrize("depth", [10_000, 100_000])
def test_deeply_nested_json_is_an_error(tmp_path, depth):
    """json.loads raises RecursionError on deep nesting; it must be a PersonatuneError."""
    for name in ("d.json", "d.jsonl"):
        with pytest.raises(PersonatuneError, match="nested too deeply"):
            (tmp_path / name).write_text("[" * depth)
            load_source(DataSource(path=name), tmp_path)


def _shaped(required: dict) -> st.SearchStrategy:
    """Records that have a format's keys, each holding a plausible value or any JSON."""
    return st.fixed_dictionaries({k: v | json_values for k, v in required.items()})


texts = st.text(max_size=6)
turns = st.lists(
    st.dictionaries(st.sampled_from(["role", "content", "from", "value"]),
                    st.sampled_from(["user", "assistant", "human", "gpt", "x"]) | json_values,
                    max_size=3),
    max_size=3,
)  # fmt: skip
SHAPES = [
    _shaped({"messages": turns}),
    _shaped({"conversations": turns}),
    _shaped({"instruction": texts, "input": texts, "output": texts}),
    _shaped(
        {
            "personality": st.lists(texts, max_size=2),
            "utterances": st.lists(
                st.fixed_dictionaries(
                    {
                        "history": st.lists(texts | json_values, max_size=3) | json_values,
                        "candidates": st.lists(texts | json_values, max_size=3) | json_values,
                    }
                )
                | json_values,
                max_size=2,
            ),
        }
    ),  # fmt: skip
    _shaped(
        {
            "persona_b": st.lists(texts, max_size=2) | texts,
            "dialogue": st.lists(st.sampled_from(["A: hi", "B: ho", "", ":"]) | json_values),
            "reference": texts,
        }
    ),
]


@SETTINGS
@given(rows=st.lists(st.one_of(SHAPES), min_size=1, max_size=3))
def test_records_shaped_like_each_format(tmp_path, rows):
    """Rows that look like messages, ShareGPT, Alpaca or Persona-Chat but hold the wrong
    types inside (a dict of candidates, a number for history)."""
    _check(tmp_path, "d.jsonl", "\n".join(json.dumps(r) for r in rows).encode())
