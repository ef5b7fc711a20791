"""``personatune eval``: the report card of a persona, base against tuned on the same
held-out inputs, greedy and seeded; the metric table is :mod:`personatune.evaluate.card`."""

from __future__ import annotations

import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from rich.console import Console
from rich.progress import Progress

from personatune.config import PersonaSpec
from personatune.data.chat import with_system_prompt
from personatune.data.dataset import persona_split, persona_system_prompt
from personatune.engine import Answer, load_persona
from personatune.errors import PersonatuneError
from personatune.evaluate import card
from personatune.evaluate.answers import cached_answer_sets, inference_copy
from personatune.evaluate.conversations import load_conversations, run_conversations
from personatune.evaluate.identity import identity_names, load_identity_prompts
from personatune.evaluate.lmeval import run_benchmark
from personatune.evaluate.metrics import degeneration_failures
from personatune.evaluate.probe import drift_ratio
from personatune.evaluate.progress import phase, progress_bar
from personatune.evaluate.report import PLOTS, write_report
from personatune.evaluate.suite import (
    ADOPTION_TARGET,
    MC_TINY,
    EvalData,
    classifier_examples,
    cut_answers,
    drift_conversations,
    eval_data,
    example_prompt,
    fit_adoption_classifier,
    knowledge_failures,
    perplexity,
    persona_conv,
    plain_conv,
)
from personatune.io import check_replaceable_file, check_writable, sha256_file
from personatune.models import resolve_ref
from personatune.persona import ADAPTER_WEIGHTS, TRAIN_LOG, read_manifest, read_spec

REPORT_FILES = ("report.json", "report.html", *PLOTS)


def check_report_target(out_dir: Path, overwrite: bool, protect: Iterable[Path] = ()) -> None:
    """Refuse to replace an existing report without ``overwrite``; with it, refuse to
    replace report files personatune did not write (a ``report.json`` without the report's
    keys, or report files with no ``report.json`` beside them) or any path in
    ``protect`` (the spec's data). Also refuses an ``out_dir`` that cannot be written.

    Raises:
        PersonatuneError: one line naming the file and the fix.
    """
    report = out_dir / REPORT_FILES[0]
    existing = [out_dir / name for name in REPORT_FILES if (out_dir / name).exists()]
    if existing:
        if not overwrite:
            raise PersonatuneError(f"{existing[0]} already exists; pass --overwrite to replace it")
        for path in existing:
            check_replaceable_file(path, "report", protect)
        if not report.exists():  # the other files are ours only if the report's JSON is
            raise PersonatuneError(
                f"{existing[0]}: not a report that personatune wrote (no {report.name} "
                "beside it); choose another --out folder"
            )
        check_replaceable_file(report, "report", protect, ("persona", "metrics"))
    check_writable(report, "report")


@dataclass
class Models:
    """The two inference copies (see :func:`inference_copy`) and the fingerprints that
    key their answer caches (the tuned one adds the adapter's sha256)."""

    base: object
    tuned: object
    base_fp: str
    tuned_fp: str

    def sides(self) -> tuple[tuple[str, object, str], ...]:
        """``(side, model, fingerprint)`` for the base model, then the tuned one."""
        return (("base", self.base, self.base_fp), ("tuned", self.tuned, self.tuned_fp))


#: Answer sets asked of the base model only, without a system prompt: the drift set's
#: references, and the base model's own answers to the identity questions (the names it
#: gives itself).
BASE_ONLY = ("drift", "identity_plain")


def answer_sets(spec: PersonaSpec, data: EvalData) -> dict[str, tuple[list, int]]:
    """Per answer set, the conversations asked and their token limit; the sets of
    :data:`BASE_ONLY` are asked of the base model only. ``probe`` and ``probe_plain``: the
    factual probe (knowledge budget) with and without the persona's system prompt.
    ``probe_direct`` is not asked: it is ``probe`` cut to the short budget
    (:func:`personatune.evaluate.suite.cut_answers`)."""
    ev = spec.eval
    knowledge = ev.knowledge_max_new_tokens
    identity = [r["prompt"] for r in load_identity_prompts()]
    return {
        "heldout": ([example_prompt(spec, e) for e in data.heldout], ev.max_new_tokens),
        "general": ([persona_conv(spec, r["prompt"]) for r in data.general], ev.max_new_tokens),
        "probe": ([persona_conv(spec, r["question"]) for r in data.probe], knowledge),
        "probe_plain": ([plain_conv(r["question"]) for r in data.probe], knowledge),
        "stress": ([persona_conv(spec, r["prompt"]) for r in data.stress], ev.max_new_tokens),
        "identity": ([persona_conv(spec, p) for p in identity], ev.max_new_tokens),
        "identity_plain": ([plain_conv(p) for p in identity], ev.max_new_tokens),
        "drift": ([plain_conv(r["prompt"]) for r in data.general], ev.max_new_tokens),
    }


def evaluate(
    persona_dir: str | Path,
    *,
    out_dir: str | Path | None = None,
    overwrite: bool = False,
    benchmarks: Sequence[tuple[str, str]] = (),
    console: Console | None = None,
) -> dict:
    """Evaluate a persona against its base model and write ``report.json`` and
    ``report.html``.

    Both models answer the same inputs greedily (bf16 where the device computes it
    natively; see :func:`personatune.evaluate.answers.inference_copy`), in fixed
    batches, so two runs give the same numbers. Answers are cached by model fingerprint
    (the adapter's sha256 for the tuned model) under the personatune cache. The held-out
    examples are the ones recorded at training time (``heldout.jsonl``); a note is
    printed when the data files changed since, or when the directory has no record.

    The metrics are the rows of :data:`personatune.evaluate.card.METRICS`, plus one per
    multiple-choice benchmark.

    Args:
        persona_dir: a persona directory from ``personatune train``.
        out_dir: where the report goes; default ``persona_dir``.
        overwrite: replace an existing report.
        benchmarks: extra ``(task, path)`` multiple-choice benchmarks, after the spec's
            ``eval.benchmarks``.

    Returns:
        The report (as written to report.json).

    Raises:
        PersonatuneError: not a persona directory, an existing report without
            ``overwrite``, bad data, or a bad benchmark.
    """
    console = console or Console(stderr=True)
    persona_dir = Path(persona_dir)
    out_dir = Path(out_dir) if out_dir else persona_dir
    check_report_target(out_dir, overwrite, read_spec(persona_dir).input_paths)
    start, start_cpu = time.time(), time.process_time()
    timings: dict[str, float] = {}
    cpu: dict[str, float] = {}
    with console.status("loading the persona"):
        persona = load_persona(persona_dir)
    spec, tok = persona.spec, persona.tokenizer
    data, split_notes = _eval_inputs(spec, persona_dir, console)
    benches = [(b.task, str(spec.resolve(b.path))) for b in spec.eval.benchmarks]
    benches += list(benchmarks)
    if spec.guard.mc_tolerance is not None and MC_TINY[0] not in {t for t, _ in benches}:
        benches.append(MC_TINY)  # the gate's knowledge measure, shown as the card's row
    models = _inference_models(persona, persona_dir)
    sets = answer_sets(spec, data)
    with progress_bar(console) as bar:
        n_clf = len(classifier_examples(spec, data))
        with phase(bar, "adoption classifier", n_clf, timings, cpu) as adv:
            clf = fit_adoption_classifier(spec, data, models.base, tok, models.base_fp, adv)
        answers = _answer(bar, models, tok, sets, spec.eval.batch_size, timings, cpu)
        convs = _conversations(bar, spec, models, tok, timings, cpu)
        ppl = _perplexities(bar, spec, models, tok, data, answers, timings, cpu)
        bench_results = _benchmarks(bar, models, tok, benches, timings, cpu)

    t0 = time.time()
    limits = {name: limit for name, (_, limit) in sets.items()}
    limits["probe_direct"] = spec.eval.probe_max_new_tokens
    for side in ("base", "tuned"):
        answers[side]["probe_direct"] = cut_answers(
            answers[side]["probe"], tok, spec.eval.probe_max_new_tokens
        )
    names = identity_names(
        models.base.config, tok, [a.text for a in answers["base"]["identity_plain"]]
    )
    sides = {
        side: card.Side(
            answers[side],
            ppl[side],
            [e.messages[-1]["content"] for e in data.heldout],
            spec.persona_terms,
            clf,
            data.probe,
            data.stress,
            {b["task"]: b[side] for b in bench_results},
            limits,
            names["names"],
            convs[side],
            convs["items"],
        )
        for side in ("base", "tuned")
    }
    rows = [
        *card.METRICS,
        *(card.benchmark_metric(b["task"], b["base"]["n"]) for b in bench_results),
    ]
    metrics = card.score(rows, sides["base"], sides["tuned"])
    timings["metrics"] = round(time.time() - t0, 1)
    report = _report(spec, persona_dir, data, models, clf, metrics, sides, bench_results)
    report["data"].update(classifier_pairs=n_clf, split_notes=split_notes)
    report["identity"] = {"base_names": names["names"], "sources": names["sources"]}
    report["timings_s"] = {**timings, "total": round(time.time() - start, 1)}
    report["cpu_s"] = {**cpu, "total": round(time.process_time() - start_cpu, 1)}
    write_report(report, out_dir, persona_dir / TRAIN_LOG)
    return report


def _eval_inputs(spec: PersonaSpec, persona_dir: Path, console: Console) -> tuple[EvalData, list]:
    split = persona_split(spec, persona_dir)
    for note in split.notes:
        console.print(f"[yellow]note: {note}[/]")
    data = eval_data(spec, split)
    if not data.heldout:
        raise PersonatuneError(
            f"{persona_dir}: the persona data has no held-out chat example "
            "to evaluate; set train.eval_split above 0"
        )
    return data, split.notes


def _inference_models(persona, persona_dir: Path) -> Models:
    spec = persona.spec
    base_fp = resolve_ref(spec.model.name, spec.model.revision, spec.base_dir).fingerprint()
    tuned_fp = f"{base_fp}+adapter:{sha256_file(persona_dir / ADAPTER_WEIGHTS)}"
    models = Models(
        inference_copy(persona.model, merge=False),
        inference_copy(persona.model, merge=True),
        base_fp,
        tuned_fp,
    )
    persona.model = None  # the fp32 model is no longer needed
    return models


def _answer(bar: Progress, models: Models, tok, sets, batch_size, timings, cpu) -> dict:
    answers: dict[str, dict[str, list[Answer]]] = {"base": {}, "tuned": {}}
    for side, model, fp in models.sides():
        names = [n for n in sets if side == "base" or n not in BASE_ONLY]
        total = sum(len(sets[n][0]) for n in names)
        with phase(bar, f"{side} answers", total, timings, cpu) as adv:
            # one engine run for every set: their batches are shared
            got = cached_answer_sets(model, tok, [sets[n] for n in names], fp, batch_size, adv)
            answers[side] = dict(zip(names, got))
    return answers


def _conversations(bar: Progress, spec, models: Models, tok, timings, cpu) -> dict:
    """Both models' answers to the scripted conversations under the persona's system
    prompt, turn by turn (:func:`run_conversations`), and the conversations asked."""
    items = load_conversations()
    out: dict = {"items": items}
    total = 2 * sum(len(c["turns"]) for c in items)
    with phase(bar, "conversations", total, timings, cpu) as adv:
        for side, model, fp in models.sides():
            out[side] = run_conversations(
                model, tok, items, spec.system_prompt, fp, spec.eval.max_new_tokens,
                spec.eval.batch_size, adv,
            )  # fmt: skip
    return out


def _perplexities(bar, spec, models: Models, tok, data: EvalData, answers, timings, cpu) -> dict:
    """Per side, conditional perplexity of the held-out references (under the persona's
    system prompt, as trained) and of the base model's own answers (drift)."""
    drift_convs = drift_conversations(data.general, answers["base"]["drift"])
    heldout_full = [
        with_system_prompt(e.messages, persona_system_prompt(spec, e)) for e in data.heldout
    ]
    ppl = {}
    with phase(bar, "perplexity", 4, timings, cpu) as adv:
        for side, model, fp in models.sides():
            ppl[side] = {
                "heldout": perplexity(model, tok, heldout_full, fingerprint=fp),
                "drift": perplexity(model, tok, drift_convs, fingerprint=fp),
            }
            adv(2)
    return ppl


def _benchmarks(bar, models: Models, tok, benches, timings, cpu) -> list[dict]:
    results = []
    with phase(bar, "benchmarks", 2 * len(benches), timings, cpu) as adv:
        for task, path in benches:
            b = run_benchmark(models.base, tok, task, path)
            adv(1)
            t = run_benchmark(models.tuned, tok, task, path)
            adv(1)
            results.append({"task": task, "path": path, "base": b, "tuned": t})
    return results


def targets(spec: PersonaSpec, metrics: dict, drift: float, degeneration: list[str]) -> dict:
    """The report card's pass/fail targets, the gate's criteria on the whole sets:
    adoption at least 90%; ROUGE-L on the held-out references above the base model's
    given the same system prompt (the adapter beats prompting); knowledge (the probe with
    the knowledge budget, with and without the system prompt) within
    ``guard.probe_tolerance`` points of the base model; drift within
    ``guard.max_drift_ratio``; degeneration within ``guard.degeneration_tolerance`` points
    of the base model (``degeneration`` is the :func:`degeneration_failures` reasons, empty
    when within); the shipped multiple choice (``mc_mc_tiny``, when scored) within
    ``guard.mc_tolerance``."""
    g = spec.guard
    mc = f"mc_{MC_TINY[0]}"

    def side(s):
        out = {k: metrics[k][s] for k in ("probe_accuracy", "probe_plain_accuracy")}
        return {**out, "mc_accuracy": metrics[mc][s]} if mc in metrics else out

    return {
        "adoption_rate_at_least_90": metrics["adoption_rate"]["tuned"] >= 100 * ADOPTION_TARGET,
        # a persona adapter must beat the base model given the same system prompt
        "beats_prompting_rouge_l": metrics["rouge_l"]["tuned"] > metrics["rouge_l"]["base"],
        "probe_within_tolerance": not knowledge_failures(
            side("base"), side("tuned"), g.probe_tolerance, g.mc_tolerance
        ),
        "drift_within_tolerance": drift <= g.max_drift_ratio,
        "degeneration_within_tolerance": not degeneration,
    }


def _report(spec, persona_dir, data, models: Models, clf, metrics, sides, bench_results) -> dict:
    base, tuned = sides["base"], sides["tuned"]
    drift = drift_ratio(tuned.perplexity["drift"], base.perplexity["drift"])
    degeneration = {s: sides[s].degeneration(card.DEGENERATION_SETS) for s in sides}
    failures = degeneration_failures(
        degeneration["base"], degeneration["tuned"], spec.guard.degeneration_tolerance
    )
    manifest = read_manifest(persona_dir)
    return {
        "persona": spec.name,
        "description": spec.description,
        "persona_dir": str(persona_dir.resolve()),
        "base_model": {"reference": spec.model.name, "fingerprint": models.base_fp},
        "adapter_sha256": models.tuned_fp.split("adapter:")[1],
        "settings": {
            **spec.eval.model_dump(mode="json"),
            "decoding": "greedy",
            "probe_tolerance": spec.guard.probe_tolerance,
            "max_drift_ratio": spec.guard.max_drift_ratio,
            "degeneration_tolerance": spec.guard.degeneration_tolerance,
            "dtype": str(next(models.tuned.parameters()).dtype),
        },
        "data": {
            "heldout_examples": len(data.heldout),
            "general_prompts": len(data.general),
            "probe_questions": len(data.probe),
            "stress_prompts": len(data.stress),
            "identity_prompts": len(sides["base"].answers["identity"]),
            "conversations": len(sides["base"].conversation_items),
            **data.excluded,
        },
        "classifier": clf.summary(),
        "metrics": metrics,
        "drift_ratio": drift,
        "probe_drop_points": base.probe["accuracy"] - tuned.probe["accuracy"],
        "degeneration": degeneration,
        "degeneration_failures": failures,
        "conversations": {s: _turn_summary(sides[s]) for s in sides},
        "targets": targets(spec, metrics, drift, failures),
        "probe_by_category": {s: sides[s].probe["by_category"] for s in sides},
        "stress_by_kind": {s: sides[s].stress["by_kind"] for s in sides},
        "benchmarks": bench_results,
        "guard": manifest.get("guard"),
        "training": manifest.get("training"),
        "answers": _answer_tables(data, sides),
    }


def _turn_summary(side: card.Side) -> dict:
    return {k: side.turns[k] for k in ("adoption_by_turn", "correct_by_turn", "questions_by_turn")}


def _answer_tables(data: EvalData, sides: dict[str, card.Side]) -> dict:
    def answers(name: str, i: int) -> dict:  # both models' answers, as "base" and "tuned"
        return {s: _answer_json(sides[s].answers[name][i]) for s in sides}

    def both(get) -> list:  # [base value, tuned value]
        return [get(sides["base"]), get(sides["tuned"])]

    return {
        "general": [
            {
                "prompt": r["prompt"],
                "category": r.get("category"),
                **answers("general", i),
                "p_persona": both(lambda s: s.adoption["proba"][i]),
            }
            for i, r in enumerate(data.general)
        ],
        "heldout": [
            {
                "prompt": e.messages[-2]["content"],
                "reference": sides["base"].references[i],
                **answers("heldout", i),
            }
            for i, e in enumerate(data.heldout)
        ],
        "probe": [
            {
                "question": r["question"],
                "answers": r["answers"],
                "category": r.get("category"),
                **answers("probe", i),
                "correct": both(lambda s: s.probe["correct"][i]),
            }
            for i, r in enumerate(data.probe)
        ],
        "identity": [
            {
                "prompt": r["prompt"],
                "category": r.get("category"),
                **answers("identity", i),
                "held": both(lambda s: s.identity["held"][i]),
            }
            for i, r in enumerate(load_identity_prompts())
        ],
        "conversations": [
            {
                "prompt": f"{c['id']} turn {t + 1}: {turn['prompt']}",
                "kind": turn["kind"],
                **{s: _answer_json(sides[s].conversations[ci][t]) for s in sides},
                "in_persona": both(lambda s: s.turns["in_persona"][ci][t]),
            }
            for ci, c in enumerate(sides["base"].conversation_items)
            for t, turn in enumerate(c["turns"])
        ],
        "stress": [
            {
                "prompt": r["prompt"],
                "kind": r["kind"],
                **answers("stress", i),
                "passed": both(lambda s: s.stress["passed"][i]),
            }
            for i, r in enumerate(data.stress)
        ],
    }


def _answer_json(a: Answer) -> dict:
    return {"text": a.text, "finished": a.finished}
