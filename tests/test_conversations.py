"""Long conversations (issue 13): the scripted conversations are answered turn by turn
by the model itself, one engine batch per turn; per-turn adoption and correctness; the
adoption-by-turn plot and the report-card rows."""

import pytest
from transformers import AutoModelForCausalLM

from personatune.engine import Answer, generate_answers
from personatune.evaluate import answers as answers_mod
from personatune.evaluate import card
from personatune.evaluate import conversations as conv_mod
from personatune.evaluate.conversations import (
    load_conversations,
    run_conversations,
    score_conversations,
)
from personatune.evaluate.report import plot_turns, render_html

ITEMS = [
    {"id": "a", "turns": [{"prompt": "Hi!", "kind": "small_talk"},
                          {"prompt": "What is 2+2?", "kind": "question", "answers": ["4"]},
                          {"prompt": "Thanks.", "kind": "small_talk"}]},
    {"id": "b", "turns": [{"prompt": "Hello there.", "kind": "small_talk"},
                          {"prompt": "Capital of France?", "kind": "question",
                           "answers": ["Paris"]}]},
]  # fmt: skip


@pytest.fixture(autouse=True)
def isolated(tmp_path, monkeypatch):
    monkeypatch.setenv("PERSONATUNE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("PERSONATUNE_BF16", "0")


class _Clf:
    def adoption(self, texts):
        proba = [0.9 if "arr" in t.lower() else 0.1 for t in texts]
        return {"rate": 0.0, "score": 0.0, "proba": proba}


def test_each_turn_is_answered_by_the_model_with_its_own_answers(
    tiny_model, embedded_tokenizer, monkeypatch
):
    """Guards against scripted assistant turns (the model must see its own earlier
    answers), a conversation per batch instead of one batch per turn, and against losing
    the system prompt after turn 1: every turn's answer equals a fresh greedy answer to
    the system prompt, the scripted user turns and the model's own earlier answers."""
    model = AutoModelForCausalLM.from_pretrained(tiny_model).eval()
    tok = embedded_tokenizer
    batches = []
    real = answers_mod.cached_answer_sets

    def spy(model, tokenizer, sets, *a, **k):
        batches.append([len(c) for convs, _ in sets for c in convs])
        return real(model, tokenizer, sets, *a, **k)

    monkeypatch.setattr(conv_mod, "cached_answer_sets", spy)
    out = run_conversations(model, tok, ITEMS, "You are a pirate.", "fp", max_new_tokens=6)
    assert [len(c) for c in out] == [3, 2]
    # one batch per turn with every conversation still going; system + 2t+1 messages
    assert batches == [[2, 2], [4, 4], [6]]
    history = [{"role": "system", "content": "You are a pirate."}]
    for turn, answer in zip(ITEMS[0]["turns"], out[0]):
        history.append({"role": "user", "content": turn["prompt"]})
        fresh = generate_answers(model, tok, [list(history)], 6)[0]
        assert answer.text == fresh.text
        history.append({"role": "assistant", "content": answer.text})


def test_score_conversations_per_turn_by_hand():
    """Guards against averaging over conversations instead of turns, counting small talk
    as wrong answers, or a turn past a short conversation's end: turn 1 has two small-talk
    answers (one in persona), turn 2 two questions (one right), turn 3 one answer."""
    answers = [
        [Answer("Arr, ahoy!", 3, True), Answer("It be 4, arr.", 4, True), Answer("Bye", 1, True)],
        [Answer("Hello.", 2, True), Answer("London, arr.", 3, True)],
    ]
    s = score_conversations(answers, ITEMS, _Clf())
    assert s["adoption_by_turn"] == [50.0, 100.0, 0.0]
    assert s["correct_by_turn"] == [None, 50.0, None]
    assert s["questions_by_turn"] == [0, 2, 0] and s["answers_by_turn"] == [2, 2, 1]
    assert s["correct"][0] == [None, True, None]


def test_shipped_conversations_have_8_turns_and_questions_at_every_turn():
    """Guards against a set too small to plot by turn: at least 10 conversations of 8
    user turns, small talk and questions (with accepted answers) mixed, and questions at
    every turn index so correctness has a value at turn 1 and turn 8."""
    items = load_conversations()
    assert len(items) >= 10 and all(len(c["turns"]) == 8 for c in items)
    for t in range(8):
        kinds = {c["turns"][t]["kind"] for c in items}
        assert "question" in kinds
        assert all(
            c["turns"][t].get("answers") for c in items if c["turns"][t]["kind"] == "question"
        )


def test_turn_rows_and_plot(tmp_path):
    """Guards against the turn-1/turn-8 rows reading the wrong turn, and against a report
    without the adoption-by-turn plot: the PNG is written beside the report and the HTML
    embeds it and links the file."""
    items = [
        {"turns": [{"prompt": f"q{t}", "kind": "question", "answers": ["yes"]} for t in range(8)]}
    ]

    def side(texts):
        return card.Side(
            {},
            {},
            [],
            [],
            _Clf(),
            [],
            [],
            conversations=[[Answer(t, 2, True) for t in texts]],
            conversation_items=items,
        )

    base = side(["arr yes"] + ["plain"] * 7)
    tuned = side(["arr yes"] * 8)
    rows = [m for m in card.METRICS if m.key.startswith("conversation_")]
    m = card.score(rows, base, tuned)
    assert m["conversation_adoption_turn_1"]["base"] == 100.0
    assert m["conversation_adoption_turn_8"]["base"] == 0.0
    assert m["conversation_adoption_turn_8"]["tuned"] == 100.0
    assert m["conversation_correct_turn_8"]["base"] == 0.0
    assert m["conversation_correct_turn_8"]["tuned"] == 100.0
    convs = {s: {k: x.turns[k] for k in ("adoption_by_turn", "correct_by_turn")}
             for s, x in (("base", base), ("tuned", tuned))}  # fmt: skip
    png = plot_turns(convs, tmp_path / "report_turns.png")
    assert png and (tmp_path / "report_turns.png").read_bytes() == png
    assert plot_turns({}, tmp_path / "none.png") is None
    from test_card import _report

    html = render_html({**_report({}, 0.0), "conversations": convs}, None, b"", png)
    assert 'href="report_turns.png"' in html and "adoption by turn" in html
