"""Speaker-labelled turns in plays and screenplays (helper of corpus.py).

Works on text cleaned by :func:`personatune.data.corpus.clean_script`: lines and their
indentation kept, straight quotes. A turn opens with a speaker label and runs until a
blank line, the next label or a scene heading:

* ``play``: ``HAMLET. To be...`` / ``HAMLET: To be...`` with the speech on the same line,
  or ``HAMLET.`` alone on its line above it; ``Hamlet: ...`` in mixed case; ``Lane.  ...``
  in mixed case with a full stop only for names that open at least
  :data:`MIN_MIXED_LABELS` blocks of the book (Wilde's style), since "Well. I ..." opens
  ordinary verse lines too;
* ``screenplay``: a speaker cue ``JUNE`` or ``JUNE (V.O.)`` alone on its line, directly
  above the dialogue, after a blank line or centred (indented 4 columns more than the
  line above, for PDF-to-text output that lost its blank lines). A line indented less
  than the dialogue, or much more (``CUT TO:``), ends the turn; ``(MORE)``, a page
  number and ``JUNE (CONT'D)`` do not. A line in capitals right under a cue
  (``STOP THE CAR.``, ``HE STILL DOES. That's...``) is dialogue, not a new speaker,
  unless that name heads turns elsewhere too.

Both formats drop stage directions from the spoken text: ``[...]``, ``(...)`` (also over
several lines), ``_Aside._`` (italics that start with a capital and end with a full
stop, or fill the line; ``I _told_ you`` keeps its word), and lines starting with
Enter/Exit/Exeunt/Re-enter/Manet/Flourish/Sennet/Alarum. Scene headings (``ACT I``,
``SCENE 2. A room``, ``INT. KITCHEN - NIGHT``) split the text like chapters.

Uppercase labels count whatever the name, so a speaker named once (a messenger) still
ends the turn before them: an unknown label costs recall, a missed one would hand the
next speaker's line to the character. We did not use a Fountain parser (``fountain``
0.1.3 is unmaintained since 2016): plain-text plays and PDF-to-text screenplays are not
Fountain markup, and these rules cover both.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Sequence
from itertools import accumulate
from typing import TYPE_CHECKING

from personatune.data._corpus_dialogue import Utterance

if TYPE_CHECKING:
    from personatune.data.corpus import Chapter

FORMATS = ("prose", "play", "screenplay")
MIN_MIXED_LABELS = 3  # blocks a mixed-case "Name." must open to count as a label
MIN_TURNS = 4  # labelled turns below which a text is read as prose

_TITLE = r"(?:MR|MRS|MS|DR|ST|MME|MLLE|SGT|LT|CAPT|COL|GEN|PROF|REV|FR)\."
_UP_WORD = rf"(?:{_TITLE}|[A-Z][A-Z0-9'&\-]*)"
_UP_NAME = rf"{_UP_WORD}(?:[ ]+{_UP_WORD}){{0,3}}"
_MIXED_NAME = r"[A-Z][a-z][\w'\-]*(?:[ ]+[A-Z][\w'\-]*){0,2}"
_EXT = r"(?:[ ]*\((?P<ext>[^()\n]{0,40})\))?"  # (V.O.), (CONT'D), (laughing)
_UP_LABEL = re.compile(rf"(?P<name>{_UP_NAME}){_EXT}[ ]*(?P<punct>[.:])?(?:[ \t]+(?P<rest>\S.*))?")
_MIXED_LABEL = re.compile(rf"(?P<name>{_MIXED_NAME}){_EXT}[ ]*(?P<punct>[.:])[ \t]+(?P<rest>\S.*)")
_NOT_SPEAKERS = frozenset(
    "ACT SCENE CHAPTER PART BOOK INT EXT CUT FADE DISSOLVE SMASH MATCH INTERCUT CONTINUED "
    "CONT'D END TITLE TITLES SUPER INSERT ANGLE CLOSE WIDE POV BACK LATER MONTAGE FLASHBACK "
    "SERIES SHOTS CREDITS CURTAIN ENTER EXIT EXEUNT THE-END MORE TO".split()
)
_MIXED_NOT_SPEAKERS = frozenset(
    "Mr Mrs Ms Dr St Note Yes No Well Oh Ah Nay Ay Aye Sir Madam So Then Now Here There".split()
)
_ROMAN = re.compile(r"^[IVXLC]+$")
_NUM = r"(?:[IVXLC]+|\d+|ONE|TWO|THREE|FOUR|FIVE|SIX|SEVEN|One|Two|Three|Four|Five|Six|Seven)"
_ACT = re.compile(rf"^(?:ACT|Act)\s+{_NUM}\b[^\n]{{0,80}}$")
_SCENE = re.compile(rf"^(?:SCENE|Scene)\s+{_NUM}\b[^\n]{{0,100}}$")
_SLUG = re.compile(r"^(?:\d+[A-Z]?\s+)?(?:INT\.?/EXT|EXT\.?/INT|I/E|INT|EXT)\.?\s+\S[^\n]{0,100}$")
_DIRECTION_LINE = re.compile(
    r"^(?:Enter|Re-enter|Re-Enter|Exit|Exeunt|Manet|Manent|Flourish|Sennet|Alarum|Alarums)\b"
)
# stage directions inside a line: [...], (...), and _Italic direction._ (or a whole line)
_INLINE_DIRECTION = re.compile(r"\[[^\]\n]*\]|\([^)\n]*\)|_[A-Z][^_\n]*\._")
_OPENERS = {"[": "]", "(": ")"}


def _speaker_name(name: str) -> str | None:
    """The label's name with spacing collapsed, or None when it is a heading, a
    transition or a roman numeral rather than a speaker."""
    name = " ".join(name.split())
    words = name.replace(".", " ").split()
    if len(name.replace(" ", "")) < 2 or _ROMAN.match(name):
        return None
    if any(w in _NOT_SPEAKERS for w in words) or name.endswith(("TO", "TO:")):
        return None
    return name


def _heading(line: str, block_start: bool) -> str:
    """The kind of scene heading, "act", "scene" or "slug", else "". Act and scene
    headings must open a block (after a blank line) unless printed in capitals (``ACT
    I``, ``SCENE 2.``); ``INT.``/``EXT.`` need not, as PDF-to-text output often loses
    blank lines."""
    s = line.strip()
    if len(s) > 110:
        return ""
    if _SLUG.match(s):
        return "slug"
    if not block_start and not s.startswith(("ACT ", "SCENE ")):
        return ""
    return "act" if _ACT.match(s) else "scene" if _SCENE.match(s) else ""


def scene_spans(text: str) -> list[tuple[str, int, int]]:
    """``(title, body start, body end)`` of each scene of a cleaned script, in characters
    of ``text``, bodies trimmed to whole non-blank lines (headings, titles and what is
    dropped: :func:`~personatune.data.corpus.split_scenes`); ``[]`` without headings."""
    found: list[tuple[str, int, int]] = []
    act = current = ""
    start, pos, seen = 0, 0, False
    lines = text.split("\n")

    def flush(end: int) -> None:
        body = text[start:end]
        if seen and body.strip():
            lead = len(body) - len(body.lstrip("\n"))
            found.append((current, start + lead, start + len(body.rstrip())))

    for i, line in enumerate(lines):
        if kind := _heading(line, i == 0 or not lines[i - 1].strip()):
            flush(pos)
            label = " ".join(line.split())
            if kind == "act":
                act = current = label
            else:
                current = f"{act} {label}" if kind == "scene" and act else label
            seen, start = True, pos + len(line) + 1
        pos += len(line) + 1
    flush(len(text))
    return found


def mixed_labels(lines: Sequence[str]) -> set[str]:
    """Mixed-case names that open at least :data:`MIN_MIXED_LABELS` blocks (a line after a
    blank line) as ``Name. speech``: a play's labels in Wilde's style."""
    counts: Counter[str] = Counter()
    for i, line in enumerate(lines):
        if i and lines[i - 1].strip():
            continue
        m = _MIXED_LABEL.match(line.strip())
        if m and m.group("punct") == "." and m.group("name") not in _MIXED_NOT_SPEAKERS:
            counts[m.group("name")] += 1
    return {n for n, k in counts.items() if k >= MIN_MIXED_LABELS}


_PAGE_NUMBER = re.compile(r"^\d{1,4}\.?$")  # a page number of a PDF-to-text screenplay
_NAME_THEN_VERB = re.compile(rf"({_UP_NAME})[ ]+[a-z]")  # "TOM goes out."


class _Line:
    """What one line of a script is: a label (with any speech after it), a heading, a
    direction, blank, or text."""

    def __init__(self, line: str, block_start: bool, mixed: set[str]):
        self.raw, self.kind, self.name, self.rest_at, self.punct = line, "text", "", -1, ""
        self.ext = ""
        s = line.strip()
        self.indent = len(line) - len(line.lstrip(" "))
        if not s:
            self.kind = "blank"
        elif _heading(line, block_start):
            self.kind = "heading"
        elif _DIRECTION_LINE.match(s) or _INLINE_DIRECTION.fullmatch(s) or _PAGE_NUMBER.match(s):
            self.kind = "direction"
        else:
            self._label(s, block_start, mixed)

    def _label(self, s: str, block_start: bool, mixed: set[str]) -> None:
        m = _UP_LABEL.fullmatch(s)
        if m and (m.group("punct") or not m.group("rest")):
            name = _speaker_name(m.group("name"))
        else:
            m = _MIXED_LABEL.fullmatch(s)
            name = None
            if m and (m.group("punct") == ":" or (block_start and m.group("name") in mixed)):
                name = " ".join(m.group("name").split())
        if not m or not name:
            return
        self.kind, self.name, self.punct = "label", name, m.group("punct") or ""
        self.ext = m.group("ext") or ""
        if m.group("rest"):
            self.rest_at = self.indent + m.start("rest")


def _classify(lines: list[str]) -> list[_Line]:
    """Each line's kind. A label alone on its line heads a turn only when the next line is
    speech or a direction, and, unless it ends in ``.``/``:``, comes after a blank line
    or a direction or is centred (indented at least 10 columns and 4 more than the line
    above: a cue in a screenplay that lost its blank lines); resolved from the end, so
    that ``STOP THE CAR.`` (a shout heading nothing) is speech under the cue above it."""
    mixed = mixed_labels(lines)
    kinds = [_Line(line, i == 0 or not lines[i - 1].strip(), mixed) for i, line in enumerate(lines)]
    bare = [k.kind == "label" and k.rest_at < 0 and not k.punct for k in kinds]  # "JUNE"
    for i in range(len(kinds) - 1, -1, -1):
        ln = kinds[i]
        if ln.kind != "label" or ln.rest_at >= 0:
            continue
        if ln.punct and i and bare[i - 1]:
            ln.kind = "text"  # JUNE / "STOP THE CAR.": a shout under a cue
            continue
        nxt = kinds[i + 1] if i + 1 < len(kinds) else None
        after_gap = (
            i == 0
            or kinds[i - 1].kind in ("blank", "heading", "direction")
            or ln.indent >= max(10, kinds[i - 1].indent + 4)
        )
        if nxt and nxt.kind == "label" and nxt.rest_at >= 0 and after_gap and not ln.punct:
            nxt.kind = "text"  # JUNE / "NO. Not tonight.": a shout under a cue
        heads = nxt and nxt.kind in ("text", "direction") and not bare[i + 1]  # not a list
        if not (heads and (after_gap or ln.punct)):
            ln.kind = "text"
    return kinds


def _spoken_segments(line: str, start: int) -> tuple[list[tuple[int, int]], str]:
    """(start, end) offsets in ``line`` of the spoken parts from ``start`` on: the line
    minus its inline stage directions, each part stripped of spaces; and the bracket that
    closes a direction left open at the end of the line (``""`` if none)."""
    out, pos, closer = [], start, ""
    for m in list(_INLINE_DIRECTION.finditer(line, start)) + [None]:
        end = m.start() if m else len(line)
        seg = line[pos:end]
        if m is None:  # "I [crossing" + next line "to the door] will go."
            if opens := [seg.find(o) for o in _OPENERS if o in seg]:
                cut = min(opens)
                closer, seg = _OPENERS[seg[cut]], seg[:cut]
        if seg.strip():
            lead = len(seg) - len(seg.lstrip())
            out.append((pos + lead, pos + len(seg.rstrip())))
        pos = m.end() if m else end
    return out, closer


def _clean_speech(text: str) -> str:
    return " ".join(text.replace("_", "").split())


def parse_turns(chapter: Chapter, character: str, aliases: Sequence[str]) -> list[Utterance]:
    """All labelled turns of one scene, in order, with the character's turns named
    ``character``.

    A label matches the character when its name, spacing collapsed and case ignored,
    is ``character`` or one of ``aliases`` (``MAGGIE`` for "Margaret"); a joint label
    (``TOM AND MARGARET``) does not. Each :class:`Utterance` gets ``rule="label"`` or
    ``"cue"`` (name alone on its line), ``para``/``last_para`` = line indices of the
    label and of the last spoken line, ``start``/``end`` = offsets in ``chapter.text`` of
    the first and after the last spoken character, ``spans`` = the spoken parts (stage
    directions excluded), ``cue`` = offset of the label's line, and ``text`` = the spoken
    parts joined by single spaces, underscores removed. Plays and screenplays are read
    by the same rules (module docstring); the indentation rule applies to dialogue set
    under a cue.
    """
    own = {" ".join(a.split()).casefold() for a in (character, *aliases)}
    text = chapter.text
    lines = text.split("\n")
    offsets = [0, *accumulate(len(line) + 1 for line in lines)]  # of each line's start
    kinds = _classify(lines)
    names = Counter(k.name for k in kinds if k.kind == "label")
    turns: list[Utterance] = []
    cur: Utterance | None = None
    dialogue_indent = -1  # indentation of the first spoken line under a cue
    centred = False  # the turn opened with a bare name (screenplay cue)
    closer = ""  # inside a direction spanning lines: the bracket that ends it

    def close() -> None:
        nonlocal cur
        if cur is not None and cur.spans:
            cur.start, cur.end = cur.spans[0][0], cur.spans[-1][1]
            cur.text = _clean_speech(" ".join(text[a:b] for a, b in cur.spans))
            turns.append(cur)
        cur = None

    def add(i: int, from_col: int) -> str:
        segs, still_open = _spoken_segments(lines[i], from_col)
        cur.spans.extend((offsets[i] + a, offsets[i] + b) for a, b in segs)
        if segs:
            cur.last_para = i
        return still_open

    for i, ln in enumerate(kinds):
        s = ln.raw.strip()
        if ln.kind in ("blank", "heading"):
            closer = ""  # an unclosed bracket ends with its block
            close()
            continue
        if closer:
            if closer in ln.raw and cur is not None:  # speech may go on after the bracket
                closer = add(i, ln.raw.index(closer) + 1)
            elif closer in ln.raw:
                closer = ""
            continue
        if s[0] in _OPENERS and _OPENERS[s[0]] not in s:  # a direction over several lines
            closer = _OPENERS[s[0]]
            continue
        if ln.kind == "direction":
            continue
        if ln.kind == "label" and ln.rest_at >= 0 and centred and lines[i - 1].strip():
            if names[ln.name] < 2:  # not a speaker seen elsewhere
                ln.kind = "text"  # "HE STILL DOES. That's..." shouted under a screenplay cue
        if ln.kind == "label":
            alone = ln.rest_at < 0
            who = character if ln.name.casefold() in own else ln.name
            if alone and cur is not None and cur.speaker == who and "CONT" in ln.ext.upper():
                continue  # "(MORE)", page break, "PRIYA (CONT'D)": the same turn goes on
            close()
            cur = Utterance(chapter, i, i, 0, 0, "", speaker=who, rule="cue" if alone else "label")
            cur.cue = offsets[i] + ln.indent
            dialogue_indent, centred = -1, alone and not ln.punct
            if not alone:
                closer = add(i, ln.rest_at)
            continue
        if cur is None:
            continue  # narration or action
        lead = _NAME_THEN_VERB.match(s)
        if lead and " ".join(lead.group(1).split()) in names:
            continue  # "MARGARET crosses to the window.": an unbracketed stage direction
        if cur.rule == "cue":
            if dialogue_indent < 0:
                dialogue_indent = ln.indent
            elif not dialogue_indent - 2 <= ln.indent <= dialogue_indent + 8:
                close()  # action printed flush under the dialogue, or a transition
                continue
        closer = add(i, 0)
    close()
    return turns


def detect_format(text: str) -> tuple[str, str]:
    """Guess whether cleaned text (:func:`~personatune.data.corpus.clean_script`) is a
    ``"play"``, a ``"screenplay"`` or ``"prose"``, and say why.

    Counts speaker labels (``NAME.``/``NAME:`` with the speech, or alone above it),
    screenplay cues (a bare name alone on its line above the dialogue), ``INT.``/``EXT.``
    scene headings, and lines holding a double quote; labels and cues
    count only for names used at least twice. A text with at least :data:`MIN_TURNS`
    labelled turns and no fewer turns than quoted lines is a script: a screenplay when cues
    outnumber labels or when it has ``INT.``/``EXT.`` headings and no more labels than
    cues, else a play. Returns ``(format, reason)``, the reason giving the counts.
    """
    lines = text.split("\n")
    heads = [ln for ln in _classify(lines) if ln.kind == "label"]  # labels that head a turn
    labels = Counter(ln.name for ln in heads if ln.rest_at >= 0 or ln.punct)
    cues = Counter(ln.name for ln in heads if ln.rest_at < 0 and not ln.punct)
    n_labels = sum(k for k in labels.values() if k >= 2)
    n_cues = sum(k for k in cues.values() if k >= 2)
    slugs = sum(bool(_SLUG.match(line.strip())) for line in lines)
    quoted = sum('"' in line for line in lines)
    turns = n_labels + n_cues
    counts = (
        f"{n_labels} NAME./NAME: speaker labels, {n_cues} speaker names alone above their "
        f"lines, {slugs} INT./EXT. scene headings, {quoted} lines with double quotes"
    )
    if turns < MIN_TURNS:
        return "prose", f"{counts}: read as prose, fewer than {MIN_TURNS} labelled turns"
    if turns < quoted:
        return "prose", f"{counts}: read as prose, fewer labelled turns than quoted lines"
    if n_cues > n_labels or (slugs and n_cues >= n_labels):
        return "screenplay", f"{counts}: read as a screenplay, speaker names above dialogue"
    return "play", f"{counts}: read as a play, speaker labels"
