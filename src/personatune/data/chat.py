"""Render a conversation with the model's chat template into token ids and a loss mask."""

from __future__ import annotations

from dataclasses import dataclass

from personatune.errors import PersonatuneError

#: Fallback for base models without a chat template (Falcon-7B, Phi-2). Plain-text role
#: headers, and the tokenizer's EOS token ends every turn, so the model learns to stop
#: where ``generate`` already stops (``generation_config.eos_token_id``).
FALLBACK_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{ '### System:\n' + message['content'] + '\n\n' }}"
    "{% elif message['role'] == 'user' %}{{ '### User:\n' + message['content'] + '\n\n' }}"
    "{% else %}{{ '### Assistant:\n' + message['content'] + eos_token + '\n\n' }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '### Assistant:\n' }}{% endif %}"
)


@dataclass
class Rendered:
    """A tokenised example.

    Attributes:
        input_ids: token ids, ``(seq_len,)``.
        mask: ``(seq_len,)`` booleans, True where the loss is computed: the assistant's
            content and its end-of-turn token, or every token of a text example.
        truncated: whether the example was cut to ``max_length`` tokens.
    """

    input_ids: list[int]
    mask: list[bool]
    truncated: bool = False

    @property
    def labels(self) -> list[int]:
        """``input_ids`` with untrained positions set to -100 (ignored by the loss)."""
        return [t if m else -100 for t, m in zip(self.input_ids, self.mask)]


def ensure_chat_template(tokenizer, template: str | None = None) -> None:
    """Give ``tokenizer`` a chat template: ``template`` if set, else keep its own, else
    :data:`FALLBACK_TEMPLATE`."""
    if template:
        tokenizer.chat_template = template
    elif not getattr(tokenizer, "chat_template", None):
        tokenizer.chat_template = FALLBACK_TEMPLATE


def with_system_prompt(messages: list[dict], system_prompt: str) -> list[dict]:
    """Prepend ``system_prompt`` unless the conversation has a system message or the
    prompt is empty."""
    if not system_prompt or (messages and messages[0]["role"] == "system"):
        return list(messages)
    return [{"role": "system", "content": system_prompt}, *messages]


def _template(tokenizer, messages: list[dict], add_generation_prompt: bool = False) -> str:
    try:
        return tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=add_generation_prompt
        )
    except Exception as e:  # jinja raises TemplateError for e.g. unsupported system roles
        if messages and messages[0]["role"] == "system" and "system" in str(e).lower():
            # Templates without a system role (Gemma, early Mistral): fold it into turn 1.
            content = messages[0]["content"] + "\n\n" + messages[1]["content"]
            first = {**messages[1], "content": content}
            return _template(tokenizer, [first, *messages[2:]], add_generation_prompt)
        raise PersonatuneError(f"the chat template failed on this conversation: {e}") from None


def render_prompt(tokenizer, messages: list[dict]) -> str:
    """The text the model sees before it answers: the conversation plus the assistant
    header (``add_generation_prompt``)."""
    return _template(tokenizer, messages, add_generation_prompt=True)


def render_chat(tokenizer, messages: list[dict], max_length: int | None = None) -> Rendered:
    """Render a conversation with the tokenizer's chat template and mark the trained tokens.

    The assistant spans are found in characters by rendering growing prefixes of the
    conversation: turn ``i`` spans from the end of ``messages[:i]`` with the generation
    prompt to the end of ``messages[:i+1]``, trailing whitespace excluded, so the span is
    the content plus the end-of-turn token (``<|im_end|>``). Tokens are marked from the
    tokenizer's offset mapping of the whole text, so ids equal what inference sees.

    Args:
        tokenizer: a fast tokenizer with a chat template (see :func:`ensure_chat_template`).
        messages: ``{"role", "content"}`` dicts.
        max_length: cut to this many tokens (None keeps all).

    Raises:
        PersonatuneError: the template fails, or renders a prefix that the full
            conversation does not start with (a template that rewrites earlier turns).
    """
    full = _template(tokenizer, messages)
    spans = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        before = _template(tokenizer, messages[:i], add_generation_prompt=True) if i else ""
        through = _template(tokenizer, messages[: i + 1])
        if not (through.startswith(before) and full.startswith(through.rstrip())):
            raise PersonatuneError(
                "the chat template does not render conversations prefix by prefix, so "
                "assistant tokens cannot be located; set model.chat_template"
            )
        spans.append((len(before), len(through.rstrip())))
    enc = tokenizer(full, add_special_tokens=False, return_offsets_mapping=True)
    mask = [any(a <= start < b for a, b in spans) for start, _ in enc["offset_mapping"]]
    return _cut(Rendered(enc["input_ids"], mask), max_length)


def render_text(tokenizer, text: str, max_length: int | None = None) -> Rendered:
    """Tokenise raw text for continued pre-training: every token trained, EOS appended."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    return _cut(Rendered(ids, [True] * len(ids)), max_length)


def _cut(r: Rendered, max_length: int | None) -> Rendered:
    if max_length is None or len(r.input_ids) <= max_length:
        return r
    return Rendered(r.input_ids[:max_length], r.mask[:max_length], truncated=True)
