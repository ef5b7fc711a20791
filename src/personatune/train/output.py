"""Where a training run builds its persona directory, and when it may start.

A run writes into ``.<name>.partial`` beside the output directory. Only a finished run
is published (renamed) to the output directory, so a crash never leaves a half-written
persona, and ``--resume`` finds its checkpoints in the partial folder.
"""

from __future__ import annotations

import difflib
import shutil
from collections.abc import Iterable
from pathlib import Path

import torch
from transformers import Trainer, TrainingArguments
from transformers.trainer_utils import SchedulerType
from transformers.training_args import OptimizerNames

from personatune.config import PersonaSpec
from personatune.errors import PersonatuneError
from personatune.io import check_replaceable, check_writable, partial_dir
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
    check_writable(output, "persona directory")
    if latest_checkpoint(work) and not overwrite:
        raise PersonatuneError(
            f"{work} holds an unfinished run; pass --resume to continue "
            "it or --overwrite to start over"
        )


def check_runnable(spec: PersonaSpec, device: torch.device) -> None:
    """Refuse, before any slow work, settings this machine cannot run: an optimizer or
    learning-rate schedule transformers does not know, NF4 quantization without CUDA, or
    an optimizer whose library is missing (bitsandbytes' ``paged_adamw_32bit``...).

    Raises:
        PersonatuneError: names the key and a setting that runs here.
    """
    for key, value, known, default in (
        ("train.optimizer", spec.train.optimizer, OptimizerNames, "adamw_torch"),
        ("train.lr_scheduler", spec.train.lr_scheduler, SchedulerType, "cosine"),
    ):
        names = [m.value for m in known]
        if value not in names:
            near = difflib.get_close_matches(value, names, n=1)
            hint = f"did you mean {near[0]}?" if near else f"e.g. {key}={default}"
            raise PersonatuneError(f"{key}: '{value}' is not one transformers knows; {hint}")
    if spec.model.quantization == "nf4" and device.type != "cuda":
        raise PersonatuneError(
            "model.quantization: nf4 needs a CUDA GPU (bitsandbytes); "
            "use model.quantization=none on this machine"
        )
    try:  # transformers itself knows which optimizers need which library; the device
        # settings are build_trainer's, as TrainingArguments sets up the device state
        use_cpu = device.type == "cpu"
        args = TrainingArguments(output_dir=None, optim=spec.train.optimizer, use_cpu=use_cpu)
        Trainer.get_optimizer_cls_and_kwargs(args)
    except ImportError as e:
        reason = str(e).splitlines()[0].split(":")[0].rstrip(". ")
        raise PersonatuneError(
            f"train.optimizer: {spec.train.optimizer} cannot run here ({reason}); "
            "use train.optimizer=adamw_torch on this machine"
        ) from None


def prepare_output(
    output: Path, overwrite: bool, resume: bool, protect: Iterable[Path] = ()
) -> None:
    """Check as :func:`check_output` does, then empty the work folder unless resuming. A
    work folder without checkpoints (a run that died early) is discarded."""
    check_output(output, overwrite, resume, protect)
    if not resume:
        work = partial_dir(output)
        shutil.rmtree(work, ignore_errors=True)
        work.mkdir(parents=True)


def discard_unfinished(work: Path) -> None:
    """Remove the work folder of a run that failed before its first checkpoint: it holds
    nothing worth resuming, and a leftover would look like an unfinished run."""
    if not latest_checkpoint(work):
        shutil.rmtree(work, ignore_errors=True)


def latest_checkpoint(work: Path) -> Path | None:
    """The ``checkpoint-N`` folder with the highest N under ``work/checkpoints``, or None."""
    ckpts = [
        p
        for p in (work / "checkpoints").glob("checkpoint-*")
        if p.name.split("-")[-1].isdigit() and (p / "trainer_state.json").exists()
    ]
    return max(ckpts, key=lambda p: int(p.name.split("-")[-1]), default=None)
