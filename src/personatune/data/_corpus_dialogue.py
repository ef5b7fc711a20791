"""Find quoted speech in cleaned chapters and attribute it to speakers (helper of corpus.py).

Works on text cleaned by :func:`personatune.data.corpus.clean_text`: straight double quotes,
paragraphs separated by a blank line. One paragraph holds one speaker's turn (English
convention); a paragraph whose quote is not closed continues into the next paragraph when
that one opens with a quote. Attribution rules, strongest first (``Utterance.rule``):

* ``verb``: a speech verb next to the quote with a named speaker ("said Holmes", "Holmes
  remarked", "remarked my companion", "said I", "cried the inspector");
* ``pronoun``: "said he" / "he answered" resolved from the exchange: the paragraph opens
  with a named subject ("Holmes laughed. '...,' he said"), or the previous turn was the
  narrator's ("said I") and the one before it by a named man;
* ``beat``: no speech verb, but the paragraph opens with a named subject ("Holmes
  chuckled. '...'");
* ``alternation``: a bare quote paragraph inside an unbroken run of turns where the known
  speakers around it are exactly two people who alternate (A, B, ? -> A; ?, B, A -> A).

Anything else stays unattributed (``speaker=None``): precision matters more than recall.
Offsets are characters of ``Chapter.text``.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from personatune.data.corpus import Chapter

DEFAULT_ALIASES = ("Holmes", "Sherlock Holmes", "Mr. Holmes")
DEFAULT_COMPANIONS = ("my companion", "my friend", "my comrade")
NARRATOR = "I"

SPEECH_VERBS = (
    "said", "says", "asked", "asks", "answered", "replied", "cried", "remarked", "observed",
    "continued", "exclaimed", "whispered", "shouted", "muttered", "murmured", "added",
    "returned", "repeated", "interrupted", "inquired", "enquired", "explained", "began",
    "went on", "resumed", "retorted", "responded", "broke in", "groaned", "laughed",
    "chuckled", "sighed", "gasped", "snarled", "growled", "roared", "screamed", "sobbed",
    "stammered", "protested", "suggested", "insisted", "urged", "ejaculated", "thundered",
    "panted", "shrieked", "yelled", "called", "whined", "persisted", "pursued", "concluded",
    "demanded", "declared", "grumbled", "snapped", "sneered", "drawled", "mused", "hazarded",
    "reflected", "shouted", "told", "tell", "say", "ask", "answer", "cry", "remark",
)
_VERB = "(?:" + "|".join(sorted({re.escape(v) for v in SPEECH_VERBS}, key=len, reverse=True)) + ")"
_TITLES = (r"(?:Mr|Mrs|Dr|Sir|Lord|Lady|Miss|Colonel|Col|Inspector|Captain|Major|Professor"
           r"|Sergeant|Constable|Madame|Mister|Master|Count|Baron|Duke|Mme)\.?")
_NOT_NAMES = (r"(?:Then|And|But|So|When|As|At|Here|There|Now|It|This|That|The|He|She|I|We|"
              r"They|You|His|Her|My|Our|Well|Yes|No|Oh|Ah|What|Why|How|Presently|Again|Suddenly|"
              r"Instantly|Finally|Still|Yet|If|In|On|With|For|From|After|Before|While|"
              r"Once|Only|Even|Just|Sherlock)\b")
_NAME = rf"(?:{_TITLES}\s+)?(?!{_NOT_NAMES})[A-Z][a-zA-Z'-]+(?:\s+[A-Z][a-zA-Z'-]+){{0,2}}"
_NP_WORD = r"(?!(?:and|or|but|who|which|that|then|had|was|has|is|as|to)\b)[a-z'-]+"
_NP = rf"(?:[Tt]he|[Oo]ur|[Hh]is|[Hh]er|[Mm]y|[Tt]heir)\s+(?:{_NP_WORD}\s+){{0,2}}?{_NP_WORD}"
_ADV = r"(?:,?\s+[a-z]+ly,?)"
_FEMALE = re.compile(r"\b(?:she|Mrs|Miss|Lady|Madame|lady|woman|girl|wife|mother|sister|"
                     r"daughter|governess|maid|housekeeper|landlady)\b", re.I)
_OPEN_AFTER = set(",.:;!?\u2014-([")


def _alts(words: Sequence[str]) -> str:
    return "|".join(re.escape(w).replace(r"\ ", r"\s+") for w in
                    sorted(words, key=len, reverse=True))


@dataclass
class Utterance:
    """One speaker's turn: the quoted parts of one paragraph (or a run of continued ones).

    ``start``/``end`` are character offsets in ``chapter.text`` of the first and after the
    last spoken character; ``para``/``last_para`` are paragraph indices in the chapter;
    ``speaker`` is the character's name, ``"I"`` for the narrator, another name or noun
    phrase, ``"she"``, or None when unknown; ``rule`` says how it was attributed.
    """

    chapter: Chapter = field(repr=False)
    para: int
    last_para: int
    start: int
    end: int
    text: str
    speaker: str | None = None
    rule: str = ""
    pure: bool = False                  # no narration at all in its paragraphs
    verb: list[tuple[str, str]] = field(default_factory=list, repr=False)   # (kind, name)
    beat: tuple[str, str] | None = field(default=None, repr=False)


class _Attributor:
    """Compiled patterns for one character (aliases and companions)."""

    def __init__(self, character: str, aliases: Sequence[str], companions: Sequence[str]):
        if not aliases:
            raise ValueError("aliases must name the character at least once, e.g. ('Holmes',)")
        self.character = character
        alias = rf"(?:Mr\.\s+)?(?:{_alts(aliases)})\b"
        comp = rf"(?i:{_alts(companions)})(?!\s+[A-Z])" if companions else r"(?!x)x"
        speaker = (rf"(?:(?P<alias>{alias})|(?P<comp>\b{comp})|(?P<i>\bI\b)"
                   rf"|(?P<pron>\b(?:he|she|He|She)\b)|(?P<name>{_NAME})|(?P<np>{_NP}))")
        lead = r"^\s*(?:\u2014\s*|-+\s*)?"
        self.after_verb_first = re.compile(rf"{lead}{_VERB}{_ADV}?\s+{speaker}")
        self.after_speaker_first = re.compile(rf"{lead}{speaker}{_ADV}?\s+(?:then\s+)?{_VERB}\b")
        tail = r"[:,\u2014-]?\s*$"
        self.before = (re.compile(rf"{speaker}{_ADV}?\s+{_VERB}\b[^.!?\"]{{0,40}}{tail}"),
                       re.compile(rf"\bsaid\s+{speaker}{tail}"))
        self.beat = re.compile(rf"^{speaker}(?:,[^,]{{1,40}},)?\s+[a-z]")

    def speaker_of(self, m: re.Match) -> tuple[str, str]:
        """(kind, canonical speaker) of a speaker match."""
        kind = next(k for k in ("alias", "comp", "i", "pron", "name", "np") if m.group(k))
        text = " ".join(m.group(kind).split())
        if kind in ("alias", "comp"):
            return "named", self.character
        if kind == "i":
            return "named", NARRATOR
        if kind == "pron":
            return ("named", "she") if text.lower() == "she" else ("pron", "he")
        if re.fullmatch(rf"(?:Mr\.\s+)?{re.escape(self.character)}", text):
            return "named", self.character
        return "named", text


def _quote_spans(p: str, continuing: bool) -> tuple[list[tuple[int, int]], bool]:
    """Spoken spans of paragraph ``p`` (offsets inside it) and whether the last is unclosed."""
    spans: list[tuple[int, int]] = []
    start = None
    for i, ch in enumerate(p):
        if ch != '"':
            continue
        prev = p[i - 1] if i else " "
        nxt = p[i + 1] if i + 1 < len(p) else " "
        opening = prev.isspace() or prev in "([" or (prev in "\u2014-" and not nxt.isspace())
        closing = not prev.isspace() and (nxt.isspace() or not nxt.isalnum())
        if start is None:
            if opening or not closing:
                start = i + 1
            elif not spans and not continuing and i > 0:   # lost opening quote at paragraph start
                spans.append((0, i))
        elif closing or not opening:
            spans.append((start, i))
            start = None
    if start is not None:
        spans.append((start, len(p)))
    return spans, start is not None


def _is_speech(p: str, s: int) -> bool:
    """False for quoted names and titles inside narration: 'the troopship "Orontes," and'."""
    before = p[: max(s - 1, 0)].rstrip()
    if not before or before[-1] in _OPEN_AFTER:
        return True
    last = re.findall(r"[A-Za-z]+$", before)
    return bool(last) and re.fullmatch(_VERB, last[0]) is not None


def _spoken(p: str, spans: list[tuple[int, int]]) -> str:
    text = " ".join(" ".join(p[s:e].split()) for s, e in spans if p[s:e].strip())
    return text[:-1] + "." if text.endswith((",", ";")) else text


def _parse_chapter(ch: Chapter, att: _Attributor) -> list[Utterance]:
    """Utterances of one chapter with their attribution evidence (speakers not yet resolved)."""
    paras = [(m.start(), m.group()) for m in re.finditer(r"[^\n]+(?:\n[^\n]+)*", ch.text)]
    utts: list[Utterance] = []
    open_quote = False
    for pi, (off, p) in enumerate(paras):
        continuing = open_quote and p.startswith('"')
        spans, open_quote = _quote_spans(p, continuing)
        spans = [(s, e) for s, e in spans if (s == 0 and continuing) or _is_speech(p, s)]
        if not spans:
            open_quote = False
            continue
        if continuing and utts and utts[-1].last_para == pi - 1:
            u = utts[-1]
            u.last_para, u.end = pi, off + spans[-1][1]
            u.text = f"{u.text} {_spoken(p, spans)}".strip()
        else:
            u = Utterance(ch, pi, pi, off + spans[0][0], off + spans[-1][1], _spoken(p, spans))
            utts.append(u)
            u.pure = True
        # narration between, before and after the spoken spans
        bounds = [(-1, 0)] + [(s - 1, e + 1) for s, e in spans] + [(len(p), len(p) + 1)]
        for k in range(1, len(bounds)):
            frag = p[max(bounds[k - 1][1], 0):max(bounds[k][0], 0)]
            if not frag.strip(' "'):
                continue
            u.pure = False
            if k > 1:                                  # narration after a quote
                m = att.after_verb_first.match(frag) or att.after_speaker_first.match(frag)
                if m:
                    u.verb.append(att.speaker_of(m))
            if k < len(bounds) - 1:                    # narration before a quote
                m = att.before[0].search(frag[-120:]) or att.before[1].search(frag[-120:])
                if m:
                    u.verb.append(att.speaker_of(m))
                if k == 1 and not continuing and u.para == pi:
                    b = att.beat.match(frag)
                    if b:
                        u.beat = att.speaker_of(b)
    return utts


def _resolve(utts: list[Utterance]) -> None:
    """Assign speakers in place (see the module docstring for the rules)."""
    def adjacent(a: int, b: int) -> bool:       # turns a < b follow each other directly
        return 0 <= a < b < len(utts) and utts[a].last_para + 1 == utts[b].para

    def known(k: int) -> str | None:
        return utts[k].speaker if 0 <= k < len(utts) else None

    for u in utts:
        named = {s for kind, s in u.verb if kind == "named"}
        if len(named) > 1:
            u.rule = "conflict"
        elif named:
            u.speaker, u.rule = named.pop(), "verb"
        elif u.beat and u.beat[0] == "named" and not u.verb:
            u.speaker, u.rule = u.beat[1], "beat"
    for _ in range(4):
        changed = False
        for k, u in enumerate(utts):
            if u.speaker or u.rule == "conflict":
                continue
            pronoun = any(kind == "pron" for kind, _ in u.verb) or (u.beat and u.beat[0] == "pron")
            if pronoun:
                if u.beat and u.beat[0] == "named" and not _FEMALE.search(u.beat[1]):
                    u.speaker, u.rule = u.beat[1], "pronoun"
                elif (adjacent(k - 1, k) and known(k - 1) == NARRATOR and adjacent(k - 2, k - 1)
                      and known(k - 2) not in (None, NARRATOR)
                      and not _FEMALE.search(known(k - 2) or "")):
                    u.speaker, u.rule = known(k - 2), "pronoun"
            elif u.pure:
                for near, far in ((k - 1, k - 2), (k + 1, k + 2)):
                    run = sorted((far, near, k))
                    if not (adjacent(run[0], run[1]) and adjacent(run[1], run[2])):
                        continue
                    sa, sb = known(far), known(near)
                    if sa and sb and sa != sb and _two_party(utts, k, {sa, sb}, adjacent):
                        u.speaker, u.rule = sa, "alternation"
                        break
            changed |= u.speaker is not None
        if not changed:
            break


def _two_party(utts: list[Utterance], k: int, pair: set[str], adjacent) -> bool:
    """True if every known speaker in the unbroken run of turns around ``k`` is in ``pair``."""
    lo = hi = k
    while lo > 0 and adjacent(lo - 1, lo) and k - lo < 6:
        lo -= 1
    while adjacent(hi, hi + 1) and hi - k < 6:
        hi += 1
    return all(utts[j].speaker in pair for j in range(lo, hi + 1) if utts[j].speaker)


def extract_utterances(
    chapters: Iterable[Chapter],
    character: str = "Holmes",
    aliases: Sequence[str] = DEFAULT_ALIASES,
    companions: Sequence[str] = DEFAULT_COMPANIONS,
) -> list[Utterance]:
    """All quoted turns of the chapters, in order, with speakers where the rules allow.

    ``aliases`` are names of ``character`` in narration (matched as whole words, "Mr. "
    prefix allowed, but not as part of another name like "Mycroft Holmes"); ``companions``
    are phrases the first-person narrator uses for the character ("my companion",
    "my friend"; not when followed by a name, as in "my friend Lestrade"). Raises
    ``ValueError`` if ``aliases`` is empty.
    """
    att = _Attributor(character, tuple(aliases), tuple(companions))
    out: list[Utterance] = []
    for ch in chapters:
        utts = _parse_chapter(ch, att)
        _resolve(utts)
        out.extend(utts)
    return out
