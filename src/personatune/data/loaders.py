"""Read persona data files into conversations, detecting the format and naming bad rows.

Every loader yields :class:`Example` objects: a list of chat messages (system, user,
assistant) or, for continued pre-training, a plain text. Errors name the file and row.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from personatune.config import DataSource
from personatune.errors import PersonatuneError
from personatune.io import jsonl_records, parse_json, read_text

ROLES = ("system", "user", "assistant")
SHAREGPT_ROLES = {
    "system": "system",
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "chatgpt": "assistant",
    "bing": "assistant",
}


@dataclass
class Example:
    """One training example.

    Attributes:
        messages: chat turns as ``{"role", "content"}`` dicts; empty for text examples.
        text: raw text for continued pre-training (trained on every token), else None.
        where: ``file:row N``, for error messages and provenance.
        persona_facts: facts that go into the system prompt (Persona-Chat), else empty.
        meta: extra fields of the row (provenance such as book and chapter).
    """

    messages: list[dict[str, str]] = field(default_factory=list)
    text: str | None = None
    where: str = ""
    persona_facts: list[str] = field(default_factory=list)
    meta: dict = field(default_factory=dict)

    def key(self) -> str:
        """Content identity, used to drop duplicates."""
        return json.dumps([self.messages, self.text, self.persona_facts], sort_keys=True)


def _row_error(where: str, msg: str) -> PersonatuneError:
    return PersonatuneError(f"{where}: {msg}")


def _need(record: dict, key: str, where: str):
    if key not in record:
        raise _row_error(where, f"missing field '{key}'; add it or set the right format:")
    return record[key]


def _need_str(record: dict, key: str, where: str, allow_empty: bool = False) -> str:
    value = record.get(key)
    if value is None:
        raise _row_error(where, f"missing field '{key}'; add it or fix the column name")
    if not isinstance(value, str):
        raise _row_error(where, f"field '{key}' must be a string, got {type(value).__name__}")
    if not allow_empty and not value.strip():
        raise _row_error(where, f"field '{key}' is empty; fill it in or remove the row")
    return value


# ---- reading records -------------------------------------------------------------------


def _csv_records(path: Path, text: str) -> Iterator[tuple[str, dict]]:
    reader = csv.DictReader(io.StringIO(text, newline=""), strict=True)
    start = 1  # the file line where the record being read begins
    try:
        if not reader.fieldnames:
            raise PersonatuneError(f"{path}: empty CSV file; it needs a header row")
        start = reader.line_num + 1
        for i, row in enumerate(reader, start=1):
            where = f"{path}:row {i}"
            if None in row or None in row.values():
                raise _row_error(
                    where,
                    f"has {'more' if None in row else 'fewer'} fields than "
                    f"the header (line {start}); check its quoting",
                )
            start = reader.line_num + 1
            yield where, row
    except csv.Error as e:
        # csv's own line_num is the last line read before the error, one short of the
        # record that failed (an unclosed quote on line 6 read as line 5)
        reason = str(e)
        if reason == "unexpected end of data":
            reason = "a quote opened in this record is never closed"
        raise PersonatuneError(f"{path}: line {start}: unreadable CSV ({reason})") from None


def _json_records(path: Path, text: str, jsonl: bool) -> Iterator[tuple[str, dict]]:
    if jsonl:
        rows = ((f"{path}:line {n}", rec) for n, rec in jsonl_records(path, text))
    else:
        data = parse_json(text, path)
        if isinstance(data, dict):  # {"data": [...]} style wrappers
            lists = [v for v in data.values() if isinstance(v, list)]
            data = lists[0] if len(lists) == 1 else [data]
        if not isinstance(data, list):
            raise PersonatuneError(
                f"{path}: expected a JSON list of objects, got {type(data).__name__}"
            )
        rows = ((f"{path}:item {i}", rec) for i, rec in enumerate(data, start=1))
    for where, rec in rows:
        if not isinstance(rec, dict):
            raise _row_error(where, "expected a JSON object")
        yield where, rec


def _hub_records(source: DataSource) -> Iterator[tuple[str, dict]]:
    from datasets import load_dataset

    name = source.path[3:]
    try:
        ds = load_dataset(name, split=source.split)
    except Exception as e:  # datasets raises many types when offline
        raise PersonatuneError(
            f"dataset '{name}': cannot load it ({type(e).__name__}); download it first "
            f"or point data[].path at a local file"
        ) from None
    for i, rec in enumerate(ds, start=1):
        yield f"{source.path}:row {i}", rec


# ---- detecting and parsing formats -----------------------------------------------------


def detect_format(record: dict, source: DataSource, where: str) -> str:
    """The format of a record from its keys (see :data:`personatune.config.DataFormat`)."""
    keys = set(record)
    if "messages" in keys:
        return "messages"
    if "conversations" in keys:
        return "sharegpt"
    if {"personality", "utterances"} <= keys or {"persona_b", "dialogue"} <= keys:
        return "personachat"
    if {"instruction", "output"} <= keys:
        return "alpaca"
    if {source.prompt_column, source.response_column} <= keys:
        return "pairs"
    if "text" in keys:
        return "text"
    raise _row_error(
        where,
        f"cannot tell the format from the keys {sorted(keys)}; set format: and, for "
        f"prompt/response data, prompt_column and response_column",
    )


def _parse_pairs(rec: dict, src: DataSource, where: str) -> Example:
    prompt = _need_str(rec, src.prompt_column, where)
    response = _need_str(rec, src.response_column, where)
    meta = {k: v for k, v in rec.items() if k not in (src.prompt_column, src.response_column)}
    return Example(
        [{"role": "user", "content": prompt}, {"role": "assistant", "content": response}],
        where=where,
        meta=meta,
    )


def _parse_alpaca(rec: dict, src: DataSource, where: str) -> Example:
    instruction = _need_str(rec, "instruction", where)
    extra = _need_str(rec, "input", where, allow_empty=True) if rec.get("input") else ""
    prompt = f"{instruction}\n\n{extra}" if extra.strip() else instruction
    return Example(
        [
            {"role": "user", "content": prompt},
            {"role": "assistant", "content": _need_str(rec, "output", where)},
        ],
        where=where,
    )


def _check_turns(messages: list[dict], where: str) -> list[dict]:
    if not any(m["role"] == "assistant" for m in messages):
        raise _row_error(where, "has no assistant turn to train on")
    return messages


def _parse_messages(rec: dict, src: DataSource, where: str) -> Example:
    turns = _need(rec, "messages", where)
    if not isinstance(turns, list) or not turns:
        raise _row_error(where, "'messages' must be a non-empty list")
    out = []
    for j, m in enumerate(turns):
        w = f"{where} message {j + 1}"
        if not isinstance(m, dict):
            raise _row_error(w, "expected an object with role and content")
        role = _need_str(m, "role", w)
        if role not in ROLES:
            raise _row_error(w, f"unknown role '{role}'; use one of {', '.join(ROLES)}")
        out.append({"role": role, "content": _need_str(m, "content", w)})
    return Example(_check_turns(out, where), where=where)


def _parse_sharegpt(rec: dict, src: DataSource, where: str) -> Example:
    turns = _need(rec, "conversations", where)
    if not isinstance(turns, list) or not turns:
        raise _row_error(where, "'conversations' must be a non-empty list")
    out = []
    for j, m in enumerate(turns):
        w = f"{where} turn {j + 1}"
        if not isinstance(m, dict):
            raise _row_error(w, "expected an object with from and value")
        who = _need_str(m, "from", w)
        if who not in SHAREGPT_ROLES:
            raise _row_error(w, f"unknown speaker '{who}'; use human, gpt or system")
        out.append({"role": SHAREGPT_ROLES[who], "content": _need_str(m, "value", w)})
    return Example(_check_turns(out, where), where=where)


def _alternate(lines: list[str], where: str) -> list[dict]:
    """Give alternating roles to dialogue lines, the last one the persona's (assistant).
    A leading assistant turn is dropped: several chat templates must start with a user."""
    msgs = [
        {"role": "assistant" if (len(lines) - j) % 2 else "user", "content": line}
        for j, line in enumerate(lines)
    ]
    if len(msgs) > 1 and msgs[0]["role"] == "assistant":
        msgs = msgs[1:]
    return _check_turns(msgs, where)


def _parse_personachat(rec: dict, src: DataSource, where: str) -> Example:
    """Persona-Chat in the ParlAI/Hugging Face schema (``personality`` facts and
    ``utterances`` with ``history`` and ``candidates``, the gold reply last) or the
    Cynaptics flavour (``persona_b`` facts as a list or one string a fact a line,
    ``dialogue`` lines "Persona A: ..." / "Persona B: ...", and an optional ``reference``
    reply). The persona is the replying speaker (B); its facts go into the system prompt,
    and every one of its turns is trained.
    """
    if "utterances" in rec:
        facts, utts = _need(rec, "personality", where), rec["utterances"]
        if not isinstance(utts, list) or not utts:
            raise _row_error(where, "'utterances' must be a non-empty list")
        last = utts[-1] if isinstance(utts[-1], dict) else {}
        history, candidates = last.get("history") or [], last.get("candidates")
        if not isinstance(candidates, list) or not candidates:
            raise _row_error(where, "the last utterance needs 'history' and 'candidates' lists")
        if not isinstance(history, list) or not all(isinstance(v, str) for v in history):
            raise _row_error(where, "'history' must be a list of strings")
        lines = [*history, candidates[-1]]
        if not isinstance(lines[-1], str):
            raise _row_error(where, "'candidates' must be strings")
        lines = [line for line in lines if line != "__ SILENCE __"]
        messages = _alternate(lines, where)
    else:
        facts, dialogue = _need(rec, "persona_b", where), _need(rec, "dialogue", where)
        if not isinstance(dialogue, list) or not dialogue:
            raise _row_error(where, "'dialogue' must be a non-empty list")
        messages = []
        for line in dialogue:
            if not isinstance(line, str):
                raise _row_error(where, "'dialogue' lines must be strings")
            speaker, _, said = line.partition(":")
            role = "assistant" if speaker.strip().lower().endswith("b") else "user"
            messages.append({"role": role, "content": said.strip() or line})
        ref = rec.get("reference")
        if isinstance(ref, str) and ref.strip():  # "Persona B: reply", or the reply alone
            messages.append({"role": "assistant", "content": ref.split(":", 1)[-1].strip()})
        if messages and messages[0]["role"] == "assistant":
            messages = messages[1:]
        messages = _check_turns(messages, where)
    if isinstance(facts, str):  # CSV-born exports keep the facts as one string, a fact a line
        facts = [f for f in facts.splitlines() if f.strip()]
    if not isinstance(facts, list) or not all(isinstance(f, str) for f in facts):
        raise _row_error(where, "persona facts must be a list of strings")
    if any(not m["content"].strip() for m in messages):
        raise _row_error(where, "has an empty dialogue line")
    return Example(messages, where=where, persona_facts=[f.strip() for f in facts])


def _parse_text(rec: dict, src: DataSource, where: str) -> Example:
    return Example(
        text=_need_str(rec, "text", where),
        where=where,
        meta={k: v for k, v in rec.items() if k != "text"},
    )


PARSERS = {
    "pairs": _parse_pairs,
    "alpaca": _parse_alpaca,
    "messages": _parse_messages,
    "sharegpt": _parse_sharegpt,
    "personachat": _parse_personachat,
    "text": _parse_text,
}


def load_source(source: DataSource, base_dir: Path = Path(".")) -> list[Example]:
    """Load every example of one data source.

    CSV files need a header row; quoted fields may hold commas, quotes and newlines
    (RFC 4180), and a UTF-8 byte-order mark is accepted. JSONL holds one object a line,
    JSON a list of objects. ``format: auto`` detects the format from the extension and the
    first record's keys.

    Returns:
        Examples in file order (duplicates are kept; see :func:`personatune.data.dataset`).

    Raises:
        PersonatuneError: unreadable file, bad encoding, unreadable row, missing, empty or
            non-string field; the message names the file and the row.
    """
    if source.path.startswith("hf:"):
        records = _hub_records(source)
    else:
        path = Path(source.path).expanduser()
        path = path if path.is_absolute() else base_dir / path
        text = read_text(path, source.encoding, what="data file")
        # the file's container: format: when it names one, else the extension (a record
        # format such as format: pairs on a .csv file still reads it as CSV)
        suffixes = {".csv": "csv", ".tsv": "csv", ".jsonl": "jsonl", ".json": "json"}
        container = source.format if source.format in ("csv", "json", "jsonl") else None
        container = container or suffixes.get(path.suffix.lower())
        if container == "csv":
            records = _csv_records(path, text)
        elif container in ("json", "jsonl"):
            records = _json_records(path, text, jsonl=container == "jsonl")
        else:
            raise PersonatuneError(
                f"{path}: unknown file type; use .csv, .json or .jsonl or set format:"
            )
    examples, fmt = [], source.format
    for where, rec in records:
        if fmt in ("auto", "csv", "json", "jsonl"):
            fmt = detect_format(rec, source, where)
        examples.append(PARSERS[fmt](rec, source, where))
    if not examples:
        raise PersonatuneError(f"{source.path}: no examples found")
    return examples
