"""Plays and screenplays in ``personatune data from-corpus``: format detection, speaker
labels and cues, stage directions, scenes as chapters, pairs with provenance, and
precision on the hand-labelled fixtures.

Fixtures (``tests/fixtures/scripts/``), written for the project: ``the_lamp_room.txt``
(a play, ``NAME.`` labels), ``a_matter_of_tea.txt`` (a play in Wilde's ``Name.`` style),
``night_ferry.txt`` (a screenplay, centred cues), ``harbour_lights_draft.txt`` (screenplay
pages as PDF-to-text gives them: scene numbers, page numbers, ``(MORE)``/``(CONT'D)``),
and the public-domain opening of Hamlet (``NAME.`` alone above the speech). Each has a
``.labels.jsonl`` sample saying, line by line, whether the character speaks it.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from personatune.cli import app
from personatune.data.corpus import (
    Book,
    Chapter,
    clean_script,
    detect_format,
    extract_script_dialogue,
    script_turns,
    split_books,
    split_scenes,
)
from personatune.data.from_corpus import from_corpus, read_corpus

runner = CliRunner()
SCRIPTS = Path(__file__).resolve().parent / "fixtures/scripts"
# (file stem, character, aliases, format): the hand-labelled samples
FIXTURES = [
    ("the_lamp_room", "Margaret", ["Maggie"], "play"),
    ("a_matter_of_tea", "Cecil", ["Cecil Wetherby"], "play"),
    ("hamlet_act1_scene1", "Horatio", [], "play"),
    ("night_ferry", "June", ["June Okafor"], "screenplay"),
    ("harbour_lights_draft", "Priya", ["Priya Nair"], "screenplay"),
]


def book(stem: str, fmt: str = "auto") -> Book:
    text = (SCRIPTS / f"{stem}.txt").read_text(encoding="utf-8")
    (b,) = split_books(text, stem.replace("_", " "), fmt)
    return b


def turns(text: str, character: str = "Ann", aliases=()) -> list[tuple[str, str]]:
    """(speaker, text) of every turn of one scene given as raw script text."""
    script = clean_script(text)
    ch = Chapter(book="T", index=1, title="S", text=script, offset=0)
    return [(u.speaker, u.text) for u in script_turns([ch], character, aliases)]


@pytest.mark.parametrize("stem,character,aliases,fmt", FIXTURES)
def test_format_detected_with_a_reason(stem, character, aliases, fmt):
    """Guards against a play read as prose (no quotes, so no lines found) or a
    screenplay read as a play, and a report that cannot say why."""
    b = book(stem)
    assert b.format == fmt, b.format_reason
    assert "speaker labels" in b.format_reason and "INT./EXT." in b.format_reason
    assert detect_format(b.text)[0] == fmt


def test_prose_stays_prose_and_format_can_be_forced():
    """Guards against a novel with a few ``NAME:`` lines (a letter, a notice) being read
    as a script, and against ``--format`` being ignored."""
    novel = (
        'CHAPTER I.\n\n"Where is he?" asked Lestrade.\n\n"Gone," said Holmes.\n\n'
        "NOTICE: the shop is closed.\n\n"
        '"Gone where?" said I.\n\n"To the moor," said Holmes.\n\n'
    )
    assert detect_format(clean_script(novel))[0] == "prose"
    assert split_books(novel, "N", "auto")[0].format == "prose"
    forced = split_books((SCRIPTS / "the_lamp_room.txt").read_text(), "P", "screenplay")[0]
    assert forced.format == "screenplay" and forced.format_reason == ""
    with pytest.raises(ValueError, match="format must be"):
        split_books(novel, "N", "poem")


def test_scenes_are_chapters_and_front_matter_is_dropped():
    """Guards against the list of persons or the title page becoming dialogue, scene
    headings leaking into scene text, and offsets that do not index the cleaned book."""
    play = book("the_lamp_room")
    assert [c.title for c in play.chapters] == [
        "SCENE 1. The lamp room at the top of the lighthouse. Night.",
        "SCENE 2. The same. Morning. The storm has passed.",
    ]
    hamlet = book("hamlet_act1_scene1")
    assert [c.title for c in hamlet.chapters] == [
        "ACT I SCENE I. Elsinore. A platform before the Castle."
    ]
    film = book("night_ferry")
    assert [c.title for c in film.chapters] == [
        "EXT. HARBOUR QUAY - NIGHT",
        "INT. FERRY CABIN - CONTINUOUS",
        "EXT. OPEN WATER - NIGHT",
        "INT. FERRY CABIN - NIGHT",
    ]
    for b in (play, hamlet, film):
        for c in b.chapters:
            assert b.text[c.offset : c.offset + len(c.text)] == c.text
            assert "PERSONS OF THE PLAY" not in c.text and "SCENE" not in c.text[:6]
    one = split_scenes(Book("B", [], text="ANN. Hello.\n\nBEN. Hi."))
    assert [(c.title, c.text) for c in one] == [("B", "ANN. Hello.\n\nBEN. Hi.")]


def test_play_labels_aliases_continuations_and_directions():
    """Guards against continuation lines being dropped, a colon label or a label alone
    on its line missed, an alias (MAGGIE) not counted, a joint line (TOM AND MARGARET)
    given to the character, and stage directions kept in the spoken text."""
    said = [
        (u.speaker, u.text)
        for u in script_turns(book("the_lamp_room").chapters, "Margaret", ["Maggie"])
    ]
    mine = [t for s, t in said if s == "Margaret"]
    assert mine[1] == (
        "The lens answers back in a language I understand. Four seconds of light, then "
        "dark, then four again. Ships read it like a sentence."
    )
    assert "They are a rude neighbour. They have sunk eleven boats" in mine[3]
    assert mine[5] == "Keep turning. Whatever he brings up those stairs, keep turning."
    assert "Letters are written by tired people at midnight. What do you want?" in mine
    assert mine[8] == (  # "MARGARET." alone, "(She turns the lamp up.)" between lines
        "The tower can carry anything. It is the keepers it was never asked about. "
        "Sit. You will want tea before you measure us."
    )
    assert ("TOM", "You always put it that way, as if the rocks were a rude neighbour.") in said
    assert ("TOM AND MARGARET", "Nine years.") in said
    assert ("TOM", "You talk to that lens more than you talk to me.") in said
    assert not any("[" in t or "_" in t or "laughing" in t for _, t in said)
    assert len(mine) == 12


def test_screenplay_cues_parentheticals_extensions_and_action():
    """Guards against parentheticals kept as speech, (V.O.)/(CONT'D) cues not matching
    the speaker, transitions (CUT TO:) taken for speakers, and action printed flush
    under the dialogue read as the character's words."""
    said = [(u.speaker, u.text) for u in script_turns(book("night_ferry").chapters, "June")]
    assert said[:4] == [
        ("June", "Last call for the island! Anyone for the island?"),
        ("ELI", "Wait! Is this the last one?"),
        (
            "June",
            "Last one tomorrow, if you'd rather sleep on the bench.".replace(
                "Last one", "Last one tonight. First one"
            ),
        ),
        ("ELI", "No. No, tonight. Please."),
    ]
    assert ("June", "Heavy?") in said and ("June", "Then we'd better get it home.") in said
    assert (
        "RADIO",
        "Marigold, Marigold, this is harbour control. Wind rising to force "
        "six. Confirm your crossing.",
    ) in said
    assert ("June", "That you should hold on to your box.") in said  # not "Eli wraps..."
    assert {s for s, _ in said} == {"June", "ELI", "RADIO"}


def test_pdf_screenplay_page_breaks_and_shouted_lines():
    """Guards against a speech cut at a page break ("(MORE)", a page number, "PRIYA
    (CONT'D)") or polluted by it, and against dialogue in capitals ("HE STILL DOES. ...",
    "STOP THE CAR.") being read as a new speaker and lost."""
    said = [
        (u.speaker, u.text)
        for u in script_turns(book("harbour_lights_draft").chapters, "Priya", ["Priya Nair"])
    ]
    assert (
        "Priya",
        "I rang the coastguard. The coastguard told me to ring you. Nobody wants the lighthouse.",
    ) in said
    assert ("Priya", "HE STILL DOES. That's the point. He's out there and the lamp is out.") in said
    assert said[-1] == ("Priya", "STOP THE CAR.")
    assert not any(s.startswith(("HE ", "STOP", "CUT")) for s, _ in said)


def test_label_rules_on_small_texts():
    """Guards against the rules that keep precision: a speaker named once still ends the
    turn before it; "Well." opening a verse line is not a label while a mixed-case name
    opening three blocks is; directions over several lines are dropped; italics used
    for emphasis keep their word; "Enter ..." lines are not speech."""
    assert turns("ANN. Stay here.\nMESSENGER. The king is dead!\nANN. Then go.") == [
        ("Ann", "Stay here."),
        ("MESSENGER", "The king is dead!"),
        ("Ann", "Then go."),
    ]
    wilde = "\n\n".join(
        ["Ann.  One.\nWell. I said it.", "Ben.  Two.", "Ann.  Three.", "Ben.  Four.", "Ann.  Five."]
        + ["Ben.  Six."]
    )
    assert turns(wilde)[0] == ("Ann", "One. Well. I said it.")
    assert len(turns(wilde)) == 6
    assert turns("Ann.  One.\n\nBen.  Two.") == []  # two blocks: not enough to be sure
    assert turns("ANN. I [_crossing\nto the door_] will go.\nNow.") == [("Ann", "I will go. Now.")]
    assert turns("ANN. (\nslowly, to Ben\n)\nI _told_ you so.") == [("Ann", "I told you so.")]
    assert turns("ANN. Go [_she points\n\nBEN. Where?") == [("Ann", "Go"), ("BEN", "Where?")]
    assert turns("ANN. Sit.\nBEN sits down.\nGood.\n\nBEN. Thanks.") == [
        ("Ann", "Sit. Good."),
        ("BEN", "Thanks."),
    ]
    assert turns("Enter BEN.\n\nBEN. Hello.\nExit.\n\nANN. Bye.") == [
        ("BEN", "Hello."),
        ("Ann", "Bye."),
    ]


def test_pairs_prompt_the_line_before_with_provenance():
    """Guards against pairing a reply with the wrong line, losing scene and offset, and
    pairing across a scene break (the first line of a scene gets the scene's opening
    text, prompt_kind narrative)."""
    b = book("night_ferry")
    pairs = extract_script_dialogue(b.chapters, "June")
    assert len(pairs) == 9
    first = pairs[0]
    assert first.prompt_kind == "narrative" and first.chapter == "EXT. HARBOUR QUAY - NIGHT"
    assert first.prompt.endswith("coils a rope.")  # the action before the cue, not the cue
    second = pairs[1]
    assert (second.prompt, second.prompt_kind) == ("Wait! Is this the last one?", "utterance")
    cabin = pairs[2]
    assert cabin.chapter == "INT. FERRY CABIN - CONTINUOUS" and cabin.prompt_kind == "narrative"
    for p in pairs:
        assert b.text[p.offset :].startswith(p.response.split()[0])
        assert p.book == "night ferry"


@pytest.mark.parametrize("stem,character,aliases,fmt", FIXTURES)
def test_precision_on_hand_labelled_sample(stem, character, aliases, fmt, tmp_path):
    """Guards against attributing other speakers' lines or stage directions to the
    character (the issue's bar: precision at least 0.95 on the hand-labelled sample);
    recall is held at 0.9 so that a timid extractor fails too."""
    report = from_corpus(
        SCRIPTS / f"{stem}.txt",
        tmp_path / "out",
        character=character,
        aliases=aliases,
        labels=SCRIPTS / f"{stem}.labels.jsonl",
        eval_chapters=0,
    )
    att = report["attribution"]
    assert report["format"]["books"][0]["format"] == fmt
    assert att["labelled"] >= 30 and att["tp"] + att["fp"] >= 5
    assert att["precision"] >= 0.95, att
    assert att["recall"] >= 0.9, att


def test_cli_from_corpus_on_a_folder_of_scripts(tmp_path):
    """Guards against --format being ignored, the report not saying which format was
    found and why, scenes not held out whole, and a bad --format as a traceback."""
    folder = tmp_path / "scripts"
    folder.mkdir()
    for stem in ("the_lamp_room", "night_ferry"):
        (folder / f"{stem}.txt").write_text((SCRIPTS / f"{stem}.txt").read_text())
    out = tmp_path / "data"
    args = ["data", "from-corpus", str(folder), "--character", "June", "--out", str(out)]
    r = runner.invoke(app, [*args, "--eval-chapters", "0.3"])
    assert r.exit_code == 0, r.output
    report = json.loads((out / "report.json").read_text())
    assert report["format"]["requested"] == "auto"
    assert report["format"]["detected"] == ["play", "screenplay"]
    assert [(b["book"], b["format"]) for b in report["per_book"]] == [
        ("night ferry", "screenplay"),
        ("the lamp room", "play"),
    ]
    assert "night ferry: screenplay (0 NAME./NAME: speaker labels" in " ".join(r.stdout.split())
    rows = [json.loads(x) for x in (out / "dialogue_train.jsonl").read_text().splitlines()]
    held = [json.loads(x) for x in (out / "dialogue_eval.jsonl").read_text().splitlines()]
    assert len(rows) + len(held) == 9 and held
    assert not {p["chapter"] for p in held} & {p["chapter"] for p in rows}
    chunks = [json.loads(x) for x in (out / "chunks_train.jsonl").read_text().splitlines()]
    assert {c["book"] for c in chunks} == {"night ferry", "the lamp room"}
    assert not {c["chapter"] for c in chunks} & {p["chapter"] for p in held}
    r = runner.invoke(app, [*args[:-1], str(tmp_path / "d2"), "--format", "poem"])
    assert r.exit_code == 2 and "--format poem: choose auto, prose, play, screenplay" in r.stderr
    r = runner.invoke(app, [*args[:-1], str(tmp_path / "d3"), "--format", "prose"])
    assert r.exit_code == 2 and "found no attributed lines of June" in r.stderr


def test_read_corpus_passes_the_format():
    """Guards against read_corpus dropping the format on the way to split_books."""
    (b,) = read_corpus(SCRIPTS / "hamlet_act1_scene1.txt", format="play")
    assert b.format == "play" and b.title == "hamlet act1 scene1"


@pytest.mark.parametrize(
    "stem,character",
    [("night_ferry", "June"), ("harbour_lights_draft", "Priya"), ("the_lamp_room", "Margaret")],
)
def test_scripts_that_lost_their_blank_lines_read_the_same(stem, character):
    """Guards against PDF-to-text output without blank lines merging every speech into
    one (cues are then told by their centring, INT./EXT. and capitalised ACT/SCENE
    headings by their words, action by its indentation) or handing the title page to a
    speaker."""
    raw = (SCRIPTS / f"{stem}.txt").read_text(encoding="utf-8")
    squeezed = "\n".join(line for line in raw.split("\n") if line.strip())
    (full,) = split_books(raw, "x", "auto")
    (tight,) = split_books(squeezed, "x", "auto")
    assert tight.format == full.format
    assert [c.title for c in tight.chapters] == [c.title for c in full.chapters]

    def said(b: Book) -> list[tuple[str, str]]:
        return [(u.speaker, u.text) for u in script_turns(b.chapters, character, ["Maggie"])]

    assert said(tight) == said(full)
