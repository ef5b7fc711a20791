"""Bad input, as a new user gives it: every case ends in exit status 2, exactly one line on
stderr that names the file, row or key, and a file tree identical before and after
(issue 11). Each case is one row of a table; the ids say what the user did.

Guards against tracebacks (exit 1, dozens of lines), messages that blame the wrong file or
line, and runs that delete, replace or leave behind files when they refuse.
"""

from __future__ import annotations

import codecs
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
from trees import tree_hash
from typer.testing import CliRunner

from personatune.cli import app
from personatune.config import load_spec

runner = CliRunner()


@pytest.fixture(autouse=True)
def plain_env(monkeypatch):
    monkeypatch.setenv("PERSONATUNE_BF16", "0")
    monkeypatch.delenv("PERSONATUNE_DEBUG", raising=False)


def refuse(args: list[str], roots: list[Path], *names: str) -> str:
    """Run the CLI; assert exit 2, one ``error:`` line holding every one of ``names``, and
    no change under ``roots``. Returns the line."""
    before = tree_hash(*roots)
    r = runner.invoke(app, [str(a) for a in args])
    assert r.exit_code == 2, (r.exit_code, r.output, r.exception)
    assert r.stderr.startswith("error: ") and r.stderr.count("\n") == 1, r.stderr
    for name in names:
        assert name in r.stderr, (name, r.stderr)
    assert "Traceback" not in r.output
    assert tree_hash(*roots) == before, "files changed although the command refused"
    return r.stderr


# ---------------------------------------------------------------- the data file

SPEC = (
    "name: tiny\nsystem_prompt: You are a pirate.\nmodel:\n  name: {model}\n"
    "data:\n  - path: {data}\n{source}output_dir: out\n"
    "guard:\n  enabled: false\n"  # a random model has no capability to guard
    "train:\n  max_steps: 1\n  batch_size: 2\n  gradient_accumulation: 1\n"
    "  max_seq_length: 64\n"
)
GOOD_ROWS = "".join(f"q{i},a{i}\n" for i in range(5))


@dataclass
class Data:
    name: str
    content: bytes | str | None  # None: a folder
    names: tuple[str, ...]  # what the error line must contain
    source: str = ""  # extra keys of the data source (indented YAML)


DATA_CASES = {
    "csv unclosed quote on line 6": Data(
        "d.csv", "prompt,response\n" + "q,a\n" * 4 + '"q5,a5\nq6,a6\n', ("d.csv", "line 6")
    ),
    "csv unclosed quote on line 13": Data(
        "d.csv", "prompt,response\n" + "q,a\n" * 11 + 'q,"a\n', ("d.csv", "line 13", "quote")
    ),
    "csv text after a closing quote": Data(
        "d.csv", 'prompt,response\nq,a\n"q"x,a\n', ("d.csv", "line 3")
    ),
    "csv row with more fields": Data(
        "d.csv", "prompt,response\nq,a\nq,a,b\n", ("d.csv:row 2", "more fields", "line 3")
    ),
    "csv row with fewer fields": Data("d.csv", "prompt,response\nq\n", ("d.csv:row 1", "fewer")),
    "csv missing columns": Data("d.csv", "question,answer\nq,a\n", ("d.csv:row 1", "format")),
    "csv missing response column (format: pairs)": Data(
        "d.csv", "prompt,reply\nq,a\n", ("d.csv:row 1", "'response'"), "    format: pairs\n"
    ),
    "csv empty response": Data("d.csv", "prompt,response\nq,a\nq,\n", ("d.csv:row 2", "empty")),
    "csv empty file": Data("d.csv", "", ("d.csv", "empty CSV")),
    "csv header only": Data("d.csv", "prompt,response\n", ("d.csv", "no examples")),
    "csv not utf-8": Data(
        "d.csv", b"prompt,response\nq,caf\xe9\n", ("d.csv", "line 2", "encoding: cp1252")
    ),
    "csv utf-16 without BOM": Data(
        "d.csv", ("prompt,response\n" + GOOD_ROWS).encode("utf-16-le"), ("d.csv", "utf-16")
    ),
    "csv unknown encoding": Data(
        "d.csv",
        "prompt,response\nq,a\n",
        ("d.csv", "unknown encoding 'nope'"),
        "    encoding: nope\n",
    ),  # fmt: skip
    "jsonl invalid line 3": Data(
        "d.jsonl",
        '{"prompt": "q", "response": "a"}\n\n{"prompt": "q"\n',
        ("d.jsonl:line 3", "invalid JSON"),
    ),
    "jsonl line not an object": Data(
        "d.jsonl", '{"prompt": "q", "response": "a"}\n[1, 2]\n', ("d.jsonl:line 2", "object")
    ),
    "jsonl no assistant turn": Data(
        "d.jsonl", '{"messages": [{"role": "user", "content": "q"}]}\n', ("d.jsonl:line 1",)
    ),
    "jsonl unknown role": Data(
        "d.jsonl",
        '{"messages": [{"role": "bot", "content": "q"}]}\n',
        ("d.jsonl:line 1 message 1", "'bot'"),
    ),
    "json a number": Data("d.json", "5\n", ("d.json", "list")),
    "json response not a string": Data(
        "d.json", '[{"prompt": "q", "response": 5}]', ("d.json:item 1", "'response'", "int")
    ),
    "data file missing": Data("missing.csv", b"", ("missing.csv", "no such data file")),
    "data path a folder": Data("datadir", None, ("datadir", "folder")),
    "data file of unknown type": Data("d.txt", "q a\n", ("d.txt", "format")),
}


@pytest.mark.parametrize("command", ["train", "inspect"])
@pytest.mark.parametrize("case", DATA_CASES, ids=list(DATA_CASES))
def test_bad_data(case, command, tmp_path, tiny_model):
    """Issue 11 defects 2 and 4: a data path that is a folder was a traceback; an unclosed
    quote on line 6 was reported on line 5; UTF-16 got the hint cp1252."""
    c = DATA_CASES[case]
    if c.content is None:
        (tmp_path / c.name).mkdir()
    elif c.name != "missing.csv":
        raw = c.content if isinstance(c.content, bytes) else c.content.encode()
        (tmp_path / c.name).write_bytes(raw)
    spec = tmp_path / "persona.yaml"
    spec.write_text(SPEC.format(model=tiny_model, data=c.name, source=c.source))
    args = ["train", spec] if command == "train" else ["data", "inspect", spec]
    refuse(args, [tmp_path], *c.names)


@pytest.mark.parametrize(
    "encoding,bom", [("utf-16-le", codecs.BOM_UTF16_LE), ("utf-16-be", codecs.BOM_UTF16_BE),
                     ("utf-8", codecs.BOM_UTF8)],
)  # fmt: skip
def test_a_file_with_a_byte_order_mark_loads(encoding, bom, tmp_path, tiny_model):
    """Issue 11 defect 4: a UTF-16 file with its BOM was read as UTF-8 and failed with the
    hint 'encoding: cp1252'; the BOM says what the file is."""
    (tmp_path / "d.csv").write_bytes(bom + ("prompt,response\n" + GOOD_ROWS).encode(encoding))
    spec = tmp_path / "persona.yaml"
    spec.write_text(SPEC.format(model=tiny_model, data="d.csv", source=""))
    r = runner.invoke(app, ["data", "inspect", str(spec)])
    assert r.exit_code == 0, r.output
    assert "⟦a0" in r.stdout


# ---------------------------------------------------------------- the spec and overrides


def _spec(tmp_path, tiny_model, text: str | None = None) -> Path:
    (tmp_path / "d.csv").write_text("prompt,response\n" + GOOD_ROWS)
    spec = tmp_path / "persona.yaml"
    spec.write_text(
        text if text is not None else SPEC.format(model=tiny_model, data="d.csv", source="")
    )
    return spec


SPEC_CASES = {
    # id: (spec text or None for the good one, overrides, names in the message)
    "spec missing": ("<missing>", [], ("nope.yaml", "no such persona file")),
    "spec a folder": ("<folder>", [], ("specdir", "folder")),
    "spec empty": ("", [], ("persona.yaml", "empty")),
    "spec only comments": ("# nothing yet\n", [], ("persona.yaml", "empty")),
    "spec invalid yaml": ("name: [tiny\n", [], ("persona.yaml", "invalid YAML at line")),
    "spec a list": ("- name: tiny\n", [], ("persona.yaml", "mapping")),
    "spec unknown key": (
        "name: t\ndata: [{path: d.csv}]\ntrain: {epoch: 1}\n", [],
        ("persona.yaml", "unknown key 'train.epoch'", "train.epochs"),
    ),
    "spec bad value": (
        "name: t\ndata: [{path: d.csv}]\ntrain: {epochs: abc}\n", [],
        ("persona.yaml", "'train.epochs'"),
    ),
    "spec value out of range": (
        "name: t\ndata: [{path: d.csv}]\nlora: {r: 0}\n", [], ("persona.yaml", "'lora.r'"),
    ),
    "spec without data": ("name: t\n", [], ("persona.yaml", "'data'")),
    "spec name with a slash": ("name: a/b\ndata: [{path: d.csv}]\n", [], ("'name'",)),
    "override bad value": (None, ["train.epochs=abc"], ("override 'train.epochs=abc'",)),
    "override unknown key": (None, ["train.epoch=1"], ("unknown key 'train.epoch'", "epochs")),
    "override without =": (None, ["train.epochs"], ("'train.epochs' is not key=value",)),
    "override empty model name": (None, ["model.name="], ("override 'model.name='",)),
    "override into a value": (None, ["model=x", "model.name=y"], ("'model'",)),
    "override unclosed bracket": (None, ["lora.target_modules=[q_proj"], ("lora.target_modules",)),
    "override unknown optimizer": (None, ["train.optimizer=adamw_torh"], ("train.optimizer", "adamw_torch")),
    "override unknown scheduler": (None, ["train.lr_scheduler=cosin"], ("train.lr_scheduler", "cosine")),
}  # fmt: skip


@pytest.mark.parametrize("case", SPEC_CASES, ids=list(SPEC_CASES))
def test_bad_spec_or_override(case, tmp_path, tiny_model, monkeypatch):
    """Issue 11 defects 2 and 4: a spec folder was a traceback, an empty spec said
    "'name': Field required", and a bad command-line value was blamed on the YAML file."""
    text, overrides, names = SPEC_CASES[case]
    monkeypatch.chdir(tmp_path)
    if text == "<missing>":
        spec = Path("nope.yaml")
        _spec(tmp_path, tiny_model)
    elif text == "<folder>":
        _spec(tmp_path, tiny_model)
        spec = Path("specdir")
        spec.mkdir()
    else:
        spec = _spec(tmp_path, tiny_model, text)
    line = refuse(["train", spec, *overrides], [tmp_path], *names)
    if overrides and "override" in case and "unknown" not in case:
        assert "persona.yaml" not in line  # the file is not to blame


# ---------------------------------------------------------------- the model and the machine


def test_model_references(tmp_path, tiny_model):
    """Issue 11 defect 2: an empty or non-model folder as model.name was 'ValueError:
    Couldn't instantiate the backend tokenizer' (57 lines); a Hub id offline and a
    missing path must say what to do."""
    spec = _spec(tmp_path, tiny_model)
    (tmp_path / "empty").mkdir()
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "readme.txt").write_text("not a model")
    (tmp_path / "config_only").mkdir()
    (tmp_path / "config_only" / "config.json").write_bytes(
        (tiny_model / "config.json").read_bytes()
    )
    roots = [tmp_path]
    for name, says in [
        (tmp_path / "empty", ("holds no model", "config.json")),
        (tmp_path / "notes", ("holds no model",)),
        (tmp_path / "config_only", ("tokenizer",)),
        ("./no_such_model", ("no such file or directory",)),
        ("nobody/no-such-model", ("Hugging Face Hub", "local path")),
    ]:
        for cmd in (["train", spec], ["data", "inspect", spec]):
            refuse([*cmd, f"model.name={name}"], roots, f"model '{name}'", *says)


@pytest.mark.parametrize(
    "override,names",
    [
        ("model.quantization=nf4", ("model.quantization", "nf4", "CUDA")),
        ("train.optimizer=paged_adamw_32bit", ("train.optimizer", "paged_adamw_32bit", "bitsandbytes")),
        ("train.optimizer=adamw_bnb_8bit", ("train.optimizer", "adamw_torch")),
    ],
)  # fmt: skip
def test_cuda_only_settings_on_cpu(override, names, tmp_path, tiny_model):
    """Issue 11 defect 3: nf4 on CPU failed after creating an empty .out.partial that the
    next run reused; a bitsandbytes optimizer was an ImportError traceback after it."""
    if sys.platform != "linux" or os.environ.get("CUDA_VISIBLE_DEVICES", "") not in ("", "-1"):
        pytest.skip("CPU-only case")
    import torch

    if torch.cuda.is_available():
        pytest.skip("CPU-only case")
    spec = _spec(tmp_path, tiny_model)
    refuse(["train", spec, override], [tmp_path], *names)


def test_liger_on_cpu_is_ignored_as_documented(tmp_path, tiny_model):
    """train.liger is documented as ignored on CPU: it must not fail the run."""
    spec = _spec(tmp_path, tiny_model)
    r = runner.invoke(app, ["train", str(spec), "train.liger=true"])
    assert r.exit_code == 0, r.output


# ---------------------------------------------------------------- outputs


def test_outputs(tmp_path, tiny_model, monkeypatch):
    """Issue 11 defects 1 and 2: outputs that exist, that are not personatune's, that hold
    the inputs, that are the current directory, or that cannot be written (/proc: a
    FileNotFoundError traceback)."""
    spec = _spec(tmp_path, tiny_model)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "keep").mkdir()
    (tmp_path / "keep" / "important.txt").write_text("mine")
    (tmp_path / "afile").write_text("mine")
    roots = [tmp_path]
    refuse(["train", spec, "output_dir=.", "--overwrite"], roots, "current directory")
    refuse(["train", spec, f"output_dir={tmp_path}", "--overwrite"], roots, "current directory")
    refuse(
        ["train", spec, "output_dir=keep", "--overwrite"], roots, "keep", "not a persona directory"
    )
    refuse(["train", spec, "output_dir=/proc/x"], roots, "/proc/x", "cannot write")
    refuse(["train", spec, "output_dir=afile/x"], roots, "afile", "is a file")
    refuse(["train", spec, "output_dir=afile", "--overwrite"], roots, "afile")
    refuse(["train", spec, "--resume"], roots, "no unfinished run")
    r = runner.invoke(app, ["train", str(spec)])
    assert r.exit_code == 0, r.output
    refuse(["train", spec], roots, "out already exists", "--overwrite")
    refuse(["data", "inspect", spec, "--index", "999"], roots, "--index 999")  # fmt: skip


@pytest.fixture(scope="module")
def persona(tmp_path_factory, tiny_model):
    """A persona directory trained one step, its spec and data beside it."""
    import personatune.train.trainer as trainer

    root = tmp_path_factory.mktemp("persona")
    (root / "d.csv").write_text("prompt,response\n" + GOOD_ROWS)
    (root / "persona.yaml").write_text(SPEC.format(model=tiny_model, data="d.csv", source=""))
    return trainer.train(load_spec(root / "persona.yaml"))


def test_report_writers_replace_only_their_own_files(persona, tmp_path):
    """Issue 11 defect 1 for eval and eval-heldout: --overwrite must not replace the
    spec's data, the persona's own files, a folder, or a report personatune did not
    write; and an output that cannot be written is refused before any work."""
    root = persona.parent
    data = root / "d.csv"
    (tmp_path / "theirs").mkdir()
    (tmp_path / "theirs" / "report.json").write_text('{"mine": true}')
    (tmp_path / "html_only").mkdir()
    (tmp_path / "html_only" / "report.html").write_text("<p>my own page</p>")
    (tmp_path / "notes.json").write_text('{"persona": "x"}')
    roots = [root, tmp_path]
    ev = ["eval", persona, "--overwrite", "--out"]
    refuse([*ev, tmp_path / "theirs"], roots, "report.json", "not a report that personatune wrote")
    refuse([*ev, tmp_path / "html_only"], roots, "report.html", "no report.json")
    refuse([*ev, data], roots, "d.csv", "file")
    refuse([*ev, "/proc/x"], roots, "/proc/x", "cannot write")
    ho = ["eval-heldout", persona, "--overwrite", "--out"]
    refuse([*ho, data], roots, "d.csv", "input")
    refuse([*ho, persona / "config.yaml"], roots, "config.yaml", "not a held-out perplexity report")
    refuse([*ho, persona / "persona.json"], roots, "persona.json", "not a held-out")
    refuse([*ho, tmp_path / "notes.json"], roots, "notes.json", "not a held-out")
    refuse([*ho, tmp_path / "theirs"], roots, "theirs", "folder")
    refuse([*ho, "/proc/x/h.json"], roots, "/proc/x/h.json", "cannot write")
    refuse(["eval", tmp_path / "theirs"], roots, "not a persona directory")


def test_export_replaces_only_its_own_folder(persona, tmp_path):
    """Issue 11 defect 1 for export --merged: a foreign folder or the persona itself."""
    (tmp_path / "keep").mkdir()
    (tmp_path / "keep" / "important.txt").write_text("mine")
    roots = [persona.parent, tmp_path]
    ex = ["export", persona, "--overwrite", "--merged"]
    refuse([*ex, tmp_path / "keep"], roots, "keep", "not a merged model folder")
    refuse([*ex, persona], roots, "input")
    refuse([*ex, persona.parent], roots, "holds")


# ---------------------------------------------------------------- bugs and --debug


def test_a_bug_is_one_line_with_exit_1_and_debug_shows_the_traceback(
    tmp_path, tiny_model, monkeypatch
):
    """Issue 11 defect 2: failures that are not the user's must say they are a bug in one
    line (exit 1), and --debug / PERSONATUNE_DEBUG=1 must show the traceback."""
    import personatune.config

    def broken(*a, **k):
        raise RuntimeError("something internal\nwith a second line")

    monkeypatch.setattr(personatune.config, "load_spec", broken)
    spec = _spec(tmp_path, tiny_model)
    r = runner.invoke(app, ["train", str(spec)])
    assert r.exit_code == 1
    assert (
        r.stderr.count("\n") == 1
        and "internal error (RuntimeError: something internal)" in r.stderr
    )
    assert "--debug" in r.stderr and "Traceback" not in r.stderr
    r = runner.invoke(app, ["--debug", "train", str(spec)])
    assert r.exit_code == 1 and "Traceback" in r.stderr and "broken" in r.stderr
    monkeypatch.setenv("PERSONATUNE_DEBUG", "0")
    assert "Traceback" not in runner.invoke(app, ["train", str(spec)]).stderr
    monkeypatch.setenv("PERSONATUNE_DEBUG", "1")
    assert "Traceback" in runner.invoke(app, ["train", str(spec)]).stderr
    monkeypatch.delenv("PERSONATUNE_DEBUG")
    r = runner.invoke(app, ["--debug", "train", str(spec), "train.epoch=1"])
    assert r.exit_code == 1  # still load_spec's bug, not the override


def test_user_errors_keep_exit_2_under_debug(tmp_path, tiny_model):
    """--debug adds the traceback but must not turn a user error into exit 1."""
    spec = _spec(tmp_path, tiny_model)
    r = runner.invoke(app, ["--debug", "train", str(spec), "train.epoch=1"])
    assert r.exit_code == 2 and "Traceback" in r.stderr
    assert r.stderr.splitlines()[-1].startswith("error: unknown key 'train.epoch'")


def test_disk_errors_name_the_file(tmp_path, tiny_model, monkeypatch):
    """A full disk or a permission error deep inside a run is the user's machine, not a
    bug: one line naming the file, exit 2."""
    import errno

    import personatune.train.trainer as trainer

    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "x"))

    monkeypatch.setattr(trainer, "train", full)
    spec = _spec(tmp_path, tiny_model)
    refuse(["train", spec], [tmp_path], "No space left on device", str(tmp_path / "x"))


@pytest.mark.parametrize("error", ["user", "interrupt"])
def test_a_run_that_fails_before_its_first_checkpoint_leaves_nothing(
    error, tmp_path, tiny_model, monkeypatch
):
    """Issue 11 defect 3: a run that failed before training (nf4 on CPU, a broken model)
    left an empty .out.partial that the next run silently reused. A failure, or Ctrl-C,
    after the work folder exists but before the first checkpoint removes it."""
    import personatune.train.trainer as trainer
    from personatune.errors import PersonatuneError

    def broken(*a, **k):
        if error == "interrupt":
            raise KeyboardInterrupt
        raise PersonatuneError("model 'x': cannot load (broken weights)")

    monkeypatch.setattr(trainer, "load_model", broken)
    spec = _spec(tmp_path, tiny_model)
    if error == "user":
        refuse(["train", spec], [tmp_path], "broken weights")
    else:
        before = tree_hash(tmp_path)
        r = runner.invoke(app, ["train", str(spec)])
        assert r.exit_code == 130 and r.stderr == "error: interrupted\n"
        assert tree_hash(tmp_path) == before


def test_corpus_output_that_cannot_be_written(tmp_path):
    """data from-corpus --out /proc/x failed inside mkdir; it must name the folder."""
    corpus = tmp_path / "hamlet.txt"
    corpus.write_bytes(
        (Path(__file__).parent / "fixtures/scripts/hamlet_act1_scene1.txt").read_bytes()
    )
    refuse(
        ["data", "from-corpus", corpus, "--character", "Horatio", "--out", "/proc/x"],
        [tmp_path],
        "/proc/x",
        "cannot write",
    )
