"""An inference copy of a model for evaluation, and a cache of the engine's answers keyed
by model fingerprint and prompt. Generation itself is :mod:`personatune.engine`'s."""

from __future__ import annotations

import copy
import hashlib
import json
from collections.abc import Callable, Sequence
from dataclasses import asdict

import torch

from personatune.engine import Answer, generate_answers
from personatune.io import read_jsonl, write_jsonl
from personatune.models import cache_dir, use_bf16

#: Bump when generation changes in a way that makes cached answers stale (2: the
#: engine's continuous batching replaced fixed left-padded batches).
CACHE_VERSION = 2

__all__ = ["Answer", "AnswerCache", "cached_answers", "inference_copy"]


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
    device = next(m.parameters()).device
    if use_bf16(device) and next(m.parameters()).dtype == torch.float32:
        m = m.to(torch.bfloat16)
    return m.eval()


def _digest(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()


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
        self.path = cache_dir() / "answers" / f"{_digest(self.namespace)[:24]}.jsonl"
        self.entries: dict[str, Answer] = {}
        if self.path.exists():
            for row in read_jsonl(self.path):
                self.entries[row["key"]] = Answer(**row["answer"])

    @staticmethod
    def key(conversation: list[dict]) -> str:
        return _digest(conversation)

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
    :class:`AnswerCache`.

    Args:
        fingerprint: identity of the weights (``ModelRef.fingerprint()``, plus the
            adapter's hash for a tuned model). Answers are reused only for the same
            fingerprint, chat template, ``max_new_tokens`` and weight dtype.
        progress: called with the number of answers done, cached ones at once.
    """
    dtype = str(next(model.parameters()).dtype)
    cache = AnswerCache(
        {
            "model": fingerprint,
            "template": tokenizer.chat_template,
            "max_new_tokens": max_new_tokens,
            "dtype": dtype,
        }
    )
    keys = [cache.key(c) for c in conversations]
    missing = list(dict.fromkeys(k for k in keys if k not in cache.entries))
    if progress and len(keys) > len(missing):
        progress(len(keys) - len(missing))
    if missing:
        by_key = {k: c for k, c in zip(keys, conversations)}
        new = generate_answers(
            model, tokenizer, [by_key[k] for k in missing], max_new_tokens, batch_size, progress
        )
        cache.entries.update(zip(missing, new))
        cache.save()
    return [cache.entries[k] for k in keys]
