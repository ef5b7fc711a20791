"""The Ollama Modelfile of an exported persona: its system prompt, its chat template as a
Go template, and a stop string per end-of-turn token."""

from __future__ import annotations

import json
from dataclasses import dataclass

from personatune.errors import PersonatuneError

# Distinct words that no chat template writes by itself; the template's own text is what
# surrounds them when a conversation made of them is rendered.
_S, _U1, _A1, _U2 = "SYSTEMQZX", "USERQZX1", "ASSISTANTQZX1", "USERQZX2"


@dataclass(frozen=True)
class ChatFrame:
    """A chat template reduced to the text around each message.

    A message of role ``r`` renders as ``prefix[r] + content + suffix[r]``, the
    conversation is their concatenation, ``default_system`` comes first when the
    conversation has no system message, and ``generation_prompt`` follows a conversation
    that ends on a user turn (the assistant header). ChatML (SmolLM2, Qwen2.5) and the
    personatune fallback template have this form; templates that rewrite earlier turns,
    or render a message differently by position, do not.

    Attributes:
        prefix: text before a message's content, by role (``system``, ``user``, ``assistant``).
        suffix: text after it, by role; the assistant's starts with the end-of-turn token.
        generation_prompt: the assistant header added with ``add_generation_prompt``.
        default_system: what the template writes when there is no system message ("").

    A BOS token the template writes stays in the frame: the GGUF export sets
    ``tokenizer.ggml.add_bos_token`` false, so llama.cpp and Ollama tokenize the rendered
    text as personatune does (``add_special_tokens=False``) and add no second BOS.
    """

    prefix: dict
    suffix: dict
    generation_prompt: str
    default_system: str = ""

    def render(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        """Render ``messages`` as the Go template of :func:`go_template` does: the
        reference the chat template is checked against."""
        out = [] if messages and messages[0]["role"] == "system" else [self.default_system]
        for i, m in enumerate(messages):
            last = i == len(messages) - 1
            out += [self.prefix[m["role"]], m["content"]]
            if not (last and m["role"] == "assistant"):
                out.append(self.suffix[m["role"]])
        if add_generation_prompt and messages and messages[-1]["role"] != "assistant":
            out.append(self.generation_prompt)
        return "".join(out)


def _around(text: str, word: str, what: str) -> tuple[str, str]:
    if text.count(word) != 1:
        raise _inexpressible(f"the {what} is not written verbatim once")
    before, after = text.split(word)
    return before, after


def _inexpressible(why: str) -> PersonatuneError:
    return PersonatuneError(
        f"the persona's chat template cannot be written as an Ollama TEMPLATE ({why}); "
        "export with --gguf only and use the template stored in the GGUF file"
    )


def chat_frame(tokenizer) -> ChatFrame:
    """Read the :class:`ChatFrame` of ``tokenizer.chat_template`` by rendering short
    conversations of marker words, then check it: the frame must reproduce the template's
    own rendering of conversations with and without a system message, of one and two
    turns, with the generation prompt.

    Raises:
        PersonatuneError: the template has no system role, rewrites earlier turns, or
            renders some message in a way the frame cannot express (one line, why).
    """

    def render(messages, gen=False):
        try:
            return tokenizer.apply_chat_template(
                messages, tokenize=False, add_generation_prompt=gen
            )
        except Exception as e:  # jinja's TemplateError, or a raise_exception in the template
            raise _inexpressible(f"it fails on a {len(messages)}-message conversation: {e}")

    sys_, user1, asst1 = (
        {"role": "system", "content": _S},
        {"role": "user", "content": _U1},
        {"role": "assistant", "content": _A1},
    )
    t_s, t_su, t_sua = render([sys_]), render([sys_, user1]), render([sys_, user1, asst1])
    t_gen = render([sys_, user1], gen=True)
    if not (t_su.startswith(t_s) and t_sua.startswith(t_su) and t_gen.startswith(t_su)):
        raise _inexpressible("a longer conversation does not start with a shorter one")
    prefix, suffix = {}, {}
    prefix["system"], suffix["system"] = _around(t_s, _S, "system prompt")
    prefix["user"], suffix["user"] = _around(t_su[len(t_s) :], _U1, "user message")
    prefix["assistant"], suffix["assistant"] = _around(t_sua[len(t_su) :], _A1, "answer")
    frame = ChatFrame(prefix, suffix, t_gen[len(t_su) :])
    alone = prefix["user"] + _U1 + suffix["user"]
    t_u = render([user1])
    if t_u != alone:
        if not t_u.endswith(alone):
            raise _inexpressible("a conversation without a system message renders differently")
        frame = ChatFrame(prefix, suffix, frame.generation_prompt, t_u[: -len(alone)])
    user2 = {"role": "user", "content": _U2}
    for conv in ([user1], [sys_, user1], [user1, asst1, user2], [sys_, user1, asst1, user2]):
        if frame.render(conv) != render(conv, gen=True):
            raise _inexpressible(f"a {len(conv)}-message conversation renders differently")
    return frame


def _lit(text: str) -> str:
    # A Go interpreted string literal: JSON's escapes (\" \\ \n \t \uXXXX) are valid Go.
    return "{{ " + json.dumps(text, ensure_ascii=False) + " }}" if text else ""


def go_template(frame: ChatFrame) -> str:
    """An Ollama ``TEMPLATE`` (Go ``text/template`` over ``.Messages``) that renders as
    ``frame`` does: every literal is a quoted Go string, so no template whitespace leaks
    into the prompt, and an assistant message that ends the conversation stays open
    (Ollama's convention for continuing an answer).

    Ollama puts the Modelfile's ``SYSTEM`` first in ``.Messages`` when a request has no
    system message (see Ollama's docs/modelfile.md and template/ package).
    """
    lines = []
    if frame.default_system:
        lines.append(
            '{{- if not (and .Messages (eq (index .Messages 0).Role "system")) }}'
            + _lit(frame.default_system)
            + "{{ end }}"
        )
    lines.append("{{- range $i, $m := .Messages }}")
    lines.append("{{- $last := eq (len (slice $.Messages $i)) 1 }}")
    for role in ("system", "user", "assistant"):
        head = "{{- if" if role == "system" else "{{- else if"
        close = _lit(frame.suffix[role])
        if role == "assistant" and close:
            close = "{{ if not $last }}" + close + "{{ end }}"
        lines.append(
            f'{head} eq $m.Role "{role}" }}}}{_lit(frame.prefix[role])}{{{{ $m.Content }}}}{close}'
        )
    lines.append("{{- end }}")
    lines.append(
        '{{- if and $last (ne $m.Role "assistant") }}' + _lit(frame.generation_prompt) + "{{ end }}"
    )
    lines.append("{{- end }}")
    return "\n".join(lines)


def _triple_quoted(text: str, what: str) -> str:
    if '"""' in text:
        raise PersonatuneError(
            f'the {what} contains """, which an Ollama Modelfile cannot quote; remove it'
        )
    return f'"""{text}"""'


def modelfile(
    from_: str,
    system_prompt: str,
    template: str,
    stops: list[str],
    adapter: str | None = None,
) -> str:
    """The text of an Ollama Modelfile (docs/modelfile.md in the Ollama repository).

    Args:
        from_: the ``FROM`` model: a GGUF file path relative to the Modelfile.
        system_prompt: the persona's system prompt (``SYSTEM``); "" writes none.
        template: the Go template from :func:`go_template`.
        stops: one ``PARAMETER stop`` each: the end-of-turn strings.
        adapter: a GGUF LoRA adapter path relative to the Modelfile (``ADAPTER``), or None.

    Raises:
        PersonatuneError: the system prompt or template contains ``\"\"\"``.
    """
    lines = [f"FROM {from_}"]
    if adapter:
        lines.append(f"ADAPTER {adapter}")
    if system_prompt:
        lines.append(f"SYSTEM {_triple_quoted(system_prompt, 'system prompt')}")
    lines.append(f"TEMPLATE {_triple_quoted(template, 'chat template')}")
    lines += [f"PARAMETER stop {json.dumps(s, ensure_ascii=False)}" for s in stops]
    return "\n".join(lines) + "\n"
