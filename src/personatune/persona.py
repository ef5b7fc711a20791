"""The persona directory: its layout, its manifest, and the check that a folder is one.

``personatune train`` writes it; every other command reads it through this module. A
persona directory holds the LoRA adapter in peft format, the resolved spec, the
``persona.json`` manifest, the training log, the held-out record and checkpoints.
"""

from __future__ import annotations

from pathlib import Path

from personatune.config import PersonaSpec, load_spec
from personatune.errors import PersonatuneError
from personatune.io import read_json

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
SPEC = "config.yaml"
MANIFEST = "persona.json"
TRAIN_LOG = "train_log.jsonl"
#: Which examples training held out, one JSON row each (see personatune.data.dataset).
HELDOUT = "heldout.jsonl"
CHECKPOINTS = "checkpoints"
#: The files that make a folder a persona directory.
REQUIRED = (ADAPTER_CONFIG, SPEC)


def check_persona_dir(path: str | Path) -> Path:
    """Return ``path`` as a Path if it is a finished persona directory.

    Raises:
        PersonatuneError: the folder is missing, or lacks the adapter or the spec.
    """
    path = Path(path)
    if not path.is_dir():
        raise PersonatuneError(
            f"{path}: no such persona directory; train one with personatune train"
        )
    missing = [name for name in REQUIRED if not (path / name).is_file()]
    if missing:
        raise PersonatuneError(
            f"{path}: not a persona directory (no {' or '.join(missing)}); train one with "
            "personatune train"
        )
    return path


def read_spec(path: str | Path) -> PersonaSpec:
    """The spec a persona directory was trained with (its ``config.yaml``).

    Raises:
        PersonatuneError: not a persona directory, or an unreadable spec.
    """
    return load_spec(check_persona_dir(path) / SPEC)


def read_manifest(path: str | Path) -> dict:
    """The ``persona.json`` manifest of a persona directory, or ``{}`` when it has none
    (directories written before the manifest existed).

    Raises:
        PersonatuneError: not a persona directory, or the manifest is not valid JSON.
    """
    f = check_persona_dir(path) / MANIFEST
    return read_json(f) if f.is_file() else {}
