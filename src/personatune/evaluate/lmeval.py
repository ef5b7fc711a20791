"""Multiple-choice benchmarks through lm-evaluation-harness, scored by log-likelihood on
local data files (no Hub access)."""

from __future__ import annotations

import contextlib
import io
import logging
import math
from pathlib import Path

from personatune.errors import PersonatuneError
from personatune.io import jsonl_records, read_json
from personatune.patches import load_task_yaml

#: The prompt of the generic format, as in lm-eval's ARC tasks.
GENERIC_TEXT = "Question: {{question}}\nAnswer:"
_DATASET_BUILDERS = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet"}


def _first_row(path: Path) -> dict:
    """The first row of a JSONL or JSON-list benchmark file (its columns name the task's
    fields); ``{}`` for other formats or an empty file."""
    if path.suffix == ".jsonl":
        return next((row for _, row in jsonl_records(path)), {})
    if path.suffix == ".json":
        data = read_json(path)
        return data[0] if isinstance(data, list) and data else {}
    return {}


def check_generic(path: Path) -> int:
    """Validate a generic multiple-choice file (JSONL rows ``{"question": str,
    "choices": [str, ...], "label": int index of the right choice}``) and return its row
    count.

    Raises:
        PersonatuneError: naming the line and the key to fix.
    """
    n = 0
    for i, row in jsonl_records(path):
        choices, label = row.get("choices"), row.get("label")
        if not isinstance(row.get("question"), str):
            raise PersonatuneError(f"{path}: line {i}: 'question' must be a string")
        if not (
            isinstance(choices, list)
            and len(choices) >= 2
            and all(isinstance(c, str) for c in choices)
        ):
            raise PersonatuneError(f"{path}: line {i}: 'choices' must be a list of 2+ strings")
        if not (isinstance(label, int) and 0 <= label < len(choices)):
            raise PersonatuneError(
                f"{path}: line {i}: 'label' must be the index (0..{len(choices) - 1}) of the "
                "right choice"
            )
        n += 1
    if not n:
        raise PersonatuneError(f"{path}: no rows")
    return n


def task_config(task: str, path: str | Path) -> dict:
    """An lm-eval task config (dict) that reads ``path`` instead of the Hub.

    If ``path`` is a JSONL/JSON file of ``{question, choices, label}`` rows, the task is
    the generic multiple-choice format named ``task`` (prompt ``Question: ...\\nAnswer:``,
    each choice scored as a continuation). Otherwise ``task`` must be a multiple-choice
    task registered in lm-eval (``arc_easy``, ``piqa``, ``hellaswag``): its own YAML config
    is used, with its evaluation split read from ``path`` (in that task's schema) and no
    few-shot examples.

    Raises:
        PersonatuneError: a missing file, a bad generic row, an unknown task, or a task
            that is not multiple-choice.
    """
    path = Path(path)
    if not path.is_file():
        raise PersonatuneError(f"benchmark '{task}': no such data file {path}")
    builder = _DATASET_BUILDERS.get(path.suffix)
    if builder is None:
        raise PersonatuneError(f"{path}: benchmark data must be .jsonl, .json, .csv or .parquet")
    first = _first_row(path)
    metrics = [
        {"metric": m, "aggregation": "mean", "higher_is_better": True} for m in ("acc", "acc_norm")
    ]
    if {"question", "choices", "label"} <= first.keys():
        if path.suffix == ".jsonl":
            check_generic(path)
        return {
            "task": task,
            "dataset_path": builder,
            "dataset_kwargs": {"data_files": {"test": str(path.resolve())}},
            "test_split": "test",
            "output_type": "multiple_choice",
            "doc_to_text": GENERIC_TEXT,
            "doc_to_choice": "{{choices}}",
            "doc_to_target": "{{label}}",
            "metric_list": metrics,
            "num_fewshot": 0,
            "metadata": {"version": 1.0},
        }
    from lm_eval.tasks import TaskManager

    entry = TaskManager().task_index.get(task)
    if entry is None or entry.yaml_path is None:
        raise PersonatuneError(
            f"benchmark '{task}': not an lm-eval task, and {path} is not in the generic format "
            "(rows with question, choices, label)"
        )
    cfg = load_task_yaml(entry.yaml_path)
    for key in ("tag", "group", "include"):
        cfg.pop(key, None)
    if cfg.get("output_type") != "multiple_choice":
        raise PersonatuneError(
            f"benchmark '{task}': output_type is {cfg.get('output_type')}; "
            "personatune runs multiple-choice (log-likelihood) tasks only"
        )
    split = cfg.get("test_split") or cfg.get("validation_split") or "test"
    cfg.update(
        {
            "task": task,
            "dataset_path": builder,
            "dataset_name": None,
            "dataset_kwargs": {"data_files": {split: str(path.resolve())}},
            "test_split": split,
            "validation_split": None,
            "training_split": None,
            "fewshot_split": None,
            "num_fewshot": 0,
        }
    )
    return cfg


def run_benchmark(model, tokenizer, task: str, path: str | Path, batch_size: int = 16) -> dict:
    """Score ``model`` on a multiple-choice benchmark with lm-eval's ``simple_evaluate``.

    Each choice is scored by the log-likelihood of its tokens as a continuation of the
    prompt (no chat template); the prediction is the highest (``acc``) or the highest per
    byte of the choice (``acc_norm``, lm-eval's length normalisation).

    Args:
        model: a loaded transformers causal LM (wrapped in lm-eval's ``HFLM``).
        task, path: see :func:`task_config`.

    Returns:
        ``{"task", "path", "n", "acc", "acc_stderr", "acc_norm", "acc_norm_stderr"}``,
        accuracies in 0..1.

    Raises:
        PersonatuneError: see :func:`task_config`.
    """
    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    cfg = task_config(task, path)
    for name in ("lm_eval", "lm-eval"):
        logging.getLogger(name).setLevel(logging.ERROR)
    # lm-eval and datasets draw their own tqdm bars on stderr; ours already shows progress.
    with contextlib.redirect_stderr(io.StringIO()):
        lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
        # The config is complete, so the harness need not index its 14,000 task files.
        out = lm_eval.simple_evaluate(
            model=lm,
            tasks=[cfg],
            num_fewshot=0,
            log_samples=False,
            bootstrap_iters=0,
            task_manager=TaskManager(include_defaults=False),
            random_seed=0,
            numpy_random_seed=0,
            torch_random_seed=0,
            fewshot_random_seed=0,
        )
    res = out["results"][task]
    n = int(out.get("n-samples", {}).get(task, {}).get("effective") or 0)

    def acc(key):
        v = res.get(f"{key},none")
        return float(v) if isinstance(v, (int, float)) else None

    def stderr(p):  # lm-eval's mean_stderr for 0/1 scores: sample std / sqrt(n)
        return math.sqrt(p * (1 - p) / (n - 1)) if p is not None and n > 1 else None

    return {
        "task": task,
        "path": str(path),
        "n": n,
        "acc": acc("acc"),
        "acc_stderr": stderr(acc("acc")),
        "acc_norm": acc("acc_norm"),
        "acc_norm_stderr": stderr(acc("acc_norm")),
    }
