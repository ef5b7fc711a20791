"""Find quoted speech in cleaned chapters and attribute it to speakers (helper of corpus.py).

Works on text cleaned by :func:`personatune.data.corpus.clean_text`: straight double quotes,
paragraphs separated by a blank line. One paragraph holds one speaker's turn (English
convention); a paragraph whose quote is not closed continues into the next paragraph when
that one opens with a quote. Quoted names and titles inside narration ('the troopship
"Orontes"') and quoted documents announced by narration ending in a colon ('It ran in this
way:') are not turns. Attribution rules, strongest first (``Utterance.rule``):

* ``verb``: a speech verb next to the quote with a named speaker ("said Holmes", "Holmes
  remarked", "remarked my companion", "said I", "cried the inspector");
* ``beat``: no speech verb, but the paragraph opens with a named subject ("Holmes
  chuckled. '...'");
* ``vocative``: an unattributed line that calls the narrator by name ("..., Watson") while
  the character is the narrator's interlocutor (see :meth:`_Resolver.vocatives`);
* ``pronoun:*``: "said he" / "he answered" resolved when unambiguous: the paragraph opens
  with a named subject (``pronoun:beat``); the previous turn was the narrator's and the
  one before it a named man's (``pronoun:exchange``); for the first turn after narration,
  the only person named in the narration just before it (``pronoun:focus``);
* ``alternation``: in an unbroken run of turns (no narration paragraph, and at most 150
  characters of narration after a turn) speakers alternate: turns between two known turns
  that agree with strict alternation, turns an even number of places beyond the first or
  last known turn, and the character's side of a run whose other side is held by other
  speakers, get that speaker unless the turn contradicts it (a line naming the speaker,
  as in "..., Mr. Holmes?", or "he" for the narrator).

"My companion" / "my friend" mean the character only where the character is about (named
as a speaker earlier in the chapter or within a few turns). Anything else stays
unattributed (``speaker=None``): precision matters more than recall. Offsets are
characters of ``Chapter.text``.
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
DEFAULT_NARRATOR_NAMES = ("Watson",)  # a line naming the narrator is not the narrator's
DEFAULT_EXCLUDED = ("Mycroft Holmes",)  # other people whose names contain an alias
MAX_TAIL = 150  # characters of narration after a turn that end a run
COMPANION_TURNS = 12  # "my companion" = the character up to this many turns early

SPEECH_VERBS = tuple(  # comma-separated: "went on" and "broke in" are two words
    v.strip()
    for v in """
    said, says, asked, asks, answered, replied, cried, remarked, observed, continued,
    exclaimed, whispered, shouted, muttered, murmured, added, returned, repeated,
    interrupted, inquired, enquired, explained, began, went on, resumed, retorted,
    responded, broke in, groaned, laughed, chuckled, sighed, gasped, snarled, growled,
    roared, screamed, sobbed, stammered, protested, suggested, insisted, urged,
    ejaculated, thundered, panted, shrieked, yelled, called, whined, persisted, pursued,
    concluded, demanded, declared, grumbled, snapped, sneered, drawled, mused, hazarded,
    reflected
    """.split(",")
)
_VERB = "(?:" + "|".join(sorted({re.escape(v) for v in SPEECH_VERBS}, key=len, reverse=True)) + ")"
_VERB_ING = (
    "(?:asking|saying|answering|replying|crying|remarking|observing|exclaiming|"
    "continuing|adding|whispering|muttering|murmuring|shouting|interrupting|inquiring)"
)
_TITLES = (
    r"(?:Mr|Mrs|Dr|Sir|Lord|Lady|Miss|Colonel|Col|Inspector|Captain|Major|Professor"
    r"|Sergeant|Constable|Madame|Mister|Master|Count|Baron|Duke|Mme)\.?"
)
_NOT_NAMES = (
    r"(?:Then|And|But|So|When|As|At|Here|There|Now|It|This|That|The|He|She|I|We|"
    r"They|You|His|Her|My|Our|Well|Yes|No|Oh|Ah|What|Why|How|Presently|Again|Suddenly|"
    r"Instantly|Finally|Still|Yet|If|In|On|With|For|From|After|Before|While|"
    r"Once|Only|Even|Just|Sherlock)\b"
)
_NAME = rf"(?:{_TITLES}\s+)?(?!{_NOT_NAMES})[A-Z][a-zA-Z'-]+(?:\s+[A-Z][a-zA-Z'-]+){{0,2}}"
_NP_WORD = r"(?!(?:and|or|but|who|which|that|then|had|was|has|is|as|to)\b)[a-z][a-z'-]*"
_NP_HEAD = r"(?!(?:and|or|but|who|which|that|then|had|was|has|is|as|to)\b)[A-Za-z][a-z'-]*"
_NP = rf"(?:[Tt]he|[Oo]ur|[Hh]is|[Hh]er|[Mm]y|[Tt]heir)\s+(?:{_NP_WORD}\s+){{0,2}}?{_NP_HEAD}"
_VAGUE = re.compile(r"(?i)^the (?:other|latter|former|first|second|one|voice)$")
_PERSON_NOUNS = (
    r"(?:man|fellow|gentleman|visitor|client|stranger|inspector|detective|officer|"
    r"constable|sergeant|doctor|colonel|major|captain|baronet|banker|landlord|butler|"
    r"coachman|lad|youth|prisoner|manager|clerk|porter|official|statesman|king|duke|"
    r"professor|student|tutor|secretary|servant|groom|cabman|agent|premier|minister|"
    r"nobleman|lord|prince|count|baron|squire|farmer|keeper|waiter|sailor|boy)"
)
_ADV = r"(?:,?\s+[a-z]+ly,?)"
_NESTED = re.compile(r"(?<![A-Za-z])'[^']*?'(?![A-Za-z])")  # 'nested quotation'
_FEMALE = re.compile(
    r"\b(?:she|Mrs|Miss|Lady|Madame|lady|woman|girl|wife|mother|sister|"
    r"daughter|governess|maid|housekeeper|landlady)\b",
    re.IGNORECASE,
)


def _alts(words: Sequence[str]) -> str:
    return "|".join(
        re.escape(w).replace(r"\ ", r"\s+") for w in sorted(words, key=len, reverse=True)
    )


@dataclass
class Utterance:
    """One speaker's turn: the quoted parts of one paragraph (or a run of continued ones).

    ``start``/``end`` are character offsets in ``chapter.text`` of the first and after the
    last spoken character; ``para``/``last_para`` are paragraph indices in the chapter;
    ``speaker`` is the character's name, ``"I"`` for the narrator, another name or noun
    phrase, ``"she"``, or None when unknown; ``rule`` says how it was attributed. Turns
    of plays and screenplays (:mod:`._corpus_script`) also set ``spans``, the spoken
    parts without stage directions, and ``cue``, the offset of the speaker label.
    """

    chapter: Chapter = field(repr=False)
    para: int
    last_para: int
    start: int
    end: int
    text: str
    speaker: str | None = None
    rule: str = ""
    verb: list[tuple[str, str]] = field(default_factory=list, repr=False)  # (kind, name)
    beat: tuple[str, str] | None = field(default=None, repr=False)
    focus: tuple[str, str] = ("", "")  # narration before the quote: own paragraph, previous
    not_speakers: set[str] = field(default_factory=set, repr=False)
    tail: int = 0  # characters of narration after the last quote
    vocative: bool = False  # addresses the narrator by name ("..., Watson")
    about: bool = False  # the character is named as a speaker near this turn
    spans: list[tuple[int, int]] = field(default_factory=list, repr=False)  # script turns
    cue: int = -1  # script turns: offset of the speaker label's line

    @property
    def pronoun(self) -> bool:
        """Attributed only by "he" (a verb or a paragraph-opening subject)."""
        return any(k == "pron" for k, _ in self.verb) or (self.beat or ("",))[0] == "pron"


def _not_excluded(aliases: Sequence[str], excluded: Sequence[str]) -> str:
    """Lookarounds that stop an alias matching inside an excluded name: "Mycroft Holmes"
    gives ``(?<!Mycroft )`` before "Holmes"; "Holmes Junior" gives ``(?!Holmes Junior\b)``."""
    guards = []
    for name in (" ".join(n.split()) for n in excluded):
        for a in aliases:
            if name != a and name.endswith(" " + a):
                guards.append(rf"(?<!{re.escape(name[: -len(a)])})")
            elif name != a and name.startswith(a + " "):
                guards.append(rf"(?!{re.escape(name)}\b)")
    return "".join(dict.fromkeys(guards))


class _Attributor:
    """Compiled patterns for one character (aliases, companions, narrator names and
    excluded names; see :func:`extract_utterances`)."""

    def __init__(
        self,
        character: str,
        aliases: Sequence[str],
        companions: Sequence[str],
        narrator_names: Sequence[str] = DEFAULT_NARRATOR_NAMES,
        excluded: Sequence[str] = DEFAULT_EXCLUDED,
    ):
        if not aliases:
            raise ValueError("aliases must name the character at least once, e.g. ('Holmes',)")
        self.character = character
        alias = rf"{_not_excluded(aliases, excluded)}(?:Mr\.\s+)?(?:{_alts(aliases)})\b"
        comp = rf"(?i:{_alts(companions)})(?!\s+[A-Z])" if companions else r"(?!x)x"
        speaker = (
            rf"(?:(?P<alias>{alias})|(?P<comp>\b{comp})|(?P<i>\bI\b)"
            rf"|(?P<pron>\b(?:he|she|He|She)\b)|(?P<name>{_NAME})|(?P<np>{_NP}))"
        )
        lead = r"^\s*(?:\u2014\s*|-+\s*)?"
        self.after_verb_first = re.compile(rf"{lead}{_VERB}{_ADV}?\s+{speaker}")
        self.after_speaker_first = re.compile(
            rf"{lead}{speaker}{_ADV}?\s+(?:[a-z]+\s+){{0,3}}?(?:{_VERB}|{_VERB_ING})\b"
        )
        tail = r"[:,\u2014-]?\s*$"
        self.before = (
            re.compile(rf"{speaker}{_ADV}?\s+{_VERB}\b[^.!?\"]{{0,40}}{tail}"),
            re.compile(rf"\bsaid\s+{speaker}{tail}"),
        )
        self.beat = re.compile(rf"^{speaker}(?:,[^,]{{1,40}},)?\s+[a-z]")
        self.names_character = re.compile(alias)
        narrator = rf"\b(?:{_alts(narrator_names)})\b" if narrator_names else r"(?!x)x"
        self.names_narrator = re.compile(narrator)
        self.vocative = re.compile(rf"(?<!Dr\. )(?<!Doctor ){narrator}")
        self.alias = alias
        self.comp = comp

    def speaker_of(self, m: re.Match) -> tuple[str, str]:
        """(kind, canonical speaker) of a speaker match; kind is 'named', 'comp' (a companion
        phrase, taken for the character only where the character is about), 'pron' or
        'vague'."""
        kind = next(k for k in ("alias", "comp", "i", "pron", "name", "np") if m.group(k))
        text = " ".join(m.group(kind).split())
        if kind == "alias":
            return "named", self.character
        if kind == "comp":
            return "comp", self.character
        if kind == "i":
            return "named", NARRATOR
        if kind == "pron":
            return ("named", "she") if text.lower() == "she" else ("pron", "he")
        if kind == "np" and _VAGUE.match(text):
            return "vague", text
        return "named", text

    def mentions(self, people: set[str]) -> re.Pattern:
        """Pattern for person mentions in narration: the character (group ``char``), a
        companion phrase (group ``comp``), titled or known names, and person nouns ("the
        inspector")."""
        known = rf"|\b(?:{_alts(sorted(people))})\b" if people else ""
        nouns = rf"\b(?i:the|our|my)\s+(?:[a-z-]+\s+)?(?i:{_PERSON_NOUNS})\b"
        return re.compile(
            rf"(?P<char>{self.alias})|(?P<comp>\b{self.comp})"
            rf"|\b{_TITLES}\s+[A-Z][a-z]+{known}|{nouns}"
        )


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
            elif not spans and not continuing and i > 0:  # lost opening quote at paragraph start
                spans.append((0, i))
        elif closing or not opening:
            spans.append((start, i))
            start = None
    if start is not None:
        spans.append((start, len(p)))
    return spans, start is not None


def _is_speech(p: str, s: int) -> bool:
    """False for quoted names, titles and headings inside narration: 'the troopship
    "Orontes," and', 'It was headed, "March, 1869,"'. Speech opens a paragraph, follows a
    sentence end or dash, or follows a comma or colon after a speech verb ('he said, "')."""
    before = p[: max(s - 1, 0)].rstrip()
    if not before or before[-1] in ".!?;\u2014-([":
        return True
    clause = re.split(r'[.!?"]', before)[-1][-60:]  # since the last sentence or quote
    if before[-1] in ",:" and re.search(rf"\b(?:{_VERB}|{_VERB_ING})\b", clause):
        return True
    last = re.findall(r"[A-Za-z]+$", before)
    return bool(last) and re.fullmatch(_VERB, last[0]) is not None


def _spoken(p: str, spans: list[tuple[int, int]]) -> str:
    """The spoken parts joined; a comma cut off by narration ends the sentence when the
    next part starts a new one ('"See here," said he. "We were' -> 'See here. We were')."""
    parts = [" ".join(p[s:e].split()) for s, e in spans if p[s:e].strip()]
    for i in range(len(parts)):
        nxt = parts[i + 1][:1] if i + 1 < len(parts) else "A"
        if parts[i].endswith((",", ";")) and (nxt.isupper() or not nxt.isalpha()):
            parts[i] = parts[i][:-1] + "."
    return " ".join(parts)


def _introduces_document(narration: str) -> bool:
    """Narration like 'It ran in this way:' announces a quoted letter or report, not speech."""
    narration = narration.rstrip()
    clause = re.split(r'[.!?"]', narration)[-1]
    return narration.endswith(":") and not re.search(rf"\b(?:{_VERB}|{_VERB_ING})\b", clause)


def _parse_chapter(ch: Chapter, att: _Attributor) -> list[Utterance]:
    """Utterances of one chapter with their attribution evidence (speakers not yet resolved)."""
    paras = [(m.start(), m.group()) for m in re.finditer(r"[^\n]+(?:\n[^\n]+)*", ch.text)]
    utts: list[Utterance] = []
    open_quote = False
    narration = ""  # the last paragraph without speech, if it came just before
    document = False  # inside a quoted letter or report
    for pi, (off, p) in enumerate(paras):
        continuing = open_quote and p.startswith('"')
        spans, open_quote = _quote_spans(p, continuing)
        document = (document and continuing) or (
            p.startswith('"') and not continuing and _introduces_document(narration)
        )
        if document:
            narration = ""
            continue
        spans = [(s, e) for s, e in spans if _is_speech(p, s)]
        if not spans:
            open_quote, narration = False, p
            continue
        spoken = _spoken(p, spans)
        if continuing and utts and utts[-1].last_para == pi - 1:
            u = utts[-1]
            u.last_para, u.end, u.text = pi, off + spans[-1][1], f"{u.text} {spoken}".strip()
        else:
            u = Utterance(ch, pi, pi, off + spans[0][0], off + spans[-1][1], spoken)
            u.focus = (p[: max(spans[0][0] - 1, 0)], narration)
            utts.append(u)
        narration = ""
        own = _NESTED.sub(" ", spoken)  # without quotations inside the quotation
        if att.names_character.search(own):
            u.not_speakers.add(att.character)
        if att.names_narrator.search(own):
            u.not_speakers.add(NARRATOR)
            u.vocative = u.vocative or bool(att.vocative.search(own))
        u.tail = len(p) - spans[-1][1] - 1
        # narration between, before and after the spoken spans
        bounds = [(-1, 0)] + [(s - 1, e + 1) for s, e in spans] + [(len(p), len(p) + 1)]
        for k in range(1, len(bounds)):
            frag = p[max(bounds[k - 1][1], 0) : max(bounds[k][0], 0)]
            if not frag.strip(' "'):
                continue
            if k > 1:  # narration after a quote
                if m := att.after_verb_first.match(frag) or att.after_speaker_first.match(frag):
                    u.verb.append(att.speaker_of(m))
            if k < len(bounds) - 1:  # narration before a quote
                if m := att.before[0].search(frag[-120:]) or att.before[1].search(frag[-120:]):
                    u.verb.append(att.speaker_of(m))
                if k == 1 and not continuing and u.para == pi:
                    if b := att.beat.match(frag):
                        u.beat = att.speaker_of(b)
    return utts


class _Resolver:
    """Assigns speakers to the utterances of one chapter (rules: module docstring)."""

    def __init__(self, utts: list[Utterance], mention: re.Pattern, character: str):
        self.utts, self.mention, self.character = utts, mention, character

    def adjacent(self, a: int, b: int) -> bool:  # turn b directly follows turn a
        u = self.utts
        return 0 <= a < b < len(u) and u[a].last_para + 1 == u[b].para and u[a].tail <= MAX_TAIL

    def known(self, k: int) -> str | None:
        return self.utts[k].speaker if 0 <= k < len(self.utts) else None

    def run(self) -> None:
        named_at = [
            k
            for k, u in enumerate(self.utts)
            if ("named", self.character) in u.verb + [u.beat or ("", "")]
        ]
        for k, u in enumerate(self.utts):
            # "my companion" is the character only where the character is about: named as a
            # speaker earlier in the chapter or at most COMPANION_TURNS turns later (else it
            # is Stamford before Holmes appears, or Stapleton on the moor)
            about = any(j < k or j - k <= COMPANION_TURNS for j in named_at)
            u.verb = [
                ("named", s if about else "my companion") if kind == "comp" else (kind, s)
                for kind, s in u.verb
            ]
            if u.beat and u.beat[0] == "comp":
                u.beat = ("named", self.character if about else "my companion")
            u.about = about
        for u in self.utts:
            named = {s for kind, s in u.verb if kind == "named"}
            if len(named) > 1 or (named and (named & u.not_speakers)):
                u.rule = "conflict"
            elif named:
                u.speaker, u.rule = named.pop(), "verb"
            elif u.beat and u.beat[0] == "named" and not u.verb:
                u.speaker, u.rule = u.beat[1], "beat"
        self.vocatives()
        for _ in range(3):
            changed = self.pronouns()
            changed = self.alternation() or changed
            if not changed:
                break

    def vocatives(self) -> None:
        """A line calling the narrator by name ("..., Watson") is the character's when the
        character speaks (explicitly) in the chapter, the turns around it in its run
        alternate consistently with that, and either the latest explicitly named other
        speaker, at most 10 turns back, is the character, or the other side of the run is
        held by someone else (so that the line is not the narrator's partner's)."""
        if not any(u.rule in ("verb", "beat") and u.speaker == self.character for u in self.utts):
            return
        partner, seen = None, -99
        for k, u in enumerate(self.utts):
            if u.rule in ("verb", "beat") and u.speaker != NARRATOR:
                partner, seen = u.speaker, k
            elif (
                u.vocative
                and not u.speaker
                and u.rule != "conflict"
                and self._parity_ok(k, self.character)
                and ((partner == self.character and k - seen <= 10) or self._opposite_held(k))
            ):
                u.speaker, u.rule = self.character, "vocative"

    def _opposite_held(self, k: int) -> bool:
        """Turns of ``k``'s run an odd number of places away include one by a known speaker
        other than the character and the narrator."""
        for step in (-1, 1):
            j = k
            while self.adjacent(*sorted((j, j + step))):
                j += step
                who = self.utts[j].speaker
                if (j - k) % 2 and who and who not in (self.character, NARRATOR):
                    return True
        return False

    def _parity_ok(self, k: int, who: str) -> bool:
        """No turn of ``k``'s run contradicts ``who`` speaking turn ``k`` and every other turn."""
        for step in (-1, 1):
            j = k
            while self.adjacent(*sorted((j, j + step))):
                j += step
                u, even = self.utts[j], (j - k) % 2 == 0
                if even and ((u.speaker and u.speaker != who) or who in u.not_speakers):
                    return False
                if not even and u.speaker == who:
                    return False
        return True

    def pronouns(self) -> bool:
        changed = False
        for k, u in enumerate(self.utts):
            if u.speaker or u.rule == "conflict" or not u.pronoun:
                continue
            who = None
            if u.beat and u.beat[0] == "named":
                who, how = u.beat[1], "pronoun:beat"
            elif self.adjacent(k - 1, k):
                if (
                    self.known(k - 1) == NARRATOR
                    and self.adjacent(k - 2, k - 1)
                    and self.known(k - 2) not in (None, NARRATOR)
                ):
                    who, how = self.known(k - 2), "pronoun:exchange"
            else:
                for text in u.focus:  # own paragraph first, then the one before
                    found = {
                        self.character
                        if m.group("char") or (m.group("comp") and u.about)
                        else " ".join(m.group().split())
                        for m in self.mention.finditer(text)
                    }
                    if found:
                        if len(found) == 1:
                            who, how = found.pop(), "pronoun:focus"
                        break
            if who and not _FEMALE.search(who) and who not in u.not_speakers:
                u.speaker, u.rule, changed = who, how, True
        return changed

    def alternation(self) -> bool:
        changed, k, n = False, 0, len(self.utts)
        while k < n:
            end = k
            while self.adjacent(end, end + 1):
                end += 1
            changed = self._alternate(list(range(k, end + 1))) or changed
            k = end + 1
        return changed

    def _alternate(self, run: list[int]) -> bool:
        """Fill the turns of one run by parity from the known speakers around them."""
        anchors = [(j, self.utts[k].speaker) for j, k in enumerate(run) if self.utts[k].speaker]
        if not anchors:
            return False
        plans: list[dict[int, str]] = []
        for (a, sa), (b, sb) in zip(anchors, anchors[1:]):
            if sa == sb and (b - a) % 2 == 0:
                plans.append({j: sa for j in range(a + 2, b, 2)})
            elif sa != sb and (b - a) % 2 == 1:
                plans.append({j: sa if (j - a) % 2 == 0 else sb for j in range(a + 1, b)})
        changed = self._apply(run, plans)
        (first, s0), (last, s1) = anchors[0], anchors[-1]
        for edge in (range(first - 2, -1, -2), range(last + 2, len(run), 2)):
            who = s0 if edge.step < 0 else s1
            for j in edge:  # outwards from the edge anchor, until a misfit
                u = self.utts[run[j]]
                if u.speaker or not self._fits(u, who):
                    break
                u.speaker, u.rule, changed = who, "alternation", True
        # a run whose known speakers are the character on one side only, and others on the
        # other side (several descriptions of one person, or several people in turn)
        sides = [{self.utts[k].speaker for k in run[c::2]} - {None} for c in (0, 1)]
        for c in (0, 1):
            if sides[c] == {self.character} and sides[1 - c] and self.character not in sides[1 - c]:
                plan = {
                    j: self.character
                    for j in range(c, len(run), 2)
                    if not self.utts[run[j]].speaker
                }
                changed = self._apply(run, [plan]) or changed
        return changed

    def _apply(self, run: list[int], plans: list[dict[int, str]]) -> bool:
        changed = False
        for plan in plans:
            turns = [
                (self.utts[run[j]], w) for j, w in plan.items() if not self.utts[run[j]].speaker
            ]
            if turns and all(self._fits(u, w) for u, w in turns):
                for u, w in turns:
                    u.speaker, u.rule, changed = w, "alternation", True
        return changed

    def _fits(self, u: Utterance, who: str) -> bool:
        """Nothing about turn ``u`` contradicts ``who`` saying it."""
        return not (
            who in u.not_speakers
            or u.rule == "conflict"
            or (u.pronoun and (who == NARRATOR or _FEMALE.search(who)))
        )


def extract_utterances(
    chapters: Iterable[Chapter],
    character: str = "Holmes",
    aliases: Sequence[str] = DEFAULT_ALIASES,
    companions: Sequence[str] = DEFAULT_COMPANIONS,
    narrator_names: Sequence[str] = DEFAULT_NARRATOR_NAMES,
    excluded: Sequence[str] = DEFAULT_EXCLUDED,
) -> list[Utterance]:
    """All quoted turns of the chapters, in order, with speakers where the rules allow.

    ``aliases`` are names of ``character`` in narration (matched as whole words, "Mr. "
    prefix allowed, not as part of an ``excluded`` name); ``companions`` are phrases the
    first-person narrator uses for the character ("my companion", "my friend"; not when
    followed by a name, as in "my friend Lestrade"); ``narrator_names`` are the
    first-person narrator's names (default ``("Watson",)``): a line naming the narrator is
    not the narrator's, and one addressing the narrator ("..., Watson") may be the
    character's (rule ``vocative``; empty turns the rule off); ``excluded`` are other
    people whose full name contains an alias (default ``("Mycroft Holmes",)``). The
    defaults fit the Sherlock Holmes stories. Raises ``ValueError`` if ``aliases`` is empty.
    """
    att = _Attributor(
        character, tuple(aliases), tuple(companions), tuple(narrator_names), tuple(excluded)
    )
    parsed = [(ch, _parse_chapter(ch, att)) for ch in chapters]
    people: dict[str, set[str]] = {}  # per book: names seen as speakers ("Lestrade")
    for ch, utts in parsed:
        for u in utts:
            for kind, s in u.verb:
                if kind == "named" and s not in (NARRATOR, character, "she"):
                    people.setdefault(ch.book, set()).add(s)
    for ch, utts in parsed:
        _Resolver(utts, att.mentions(people.get(ch.book, set())), character).run()
    return [u for _, utts in parsed for u in utts]
