"""``personatune data from-corpus``: turn a raw book corpus into persona data files.

One call reads a corpus (one text file with ``--- From <title> ---`` separators, or a
folder of one ``.txt`` file per book), holds out whole chapters, extracts the character's
replies with :mod:`personatune.data.corpus`, and writes into the output folder:

* ``dialogue_train.jsonl`` / ``dialogue_eval.jsonl``: ``{"prompt", "response", "book",
  "chapter", "offset", "prompt_kind"}`` pairs; eval holds the held-out chapters only;
* ``chunks_train.jsonl``: ``{"text", "book", "chapter"}`` chunks of the training chapters
  for continued pre-training (format ``text``: every token trained);
* ``report.json``: the format of each book (prose, play or screenplay) and why, counts
  per book, prompt kinds, held-out chapters, attribution precision and recall on a
  labelled sample (``labels``), random samples.

Novels are read for quoted speech (:func:`~personatune.data.corpus.extract_dialogue`);
plays and screenplays for speaker labels, with scenes as chapters
(:func:`~personatune.data.corpus.extract_script_dialogue`).

The folder is built beside the target under a temporary name and renamed when complete.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from pathlib import Path

from personatune.data._corpus_dialogue import DEFAULT_COMPANIONS, Utterance
from personatune.data.corpus import (
    FORMATS,
    Book,
    Chapter,
    chunk_text,
    corpus_report,
    extract_dialogue,
    extract_script_dialogue,
    extract_utterances,
    script_turns,
    split_books,
    split_by_chapter,
    to_records,
)
from personatune.errors import PersonatuneError
from personatune.io import building, check_replaceable, jsonl_records, write_json, write_jsonl

FILES = ("dialogue_train.jsonl", "dialogue_eval.jsonl", "chunks_train.jsonl", "report.json")


def read_corpus(path: str | Path, encoding: str = "utf-8", format: str = "prose") -> list[Book]:
    """Read and clean a corpus into books with chapters.

    ``path`` is a text file (books introduced by ``--- From <title> ---`` lines; without
    them the file is one book named after the file) or a folder whose ``*.txt`` files are
    one book each, titled after the file name (``the_sign_of_four.txt`` -> "the sign of
    four"), in name order. A UTF-8 byte-order mark is accepted. ``format`` is
    ``"prose"`` (default), ``"play"``, ``"screenplay"`` or ``"auto"`` (detected per book,
    see :func:`~personatune.data.corpus.split_books`).

    Raises:
        PersonatuneError: missing path, a folder without ``.txt`` files, undecodable
            text, or no book text left after cleaning.
    """
    path = Path(path)
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix.lower() == ".txt" and p.is_file())
        if not files:
            raise PersonatuneError(f"{path}: folder has no .txt files (one file per book)")
    elif path.is_file():
        files = [path]
    else:
        raise PersonatuneError(f"{path}: no such corpus file or folder")
    enc = "utf-8-sig" if encoding.lower().replace("_", "-") in ("utf-8", "utf8") else encoding
    books: list[Book] = []
    for f in files:
        try:
            text = f.read_bytes().decode(enc)
        except UnicodeDecodeError as e:
            raise PersonatuneError(
                f"{f}: byte {e.start} is not valid {encoding}; re-save the "
                "file as UTF-8 or pass --encoding"
            ) from None
        except LookupError:
            raise PersonatuneError(f"--encoding {encoding}: unknown encoding") from None
        books += split_books(text, f.stem.replace("_", " ").replace("-", " "), format)
    books = [b for b in books if b.chapters]
    if not books:
        raise PersonatuneError(f"{path}: no book text found after cleaning")
    dup = next((t for t, n in Counter(b.title for b in books).items() if n > 1), None)
    if dup is not None:
        raise PersonatuneError(
            f"{path}: two books are titled '{dup}'; give them distinct "
            "--- From <title> --- lines or file names"
        )
    return books


def read_labels(path: str | Path, character: str) -> list[dict]:
    """Read a hand-labelled attribution sample: JSONL rows ``{"book", "quote", label}``
    where ``quote`` is a verbatim piece of a spoken line in the cleaned book text and the
    label is a boolean ``is_character`` or ``speaker_is_<character in lower case>``
    (``speaker_is_holmes``). Returns rows with the label under ``is_character``.

    Raises:
        PersonatuneError: missing file, invalid JSON, or a row without book, quote or label.
    """
    path = Path(path)
    key = f"speaker_is_{character.lower().replace(' ', '_')}"
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise PersonatuneError(f"{path}: no such labels file") from None
    rows = []
    for n, r in jsonl_records(path, text):
        label = r.get("is_character", r.get(key)) if isinstance(r, dict) else None
        if (
            not isinstance(label, bool)
            or not isinstance(r.get("book"), str)
            or not isinstance(r.get("quote"), str)
            or not r["quote"]
        ):
            raise PersonatuneError(
                f"{path}:line {n}: needs string 'book' and 'quote' and a "
                f"boolean 'is_character' or '{key}'"
            )
        rows.append({"book": r["book"], "quote": r["quote"], "is_character": label})
    if not rows:
        raise PersonatuneError(f"{path}: no labelled rows")
    return rows


def score_attribution(
    books: Sequence[Book],
    utterances: Sequence[Utterance],
    labels: Sequence[dict],
    character: str,
    where: str = "labels",
) -> dict:
    """Precision and recall of attributing quotes to ``character`` on a labelled sample.

    A labelled quote counts as attributed to the character when it lies inside an
    utterance whose ``speaker`` is ``character`` (the first occurrence of the quote in its
    book's cleaned text is used): between its opening quote mark and its end in prose,
    inside one of its spoken ``spans`` in a script (so a stage direction within the
    character's speech is not counted as the character's). Precision = TP / (TP + FP), recall = TP / (TP + FN),
    each None when its denominator is 0. Returns ``{"labelled", "precision", "recall",
    "tp", "fp", "fn"}``.

    Raises:
        PersonatuneError: a label names a book not in the corpus or a quote not in its book.
    """
    text = {b.title: b.text for b in books}
    spans: dict[str, list[tuple[int, int]]] = {}
    for u in utterances:
        if u.speaker == character:
            base = u.chapter.offset
            parts = u.spans or [(u.start - 1, u.end)]
            spans.setdefault(u.chapter.book, []).extend((base + a, base + b) for a, b in parts)
    tp = fp = fn = 0
    for i, r in enumerate(labels, 1):
        if r["book"] not in text:
            raise PersonatuneError(
                f"{where}: row {i}: book '{r['book']}' is not in the corpus "
                f"(books: {', '.join(text)})"
            )
        pos = text[r["book"]].find(r["quote"])
        if pos < 0:
            raise PersonatuneError(
                f"{where}: row {i}: quote not found in '{r['book']}': {r['quote'][:60]!r}"
            )
        said = any(a <= pos < b for a, b in spans.get(r["book"], []))
        tp += said and r["is_character"]
        fp += said and not r["is_character"]
        fn += (not said) and r["is_character"]
    return {
        "labelled": len(labels),
        "precision": tp / (tp + fp) if tp + fp else None,
        "recall": tp / (tp + fn) if tp + fn else None,
        "tp": tp,
        "fp": fp,
        "fn": fn,
    }


#: Files every output folder holds: ``--overwrite`` replaces only such a folder.
SIGNATURE = ("dialogue_train.jsonl", "report.json")


def from_corpus(
    corpus: str | Path,
    out: str | Path,
    *,
    character: str,
    aliases: Sequence[str] = (),
    narrator_names: Sequence[str] = (),
    excluded: Sequence[str] = (),
    companions: Sequence[str] = DEFAULT_COMPANIONS,
    format: str = "auto",
    chunk_size: int = 500,
    chunk_overlap: int = 50,
    eval_chapters: float = 0.1,
    seed: int = 0,
    labels: str | Path | None = None,
    n_samples: int = 5,
    encoding: str = "utf-8",
    overwrite: bool = False,
) -> dict:
    """Build persona data from a raw corpus into the folder ``out`` (see module docstring).

    Args:
        corpus: a text file or a folder of one ``.txt`` per book (:func:`read_corpus`).
        character: the persona character's canonical name (``"Holmes"``).
        aliases: other names of the character in narration or in speaker labels
            (``character`` itself is always one; labels match ignoring case).
        narrator_names: the first-person narrator's names (``["Watson"]``); empty turns
            off the rule that gives lines addressing the narrator to the character.
        excluded: other people whose names contain an alias (``["Mycroft Holmes"]``).
        companions: the narrator's phrases for the character (default "my companion",
            "my friend", "my comrade"); empty for third-person books.
        format: ``"auto"`` (default: detected per book and explained in the report),
            ``"prose"``, ``"play"`` or ``"screenplay"``.
        chunk_size, chunk_overlap: characters per text chunk and shared between
            neighbours (defaults 500 and 50, as seed system 2).
        eval_chapters: share of the chapters (scenes, in a script) in which the
            character speaks that is held out whole (default 0.1; at least one when
            above 0 and there are two such chapters), chosen by a seeded hash of (book,
            chapter title) with ``seed`` (default 0, see
            :func:`~personatune.data.corpus.split_by_chapter`); their pairs go to
            ``dialogue_eval.jsonl`` and their text to no file.
        labels: optional hand-labelled attribution sample (:func:`read_labels`).
        n_samples: random pairs kept in the report (seeded).
        overwrite: replace an existing ``out``.

    Returns:
        The report, as written to ``report.json``.

    Raises:
        PersonatuneError: ``out`` exists without ``overwrite``, bad corpus, labels or
            settings, or no line of the character found. Nothing is written then.
    """
    out = Path(out)
    _check_settings(
        out, corpus, labels, overwrite, character, format, eval_chapters, chunk_size, chunk_overlap
    )
    people = {
        "character": character,
        "aliases": list(dict.fromkeys([character, *aliases])),
        "companions": list(companions),
        "narrator_names": list(narrator_names),
        "excluded": list(excluded),
    }
    label_rows = read_labels(labels, character) if labels else None
    books = read_corpus(corpus, encoding, format)
    pairs = _extract_pairs(books, people)
    if not pairs:
        raise PersonatuneError(
            f"{corpus}: found no attributed lines of {character}; check "
            "--character and --alias (names as printed in the text or speaker labels)"
            + ("" if format != "auto" else ", or --format")
        )
    train, evals = split_by_chapter(pairs, eval_chapters, seed)
    chunks = _training_chunks(books, evals, chunk_size, chunk_overlap)
    attribution = None
    if label_rows is not None:
        utterances = _attributed_turns(books, people)
        attribution = score_attribution(books, utterances, label_rows, character, str(labels))
    settings = {
        **people,
        "format": format,
        "chunk_size": chunk_size,
        "chunk_overlap": chunk_overlap,
        "eval_chapters": eval_chapters,
        "seed": seed,
    }
    report = _report(corpus, books, settings, pairs, evals, chunks, attribution, n_samples)
    _write_folder(out, train, evals, chunks, report)
    return report


def _check_settings(
    out: Path,
    corpus: str | Path,
    labels: str | Path | None,
    overwrite: bool,
    character: str,
    format: str,
    eval_chapters: float,
    chunk_size: int,
    chunk_overlap: int,
) -> None:
    """Refuse, before reading anything, an output that may not be replaced and
    impossible settings."""
    if out.exists() and not overwrite:
        raise PersonatuneError(f"{out} already exists; pass --overwrite to replace it")
    if out.exists() and not out.is_dir():
        raise PersonatuneError(f"{out} is a file; choose a folder for --out")
    check_replaceable(out, "corpus data folder", [corpus, *([labels] if labels else [])], SIGNATURE)
    if not character.strip():
        raise PersonatuneError("--character must not be empty")
    if format not in ("auto", *FORMATS):
        raise PersonatuneError(f"--format {format}: choose auto, {', '.join(FORMATS)}")
    if not 0 <= eval_chapters < 1:
        raise PersonatuneError(f"--eval-chapters {eval_chapters}: give a share in [0, 1)")
    try:
        chunk_text("x", chunk_size, chunk_overlap)
    except ValueError as e:
        raise PersonatuneError(f"--chunk-size/--chunk-overlap: {e}") from None


def _by_format(books: Sequence[Book]) -> tuple[list[Chapter], list[Chapter]]:
    """(chapters of the prose books, scenes of the plays and screenplays)."""
    prose = [c for b in books if b.format == "prose" for c in b.chapters]
    scripts = [c for b in books if b.format != "prose" for c in b.chapters]
    return prose, scripts


def _extract_pairs(books: Sequence[Book], people: dict) -> list[dict]:
    """The character's reply pairs of every book as records, in book order: quoted
    speech in prose, labelled turns in scripts."""
    prose, scripts = _by_format(books)
    pairs = extract_dialogue(prose, **people) if prose else []
    pairs += extract_script_dialogue(scripts, people["character"], people["aliases"])
    order = {b.title: i for i, b in enumerate(books)}
    return to_records(sorted(pairs, key=lambda p: order[p.book]))  # stable within a book


def _attributed_turns(books: Sequence[Book], people: dict) -> list[Utterance]:
    """Every turn of every book with its speaker, for scoring against labels."""
    prose, scripts = _by_format(books)
    turns = extract_utterances(prose, **people) if prose else []
    return turns + script_turns(scripts, people["character"], people["aliases"])


def _training_chunks(
    books: Sequence[Book], evals: list[dict], size: int, overlap: int
) -> list[dict]:
    """Text chunks of every chapter that is not held out (held-out text goes nowhere)."""
    held = {(p["book"], p["chapter"]) for p in evals}
    return [
        {"text": t, "book": c.book, "chapter": c.title}
        for b in books
        for c in b.chapters
        if (c.book, c.title) not in held
        for t in chunk_text(c.text, size, overlap)
    ]


def _report(
    corpus: str | Path,
    books: Sequence[Book],
    settings: dict,
    pairs: list[dict],
    evals: list[dict],
    chunks: list[dict],
    attribution: dict | None,
    n_samples: int,
) -> dict:
    """The contents of ``report.json`` (module docstring); ``evals`` are the held-out
    ones of ``pairs``."""
    held = {(p["book"], p["chapter"]) for p in evals}
    train = [p for p in pairs if (p["book"], p["chapter"]) not in held]
    summary = corpus_report(pairs, n_samples=n_samples, seed=settings["seed"])
    formats = [
        {
            "book": b.title,
            "format": b.format,
            "reason": b.format_reason or f"--format {settings['format']}",
        }
        for b in books
    ]
    return {
        "corpus": str(corpus),
        "settings": settings,
        "format": {
            "requested": settings["format"],
            "detected": sorted({f["format"] for f in formats}),
            "books": formats,
        },
        "pairs": {"total": len(pairs), "train": len(train), "eval": len(evals)},
        "chapters": {
            "total": sum(len(b.chapters) for b in books),
            "with_pairs": summary["chapters"],
            "eval": len(held),
        },
        "per_book": [
            {
                "book": b.title,
                "format": b.format,
                "chapters": len(b.chapters),
                "eval_chapters": sum((b.title, c.title) in held for c in b.chapters),
                "pairs_train": sum(p["book"] == b.title for p in train),
                "pairs_eval": sum(p["book"] == b.title for p in evals),
                "chunks": sum(c["book"] == b.title for c in chunks),
            }
            for b in books
        ],
        "prompt_kinds": summary["prompt_kinds"],
        "response_chars": summary["response_chars"],
        "chunks": {"count": len(chunks), "chars": sum(len(c["text"]) for c in chunks)},
        "eval_chapter_titles": sorted(f"{b} / {c}" for b, c in held),
        "attribution": attribution,
        "samples": summary["samples"],
    }


def _write_folder(
    out: Path, train: list[dict], evals: list[dict], chunks: list[dict], report: dict
) -> None:
    """Write the four files into a temporary folder beside ``out``, then rename it."""
    with building(out) as work:
        write_jsonl(work / "dialogue_train.jsonl", train)
        write_jsonl(work / "dialogue_eval.jsonl", evals)
        write_jsonl(work / "chunks_train.jsonl", chunks)
        write_json(work / "report.json", report)
