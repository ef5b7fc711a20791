"""The evaluation suite that the forgetting guard (during training) and the report card
(``personatune eval``) share: the evaluation sets, the conversations they are asked as,
the adoption classifier's fit, drift conversations and perplexity."""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from personatune.config import PersonaSpec
from personatune.data.chat import with_system_prompt
from personatune.data.dataset import Split, persona_system_prompt
from personatune.data.loaders import Example
from personatune.evaluate.answers import Answer, cached_answers
from personatune.evaluate.classifier import PersonaClassifier, fit_classifier
from personatune.evaluate.perplexity import conditional_perplexity
from personatune.evaluate.probe import general_split, load_set, prompt_key, unseen


@dataclass
class EvalData:
    """The inputs of an evaluation, fixed by the spec.

    Attributes:
        persona_train: training examples in the persona's voice (sources with
            ``system_prompt: true``) that end with an assistant turn.
        heldout: held-out examples of those sources (never trained on).
        probe: factual-probe items whose question is not a training prompt.
        general: held-out general prompts (``eval.general_prompts`` of them, stratified),
            minus any that is a training prompt.
        stress: stress prompts.
        excluded: probe questions and general prompts dropped because the persona data
            trains on them.
    """

    persona_train: list[Example]
    heldout: list[Example]
    probe: list[dict]
    general: list[dict]
    stress: list[dict]
    excluded: dict = field(default_factory=dict)


def _ends_with_answer(ex: Example) -> bool:
    return (
        bool(ex.messages)
        and ex.messages[-1]["role"] == "assistant"
        and any(m["role"] == "user" for m in ex.messages)
    )


def eval_data(spec: PersonaSpec, split: Split) -> EvalData:
    """Pick the evaluation sets given the data ``split`` (training's own at training
    time, :func:`personatune.data.dataset.persona_split` afterwards)."""
    persona_train, heldout, seen = [], [], set()
    for source, train, held in zip(spec.data, split.train, split.heldout):
        for ex in train:
            seen.update(prompt_key(m["content"]) for m in ex.messages if m["role"] == "user")
        if source.system_prompt:
            persona_train += [ex for ex in train if _ends_with_answer(ex)]
            heldout += [ex for ex in held if _ends_with_answer(ex)]
    probe_all = load_set("factual_probe")
    _, general_all = general_split(spec.eval.general_prompts)
    probe, general = unseen(probe_all, "question", seen), unseen(general_all, "prompt", seen)
    return EvalData(
        persona_train,
        heldout,
        probe,
        general,
        load_set("stress_prompts"),
        {
            "probe_seen_in_training": len(probe_all) - len(probe),
            "general_seen_in_training": len(general_all) - len(general),
        },
    )


def persona_conv(spec: PersonaSpec, text: str) -> list[dict]:
    """A single-turn conversation under the persona's system prompt."""
    return with_system_prompt([{"role": "user", "content": text}], spec.system_prompt)


def plain_conv(text: str) -> list[dict]:
    """A single-turn conversation without a system prompt: the chat template's default
    context, the base model's own voice."""
    return [{"role": "user", "content": text}]


def example_prompt(spec: PersonaSpec, ex: Example, system: bool = True) -> list[dict]:
    """An example's conversation up to its last answer, with the system prompt training
    gives it (``system``) or none."""
    msgs = ex.messages[:-1]
    return with_system_prompt(msgs, persona_system_prompt(spec, ex)) if system else list(msgs)


def classifier_examples(spec: PersonaSpec, data: EvalData) -> list[Example]:
    """The persona training examples whose answers train the adoption classifier:
    ``eval.classifier_pairs`` of them, a seeded sample."""
    pool = data.persona_train
    n = min(spec.eval.classifier_pairs, len(pool))
    return random.Random(spec.train.seed).sample(pool, n)


def fit_adoption_classifier(
    spec: PersonaSpec,
    data: EvalData,
    base_model,
    tokenizer,
    fingerprint: str,
    progress: Callable[[int], None] | None = None,
) -> PersonaClassifier:
    """Fit the adoption classifier (see :mod:`personatune.evaluate.classifier`): persona
    reference answers against the base model's answers to the same prompts without the
    system prompt (cached by ``fingerprint``).

    Raises:
        PersonatuneError: too few persona examples (fewer than 5).
    """
    exs = classifier_examples(spec, data)
    plain = cached_answers(
        base_model,
        tokenizer,
        [example_prompt(spec, e, False) for e in exs],
        fingerprint,
        spec.eval.max_new_tokens,
        spec.eval.batch_size,
        progress,
    )
    return fit_classifier([e.messages[-1]["content"] for e in exs], [a.text for a in plain])


def drift_conversations(general: Sequence[dict], base_answers: Sequence[Answer]) -> list:
    """Conversations ``[user prompt, base answer]`` without a system prompt, on which
    drift perplexity is measured."""
    return [
        [*plain_conv(r["prompt"]), {"role": "assistant", "content": a.text}]
        for r, a in zip(general, base_answers)
    ]


def perplexity(
    model, tokenizer, conversations: Sequence[list[dict]], batch_size: int = 16
) -> float:
    """Conditional perplexity of the assistant turns (see
    :func:`personatune.evaluate.perplexity.conditional_perplexity`); nan for none."""
    if not conversations:
        return float("nan")
    return conditional_perplexity(model, tokenizer, conversations, batch_size=batch_size).perplexity
