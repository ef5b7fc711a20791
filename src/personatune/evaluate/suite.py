"""The evaluation suite that the forgetting guard (during training) and the report card
(``personatune eval``) share: the evaluation sets, the conversations they are asked as,
the adoption classifier's fit, drift conversations and perplexity."""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from importlib import resources

from personatune.config import PersonaSpec
from personatune.data.chat import with_system_prompt
from personatune.data.dataset import Split, persona_system_prompt
from personatune.data.loaders import Example
from personatune.evaluate.answers import Answer, cached_answers
from personatune.evaluate.classifier import PersonaClassifier, fit_classifier
from personatune.evaluate.metrics import degeneration_failures
from personatune.evaluate.perplexity import conditional_perplexity
from personatune.evaluate.probe import DATA, general_split, load_set, prompt_key, unseen
from personatune.io import digest, read_json, write_json
from personatune.models import cache_dir

#: The shipped multiple-choice set (20 items) as a ``(task, path)`` benchmark, scored by
#: log-likelihood through lm-eval (:func:`personatune.evaluate.lmeval.run_benchmark`).
MC_TINY = ("mc_tiny", str(resources.files(DATA).joinpath("data", "mc_tiny.jsonl")))

#: The report card's persona target: the share of answers to general prompts under the
#: persona's system prompt that the adoption classifier finds in persona (0..1).
ADOPTION_TARGET = 0.9


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
    excluded = {
        "probe_seen_in_training": len(probe_all) - len(probe),
        "general_seen_in_training": len(general_all) - len(general),
    }
    return EvalData(persona_train, heldout, probe, general, load_set("stress_prompts"), excluded)


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
    n = min(spec.eval.classifier_pairs, len(data.persona_train))
    return random.Random(spec.train.seed).sample(data.persona_train, n)


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
    convs = [example_prompt(spec, e, False) for e in exs]
    ev = spec.eval
    plain = cached_answers(
        base_model, tokenizer, convs, fingerprint, ev.max_new_tokens, ev.batch_size, progress
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
    model, tokenizer, conversations: Sequence[list[dict]], fingerprint: str | None = None
) -> float:
    """Conditional perplexity of the assistant turns (see
    :func:`personatune.evaluate.perplexity.conditional_perplexity`, 16 conversations per
    forward pass); nan for none.

    With ``fingerprint`` (the weights' identity, as for the answer cache) the value is
    cached under ``cache_dir() / "perplexity"``, keyed by it, the weights' dtype, the chat
    template and the conversations: the gate's drift perplexities of the base model and
    the published checkpoint are then ``personatune eval``'s."""
    if not conversations:
        return float("nan")
    path = None
    if fingerprint:
        key = {
            "model": fingerprint,
            "dtype": str(next(model.parameters()).dtype),
            "template": tokenizer.chat_template,
            "conversations": list(conversations),
        }
        path = cache_dir() / "perplexity" / f"{digest(key)[:24]}.json"
        if path.is_file():
            return read_json(path)["perplexity"]
    ppl = conditional_perplexity(model, tokenizer, conversations, batch_size=16).perplexity
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_json(path, {"perplexity": ppl})
    return ppl


def cut_answers(answers: Sequence[Answer], tokenizer, max_new_tokens: int) -> list[Answer]:
    """``answers`` as they would read with a budget of ``max_new_tokens`` tokens: an answer
    longer than that is cut to its first ``max_new_tokens`` tokens (re-encoded from its
    text) and marked cut at the limit; shorter ones are unchanged. Greedy decoding makes
    this the answer a shorter budget gives, without generating it again (the report
    card's directness row: the probe within ``eval.probe_max_new_tokens``)."""
    out = []
    for a in answers:
        if a.tokens <= max_new_tokens:
            out.append(a)
            continue
        ids = tokenizer(a.text, add_special_tokens=False)["input_ids"][:max_new_tokens]
        text = tokenizer.decode(ids, skip_special_tokens=True).strip()
        out.append(Answer(text, max_new_tokens, False, "length", a.prompt_tokens))
    return out


def knowledge_failures(
    base: dict,
    tuned: dict,
    probe_tolerance: float,
    mc_tolerance: float | None = None,
) -> list[str]:
    """Why ``tuned`` lost knowledge against ``base``: measures a verbose voice cannot fail
    by itself. Each is ``{"probe_accuracy", "probe_plain_accuracy", "mc_accuracy"}``
    (percent; a key absent from ``base`` is not checked). The probe under the persona's
    system prompt (knowledge budget, answer found anywhere) and without it may drop at
    most ``probe_tolerance`` points; multiple choice by log-likelihood at most
    ``mc_tolerance`` points (None: not checked)."""
    reasons = []
    checks = [
        ("probe_accuracy", "probe", probe_tolerance),
        ("probe_plain_accuracy", "probe without the system prompt", probe_tolerance),
        ("mc_accuracy", "multiple choice (log-likelihood)", mc_tolerance),
    ]
    for key, label, tolerance in checks:
        if tolerance is None or base.get(key) is None:
            continue
        if tuned.get(key) is None:
            reasons.append(f"{label} not measured")
            continue
        drop = base[key] - tuned[key]
        if drop > tolerance + 1e-9:
            reasons.append(
                f"{label} {tuned[key]:.1f}% is {drop:.1f} points below the base model's "
                f"{base[key]:.1f}% (tolerance {tolerance:g})"
            )
    return reasons


def retention_failures(
    base: dict,
    tuned: dict,
    probe_tolerance: float,
    max_drift_ratio: float,
    degeneration_tolerance: float,
    mc_tolerance: float | None = None,
) -> list[str]:
    """Every reason ``tuned`` fails the retention criteria that the gate and the report
    card's targets share (the tolerances are :class:`personatune.config.GuardSettings`'s):
    knowledge (:func:`knowledge_failures`), drift (``tuned["drift_ratio"]`` above
    ``max_drift_ratio``) and degeneration against the base model (``base["degeneration"]``
    and ``tuned["degeneration"]``, :func:`personatune.evaluate.metrics.degeneration_failures`,
    when the base has it). Empty when ``tuned`` passes."""
    reasons = knowledge_failures(base, tuned, probe_tolerance, mc_tolerance)
    drift = tuned.get("drift_ratio")
    if drift is not None and not drift <= max_drift_ratio:
        reasons.append(f"drift ratio {drift:.2f} above {max_drift_ratio:g}")
    if base.get("degeneration"):
        if not tuned.get("degeneration"):
            reasons.append("degeneration not measured")
        else:
            reasons += degeneration_failures(
                base["degeneration"], tuned["degeneration"], degeneration_tolerance
            )
    return reasons
