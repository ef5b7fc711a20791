"""The shipped evaluation sets of issue 13 (identity questions, scripted conversations)
and the synthesis prompt pool: formats, sizes, and that the pool shares no prompt with
any evaluation set or with the pirate example's training prompts."""

from __future__ import annotations

import csv
import json
from collections import Counter
from pathlib import Path

import pytest

from personatune.evaluate.probe import answer_matches, load_set, prompt_key

REPO = Path(__file__).resolve().parents[1]


def near_duplicate(a: str, b: str) -> str:
    """Why two prompts count as the same question ("" if they do not), on normalised
    text (:func:`prompt_key`: lower case, no accents or punctuation): equal; word-set
    Jaccard at least 0.8; or one, of 3 words or more, inside the other as a run of whole
    words ("why does ice float" in "why does ice float on water")."""
    ka, kb = prompt_key(a), prompt_key(b)
    if ka == kb:
        return "equal"
    sa, sb = set(ka.split()), set(kb.split())
    if len(sa & sb) / len(sa | sb) >= 0.8:
        return "jaccard"
    short, long_ = sorted((ka, kb), key=len)
    if len(short.split()) >= 3 and f" {short} " in f" {long_} ":
        return "contained"
    return ""


def test_near_duplicate_rule():
    """Guards against a disjointness check that only compares raw strings."""
    assert near_duplicate("Why does ice float?", "why does ICE float") == "equal"
    assert near_duplicate("Why does ice float?", "Why does ice float on water?") == "contained"
    assert near_duplicate(
        "How do I cook brown rice on the stove?", "How do I cook rice on the stove?"
    )
    assert not near_duplicate("How do I tie a reef knot?", "How do I tie a tie?")


def test_identity_prompts():
    """Guards against a set too small or too narrow to measure identity (the issue asks
    for 20+ questions on name, maker, AI status and introductions, several phrasings
    each), and against repeated questions inflating it."""
    rows = load_set("identity_prompts")
    assert len(rows) >= 24
    assert all(set(r) == {"id", "category", "prompt"} for r in rows)
    assert len({r["id"] for r in rows}) == len(rows)
    assert len({prompt_key(r["prompt"]) for r in rows}) == len(rows)
    per = Counter(r["category"] for r in rows)
    for category in ("who", "name", "ai", "maker", "introduce"):
        assert per[category] >= 4, per
    prompts = {r["prompt"] for r in rows}
    assert {"Who are you?", "What is your name?", "Are you an AI?", "Who made you?"} <= prompts


def test_conversations_have_eight_turns_mixing_small_talk_and_questions():
    """Guards against conversations of the wrong length, questions without accepted
    answers (correctness could not be scored per turn), a turn index with too few
    questions to report correctness there (turn 1 and turn 8 are compared), and
    questions that give their own answer away (an echo would score as correct)."""
    convs = load_set("conversations")
    assert len(convs) >= 10
    assert len({c["id"] for c in convs}) == len(convs)
    questions_at = Counter()
    for c in convs:
        assert set(c) == {"id", "topic", "turns"}
        assert len(c["turns"]) == 8, c["id"]
        kinds = {t["kind"] for t in c["turns"]}
        assert kinds == {"small_talk", "question"}, c["id"]
        for i, t in enumerate(c["turns"], 1):
            if t["kind"] == "question":
                assert set(t) == {"prompt", "kind", "answers"}
                assert t["answers"] and all(isinstance(a, str) and a for a in t["answers"])
                assert all(answer_matches(a, t["answers"]) for a in t["answers"])
                assert not answer_matches(t["prompt"], t["answers"]), t["prompt"]
                questions_at[i] += 1
            else:
                assert set(t) == {"prompt", "kind"}
    assert all(questions_at[i] >= 3 for i in range(1, 9)), questions_at


def test_conversation_questions_are_not_probe_questions():
    """Guards against the conversations re-asking the factual probe, which would make
    per-turn correctness a copy of the probe score."""
    probe = [r["question"] for r in load_set("factual_probe")]
    for c in load_set("conversations"):
        for t in c["turns"]:
            assert not any(near_duplicate(t["prompt"], q) for q in probe), t["prompt"]


def other_prompts() -> list[tuple[str, str]]:
    """(source, prompt) of every evaluation set and the pirate example's CSV prompts."""
    out = [("general_prompts", r["prompt"]) for r in load_set("general_prompts")]
    out += [("factual_probe", r["question"]) for r in load_set("factual_probe")]
    out += [("stress_prompts", r["prompt"]) for r in load_set("stress_prompts")]
    out += [("mc_tiny", r["question"]) for r in load_set("mc_tiny")]
    out += [("identity_prompts", r["prompt"]) for r in load_set("identity_prompts")]
    out += [("conversations", t["prompt"]) for c in load_set("conversations") for t in c["turns"]]
    for path in sorted((REPO / "examples/pirate").glob("*.csv")):
        with path.open(encoding="utf-8", newline="") as f:
            out += [(path.name, r["prompt"]) for r in csv.DictReader(f)]
    return out


def test_synth_prompt_pool_format_and_size():
    """Guards against a pool too small for synthesis (300+) or holding repeats."""
    rows = load_set("synth_prompts")
    assert len(rows) >= 300
    assert all(set(r) == {"id", "category", "prompt"} and r["prompt"].strip() for r in rows)
    assert len({r["id"] for r in rows}) == len(rows)
    keys = [prompt_key(r["prompt"]) for r in rows]
    assert len(set(keys)) == len(keys)
    assert len({r["category"] for r in rows}) >= 8


@pytest.mark.parametrize("source", ["evaluation sets and pirate CSVs"])
def test_synth_prompts_are_disjoint_from_every_evaluation_set(source):
    """Guards against synthesized persona data training on an evaluation prompt (the
    adoption, probe, identity or conversation scores would then measure memory), exact
    or near-duplicate (:func:`near_duplicate`), and against the pirate example's own
    prompts turning up in the pool."""
    others = other_prompts()
    assert len(others) > 900
    clashes = [
        (p["prompt"], src, o, why)
        for p in load_set("synth_prompts")
        for src, o in others
        if (why := near_duplicate(p["prompt"], o))
    ]
    assert not clashes, clashes[:5]


def test_butler_pairs_are_disjoint_from_every_evaluation_set():
    """Guards against the butler example's hand-written pairs training on an evaluation
    prompt (its report card would then measure memory), exact or near-duplicate
    (:func:`near_duplicate`)."""
    path = REPO / "examples/butler/butler.jsonl"
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
    assert len(rows) >= 200 and all(set(r) == {"prompt", "response"} for r in rows)
    evaluation = [(s, o) for s, o in other_prompts() if not s.endswith(".csv")]
    clashes = [
        (r["prompt"], src, o, why)
        for r in rows
        for src, o in evaluation
        if (why := near_duplicate(r["prompt"], o))
    ]
    assert not clashes, clashes[:5]
