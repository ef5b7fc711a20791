"""``personatune data from-corpus`` and the spec features it feeds: a source's ``eval_path``
(held-out chapters as the eval set) and text chunks mixed with dialogue pairs by weight.

Unit tests build a small synthetic two-book corpus here. The test on the real Sherlock
Holmes corpus (``../shared/data/sherlock/corpus.txt``) skips when it is absent.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from personatune.cli import app
from personatune.config import load_spec
from personatune.data.dataset import prepare_data
from personatune.errors import PersonatuneError

runner = CliRunner()
REPO = Path(__file__).resolve().parents[1]
CORPUS = REPO.parent / "shared/data/sherlock/corpus.txt"
LABELS = REPO / "tests/fixtures/sherlock_attribution.jsonl"
EXAMPLE = REPO / "examples/sherlock/persona.yaml"


def chapter_text(book: str, n: int) -> str:
    """One chapter: narration with a unique marker, then an exchange with Holmes."""
    narration = (
        f"Marker {book}{n}. The fog lay thick upon Baker Street that morning, and "
        "the lamps were still lit at noon. Holmes had not stirred from his chair, and "
        "the room was grey with the smoke of his pipe while the rain beat on the window."
    )
    lines = [f"CHAPTER {n}.", "", narration, ""]
    for i in range(3):
        lines += [
            f'"What of the case number {book}{n}{i}?" asked Lestrade.',
            "",
            f'"It is quite simple, number {book}{n}{i}," said Holmes.',
            "",
        ]
    return "\n".join(lines)


def book_text(book: str, chapters: int = 5) -> str:
    return "\n".join(chapter_text(book, n) for n in range(1, chapters + 1))


@pytest.fixture
def corpus(tmp_path) -> Path:
    """A two-book corpus file with ``--- From <title> ---`` separators, 10 chapters."""
    path = tmp_path / "corpus.txt"
    path.write_text(
        f"--- From Book A ---\n\n{book_text('A')}\n\n--- From Book B ---\n\n{book_text('B')}\n",
        encoding="utf-8",
    )
    return path


def run(corpus: Path, out: Path, *extra: str):
    return runner.invoke(
        app,
        [
            "data",
            "from-corpus",
            str(corpus),
            "--character",
            "Holmes",
            "--alias",
            "Sherlock Holmes",
            "--narrator",
            "Watson",
            "--out",
            str(out),
            "--eval-chapters",
            "0.2",
            "--chunk-size",
            "120",
            "--chunk-overlap",
            "20",
            *extra,
        ],
    )


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def test_from_corpus_writes_pairs_chunks_and_report(corpus, tmp_path):
    """Guards against missing provenance, held-out chapters leaking into training pairs
    or chunks (pairs split instead of chapters), chunk settings ignored, and a report
    that disagrees with the files."""
    out = tmp_path / "data"
    r = run(corpus, out, "--samples", "2")
    assert r.exit_code == 0, r.output
    assert sorted(p.name for p in out.iterdir()) == sorted(
        ["dialogue_train.jsonl", "dialogue_eval.jsonl", "chunks_train.jsonl", "report.json"]
    )
    train, held = read_jsonl(out / "dialogue_train.jsonl"), read_jsonl(out / "dialogue_eval.jsonl")
    chunks = read_jsonl(out / "chunks_train.jsonl")
    for p in train + held:
        assert set(p) == {"prompt", "response", "book", "chapter", "offset", "prompt_kind"}
        assert p["response"].startswith("It is quite simple, number")
        assert p["prompt"].startswith("What of the case number")  # the line it answers
        assert p["response"].split()[-1].rstrip(".") == p["prompt"].split()[-1].rstrip("?")
    assert len(train) + len(held) == 30

    def key(p: dict) -> tuple[str, str]:
        return p["book"], p["chapter"]

    held_chapters = {key(p) for p in held}
    assert len(held_chapters) == 2 and len(held) == 6  # whole chapters, 3 each
    assert not held_chapters & {key(p) for p in train}
    assert chunks and all(len(c["text"]) <= 120 for c in chunks)
    assert not held_chapters & {key(c) for c in chunks}
    text = " ".join(c["text"] for c in chunks)
    for book, chap in held_chapters:
        marker = f"Marker {book[-1]}{chap.split()[1].rstrip('.')}."
        assert marker not in text  # no held-out text
    assert text.count("Marker") == 8
    report = json.loads((out / "report.json").read_text())
    assert report["pairs"] == {"total": 30, "train": 24, "eval": 6}
    assert report["chapters"] == {"total": 10, "with_pairs": 10, "eval": 2}
    assert report["chunks"]["count"] == len(chunks)
    assert sum(b["pairs_eval"] for b in report["per_book"]) == 6
    assert report["settings"]["aliases"] == ["Holmes", "Sherlock Holmes"]
    assert report["format"]["detected"] == ["prose"]  # auto: quotes, no speaker labels
    assert "read as prose" in report["format"]["books"][0]["reason"]
    assert len(report["samples"]) == 2 and report["samples"][0]["response"] in r.stdout
    assert report["attribution"] is None


def test_from_corpus_refuses_existing_output_and_overwrites_atomically(corpus, tmp_path):
    """Guards against silently replacing a data folder, and half-written folders or
    leftover temporary folders after a refusal, a bad setting or an overwrite."""
    out = tmp_path / "data"
    assert run(corpus, out).exit_code == 0
    before = (out / "dialogue_train.jsonl").read_bytes()
    (out / "note.txt").write_text("mine")
    r = run(corpus, out, "--seed", "3")
    assert r.exit_code == 2 and r.stderr.count("\n") == 1
    assert "already exists; pass --overwrite" in r.stderr
    assert (out / "note.txt").exists() and (out / "dialogue_train.jsonl").read_bytes() == before
    r = run(corpus, out, "--chunk-size", "50", "--chunk-overlap", "50", "--overwrite")
    assert r.exit_code == 2 and "--chunk-size/--chunk-overlap" in r.stderr
    assert (out / "note.txt").exists()
    r = run(corpus, out, "--seed", "3", "--overwrite")
    assert r.exit_code == 0, r.output
    assert not (out / "note.txt").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["corpus.txt", "data"]


@pytest.mark.parametrize(
    "args,message",
    [
        (["--eval-chapters", "1.0"], "--eval-chapters 1.0"),
        (["--alias", "Poirot", "--character", "Poirot"], "found no attributed lines of Poirot"),
        (["--labels", "missing.jsonl"], "no such labels file"),
    ],
)
def test_from_corpus_bad_input_is_one_line_and_writes_nothing(corpus, tmp_path, args, message):
    """Guards against tracebacks (ValueError from the text module) or an empty data
    folder when the settings are impossible or nothing is found."""
    out = tmp_path / "data"
    r = run(corpus, out, *args)
    assert r.exit_code == 2 and r.stderr.count("\n") == 1, r.output
    assert message in r.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["corpus.txt"]


def test_from_corpus_missing_corpus(tmp_path):
    """Guards against a traceback for a wrong corpus path."""
    r = run(tmp_path / "nope.txt", tmp_path / "data")
    assert r.exit_code == 2 and "no such corpus file or folder" in r.stderr


def test_from_corpus_reads_a_folder_of_books_and_scores_labels(tmp_path):
    """Guards against folder input being read as one book (or not at all), book titles
    not following the file names, and labels being ignored or mis-scored."""
    books = tmp_path / "books"
    books.mkdir()
    (books / "book_a.txt").write_text(book_text("A", 3), encoding="utf-8")
    (books / "book_b.txt").write_text("\ufeff" + book_text("B", 3), encoding="utf-8")
    (books / "notes.md").write_text("not a book")
    labels = tmp_path / "labels.jsonl"
    rows = [
        {"book": "book a", "quote": "It is quite simple, number A10", "is_character": True},
        {"book": "book a", "quote": "What of the case number A10?", "is_character": False},
        {"book": "book b", "quote": "What of the case number B21?", "speaker_is_holmes": True},
    ]  # deliberately mislabelled: a miss
    labels.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "data"
    r = run(books, out, "--labels", str(labels))
    assert r.exit_code == 0, r.output
    report = json.loads((out / "report.json").read_text())
    assert [b["book"] for b in report["per_book"]] == ["book a", "book b"]
    assert report["pairs"]["total"] == 18
    assert report["attribution"] == {
        "labelled": 3,
        "precision": 1.0,
        "recall": 0.5,
        "tp": 1,
        "fp": 0,
        "fn": 1,
    }
    assert "precision 1.000 (1/1), recall 0.500 (1/2)" in r.stdout
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"book": "book c", "quote": "x", "is_character": True}) + "\n")
    r = run(books, tmp_path / "data2", "--labels", str(bad))
    assert r.exit_code == 2 and "book 'book c' is not in the corpus" in r.stderr


def spec_over(data: Path, tmp_path: Path, tiny_model: Path, sources: str) -> Path:
    spec = tmp_path / "persona.yaml"
    spec.write_text(
        f"name: detective\nsystem_prompt: You are Sherlock Holmes.\n"
        f"model:\n  name: {tiny_model}\ndata:\n{sources}"
        f"guard:\n  enabled: false\n"  # a random model has no capability to guard
        f"train:\n  max_seq_length: 256\n  eval_split: 0.5\n"
    )
    return spec


def test_spec_mixes_chunks_and_pairs_with_held_out_chapters_as_eval(
    corpus, tmp_path, tiny_model, embedded_tokenizer
):
    """Guards against the held-out chapters not being the eval set (a random split of the
    training pairs instead), text chunks being held out or masked like chat, weights not
    applying to the text source, and eval pairs that also appear in training."""
    out = tmp_path / "data"
    assert run(corpus, out).exit_code == 0
    train = read_jsonl(out / "dialogue_train.jsonl")
    held = read_jsonl(out / "dialogue_eval.jsonl")
    chunks = read_jsonl(out / "chunks_train.jsonl")
    with (out / "dialogue_eval.jsonl").open("a") as f:  # a leaked training pair
        f.write(json.dumps(train[0]) + "\n")
    spec = spec_over(
        out,
        tmp_path,
        tiny_model,
        f"  - path: {out}/dialogue_train.jsonl\n"
        f"    eval_path: {out}/dialogue_eval.jsonl\n"
        f"  - path: {out}/chunks_train.jsonl\n    format: text\n"
        f"    eval_size: 0\n    weight: 2\n",
    )
    data = prepare_data(load_spec(spec), embedded_tokenizer)
    pairs, text = data.stats
    assert (pairs.train, pairs.eval, pairs.duplicates) == (len(train), len(held), 1)
    distinct = len({c["text"] for c in chunks})  # the synthetic text repeats itself
    assert (text.train, text.eval, text.duplicates) == (distinct, 0, len(chunks) - distinct)
    assert len(data.train) == len(train) + 2 * distinct
    assert [e.messages[-1]["content"] for e in data.eval_examples] == [p["response"] for p in held]
    assert {e.meta["chapter"] for e in data.eval_examples} == {p["chapter"] for p in held}
    chunk_ids = {
        tuple(embedded_tokenizer(c["text"], add_special_tokens=False)["input_ids"]) for c in chunks
    }
    text_rows = [r for r in data.train if tuple(r["input_ids"][:-1]) in chunk_ids]
    assert len(text_rows) == 2 * distinct
    assert all(r["labels"] == r["input_ids"] for r in text_rows)  # every token trained
    chat_rows = [r for r in data.train if r not in text_rows]
    assert all(-100 in r["labels"] for r in chat_rows)  # prompts not trained


def test_eval_path_and_eval_size_conflict(tmp_path, tiny_model):
    """Guards against a spec that asks for two different eval sets for one source."""
    spec = spec_over(
        tmp_path,
        tmp_path,
        tiny_model,
        "  - path: a.jsonl\n    eval_path: b.jsonl\n    eval_size: 3\n",
    )
    with pytest.raises(PersonatuneError, match="eval_path or eval_size"):
        load_spec(spec)


def test_eval_path_survives_the_resolved_spec(corpus, tmp_path, tiny_model):
    """Guards against a persona directory's config.yaml keeping a relative eval_path,
    which would point nowhere once loaded from the persona directory."""
    from personatune.config import dump_spec

    spec = spec_over(
        tmp_path, tmp_path, tiny_model, "  - path: a.jsonl\n    eval_path: held/b.jsonl\n"
    )
    dumped = dump_spec(load_spec(spec))
    assert f"eval_path: {(tmp_path / 'held/b.jsonl').resolve()}" in dumped


@pytest.fixture(scope="module")
def sherlock_data(tmp_path_factory):
    """The from-corpus output of the shared Holmes corpus (as `make sherlock` builds it)
    laid out like the repository, so examples/sherlock/persona.yaml finds it, or skip."""
    if not CORPUS.is_file():
        pytest.skip(f"Sherlock corpus not found at {CORPUS}")
    from personatune.data.from_corpus import from_corpus

    root = tmp_path_factory.mktemp("repo")
    (root / "examples/sherlock").mkdir(parents=True)
    (root / "examples/sherlock/persona.yaml").write_text(EXAMPLE.read_text())
    report = from_corpus(
        CORPUS,
        root / "runs/sherlock-data",
        character="Holmes",
        aliases=["Sherlock Holmes", "Mr. Holmes"],
        narrator_names=["Watson"],
        excluded=["Mycroft Holmes"],
        labels=LABELS,
    )
    return root, report


def test_sherlock_from_corpus_meets_the_issue_bar(sherlock_data):
    """Guards against the real-corpus pipeline falling below the issue's bar: at least
    2,000 Holmes replies, attribution precision of at least 0.90 on the labelled sample,
    and a held-out set of whole chapters with enough lines to measure perplexity."""
    root, report = sherlock_data
    assert report["pairs"]["total"] >= 2000
    assert report["attribution"]["precision"] >= 0.90
    assert report["attribution"]["tp"] + report["attribution"]["fp"] >= 20
    assert report["pairs"]["eval"] >= 100 and report["chapters"]["eval"] >= 5
    held = read_jsonl(root / "runs/sherlock-data/dialogue_eval.jsonl")
    train = read_jsonl(root / "runs/sherlock-data/dialogue_train.jsonl")
    assert not {(p["book"], p["chapter"]) for p in held} & {
        (p["book"], p["chapter"]) for p in train
    }


def test_sherlock_example_spec_prepares(sherlock_data, embedded_tokenizer):
    """Guards against the shipped Sherlock example drifting from the from-corpus output
    (paths, formats) or losing its held-out-chapter eval set or trained text chunks."""
    root, report = sherlock_data
    spec = load_spec(root / "examples/sherlock/persona.yaml")
    data = prepare_data(spec, embedded_tokenizer)
    pairs, text = data.stats
    assert pairs.eval > 0.9 * report["pairs"]["eval"] and text.eval == 0
    assert text.train == spec.data[1].subset_size and text.trained_tokens == text.tokens
    assert all(e.meta["chapter"] for e in data.eval_examples)
