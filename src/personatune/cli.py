"""The ``personatune`` command line (typer + rich)."""

from __future__ import annotations

import errno
import functools
import itertools
import os
import sys
import tempfile
import traceback
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Annotated

import click
import typer
from rich.console import Console
from rich.table import Table
from rich.text import Text

from personatune.errors import PersonatuneError

app = typer.Typer(no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False)
data_app = typer.Typer(no_args_is_help=True, help="Look at and build persona data.")
app.add_typer(data_app, name="data")
console = Console()

Overrides = Annotated[
    list[str] | None, typer.Argument(help="key=value overrides, e.g. train.epochs=1")
]
PersonaDirs = Annotated[
    list[Path], typer.Argument(help="persona directories from personatune train (one base model)")
]
Threads = Annotated[
    int, typer.Option(help="PyTorch CPU threads; 0: one per core (fewer can be faster when busy)")
]
EngineChoice = Annotated[
    str,
    typer.Option(
        help="torch, or llama-cpp: the base model as a GGUF in llama.cpp with the "
        "adapters as llama.cpp LoRA adapters (CPU; pip install 'personatune[llama-cpp]')"
    ),
]


#: Failures of the user's machine, not of personatune: a full disk, a read-only or forbidden path.
_ENVIRONMENT_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM}


def debugging() -> bool:
    """Whether errors show their traceback: ``personatune --debug`` or ``PERSONATUNE_DEBUG=1``."""
    return os.environ.get("PERSONATUNE_DEBUG", "").strip() not in ("", "0")


def _fail(message: str, status: int) -> None:
    if debugging():
        traceback.print_exc()
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(status)


def friendly(fn):
    """Run a command so that every failure ends in one ``error: ...`` line on stderr.

    Exit status 2 for what the user can fix: a PersonatuneError (names the file, row or
    key and the fix), a path or disk problem (names the file), running out of memory.
    Exit status 1 for anything else, which is a bug in personatune: the line says so.
    130 on Ctrl-C. ``--debug`` (or ``PERSONATUNE_DEBUG=1``) also prints the traceback.
    """

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except (typer.Exit, typer.Abort, click.ClickException):
            raise
        except PersonatuneError as e:
            _fail(str(e), 2)
        except KeyboardInterrupt:
            _fail("interrupted", 130)
        except OSError as e:
            if not (e.filename or e.errno in _ENVIRONMENT_ERRNOS):
                _fail(_bug(e), 1)
            where = f"{e.filename}: " if e.filename else ""
            _fail(f"{where}{e.strerror or e}; check the path, its permissions and free space", 2)
        except MemoryError:
            _fail("out of memory; lower train.batch_size or train.max_seq_length", 2)
        except Exception as e:
            if type(e).__name__ == "OutOfMemoryError":  # torch's, without importing torch
                _fail("out of GPU memory; lower train.batch_size or train.max_seq_length", 2)
            _fail(_bug(e), 1)

    return wrapper


def _bug(e: BaseException) -> str:
    first = str(e).strip().splitlines()[0][:200] if str(e).strip() else ""
    return (
        f"internal error ({type(e).__name__}: {first}); this is a bug in personatune: "
        "run again with --debug for the traceback and report it"
    )


def print_table(title: str, columns: Sequence[str], rows: Iterable[Sequence], **options) -> None:
    """Print a rich table; a cell that is not a rich ``Text`` is shown as ``str(cell)``
    (rich markup allowed). ``options`` go to :class:`rich.table.Table`."""
    table = Table(*columns, title=title, **options)
    for row in rows:
        table.add_row(*(c if isinstance(c, Text) else str(c) for c in row))
    console.print(table)


@app.callback(
    epilog="Errors are one line on stderr. Exit status 2: bad input you can fix (the line "
    "names the file, row or key); 1: a bug in personatune (run again with --debug); "
    "130: interrupted."
)
def main(
    ctx: typer.Context,
    debug: Annotated[
        bool, typer.Option("--debug", help="also print errors' tracebacks (or PERSONATUNE_DEBUG=1)")
    ] = False,
):
    """Give a chat LLM a persona with LoRA, without losing what it knew."""
    if debug and not debugging():
        # Undone when the command ends, so an in-process runner (tests, notebooks) does
        # not carry --debug into the next command.
        os.environ["PERSONATUNE_DEBUG"] = "1"
        ctx.call_on_close(lambda: os.environ.pop("PERSONATUNE_DEBUG", None))


@app.command()
@friendly
def train(
    spec: Annotated[Path, typer.Argument(help="persona YAML")],
    overrides: Overrides = None,
    overwrite: Annotated[bool, typer.Option(help="replace an existing output directory")] = False,
    resume: Annotated[bool, typer.Option(help="continue an unfinished run")] = False,
    no_gate: Annotated[
        bool,
        typer.Option(
            "--no-gate",
            help="publish the last checkpoint even if the retention gate fails "
            "(the verdict is still recorded)",
        ),
    ] = False,
    no_guard: Annotated[
        bool,
        typer.Option(
            "--no-guard",
            help="train on the persona data alone: no preservation data, no retention "
            "metrics, no gate; the last step is published (same as guard.enabled=false)",
        ),
    ] = False,
):
    """Fine-tune a LoRA adapter for a persona and write the persona directory. The
    forgetting guard (on by default; ``guard:`` in the YAML) mixes in self-distilled
    preservation data, evaluates every checkpoint and publishes the best one within
    tolerance; when none is, it searches within ``guard.search_budget_s``."""
    from personatune.config import load_spec
    from personatune.train.trainer import train as run_train

    extra = ["guard.gate=false"] if no_gate else []
    extra += ["guard.enabled=false"] if no_guard else []
    run_train(load_spec(spec, [*(overrides or []), *extra]), overwrite=overwrite, resume=resume)


@data_app.command("inspect")
@friendly
def inspect(
    spec: Annotated[Path, typer.Argument(help="persona YAML")],
    overrides: Overrides = None,
    index: Annotated[int, typer.Option(help="which training example to show")] = 0,
):
    """Show a rendered example with the trained tokens marked ⟦like this⟧, and counts."""
    from personatune.config import load_spec
    from personatune.data.chat import ensure_chat_template
    from personatune.data.dataset import prepare_data
    from personatune.models import load_tokenizer, resolve_ref

    s = load_spec(spec, overrides or [])
    tok = load_tokenizer(resolve_ref(s.model.name, s.model.revision, s.base_dir))
    ensure_chat_template(tok, s.model.chat_template)
    data = prepare_data(s, tok)
    if not 0 <= index < len(data.train):
        raise PersonatuneError(f"--index {index}: there are {len(data.train)} training examples")
    row = data.train[index]
    console.print(marked_tokens(tok, row["input_ids"], [label != -100 for label in row["labels"]]))
    fields = ("loaded", "duplicates", "train", "eval", "tokens", "trained_tokens", "truncated")
    print_table(
        "data",
        ["source", *(f.replace("_", " ") for f in fields), "dropped"],
        [
            (Path(st.path).name, *(getattr(st, f) for f in fields), st.dropped_overlong)
            for st in data.stats
        ],
    )
    console.print(
        f"training rows after mixing: {len(data.train)} ({data.train_tokens} tokens per epoch)"
    )


def marked_tokens(tokenizer, ids: list[int], mask: list[bool]) -> Text:
    """Decode ``ids`` with trained stretches wrapped in ⟦ ⟧ and coloured green."""
    text = Text()
    for trained, run in itertools.groupby(zip(ids, mask), key=lambda pair: pair[1]):
        piece = tokenizer.decode([token for token, _ in run])
        text.append(f"⟦{piece}⟧" if trained else piece, style="bold green" if trained else "dim")
    return text


@data_app.command("from-corpus")
@friendly
def from_corpus(
    corpus: Annotated[
        Path,
        typer.Argument(
            help="a .txt corpus (books split by '--- From <title> ---' lines) or a folder of "
            "one .txt file per book"
        ),
    ],
    character: Annotated[str, typer.Option(help="the persona character, e.g. Holmes")],
    out: Annotated[Path, typer.Option(help="output folder for the data files")],
    alias: Annotated[
        list[str] | None,
        typer.Option(help="another name of the character in the text (repeatable)"),
    ] = None,
    narrator: Annotated[
        list[str] | None,
        typer.Option(help="name of the first-person narrator, e.g. Watson (repeatable)"),
    ] = None,
    exclude: Annotated[
        list[str] | None,
        typer.Option(help="another's name containing an alias, e.g. 'Mycroft Holmes' (repeatable)"),
    ] = None,
    companion: Annotated[
        list[str] | None,
        typer.Option(
            help="the narrator's phrase for the character (repeatable; default: my companion, "
            "my friend, my comrade)"
        ),
    ] = None,
    format: Annotated[
        str,
        typer.Option(
            help="auto (detect per book, reported in report.json), prose (quoted speech), "
            "play (NAME. / NAME: labels) or screenplay (NAME centred above the line)"
        ),
    ] = "auto",
    chunk_size: Annotated[int, typer.Option(help="characters per text chunk")] = 500,
    chunk_overlap: Annotated[int, typer.Option(help="characters shared by neighbour chunks")] = 50,
    eval_chapters: Annotated[
        float, typer.Option(help="share of the character's chapters held out whole for evaluation")
    ] = 0.1,
    seed: Annotated[int, typer.Option(help="seed of the held-out chapters and samples")] = 0,
    labels: Annotated[
        Path | None,
        typer.Option(help="hand-labelled quotes (JSONL): attribution precision and recall"),
    ] = None,
    samples: Annotated[int, typer.Option(help="random pairs to show and keep in the report")] = 5,
    encoding: Annotated[str, typer.Option(help="text encoding of the corpus")] = "utf-8",
    overwrite: Annotated[bool, typer.Option(help="replace an existing --out folder")] = False,
):
    """Build persona data from a raw book corpus: the character's dialogue pairs (train
    and held-out chapters), text chunks for continued pre-training, and report.json."""
    from personatune.data._corpus_dialogue import DEFAULT_COMPANIONS
    from personatune.data.from_corpus import from_corpus as build

    with console.status(f"cleaning {corpus.name} and attributing {character}'s lines"):
        try:
            report = build(
                corpus,
                out,
                character=character,
                aliases=alias or [],
                narrator_names=narrator or [],
                excluded=exclude or [],
                companions=companion or DEFAULT_COMPANIONS,
                format=format,
                chunk_size=chunk_size,
                chunk_overlap=chunk_overlap,
                eval_chapters=eval_chapters,
                seed=seed,
                labels=labels,
                n_samples=samples,
                encoding=encoding,
                overwrite=overwrite,
            )
        except ValueError as e:  # the text module's argument checks, as one line
            raise PersonatuneError(f"data from-corpus: {e}") from None
    print_corpus_report(report, out)
    for b in report["format"]["books"]:
        console.print(Text(f"{b['book']}: {b['format']} ({b['reason']})", style="dim"))


def print_corpus_report(report: dict, out: Path) -> None:
    """Print the from-corpus summary: per-book counts, totals, attribution, samples."""
    from personatune.data.from_corpus import FILES

    keys = ("chapters", "eval_chapters", "pairs_train", "pairs_eval", "chunks")
    pairs, chunks = report["pairs"], report["chunks"]
    ch = report["chapters"]
    total = (ch["total"], ch["eval"], pairs["train"], pairs["eval"], chunks["count"])
    print_table(
        f"{report['settings']['character']}'s lines by book",
        ["book", "chapters", "held out", "pairs train", "pairs eval", "chunks"],
        [
            *((Text(b["book"]), *(b[k] for k in keys)) for b in report["per_book"]),
            ["[bold]total", *(f"[bold]{v}" for v in total)],
        ],
    )
    kinds = ", ".join(f"{k} {v}" for k, v in report["prompt_kinds"].items())
    console.print(
        f"prompts: {kinds}; reply length median {report['response_chars']['median']}"
        f" characters; chunks: {chunks['count']} ({chunks['chars']:,} characters)"
    )
    if att := report["attribution"]:
        prec, rec = ("n/a" if v is None else f"{v:.3f}" for v in (att["precision"], att["recall"]))
        console.print(
            f"attribution on {att['labelled']} labelled quotes: precision "
            f"{prec} ({att['tp']}/{att['tp'] + att['fp']}), recall "
            f"{rec} ({att['tp']}/{att['tp'] + att['fn']})"
        )
    if not pairs["eval"]:
        console.print("[yellow]no held-out pairs: raise --eval-chapters or add chapters[/]")
    for s in report["samples"]:
        prompt = s["prompt"] if len(s["prompt"]) <= 240 else "..." + s["prompt"][-237:]
        where = f"\n[{s['book']} / {s['chapter']} @{s['offset']}, {s['prompt_kind']} prompt]"
        console.print(Text(where, style="dim"))
        console.print(Text("prompt: ", style="bold cyan") + Text(prompt))
        console.print(Text("reply:  ", style="bold magenta") + Text(s["response"]))
    console.print(f"\n[green]wrote {', '.join(FILES)} to {out}[/]")


@data_app.command("synthesize")
@friendly
def synthesize(
    spec: Annotated[Path, typer.Argument(help="persona YAML (data: may be empty)")],
    out: Annotated[Path, typer.Option(help="output folder (synth.jsonl, report.json)")],
    overrides: Overrides = None,
    teacher: Annotated[
        str | None,
        typer.Option(
            help="OpenAI-compatible API base URL of a teacher model (http://host:8000/v1); "
            "default: the spec's base model under the persona's system prompt"
        ),
    ] = None,
    teacher_model: Annotated[
        str | None, typer.Option(help="model name to ask the --teacher for")
    ] = None,
    teacher_key: Annotated[
        str | None, typer.Option(envvar="PERSONATUNE_TEACHER_KEY", help="--teacher API key")
    ] = None,
    n_prompts: Annotated[
        int | None, typer.Option(help="a seeded sample of this many prompts (default all)")
    ] = None,
    max_tokens: Annotated[int, typer.Option(help="answer limit in tokens")] = 128,
    seed: Annotated[int, typer.Option(help="prompt sampling seed")] = 0,
    overwrite: Annotated[bool, typer.Option(help="replace an existing --out folder")] = False,
):
    """Write persona training data from the spec's description and system prompt alone:
    a teacher answers general prompts in persona, and answers are kept only when the
    adoption classifier, the persona terms and the degeneration checks agree."""
    from personatune.config import load_spec
    from personatune.data import synthesize as synth
    from personatune.evaluate.progress import progress_bar

    s = load_spec(spec, overrides or [], need_data=False)
    with progress_bar(console) as bar:
        task = bar.add_task("teacher answers", total=None)
        report = synth.synthesize(
            s,
            out,
            teacher=synth.pick_teacher(s, teacher, teacher_model, teacher_key, max_tokens),
            n_prompts=n_prompts,
            max_tokens=max_tokens,
            seed=seed,
            overwrite=overwrite,
            progress=lambda d, t: bar.update(task, completed=d, total=t),
        )
    dropped = ", ".join(f"{k} {v}" for k, v in report["dropped"].items()) or "none"
    console.print(
        f"[green]kept {report['kept']} of {report['prompts']} answers[/] (dropped: {dropped}); "
        f"wrote {out / 'synth.jsonl'}. Train on it with data: [{{path: {out / 'synth.jsonl'}}}]"
    )


@app.command()
@friendly
def chat(
    persona_dirs: PersonaDirs,
    prompt: Annotated[str | None, typer.Option(help="answer this once and exit")] = None,
    temperature: Annotated[float, typer.Option(help="0 is greedy")] = 0.0,
    max_tokens: Annotated[int, typer.Option(help="longest answer in tokens")] = 256,
    quick_test: Annotated[
        bool,
        typer.Option("--quick-test", help="answer every persona's test_prompts and print a table"),
    ] = False,
    engine: EngineChoice = "torch",
):
    """Chat with personas in the terminal (streamed): /persona NAME switches, /personas
    lists, /reset clears, /exit quits. All personas share one base model in memory."""
    from personatune.engine import BASE_ID, Delta, Sampling

    load_registry, ask = _engine(engine)
    reg = load_registry(persona_dirs)
    names = [n for n in reg.personas if n != BASE_ID]
    current = names[0]
    histories: dict[str, list[dict]] = {n: [] for n in reg.personas}

    if quick_test:
        prompts = list(dict.fromkeys(q for n in names for q in reg.personas[n].test_prompts))
        if not prompts:
            raise PersonatuneError(
                "--quick-test: none of the personas lists test_prompts "
                "(add test_prompts: to the persona YAML)"
            )
        items = [(n, [{"role": "user", "content": q}]) for n in names for q in prompts]
        with console.status("answering as " + ", ".join(names)):  # one mixed-adapter batch
            out = ask(reg, items, Sampling(max_tokens, temperature))
        answers = {(n, q[0]["content"]): a.text for (n, q), a in zip(items, out)}
        print_table(
            f"test prompts (greedy, at most {max_tokens} tokens)",
            ["prompt", *names],
            [[Text(q), *(Text(answers[n, q]) for n in names)] for q in prompts],  # not markup
            show_lines=True,
        )
        return

    def answer(text: str) -> None:
        history = histories[current]
        history.append({"role": "user", "content": text})

        def show(ev) -> None:  # streamed: each new piece of text as it is decoded
            if isinstance(ev, Delta):
                sys.stdout.write(ev.text)
                sys.stdout.flush()

        out = ask(reg, [(current, history)], Sampling(max_tokens, temperature), emit=show)[0]
        sys.stdout.write("\n")
        history.append({"role": "assistant", "content": out.text})

    if prompt is not None:
        answer(prompt)
        return

    def introduce() -> None:
        console.print(Text(current, style="bold") + f": {reg.personas[current].description}")

    introduce()
    console.print(
        f"[dim]personas: {', '.join(reg.personas)}  (/persona NAME, /personas, /reset, /exit)[/]"
    )
    while True:
        try:
            text = console.input("[bold cyan]you> [/]").strip()
        except (EOFError, KeyboardInterrupt):
            break
        if text in ("/exit", "/quit"):
            break
        if text == "/reset":
            histories[current].clear()
            console.print("[dim]conversation cleared[/]")
        elif text == "/personas":
            for n, p in reg.personas.items():
                mark = "*" if n == current else " "
                console.print(Text(f"{mark} ") + Text(n, style="bold") + f": {p.description}")
        elif text.startswith("/persona"):
            name = text.removeprefix("/persona").strip()
            if name in reg.personas:
                current = name
                introduce()
            else:
                console.print(
                    Text(f"no persona '{name}'; choose from {', '.join(reg.personas)}", style="red")
                )
        elif text.startswith("/"):
            console.print("[red]unknown command[/]: /persona NAME, /personas, /reset, /exit")
        elif text:
            console.print(f"[bold magenta]{current}> [/]", end="")
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
    from personatune.evaluate.compare import compare as run_compare

    name, rows = run_compare(
        persona_dir, n_heldout=n_heldout, max_tokens=max_tokens, console=console
    )
    print_table(
        "base vs tuned (greedy, unseen prompts)",
        ["prompt", "base", f"tuned ({name})"],
        [[Text(c) for c in row] for row in rows],  # answers are not rich markup
        show_lines=True,
    )


@app.command("eval-heldout")
@friendly
def eval_heldout(
    persona_dir: Annotated[Path, typer.Argument(help="persona directory")],
    data: Annotated[
        list[Path] | None,
        typer.Option(
            help="held-out prompt/response file (repeatable); default: the eval_path files of "
            "the persona's data sources"
        ),
    ] = None,
    out: Annotated[
        Path | None,
        typer.Option(
            help="JSON report (a PNG plot is written beside it); default: "
            "PERSONA_DIR/heldout_perplexity.json"
        ),
    ] = None,
    max_length: Annotated[
        int, typer.Option(help="skip (and count) conversations longer than this many tokens")
    ] = 1024,
    batch_size: Annotated[int, typer.Option(help="conversations per forward pass")] = 4,
    limit: Annotated[int | None, typer.Option(help="score only the first N examples")] = None,
    threads: Threads = 0,
    overwrite: Annotated[bool, typer.Option(help="replace an existing report")] = False,
):
    """Conditional perplexity of held-out responses given their prompts, base model
    against the persona (response tokens only, exp of the mean NLL per token)."""
    from personatune.evaluate.heldout import eval_heldout as run_heldout
    from personatune.evaluate.progress import progress_bar

    set_threads(threads)
    with progress_bar(console) as bar:

        def progress(total: int):
            task = bar.add_task("scoring tuned, then base", total=total)
            return lambda n: bar.advance(task, n)

        report, out, plot = run_heldout(
            persona_dir,
            data=data or [],
            out=out,
            max_length=max_length,
            batch_size=batch_size,
            limit=limit,
            overwrite=overwrite,
            progress=progress,
            note=lambda n: console.print(f"[yellow]note: {n}[/]"),
        )
    print_heldout(report, max_length)
    console.print(f"[green]wrote {out} and {plot}[/]")


def set_threads(threads: int) -> None:
    """``--threads``: PyTorch's CPU thread count; 0 keeps its default.

    Raises:
        PersonatuneError: a negative count.
    """
    if threads < 0:
        raise PersonatuneError("--threads must be 0 (default) or more")
    if threads:
        import torch

        torch.set_num_threads(threads)


def print_heldout(report: dict, max_length: int) -> None:
    """The table of ``personatune eval-heldout``: all examples, then each group."""
    all_ = (report["base"]["perplexity"], report["tuned"]["perplexity"])
    print_table(
        "conditional perplexity of held-out responses (lower is better)",
        ["held-out set", "examples", "tokens", "base PPL", "tuned PPL"],
        [
            ("[bold]all", report["examples"], report["tokens"], *(f"{p:.2f}" for p in all_)),
            *(
                (Text(name), g["examples"], g["tokens"], f"{g['base']:.2f}", f"{g['tuned']:.2f}")
                for name, g in report["groups"].items()
            ),
        ],
    )
    if skipped := report["skipped_overlong"]:
        console.print(f"[yellow]{skipped} examples longer than {max_length} tokens skipped[/]")


@app.command("eval")
@friendly
def eval_(
    persona_dir: Annotated[Path, typer.Argument(help="persona directory from personatune train")],
    benchmark: Annotated[
        list[str] | None,
        typer.Option(
            help="multiple-choice benchmark TASK=PATH scored by log-likelihood with lm-eval "
            "(repeatable): an lm-eval task name with a local data file in its schema, or "
            "any name with a JSONL of {question, choices, label}"
        ),
    ] = None,
    out: Annotated[Path | None, typer.Option(help="report folder; default PERSONA_DIR")] = None,
    overwrite: Annotated[bool, typer.Option(help="replace an existing report")] = False,
    threads: Threads = 0,
):
    """Report card: base against tuned on held-out persona data, general prompts, the
    factual probe, stress prompts and benchmarks. Writes report.json and report.html."""
    from personatune.evaluate.card import print_summary
    from personatune.evaluate.run import evaluate

    set_threads(threads)
    benches = []
    for item in benchmark or []:
        task, sep, path = item.partition("=")
        if not sep or not task or not path:
            raise PersonatuneError(
                f"--benchmark '{item}' is not TASK=PATH "
                "(e.g. mc_tiny=src/personatune/evaluate/data/mc_tiny.jsonl)"
            )
        benches.append((task, path))
    report = evaluate(
        persona_dir, out_dir=out, overwrite=overwrite, benchmarks=benches, console=console
    )
    print_summary(report, out or persona_dir, console)


#: ``serve`` defaults, equal to personatune.engine.DEFAULT_MAX_BATCH / DEFAULT_MAX_QUEUE
#: (kept here so that ``--help`` needs no torch import; a test checks they agree).
SERVE_MAX_BATCH, SERVE_MAX_QUEUE = 8, 64


@app.command()
@friendly
def serve(
    persona_dirs: PersonaDirs,
    host: Annotated[str, typer.Option(help="address to listen on")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="TCP port; 0 picks a free one")] = 8000,
    api_key: Annotated[
        str | None,
        typer.Option(
            envvar="PERSONATUNE_API_KEY", help="require 'Authorization: Bearer KEY' on /v1"
        ),
    ] = None,
    system_prompt_policy: Annotated[
        str,
        typer.Option(
            help="request-wins: a request's own system message replaces the persona's; "
            "persona: the persona's system prompt always comes first"
        ),
    ] = "request-wins",
    max_batch: Annotated[
        int,
        typer.Option(
            help="requests decoded together (continuous batching); 8 suits a small CPU, "
            "use 32 or more on a GPU (benchmarks/results/serve_load_*.md)"
        ),
    ] = SERVE_MAX_BATCH,
    max_queue: Annotated[
        int, typer.Option(help="requests that may wait to join the batch; more get 429")
    ] = SERVE_MAX_QUEUE,
    max_tokens: Annotated[int, typer.Option(help="answer length when a request sets none")] = 512,
    upstream: Annotated[
        str | None,
        typer.Option(
            help="forward generation to this OpenAI-compatible server (vLLM, SGLang, another "
            "personatune serve) that serves each adapter under the persona's name"
        ),
    ] = None,
    upstream_key: Annotated[
        str | None,
        typer.Option(envvar="PERSONATUNE_UPSTREAM_KEY", help="API key sent to --upstream"),
    ] = None,
    print_vllm: Annotated[
        bool,
        typer.Option("--print-vllm", help="only print the vllm serve command for these personas"),
    ] = False,
    log_level: Annotated[str, typer.Option(help="uvicorn log level")] = "info",
    engine: EngineChoice = "torch",
):
    """Serve personas behind an OpenAI-compatible API (/v1/chat/completions, /v1/models),
    with a web chat at / . One base model in memory, one LoRA adapter per persona, many
    requests decoded together; or, with --upstream, generation forwarded elsewhere."""
    from personatune.engine import describe_personas
    from personatune.serve.app import bind, create_app, run_server
    from personatune.serve.backend import UpstreamBackend

    if print_vllm:
        from personatune.serve.vllm import vllm_command

        print(vllm_command(persona_dirs))
        return
    if system_prompt_policy not in ("request-wins", "persona"):
        raise PersonatuneError(
            f"--system-prompt-policy {system_prompt_policy}: choose request-wins or persona"
        )
    if max_queue < 1 or max_tokens < 1 or max_batch < 1:
        raise PersonatuneError("--max-batch, --max-queue and --max-tokens must be at least 1")
    if upstream is not None:
        if engine != "torch":
            raise PersonatuneError("--engine: generation happens at --upstream; drop --engine")
        if not upstream.startswith(("http://", "https://")):
            raise PersonatuneError(f"--upstream {upstream}: give an http:// or https:// URL")
        ref, personas = describe_personas(persona_dirs)
        reg = UpstreamBackend(upstream, personas, ref.name, upstream_key)
    else:
        load_registry, _ = _engine(engine)
        with console.status("loading the base model and adapters"):
            reg = load_registry(persona_dirs)
        if engine == "llama-cpp":
            from personatune.serve.llama_cpp import LlamaCppBackend

            reg = LlamaCppBackend(reg, max_queue)
    app_ = create_app(
        reg,
        api_key=api_key,
        system_prompt_policy=system_prompt_policy,
        max_queue=max_queue,
        max_batch=max_batch,
        max_tokens=max_tokens,
    )
    sock = bind(host, port)
    shown = f"[{host}]" if ":" in host else host
    via = f", generation at {upstream}" if upstream else ""
    print(
        f"serving {', '.join(reg.personas)} (base model {reg.base_model}{via}) on "
        f"http://{shown}:{sock.getsockname()[1]}  (web chat at /, API at /v1)",
        flush=True,
    )
    run_server(app_, sock, log_level)


@app.command()
@friendly
def export(
    persona_dir: Annotated[Path, typer.Argument(help="persona directory")],
    merged: Annotated[
        Path | None,
        typer.Option(help="write the model with the adapter merged in here (plain transformers)"),
    ] = None,
    gguf: Annotated[
        Path | None,
        typer.Option(
            help="write a GGUF folder here for llama.cpp, Ollama and LM Studio: "
            "NAME-QUANT.gguf (adapter merged) and an Ollama Modelfile"
        ),
    ] = None,
    lora_gguf: Annotated[
        bool,
        typer.Option(
            "--lora-gguf",
            help="with --gguf: the adapter alone as a llama.cpp LoRA GGUF beside a base GGUF",
        ),
    ] = False,
    quant: Annotated[
        str,
        typer.Option(help="GGUF weight type: f16, bf16, f32, q8_0, or q4_k_m etc. (llama.cpp)"),
    ] = "q8_0",
    push_to_hub: Annotated[
        str | None,
        typer.Option(help="upload the merged model to this Hugging Face Hub repo (user/name)"),
    ] = None,
    private: Annotated[bool, typer.Option(help="make the Hub repo private")] = False,
    dtype: Annotated[
        str | None,
        typer.Option(help="--merged dtype: float32, bfloat16 or float16 (default: the base's)"),
    ] = None,
    overwrite: Annotated[
        bool, typer.Option(help="replace an existing --merged or --gguf folder")
    ] = False,
):
    """Export a persona: a merged transformers model, a GGUF folder, and/or a Hub upload."""
    from personatune.export import check_hub, export_merged
    from personatune.export import push_to_hub as push
    from personatune.export.gguf_file import check_quant, export_gguf
    from personatune.persona import read_spec

    if merged is None and push_to_hub is None and gguf is None:
        raise PersonatuneError("give --merged OUT, --gguf OUT and/or --push-to-hub REPO")
    if lora_gguf and gguf is None:
        raise PersonatuneError("--lora-gguf writes into the --gguf folder: add --gguf OUT")
    if gguf is not None:
        check_quant(quant)  # fail before the slow merge
    if push_to_hub:
        check_hub(push_to_hub)
    if gguf is not None:
        with console.status("writing GGUF"):
            export_gguf(persona_dir, gguf, quant=quant, lora=lora_gguf, overwrite=overwrite)
        console.print(f"[green]GGUF and Modelfile written to {gguf}[/]")
        name = read_spec(persona_dir).name.lower()
        console.print(f"  ollama create {name} -f {gguf / 'Modelfile'} && ollama run {name}")
    if merged is None and push_to_hub is None:
        return
    with tempfile.TemporaryDirectory(prefix="personatune-export-") as tmp:
        target = merged if merged is not None else Path(tmp) / "merged"
        with console.status("merging the adapter into the base weights"):
            export_merged(persona_dir, target, overwrite=overwrite, dtype=dtype)
        if merged is not None:
            console.print(f"[green]merged model written to {merged}[/]")
        if push_to_hub:
            with console.status(f"uploading to {push_to_hub}"):
                url = push(target, push_to_hub, private=private)
            console.print(f"[green]pushed to {url}[/]")


def _engine(name: str):
    """``(load_registry, ask)`` of ``--engine NAME``: the torch engine, or llama.cpp
    (:mod:`personatune.engine.llama_cpp`)."""
    if name == "torch":
        from personatune.engine import ask, load_registry

        return load_registry, ask
    if name == "llama-cpp":
        from personatune.engine.llama_cpp import ask, load_llama_cpp

        return load_llama_cpp, ask
    raise PersonatuneError(f"--engine {name}: choose torch or llama-cpp")


if __name__ == "__main__":
    app()
