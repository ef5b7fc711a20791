"""The held-out record: training writes which examples it held out (``heldout.jsonl``),
and ``eval``, ``compare`` and ``eval-heldout`` read that record instead of splitting the
data files again."""

import io
import json

import pytest
from rich.console import Console
from typer.testing import CliRunner

from personatune.cli import app
from personatune.config import load_spec
from personatune.data.dataset import persona_split, prepare_data
from personatune.evaluate.compare import compare_prompts
from personatune.io import read_jsonl
from personatune.persona import HELDOUT, read_spec
from personatune.train.trainer import train

EVAL = """  eval_split: 0.25
persona_terms: [arr]
eval:
  general_prompts: 4
  max_new_tokens: 4
  probe_max_new_tokens: 4
  classifier_pairs: 10
"""


@pytest.fixture
def trained(persona_yaml, monkeypatch, embedded_tokenizer):
    monkeypatch.setenv("PERSONATUNE_BF16", "0")
    spec_path = persona_yaml("  max_steps: 2\n" + EVAL, rows=24)
    spec = load_spec(spec_path)
    return train(spec), spec, spec_path.parent / "pairs.csv"


def _prompts(examples):
    return [e.messages[0]["content"] for e in examples]


def test_training_records_exactly_the_held_out_rows(trained, embedded_tokenizer):
    """Guards against the record drifting from the split training used: every held-out
    example of prepare_data is in heldout.jsonl, with its source and content hash."""
    out, spec, _ = trained
    rows = read_jsonl(out / HELDOUT)
    held = prepare_data(spec, embedded_tokenizer).split.heldout[0]
    assert len(rows) == len(held) == 6
    assert [r["messages"] for r in rows] == [e.messages for e in held]
    assert {r["source"] for r in rows} == {0} and all(len(r["sha256"]) == 64 for r in rows)


def test_changed_data_warns_and_eval_keeps_the_recorded_split(trained, tmp_path):
    """Guards against the "held-out" set silently changing when the data file changes
    after training: eval prints one note and still scores the recorded examples, and
    compare asks the recorded prompts."""
    from personatune.evaluate.run import evaluate

    out, _, csv = trained
    recorded = [r["messages"][0]["content"] for r in read_jsonl(out / HELDOUT)]
    lines = ["prompt,response"] + [
        f'"New question {i}?","Arr, new answer {i}!"' for i in range(40)
    ]  # a different file: a split derived from it would hold out other rows
    csv.write_text("\n".join(lines) + "\n")

    split = persona_split(read_spec(out), out)
    assert split.recorded and _prompts(split.heldout[0]) == recorded
    assert len(split.notes) == 1 and "data files changed" in split.notes[0]
    assert compare_prompts(out, read_spec(out), 3)[0] == recorded[:3]
    r = CliRunner().invoke(app, ["compare", str(out), "--n-heldout", "2", "--max-tokens", "3"])
    assert r.exit_code == 0, r.output
    assert recorded[0] in r.output and recorded[2] not in r.output

    buf = io.StringIO()
    report = evaluate(out, out_dir=tmp_path / "r", console=Console(file=buf, width=400))
    assert buf.getvalue().count("data files changed") == 1
    assert [a["prompt"] for a in report["answers"]["heldout"]] == recorded
    assert report["data"]["split_notes"] == split.notes


def test_directory_without_record_derives_the_split_with_a_note(trained):
    """Guards against persona directories trained before the record existed breaking:
    the split is derived from the data files again, as training did, with a note."""
    out, _, _ = trained
    recorded = [r["messages"][0]["content"] for r in read_jsonl(out / HELDOUT)]
    (out / HELDOUT).unlink()
    split = persona_split(read_spec(out), out)
    assert not split.recorded and _prompts(split.heldout[0]) == recorded
    assert len(split.notes) == 1 and HELDOUT in split.notes[0]


def test_bad_record_row_names_the_line(trained):
    """Guards against a damaged record giving a traceback instead of a one-line error."""
    from personatune.errors import PersonatuneError

    out, _, _ = trained
    rows = read_jsonl(out / HELDOUT)
    rows[1]["source"] = 7
    (out / HELDOUT).write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(PersonatuneError, match=r"heldout.jsonl:line 2: no valid 'source'"):
        persona_split(read_spec(out), out)
