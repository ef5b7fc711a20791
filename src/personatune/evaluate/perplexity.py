"""Conditional perplexity of responses given their prompts, and the held-out comparison of
a persona against its base model (``personatune eval-heldout``)."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from personatune.data.chat import render_chat, with_system_prompt
from personatune.data.dataset import persona_system_prompt
from personatune.errors import PersonatuneError
from personatune.models import use_bf16

#: The provenance key of ``Example.meta`` that held-out results are broken down by.
GROUP_BY = "book"


@dataclass
class Perplexity:
    """Result of :func:`conditional_perplexity`.

    Attributes:
        perplexity: ``exp(nll)``; ``nan`` when no token was scored.
        nll: mean negative log-likelihood per scored token, in nats.
        tokens: response tokens scored (end-of-turn tokens included).
        examples: conversations scored.
        skipped_overlong: conversations longer than ``max_length`` tokens, not scored.
        per_example: ``(summed NLL in nats, tokens)`` per input conversation, in input
            order; ``None`` for a skipped one. Pool groups as ``exp(sum nll / sum tokens)``.
    """

    perplexity: float
    nll: float
    tokens: int
    examples: int
    skipped_overlong: int
    per_example: list[tuple[float, int] | None] = field(default_factory=list, repr=False)


def pooled(parts: Sequence[tuple[float, int] | None]) -> tuple[float, int]:
    """``(perplexity, tokens)`` pooled over ``(summed NLL, tokens)`` parts (None skipped):
    ``exp(sum nll / sum tokens)``, ``nan`` when there are no tokens."""
    nll = sum(p[0] for p in parts if p)
    tokens = sum(p[1] for p in parts if p)
    return (math.exp(nll / tokens) if tokens else math.nan), tokens


@torch.inference_mode()
def conditional_perplexity(
    model,
    tokenizer,
    conversations: Sequence[list[dict]],
    max_length: int = 1024,
    batch_size: int = 4,
    progress: Callable[[int], None] | None = None,
    bf16: bool | None = None,
) -> Perplexity:
    """Perplexity of the assistant turns of ``conversations`` given everything before them.

    Each conversation (``{"role", "content"}`` dicts, typically system, user, assistant)
    is rendered with the tokenizer's chat template by
    :func:`personatune.data.chat.render_chat`; the scored tokens are exactly the ones
    training puts the loss on: each assistant turn's content and its end-of-turn token.
    With ``N`` scored tokens ``y_i`` over all conversations,
    ``PPL = exp(-(1/N) * sum_i log p(y_i | tokens before y_i))`` (token-pooled, natural
    log), the "conditional perplexity on response tokens" of seed system 2 and the usual
    definition (Jurafsky & Martin, *Speech and Language Processing*, ch. 3).

    Args:
        model: a causal LM (``model(input_ids, attention_mask).logits`` of shape
            ``(batch, seq, vocab)``), put in eval mode for the call.
        tokenizer: its tokenizer, with a chat template.
        conversations: the conversations to score.
        max_length: longer conversations (in tokens) are skipped and counted, not cut,
            so that no response is scored without its prompt. Default 1024.
        batch_size: conversations per forward pass (grouped by length; right-padded).
        progress: called with the number of conversations done after each batch.
        bf16: run the forward pass under bf16 autocast (the log-softmax is in float32).
            None (default) follows training: :func:`personatune.models.use_bf16`.

    Raises:
        PersonatuneError: the chat template fails on a conversation.
    """
    rendered = [render_chat(tokenizer, c) for c in conversations]
    keep = [i for i, r in enumerate(rendered) if len(r.input_ids) <= max_length and any(r.mask)]
    skipped = sum(len(r.input_ids) > max_length for r in rendered)
    keep.sort(key=lambda i: len(rendered[i].input_ids))
    device = next(model.parameters()).device
    if bf16 is None:
        bf16 = use_bf16(device)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    per: list[tuple[float, int] | None] = [None] * len(rendered)
    was_training = model.training
    model.eval()
    try:
        for b in range(0, len(keep), batch_size):
            idx = keep[b : b + batch_size]
            width = max(len(rendered[i].input_ids) for i in idx)
            ids = torch.full((len(idx), width), pad, dtype=torch.long)
            labels = torch.full((len(idx), width), -100, dtype=torch.long)
            attn = torch.zeros((len(idx), width), dtype=torch.long)
            for row, i in enumerate(idx):
                r = rendered[i]
                n = len(r.input_ids)
                ids[row, :n] = torch.tensor(r.input_ids)
                labels[row, :n] = torch.tensor(r.labels)
                attn[row, :n] = 1
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
                logits = model(input_ids=ids.to(device), attention_mask=attn.to(device)).logits
            target = labels[:, 1:].to(device)  # token t is predicted at position t - 1
            scored = target != -100
            nll = torch.zeros(target.shape, dtype=torch.float32, device=device)
            nll[scored] = torch.nn.functional.cross_entropy(
                logits[:, :-1][scored].float(), target[scored], reduction="none"
            )
            for row, i in enumerate(idx):
                per[i] = (float(nll[row].sum()), int(scored[row].sum()))
            if progress:
                progress(len(idx))
    finally:
        model.train(was_training)
    ppl, tokens = pooled(per)
    nll = math.log(ppl) if tokens else math.nan
    examples = sum(p is not None for p in per)
    return Perplexity(ppl, nll, tokens, examples, skipped, per)


def heldout_perplexity(
    persona,
    examples: Sequence,
    max_length: int = 1024,
    batch_size: int = 4,
    progress: Callable[[int], None] | None = None,
) -> dict:
    """Conditional perplexity of a persona and of its base model (adapter disabled) on
    held-out examples, both under the persona's system prompt, as rendered for training,
    overall and per :data:`GROUP_BY` (``book``).

    Args:
        persona: a :class:`personatune.engine.Persona`.
        examples: :class:`personatune.data.loaders.Example` conversations (text examples
            are not allowed: they have no prompt).
        progress: called with the number of conversations done (each is scored twice).

    Returns:
        ``{"examples", "tokens", "skipped_overlong", "max_length", "bf16_autocast", "base":
        {"perplexity", "nll"}, "tuned": {...}, "reduction", "group_by", "groups": {value:
        {"examples", "tokens", "base", "tuned"}}}``; NLL in nats per token.

    Raises:
        PersonatuneError: a text example, or no conversation short enough to score.
    """
    convs = []
    for ex in examples:
        if not ex.messages:
            raise PersonatuneError(
                f"{ex.where}: a text example has no prompt to condition on; "
                "give prompt/response or chat data"
            )
        convs.append(with_system_prompt(ex.messages, persona_system_prompt(persona.spec, ex)))
    bf16 = use_bf16(next(persona.model.parameters()).device)
    args = {"max_length": max_length, "batch_size": batch_size, "progress": progress, "bf16": bf16}
    tuned = conditional_perplexity(persona.model, persona.tokenizer, convs, **args)
    if not tuned.examples:
        raise PersonatuneError(
            f"all {len(convs)} held-out examples are longer than "
            f"--max-length {max_length} tokens; raise it"
        )
    with persona.model.disable_adapter():
        base = conditional_perplexity(persona.model, persona.tokenizer, convs, **args)
    groups: dict[str, dict] = {}
    for value in dict.fromkeys(
        str(ex.meta.get(GROUP_BY)) for ex in examples if ex.meta.get(GROUP_BY) is not None
    ):
        rows = [i for i, ex in enumerate(examples) if str(ex.meta.get(GROUP_BY)) == value]
        b, n = pooled([base.per_example[i] for i in rows])
        t, _ = pooled([tuned.per_example[i] for i in rows])
        groups[value] = {
            "examples": sum(base.per_example[i] is not None for i in rows),
            "tokens": n,
            "base": b,
            "tuned": t,
        }
    return {
        "examples": tuned.examples,
        "tokens": tuned.tokens,
        "skipped_overlong": tuned.skipped_overlong,
        "max_length": max_length,
        "bf16_autocast": bf16,
        "base": {"perplexity": base.perplexity, "nll": base.nll},
        "tuned": {"perplexity": tuned.perplexity, "nll": tuned.nll},
        "reduction": 1 - tuned.perplexity / base.perplexity,
        "group_by": GROUP_BY,
        "groups": groups,
    }


def plot_heldout(report: dict, path: Path, title: str = "") -> None:
    """Bar chart of base and tuned conditional perplexity, overall and per group (with
    the number of examples), saved as a PNG at ``path`` through a temporary file."""
    from personatune.evaluate.report import pyplot, save_png

    plt = pyplot()
    names = [
        f"all ({report['examples']})",
        *(
            f"{n if len(n) <= 18 else n[:16] + '…'} ({g['examples']})"
            for n, g in report["groups"].items()
        ),
    ]
    base = [report["base"]["perplexity"], *(g["base"] for g in report["groups"].values())]
    tuned = [report["tuned"]["perplexity"], *(g["tuned"] for g in report["groups"].values())]
    x = range(len(names))
    fig, ax = plt.subplots(figsize=(max(5, 1.3 * len(names)), 4))
    for shift, values, label in ((-0.2, base, "base"), (0.2, tuned, "tuned")):
        bars = ax.bar([i + shift for i in x], values, 0.4, label=label)
        ax.bar_label(bars, fmt="%.1f", fontsize=7)
    ax.set_xticks(list(x), names, rotation=20, ha="right", fontsize=8)
    ax.set_ylabel("conditional perplexity (response tokens)")
    ax.set_title(title or "held-out conditional perplexity, lower is better")
    ax.legend()
    fig.tight_layout()
    save_png(fig, path, dpi=120)
