"""The ``personatune`` command line (typer + rich)."""

from __future__ import annotations

import functools
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table
from rich.text import Text

from personatune.errors import PersonatuneError

app = typer.Typer(no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False,
                  help="Give a chat LLM a persona with LoRA, without losing what it knew.")
data_app = typer.Typer(no_args_is_help=True, help="Look at and build persona data.")
app.add_typer(data_app, name="data")
console = Console()

Overrides = Annotated[list[str] | None, typer.Argument(help="key=value overrides, e.g. train.epochs=1")]


def friendly(fn):
    """Turn a PersonatuneError into ``error: ...`` on one stderr line and exit status 2."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except PersonatuneError as e:
            typer.echo(f"error: {e}", err=True)
            raise typer.Exit(2) from None

    return wrapper


@app.command()
@friendly
def train(
    spec: Annotated[Path, typer.Argument(help="persona YAML")],
    overrides: Overrides = None,
    overwrite: Annotated[bool, typer.Option(help="replace an existing output directory")] = False,
    resume: Annotated[bool, typer.Option(help="continue an unfinished run")] = False,
):
    """Fine-tune a LoRA adapter for a persona and write the persona directory."""
    from personatune.config import load_spec
    from personatune.train.trainer import train as run_train

    run_train(load_spec(spec, overrides or []), overwrite=overwrite, resume=resume)


@data_app.command("inspect")
@friendly
def inspect(
    spec: Annotated[Path, typer.Argument(help="persona YAML")],
    overrides: Overrides = None,
    index: Annotated[int, typer.Option(help="which training example to show")] = 0,
):
    """Show a rendered example with the trained tokens marked ⟦like this⟧, and counts."""
    from personatune.config import load_spec
    from personatune.data.dataset import prepare_data
    from personatune.models import load_tokenizer, resolve_ref
    from personatune.data.chat import ensure_chat_template

    s = load_spec(spec, overrides or [])
    tok = load_tokenizer(resolve_ref(s.model.name, s.model.revision, s.base_dir))
    ensure_chat_template(tok, s.model.chat_template)
    data = prepare_data(s, tok)
    if not 0 <= index < len(data.train):
        raise PersonatuneError(f"--index {index}: there are {len(data.train)} training examples")
    row = data.train[index]
    console.print(marked_tokens(tok, row["input_ids"], [l != -100 for l in row["labels"]]))
    table = Table("source", "loaded", "duplicates", "train", "eval", "tokens", "trained tokens",
                  "truncated", "dropped", title="data")
    for st in data.stats:
        table.add_row(Path(st.path).name, *(str(v) for v in (
            st.loaded, st.duplicates, st.train, st.eval, st.tokens, st.trained_tokens,
            st.truncated, st.dropped_overlong)))
    console.print(table)
    console.print(f"training rows after mixing: {len(data.train)} "
                  f"({data.train_tokens} tokens per epoch)")


def marked_tokens(tokenizer, ids: list[int], mask: list[bool]) -> Text:
    """Decode ``ids`` with trained stretches wrapped in ⟦ ⟧ and coloured green."""
    text, i = Text(), 0
    while i < len(ids):
        j = i
        while j < len(ids) and mask[j] == mask[i]:
            j += 1
        piece = tokenizer.decode(ids[i:j])
        text.append(f"⟦{piece}⟧" if mask[i] else piece, style="bold green" if mask[i] else "dim")
        i = j
    return text


@app.command()
@friendly
def chat(
    persona_dir: Annotated[Path, typer.Argument(help="persona directory from personatune train")],
    prompt: Annotated[str | None, typer.Option(help="answer this once and exit")] = None,
    temperature: Annotated[float, typer.Option(help="0 is greedy")] = 0.0,
    max_tokens: Annotated[int, typer.Option(help="longest answer in tokens")] = 256,
):
    """Chat with a persona in the terminal (streamed). /reset clears, /exit quits."""
    from personatune.data.chat import with_system_prompt
    from personatune.generate import load_persona, stream

    p = load_persona(persona_dir)
    history: list[dict] = []

    def answer(text: str) -> str:
        history.append({"role": "user", "content": text})
        conv = with_system_prompt(history, p.spec.system_prompt)
        out = ""
        for piece in stream(p.model, p.tokenizer, conv, max_tokens, temperature):
            out += piece
            sys.stdout.write(piece)
            sys.stdout.flush()
        sys.stdout.write("\n")
        history.append({"role": "assistant", "content": out.strip()})
        return out

    if prompt is not None:
        answer(prompt)
        return
    console.print(f"[bold]{p.spec.name}[/]: {p.spec.description}  (/reset, /exit)")
    while True:
        try:
            text = console.input("[bold cyan]you> [/]").strip()
        except (EOFError, KeyboardInterrupt):
            break
        if text in ("/exit", "/quit"):
            break
        if text == "/reset":
            history.clear()
            console.print("[dim]conversation cleared[/]")
        elif text:
            console.print(f"[bold magenta]{p.spec.name}> [/]", end="")
            answer(text)


@app.command()
@friendly
def compare(
    persona_dir: Annotated[Path, typer.Argument(help="persona directory")],
    n_heldout: Annotated[int, typer.Option(help="held-out prompts to add to the test prompts")] = 6,
    max_tokens: Annotated[int, typer.Option(help="longest answer in tokens")] = 64,
):
    """Print base and tuned answers side by side: the persona's test prompts plus
    held-out prompts the adapter never saw. Greedy decoding."""
    from personatune.data.chat import with_system_prompt
    from personatune.data.dataset import load_examples, split_eval
    from personatune.generate import generate, load_persona

    p = load_persona(persona_dir)
    held = []
    for examples, _ in load_examples(p.spec):
        held += [e for e in split_eval(examples, p.spec.train.eval_split, p.spec.train.seed)[1]
                 if e.messages and e.messages[0]["role"] == "user"]
    prompts = list(p.spec.test_prompts) + [e.messages[0]["content"] for e in held[:n_heldout]]
    if not prompts:
        raise PersonatuneError(f"{persona_dir}: no test_prompts and no held-out examples")
    convs = [with_system_prompt([{"role": "user", "content": q}], p.spec.system_prompt)
             for q in prompts]
    with console.status("generating tuned answers"):
        tuned = generate(p.model, p.tokenizer, convs, max_tokens)
    with console.status("generating base answers"), p.model.disable_adapter():
        base = generate(p.model, p.tokenizer, convs, max_tokens)
    table = Table("prompt", "base", f"tuned ({p.spec.name})", show_lines=True,
                  title="base vs tuned (greedy, unseen prompts)")
    for q, b, t in zip(prompts, base, tuned):
        table.add_row(q, b, t)
    console.print(table)


if __name__ == "__main__":
    app()
