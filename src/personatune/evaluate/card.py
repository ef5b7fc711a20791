"""The report card's metrics as one table of definitions: what each metric computes, on
which answer set, its unit and direction, its group and label. The computation
(:func:`score`), the HTML page (:mod:`personatune.evaluate.report`) and the terminal
summary (:func:`print_summary`) all read it, so a new metric is one row of
:data:`METRICS`."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import cached_property

from rich.console import Console
from rich.table import Table

from personatune.evaluate import metrics as M
from personatune.evaluate.conversations import score_conversations
from personatune.evaluate.identity import score_identity
from personatune.evaluate.probe import score_probe, score_stress

FIDELITY, RETENTION, DEGENERATION = "persona fidelity", "capability retention", "degeneration"
HOLDING = "identity and long conversations"
#: The answer sets degeneration is measured on, as the gate measures it: the factual
#: probe with the knowledge budget (``eval.knowledge_max_new_tokens``), with and without
#: the persona's system prompt, where a verbose voice has room to end its turn.
DEGENERATION_SETS = ("probe", "probe_plain")


@dataclass
class Side:
    """What one model (base or tuned) produced, as the metric functions read it.

    Attributes:
        answers: per answer set, the model's greedy answers (``Answer`` objects).
        perplexity: per set (``heldout``, ``drift``), conditional perplexity of the
            reference (held-out) or base-model (drift) answers under this model.
        references: the held-out examples' reference answers, in ``heldout`` order.
        terms: the spec's ``persona_terms``.
        classifier: the fitted adoption classifier.
        probe_items, stress_items: the probe questions and stress prompts asked.
        benchmarks: per multiple-choice task, lm-eval's ``{"acc", "n"}``.
        limits: per answer set, the token limit its answers were made with.
        identity_names: the base model's names and makers (see
            :func:`personatune.evaluate.identity.identity_names`).
        conversations: ``(conversations, turns)`` answers to the scripted conversations.
        conversation_items: the scripted conversations asked.
    """

    answers: dict[str, list]
    perplexity: dict[str, float]
    references: list[str]
    terms: list[str]
    classifier: object
    probe_items: list[dict]
    stress_items: list[dict]
    benchmarks: dict[str, dict] = field(default_factory=dict)
    limits: dict[str, int] = field(default_factory=dict)
    identity_names: list[str] = field(default_factory=list)
    conversations: list[list] = field(default_factory=list)
    conversation_items: list[dict] = field(default_factory=list)

    def texts(self, sets: Sequence[str]) -> list[str]:
        """The answers' texts of ``sets``, in order."""
        return [a.text for s in sets for a in self.answers.get(s, [])]

    @cached_property
    def adoption(self) -> dict:
        """The classifier's ``{"rate", "score", "proba"}`` on the general prompts."""
        return self.classifier.adoption(self.texts(["general"]))

    @cached_property
    def probe(self) -> dict:
        """:func:`personatune.evaluate.probe.score_probe` of the probe answers."""
        return score_probe(self.texts(["probe"]), self.probe_items)

    @cached_property
    def identity(self) -> dict:
        """:func:`personatune.evaluate.identity.score_identity` of the identity answers."""
        texts = self.texts(["identity"])
        proba = self.classifier.adoption(texts)["proba"] if texts else []
        return score_identity(texts, proba, self.identity_names)

    @cached_property
    def turns(self) -> dict:
        """:func:`personatune.evaluate.conversations.score_conversations` of the
        conversations."""
        return score_conversations(self.conversations, self.conversation_items, self.classifier)

    @cached_property
    def stress(self) -> dict:
        """:func:`personatune.evaluate.probe.score_stress` of the stress answers."""
        return score_stress(self.texts(["stress"]), self.stress_items)

    def degeneration(self, sets: Sequence[str]) -> dict:
        """:func:`personatune.evaluate.metrics.answer_degeneration` of the answers of
        ``sets``, each against its own token limit."""
        return M.answer_degeneration([(self.answers.get(s, []), self.limits[s]) for s in sets])


@dataclass(frozen=True)
class Metric:
    """One row of the report card.

    Attributes:
        key: the metric's key in ``report.json``'s ``metrics``.
        inputs: the answer sets it reads (see :func:`personatune.evaluate.run.answer_sets`;
            ``conversations`` is the scripted conversations).
        compute: ``compute(side, inputs)`` -> the value for one model.
        unit: printed after the value (``%`` or nothing).
        higher_is_better: direction of a good change; None when neither.
        group: the section it is shown in.
        label: its name in the HTML and the terminal.
    """

    key: str
    inputs: tuple[str, ...]
    compute: Callable[[Side, tuple[str, ...]], float]
    unit: str
    higher_is_better: bool | None
    group: str
    label: str


def _pairwise(fn):  # a metric against the held-out references (metrics.py's signature)
    return lambda s, on: fn(s.texts(on), s.references)


def _probe_accuracy(s, on):  # score_probe of the probe's answers in the set ``on``
    return score_probe(s.texts(on), s.probe_items)["accuracy"]


def _degen(key):
    return lambda s, on: 100 * s.degeneration(on)[key]


def _turn(key, index):
    def compute(s, on):
        by_turn = s.turns[key]
        v = by_turn[index] if index < len(by_turn) else None
        return float("nan") if v is None else v

    return compute


_ANSWERED = ("general", "heldout", "stress")
_DEG = DEGENERATION_SETS
#: The report card. Sources of the formulas are in :mod:`personatune.evaluate.metrics`,
#: :mod:`personatune.evaluate.probe` and :mod:`personatune.evaluate.classifier`.
METRICS: tuple[Metric, ...] = (
    Metric("conditional_perplexity", ("heldout",), lambda s, on: s.perplexity[on[0]], "", False,
           FIDELITY, "conditional perplexity (held-out)"),
    Metric("rouge_l", ("heldout",), _pairwise(M.rouge_l), "", True, FIDELITY, "ROUGE-L F1"),
    Metric("bleu", ("heldout",), _pairwise(M.bleu), "", True, FIDELITY, "BLEU"),
    Metric("jaccard", ("heldout",), _pairwise(M.jaccard), "", True, FIDELITY,
           "Jaccard word overlap"),
    Metric("embedding_cosine", ("heldout",), _pairwise(M.embedding_cosine), "", True, FIDELITY,
           "embedding cosine (MiniLM)"),
    Metric("term_frequency", ("general",), lambda s, on: M.term_frequency(s.texts(on), s.terms),
           "%", True, FIDELITY, "persona-term frequency (general prompts)"),
    Metric("adoption_rate", ("general",), lambda s, on: 100 * s.adoption["rate"], "%", True,
           FIDELITY, "persona adoption rate (general prompts)"),
    Metric("identity_in_persona", ("identity",), lambda s, on: s.identity["in_persona"], "%",
           True, HOLDING, "identity questions answered in persona, not as the base model"),
    Metric("identity_claims_base", ("identity",), lambda s, on: s.identity["claims_base"], "%",
           False, HOLDING, "identity answers claiming the base model's name or maker"),
    Metric("conversation_adoption_turn_1", ("conversations",), _turn("adoption_by_turn", 0),
           "%", True, HOLDING, "persona adoption at turn 1 of 8 (scripted conversations)"),
    Metric("conversation_adoption_turn_8", ("conversations",), _turn("adoption_by_turn", 7),
           "%", True, HOLDING, "persona adoption at turn 8 of 8"),
    Metric("conversation_correct_turn_1", ("conversations",), _turn("correct_by_turn", 0),
           "%", True, HOLDING, "questions answered correctly at turn 1 of 8"),
    Metric("conversation_correct_turn_8", ("conversations",), _turn("correct_by_turn", 7),
           "%", True, HOLDING, "questions answered correctly at turn 8 of 8"),
    Metric("probe_accuracy", ("probe",), lambda s, on: s.probe["accuracy"], "%", True,
           RETENTION, "factual probe accuracy (knowledge budget, answer found anywhere)"),
    Metric("probe_plain_accuracy", ("probe_plain",), _probe_accuracy, "%", True, RETENTION,
           "factual probe accuracy without the system prompt"),
    Metric("drift_perplexity", ("drift",), lambda s, on: s.perplexity[on[0]], "", False,
           RETENTION, "perplexity on base model's own answers"),
    Metric("stress_pass_rate", ("stress",), lambda s, on: s.stress["pass_rate"], "%", True,
           RETENTION, "stress checks passed"),
    Metric("probe_direct_accuracy", ("probe_direct",), _probe_accuracy, "%", True, RETENTION,
           "directness: probe answered within the short budget (style, not gated)"),
    Metric("empty_rate", _DEG, _degen("empty"), "%", False, DEGENERATION,
           "empty answers (probe, knowledge budget)"),
    Metric("limit_rate", _DEG, _degen("cut"), "%", False, DEGENERATION,
           "answers cut at the token limit (probe, knowledge budget)"),
    Metric("repetition_rate", _DEG, _degen("repetitive"), "%", False, DEGENERATION,
           f"repetition loops (seq-rep-4 above {M.REPETITIVE_SEQ_REP:g})"),
    Metric("end_of_turn_rate", _DEG, _degen("end_of_turn"), "%", True, DEGENERATION,
           "answers ending with the end-of-turn token"),
    Metric("distinct_2", _ANSWERED, lambda s, on: 100 * M.distinct_n(s.texts(on), 2), "%", True,
           DEGENERATION, "distinct-2 (general, held-out, stress)"),
)  # fmt: skip


def benchmark_metric(task: str, n_items: int) -> Metric:
    """The row of a multiple-choice benchmark (lm-eval accuracy, in percent), shown after
    the capability-retention rows."""
    return Metric(
        f"mc_{task}",
        (),
        lambda s, on: 100 * s.benchmarks[task]["acc"],
        "%",
        True,
        RETENTION,
        f"{task} accuracy (lm-eval, {n_items} items)",
    )


def score(metrics: Sequence[Metric], base: Side, tuned: Side) -> dict[str, dict]:
    """Compute every metric for both models, in group order (the order rows were given
    within a group). Returns ``{key: {"base", "tuned", "higher_is_better", "unit",
    "group", "label", "inputs"}}``, as ``report.json`` stores it."""
    groups = list(dict.fromkeys(m.group for m in metrics))
    out = {}
    for m in sorted(metrics, key=lambda m: groups.index(m.group)):
        out[m.key] = {
            "base": m.compute(base, m.inputs),
            "tuned": m.compute(tuned, m.inputs),
            **{k: getattr(m, k) for k in ("higher_is_better", "unit", "group", "label")},
            "inputs": list(m.inputs),
        }
    return out


def probe_change(report: dict) -> str:
    """``probe change +20.2 points``: the tuned model's probe accuracy minus the base
    model's (a rise is positive; ``probe_drop_points`` in the report is the opposite)."""
    return f"probe change {-report['probe_drop_points']:+.1f} points"


def print_summary(report: dict, out, console: Console) -> None:
    """The compact summary of ``personatune eval``: each metric with base, tuned and the
    change, green where it moved the right way; the classifier; the targets."""
    title = f"{report['persona']}: base vs tuned (greedy, held-out)"
    table = Table("metric", "base", "tuned", "change", title=title)
    group = None
    for m in report["metrics"].values():
        if m["group"] != group:
            group = m["group"]
            table.add_row(f"[bold]{group}[/]", "", "", "")
        b, t, unit = m["base"], m["tuned"], m["unit"]
        delta = t - b
        good = m["higher_is_better"] is None or delta == 0 or (delta > 0) == m["higher_is_better"]
        table.add_row(
            f"  {m['label']}",
            f"{b:.3g}{unit}",
            f"{t:.3g}{unit}",
            f"[{'green' if good else 'red'}]{delta:+.3g}[/]",
        )
    console.print(table)
    clf = report["classifier"]
    console.print(
        f"adoption classifier: {clf['cv_folds']}-fold CV error "
        f"{100 * clf['cv_error']:.1f}% ({clf['n_persona']} + {clf['n_plain']} answers); "
        f"{probe_change(report)}, drift ratio {report['drift_ratio']:.2f}"
    )
    for name, ok in report["targets"].items():
        console.print(f"  {'[green]pass[/]' if ok else '[red]FAIL[/]'}  {name}")
    for reason in report.get("degeneration_failures") or []:
        console.print(f"  [red]degeneration:[/] {reason}")
    if report["targets"].get("beats_prompting_rouge_l") is False:
        r = report["metrics"]["rouge_l"]
        console.print(
            f"  [red]the adapter does not beat prompting[/]: ROUGE-L {r['tuned']:.3f} against "
            f"{r['base']:.3f} for the base model with the same system prompt; train more "
            "steps (train.epochs), at a higher learning rate or rank (lora.r), or on more "
            "persona data"
        )
    conv = report.get("conversations")
    if conv and conv["base"]["adoption_by_turn"]:
        turns = {
            s: " ".join("-" if v is None else f"{v:.0f}" for v in conv[s]["adoption_by_turn"])
            for s in ("base", "tuned")
        }
        console.print(
            f"persona adoption % by conversation turn: base {turns['base']}; tuned {turns['tuned']}"
        )
    console.print(
        f"[green]wrote {out / 'report.json'} and {out / 'report.html'}[/] "
        f"({report['timings_s']['total']:.0f} s)"
    )
