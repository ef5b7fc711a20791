"""``personatune compare``: base and tuned answers to the same prompts, side by side."""

from __future__ import annotations

from pathlib import Path

from rich.console import Console

from personatune.data.chat import with_system_prompt
from personatune.data.dataset import persona_split
from personatune.engine import BASE_ID, Sampling, ask, load_registry
from personatune.errors import PersonatuneError
from personatune.persona import read_spec


def compare_prompts(persona_dir: Path, spec, n_heldout: int) -> tuple[list[str], list[str]]:
    """``(prompts, notes)``: the persona's test prompts, then the first user turn of the
    first ``n_heldout`` held-out examples recorded at training time
    (:func:`personatune.data.dataset.persona_split`), the prompts the adapter never saw.

    Raises:
        PersonatuneError: bad data files, or no prompt at all.
    """
    split = persona_split(spec, persona_dir)
    held = [
        e for exs in split.heldout for e in exs if e.messages and e.messages[0]["role"] == "user"
    ]
    prompts = list(spec.test_prompts) + [e.messages[0]["content"] for e in held[:n_heldout]]
    if not prompts:
        raise PersonatuneError(f"{persona_dir}: no test_prompts and no held-out examples")
    return prompts, split.notes


def compare(
    persona_dir: str | Path,
    *,
    n_heldout: int = 6,
    max_tokens: int = 64,
    console: Console | None = None,
) -> tuple[str, list[tuple[str, str, str]]]:
    """Answer :func:`compare_prompts` greedily with the persona and with its base model
    (the adapter disabled), at most ``max_tokens`` tokens each.

    Returns:
        ``(persona name, [(prompt, base answer, tuned answer), ...])``.

    Raises:
        PersonatuneError: not a persona directory, bad data, no prompts.
    """
    console = console or Console(stderr=True)
    persona_dir = Path(persona_dir)
    prompts, notes = compare_prompts(persona_dir, read_spec(persona_dir), n_heldout)
    for n in notes:
        console.print(f"[yellow]note: {n}[/]")
    reg = load_registry([persona_dir])
    p = next(v for v in reg.personas.values() if v.adapter)
    convs = [with_system_prompt([{"role": "user", "content": q}], p.system_prompt) for q in prompts]
    with console.status("generating base and tuned answers"):  # one mixed-adapter batch
        out = ask(reg, [(p.name, c) for c in convs] + [(BASE_ID, c) for c in convs],
                  Sampling(max_tokens))  # fmt: skip
    tuned, base = [a.text for a in out[: len(convs)]], [a.text for a in out[len(convs) :]]
    return p.name, list(zip(prompts, base, tuned))
