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
from personatune.evaluate.probe import score_probe, score_stress

FIDELITY, RETENTION, DEGENERATION = "persona fidelity", "capability retention", "degeneration"
#: The answer sets of an evaluation (see :func:`personatune.evaluate.run.answer_sets`).
SETS = ("heldout", "general", "probe", "stress", "drift")


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
    """

    answers: dict[str, list]
    perplexity: dict[str, float]
    references: list[str]
    terms: list[str]
    classifier: object
    probe_items: list[dict]
    stress_items: list[dict]
    benchmarks: dict[str, dict] = field(default_factory=dict)

    def texts(self, sets: Sequence[str]) -> list[str]:
        """The answers' texts of ``sets``, in order."""
        return [a.text for s in sets for a in self.answers.get(s, [])]

    def finished(self, sets: Sequence[str]) -> list[bool]:
        """Per answer of ``sets``: whether it ended its turn before the token limit."""
        return [a.finished for s in sets for a in self.answers.get(s, [])]

    @cached_property
    def adoption(self) -> dict:
        """The classifier's ``{"rate", "score", "proba"}`` on the general prompts."""
        return self.classifier.adoption(self.texts(["general"]))

    @cached_property
    def probe(self) -> dict:
        """:func:`personatune.evaluate.probe.score_probe` of the probe answers."""
        return score_probe(self.texts(["probe"]), self.probe_items)

    @cached_property
    def stress(self) -> dict:
        """:func:`personatune.evaluate.probe.score_stress` of the stress answers."""
        return score_stress(self.texts(["stress"]), self.stress_items)

    def degeneration(self, sets: Sequence[str]) -> dict:
        """:func:`personatune.evaluate.metrics.degeneration` of the answers of ``sets``."""
        return M.degeneration(self.texts(sets), self.finished(sets))


@dataclass(frozen=True)
class Metric:
    """One row of the report card.

    Attributes:
        key: the metric's key in ``report.json``'s ``metrics``.
        inputs: the answer sets it reads (see :data:`SETS`).
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


def _degen(key):
    return lambda s, on: 100 * s.degeneration(on)[key]


_ANSWERED = ("general", "heldout", "stress")
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
    Metric("probe_accuracy", ("probe",), lambda s, on: s.probe["accuracy"], "%", True,
           RETENTION, "factual probe accuracy"),
    Metric("drift_perplexity", ("drift",), lambda s, on: s.perplexity[on[0]], "", False,
           RETENTION, "perplexity on base model's own answers"),
    Metric("stress_pass_rate", ("stress",), lambda s, on: s.stress["pass_rate"], "%", True,
           RETENTION, "stress checks passed"),
    Metric("repetition_rate", _ANSWERED, _degen("repetition_rate"), "%", False, DEGENERATION,
           "repetition rate (seq-rep-4)"),
    Metric("distinct_2", _ANSWERED, _degen("distinct_2"), "%", True, DEGENERATION, "distinct-2"),
    Metric("empty_rate", _ANSWERED, _degen("empty_rate"), "%", False, DEGENERATION,
           "empty answers"),
    Metric("limit_rate", _ANSWERED, _degen("limit_rate"), "%", False, DEGENERATION,
           "answers cut at the token limit"),
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
            "higher_is_better": m.higher_is_better,
            "unit": m.unit,
            "group": m.group,
            "label": m.label,
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
    table = Table(
        "metric",
        "base",
        "tuned",
        "change",
        title=f"{report['persona']}: base vs tuned (greedy, held-out)",
    )
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
    console.print(
        f"[green]wrote {out / 'report.json'} and {out / 'report.html'}[/] "
        f"({report['timings_s']['total']:.0f} s)"
    )
