"""The ``vllm serve`` command that serves personas' adapters under their names, for
``personatune serve --upstream`` (``personatune serve --print-vllm``)."""

from __future__ import annotations

import shlex
from pathlib import Path

from personatune.engine import BASE_ID, describe_personas
from personatune.errors import PersonatuneError
from personatune.io import read_json
from personatune.persona import ADAPTER_CONFIG

#: LoRA ranks vLLM accepts for ``--max-lora-rank`` (``MaxLoRARanks`` in vllm/config/lora.py).
VLLM_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)


def vllm_command(dirs: list[str | Path]) -> str:
    """``vllm serve BASE --served-model-name base --enable-lora --lora-modules
    name=dir ... --max-lora-rank R --max-loras N`` for the personas in ``dirs``, as one
    shell-quoted line. ``R`` is the largest adapter rank rounded up to a rank vLLM
    accepts; ``N`` lets every adapter share one batch.

    Raises:
        PersonatuneError: not persona directories, mixed base models, a base model vLLM
            cannot load (the embedded GGUF base), or a rank above 512.
    """
    ref, personas = describe_personas(dirs)
    if ref.kind == "gguf":
        raise PersonatuneError(
            f"the base model {ref.name} is a GGUF file; vLLM serves LoRA adapters on "
            "transformers weights: train on a Hub id or a model folder to serve with vLLM"
        )
    base = ref.path if ref.kind == "hub" else str(Path(ref.path).resolve())
    mods = [p for p in personas.values() if p.adapter]
    rank = max(int(read_json(p.path / ADAPTER_CONFIG)["r"]) for p in mods)
    cap = next((r for r in VLLM_RANKS if r >= rank), None)
    if cap is None:
        raise PersonatuneError(f"LoRA rank {rank} is above vLLM's largest ({VLLM_RANKS[-1]})")
    args = ["vllm", "serve", base, "--served-model-name", BASE_ID, "--enable-lora"]
    if ref.revision:
        args += ["--revision", ref.revision]
    if any(p.spec.model.quantization == "nf4" for p in mods):
        args += ["--quantization", "bitsandbytes"]
    args += ["--lora-modules", *(f"{p.name}={Path(p.path).resolve()}" for p in mods)]
    args += ["--max-lora-rank", str(cap), "--max-loras", str(len(mods))]
    return shlex.join(args)
