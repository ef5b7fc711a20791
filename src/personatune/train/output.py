"""Where a training run builds its persona directory, and when it may start.

A run writes into ``.<name>.partial`` beside the output directory. Only a finished run
is published (renamed) to the output directory, so a crash never leaves a half-written
persona, and ``--resume`` finds its checkpoints in the partial folder.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterable
from pathlib import Path

from personatune.errors import PersonatuneError
from personatune.io import check_replaceable, partial_dir
from personatune.persona import REQUIRED


def check_output(output: Path, overwrite: bool, resume: bool, protect: Iterable[Path] = ()) -> None:
    """Refuse a run that would overwrite results, before any work. Writes nothing.

    ``protect`` lists the run's inputs (the spec's folder, data files): ``--overwrite``
    never replaces a folder that holds one, nor anything that is not a persona directory
    (:func:`personatune.io.check_replaceable`).

    Raises:
        PersonatuneError: ``output`` exists and neither ``overwrite`` nor ``resume`` is
            set, or ``overwrite`` would replace something that is not a persona directory;
            ``resume`` without an unfinished run with checkpoints; an unfinished run with
            checkpoints found without ``resume`` or ``overwrite``.
    """
    work = partial_dir(output)
    if resume:
        if not latest_checkpoint(work):
            raise PersonatuneError(
                f"{output}: no unfinished run with checkpoints to resume "
                f"(looked in {work}); start without --resume"
            )
        return
    if output.exists() and not overwrite:
        raise PersonatuneError(f"{output} already exists; pass --overwrite to replace it")
    if overwrite:
        check_replaceable(output, "persona directory", protect, REQUIRED)
    if latest_checkpoint(work) and not overwrite:
        raise PersonatuneError(
            f"{work} holds an unfinished run; pass --resume to continue "
            "it or --overwrite to start over"
        )


def prepare_output(
    output: Path, overwrite: bool, resume: bool, protect: Iterable[Path] = ()
) -> Path:
    """Check as :func:`check_output` does, then return the work folder, emptied unless
    resuming. A work folder without checkpoints (a run that died early) is discarded."""
    check_output(output, overwrite, resume, protect)
    work = partial_dir(output)
    if not resume:
        shutil.rmtree(work, ignore_errors=True)
        work.mkdir(parents=True)
    return work


def latest_checkpoint(work: Path) -> Path | None:
    """The ``checkpoint-N`` folder with the highest N under ``work/checkpoints``, or None."""
    ckpts = [
        p
        for p in (work / "checkpoints").glob("checkpoint-*")
        if p.name.split("-")[-1].isdigit() and (p / "trainer_state.json").exists()
    ]
    return max(ckpts, key=lambda p: int(p.name.split("-")[-1]), default=None)
