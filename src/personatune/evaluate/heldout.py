"""``personatune eval-heldout``: conditional perplexity of held-out responses given their
prompts, base model against the persona, written as a JSON report and a plot."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

from personatune.config import DataSource
from personatune.data.dataset import persona_split
from personatune.data.loaders import load_source
from personatune.engine import load_persona
from personatune.errors import PersonatuneError
from personatune.evaluate.perplexity import heldout_perplexity, plot_heldout
from personatune.io import check_replaceable_file, check_writable, write_json
from personatune.persona import read_spec


def heldout_examples(persona_dir: Path, spec, data: Sequence[Path] = ()) -> tuple[list, list, list]:
    """``(examples, paths, notes)`` to score: every example of the ``data`` files when
    given, else the held-out examples recorded at training time for the sources that
    have an ``eval_path`` (:func:`personatune.data.dataset.persona_split`).

    Raises:
        PersonatuneError: no ``data`` and no source with ``eval_path``, or bad data files.
    """
    if data:
        paths = [str(d) for d in data]
        examples = [ex for p in paths for ex in load_source(DataSource(path=p), spec.base_dir)]
        return examples, paths, []
    if not any(s.eval_path for s in spec.data):
        raise PersonatuneError(f"{persona_dir}: no data source has eval_path; pass --data FILE")
    split = persona_split(spec, persona_dir)
    examples = [ex for s, held in zip(spec.data, split.heldout) if s.eval_path for ex in held]
    return examples, [s.eval_path for s in spec.data if s.eval_path], split.notes


def eval_heldout(
    persona_dir: str | Path,
    *,
    data: Sequence[Path] = (),
    out: Path | None = None,
    max_length: int = 1024,
    batch_size: int = 4,
    limit: int | None = None,
    overwrite: bool = False,
    progress: Callable[[int, int], Callable[[int], None]] | None = None,
    note: Callable[[str], None] = lambda s: None,
) -> tuple[dict, Path, Path]:
    """Score held-out responses with the persona and its base model
    (:func:`personatune.evaluate.perplexity.heldout_perplexity`) and write the report
    (default ``PERSONA_DIR/heldout_perplexity.json``) and a PNG plot beside it.

    Args:
        data: prompt/response files to score instead of the recorded held-out set.
        max_length: conversations longer than this many tokens are skipped and counted.
        batch_size: conversations per forward pass.
        limit: score only the first N examples.
        progress: ``progress(total)`` returns the callback advanced by conversations
            scored (each is scored twice, tuned then base).
        note: receives one-line warnings (a changed data file, a derived split).

    Returns:
        ``(report, json path, png path)``.

    Raises:
        PersonatuneError: an existing report without ``overwrite``, bad arguments, not a
            persona directory, nothing to score.
    """
    persona_dir = Path(persona_dir)
    out = Path(out) if out else persona_dir / "heldout_perplexity.json"
    plot = out.with_suffix(".png")
    if (out.exists() or plot.exists()) and not overwrite:
        raise PersonatuneError(f"{out} already exists; pass --overwrite to replace it")
    spec = read_spec(persona_dir)  # --overwrite never replaces an input or a foreign file
    protect, keys = [*spec.input_paths, *data], ("persona", "base", "tuned")
    check_replaceable_file(out, "held-out perplexity report", protect, keys)
    if plot.exists():  # the plot is ours only if the report beside it is
        check_replaceable_file(plot, "held-out perplexity plot", protect)
        if not out.exists():
            raise PersonatuneError(
                f"{plot}: not a plot that personatune wrote; choose another --out"
            )
    check_writable(out, "report")
    if max_length < 8 or batch_size < 1 or (limit is not None and limit < 1):
        raise PersonatuneError(
            "--max-length must be at least 8, --batch-size and --limit 1, --threads 0 or more"
        )
    examples, paths, notes = heldout_examples(persona_dir, spec, data)
    for n in notes:
        note(n)
    examples = examples[:limit] if limit else examples
    p = load_persona(persona_dir)
    advance = progress(2 * len(examples)) if progress else None
    report = heldout_perplexity(p, examples, max_length, batch_size, progress=advance)
    report = {"persona": str(persona_dir), "data": paths, **report}
    out.parent.mkdir(parents=True, exist_ok=True)
    write_json(out, report)
    plot_heldout(report, plot, f"{p.spec.name}: held-out conditional perplexity")
    return report, out, plot
