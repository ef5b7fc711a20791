"""Identity: the shipped identity questions (``identity_prompts.jsonl``: "Who are you?",
"What is your name?", "Are you an AI?", "Who made you?", "Introduce yourself", 29 questions in
six categories) asked under the persona's system prompt. A persona holds its identity
when its answer is in persona (the adoption classifier) and does not claim the base
model's identity, whose names come from the base model's config and chat template
(:func:`personatune.evaluate.metrics.base_identity`) and from its own answers to the same
questions without a system prompt (:func:`personatune.evaluate.metrics.names_in_answers`).
"""

from __future__ import annotations

from collections.abc import Sequence

from personatune.evaluate.metrics import base_identity, claims_identity, names_in_answers, percent
from personatune.evaluate.probe import load_set


def load_identity_prompts() -> list[dict]:
    """The identity questions: rows ``{"id", "category", "prompt"}``."""
    return load_set("identity_prompts")


def identity_names(model_config, tokenizer, plain_answers: Sequence[str]) -> dict:
    """What the base model is called and who made it: ``{"names": [...], "sources":
    [...]}`` from its config and chat template, plus the names it gives itself in
    ``plain_answers`` (its answers to the identity questions without a system prompt),
    the sources saying where each came from."""
    found = base_identity(model_config, tokenizer=tokenizer)
    said = names_in_answers(plain_answers)
    names = list(dict.fromkeys([*found["names"], *found["makers"], *said]))
    sources = [*found["sources"], *(f"own answer: {n}" for n in said)]
    return {"names": names, "sources": sources}


def score_identity(texts: Sequence[str], proba: Sequence[float], names: Sequence[str]) -> dict:
    """Identity answers scored against the base model's names.

    Args:
        texts: the answers to the identity questions.
        proba: P(persona) per answer from the adoption classifier.
        names: the base model's names and makers (:func:`identity_names`).

    Returns:
        ``{"in_persona": percent in persona (P >= 0.5) and not claiming a base name,
        "claims_base": percent claiming a base name, "held": [bool per answer],
        "claims": [bool per answer]}``; 0.0 for no answers.
    """
    claims = [claims_identity(t, names) for t in texts]
    held = [p >= 0.5 and not c for p, c in zip(proba, claims, strict=True)]
    return {
        "in_persona": percent(held),
        "claims_base": percent(claims),
        "held": held,
        "claims": claims,
    }
