"""``personatune data from-corpus``: turn a raw book corpus into persona data files.

One call reads a corpus (one text file with ``--- From <title> ---`` separators, or a
folder of one ``.txt`` file per book), holds out whole chapters, extracts the character's
replies with :mod:`personatune.data.corpus`, and writes into the output folder:

* ``dialogue_train.jsonl`` / ``dialogue_eval.jsonl``: ``{"prompt", "response", "book",
  "chapter", "offset", "prompt_kind"}`` pairs; eval holds the held-out chapters only;
* ``chunks_train.jsonl``: ``{"text", "book", "chapter"}`` chunks of the training chapters
  for continued pre-training (format ``text``: every token trained);
* ``report.json``: counts per book, prompt kinds, held-out chapters, attribution
  precision and recall on a labelled sample (``labels``), random samples.

The folder is built beside the target under a temporary name and renamed when complete.
"""

from __future__ import annotations

import shutil
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

from personatune.data._corpus_dialogue import DEFAULT_COMPANIONS, Utterance
from personatune.data.corpus import (
    Book,
    chunk_text,
    corpus_report,
    extract_dialogue,
    extract_utterances,
    split_books,
    split_by_chapter,
    to_records,
)
from personatune.errors import PersonatuneError
from personatune.io import (
    check_replaceable,
    jsonl_records,
    new_work_dir,
    publish,
    write_json,
    write_jsonl,
)

FILES = ("dialogue_train.jsonl", "dialogue_eval.jsonl", "chunks_train.jsonl", "report.json")


def read_corpus(path: str | Path, encoding: str = "utf-8") -> list[Book]:
    """Read and clean a corpus into books with chapters.

    ``path`` is a text file (books introduced by ``--- From <title> ---`` lines; without
    them the file is one book named after the file) or a folder whose ``*.txt`` files are
    one book each, titled after the file name (``the_sign_of_four.txt`` -> "the sign of
    four"), in name order. A UTF-8 byte-order mark is accepted.

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
        books += split_books(text, title=f.stem.replace("_", " ").replace("-", " "))
    books = [b for b in books if b.chapters]
    if not books:
        raise PersonatuneError(f"{path}: no book text found after cleaning")
    titles = Counter(b.title for b in books)
    if max(titles.values()) > 1:
        dup = next(t for t, n in titles.items() if n > 1)
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
    book's cleaned text is used). Precision = TP / (TP + FP), recall = TP / (TP + FN),
    each None when its denominator is 0. Returns ``{"labelled", "precision", "recall",
    "tp", "fp", "fn"}``.

    Raises:
        PersonatuneError: a label names a book not in the corpus or a quote not in its book.
    """
    text = {b.title: b.text for b in books}
    spans: dict[str, list[tuple[int, int]]] = {}
    for u in utterances:
        if u.speaker == character:
            spans.setdefault(u.chapter.book, []).append(
                (u.chapter.offset + u.start - 1, u.chapter.offset + u.end)
            )
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
        aliases: other names of the character in narration (``character`` itself is
            always one).
        narrator_names: the first-person narrator's names (``["Watson"]``); empty turns
            off the rule that gives lines addressing the narrator to the character.
        excluded: other people whose names contain an alias (``["Mycroft Holmes"]``).
        companions: the narrator's phrases for the character (default "my companion",
            "my friend", "my comrade"); empty for third-person books.
        chunk_size, chunk_overlap: characters per text chunk and shared between
            neighbours (defaults 500 and 50, as seed system 2).
        eval_chapters: share of the chapters in which the character speaks that is held
            out whole (default 0.1; at least one when above 0 and there are two such
            chapters), chosen by a seeded hash of (book, chapter title) with ``seed``
            (default 0, see :func:`~personatune.data.corpus.split_by_chapter`); their
            pairs go to ``dialogue_eval.jsonl`` and their text to no file.
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
    if out.exists() and not overwrite:
        raise PersonatuneError(f"{out} already exists; pass --overwrite to replace it")
    if out.exists() and not out.is_dir():
        raise PersonatuneError(f"{out} is a file; choose a folder for --out")
    check_replaceable(out, "corpus data folder", [corpus, *([labels] if labels else [])], SIGNATURE)
    if not character.strip():
        raise PersonatuneError("--character must not be empty")
    if not 0 <= eval_chapters < 1:
        raise PersonatuneError(f"--eval-chapters {eval_chapters}: give a share in [0, 1)")
    try:
        chunk_text("x", chunk_size, chunk_overlap)
    except ValueError as e:
        raise PersonatuneError(f"--chunk-size/--chunk-overlap: {e}") from None
    aliases = list(dict.fromkeys([character, *aliases]))
    label_rows = read_labels(labels, character) if labels else None

    books = read_corpus(corpus, encoding)
    chapters = [c for b in books for c in b.chapters]
    people = {
        "character": character,
        "aliases": aliases,
        "companions": tuple(companions),
        "narrator_names": tuple(narrator_names),
        "excluded": tuple(excluded),
    }
    pairs = to_records(extract_dialogue(chapters, **people))
    if not pairs:
        raise PersonatuneError(
            f"{corpus}: found no attributed lines of {character}; check "
            "--character and --alias (names as printed in the text)"
        )
    train, evals = split_by_chapter(pairs, eval_chapters, seed)
    held_keys = {(p["book"], p["chapter"]) for p in evals}
    chunks = [
        {"text": t, "book": c.book, "chapter": c.title}
        for c in chapters
        if (c.book, c.title) not in held_keys
        for t in chunk_text(c.text, chunk_size, chunk_overlap)
    ]
    attribution = None
    if label_rows is not None:
        utts = extract_utterances(chapters, **people)
        attribution = score_attribution(books, utts, label_rows, character, str(labels))

    summary = corpus_report(pairs, n_samples=n_samples, seed=seed)
    report = {
        "corpus": str(corpus),
        "settings": {
            **people,
            "companions": list(companions),
            "narrator_names": list(narrator_names),
            "excluded": list(excluded),
            "chunk_size": chunk_size,
            "chunk_overlap": chunk_overlap,
            "eval_chapters": eval_chapters,
            "seed": seed,
        },
        "pairs": {"total": len(pairs), "train": len(train), "eval": len(evals)},
        "chapters": {
            "total": len(chapters),
            "with_pairs": summary["chapters"],
            "eval": len(held_keys),
        },
        "per_book": [
            {
                "book": b.title,
                "chapters": len(b.chapters),
                "eval_chapters": sum((b.title, c.title) in held_keys for c in b.chapters),
                "pairs_train": sum(p["book"] == b.title for p in train),
                "pairs_eval": sum(p["book"] == b.title for p in evals),
                "chunks": sum(c["book"] == b.title for c in chunks),
            }
            for b in books
        ],
        "prompt_kinds": summary["prompt_kinds"],
        "response_chars": summary["response_chars"],
        "chunks": {"count": len(chunks), "chars": sum(len(c["text"]) for c in chunks)},
        "eval_chapter_titles": sorted(f"{b} / {c}" for b, c in held_keys),
        "attribution": attribution,
        "samples": summary["samples"],
    }

    work = new_work_dir(out)
    try:
        write_jsonl(work / "dialogue_train.jsonl", train)
        write_jsonl(work / "dialogue_eval.jsonl", evals)
        write_jsonl(work / "chunks_train.jsonl", chunks)
        write_json(work / "report.json", report)
        publish(work, out)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    return report
