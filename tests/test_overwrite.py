"""--overwrite replaces only what personatune wrote (issue 11, defect 1: it deleted the
folder holding the spec and its data, and any folder named by output_dir)."""

import os

import pytest
from trees import tree_hash
from typer.testing import CliRunner

from personatune.cli import app
from personatune.errors import PersonatuneError
from personatune.io import check_replaceable

runner = CliRunner()


@pytest.fixture(autouse=True)
def fp32(monkeypatch):
    monkeypatch.setenv("PERSONATUNE_BF16", "0")


def test_output_dir_dot_keeps_spec_and_data(persona_yaml, tmp_path, monkeypatch):
    """The reported reproduction: output_dir=. with --overwrite deleted base.yaml and
    good.csv and exited 0."""
    spec = persona_yaml("  max_steps: 2\n")
    monkeypatch.chdir(tmp_path)
    before = tree_hash(tmp_path)
    r = runner.invoke(app, ["train", spec.name, "output_dir=.", "--overwrite"])
    assert r.exit_code == 2, r.output
    assert r.stderr.count("\n") == 1 and "current directory" in r.stderr
    assert tree_hash(tmp_path) == before


def test_foreign_folder_is_never_replaced(persona_yaml, tmp_path):
    """output_dir=/some/dir/keep deleted keep/important.txt."""
    spec = persona_yaml("  max_steps: 2\n")
    keep = tmp_path / "some" / "keep"
    keep.mkdir(parents=True)
    (keep / "important.txt").write_text("do not lose me")
    before = tree_hash(tmp_path)
    r = runner.invoke(app, ["train", str(spec), f"output_dir={keep}", "--overwrite"])
    assert r.exit_code == 2, r.output
    assert "not a persona directory that personatune wrote" in r.stderr
    assert r.stderr.count("\n") == 1
    assert tree_hash(tmp_path) == before


def test_a_persona_directory_is_replaced(persona_yaml, tmp_path):
    spec = persona_yaml("  max_steps: 1\n")
    assert runner.invoke(app, ["train", str(spec)]).exit_code == 0
    (tmp_path / "out" / "stale.txt").write_text("x")
    r = runner.invoke(app, ["train", str(spec), "--overwrite"])
    assert r.exit_code == 0, r.output
    assert not (tmp_path / "out" / "stale.txt").exists()
    assert (tmp_path / "out" / "adapter_config.json").exists()


def test_folder_holding_an_input_or_above_cwd_is_kept(tmp_path, monkeypatch):
    data = tmp_path / "proj" / "data.csv"
    data.parent.mkdir()
    data.write_text("prompt,response\n")
    with pytest.raises(PersonatuneError, match="holds data.csv"):
        check_replaceable(tmp_path / "proj", "persona directory", [data], ("data.csv",))
    with pytest.raises(PersonatuneError, match="is an input"):
        check_replaceable(data, "report", [data], ())
    monkeypatch.chdir(data.parent)
    with pytest.raises(PersonatuneError, match="current directory"):
        check_replaceable(tmp_path, "persona directory", [], ())
    (tmp_path / "empty").mkdir()
    check_replaceable(tmp_path / "empty", "persona directory", [], ("x",))  # nothing to lose
    assert os.listdir(data.parent) == ["data.csv"]
