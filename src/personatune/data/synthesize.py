"""``personatune data synthesize``: persona training data from a description alone.

Prompts come from the spec's ``prompts:`` file or the shipped pool
(``evaluate/data/synth_prompts.jsonl``, disjoint from every evaluation set). A teacher
answers each prompt twice: under the persona's system prompt (the candidate) and without
it (the plain-voice contrast). The teacher is the base model itself by default, which is
context distillation (Askell et al. 2021, "A General Language Assistant as a Laboratory
for Alignment", section 3.4): the tuned model then keeps the persona without the prompt.
Any OpenAI-compatible endpoint can teach instead (``--teacher URL``).

A candidate is kept only when three checks agree:

* adoption: the adoption classifier (:mod:`personatune.evaluate.classifier`), fitted on
  these candidates against the plain answers, puts it in persona with P >= 0.5, judged
  out of fold (cross-validated) so no answer grades itself;
* persona terms: it uses at least one of the spec's ``persona_terms`` (when it has any);
* degeneration: not empty, ended its turn before the token limit, no repetition loop
  (:func:`personatune.evaluate.metrics.seq_rep_n` at most
  :data:`~personatune.evaluate.metrics.REPETITIVE_SEQ_REP`).

Then exact and near duplicates (MiniLM cosine >= :data:`NEAR_DUPLICATE`) are dropped.
"""

from __future__ import annotations

import random
import re
from collections import Counter
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import numpy as np

from personatune.config import PersonaSpec
from personatune.errors import PersonatuneError
from personatune.io import building, check_replaceable, read_jsonl, write_json, write_jsonl

#: Cosine similarity of MiniLM embeddings at or above which two answers are near
#: duplicates: paraphrases of one canned answer score above it, different answers to
#: different questions well below (0.3 to 0.6 on the pirate data).
NEAR_DUPLICATE = 0.92
#: The files of an output folder (``--overwrite`` replaces only such a folder).
SIGNATURE = ("synth.jsonl", "report.json")


@dataclass
class Reply:
    """A teacher's answer to one conversation.

    Attributes:
        text: the answer, stripped.
        tokens: generated tokens (the end-of-turn token included when emitted).
        finish: ``stop`` (the model ended its turn or hit a stop sequence) or ``length``
            (the token limit cut it).
    """

    text: str
    tokens: int
    finish: str


@dataclass
class Teacher:
    """Who answers: ``answer(conversations) -> [Reply]``, one reply per conversation
    (``[{"role", "content"}, ...]`` ending with a user turn), and ``name`` for the
    provenance of each row."""

    answer: Callable[[list[list[dict]]], list[Reply]]
    name: str


def pick_teacher(
    spec: PersonaSpec,
    url: str | None = None,
    model: str | None = None,
    api_key: str | None = None,
    max_tokens: int = 128,
) -> Teacher:
    """The teacher ``--teacher URL --teacher-model NAME`` names, else the spec's base model.

    Raises:
        PersonatuneError: ``url`` without ``model``, or the base model cannot be loaded.
    """
    if url and not model:
        raise PersonatuneError("--teacher needs --teacher-model (the model name to ask for)")
    if url:
        return Teacher(
            http_teacher(url, model, api_key=api_key, max_tokens=max_tokens), f"{model} at {url}"
        )
    return Teacher(
        engine_teacher(spec, max_tokens),
        f"{spec.model.name} (base model) under the persona's system prompt",
    )


def read_prompts(spec: PersonaSpec) -> tuple[list[str], str]:
    """The prompts to answer and where they came from: the spec's ``prompts:`` file (a
    JSONL of ``{"prompt"}`` or a text file of one prompt per line) or the shipped pool.

    Raises:
        PersonatuneError: the file is missing, unreadable, or holds no prompt.
    """
    if not spec.prompts:
        path = resources.files("personatune.evaluate") / "data" / "synth_prompts.jsonl"
        return [r["prompt"] for r in read_jsonl(Path(str(path)))], "shipped:synth_prompts.jsonl"
    path = spec.resolve(spec.prompts)
    if path.suffix == ".jsonl":
        rows = read_jsonl(path)
        for i, r in enumerate(rows, 1):
            if not isinstance(r, dict) or not str(r.get("prompt", "")).strip():
                raise PersonatuneError(f"{path}:row {i}: needs a non-empty 'prompt' field")
        prompts = [r["prompt"].strip() for r in rows]
    else:
        from personatune.io import read_text

        prompts = [line.strip() for line in read_text(path).splitlines() if line.strip()]
    if not prompts:
        raise PersonatuneError(f"{path}: no prompts; add one per line (or JSONL 'prompt')")
    return prompts, str(path)


def http_teacher(
    url: str,
    model: str,
    *,
    api_key: str | None = None,
    max_tokens: int = 128,
    timeout: float = 300.0,
) -> Callable[[list[list[dict]]], list[Reply]]:
    """Answers from an OpenAI-compatible ``POST {url}/chat/completions`` (llama.cpp,
    vLLM, ``personatune serve``...), greedy, 4 requests at a time. ``url`` is the API base
    (``http://host:8000/v1``); ``timeout`` is per request, in seconds (default 300).

    Raises (when called):
        PersonatuneError: the endpoint cannot be reached or answers with an error; the
            message names ``--teacher`` and the server's own error message.
    """
    import httpx

    base = url.rstrip("/")
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}

    def one(client, messages: list[dict]) -> Reply:
        body = {
            "model": model,
            "messages": messages,
            "max_tokens": max_tokens,
            "temperature": 0.0,
            "seed": 0,
        }
        try:
            r = client.post(f"{base}/chat/completions", json=body, headers=headers)
        except httpx.HTTPError as e:
            raise PersonatuneError(f"--teacher {url}: cannot reach it ({e})") from None
        if r.status_code != 200:
            try:
                msg = r.json()["error"]["message"]
            except (ValueError, KeyError, TypeError):
                msg = r.text[:200]
            raise PersonatuneError(f"--teacher {url}: HTTP {r.status_code}: {msg}")
        choice, usage = r.json()["choices"][0], r.json().get("usage") or {}
        return Reply(
            (choice["message"].get("content") or "").strip(),
            int(usage.get("completion_tokens", 0)),
            "length" if choice.get("finish_reason") == "length" else "stop",
        )

    def teach(conversations: list[list[dict]]) -> list[Reply]:
        with httpx.Client(timeout=timeout) as client, ThreadPoolExecutor(4) as pool:
            return list(pool.map(lambda c: one(client, c), conversations))

    return teach


def engine_teacher(
    spec: PersonaSpec, max_tokens: int = 128, batch_size: int = 64
) -> Callable[[list[list[dict]]], list[Reply]]:
    """Answers from the spec's base model (greedy, through the generation engine's
    continuous batching; ``batch_size`` rows decoded together), in bf16 where
    :func:`personatune.models.use_bf16` measured it faster (as ``personatune eval``).

    Raises:
        PersonatuneError: the base model cannot be loaded.
    """
    from personatune.data.chat import ensure_chat_template
    from personatune.engine import generate_answers
    from personatune.evaluate.answers import for_inference
    from personatune.models import load_model, load_tokenizer, resolve_ref

    ref = resolve_ref(spec.model.name, spec.model.revision, spec.base_dir)
    tokenizer = load_tokenizer(ref)
    ensure_chat_template(tokenizer, spec.model.chat_template)
    model = for_inference(load_model(ref, spec.model.quantization))  # no copy: only it uses it

    def teach(conversations: list[list[dict]]) -> list[Reply]:
        answers = generate_answers(model, tokenizer, conversations, max_tokens, batch_size)
        return [Reply(a.text, a.tokens, "stop" if a.finished else "length") for a in answers]

    return teach


def _uses_terms(text: str, terms: Sequence[str]) -> bool:
    low = text.lower()
    return any(re.search(rf"(?<!\w){re.escape(t.lower())}(?!\w)", low) for t in terms)


def out_of_fold_proba(persona: np.ndarray, plain: np.ndarray, folds: int = 5) -> np.ndarray:
    """P(in persona) for each row of ``persona`` ``(n, d)``, each from a classifier fitted
    (:func:`personatune.evaluate.classifier.fit_features`'s model) on the other folds of
    ``persona`` against ``plain`` ``(m, d)``; shape ``(n,)``.

    Raises:
        PersonatuneError: fewer than ``folds`` rows on either side.
    """
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold, cross_val_predict

    if min(len(persona), len(plain)) < folds:
        raise PersonatuneError(
            f"too few answers to judge adoption ({len(persona)} in persona, {len(plain)} "
            f"plain; need {folds} of each): give more prompts"
        )
    x = np.concatenate([persona, plain]).astype(np.float64)
    y = np.r_[np.ones(len(persona), int), np.zeros(len(plain), int)]
    model = LogisticRegression(C=1.0, class_weight="balanced", max_iter=2000)
    cv = StratifiedKFold(folds, shuffle=True, random_state=0)
    return cross_val_predict(model, x, y, cv=cv, method="predict_proba")[: len(persona), 1]


def select(
    candidates: Sequence[Reply],
    plain: Sequence[Reply],
    terms: Sequence[str],
    encode: Callable[[Sequence[str]], np.ndarray],
    max_tokens: int,
) -> tuple[list[int], list[dict], Counter]:
    """Decide which candidates to keep (see the module docstring).

    Returns:
        ``(kept indices, per-candidate scores, Counter of drop reasons)``; a candidate is
        counted under its first failed check, in the order degeneration, adoption,
        persona terms, duplicate.
    """
    from personatune.evaluate.metrics import REPETITIVE_SEQ_REP, seq_rep_n

    texts = [c.text for c in candidates]
    vecs = encode(texts + [p.text for p in plain])
    vecs = vecs / np.maximum(np.linalg.norm(vecs, axis=1, keepdims=True), 1e-12)
    cand_v, plain_v = vecs[: len(texts)], vecs[len(texts) :]
    p_persona = out_of_fold_proba(cand_v, plain_v)
    kept, scores, dropped = [], [], Counter()
    seen: set[str] = set()
    for i, c in enumerate(candidates):
        s = {
            "p_persona": round(float(p_persona[i]), 4),
            "seq_rep_4": round(seq_rep_n(c.text), 4),
            "uses_terms": _uses_terms(c.text, terms) if terms else None,
            "tokens": c.tokens,
            "finish": c.finish,
        }
        scores.append(s)
        key = " ".join(c.text.lower().split())
        if not c.text:
            reason = "empty"
        elif c.finish == "length" or c.tokens >= max_tokens:
            reason = "cut at the token limit"
        elif s["seq_rep_4"] > REPETITIVE_SEQ_REP:
            reason = "repetition"
        elif s["p_persona"] < 0.5:
            reason = "not in persona (classifier)"
        elif terms and not s["uses_terms"]:
            reason = "no persona term"
        elif key in seen or any(float(cand_v[i] @ cand_v[j]) >= NEAR_DUPLICATE for j in kept):
            reason = "duplicate"
        else:
            kept.append(i)
            seen.add(key)
            continue
        dropped[reason] += 1
    return kept, scores, dropped


def synthesize(
    spec: PersonaSpec,
    out: str | Path,
    *,
    teacher: Teacher | None = None,
    n_prompts: int | None = None,
    max_tokens: int = 128,
    seed: int = 0,
    overwrite: bool = False,
    encode: Callable[[Sequence[str]], np.ndarray] | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> dict:
    """Write persona training data for ``spec`` into the folder ``out``:
    ``synth.jsonl`` (``prompt``, ``response`` and provenance: ``teacher``,
    ``prompt_source``, filter scores) and ``report.json`` (counts kept and dropped by
    reason, settings). Built beside ``out`` and renamed when complete.

    Args:
        spec: the persona (its ``system_prompt`` is required; ``description`` and
            ``persona_terms`` are used; ``data`` may be empty).
        out: the output folder.
        teacher: who answers (:func:`pick_teacher`); default the spec's base model
            through the generation engine (greedy).
        n_prompts: use a seeded sample of this many prompts (default all).
        max_tokens: the answer limit in tokens; answers cut by it are dropped.
        encode: texts -> ``(n, d)`` embeddings; default all-MiniLM-L6-v2.
        progress: called with ``(done, total)`` conversations after each teacher batch.

    Returns:
        The report (also written to ``report.json``).

    Raises:
        PersonatuneError: no system prompt, ``out`` exists without ``overwrite`` (or is
            not a folder this command wrote), bad prompts file, a teacher error, or no
            answer passed the checks.
    """
    out = Path(out)
    if not spec.system_prompt.strip():
        raise PersonatuneError(
            "system_prompt: empty; synthesis needs the persona's system prompt to answer in"
        )
    if out.exists() and not overwrite:
        raise PersonatuneError(f"{out} already exists; pass --overwrite to replace it")
    check_replaceable(out, "synthesized data folder", spec.input_paths, SIGNATURE)
    prompts, source = read_prompts(spec)
    if n_prompts is not None and n_prompts < len(prompts):
        prompts = random.Random(seed).sample(prompts, n_prompts)
    teacher = teacher or pick_teacher(spec, max_tokens=max_tokens)
    if encode is None:
        from personatune.evaluate.metrics import load_embedder

        encode = load_embedder()

    system = [{"role": "system", "content": spec.system_prompt}]
    convs = [[*system, {"role": "user", "content": p}] for p in prompts]
    convs += [[{"role": "user", "content": p}] for p in prompts]
    replies: list[Reply] = []
    # Chunks of 128 so that the progress bar moves; each chunk is one continuous batch,
    # so a chunk's long tail decodes next to fewer rows the smaller it is.
    for i in range(0, len(convs), 128):
        replies += teacher.answer(convs[i : i + 128])
        if progress:
            progress(len(replies), len(convs))
    candidates, plain = replies[: len(prompts)], replies[len(prompts) :]

    terms = list(spec.persona_terms)
    kept, scores, dropped = select(candidates, plain, terms, encode, max_tokens)
    if not kept:
        raise PersonatuneError(
            f"no synthesized answer passed the checks ({dict(dropped)}); make the system "
            "prompt more specific, or use a stronger --teacher"
        )
    rows = [
        {
            "prompt": prompts[i],
            "response": candidates[i].text,
            "teacher": teacher.name,
            "prompt_source": source,
            **scores[i],
        }
        for i in kept
    ]
    report = {
        "persona": spec.name,
        "teacher": teacher.name,
        "prompt_source": source,
        "prompts": len(prompts),
        "kept": len(kept),
        "dropped": dict(dropped),
        "settings": {
            "max_tokens": max_tokens,
            "seed": seed,
            "near_duplicate": NEAR_DUPLICATE,
            "persona_terms": terms,
        },
    }
    with building(out) as work:
        write_jsonl(work / "synth.jsonl", rows)
        write_json(work / "report.json", report)
    return report
