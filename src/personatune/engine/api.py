"""The synchronous batch API: conversations in, answers out (eval, guard, compare, chat)."""

from __future__ import annotations

from collections.abc import Callable, Sequence

from personatune.data.chat import render_prompt, with_system_prompt
from personatune.engine.batcher import Answer, Event, PrefixCache, Request, run_batch
from personatune.engine.load import Registry, ServedPersona
from personatune.engine.sampling import Sampling


def encode(tokenizer, conversation: list[dict]) -> list[int]:
    """Token ids of ``conversation`` rendered with the tokenizer's chat template plus the
    assistant header (no BOS added: the template has its own).

    Raises:
        PersonatuneError: the chat template fails on the conversation.
    """
    return tokenizer(render_prompt(tokenizer, conversation), add_special_tokens=False)["input_ids"]


def current_adapter(model) -> str | None:
    """The adapter a peft model runs now (None: a plain model, or adapters disabled)."""
    if not hasattr(model, "peft_config"):
        return None
    from peft.tuners.tuners_utils import BaseTunerLayer

    layer = next((m for m in model.modules() if isinstance(m, BaseTunerLayer)), None)
    return None if layer is None or layer.disable_adapters else model.active_adapter


def generate_answers(
    model,
    tokenizer,
    conversations: Sequence[list[dict]],
    max_new_tokens: int | Sequence[int] = 64,
    batch_size: int = 64,
    progress: Callable[[int], None] | None = None,
    prefixes: PrefixCache | None = None,
) -> list[Answer]:
    """Greedy answers of ``model`` (no adapter switching: a plain or merged model, or a
    peft model as it is set) to ``conversations`` (``{"role", "content"}`` dicts ending
    with a user turn), in input order.

    Prompts are fed shortest first, ``batch_size`` rows at a time with continuous
    batching, so the result is the same on one machine for the same inputs.

    Args:
        max_new_tokens: longest answer in tokens (default 64), or one limit per
            conversation (sets of different budgets share one batch).
        batch_size: most rows decoded together (default 64).
        progress: called with 1 after each finished answer.
        prefixes: KV cache of earlier answers to reuse and fill (the turns of
            conversations; :class:`personatune.engine.batcher.PrefixCache`).
    """
    ids = [encode(tokenizer, c) for c in conversations]
    limits = (
        [max_new_tokens] * len(ids) if isinstance(max_new_tokens, int) else list(max_new_tokens)
    )
    order = sorted(range(len(ids)), key=lambda i: (len(ids[i]), i))
    adapter = current_adapter(model)
    reqs = [Request(ids[i], tokenizer, adapter, Sampling(limits[i])) for i in order]
    answers = dict(zip(order, run_batch(model, reqs, batch_size, progress, prefixes)))
    return [answers[i] for i in range(len(ids))]


def persona_request(
    persona: ServedPersona,
    messages: list[dict],
    sampling: Sampling | None = None,
    emit: Callable[[Event], None] | None = None,
) -> Request:
    """A request for ``persona`` (its adapter, chat template and system prompt, which
    is prepended unless ``messages`` has a system message of its own)."""
    conv = with_system_prompt(messages, persona.system_prompt)
    return Request(encode(persona.tokenizer, conv), persona.tokenizer, persona.adapter,
                   sampling or Sampling(), emit)  # fmt: skip


def ask(
    registry: Registry,
    items: Sequence[tuple[str, list[dict]]],
    sampling: Sampling | None = None,
    max_batch: int = 64,
    emit: Callable[[Event], None] | None = None,
) -> list[Answer]:
    """Answer each ``(model id, messages)`` pair of ``items`` with that persona (or the
    base model, :data:`personatune.engine.BASE_ID`), all personas decoded together in
    mixed-adapter batches. ``emit`` streams the events of a single item.

    Raises:
        KeyError: a model id the registry does not have.
    """
    reqs = [persona_request(registry.personas[name], msgs, sampling, emit) for name, msgs in items]
    return run_batch(registry.model, reqs, max_batch)
