"""The command line: exit codes, one-line errors, data inspect, train and chat on a tiny model."""

import pytest
from typer.testing import CliRunner

from personatune.cli import app

runner = CliRunner()


@pytest.fixture(autouse=True)
def fp32(monkeypatch):
    monkeypatch.setenv("PERSONATUNE_BF16", "0")


def test_unknown_override_is_one_line_exit_2(persona_yaml):
    r = runner.invoke(app, ["train", str(persona_yaml()), "train.epoch=1"])
    assert r.exit_code == 2
    assert r.stderr == "error: unknown key 'train.epoch'; did you mean 'train.epochs'?\n"


@pytest.mark.parametrize(
    "csv,message",
    [
        ("prompt,response\nx,\n", "pairs.csv:row 1: field 'response' is empty"),
        ("prompt,response\nx,y,z\n", "pairs.csv:row 1: has more fields than the header"),
        ("question,answer\nx,y\n", "cannot tell the format from the keys"),
        (b"prompt,response\n\xff\xfe,y\n", "pairs.csv: line 2 is not valid utf-8"),
    ],
)
def test_bad_data_exits_2_and_writes_nothing(persona_yaml, tmp_path, csv, message):
    """Guards against a traceback or a half-written persona directory on bad input."""
    spec = persona_yaml()
    path = tmp_path / "pairs.csv"
    path.write_bytes(csv if isinstance(csv, bytes) else csv.encode())
    r = runner.invoke(app, ["train", str(spec)])
    assert r.exit_code == 2
    assert r.stderr.count("\n") == 1 and message in r.stderr
    assert not (tmp_path / "out").exists() and not (tmp_path / ".out.partial").exists()


def test_data_inspect_marks_trained_tokens(persona_yaml):
    r = runner.invoke(app, ["data", "inspect", str(persona_yaml())])
    assert r.exit_code == 0, r.output
    assert "⟦Arr, answer" in r.stdout and "matey!<|im_end|>⟧" in r.stdout
    assert "<|im_start|>user" in r.stdout and "⟦<|im_start|>" not in r.stdout


def test_train_then_chat_prompt(persona_yaml, tmp_path):
    spec = persona_yaml("  max_steps: 2\n")
    r = runner.invoke(app, ["train", str(spec)])
    assert r.exit_code == 0, r.output
    r = runner.invoke(app, ["train", str(spec)])
    assert r.exit_code == 2 and "already exists; pass --overwrite" in r.stderr
    r = runner.invoke(
        app, ["chat", str(tmp_path / "out"), "--prompt", "hello", "--max-tokens", "4"]
    )
    assert r.exit_code == 0, r.output
    assert r.stdout.strip()


def test_chat_on_a_non_persona_dir(tmp_path):
    r = runner.invoke(app, ["chat", str(tmp_path), "--prompt", "hi"])
    assert r.exit_code == 2 and "not a persona directory" in r.stderr


def test_debug_does_not_leak_into_the_next_command(tmp_path):
    """--debug set PERSONATUNE_DEBUG for the whole process, so every later command in the
    same process (tests, notebooks) printed tracebacks and broke its one-line errors."""
    import os

    r = runner.invoke(app, ["--debug", "train", str(tmp_path / "missing.yaml")])
    assert r.exit_code == 2 and "Traceback" in r.stderr
    assert "PERSONATUNE_DEBUG" not in os.environ
    r = runner.invoke(app, ["train", str(tmp_path / "missing.yaml")])
    assert r.exit_code == 2 and r.stderr.count("\n") == 1
