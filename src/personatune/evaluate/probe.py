"""Capability retention: the factual probe with lenient answer matching, automatic checks
of stress prompts, and self-distillation drift.

The evaluation sets are package data in ``personatune/evaluate/data/``, written for this
project: ``factual_probe.jsonl`` (192 short questions with answer lists, 32 per
category), ``general_prompts.jsonl`` (331 prompts on the probe's areas and more, none of
them a probe question), ``stress_prompts.jsonl`` (35 prompts after seed system 1's
stress tests) and ``mc_tiny.jsonl`` (20 multiple-choice items for tests).
"""

from __future__ import annotations

import functools
import hashlib
import json
import re
from collections import defaultdict
from collections.abc import Sequence
from importlib import resources

from personatune.evaluate.metrics import normalize, percent, words
from personatune.io import jsonl_records

DATA = "personatune.evaluate"


@functools.lru_cache(maxsize=8)
def _read(name: str) -> tuple[dict, ...]:
    text = resources.files(DATA).joinpath("data", name).read_text(encoding="utf-8")
    return tuple(row for _, row in jsonl_records(name, text))


def load_set(name: str) -> list[dict]:
    """Rows of a packaged evaluation set: ``factual_probe``, ``general_prompts``,
    ``stress_prompts`` or ``mc_tiny`` (JSONL, one object per line)."""
    return [dict(r) for r in _read(f"{name}.jsonl")]


def prompt_key(text: str) -> str:
    """A prompt's identity for overlap checks: its :func:`~metrics.words` joined."""
    return " ".join(words(text))


def unseen(rows: list[dict], field: str, seen: set[str]) -> list[dict]:
    """``rows`` whose ``field`` text is not in ``seen`` (a set of :func:`prompt_key`), so
    that a question the persona was trained on does not count as held out."""
    return [r for r in rows if prompt_key(r[field]) not in seen]


def stratified(rows: list[dict], n: int, seed: int = 0, by: str = "category") -> list[dict]:
    """A fixed subset of ``n`` rows, as equal per ``by`` value as ``n`` allows: rows are
    ordered by a seeded hash of their ``id`` (or text) within each group, and groups are
    taken in turn. Deterministic and independent of row order."""
    groups: dict[str, list[dict]] = defaultdict(list)
    for r in rows:
        groups[r.get(by, "")].append(r)

    def h(r):
        ident = r.get("id") or json.dumps(r, sort_keys=True)
        return hashlib.sha256(f"{seed}:{ident}".encode()).hexdigest()

    queues = [sorted(g, key=h) for _, g in sorted(groups.items())]
    out: list[dict] = []
    while len(out) < min(n, len(rows)):
        for q in queues:
            if q and len(out) < n:
                out.append(q.pop(0))
    return out


def general_split(n_eval: int, seed: int = 0) -> tuple[list[dict], list[dict]]:
    """Split ``general_prompts`` into ``(preservation, held_out)``: ``n_eval`` prompts,
    stratified by category (:func:`stratified`), are held out for the adoption rate and
    drift; the rest may be used as self-distillation prompts. Fixed for a given ``seed``,
    so preservation data never includes a held-out prompt."""
    rows = load_set("general_prompts")
    held = stratified(rows, n_eval, seed)
    ids = {r["id"] for r in held}
    return [r for r in rows if r["id"] not in ids], held


def _canon(text: str) -> str:
    text = normalize(text)
    text = re.sub(r"(?<=[a-z])-(?=[a-z])", " ", text)  # twenty-four -> twenty four
    text = re.sub(r"(?<=\d),(?=\d{3}\b)", "", text)  # 1,000 -> 1000
    return re.sub(r"\s+", " ", text)


def answer_matches(text: str, answers: Sequence[str]) -> bool:
    """Whether ``text`` contains one of ``answers`` as a whole word, phrase or number.

    Lenient matching: case, accents, hyphens between letters and thousands separators are
    ignored (NFKD, so "H₂O" matches "H2O"), and the answer may sit anywhere in the text.
    Strict at the edges: the match may not continue a word or a number, so "4" does not
    match "14", "4.5" or "40", and "cat" does not match "category". An answer that names
    several candidates ("Paris or London") counts as correct.
    """
    t = _canon(text)
    for a in answers:
        a = _canon(a).strip()
        if a and re.search(r"(?<![\w.])" + re.escape(a) + r"(?![\w]|\.\d)", t):
            return True
    return False


def score_probe(texts: Sequence[str], items: Sequence[dict]) -> dict:
    """Accuracy on the factual probe.

    Args:
        texts: one answer per item.
        items: probe rows ``{"id", "category", "question", "answers"}``.

    Returns:
        ``{"accuracy": percent correct, "n", "correct": [bool per item],
        "by_category": {category: percent}}``; accuracy is 0.0 for no items.
    """
    correct = [answer_matches(t, it["answers"]) for t, it in zip(texts, items, strict=True)]
    cats: dict[str, list[bool]] = defaultdict(list)
    for ok, it in zip(correct, items):
        cats[it.get("category", "")].append(ok)
    return {
        "accuracy": percent(correct),
        "n": len(items),
        "correct": correct,
        "by_category": {c: percent(v) for c, v in sorted(cats.items())},
    }


def check_stress(text: str, check: dict) -> bool | None:
    """Apply a stress prompt's automatic check to an answer; None when the prompt has
    no automatic check (``type: none``, e.g. ambiguity, judged by reading).

    Check types: ``max_words`` (at most ``value`` :func:`~metrics.words`),
    ``no_letter`` (the letter ``value`` nowhere, case-insensitive), ``contains_any``
    (one of the words or phrases ``value``, whole-word), ``contains_number`` (the number
    ``value``, whole-number), ``starts_with_any`` (the first word is one of ``value``).

    Raises:
        ValueError: an unknown check type.
    """
    kind, value = check.get("type"), check.get("value")
    if kind == "none":
        return None
    if kind == "max_words":
        return len(words(text)) <= int(value)
    if kind == "no_letter":
        return str(value).lower() not in normalize(text)
    if kind == "contains_any":
        return answer_matches(text, list(value))
    if kind == "contains_number":
        return answer_matches(text, [str(value)])
    if kind == "starts_with_any":
        ws = words(text)
        return bool(ws) and ws[0] in {_canon(v) for v in value}
    raise ValueError(f"unknown stress check type {kind!r}")


def score_stress(texts: Sequence[str], items: Sequence[dict]) -> dict:
    """Pass rate of stress prompts with an automatic check.

    Returns:
        ``{"pass_rate": percent of checked prompts passed, "checked": n,
        "passed": [bool or None per item], "by_kind": {kind: percent}}``.
    """
    passed = [check_stress(t, it["check"]) for t, it in zip(texts, items, strict=True)]
    kinds: dict[str, list[bool]] = defaultdict(list)
    for ok, it in zip(passed, items):
        if ok is not None:
            kinds[it["kind"]].append(ok)
    checked = [p for p in passed if p is not None]
    return {
        "pass_rate": percent(checked),
        "checked": len(checked),
        "passed": passed,
        "by_kind": {k: percent(v) for k, v in sorted(kinds.items())},
    }


def drift_ratio(tuned_ppl: float, base_ppl: float) -> float:
    """Self-distillation drift: the tuned model's perplexity on the base model's own
    greedy answers divided by the base model's perplexity on them. 1.0 means the tuned
    model still predicts what the base model says as well as the base model does; the
    gate's default limit is 1.5."""
    return tuned_ppl / base_ppl if base_ppl > 0 else float("inf")
