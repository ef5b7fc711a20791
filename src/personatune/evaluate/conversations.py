"""Long conversations: the shipped scripted conversations (``conversations.jsonl``, 10 of 8
user turns mixing small talk and questions with accepted answers) asked under the
persona's system prompt, each user turn answered by the model itself with its own earlier
answers in the context; scored per turn for persona adoption and probe-style correctness.

Prompted personas are known to drift within a few turns (Li et al. 2024, "Measuring and
Controlling Instruction (In)Stability in Language Model Dialogs", arXiv:2402.10962); the
per-turn adoption shows whether a trained persona holds.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from personatune.data.chat import with_system_prompt
from personatune.engine import Answer, PrefixCache
from personatune.evaluate.answers import cached_answer_sets
from personatune.evaluate.metrics import percent
from personatune.evaluate.probe import answer_matches, load_set


def load_conversations() -> list[dict]:
    """The scripted conversations: rows ``{"id", "topic", "turns": [{"prompt", "kind",
    "answers"?}]}``; question turns carry their accepted ``answers``."""
    return load_set("conversations")


def run_conversations(
    model,
    tokenizer,
    items: Sequence[dict],
    system_prompt: str,
    fingerprint: str,
    max_new_tokens: int = 64,
    batch_size: int = 64,
    progress: Callable[[int], None] | None = None,
) -> list[list[Answer]]:
    """Answer every conversation turn by turn: the user turns are scripted, the assistant
    turns are the model's own greedy answers. All conversations of one turn are one
    engine batch (:func:`personatune.evaluate.answers.cached_answer_sets`, keyed by the whole
    history so far); the turns of a conversation are sequential. Each turn reuses the
    KV cache of the conversation's previous turn (its prompt and answer,
    :class:`personatune.engine.batcher.PrefixCache`) and prefills only the new tokens.

    Args:
        items: conversations as :func:`load_conversations` gives them (any number of
            turns each).
        system_prompt: the persona's system prompt ("" for none).
        fingerprint: identity of the weights, for the answer cache.
        max_new_tokens: longest answer per turn in tokens (default 64).
        progress: called with the number of answers done.

    Returns:
        Per conversation, its answers in turn order, shape ``(conversations, turns)``.
    """
    histories = [with_system_prompt([], system_prompt) for _ in items]
    prefixes = PrefixCache()
    out: list[list[Answer]] = [[] for _ in items]
    for turn in range(max((len(c["turns"]) for c in items), default=0)):
        live = [i for i, c in enumerate(items) if turn < len(c["turns"])]
        for i in live:
            histories[i].append({"role": "user", "content": items[i]["turns"][turn]["prompt"]})
        sets = [([list(histories[i]) for i in live], max_new_tokens)]
        answers = cached_answer_sets(
            model, tokenizer, sets, fingerprint, batch_size, progress, prefixes
        )[0]
        for i, a in zip(live, answers):
            histories[i].append({"role": "assistant", "content": a.text})
            out[i].append(a)
    return out


def score_conversations(
    answers: Sequence[Sequence[Answer]], items: Sequence[dict], classifier
) -> dict:
    """Per-turn persona adoption and correctness of conversation answers.

    Args:
        answers: ``(conversations, turns)`` answers from :func:`run_conversations`.
        items: the conversations asked.
        classifier: the adoption classifier (its ``adoption(texts)["proba"]``; an answer
            is in persona when P(persona) >= 0.5, as for the adoption rate).

    Returns:
        ``{"adoption_by_turn": [percent per turn], "correct_by_turn": [percent of the
        turn's questions answered correctly, probe-style (:func:`answer_matches`
        anywhere in the answer), or None for a turn without questions],
        "questions_by_turn": [count], "answers_by_turn": [count], "in_persona":
        (conversations, turns) bools, "correct": (conversations, turns) bool or None}``.
    """
    n_turns = max((len(c["turns"]) for c in items), default=0)
    flat = [a.text for conv in answers for a in conv]
    proba = iter(classifier.adoption(flat)["proba"]) if flat else iter(())
    in_persona = [[next(proba) >= 0.5 for _ in conv] for conv in answers]
    correct = [
        [
            answer_matches(a.text, t["answers"]) if t.get("answers") else None
            for a, t in zip(conv, item["turns"])
        ]
        for conv, item in zip(answers, items)
    ]
    # per turn, the answers given and the questions asked at it
    here = [[row[t] for row in in_persona if t < len(row)] for t in range(n_turns)]
    asked = [
        [row[t] for row in correct if t < len(row) and row[t] is not None] for t in range(n_turns)
    ]
    return {
        "adoption_by_turn": [percent(x, None) for x in here],
        "correct_by_turn": [percent(x, None) for x in asked],
        "questions_by_turn": [len(x) for x in asked],
        "answers_by_turn": [len(x) for x in here],
        "in_persona": in_persona,
        "correct": correct,
    }
