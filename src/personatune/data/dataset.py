"""Turn a persona spec's data sources into tokenised train and eval sets."""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass, field
from pathlib import Path

from personatune.config import DataSource, PersonaSpec
from personatune.data.chat import Rendered, render_chat, render_text, with_system_prompt
from personatune.data.loaders import Example, load_source
from personatune.errors import PersonatuneError
from personatune.io import files_hash, read_jsonl
from personatune.persona import HELDOUT, read_manifest


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
        split: which examples of each source trained and which were held out (the
            held-out side is recorded in the persona directory, :func:`heldout_rows`).
    """

    train: list[dict]
    eval: list[dict]
    eval_examples: list[Example]
    stats: list[SourceStats] = field(default_factory=list)
    split: Split | None = None

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


def _unique(examples: list[Example], seen: set[str], stats: SourceStats) -> list[Example]:
    """``examples`` without those whose :meth:`Example.key` is in ``seen`` or repeats,
    each dropped one counted in ``stats.duplicates``; the kept keys join ``seen``."""
    kept = []
    for ex in examples:
        k = ex.key()
        if k in seen:
            stats.duplicates += 1
            continue
        seen.add(k)
        kept.append(ex)
    return kept


def load_examples(spec: PersonaSpec) -> list[tuple[list[Example], SourceStats]]:
    """Load every source, drop duplicates within and across sources, apply subset sizes."""
    seen: set[str] = set()
    out = []
    for source in spec.data:
        examples = load_source(source, spec.base_dir)
        stats = SourceStats(source.path, loaded=len(examples))
        kept = _unique(examples, seen, stats)
        if source.subset_size and len(kept) > source.subset_size:
            kept = random.Random(spec.train.seed).sample(kept, source.subset_size)
        out.append((kept, stats))
    return out


def split_source(
    spec: PersonaSpec,
    source: DataSource,
    examples: list[Example],
    stats: SourceStats,
    train_keys: set[str],
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
        return list(examples), _unique(held, set(train_keys), stats)
    if source.eval_size is not None and source.eval_size >= len(examples):
        raise PersonatuneError(
            f"{source.path}: eval_size {source.eval_size} leaves no training examples "
            f"({len(examples)} kept); lower eval_size or raise subset_size"
        )
    return split_eval(examples, spec.train.eval_split, spec.train.seed, source.eval_size)


@dataclass
class Split:
    """The train/held-out split of a spec's data, per source (in ``spec.data`` order).

    Attributes:
        train: per source, the examples that train (before mixing weights).
        heldout: per source, the held-out examples (never trained on).
        recorded: True when the held-out side was read from the persona directory's
            ``heldout.jsonl``; False when derived from the data files.
        notes: one-line warnings for the user (a changed data file, a derived split).
    """

    train: list[list[Example]]
    heldout: list[list[Example]]
    recorded: bool = False
    notes: list[str] = field(default_factory=list)


def data_files(spec: PersonaSpec) -> list[Path]:
    """The local data files of the spec's sources, whose hash ``persona.json`` keeps
    (``data.hash``); Hub datasets (``hf:``) are left out."""
    return [spec.resolve(s.path) for s in spec.data if not s.path.startswith("hf:")]


def derive_split(spec: PersonaSpec, loaded: list[tuple[list[Example], SourceStats]]) -> Split:
    """Split the spec's data from the data files (:func:`split_source` per source), as
    ``personatune train`` does; ``loaded`` is :func:`load_examples`'s result (duplicates
    are counted into its stats).

    Raises:
        PersonatuneError: bad data files, or an ``eval_size`` leaving no training example.
    """
    train_keys = {ex.key() for examples, _ in loaded for ex in examples}
    split = Split([], [])
    for (examples, stats), source in zip(loaded, spec.data):
        train, held = split_source(spec, source, examples, stats, train_keys)
        split.train.append(train)
        split.heldout.append(held)
    return split


def heldout_rows(spec: PersonaSpec, split: Split) -> list[dict]:
    """The held-out record written to ``heldout.jsonl`` at training time: one row per
    held-out example, ``{"source": index in spec.data, "path", "sha256" of its content
    key, "messages", "text", "persona_facts", "where", "meta"}``. The examples are stored
    whole, so the evaluating commands use exactly this set even when the data files
    change after training."""
    return [
        {
            "source": i,
            "path": spec.data[i].path,
            "sha256": hashlib.sha256(ex.key().encode()).hexdigest(),
            "messages": ex.messages,
            "text": ex.text,
            "persona_facts": ex.persona_facts,
            "where": ex.where,
            "meta": ex.meta,
        }
        for i, held in enumerate(split.heldout)
        for ex in held
    ]


def persona_split(spec: PersonaSpec, persona_dir: str | Path) -> Split:
    """The split a persona was trained with: the held-out examples recorded in its
    ``heldout.jsonl``, and as training side every current example of each source that is
    not held out. A directory without the record (trained before it existed) gets the
    split derived again from the data files, with a note. When the data files' hash no
    longer matches ``persona.json``'s ``data.hash``, a note says so and the recorded
    split is still used.

    Raises:
        PersonatuneError: bad data files, or an unreadable record (names the line).
    """
    persona_dir = Path(persona_dir)
    loaded = load_examples(spec)
    notes = []
    recorded_hash = (read_manifest(persona_dir).get("data") or {}).get("hash")
    files = data_files(spec)
    if recorded_hash and all(f.is_file() for f in files) and files_hash(files) != recorded_hash:
        notes.append(
            f"the data files changed since {persona_dir} was trained (hash differs from "
            "persona.json); the held-out set is the recorded one, the training side is "
            "read from the current files"
        )
    record = persona_dir / HELDOUT
    if not record.is_file():
        split = derive_split(spec, loaded)
        split.notes = [
            *notes,
            f"{persona_dir} has no {HELDOUT} (trained by an older personatune): the "
            "held-out examples were derived again from the data files",
        ]
        return split
    heldout: list[list[Example]] = [[] for _ in spec.data]
    for n, row in enumerate(read_jsonl(record), start=1):
        i = row.get("source") if isinstance(row, dict) else None
        if not isinstance(i, int) or not 0 <= i < len(spec.data):
            raise PersonatuneError(
                f"{record}:line {n}: no valid 'source' index; retrain the persona to "
                "rewrite the record"
            )
        heldout[i].append(
            Example(
                messages=row.get("messages") or [],
                text=row.get("text"),
                where=row.get("where", ""),
                persona_facts=row.get("persona_facts") or [],
                meta=row.get("meta") or {},
            )
        )
    train = []
    for (examples, _), held in zip(loaded, heldout):
        keys = {ex.key() for ex in held}
        train.append([ex for ex in examples if ex.key() not in keys])
    return Split(train, heldout, recorded=True, notes=notes)


def prepare_data(spec: PersonaSpec, tokenizer) -> PreparedData:
    """Load, deduplicate, split, tokenise and mix the spec's data.

    Over-long examples are cut to ``train.max_seq_length`` tokens or dropped, as
    ``train.overlong`` says; a cut example that keeps no trained token is dropped too.
    Mixing weights apply to the training side only. A source's eval set is its
    ``eval_path`` file, or ``eval_size`` examples held out, otherwise the share
    ``train.eval_split`` (see :func:`split_source`).

    Raises:
        PersonatuneError: bad data (see :func:`load_source`), or an ``eval_size`` that
            leaves a source no training example, or no data source at all.
    """
    if not spec.data:
        raise PersonatuneError(
            "data: no data source; add one (data: [{path: pairs.csv}]) or write one from "
            "the description with personatune data synthesize"
        )
    rng = random.Random(spec.train.seed)
    train_rows, eval_rows, eval_examples = [], [], []
    loaded = load_examples(spec)
    split = derive_split(spec, loaded)
    for (_, stats), source, train_ex, eval_ex in zip(loaded, spec.data, split.train, split.heldout):
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
    return PreparedData(train_rows, eval_rows, eval_examples, [s for _, s in loaded], split)
