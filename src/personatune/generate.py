"""Load a persona for inference and generate chat answers, batched or streamed."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from personatune.config import PersonaSpec, load_spec
from personatune.data.chat import ensure_chat_template, render_prompt, with_system_prompt
from personatune.errors import PersonatuneError
from personatune.models import load_model, load_tokenizer, resolve_ref


@dataclass
class Persona:
    """A trained persona ready to chat: its spec, tokenizer, and the base model with the
    adapter attached (a peft ``PeftModel``)."""

    spec: PersonaSpec
    tokenizer: object
    model: object
    path: Path


def load_persona(path: str | Path, device: torch.device | None = None) -> Persona:
    """Load a persona directory written by ``personatune train``.

    Raises:
        PersonatuneError: the folder is not a finished persona directory.
    """
    from peft import PeftModel

    path = Path(path)
    if not (path / "adapter_config.json").exists() or not (path / "config.yaml").exists():
        raise PersonatuneError(
            f"{path}: not a persona directory (no adapter_config.json or "
            "config.yaml); train one with personatune train"
        )
    spec = load_spec(path / "config.yaml")
    ref = resolve_ref(spec.model.name, spec.model.revision, spec.base_dir)
    tokenizer = load_tokenizer(ref)
    ensure_chat_template(tokenizer, spec.model.chat_template)
    base = load_model(ref, spec.model.quantization, device)
    model = PeftModel.from_pretrained(base, path)
    model.eval()
    return Persona(spec, tokenizer, model, path)


def _inputs(tokenizer, conversations: list[list[dict]], device):
    texts = [render_prompt(tokenizer, c) for c in conversations]
    side, tokenizer.padding_side = tokenizer.padding_side, "left"
    try:
        batch = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
    finally:
        tokenizer.padding_side = side
    return batch.to(device)


@torch.inference_mode()
def generate(
    model,
    tokenizer,
    conversations: list[list[dict]],
    max_new_tokens: int = 128,
    temperature: float = 0.0,
    batch_size: int = 16,
    seed: int = 0,
) -> list[str]:
    """Answer each conversation (``{"role", "content"}`` dicts ending with a user turn).

    Greedy when ``temperature`` is 0, else sampled with ``seed``. Conversations are run
    in batches of ``batch_size``, left-padded. Returns the answers without special tokens.
    """
    from transformers import set_seed

    answers = []
    device = next(model.parameters()).device
    for i in range(0, len(conversations), batch_size):
        batch = _inputs(tokenizer, conversations[i : i + batch_size], device)
        set_seed(seed)
        out = model.generate(
            **batch,
            max_new_tokens=max_new_tokens,
            do_sample=temperature > 0,
            temperature=temperature if temperature > 0 else None,
            top_p=None,
            top_k=None,
            pad_token_id=tokenizer.pad_token_id,
        )
        new = out[:, batch["input_ids"].shape[1] :]
        answers += [t.strip() for t in tokenizer.batch_decode(new, skip_special_tokens=True)]
    return answers


def ask(persona: Persona, prompts: list[str], **kwargs) -> list[str]:
    """Answer single-turn ``prompts`` with the persona's system prompt."""
    convs = [
        with_system_prompt([{"role": "user", "content": p}], persona.spec.system_prompt)
        for p in prompts
    ]
    return generate(persona.model, persona.tokenizer, convs, **kwargs)


def stream(
    model,
    tokenizer,
    conversation: list[dict],
    max_new_tokens: int = 256,
    temperature: float = 0.0,
    seed: int = 0,
) -> Iterator[str]:
    """Yield the answer to ``conversation`` piece by piece as it is generated."""
    from transformers import TextIteratorStreamer, set_seed

    batch = _inputs(tokenizer, [conversation], next(model.parameters()).device)
    streamer = TextIteratorStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
    set_seed(seed)
    kwargs = dict(
        **batch,
        streamer=streamer,
        max_new_tokens=max_new_tokens,
        do_sample=temperature > 0,
        temperature=temperature if temperature > 0 else None,
        top_p=None,
        top_k=None,
        pad_token_id=tokenizer.pad_token_id,
    )
    thread = threading.Thread(target=lambda: torch.inference_mode()(model.generate)(**kwargs))
    thread.start()
    yield from streamer
    thread.join()
