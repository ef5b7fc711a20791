"""The llama.cpp engine (``--engine llama-cpp``): the personas' base model as a GGUF in
llama.cpp, each persona's adapter as a llama.cpp LoRA adapter switched per request, behind
the engine's interface: a :class:`~personatune.engine.Registry`, :func:`ask` (as
:func:`personatune.engine.ask`) and :class:`LlamaCppScheduler` (as
:class:`~personatune.engine.Scheduler`).

Why: batch-1 greedy decoding of the embedded pirate on the shared 2-core CPU (1 thread
each, load average ~15) ran at 33.2 tokens/s in llama.cpp on the q8_0 GGUF against
4.0 in transformers with the peft adapter, 8.6x, time to first token 512 ms against
772 ms (benchmarks/results/gguf_speed.md). Requests run one at
a time (llama.cpp through llama-cpp-python decodes one sequence per context here); prompts
are the engine's own token ids (:func:`personatune.engine.encode`), and the next token,
the end-of-turn set, stop strings and events are the engine's (:mod:`.sampling`,
:class:`~personatune.engine.batcher.Batch`), so an answer differs from the torch engine's
only by the GGUF weights' rounding.

Needs llama-cpp-python (``pip install 'personatune[llama-cpp]'``).
"""

from __future__ import annotations

import ctypes
import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from personatune.engine.api import persona_request
from personatune.engine.batcher import Answer, Batch, Event, Request, _Row
from personatune.engine.load import Registry, attach_tokenizers, describe_personas
from personatune.engine.sampling import Sampling
from personatune.engine.scheduler import DEFAULT_MAX_QUEUE, Scheduler
from personatune.errors import PersonatuneError

log = logging.getLogger("personatune.engine")

#: Weight type of the base model's GGUF: q8_0 decoded fastest on the embedded model
#: (33.2 tokens/s against 26.2 for f16 and 27.0 for q4_k_m, whose 576-wide rows fall back
#: to q5_0/q8_0), at 0.9 of the float32 logits (q4_k_m: 6.2); gguf_speed.md.
BASE_QUANT = "q8_0"
#: KV cache size in tokens when the base model allows more (the cache is allocated whole).
MAX_CONTEXT = 4096


@dataclass
class LlamaCppModel:
    """A llama.cpp context on the base GGUF with every persona's LoRA adapter loaded.

    Attributes:
        llm: the ``llama_cpp.Llama`` object (one context, one sequence).
        adapters: persona (adapter) name -> ``llama_adapter_lora_p``.
        generation_config: the base model's, for :func:`~.sampling.end_of_turn_ids`.
    """

    llm: object
    adapters: dict
    generation_config: object

    def use(self, adapter: str | None) -> None:
        """Make ``adapter`` the only active LoRA adapter (None: the base model)."""
        import llama_cpp

        if adapter is not None and adapter not in self.adapters:
            raise ValueError(f"adapter {adapter} requested but not loaded")
        n = 0 if adapter is None else 1
        arr = (llama_cpp.llama_adapter_lora_p_ctypes * 1)(
            self.adapters[adapter] if adapter else None
        )
        scales = (ctypes.c_float * 1)(1.0)
        if llama_cpp.llama_set_adapters_lora(self.llm.ctx, arr, n, scales):
            raise RuntimeError(f"llama.cpp could not set adapter {adapter}")

    def logits(self, ids: list[int], start: int) -> torch.Tensor:
        """Feed ``ids`` at positions from ``start`` (the KV cache keeps what came before)
        and return the last position's logits, ``(1, vocab)`` float32."""
        import llama_cpp

        llm = self.llm
        llm.n_tokens = start  # eval drops cache entries from here on
        llm.eval(ids)
        ptr = llama_cpp.llama_get_logits_ith(llm.ctx, -1)
        return torch.from_numpy(np.ctypeslib.as_array(ptr, shape=(llm.n_vocab(),)).copy())[None]


def _cached_gguf(folder: Path, name: str, write: Callable[[Path], None]) -> Path:
    path = folder / name
    if not path.exists():
        folder.mkdir(parents=True, exist_ok=True)
        tmp = folder / f".{name}.{os.getpid()}.tmp"
        try:
            write(tmp)
            tmp.replace(path)
        finally:
            tmp.unlink(missing_ok=True)
    return path


def _configs(ref):
    """The base model's transformers config and generation config, without its weights."""
    from transformers import AutoConfig, GenerationConfig

    from personatune.models import _gguf_as_safetensors  # the GGUF base's cached folder

    path = _gguf_as_safetensors(ref) if ref.kind == "gguf" else ref.path
    config = AutoConfig.from_pretrained(path, revision=ref.revision)
    try:
        gen = GenerationConfig.from_pretrained(path, revision=ref.revision)
    except OSError:  # no generation_config.json: transformers derives it from the config
        gen = GenerationConfig.from_model_config(config)
    return config, gen


def load_llama_cpp(
    dirs: list[str | Path], threads: int | None = None, quant: str | None = None
) -> Registry:
    """Load personas for the llama.cpp engine: the base model as a GGUF and each adapter
    as a LoRA GGUF (written once by :mod:`personatune.export.gguf_file` and cached under
    ``~/.cache/personatune/llama-cpp``, keyed by the base model's fingerprint and each
    adapter's sha256), in one llama.cpp context.

    Args:
        dirs: persona directories on one base model (llama or qwen2 architecture).
        threads: CPU threads (default: ``torch.get_num_threads()``).
        quant: the base GGUF's weight type (default :data:`BASE_QUANT`).

    Returns:
        a :class:`~personatune.engine.Registry` whose ``model`` is a
        :class:`LlamaCppModel`, for :func:`ask` and :class:`LlamaCppScheduler`.

    Raises:
        PersonatuneError: llama-cpp-python missing, persona directories that the torch
            engine would refuse too, or a base model the GGUF export does not write.
    """
    try:
        import llama_cpp
    except ImportError:
        raise PersonatuneError(
            "--engine llama-cpp needs llama-cpp-python: pip install 'personatune[llama-cpp]' "
            "(builds llama.cpp), or use --engine torch"
        ) from None
    from personatune.export.gguf_file import write_lora_gguf, write_model_gguf
    from personatune.export.merged import merge_persona
    from personatune.io import sha256_file
    from personatune.models import cache_dir

    quant = quant or BASE_QUANT
    ref, personas = describe_personas(dirs)
    folder = cache_dir() / "llama-cpp"

    def write_base(path):
        first = next(p.path for p in personas.values() if p.path is not None)
        m = merge_persona(first, merge=False)
        write_model_gguf(path, m.model, m.tokenizer, name=ref.name, quant=quant)

    fingerprint = ref.fingerprint().split(":")[-1][:16]
    base_file = _cached_gguf(folder, f"base-{fingerprint}-{quant}.gguf", write_base)
    attach_tokenizers(ref, personas)
    config, gen = _configs(ref)
    threads = threads or torch.get_num_threads()
    ctx = min(getattr(config, "max_position_embeddings", MAX_CONTEXT) or MAX_CONTEXT, MAX_CONTEXT)
    llm = llama_cpp.Llama(str(base_file), n_ctx=ctx, n_threads=threads,
                          n_threads_batch=threads, verbose=False)  # fmt: skip
    adapters = {}
    for p in personas.values():
        if p.path is None:
            continue
        digest = sha256_file(p.path / "adapter_model.safetensors")[:16]
        f = _cached_gguf(
            folder,
            f"lora-{digest}.gguf",
            lambda out: write_lora_gguf(out, p.path, config, name=p.name, quant="f32"),
        )
        a = llama_cpp.llama_adapter_lora_init(llm.model, str(f).encode())
        if a is None:
            raise PersonatuneError(f"{p.path}: llama.cpp could not load {f}")
        llm._stack.callback(llama_cpp.llama_adapter_lora_free, a)  # freed with the model
        adapters[p.adapter] = a  # keyed as requests name it
    model = LlamaCppModel(llm, adapters, gen)
    return Registry(model, ref.name, ref, personas, ctx)


class LlamaCppBatch(Batch):
    """The engine's :class:`~personatune.engine.batcher.Batch` on llama.cpp, one row at a
    time: a prefill takes one request with its adapter, ``step`` decodes its next token.
    Joining, finishing, stop strings, events and answers are the engine's own code."""

    def __init__(self, model: LlamaCppModel):
        self.model = model
        self.device = torch.device("cpu")
        self.peft = False
        self.rows: list[_Row] = []
        self._ends: dict[int, frozenset[int]] = {}

    def _prefill(self, rows: list[_Row]) -> list[tuple[Request, Answer]]:
        if self.rows or len(rows) > 1:
            raise RuntimeError("the llama.cpp engine decodes one request at a time")
        self.model.use(rows[0].req.adapter)
        finished, done = self._advance_all(rows, self.model.logits(rows[0].req.input_ids, 0))
        if not done:
            self.rows = rows
        return finished

    def step(self) -> list[tuple[Request, Answer]]:
        if not self.rows:
            return []
        (row,) = self.rows
        try:
            logits = self.model.logits([row.ids[-1]], row.pos)
        except Exception as e:
            log.exception("a request failed")
            self.rows = []
            return [self.fail(row.req, f"{type(e).__name__}: {e}", len(row.ids))]
        row.pos += 1
        finished, done = self._advance_all(self.rows, logits)
        if done:
            self.rows = []
        return finished


def ask(
    registry: Registry,
    items: Sequence[tuple[str, list[dict]]],
    sampling: Sampling | None = None,
    max_batch: int = 1,
    emit: Callable[[Event], None] | None = None,
) -> list[Answer]:
    """:func:`personatune.engine.ask` on the llama.cpp engine: answers to ``(model id,
    messages)`` items, each persona's system prompt prepended, one request at a time
    (``max_batch`` is accepted and ignored), in input order."""
    batch = LlamaCppBatch(registry.model)
    out = []
    for name, msgs in items:
        finished = batch.add(persona_request(registry.personas[name], msgs, sampling, emit))
        while not finished:
            finished = batch.step()
        out.append(finished[0][1])
    return out


class LlamaCppScheduler(Scheduler):
    """:class:`~personatune.engine.Scheduler` on llama.cpp: the same queue, thread, drain
    and counters, over a :class:`LlamaCppBatch` (one request decoding at a time, so
    ``max_batch`` is 1)."""

    def __init__(self, model: LlamaCppModel, max_queue: int = DEFAULT_MAX_QUEUE):
        super().__init__(model, 1, max_queue, batch=LlamaCppBatch(model))


__all__ = ["LlamaCppModel", "LlamaCppScheduler", "ask", "load_llama_cpp"]
