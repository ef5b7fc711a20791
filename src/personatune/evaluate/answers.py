"""An inference copy of a model for evaluation, and a cache of the engine's answers keyed
by model fingerprint and prompt. Generation itself is :mod:`personatune.engine`'s."""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from dataclasses import asdict

import torch

from personatune.engine import Answer, PrefixCache, generate_answers
from personatune.io import digest, read_jsonl, write_jsonl
from personatune.models import cache_dir, use_bf16

#: Bump when generation changes in a way that makes cached answers stale (2: the
#: engine's continuous batching replaced fixed left-padded batches).
CACHE_VERSION = 2


def inference_copy(model, merge: bool = True):
    """A copy of ``model`` for fast greedy evaluation; ``model`` itself is untouched.

    A peft model gets its LoRA update merged into the weights (``W + B A alpha / r``,
    the same function without the adapter's extra matmuls per layer). The copy is cast to
    bf16 where :func:`personatune.models.use_bf16` says the device computes bf16
    natively (training autocasts there too): on CPUs with AMX a decoding step is about 3x
    faster in bf16 weights than under autocast, which re-casts every weight at every step.

    Args:
        model: a transformers causal LM or a peft ``PeftModel``.
        merge: merge a peft adapter (True) or drop it and keep the base model (False).
    """
    m = copy.deepcopy(model)
    if hasattr(m, "merge_and_unload"):
        m = m.merge_and_unload() if merge else m.unload()
    return for_inference(m)


def for_inference(model):
    """``model`` itself in eval mode, cast in place to bf16 where
    :func:`personatune.models.use_bf16` says so and its weights are float32: the dtype of
    :func:`inference_copy`, for a model nothing else uses (no copy)."""
    weight = next(model.parameters())
    if use_bf16(weight.device) and weight.dtype == torch.float32:
        model = model.to(torch.bfloat16)
    return model.eval()


class AnswerCache:
    """Answers of one model under one generation setting, stored as JSONL under
    ``personatune.models.cache_dir() / "answers"``.

    The file is named by a hash of ``namespace`` (model fingerprint, chat template,
    ``max_new_tokens``, dtype); each line is keyed by a hash of its conversation, so a
    prompt set that grows reuses what was already generated. Writes go through a
    temporary file and a rename.
    """

    def __init__(self, namespace: dict):
        self.namespace = {**namespace, "version": CACHE_VERSION}
        self.path = cache_dir() / "answers" / f"{digest(self.namespace)[:24]}.jsonl"
        rows = read_jsonl(self.path) if self.path.exists() else []
        self.entries: dict[str, Answer] = {r["key"]: Answer(**r["answer"]) for r in rows}

    def save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        write_jsonl(self.path, ({"key": k, "answer": asdict(a)} for k, a in self.entries.items()))


def cached_answers(
    model,
    tokenizer,
    conversations: Sequence[list[dict]],
    fingerprint: str,
    max_new_tokens: int = 64,
    batch_size: int = 64,
    progress: Callable[[int], None] | None = None,
) -> list[Answer]:
    """:func:`personatune.engine.generate_answers`, reading and filling an
    :class:`AnswerCache` (:func:`cached_answer_sets` of one set).

    Args:
        fingerprint: identity of the weights (``ModelRef.fingerprint()``, plus the
            adapter's hash for a tuned model). Answers are reused only for the same
            fingerprint, chat template, ``max_new_tokens`` and weight dtype.
        progress: called with the number of answers done, cached ones at once.
    """
    sets = [(conversations, max_new_tokens)]
    return cached_answer_sets(model, tokenizer, sets, fingerprint, batch_size, progress)[0]


def cached_answer_sets(
    model,
    tokenizer,
    sets: Sequence[tuple[Sequence[list[dict]], int]],
    fingerprint: str,
    batch_size: int = 64,
    progress: Callable[[int], None] | None = None,
    prefixes: PrefixCache | None = None,
) -> list[list[Answer]]:
    """Answers to several ``(conversations, max_new_tokens)`` sets, each read from and
    written to its own :class:`AnswerCache`, with every missing answer generated in one
    engine run: the sets share batches, so a set's long tail of answers decodes next to
    the other sets' rows instead of in a batch of its own. Measured only inside ``make
    demo`` on the 2-core CPU, together with that stop's engine changes (not alone): the
    guard's preparation went from 101 to 88 s and eval's answer sets from 82 to 37 s
    (``benchmarks/results/demo.md``).

    Args:
        prefixes: KV cache of earlier answers to reuse and fill (see
            :func:`personatune.engine.generate_answers`).

    Returns:
        One list of answers per set, in the set's order.
    """
    dtype = str(next(model.parameters()).dtype)
    namespace = {"model": fingerprint, "template": tokenizer.chat_template, "dtype": dtype}
    caches = {  # one per limit: sets of one limit share a file
        n: AnswerCache({**namespace, "max_new_tokens": n})
        for n in dict.fromkeys(n for _, n in sets)
    }
    keys = [[digest(c) for c in convs] for convs, _ in sets]
    todo: dict[tuple[int, str], list[dict]] = {}
    for (convs, limit), ks in zip(sets, keys):
        for k, c in zip(ks, convs):
            if k not in caches[limit].entries:
                todo.setdefault((limit, k), c)
    total = sum(len(ks) for ks in keys)
    if progress and total > len(todo):
        progress(total - len(todo))
    if todo:
        where = list(todo)
        limits = [n for n, _ in where]
        new = generate_answers(
            model, tokenizer, list(todo.values()), limits, batch_size, progress, prefixes
        )
        for (limit, k), answer in zip(where, new):
            caches[limit].entries[k] = answer
        for limit in {n for n, _ in where}:
            caches[limit].save()
    return [[caches[n].entries[k] for k in ks] for (_, n), ks in zip(sets, keys)]
