"""Turn a plain-text book corpus into persona training data (pure Python, no ML).

Pipeline::

    books = split_books(raw_text)                  # clean each book, find its chapters
    chapters = [c for b in books for c in b.chapters]
    pairs = extract_dialogue(chapters)             # (prompt, Holmes reply) pairs
    train, held_out = split_by_chapter(pairs)      # whole chapters held out
    chunks = chunk_text(chapters[0].text)          # continued pre-training text

Plays and screenplays take the same road with ``split_books(text, format="auto")`` (or
``"play"``/``"screenplay"``): lines are kept (:func:`clean_script`), scenes are the
chapters (:func:`split_scenes`) and :func:`extract_script_dialogue` pairs the
character's labelled turns with the turn before.

All lengths, sizes and offsets are in characters (Python ``str`` indices) of the
*cleaned* book text (:attr:`Book.text`), so ``book.text[pair.offset:]`` starts with the
reply. Speaker attribution lives in the helper modules :mod:`._corpus_dialogue` (prose)
and :mod:`._corpus_script` (plays and screenplays).
"""

from __future__ import annotations

import hashlib
import random
import re
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from personatune.data._corpus_dialogue import (
    DEFAULT_ALIASES,
    DEFAULT_COMPANIONS,
    DEFAULT_EXCLUDED,
    DEFAULT_NARRATOR_NAMES,
    Utterance,
    extract_utterances,
)
from personatune.data._corpus_script import FORMATS, detect_format, parse_turns, scene_spans

__all__ = [
    "FORMATS",
    "Book",
    "Chapter",
    "DialoguePair",
    "Utterance",
    "chunk_text",
    "clean_script",
    "clean_text",
    "corpus_report",
    "detect_format",
    "extract_dialogue",
    "extract_script_dialogue",
    "extract_utterances",
    "script_turns",
    "split_books",
    "split_by_chapter",
    "split_chapters",
    "split_scenes",
    "to_records",
]

# --------------------------------------------------------------------------- data types


@dataclass
class Chapter:
    """One chapter (or story section) of a book.

    Attributes:
        book: title of the book it belongs to.
        index: 1-based position among the book's chapters.
        title: heading as printed (unique within the book), e.g. ``"CHAPTER I. MR. SHERLOCK
            HOLMES."``; used as the chapter key in dialogue pairs and splits.
        text: chapter body without its heading lines, paragraphs separated by one blank line.
        offset: character offset of ``text`` in the cleaned book text, so that
            ``book.text[offset:offset + len(text)] == text``.
    """

    book: str
    index: int
    title: str
    text: str = field(repr=False)
    offset: int


@dataclass
class Book:
    """A book: its title, chapters, and the cleaned full text that chapter offsets index.

    ``format`` is ``"prose"``, ``"play"`` or ``"screenplay"`` (chapters of a script are its
    scenes); ``format_reason`` says why, when the format was detected."""

    title: str
    chapters: list[Chapter]
    text: str = field(default="", repr=False)
    format: str = "prose"
    format_reason: str = ""


@dataclass
class DialoguePair:
    """A reply by the persona character paired with what it answers.

    Attributes:
        prompt: the preceding utterance of another speaker (``prompt_kind="utterance"``) or,
            where there is none, up to ~300 characters of preceding narrative
            (``prompt_kind="narrative"``).
        response: the character's spoken words, quote marks and narration removed.
        book, chapter: book title and chapter title (unique within the book).
        offset: character offset of the reply's first spoken character in the cleaned book.
        prompt_kind: ``"utterance"`` or ``"narrative"``.
    """

    prompt: str
    response: str
    book: str
    chapter: str
    offset: int
    prompt_kind: str


# --------------------------------------------------------------------------- cleaning

_GUTENBERG_START = re.compile(
    r"^\*{3}\s*START OF (?:THE|THIS) PROJECT GUTENBERG[^*]{0,300}\*{3}[^\n]*$",
    re.MULTILINE | re.IGNORECASE,
)
_GUTENBERG_END = re.compile(
    r"^(?:\*{3}\s*END OF (?:THE|THIS) PROJECT GUTENBERG|End of (?:the )?Project Gutenberg)",
    re.MULTILINE | re.IGNORECASE,
)
_ILLUSTRATION = re.compile(r"\[Illustration[^\]]*\]", re.IGNORECASE)
_ITALIC = re.compile(r"(?<!\w)_(?=\S)|(?<=\S)_(?!\w)")
_QUOTES = str.maketrans(  # curly quotes to straight ones, no-break space to space, no BOM
    "\u201c\u201d\u201e\u201f\u2033\u2018\u2019\u201a\u201b\u2032\u00a0",
    '"' * 5 + "'" * 5 + " ",
    "\ufeff",
)


def clean_text(text: str) -> str:
    """Clean the raw text of ONE book into paragraphs separated by a single blank line.

    Removes a Project Gutenberg header (everything up to a ``*** START OF ... ***`` line) and
    footer (from ``*** END OF ...``) when present, ``[Illustration: ...]`` markers and
    ``_italic_`` underscores; maps curly quotes to straight ones (“ ” -> ``"``, ‘ ’ -> ``'``,
    so apostrophes such as ``don’t`` become ``don't``; no apostrophe is removed or
    treated as a quote); joins the hard-wrapped lines of each paragraph with single spaces
    and collapses runs of whitespace. Every mapping is one character to one character or a
    deletion, never an insertion. Call it per book: on a multi-book corpus a Gutenberg
    header would cut off the books before it (:func:`split_books` does this for you).

    Returns ``""`` for empty or whitespace-only input; raises ``TypeError`` if ``text`` is
    not a ``str``.
    """
    if not isinstance(text, str):
        raise TypeError(f"clean_text expects str, got {type(text).__name__}")
    text = _ITALIC.sub("", _strip_boilerplate(text))
    paragraphs = (" ".join(p.split()) for p in re.split(r"\n[ \t]*\n", text))
    return "\n\n".join(p for p in paragraphs if p)


def _strip_boilerplate(text: str) -> str:
    """Unix newlines, no Gutenberg header or footer, no illustration markers, straight
    quotes (one character to one, or a deletion)."""
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    if start := _GUTENBERG_START.search(text):
        text = text[start.end() :]
    if end := _GUTENBERG_END.search(text):
        text = text[: end.start()]
    return _ILLUSTRATION.sub("", text).translate(_QUOTES)


def clean_script(text: str) -> str:
    """Clean the raw text of ONE play or screenplay, keeping its lines.

    Like :func:`clean_text` (Gutenberg header and footer, illustration markers, curly
    quotes) but lines stay as they are, with their indentation (tabs expanded to 8
    columns), because labels and centred speaker cues are line-based; trailing spaces and
    leading and trailing blank lines are removed, and ``_italics_`` are kept (they mark
    stage directions). Raises ``TypeError`` if ``text`` is not a ``str``.
    """
    if not isinstance(text, str):
        raise TypeError(f"clean_script expects str, got {type(text).__name__}")
    lines = [line.expandtabs(8).rstrip() for line in _strip_boilerplate(text).split("\n")]
    return "\n".join(lines).strip("\n")


# --------------------------------------------------------------------------- books, chapters

_BOOK_SEPARATOR = re.compile(r"^-{3}\s*From\s+(.+?)\s*-{3}[ \t]*$", re.MULTILINE)
_NUM = r"(?:[IVXLC]+|\d+)"
_CHAPTER = re.compile(rf"^(?:CHAPTER|Chapter|ADVENTURE|Adventure)\s+{_NUM}\b\.?(?:\s+(.+))?$")
_PART = re.compile(rf"^(?:PART|Part|BOOK|Book)\s+{_NUM}\b\.?(?:\s+(.+))?$")
_NUMBERED_STORY = re.compile(r"^[IVXLC]+\.\s+[A-Z\"'].*$")  # "I. A SCANDAL IN BOHEMIA"
_STORY = re.compile(r"^THE ADVENTURE OF\b[^a-z]*$")  # "THE ADVENTURE OF THE ..."
_SECTION = re.compile(r"^[IVXLC]+\.?$")  # bare "II." inside a story
_THE_END = re.compile(r"^THE END\.?$", re.IGNORECASE)
_HEADINGS = (("end", _THE_END), ("chapter", _CHAPTER), ("part", _PART), ("section", _SECTION))
_MAX_HEADING = 100  # characters; longer paragraphs are never headings
MIN_CHAPTER_CHARS = 300  # shorter bodies (tables of contents, epigraphs) are dropped


def split_books(text: str, title: str | None = None, format: str = "prose") -> list[Book]:
    """Split a corpus on ``--- From <title> ---`` lines into cleaned books with chapters.

    Each book's raw text is cleaned with :func:`clean_text` (so Gutenberg headers of one book
    do not eat the others) and split with :func:`split_chapters`; with ``format`` ``"play"``
    or ``"screenplay"`` it is cleaned with :func:`clean_script` and split into scenes with
    :func:`split_scenes` instead, and ``"auto"`` picks per book with :func:`detect_format`
    (the book's ``format_reason`` says why). Without separators the whole text is one book
    named ``title`` (default ``"Untitled"``); text before the first separator is ignored.
    Returns ``[]`` for blank input; raises ``TypeError`` for non-str and ``ValueError`` for
    an unknown ``format`` (default ``"prose"``).
    """
    if not isinstance(text, str):
        raise TypeError(f"split_books expects str, got {type(text).__name__}")
    if format not in ("auto", *FORMATS):
        raise ValueError(f"format must be auto, {', '.join(FORMATS)}; got {format!r}")
    pieces = _BOOK_SEPARATOR.split(text)  # [before, title 1, book 1, title 2, book 2...]
    parts = list(zip(pieces[1::2], pieces[2::2])) or [(title or "Untitled", text)]
    books = []
    for name, raw in parts:
        fmt, reason = format, ""
        if fmt != "prose":
            script = clean_script(raw)
            if fmt == "auto":
                fmt, reason = detect_format(script)
        cleaned = clean_text(raw) if fmt == "prose" else script
        if cleaned:
            book = Book(title=name, chapters=[], text=cleaned, format=fmt, format_reason=reason)
            book.chapters = split_chapters(book) if fmt == "prose" else split_scenes(book)
            books.append(book)
    return books


def split_scenes(book: Book) -> list[Chapter]:
    """The scenes of a play or screenplay cleaned by :func:`clean_script`, as chapters.

    Headings (at the start of a block): ``ACT I``, ``SCENE 2. The same.`` (titled after
    the act, ``"ACT I SCENE 2. The same."``) and screenplay scene headings
    (``INT. FERRY CABIN - NIGHT``, ``EXT.``, ``INT./EXT.``, ``I/E``). Heading lines are
    in no scene's text; text before the first heading (title page, list of persons) and
    scenes without text are dropped. A script without headings is one chapter titled
    after the book. Titles are made unique as in :func:`split_chapters`.
    """
    found = scene_spans(book.text) or ([(book.title, 0, len(book.text))] if book.text else [])
    return _chapters(book.title, book.text, found)


def _paragraphs(text: str) -> list[tuple[int, int]]:
    """(start, end) character spans of the blank-line separated paragraphs of cleaned text."""
    return [(m.start(), m.end()) for m in re.finditer(r"[^\n]+(?:\n[^\n]+)*", text)]


def _is_title_line(p: str) -> bool:
    """A short heading-like line such as 'MR. SHERLOCK HOLMES.' or 'The Science of Deduction'."""
    if len(p) > 80 or '"' in p or not p[0].isupper() or p[-1] in ",;:":
        return False
    return p.isupper() or all(w[0].isupper() for w in re.findall(r"[A-Za-z']{5,}", p))


def _heading(p: str) -> str | None:
    """Classify a paragraph: 'chapter', 'part', 'story', 'section', 'end' or None."""
    if len(p) > _MAX_HEADING:
        return None
    for kind, pattern in _HEADINGS:
        if pattern.match(p):
            return kind
    if (_NUMBERED_STORY.match(p) or _STORY.match(p)) and _is_title_line(
        p.split(". ", 1)[-1].replace('"', "")
    ):
        return "story"
    return None


def split_chapters(book: Book | str, min_chars: int = MIN_CHAPTER_CHARS) -> list[Chapter]:
    """Find the chapters of a cleaned book (a :class:`Book` or its cleaned text).

    Headings recognised (each a paragraph of at most 100 characters): ``CHAPTER I.`` /
    ``Chapter 3.`` / ``ADVENTURE II.`` (optionally with the title inline or in the next short
    paragraph), ``PART II.`` (prefixed to the following chapter titles), numbered story
    titles ``IV. THE BOSCOMBE VALLEY MYSTERY`` / ``I. Silver Blaze``, ``THE ADVENTURE OF ...``,
    and bare section numbers ``II.`` inside a story (which start a new chapter titled
    ``"<story> II."``). Heading lines are not part of any chapter's text; front matter and
    tables of contents (everything before the first heading, and headings whose body is
    shorter than ``min_chars``, default 300 characters) are dropped, as is everything after
    a ``THE END`` line. A book without any heading is one chapter titled after the book.
    Chapter titles are made unique within the book by appending `` (2)``, `` (3)``, ...
    """
    title, text = (book.title, book.text) if isinstance(book, Book) else ("Untitled", book)
    spans = _paragraphs(text)
    found: list[tuple[str, int, int]] = []  # (chapter title, body start, body end)
    part = story = current = ""
    body: list[tuple[int, int]] = []
    started = ended = False

    def flush() -> None:
        if started and body and body[-1][1] - body[0][0] >= min_chars:
            found.append((current, body[0][0], body[-1][1]))
        body.clear()

    i = 0
    while i < len(spans):
        p = text[spans[i][0] : spans[i][1]]
        kind = _heading(p)
        if kind is None:
            if not ended:
                body.append(spans[i])
            i += 1
            continue
        flush()
        ended = kind == "end"
        if kind == "end":
            i += 1
            continue
        started = True
        label = p
        nxt = text[spans[i + 1][0] : spans[i + 1][1]] if i + 1 < len(spans) else ""
        if (
            kind in ("chapter", "part")
            and not (_CHAPTER.match(p) or _PART.match(p)).group(1)
            and nxt
            and _heading(nxt) is None
            and _is_title_line(nxt)
        ):
            label, i = f"{p} {nxt}", i + 1  # title printed on its own line
        if kind == "part":
            part, current = label, label
        elif kind == "chapter":
            current = f"{part} {label}" if part else label
        elif kind == "story":
            part, story, current = "", label, label
        else:
            current = f"{story} {label}" if story else label
        i += 1
    flush()
    if not started and text:
        found = [(title, 0, len(text))]
    return _chapters(title, text, found)


def _chapters(book: str, text: str, found: list[tuple[str, int, int]]) -> list[Chapter]:
    """Chapters of ``(title, start, end)`` spans of ``text``, repeated titles numbered."""
    chapters, seen = [], Counter()
    for idx, (name, start, end) in enumerate(found, 1):
        seen[name] += 1
        unique = name if seen[name] == 1 else f"{name} ({seen[name]})"
        chapters.append(Chapter(book, idx, unique, text=text[start:end], offset=start))
    return chapters


# --------------------------------------------------------------------------- dialogue


def _narrative_before(ch: Chapter, pos: int, limit: int = 300) -> str:
    """Up to ``limit`` characters of chapter text before ``pos``, cut at a sentence start."""
    before = ch.text[:pos].rstrip(' "')
    if len(before) > limit:
        before = before[-limit:]
        cut = re.search(r"[.!?][\"']?\s+(?=\S)", before[: limit // 2])
        before = before[cut.end() :] if cut else before.split(" ", 1)[-1]
    return re.sub(r"\s*\n\s*", "\n", before).strip()


def extract_dialogue(
    chapters: Iterable[Chapter],
    character: str = "Holmes",
    aliases: Sequence[str] = DEFAULT_ALIASES,
    companions: Sequence[str] = DEFAULT_COMPANIONS,
    context_chars: int = 300,
    max_gap_chars: int = 400,
    narrator_names: Sequence[str] = DEFAULT_NARRATOR_NAMES,
    excluded: Sequence[str] = DEFAULT_EXCLUDED,
) -> list[DialoguePair]:
    """Pair every attributed reply of ``character`` with what precedes it.

    Speech is found and attributed by :func:`extract_utterances` (speech verbs next to the
    quote, "said he" where unambiguous, ``companions`` such as "my friend" meaning the
    character in first-person narration, alternation in unbroken exchanges); unclear lines
    are left out, because precision matters more than recall. The prompt
    (``prompt_kind="utterance"``) is the previous turn in the chapter when it is someone
    else's with at most ``max_gap_chars`` characters (default 400) and one paragraph of
    narration in between, or a turn of unknown speaker in the paragraph just before with at
    most 150 characters of narration in between. Otherwise it is up to ``context_chars``
    characters (default 300) of the chapter text before the reply, cut at a sentence start
    (``prompt_kind="narrative"``). Replies with no text at all before them are skipped.
    The other arguments are :func:`extract_utterances`'s (the defaults fit the Holmes
    stories). Raises ``ValueError`` if ``aliases`` is empty.
    """
    pairs: list[DialoguePair] = []
    by_chapter: dict[tuple[str, int], list[Utterance]] = {}
    for u in extract_utterances(chapters, character, aliases, companions, narrator_names, excluded):
        by_chapter.setdefault((u.chapter.book, u.chapter.index), []).append(u)
    for utts in by_chapter.values():
        for k, u in enumerate(utts):
            if u.speaker != character:
                continue
            ch = u.chapter
            prev = utts[k - 1] if k else None
            between = ch.text[prev.end : u.start].strip(' "\n') if prev else ""
            if (
                prev
                and prev.speaker != character
                and (
                    len(between) <= max_gap_chars and between.count("\n\n") <= 1
                    if prev.speaker
                    else len(between) <= 150 and prev.last_para + 1 == u.para
                )
            ):
                prompt, kind = prev.text, "utterance"
            else:
                prompt, kind = _narrative_before(ch, u.start, context_chars), "narrative"
            if prompt and u.text:
                pairs.append(
                    DialoguePair(prompt, u.text, ch.book, ch.title, ch.offset + u.start, kind)
                )
    return pairs


def script_turns(
    chapters: Iterable[Chapter], character: str, aliases: Sequence[str] = ()
) -> list[Utterance]:
    """Every labelled turn of the scenes of a play or screenplay, in order; the turns
    whose label is ``character`` or one of ``aliases`` (case and spacing ignored) have
    ``speaker == character`` (rules: :mod:`._corpus_script`)."""
    return [u for ch in chapters for u in parse_turns(ch, character, aliases)]


def extract_script_dialogue(
    chapters: Iterable[Chapter],
    character: str,
    aliases: Sequence[str] = (),
    context_chars: int = 300,
    max_gap_chars: int = 400,
) -> list[DialoguePair]:
    """Pair each turn of ``character`` in a play or screenplay with the turn before it.

    The prompt (``prompt_kind="utterance"``) is the previous turn of the scene when it is
    another speaker's and at most ``max_gap_chars`` characters (default 400) of stage
    directions or action stand between the two; otherwise it is up to ``context_chars``
    characters (default 300) of the scene text before the character's label, cut at a
    sentence start (``prompt_kind="narrative"``; labels, directions and action as
    printed). Turns without spoken text (only a direction) and turns with nothing before
    them are skipped. ``offset`` is the reply's first spoken character in the cleaned
    book text; ``chapter`` is the scene title.
    """
    pairs: list[DialoguePair] = []
    for ch in chapters:
        turns = parse_turns(ch, character, aliases)
        for k, u in enumerate(turns):
            if u.speaker != character or not u.text:
                continue
            prev = turns[k - 1] if k else None
            gap = ch.text[prev.end : u.cue].strip() if prev else ""
            if prev and prev.speaker != character and len(gap) <= max_gap_chars:
                prompt, kind = prev.text, "utterance"
            else:
                prompt, kind = _narrative_before(ch, u.cue, context_chars), "narrative"
            if prompt:
                pairs.append(
                    DialoguePair(prompt, u.text, ch.book, ch.title, ch.offset + u.start, kind)
                )
    return pairs


def to_records(pairs: Iterable[DialoguePair]) -> list[dict[str, Any]]:
    """JSONL-ready dicts with keys prompt, response, book, chapter, offset, prompt_kind."""
    return [asdict(p) for p in pairs]


# --------------------------------------------------------------------------- chunks, splits


def chunk_text(text: str, size: int = 500, overlap: int = 50) -> list[str]:
    """Cut ``text`` into chunks of at most ``size`` characters for continued pre-training.

    Consecutive chunks share at most ``overlap`` characters (default 50; exactly ``overlap``
    when a chunk had to be cut inside a word). A chunk ends at the last whitespace that keeps
    it longer than ``overlap`` and the next one starts at a word start, so words are only
    split when a single run of non-space characters is longer than the room available.
    Chunks are stripped of surrounding whitespace; empty chunks are not returned.

    Raises ``ValueError`` unless ``size > overlap >= 0`` (both ints).
    """
    if any(isinstance(v, bool) or not isinstance(v, int) for v in (size, overlap)):
        raise ValueError(f"size and overlap must be ints, got {size!r} and {overlap!r}")
    if overlap < 0 or size <= overlap:
        raise ValueError(
            f"need size > overlap >= 0 (characters), got size={size}, overlap={overlap}"
        )
    chunks, start, n = [], 0, len(text)
    while start < n:
        end = min(start + size, n)
        if end < n and not text[end].isspace():
            cut = max(text.rfind(c, start + overlap + 1, end) for c in " \n\t")
            end = cut if cut > start + overlap else end
        if chunk := text[start:end].strip():
            chunks.append(chunk)
        if end >= n:
            break
        nxt = end - overlap
        if nxt > 0 and not text[nxt - 1].isspace():  # move to the next word start
            ws = re.search(r"\s", text[nxt:end])
            nxt = nxt + ws.end() if ws else nxt
        start = nxt
    return chunks


def _key(pair: Any) -> tuple[str, str]:
    if isinstance(pair, dict):
        return str(pair["book"]), str(pair["chapter"])
    return str(pair.book), str(pair.chapter)


def split_by_chapter(
    pairs: Sequence[Any], eval_fraction: float = 0.1, seed: int = 0
) -> tuple[list[Any], list[Any]]:
    """Hold out whole chapters: returns ``(train, eval)``, each in input order.

    Chapters (distinct ``(book, chapter)`` keys of :class:`DialoguePair` objects or record
    dicts) are ranked by ``sha256(seed, book, chapter)`` and the first
    ``round(eval_fraction * n_chapters)`` go to eval (at least one when
    ``eval_fraction > 0`` and there are two or more chapters). The result depends only on the
    set of chapters and the seed, never on pair order, and no chapter is in both lists.

    Raises ``ValueError`` unless ``0 <= eval_fraction <= 1``.
    """
    if not 0.0 <= eval_fraction <= 1.0:
        raise ValueError(f"eval_fraction must be in [0, 1], got {eval_fraction!r}")
    keys = sorted({_key(p) for p in pairs})
    ranked = sorted(
        keys, key=lambda k: hashlib.sha256(f"{seed}\x00{k[0]}\x00{k[1]}".encode()).hexdigest()
    )
    n_eval = round(eval_fraction * len(keys))
    if eval_fraction > 0 and n_eval == 0 and len(keys) > 1:
        n_eval = 1
    held = set(ranked[:n_eval])
    train = [p for p in pairs if _key(p) not in held]
    return train, [p for p in pairs if _key(p) in held]


def corpus_report(pairs: Sequence[Any], n_samples: int = 3, seed: int = 0) -> dict:
    """Summary of extracted pairs (:class:`DialoguePair` objects or their record dicts):
    ``pairs``, ``chapters`` (distinct), ``per_book`` and ``prompt_kinds`` counts, response
    length median and max (characters), and ``samples``: ``n_samples`` (default 3) records
    drawn with ``random.Random(seed)`` (default seed 0)."""
    records = [p if isinstance(p, dict) else asdict(p) for p in pairs]
    lengths = sorted(len(r["response"]) for r in records)
    return {
        "pairs": len(records),
        "chapters": len({_key(r) for r in records}),
        "per_book": dict(Counter(r["book"] for r in records)),
        "prompt_kinds": dict(Counter(r["prompt_kind"] for r in records)),
        "response_chars": {
            "median": lengths[len(lengths) // 2] if lengths else 0,
            "max": lengths[-1] if lengths else 0,
        },
        "samples": random.Random(seed).sample(records, min(n_samples, len(records))),
    }
