"""Load a base model with one or many persona adapters: the one place that turns persona
directories into a model ready to generate (peft multi-adapter, one adapter per persona)."""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from pathlib import Path

import torch

from personatune.config import PersonaSpec
from personatune.data.chat import ensure_chat_template
from personatune.errors import PersonatuneError
from personatune.models import ModelRef, load_model, load_tokenizer, resolve_ref
from personatune.persona import MANIFEST, read_spec

#: Model id under which the base model itself (no adapter) is served.
BASE_ID = "base"

#: Context length used when the model config names none (tokens).
DEFAULT_CONTEXT = 2048


@dataclass
class ServedPersona:
    """One model a caller can ask for: a persona's adapter, or the base model
    (``adapter`` None).

    Attributes:
        name: the model id clients send (``pirate``; :data:`BASE_ID` for the base model).
        description: one or two sentences for people (the web chat shows it).
        system_prompt: prepended to conversations per the caller's policy; "" for none.
        tokenizer: the tokenizer with this persona's chat template.
        adapter: the peft adapter name, or None for the base model.
        path: the persona directory, or None for the base model.
        spec: the persona's spec, or None for the base model.
        test_prompts: the spec's test prompts (``chat --quick-test``).
        created: Unix time the persona directory was written (seconds).
    """

    name: str
    description: str
    system_prompt: str
    tokenizer: object
    adapter: str | None = None
    path: Path | None = None
    spec: PersonaSpec | None = None
    test_prompts: list[str] = field(default_factory=list)
    created: int = 0


@dataclass
class Registry:
    """The base model with every persona's adapter loaded onto it.

    Attributes:
        model: a peft ``PeftModel`` holding one adapter per persona (adapter name:
            :func:`adapter_name` of the persona's). The engine picks adapters per row.
        base_model: the base model reference shared by all personas (``embedded``).
        ref: the resolved base model reference.
        personas: model id -> :class:`ServedPersona`, the base model first.
        context_length: the most tokens prompt plus answer may hold.
    """

    model: object
    base_model: str
    ref: ModelRef
    personas: dict[str, ServedPersona]
    context_length: int


@dataclass
class Persona:
    """A trained persona ready to chat: its spec, tokenizer, and the base model with the
    adapter attached (a peft ``PeftModel``; ``model.disable_adapter()`` gives the base)."""

    spec: PersonaSpec
    tokenizer: object
    model: object
    path: Path


def adapter_name(persona: str) -> str:
    """The peft adapter name of a persona: its name with ``.`` as ``_``. peft makes the
    adapter name a torch module name, which may not contain a dot, and the recipes'
    names do (``qwen2.5-0.5b-pirate``: ``KeyError: module name can't contain "."``)."""
    return persona.replace(".", "_")


def _check_names(paths: list[Path], specs: list[PersonaSpec]) -> None:
    seen: dict[str, Path] = {}
    adapters: dict[str, Path] = {}
    for p, s in zip(paths, specs):
        a = adapter_name(s.name)
        if a in adapters and s.name not in seen:
            raise PersonatuneError(
                f"{p} and {adapters[a]}: persona names that differ only in '.' and '_' "
                "cannot be served together; rename one (name: in its YAML) and retrain"
            )
        adapters[a] = p
        if s.name == BASE_ID:
            raise PersonatuneError(
                f"{p}: the name '{BASE_ID}' is kept for the base model; "
                "rename the persona (name: in its YAML) and retrain"
            )
        if s.name in seen:
            raise PersonatuneError(
                f"{p} and {seen[s.name]} are both named '{s.name}'; "
                "serve personas with different names"
            )
        seen[s.name] = p


def _one_base(paths: list[Path], specs: list[PersonaSpec]) -> ModelRef:
    refs = [resolve_ref(s.model.name, s.model.revision, s.base_dir) for s in specs]
    first = (refs[0].kind, refs[0].fingerprint(), specs[0].model.quantization)
    for p, s, r in zip(paths[1:], specs[1:], refs[1:]):
        if (r.kind, r.fingerprint(), s.model.quantization) != first:
            raise PersonatuneError(
                f"{p}: trained on base model '{r.name}' ({s.model.quantization}) but "
                f"{paths[0]} on '{refs[0].name}' ({specs[0].model.quantization}); all personas "
                "of one server must share the same base model: start one server per base model"
            )
    return refs[0]


def describe_personas(dirs: list[str | Path]) -> tuple[ModelRef, dict[str, ServedPersona]]:
    """The personas of ``dirs`` without loading any model (``tokenizer`` None): for a
    server that forwards generation elsewhere, and for printing a vLLM command.

    Returns:
        ``(base model reference, model id -> persona)``, the base model first.

    Raises:
        PersonatuneError: as :func:`load_registry`.
    """
    if not dirs:
        raise PersonatuneError("give at least one persona directory")
    paths = [Path(d) for d in dirs]
    specs = [read_spec(p) for p in paths]
    _check_names(paths, specs)
    ref = _one_base(paths, specs)
    description = f"The base model ({ref.name}) without any persona adapter."
    personas = {BASE_ID: ServedPersona(BASE_ID, description, "", None)}
    for p, s in zip(paths, specs):
        stamp = p / MANIFEST
        personas[s.name] = ServedPersona(
            s.name,
            s.description,
            s.system_prompt,
            None,
            adapter=adapter_name(s.name),
            path=p,
            spec=s,
            test_prompts=list(s.test_prompts),
            created=int((stamp if stamp.exists() else p).stat().st_mtime),
        )
    return ref, personas


def attach_tokenizers(ref: ModelRef, personas: dict[str, ServedPersona]) -> None:
    """Give every persona the base model's tokenizer (chat template ensured), or a copy
    with its own chat template where its spec sets one."""
    tokenizer = load_tokenizer(ref)
    ensure_chat_template(tokenizer)
    for p in personas.values():
        p.tokenizer = tokenizer
        if p.spec is not None and p.spec.model.chat_template:
            p.tokenizer = copy.copy(tokenizer)
            ensure_chat_template(p.tokenizer, p.spec.model.chat_template)


def load_registry(dirs: list[str | Path], device: torch.device | None = None) -> Registry:
    """Load one base model and put every persona's LoRA adapter onto it (peft
    multi-adapter: ``PeftModel.from_pretrained`` for the first, ``load_adapter`` for the
    rest). The base model is available too, as :data:`BASE_ID`.

    Args:
        dirs: persona directories written by ``personatune train``.
        device: where the model goes; default :func:`personatune.models.pick_device`.

    Raises:
        PersonatuneError: no directory, a folder that is not a persona, two personas with
            one name (or one named ``base``), or personas trained on different base models
            or quantisations (one process serves one base model).
    """
    from peft import PeftModel

    ref, personas = describe_personas(dirs)
    attach_tokenizers(ref, personas)
    first, *rest = (p for p in personas.values() if p.adapter is not None)
    base = load_model(ref, first.spec.model.quantization, device)
    model = PeftModel.from_pretrained(base, first.path, adapter_name=first.adapter)
    for p in rest:
        model.load_adapter(p.path, adapter_name=p.adapter)
    model.eval()
    ctx = getattr(base.config, "max_position_embeddings", None) or DEFAULT_CONTEXT
    return Registry(model, ref.name, ref, personas, int(ctx))


def load_persona(path: str | Path, device: torch.device | None = None) -> Persona:
    """Load one persona directory written by ``personatune train``: its base model with
    the adapter attached, and the tokenizer with the persona's chat template.

    Raises:
        PersonatuneError: the folder is not a finished persona directory.
    """
    reg = load_registry([path], device)
    p = next(p for p in reg.personas.values() if p.adapter is not None)
    reg.model.set_adapter(p.adapter)
    return Persona(p.spec, p.tokenizer, reg.model, p.path)
