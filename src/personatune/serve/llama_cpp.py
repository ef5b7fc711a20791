"""``personatune serve --engine llama-cpp``: the local backend with llama.cpp decoding."""

from __future__ import annotations

from personatune.engine import Registry
from personatune.engine.llama_cpp import LlamaCppScheduler
from personatune.serve.backend import LocalBackend


class LlamaCppBackend(LocalBackend):
    """:class:`~personatune.serve.backend.LocalBackend` (tokenizing, context check,
    sampling settings, queue, events) over a :class:`LlamaCppScheduler`: one request
    decodes at a time.

    Args:
        registry: from :func:`personatune.engine.llama_cpp.load_llama_cpp`.
        max_queue: requests that may wait; more get 429.
    """

    def __init__(self, registry: Registry, max_queue: int):
        self.registry = registry
        self.personas = registry.personas
        self.base_model = registry.base_model
        self.scheduler = LlamaCppScheduler(registry.model, max_queue)
