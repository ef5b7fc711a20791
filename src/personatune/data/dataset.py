"""Turn a persona spec's data sources into tokenised train and eval sets."""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass, field

from personatune.config import DataSource, PersonaSpec
from personatune.data.chat import Rendered, render_chat, render_text, with_system_prompt
from personatune.data.loaders import Example, load_source
from personatune.errors import PersonatuneError


@dataclass
class SourceStats:
    """Counts for one data source (examples, not tokens, unless named so)."""

    path: str
    loaded: int = 0
    duplicates: int = 0
    train: int = 0
    eval: int = 0
    truncated: int = 0
    dropped_overlong: int = 0
    tokens: int = 0
    trained_tokens: int = 0


@dataclass
class PreparedData:
    """Tokenised data ready for the Trainer.

    Attributes:
        train: rows ``{"input_ids", "labels"}``, each ``(seq_len,)`` lists, mixed by weight.
        eval: held-out rows in the same form.
        eval_examples: the held-out :class:`Example` objects (for generation and reports).
        stats: per-source counts.
    """

    train: list[dict]
    eval: list[dict]
    eval_examples: list[Example]
    stats: list[SourceStats] = field(default_factory=list)

    @property
    def train_tokens(self) -> int:
        """Non-padding tokens in one epoch of ``train``."""
        return sum(len(r["input_ids"]) for r in self.train)


def persona_system_prompt(spec: PersonaSpec, example: Example, use_system: bool = True) -> str:
    """The system prompt of an example: the persona's, plus Persona-Chat facts if any."""
    prompt = spec.system_prompt if use_system else ""
    if example.persona_facts:
        facts = "\n".join(f"- {f}" for f in example.persona_facts)
        prompt = (prompt + "\n\n" if prompt else "") + f"Your persona:\n{facts}"
    return prompt


def render_example(spec: PersonaSpec, tokenizer, ex: Example, use_system: bool = True) -> Rendered:
    """Render one example as the trainer sees it (system prompt added, cut to length)."""
    limit = spec.train.max_seq_length
    if ex.text is not None:
        return render_text(tokenizer, ex.text, limit)
    messages = with_system_prompt(ex.messages, persona_system_prompt(spec, ex, use_system))
    return render_chat(tokenizer, messages, limit)


def split_eval(
    examples: list[Example], fraction: float, seed: int, size: int | None = None
) -> tuple[list, list]:
    """Deterministic train/eval split: examples are ordered by a seeded hash of their
    content and the first ``round(n * fraction)`` go to eval, or exactly ``size`` when it
    is given (a source's ``eval_size``). The split does not depend on row order, and an
    example stays on its side when other rows are added."""
    n_eval = min(size, len(examples)) if size is not None else round(len(examples) * fraction)
    order = sorted(
        range(len(examples)),
        key=lambda i: hashlib.sha256(f"{seed}:{examples[i].key()}".encode()).hexdigest(),
    )
    held = set(order[:n_eval])
    train = [e for i, e in enumerate(examples) if i not in held]
    return train, [e for i, e in enumerate(examples) if i in held]


def _mix(rows: list[dict], weight: float, rng: random.Random) -> list[dict]:
    whole, frac = int(weight), weight - int(weight)
    return rows * whole + rng.sample(rows, round(len(rows) * frac))


def load_examples(spec: PersonaSpec) -> list[tuple[list[Example], SourceStats]]:
    """Load every source, drop duplicates within and across sources, apply subset sizes."""
    seen: set[str] = set()
    out = []
    for source in spec.data:
        examples = load_source(source, spec.base_dir)
        stats = SourceStats(source.path, loaded=len(examples))
        kept = []
        for ex in examples:
            k = ex.key()
            if k in seen:
                stats.duplicates += 1
                continue
            seen.add(k)
            kept.append(ex)
        if source.subset_size and len(kept) > source.subset_size:
            kept = random.Random(spec.train.seed).sample(kept, source.subset_size)
        out.append((kept, stats))
    return out


def split_source(
    spec: PersonaSpec,
    source: DataSource,
    examples: list[Example],
    stats: SourceStats | None = None,
    train_keys: frozenset[str] | set[str] = frozenset(),
) -> tuple[list[Example], list[Example]]:
    """Train and eval examples of one source, given its kept ``examples``.

    With ``source.eval_path``, every example trains and the eval side is that file's
    examples, without repeats and without those whose :meth:`Example.key` is in
    ``train_keys`` (the training data of all sources; each one dropped is counted in
    ``stats.duplicates``). Otherwise :func:`split_eval` holds out ``source.eval_size``
    examples or the share ``train.eval_split``.

    Raises:
        PersonatuneError: an ``eval_size`` that leaves no training example, or a bad
            ``eval_path`` file (see :func:`load_source`).
    """
    if source.eval_path is not None:
        held = load_source(source.model_copy(update={"path": source.eval_path}), spec.base_dir)
        seen, kept = set(train_keys), []
        for ex in held:
            if ex.key() in seen:
                if stats is not None:
                    stats.duplicates += 1
                continue
            seen.add(ex.key())
            kept.append(ex)
        return list(examples), kept
    if source.eval_size is not None and source.eval_size >= len(examples):
        raise PersonatuneError(
            f"{source.path}: eval_size {source.eval_size} leaves no training examples "
            f"({len(examples)} kept); lower eval_size or raise subset_size"
        )
    return split_eval(examples, spec.train.eval_split, spec.train.seed, source.eval_size)


def prepare_data(spec: PersonaSpec, tokenizer) -> PreparedData:
    """Load, deduplicate, split, tokenise and mix the spec's data.

    Over-long examples are cut to ``train.max_seq_length`` tokens or dropped, as
    ``train.overlong`` says; a cut example that keeps no trained token is dropped too.
    Mixing weights apply to the training side only. A source's eval set is its
    ``eval_path`` file, or ``eval_size`` examples held out, otherwise the share
    ``train.eval_split`` (see :func:`split_source`).

    Raises:
        PersonatuneError: bad data (see :func:`load_source`), or an ``eval_size`` that
            leaves a source no training example.
    """
    rng = random.Random(spec.train.seed)
    train_rows, eval_rows, eval_examples, all_stats = [], [], [], []
    loaded = load_examples(spec)
    train_keys = {ex.key() for examples, _ in loaded for ex in examples}
    for (examples, stats), source in zip(loaded, spec.data):
        train_ex, eval_ex = split_source(spec, source, examples, stats, train_keys)
        rows = {"train": [], "eval": []}
        for side, exs in (("train", train_ex), ("eval", eval_ex)):
            for ex in exs:
                r = render_example(spec, tokenizer, ex, source.system_prompt)
                if r.truncated:
                    stats.truncated += 1
                    if spec.train.overlong == "drop" or not any(r.mask):
                        stats.dropped_overlong += 1
                        continue
                stats.tokens += len(r.input_ids)
                stats.trained_tokens += sum(r.mask)
                rows[side].append({"input_ids": r.input_ids, "labels": r.labels})
                if side == "eval":
                    eval_examples.append(ex)
        stats.train, stats.eval = len(rows["train"]), len(rows["eval"])
        train_rows += _mix(rows["train"], source.weight, rng)
        eval_rows += rows["eval"]
        all_stats.append(stats)
    return PreparedData(train_rows, eval_rows, eval_examples, all_stats)
