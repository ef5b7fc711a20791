"""The generation engine: load a base model with persona adapters, render conversations
with each persona's chat template and system prompt, and decode many requests together
(continuous batching over peft mixed-adapter batches), as a synchronous batch API
(:func:`generate_answers`, :func:`ask`, :func:`run_batch`) or a streaming server thread
(:class:`Scheduler`)."""

from personatune.engine.api import ask, encode, generate_answers, persona_request
from personatune.engine.batcher import (
    Answer,
    Batch,
    Delta,
    Done,
    Event,
    Failed,
    PrefixCache,
    Request,
    run_batch,
)
from personatune.engine.load import (
    BASE_ID,
    DEFAULT_CONTEXT,
    Persona,
    Registry,
    ServedPersona,
    describe_personas,
    load_persona,
    load_registry,
)
from personatune.engine.sampling import Sampling, end_of_turn_ids, visible_text
from personatune.engine.scheduler import (
    DEFAULT_MAX_BATCH,
    DEFAULT_MAX_QUEUE,
    QueueFull,
    Scheduler,
)

__all__ = [
    "BASE_ID",
    "DEFAULT_CONTEXT",
    "DEFAULT_MAX_BATCH",
    "DEFAULT_MAX_QUEUE",
    "Answer",
    "Batch",
    "Delta",
    "Done",
    "Event",
    "Failed",
    "Persona",
    "PrefixCache",
    "QueueFull",
    "Registry",
    "Request",
    "Sampling",
    "Scheduler",
    "ServedPersona",
    "ask",
    "describe_personas",
    "encode",
    "end_of_turn_ids",
    "generate_answers",
    "load_persona",
    "load_registry",
    "persona_request",
    "run_batch",
    "visible_text",
]
