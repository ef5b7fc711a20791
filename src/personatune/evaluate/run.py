"""``personatune eval``: the report card of a persona, base against tuned on the same
held-out inputs, greedy and seeded."""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from personatune.config import PersonaSpec
from personatune.data.chat import with_system_prompt
from personatune.data.dataset import load_examples, persona_system_prompt, split_source
from personatune.data.loaders import Example
from personatune.errors import PersonatuneError
from personatune.evaluate import metrics as M
from personatune.evaluate.answers import Answer, cached_answers, inference_copy
from personatune.evaluate.classifier import PersonaClassifier, fit_classifier
from personatune.evaluate.perplexity import conditional_perplexity
from personatune.evaluate.probe import (
    drift_ratio,
    general_split,
    load_set,
    prompt_key,
    score_probe,
    score_stress,
    unseen,
)
from personatune.io import sha256_file

REPORT_FILES = ("report.json", "report.html", "report_loss.png", "report_metrics.png")


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


def eval_data(spec: PersonaSpec) -> EvalData:
    """Split the spec's data as training does and pick the evaluation sets.

    Raises:
        PersonatuneError: bad data files (see :func:`personatune.data.loaders.load_source`).
    """
    loaded = load_examples(spec)
    train_keys = {ex.key() for examples, _ in loaded for ex in examples}
    persona_train, heldout, seen = [], [], set()
    for (examples, _), source in zip(loaded, spec.data):
        train, held = split_source(spec, source, examples, None, train_keys)
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


def progress_bar(console: Console) -> Progress:
    """A rich progress bar with counts and an ETA, shared by evaluation phases."""
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("ETA"),
        TimeRemainingColumn(),
        console=console,
        transient=True,
    )


@contextmanager
def phase(
    bar: Progress, name: str, total: int, timings: dict | None = None, cpu: dict | None = None
):
    """A task on ``bar`` for one phase of work; yields ``advance(n)``. Records the
    phase's wall-clock seconds in ``timings[name]`` and the process's CPU seconds (all
    threads; a measure that does not grow when other jobs share the cores) in
    ``cpu[name]``, and prints one line when it ends if the console is not a terminal
    (logs, CI), where the bar itself is not drawn."""
    task = bar.add_task(name, total=max(total, 1))
    start, start_cpu = time.time(), time.process_time()
    yield lambda n: bar.advance(task, n)
    seconds, cpu_seconds = time.time() - start, time.process_time() - start_cpu
    if timings is not None:
        timings[name] = round(seconds, 1)
    if cpu is not None:
        cpu[name] = round(cpu_seconds, 1)
    bar.remove_task(task)
    if not bar.console.is_terminal:
        bar.console.print(
            f"{name}: {total} done in {seconds:.0f} s ({cpu_seconds:.0f} CPU s)", soft_wrap=True
        )


def _pair(base, tuned, *, higher: bool | None, unit: str, group: str, label: str) -> dict:
    return {
        "base": base,
        "tuned": tuned,
        "higher_is_better": higher,
        "unit": unit,
        "group": group,
        "label": label,
    }


def check_report_target(out_dir: Path, overwrite: bool) -> None:
    """Refuse to replace an existing report without ``overwrite``.

    Raises:
        PersonatuneError: report.json or report.html exists in ``out_dir``.
    """
    for name in REPORT_FILES:
        if (out_dir / name).exists() and not overwrite:
            raise PersonatuneError(
                f"{out_dir / name} already exists; pass --overwrite to replace it"
            )


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
    (the adapter's sha256 for the tuned model) under the personatune cache.

    Persona fidelity on held-out persona examples: conditional perplexity, ROUGE-L,
    BLEU, Jaccard, embedding cosine and persona-term frequency; the persona adoption rate
    on held-out general prompts. Capability retention: factual probe, self-distillation
    drift, stress-prompt checks and multiple-choice benchmarks. Degeneration: repetition,
    distinct-2, empty answers, answers cut at the token limit.

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
    from personatune.evaluate.lmeval import run_benchmark
    from personatune.evaluate.report import write_report
    from personatune.generate import load_persona
    from personatune.models import resolve_ref

    console = console or Console(stderr=True)
    persona_dir = Path(persona_dir)
    out_dir = Path(out_dir) if out_dir else persona_dir
    check_report_target(out_dir, overwrite)
    start, start_cpu = time.time(), time.process_time()
    timings: dict[str, float] = {}
    cpu: dict[str, float] = {}
    with console.status("loading the persona"):
        persona = load_persona(persona_dir)
    spec, tok = persona.spec, persona.tokenizer
    ev = spec.eval
    benches = [(b.task, str(spec.resolve(b.path))) for b in ev.benchmarks] + list(benchmarks)
    data = eval_data(spec)
    if not data.heldout:
        raise PersonatuneError(
            f"{persona_dir}: the persona data has no held-out chat example "
            "to evaluate; set train.eval_split above 0"
        )
    ref = resolve_ref(spec.model.name, spec.model.revision, spec.base_dir)
    base_fp = ref.fingerprint()
    tuned_fp = f"{base_fp}+adapter:{sha256_file(persona_dir / 'adapter_model.safetensors')}"
    base_m = inference_copy(persona.model, merge=False)
    tuned_m = inference_copy(persona.model, merge=True)
    persona.model = None  # the fp32 model is no longer needed

    heldout_prompts = [example_prompt(spec, e) for e in data.heldout]
    refs = [e.messages[-1]["content"] for e in data.heldout]
    sets = {
        "heldout": (heldout_prompts, ev.max_new_tokens),
        "general": ([persona_conv(spec, r["prompt"]) for r in data.general], ev.max_new_tokens),
        "probe": ([persona_conv(spec, r["question"]) for r in data.probe], ev.probe_max_new_tokens),
        "stress": ([persona_conv(spec, r["prompt"]) for r in data.stress], ev.max_new_tokens),
        "drift": ([plain_conv(r["prompt"]) for r in data.general], ev.max_new_tokens),
    }
    answers: dict[str, dict[str, list[Answer]]] = {"base": {}, "tuned": {}}
    with progress_bar(console) as bar:
        n_clf = len(classifier_examples(spec, data))
        with phase(bar, "adoption classifier", n_clf, timings, cpu) as adv:
            clf = fit_adoption_classifier(spec, data, base_m, tok, base_fp, adv)
        for side, model, fp in (("base", base_m, base_fp), ("tuned", tuned_m, tuned_fp)):
            names = [n for n in sets if side == "base" or n != "drift"]
            total = sum(len(sets[n][0]) for n in names)
            with phase(bar, f"{side} answers", total, timings, cpu) as adv:
                for name in names:
                    convs, limit = sets[name]
                    answers[side][name] = cached_answers(
                        model, tok, convs, fp, limit, ev.batch_size, adv
                    )
        drift_convs = drift_conversations(data.general, answers["base"]["drift"])
        heldout_full = [
            with_system_prompt(e.messages, persona_system_prompt(spec, e)) for e in data.heldout
        ]
        with phase(bar, "perplexity", 4, timings, cpu) as adv:
            ppl = {}
            for side, model in (("base", base_m), ("tuned", tuned_m)):
                ppl[side] = {
                    "heldout": perplexity(model, tok, heldout_full),
                    "drift": perplexity(model, tok, drift_convs),
                }
                adv(2)
        bench_results = []
        with phase(bar, "benchmarks", 2 * len(benches), timings, cpu) as adv:
            for task, path in benches:
                b = run_benchmark(base_m, tok, task, path)
                adv(1)
                t = run_benchmark(tuned_m, tok, task, path)
                adv(1)
                bench_results.append({"task": task, "path": path, "base": b, "tuned": t})

    text = {s: {n: [a.text for a in v] for n, v in answers[s].items()} for s in answers}
    t0 = time.time()
    metrics: dict[str, dict] = {}
    pm = {"group": "persona fidelity"}
    metrics["conditional_perplexity"] = _pair(
        ppl["base"]["heldout"],
        ppl["tuned"]["heldout"],
        higher=False,
        unit="",
        label="conditional perplexity (held-out)",
        **pm,
    )
    for key, fn, unit, label in (
        ("rouge_l", M.rouge_l, "", "ROUGE-L F1"),
        ("bleu", M.bleu, "", "BLEU"),
        ("jaccard", M.jaccard, "", "Jaccard word overlap"),
        ("embedding_cosine", M.embedding_cosine, "", "embedding cosine (MiniLM)"),
    ):
        metrics[key] = _pair(
            fn(text["base"]["heldout"], refs),
            fn(text["tuned"]["heldout"], refs),
            higher=True,
            unit=unit,
            label=label,
            **pm,
        )
    terms = spec.persona_terms
    metrics["term_frequency"] = _pair(
        M.term_frequency(text["base"]["general"], terms),
        M.term_frequency(text["tuned"]["general"], terms),
        higher=True,
        unit="%",
        label="persona-term frequency (general prompts)",
        **pm,
    )
    adoption = {s: clf.adoption(text[s]["general"]) for s in ("base", "tuned")}
    metrics["adoption_rate"] = _pair(
        100 * adoption["base"]["rate"],
        100 * adoption["tuned"]["rate"],
        higher=True,
        unit="%",
        label="persona adoption rate (general prompts)",
        **pm,
    )
    probe = {s: score_probe(text[s]["probe"], data.probe) for s in ("base", "tuned")}
    stress = {s: score_stress(text[s]["stress"], data.stress) for s in ("base", "tuned")}
    rm = {"group": "capability retention"}
    metrics["probe_accuracy"] = _pair(
        probe["base"]["accuracy"],
        probe["tuned"]["accuracy"],
        higher=True,
        unit="%",
        label="factual probe accuracy",
        **rm,
    )
    metrics["drift_perplexity"] = _pair(
        ppl["base"]["drift"],
        ppl["tuned"]["drift"],
        higher=False,
        unit="",
        label="perplexity on base model's own answers",
        **rm,
    )
    metrics["stress_pass_rate"] = _pair(
        stress["base"]["pass_rate"],
        stress["tuned"]["pass_rate"],
        higher=True,
        unit="%",
        label="stress checks passed",
        **rm,
    )
    for b in bench_results:
        metrics[f"mc_{b['task']}"] = _pair(
            100 * b["base"]["acc"],
            100 * b["tuned"]["acc"],
            higher=True,
            unit="%",
            label=f"{b['task']} accuracy (lm-eval, {b['base']['n']} items)",
            **rm,
        )
    gen_names = ("general", "heldout", "stress")
    degen = {
        s: M.degeneration(
            [t for n in gen_names for t in text[s][n]],
            [a.finished for n in gen_names for a in answers[s][n]],
        )
        for s in ("base", "tuned")
    }
    for key, label, higher in (
        ("repetition_rate", "repetition rate (seq-rep-4)", False),
        ("distinct_2", "distinct-2", True),
        ("empty_rate", "empty answers", False),
        ("limit_rate", "answers cut at the token limit", False),
    ):
        metrics[key] = _pair(
            100 * degen["base"][key],
            100 * degen["tuned"][key],
            higher=higher,
            unit="%",
            label=label,
            group="degeneration",
        )
    timings["metrics"] = round(time.time() - t0, 1)

    drift = drift_ratio(ppl["tuned"]["drift"], ppl["base"]["drift"])
    drop = probe["base"]["accuracy"] - probe["tuned"]["accuracy"]
    targets = {
        "adoption_rate_at_least_90": metrics["adoption_rate"]["tuned"] >= 90.0,
        "probe_within_tolerance": drop <= spec.guard.probe_tolerance,
        "drift_within_tolerance": drift <= spec.guard.max_drift_ratio,
    }
    manifest = _read_json(persona_dir / "persona.json")
    report = {
        "persona": spec.name,
        "description": spec.description,
        "persona_dir": str(persona_dir.resolve()),
        "base_model": {"reference": spec.model.name, "fingerprint": base_fp},
        "adapter_sha256": tuned_fp.split("adapter:")[1],
        "settings": {
            **spec.eval.model_dump(mode="json"),
            "decoding": "greedy",
            "probe_tolerance": spec.guard.probe_tolerance,
            "max_drift_ratio": spec.guard.max_drift_ratio,
            "dtype": str(next(tuned_m.parameters()).dtype),
        },
        "data": {
            "heldout_examples": len(data.heldout),
            "general_prompts": len(data.general),
            "probe_questions": len(data.probe),
            "stress_prompts": len(data.stress),
            "classifier_pairs": n_clf,
            **data.excluded,
        },
        "classifier": clf.summary(),
        "metrics": metrics,
        "drift_ratio": drift,
        "probe_drop_points": drop,
        "targets": targets,
        "probe_by_category": {s: probe[s]["by_category"] for s in probe},
        "stress_by_kind": {s: stress[s]["by_kind"] for s in stress},
        "benchmarks": bench_results,
        "guard": manifest.get("guard"),
        "training": manifest.get("training"),
        "answers": _answer_tables(data, text, answers, adoption, probe, stress, refs),
        "timings_s": {**timings, "total": round(time.time() - start, 1)},
        "cpu_s": {**cpu, "total": round(time.process_time() - start_cpu, 1)},
    }
    write_report(report, out_dir, persona_dir / "train_log.jsonl")
    return report


def _read_json(path: Path) -> dict:
    import json

    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def _answer_tables(data, text, answers, adoption, probe, stress, refs) -> dict:
    def side(s, name, i):
        return {"text": text[s][name][i], "finished": answers[s][name][i].finished}

    return {
        "general": [
            {
                "prompt": r["prompt"],
                "category": r.get("category"),
                "base": side("base", "general", i),
                "tuned": side("tuned", "general", i),
                "p_persona": [adoption["base"]["proba"][i], adoption["tuned"]["proba"][i]],
            }
            for i, r in enumerate(data.general)
        ],
        "heldout": [
            {
                "prompt": e.messages[-2]["content"],
                "reference": refs[i],
                "base": side("base", "heldout", i),
                "tuned": side("tuned", "heldout", i),
            }
            for i, e in enumerate(data.heldout)
        ],
        "probe": [
            {
                "question": r["question"],
                "answers": r["answers"],
                "category": r.get("category"),
                "base": side("base", "probe", i),
                "tuned": side("tuned", "probe", i),
                "correct": [probe["base"]["correct"][i], probe["tuned"]["correct"][i]],
            }
            for i, r in enumerate(data.probe)
        ],
        "stress": [
            {
                "prompt": r["prompt"],
                "kind": r["kind"],
                "base": side("base", "stress", i),
                "tuned": side("tuned", "stress", i),
                "passed": [stress["base"]["passed"][i], stress["tuned"]["passed"][i]],
            }
            for i, r in enumerate(data.stress)
        ],
    }
