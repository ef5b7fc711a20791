"""The persona directory: where it is built, and its atomic hand-over.

A run writes into ``.<name>.partial`` beside the output directory. Only a finished run
is renamed to the output directory, so a crash never leaves a half-written persona, and
``--resume`` finds its checkpoints in the partial folder.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

from personatune.errors import PersonatuneError

ADAPTER_FILES = ("adapter_model.safetensors", "adapter_config.json")


def partial_dir(output: Path) -> Path:
    """The work folder of a run whose result goes to ``output``."""
    return output.parent / f".{output.name}.partial"


def check_output(output: Path, overwrite: bool, resume: bool) -> None:
    """Refuse a run that would overwrite results, before any work. Writes nothing.

    Raises:
        PersonatuneError: ``output`` exists and neither ``overwrite`` nor ``resume`` is
            set; ``resume`` without an unfinished run with checkpoints; an unfinished run
            with checkpoints found without ``resume`` or ``overwrite``.
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
    if latest_checkpoint(work) and not overwrite:
        raise PersonatuneError(
            f"{work} holds an unfinished run; pass --resume to continue "
            "it or --overwrite to start over"
        )


def prepare_output(output: Path, overwrite: bool, resume: bool) -> Path:
    """Check as :func:`check_output` does, then return the work folder, emptied unless
    resuming. A work folder without checkpoints (a run that died early) is discarded."""
    check_output(output, overwrite, resume)
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


def publish(work: Path, output: Path) -> None:
    """Move the finished ``work`` folder to ``output``, replacing an old one last."""
    old = output.parent / f".{output.name}.old{os.getpid()}"
    if output.exists():
        output.rename(old)
    work.rename(output)
    shutil.rmtree(old, ignore_errors=True)


def write_json(path: Path, data: dict) -> None:
    """Write JSON through a temporary file and a rename, so readers never see half."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, default=str) + "\n")
    tmp.replace(path)


def files_hash(paths: list[Path]) -> str:
    """sha256 over the bytes of ``paths`` in order (the persona's data hash)."""
    digest = hashlib.sha256()
    for p in paths:
        digest.update(Path(p).read_bytes())
    return "sha256:" + digest.hexdigest()
