"""A persona as a plain transformers model: the LoRA adapter merged into the base
weights, with the tokenizer and chat template; optionally pushed to the Hugging Face Hub."""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

from personatune.data.chat import ensure_chat_template
from personatune.errors import PersonatuneError
from personatune.io import building, check_replaceable
from personatune.models import load_model, load_tokenizer, resolve_ref
from personatune.persona import read_spec

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

CARD = """---
library_name: transformers
base_model: {base}
tags: [personatune, lora, merged]
---
# {name}

{description}

Exported by personatune: the LoRA adapter merged into the weights of `{base}`, so plain
transformers loads it without peft. The persona was trained with this system prompt; send it
as the first message:

> {system_prompt}

```python
from transformers import AutoModelForCausalLM, AutoTokenizer

tok = AutoTokenizer.from_pretrained("PATH")
model = AutoModelForCausalLM.from_pretrained("PATH")
messages = [{{"role": "system", "content": {system_prompt!r}}},
            {{"role": "user", "content": "Hello!"}}]
ids = tok.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt")
print(tok.decode(model.generate(ids, max_new_tokens=64)[0, ids.shape[1]:],
                 skip_special_tokens=True))
```
"""


@dataclass
class MergedPersona:
    """A persona's base model with its adapter merged in, ready to save.

    Attributes:
        spec: the persona's spec (``config.yaml``).
        ref: where the base model comes from.
        tokenizer: the base tokenizer with the persona's chat template.
        model: the base model in float32 on the CPU, the adapter merged in
            (``merge_and_unload``: W + B·A·alpha/r), or without it when ``merge=False``.
        base_dtype: the dtype the base weights are stored in (a GGUF base loads as float32).
    """

    spec: object
    ref: object
    tokenizer: object
    model: object
    base_dtype: torch.dtype


def merge_persona(persona_dir: str | Path, merge: bool = True) -> MergedPersona:
    """Load a persona's base model on the CPU and merge its adapter into the weights.

    The base is loaded unquantised and merged in float32 whatever its stored dtype, so a
    bf16 base does not round the adapter's small update away before the final cast.

    Args:
        persona_dir: a persona directory from ``personatune train``.
        merge: False returns the base model alone (for a separate adapter file).

    Raises:
        PersonatuneError: not a persona directory, or a base model that cannot be loaded.
    """
    from peft import PeftModel

    spec = read_spec(persona_dir)
    ref = resolve_ref(spec.model.name, spec.model.revision, spec.base_dir)
    tokenizer = load_tokenizer(ref)
    ensure_chat_template(tokenizer, spec.model.chat_template)
    model = load_model(ref, "none", torch.device("cpu"))
    base_dtype = next(model.parameters()).dtype
    model.float()
    if merge:
        model = PeftModel.from_pretrained(model, Path(persona_dir)).merge_and_unload()
    model.eval()
    return MergedPersona(spec, ref, tokenizer, model, base_dtype)


def pick_dtype(dtype: str | None, base_dtype: torch.dtype) -> torch.dtype:
    """The dtype to save merged weights in: ``dtype`` by name, or the base model's when
    None.

    Raises:
        PersonatuneError: an unknown dtype name.
    """
    if dtype is None:
        return base_dtype
    if dtype not in DTYPES:
        raise PersonatuneError(f"--dtype {dtype}: choose one of {', '.join(DTYPES)}")
    return DTYPES[dtype]


def export_merged(
    persona_dir: str | Path, out: str | Path, *, overwrite: bool = False, dtype: str | None = None
) -> Path:
    """Merge the persona's adapter into its base model and save a model directory.

    The merge is :func:`merge_persona`; the result is saved with ``save_pretrained``
    (safetensors, config, generation config), the tokenizer with its chat template,
    ``persona.json`` and a model card. Written to a temporary folder beside ``out`` and
    renamed when complete.

    Args:
        persona_dir: a persona directory from ``personatune train``.
        out: the model directory to write.
        overwrite: replace ``out`` if it exists.
        dtype: weight dtype of the saved model: ``float32``, ``bfloat16`` or ``float16``;
            None (the default) keeps the base model's dtype (a GGUF base: float32).

    Returns:
        ``out``.

    Raises:
        PersonatuneError: not a persona directory, ``out`` exists without ``overwrite``,
            an unknown dtype, or a base model that cannot be loaded.
    """
    persona_dir, out = Path(persona_dir), Path(out)
    read_spec(persona_dir)
    if dtype is not None:
        pick_dtype(dtype, torch.float32)  # refuse a bad name before the slow merge
    if out.exists() and not overwrite:
        raise PersonatuneError(f"{out} already exists; pass --overwrite to replace it")
    check_replaceable(out, "merged model folder", [persona_dir], ("config.json", "persona.json"))
    merged = merge_persona(persona_dir)
    spec, ref, tokenizer = merged.spec, merged.ref, merged.tokenizer
    model = merged.model.to(pick_dtype(dtype, merged.base_dtype))

    with building(out) as work:
        model.save_pretrained(work)
        tokenizer.save_pretrained(work)
        if (persona_dir / "persona.json").exists():
            shutil.copy(persona_dir / "persona.json", work / "persona.json")
        (work / "README.md").write_text(
            CARD.format(
                name=spec.name,
                description=spec.description,
                base=ref.name,
                system_prompt=spec.system_prompt,
            )
        )
    return out


def check_hub(repo: str) -> str:
    """Check that ``repo`` can be pushed before any slow work: online, logged in, and the
    Hub reachable. Returns the user name.

    Raises:
        PersonatuneError: offline mode (``HF_HUB_OFFLINE``), no token, a bad repo id, or
            the Hub cannot be reached; one line naming the fix.
    """
    from huggingface_hub import HfApi, constants, get_token
    from huggingface_hub.utils import validate_repo_id

    where = f"--push-to-hub {repo}"
    try:
        validate_repo_id(repo)
    except Exception:  # noqa: BLE001 (HFValidationError; any failure means a bad id)
        raise PersonatuneError(f"{where}: not a repo id; use the form user/name") from None
    if constants.HF_HUB_OFFLINE:
        raise PersonatuneError(
            f"{where}: the Hugging Face Hub is off (HF_HUB_OFFLINE=1); "
            "unset HF_HUB_OFFLINE on a machine with internet access"
        )
    if not get_token():
        raise PersonatuneError(
            f"{where}: not logged in to the Hugging Face Hub; run `hf auth login` or set HF_TOKEN"
        )
    try:
        return HfApi().whoami()["name"]
    except Exception as e:  # noqa: BLE001 (network errors come from httpx, requests, hub)
        raise PersonatuneError(
            f"{where}: cannot reach the Hugging Face Hub "
            f"({type(e).__name__}); check the network and your token"
        ) from None


def push_to_hub(folder: str | Path, repo: str, private: bool = False) -> str:
    """Create ``repo`` (if needed) and upload ``folder`` to it. Returns the commit URL.

    Raises:
        PersonatuneError: see :func:`check_hub`, or the upload failed.
    """
    from huggingface_hub import HfApi

    check_hub(repo)
    api = HfApi()
    try:
        api.create_repo(repo, private=private, exist_ok=True)
        info = api.upload_folder(
            repo_id=repo, folder_path=str(folder), commit_message="personatune export (merged LoRA)"
        )
    except Exception as e:  # noqa: BLE001 (shown as one line, whatever the library raised)
        raise PersonatuneError(
            f"--push-to-hub {repo}: upload failed ({type(e).__name__}: {str(e).splitlines()[0]})"
        ) from None
    return info.commit_url
