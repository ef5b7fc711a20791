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

__all__ = [
    "Answer",
    "AnswerCache",
    "cached_answer_sets",
    "cached_answers",
    "inference_copy",
    "inference_dtype",
]


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
    return inference_dtype(m)


def inference_dtype(model):
    """``model`` itself, in eval mode, cast in place to bf16 where
    :func:`personatune.models.use_bf16` says so and its weights are float32 (the dtype
    of :func:`inference_copy`)."""
    device = next(model.parameters()).device
    if use_bf16(device) and next(model.parameters()).dtype == torch.float32:
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
        self.entries: dict[str, Answer] = {}
        if self.path.exists():
            for row in read_jsonl(self.path):
                self.entries[row["key"]] = Answer(**row["answer"])

    @staticmethod
    def key(conversation: list[dict]) -> str:
        return digest(conversation)

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
    fingerprint: str | Sequence[str],
    batch_size: int = 64,
    progress: Callable[[int], None] | None = None,
    prefixes: PrefixCache | None = None,
    adapters: Sequence[str | None] | None = None,
) -> list[list[Answer]]:
    """Answers to several ``(conversations, max_new_tokens)`` sets, each read from and
    written to its own :class:`AnswerCache`, with every missing answer generated in one
    engine run: the sets share batches, so a set's long tail of answers decodes next to
    the other sets' rows instead of in a batch of its own. Measured only inside ``make
    demo`` on the 2-core CPU, together with that stop's engine changes (not alone): the
    guard's preparation went from 101 to 88 s and eval's answer sets from 82 to 37 s
    (``benchmarks/results/demo.md``).

    Args:
        fingerprint: identity of the weights, for every set or one per set.
        prefixes: KV cache of earlier answers to reuse and fill (see
            :func:`personatune.engine.generate_answers`).
        adapters: per set, the peft adapter answering it (None: the base model), so that
            the base model and a persona share one run; default the model's active
            adapter. Give one fingerprint per set with it.

    Returns:
        One list of answers per set, in the set's order.
    """
    dtype = str(next(model.parameters()).dtype)
    fps = [fingerprint] * len(sets) if isinstance(fingerprint, str) else list(fingerprint)
    caches: dict[tuple[str, int], AnswerCache] = {}  # sets of one model and limit share one
    for fp, (_, limit) in zip(fps, sets):
        if (fp, limit) not in caches:
            caches[fp, limit] = AnswerCache(
                {
                    "model": fp,
                    "template": tokenizer.chat_template,
                    "max_new_tokens": limit,
                    "dtype": dtype,
                }
            )
    keys = [[AnswerCache.key(c) for c in convs] for convs, _ in sets]
    todo: dict[tuple[str, int, str], tuple[list[dict], str | None]] = {}
    for i, ((convs, limit), ks) in enumerate(zip(sets, keys)):
        for k, c in zip(ks, convs):
            if k not in caches[fps[i], limit].entries:
                todo.setdefault((fps[i], limit, k), (c, adapters[i] if adapters else None))
    total = sum(len(ks) for ks in keys)
    if progress and total > len(todo):
        progress(total - len(todo))
    if todo:
        where, asked = list(todo), list(todo.values())
        new = generate_answers(
            model,
            tokenizer,
            [c for c, _ in asked],
            [limit for _, limit, _ in where],
            batch_size,
            progress,
            prefixes,
            [a for _, a in asked] if adapters else None,
        )
        for (fp, limit, k), answer in zip(where, new):
            caches[fp, limit].entries[k] = answer
        for fp, limit in {w[:2] for w in where}:
            caches[fp, limit].save()
    return [[caches[fp, n].entries[k] for k in ks] for fp, (_, n), ks in zip(fps, sets, keys)]
