"""Greedy batched answers for evaluation, an inference copy of a model, and a cache of
answers keyed by model fingerprint and prompt."""

from __future__ import annotations

import copy
import hashlib
import json
import os
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass

import torch

from personatune.data.chat import render_prompt
from personatune.models import cache_dir, use_bf16

#: Bump when generation changes in a way that makes cached answers stale.
CACHE_VERSION = 1


@dataclass
class Answer:
    """One generated answer.

    Attributes:
        text: the decoded answer, special tokens removed, stripped.
        tokens: generated tokens up to and excluding the end-of-turn token.
        finished: True if the model ended the turn before ``max_new_tokens``; False if
            the answer was cut at the limit.
    """

    text: str
    tokens: int
    finished: bool


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


def _eos_ids(model, tokenizer) -> set[int]:
    ids = model.generation_config.eos_token_id
    ids = set(ids if isinstance(ids, list) else [ids] if ids is not None else [])
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    return ids


@torch.inference_mode()
def generate_answers(
    model,
    tokenizer,
    conversations: Sequence[list[dict]],
    max_new_tokens: int = 64,
    batch_size: int = 64,
    progress: Callable[[int], None] | None = None,
) -> list[Answer]:
    """Greedy answers to ``conversations`` (``{"role", "content"}`` dicts ending with a
    user turn), in input order.

    Prompts are grouped by length so that a batch carries little padding (left-padded);
    a batch stops when every answer in it has ended its turn. Greedy decoding with fixed
    batches makes the result deterministic on one machine.

    Args:
        max_new_tokens: longest answer in tokens.
        batch_size: prompts per ``generate`` call.
        progress: called with the number of answers done after each batch.
    """
    texts = [render_prompt(tokenizer, c) for c in conversations]
    lengths = [len(tokenizer(t, add_special_tokens=False)["input_ids"]) for t in texts]
    order = sorted(range(len(texts)), key=lambda i: (lengths[i], i))
    device = next(model.parameters()).device
    eos = _eos_ids(model, tokenizer)
    out: list[Answer | None] = [None] * len(texts)
    side, tokenizer.padding_side = tokenizer.padding_side, "left"
    try:
        for b in range(0, len(order), batch_size):
            idx = order[b : b + batch_size]
            batch = tokenizer(
                [texts[i] for i in idx], return_tensors="pt", padding=True, add_special_tokens=False
            ).to(device)
            gen = model.generate(
                **batch,
                max_new_tokens=max_new_tokens,
                do_sample=False,
                temperature=None,
                top_p=None,
                top_k=None,
                pad_token_id=tokenizer.pad_token_id,
            )
            new = gen[:, batch["input_ids"].shape[1] :].tolist()
            for i, row in zip(idx, new):
                end = next((k for k, t in enumerate(row) if t in eos), None)
                kept = row if end is None else row[:end]
                text = tokenizer.decode(kept, skip_special_tokens=True).strip()
                out[i] = Answer(text, len(kept), end is not None)
            if progress:
                progress(len(idx))
    finally:
        tokenizer.padding_side = side
    return out  # type: ignore[return-value]


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
            for line in self.path.read_text().splitlines():
                if line.strip():
                    row = json.loads(line)
                    self.entries[row["key"]] = Answer(**row["answer"])

    @staticmethod
    def key(conversation: list[dict]) -> str:
        return _digest(conversation)

    def save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(f"{self.path.name}.tmp{os.getpid()}")
        with tmp.open("w") as f:
            for k, a in self.entries.items():
                f.write(json.dumps({"key": k, "answer": asdict(a)}) + "\n")
        tmp.replace(self.path)


def cached_answers(
    model,
    tokenizer,
    conversations: Sequence[list[dict]],
    fingerprint: str,
    max_new_tokens: int = 64,
    batch_size: int = 64,
    progress: Callable[[int], None] | None = None,
) -> list[Answer]:
    """:func:`generate_answers`, reading and filling an :class:`AnswerCache`.

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
