"""The report card's metric table: one row defines a metric for the computation, the
HTML page and the terminal summary; the probe change is worded the right way round."""

import io
from pathlib import Path

from rich.console import Console

from personatune.evaluate import card
from personatune.evaluate.answers import Answer
from personatune.evaluate.report import render_html


class _Clf:
    def adoption(self, texts):
        rate = sum("arr" in t for t in texts) / len(texts)
        return {"rate": rate, "score": rate, "proba": [0.5] * len(texts)}


def _side(texts: list[str]) -> card.Side:
    answers = {
        s: [Answer(text=t, tokens=3, finished=True) for t in texts]
        for s in ("heldout", "general", "stress")
    }
    for name in ("probe", "probe_plain", "probe_direct"):
        answers[name] = [Answer(text="Paris", tokens=1, finished=True)]
    answers["stress"] = []
    return card.Side(
        answers,
        {"heldout": 3.0, "drift": 2.0},
        ["arr matey"] * len(texts),
        ["arr"],
        _Clf(),
        [{"question": "Capital of France?", "answers": ["Paris"], "category": "geo"}],
        [],
        limits={"probe": 160, "probe_plain": 160, "probe_direct": 48},
    )


def _report(metrics: dict, drop: float) -> dict:
    return {
        "persona": "tiny",
        "description": "",
        "base_model": {"reference": "m"},
        "data": {
            "heldout_examples": 1,
            "general_prompts": 1,
            "probe_questions": 1,
            "probe_seen_in_training": 0,
            "stress_prompts": 0,
        },
        "targets": {"probe_within_tolerance": True},
        "classifier": {
            "method": "logistic regression",
            "cv_folds": 5,
            "cv_error": 0.1,
            "n_persona": 5,
            "n_plain": 5,
        },
        "metrics": metrics,
        "probe_drop_points": drop,
        "drift_ratio": 1.0,
        "answers": {"general": [], "heldout": [], "stress": [], "probe": []},
        "timings_s": {"total": 1.0},
    }


def test_one_row_adds_a_metric_everywhere():
    """Guards against a metric needing edits in several places: a new Metric row is
    computed for both models, keeps its group's place, and shows in the HTML and the
    terminal summary with its label and unit."""
    row = card.Metric(
        "answer_words",
        ("general",),
        lambda s, on: sum(len(t.split()) for t in s.texts(on)) / len(s.texts(on)),
        " words",
        None,
        card.FIDELITY,
        "mean answer length",
    )
    base, tuned = _side(["hello there"]), _side(["arr matey ho"])
    shipped = [m for m in card.METRICS if m.key in ("adoption_rate", "probe_accuracy")]
    metrics = card.score([*shipped, row], base, tuned)
    assert metrics["answer_words"]["base"] == 2 and metrics["answer_words"]["tuned"] == 3
    keys = list(metrics)
    assert keys.index("answer_words") < keys.index("probe_accuracy")  # with its group
    assert metrics["adoption_rate"]["tuned"] == 100 and metrics["adoption_rate"]["base"] == 0
    report = _report(metrics, 0.0)
    assert "mean answer length" in render_html(report, None, b"")
    buf = io.StringIO()
    card.print_summary(report, Path("out"), Console(file=buf, width=200))
    assert "mean answer length" in buf.getvalue() and "3 words" in buf.getvalue()


def test_probe_rise_is_not_called_a_drop():
    """Guards against issue 11's defect 6: the card said "Probe drop -20.2 points" when
    the tuned model's probe accuracy rose by 20.2 points."""
    report = _report({}, -20.2)
    assert card.probe_change(report) == "probe change +20.2 points"
    html = render_html(report, None, b"")
    assert "Probe change +20.2 points" in html and "probe drop" not in html.lower()
    buf = io.StringIO()
    card.print_summary(report, Path("out"), Console(file=buf, width=200))
    assert "probe change +20.2 points" in buf.getvalue()
    assert card.probe_change(_report({}, 3.5)) == "probe change -3.5 points"


def test_summary_prints_degeneration_reasons_and_adoption_by_turn():
    """Guards against a terminal summary that hides why the degeneration target failed
    or the persona's drift over a conversation (issue 13)."""
    report = {
        **_report({}, 0.0),
        "degeneration_failures": ["answers cut at the token limit 100.0% against 4.0%"],
        "conversations": {
            "base": {"adoption_by_turn": [90.0, 40.0]},
            "tuned": {"adoption_by_turn": [100.0, None]},
        },
    }
    buf = io.StringIO()
    card.print_summary(report, Path("out"), Console(file=buf, width=200))
    out = buf.getvalue()
    assert "degeneration: answers cut at the token limit 100.0%" in out
    assert "by conversation turn: base 90 40; tuned 100 -" in out
