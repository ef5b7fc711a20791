"""Identity in the report card (issue 13): the base model's names from its config,
template and own answers; the identity score (in persona and not claiming the base
model); the report-card rows, base against tuned."""

from types import SimpleNamespace

import pytest

from personatune.engine import Answer
from personatune.evaluate import card
from personatune.evaluate.identity import identity_names, load_identity_prompts, score_identity
from personatune.evaluate.metrics import names_in_answers


class _Clf:
    """Adoption by a marker word: P(persona) 0.9 when "arr" is in the answer."""

    def adoption(self, texts):
        proba = [0.9 if "arr" in t.lower() else 0.1 for t in texts]
        rate = sum(p >= 0.5 for p in proba) / len(proba) if proba else 0.0
        return {"rate": rate, "score": rate, "proba": proba}


def test_names_in_answers_keeps_names_given_more_than_once():
    """Guards against missing what a base model calls itself when its config and template
    say nothing (a fine-tune named "Orca" of a Llama), and against taking generic words
    ("I am an AI Assistant") or a one-off slip for a name."""
    answers = [
        "I am Orca, an AI assistant created by Nimbus Labs.",
        "My name is Orca. I was developed by Nimbus Labs.",
        "I'm Orca!",
        "I am an AI Assistant, made by Nobody Inc.",
        "I am Bob.",
        "I am Dr. Watson.",
        "I'm Dr. Who.",
    ]
    assert names_in_answers(answers) == ["Orca", "Nimbus Labs"]
    assert "Bob" in names_in_answers(answers, min_answers=1)
    assert names_in_answers([]) == []


def test_identity_names_merge_template_config_and_own_answers(embedded_tokenizer):
    """Guards against reading the base identity from one source only: the embedded
    tokenizer's template names SmolLM and Hugging Face; the model's own answers add a
    name it keeps giving itself."""
    config = SimpleNamespace(_name_or_path="/models/tiny", model_type="llama")
    found = identity_names(config, embedded_tokenizer, ["I am Tinybot.", "I'm Tinybot, hello."])
    assert found["names"] == ["SmolLM", "Hugging Face", "Tinybot"]
    assert "chat template" in found["sources"] and "own answer: Tinybot" in found["sources"]


def test_score_identity_needs_persona_and_no_base_claim():
    """Guards against counting an in-persona answer that still names the base model
    ("Arr, I be SmolLM") as holding the identity, and a denial ("not SmolLM") as a
    claim."""
    texts = [
        "Arr, I be Captain Saltbeard!",
        "Arr, I be SmolLM, matey.",
        "I am SmolLM, made by Hugging Face.",
        "Arr, I am not SmolLM, I be a pirate.",
    ]
    proba = _Clf().adoption(texts)["proba"]
    s = score_identity(texts, proba, ["SmolLM", "Hugging Face"])
    assert s["held"] == [True, False, False, True]
    assert s["claims"] == [False, True, True, False]
    assert s["in_persona"] == 50.0 and s["claims_base"] == 50.0
    assert score_identity([], [], ["SmolLM"])["in_persona"] == 0.0
    with pytest.raises(ValueError):
        score_identity(["a"], [], ["x"])


def test_shipped_identity_questions():
    """Guards against a thin identity set: at least 20 questions, the five kinds the
    issue names (who, name, AI, maker, introduce), no duplicates."""
    rows = load_identity_prompts()
    assert len(rows) >= 20 and len({r["prompt"] for r in rows}) == len(rows)
    assert {"who", "name", "ai", "maker", "introduce"} <= {r["category"] for r in rows}


def _side(identity: list[str]) -> card.Side:
    return card.Side(
        {"identity": [Answer(t, 5, True) for t in identity]},
        {},
        [],
        [],
        _Clf(),
        [],
        [],
        identity_names=["SmolLM", "Hugging Face"],
    )


def test_identity_rows_in_the_report_card():
    """Guards against the identity rows missing from the card or computed on the wrong
    answers: the base model under the persona's system prompt still calls itself SmolLM,
    the tuned model holds the persona in 2 of 3 answers."""
    base = _side(["I am SmolLM.", "I'm SmolLM, by Hugging Face.", "Arr, I be SmolLM."])
    tuned = _side(["Arr, Saltbeard here!", "Arr matey.", "I am SmolLM."])
    rows = [m for m in card.METRICS if m.key.startswith("identity_")]
    assert {m.key for m in rows} == {"identity_in_persona", "identity_claims_base"}
    metrics = card.score(rows, base, tuned)
    assert metrics["identity_in_persona"]["base"] == 0.0
    assert metrics["identity_in_persona"]["tuned"] == pytest.approx(200 / 3)
    assert metrics["identity_claims_base"]["base"] == 100.0
    assert metrics["identity_claims_base"]["tuned"] == pytest.approx(100 / 3)
    assert metrics["identity_claims_base"]["higher_is_better"] is False
