"""The guard on by default, its search when the gate refuses every checkpoint, and the
comparison with prompting (tiny random models; the gate's whole-probe measurement is
scripted, since a random model has no capability to measure)."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from personatune.cli import app
from personatune.config import GuardSettings, load_spec
from personatune.train import guard as guard_mod
from personatune.train import search as search_mod
from personatune.train.guard import compare_with_prompting, prompting_items, rouge_l_best

runner = CliRunner()

SEARCH_YAML = """guard:
  enabled: true
  preservation_ratio: 0.1
  preservation_max_new_tokens: 8
  eval_probe_questions: 4
  eval_general_prompts: 4
  beat_prompting: false
  search_budget_s: 100000
eval:
  general_prompts: 8
  max_new_tokens: 4
  probe_max_new_tokens: 4
  knowledge_max_new_tokens: 4
  classifier_pairs: 10
"""


@pytest.fixture(autouse=True)
def isolated_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("PERSONATUNE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("PERSONATUNE_BF16", "0")


def script_probe(monkeypatch, passes=lambda spec: False):
    """The gate's whole probe: the base model scores 50%, a checkpoint 50% when
    ``passes(spec)`` for the run's spec, else 40% (a 10-point drop)."""

    def fake(self, model, fingerprint, drift_convs, progress=None):
        ok = "+adapter" not in fingerprint or passes(self.spec)
        return {"probe_accuracy": 50.0 if ok else 40.0, "drift_ppl": 10.0}

    monkeypatch.setattr(guard_mod.Guard, "full_metrics", fake)


def test_guard_is_on_by_default_and_no_guard_turns_it_off(persona_yaml):
    """Guards against the guard being opt-in again (capability retention is the
    product's promise) and against --no-guard not reaching the spec: a run with
    --no-guard records no guard section and no gate, even when the YAML turns it on."""
    assert GuardSettings().enabled is True
    spec = persona_yaml(SEARCH_YAML + "train:\n  max_steps: 2\n")
    r = runner.invoke(app, ["train", str(spec), "--no-guard"])
    assert r.exit_code == 0, r.output
    out = spec.parent / "out"
    assert "guard" not in json.loads((out / "persona.json").read_text())
    assert load_spec(out / "config.yaml").guard.enabled is False
    assert not (out / "gate.json").exists()


def test_search_finds_and_publishes_an_adapter_the_gate_passes(persona_yaml, monkeypatch):
    """Guards against the guard giving only a verdict: when every checkpoint is refused
    and more preservation data would pass, the search's first round (ratio 0.25, from
    the base model) is published, with its settings as the spec, the search in the
    manifest, and every checkpoint tried on the frontier (JSON and plot)."""
    script_probe(monkeypatch, lambda spec: spec.guard.preservation_ratio >= 0.25)
    spec = persona_yaml(SEARCH_YAML)
    r = runner.invoke(app, ["train", str(spec)])
    assert r.exit_code == 0, r.output
    out = spec.parent / "out"
    manifest = json.loads((out / "persona.json").read_text())
    chosen = manifest["search"]["chosen"]
    assert chosen["run"] == "round-1" and [x["name"] for x in manifest["search"]["rounds"]] == [
        "round-1"
    ]
    published = load_spec(out / "config.yaml")
    assert published.guard.preservation_ratio == 0.25
    assert published.guard.search_budget_s == 100000  # the user's budget, not the round's 0
    adapter = out / "search/round-1/checkpoints" / f"checkpoint-{chosen['step']}"
    assert (out / "adapter_model.safetensors").read_bytes() == (
        adapter / "adapter_model.safetensors"
    ).read_bytes()
    assert not (adapter / "optimizer.pt").exists()  # a finished round keeps adapters only
    frontier = json.loads((out / "frontier.json").read_text())
    runs = {p["run"] for p in frontier["points"]}
    assert runs == {"refused run", "round-1"}
    refused = [p for p in frontier["points"] if p["run"] == "refused run"]
    assert refused and all(p["passed"] is False for p in refused)
    assert any(p["passed"] for p in frontier["points"] if p["run"] == "round-1")
    assert (out / "frontier.png").stat().st_size > 0
    assert json.loads((out / "gate.json").read_text())["chosen"] == chosen["step"]


def test_search_that_finds_nothing_says_which_lever_to_change(persona_yaml, monkeypatch):
    """Guards against a silent refusal: when no round passes, the run exits 2, nothing is
    published, the frontier of every round is in the unfinished run, and the message
    names the failing limit and the settings to change."""
    script_probe(monkeypatch)
    spec = persona_yaml(SEARCH_YAML)
    r = runner.invoke(app, ["train", str(spec)])
    assert r.exit_code == 2
    assert not (spec.parent / "out").exists()
    work = spec.parent / ".out.partial"
    frontier = json.loads((work / "frontier.json").read_text())
    assert [x["name"] for x in frontier["rounds"]] == ["round-1", "round-2", "round-3"]
    assert {x["settings"]["guard.preservation_ratio"] for x in frontier["rounds"]} == {0.25, 0.5}
    assert frontier["chosen"] is None and (work / "frontier.png").exists()
    # each refused round's checkpoints are points too (they were missing: a refused
    # round's files stay in its .round-N.partial folder; found on Sherlock)
    assert {p["run"] for p in frontier["points"]} == {
        "refused run",
        "round-1",
        "round-2",
        "round-3",
    }
    text = " ".join(r.output.split())
    assert "What to change" in text and "train.learning_rate=" in text
    assert "guard.preservation_ratio=" in text and "knowledge:" in text


def test_search_resumes_without_retraining_finished_rounds(persona_yaml, monkeypatch):
    """Guards against a search that is not resume-safe: interrupted before its second
    round, `train --resume` reads the first round back from search.json (not trained
    again) and runs the rest, in the same order."""
    script_probe(monkeypatch)
    spec = persona_yaml(SEARCH_YAML)
    real = search_mod.round_spec
    trained, stop = [], ["round-2"]

    def interrupt(spec, rnd, output):
        if rnd.name in stop:
            stop.clear()
            trained.append("interrupted")
            raise KeyboardInterrupt
        trained.append(rnd.name)
        return real(spec, rnd, output)

    monkeypatch.setattr(search_mod, "round_spec", interrupt)
    r = runner.invoke(app, ["train", str(spec)])
    assert r.exit_code != 0 and trained == ["round-1", "interrupted"]
    work = spec.parent / ".out.partial"
    first = json.loads((work / "search/search.json").read_text())["rounds"]
    assert [x["name"] for x in first] == ["round-1"]
    trained.clear()
    r = runner.invoke(app, ["train", str(spec), "--resume"])
    assert r.exit_code == 2 and "What to change" in r.output
    assert trained == ["round-2", "round-3"]
    rounds = json.loads((work / "search/search.json").read_text())["rounds"]
    assert [x["name"] for x in rounds] == ["round-1", "round-2", "round-3"]
    assert rounds[0] == first[0]


def test_search_budget_zero_refuses_at_once(persona_yaml, monkeypatch):
    """Guards against a search that ignores its budget: with guard.search_budget_s=0 the
    refusal is the gate's own, with no search folder."""
    script_probe(monkeypatch)
    spec = persona_yaml(SEARCH_YAML)
    r = runner.invoke(app, ["train", str(spec), "guard.search_budget_s=0"])
    assert r.exit_code == 2 and "retention gate" in r.output
    assert not (spec.parent / ".out.partial" / "search").exists()


def test_plan_is_the_measured_levers_and_deterministic(persona_yaml):
    """Guards against a search plan that depends on anything but the spec and the refused
    run's steps (a resumed search must take the same rounds), and against checkpoints as
    rare as the refused run's (Sherlock's interval was above its step count)."""
    spec = load_spec(
        persona_yaml("guard:\n  preservation_ratio: 0.1\n"), ["train.checkpoint_interval=500"]
    )
    a, b = search_mod.plan(spec, 69), search_mod.plan(spec, 69)
    assert a == b
    assert [r.settings["guard.preservation_ratio"] for r in a] == [0.25, 0.25, 0.5]
    lr = spec.train.learning_rate
    assert [r.settings.get("train.learning_rate", lr) for r in a] == [lr, lr / 2, lr / 4]
    assert all(r.settings["train.checkpoint_interval"] == 12 for r in a)  # ceil(69 / 6)


def test_rouge_l_best_takes_the_best_reference():
    """Guards against scoring an answer against one arbitrary reference when a held-out
    prompt has several (the issue's measure is the best of them)."""
    refs = [["the cat sat on the mat", "arr the ship sails at dawn"]]
    assert rouge_l_best(["arr the ship sails at dawn"], refs) == pytest.approx(1.0)
    assert rouge_l_best(["the cat sat on the mat"], refs) == pytest.approx(1.0)
    assert rouge_l_best(["nothing alike"], refs) == 0.0


def test_compare_with_prompting_says_what_to_change(persona_yaml):
    """Guards against a comparison that counts a tie as beating prompting or gives no
    remedy: the adapter must score strictly higher, else the advice names steps,
    learning rate, rank and data with values."""
    spec = load_spec(persona_yaml())
    refs = [["arr matey the answer be four"]]
    worse = compare_with_prompting(["arr matey the answer be four"], ["four"], refs, spec)
    assert not worse["beats"] and worse["base_rouge_l"] > worse["tuned_rouge_l"]
    for lever in ("train.epochs=2", "train.learning_rate=0.02", "lora.r=32", "data"):
        assert lever in worse["advice"]
    tie = compare_with_prompting(["four"], ["four"], refs, spec)
    assert not tie["beats"]
    better = compare_with_prompting(["four"], ["arr matey the answer be four"], refs, spec)
    assert better["beats"] and better["advice"] is None


def test_prompting_items_group_references_and_sample(persona_yaml):
    """Guards against a held-out prompt answered several times counting as several
    prompts (each with one reference), and against more prompts than asked for."""
    from personatune.data.loaders import Example

    spec = load_spec(persona_yaml(), ["guard.prompting_prompts=3"])
    ex = [
        Example(
            messages=[
                {"role": "user", "content": f"Q{i % 5}"},
                {"role": "assistant", "content": f"A{i}"},
            ]
        )
        for i in range(10)
    ]
    items = prompting_items(spec, ex)
    assert len(items) == 3
    for conv, refs in items:
        assert conv[0]["role"] == "system" and len(refs) == 2
    assert prompting_items(spec, ex) == items  # seeded


def test_gate_refuses_an_adapter_that_does_not_beat_prompting(persona_yaml, monkeypatch):
    """Guards against publishing an adapter further from the persona than prompting (the
    issue's 0.207 against 0.241): with retention scripted to pass, the base model given
    the system prompt reproduces the held-out references and the adapter does not, so
    the run is refused, saying so and what to change; when the adapter reproduces them,
    it is published."""
    script_probe(monkeypatch, lambda spec: True)

    def answers(good):
        def fake(self, model, fingerprint, items, progress=None):
            right = ("+adapter" in fingerprint) == good  # who reproduces the references
            return [refs[0] if right else "x" for _, refs in items]

        return fake

    yaml = SEARCH_YAML.replace("beat_prompting: false", "beat_prompting: true") + (
        "train:\n  epochs: 1\n  batch_size: 2\n  gradient_accumulation: 2\n"
        "  max_seq_length: 64\n  checkpoint_interval: 2\n  learning_rate: 0.01\n"
        "  eval_split: 0.25\n"
    )
    monkeypatch.setattr(guard_mod.Guard, "_answer_texts", answers(False))
    spec = persona_yaml(yaml)
    r = runner.invoke(app, ["train", str(spec), "guard.search_budget_s=0"])
    assert r.exit_code == 2
    text = " ".join(r.output.split())
    assert "does not beat prompting" in text and "lora.r=" in text
    gate = json.loads((spec.parent / ".out.partial" / "gate.json").read_text())
    assert gate["prompting"]["beats"] is False and gate["published"] is None

    monkeypatch.setattr(guard_mod.Guard, "_answer_texts", answers(True))
    r = runner.invoke(app, ["train", str(spec), "--overwrite"])
    assert r.exit_code == 0, r.output
    gate = json.loads((spec.parent / "out" / "gate.json").read_text())
    assert gate["prompting"]["beats"] is True and gate["published"] == gate["chosen"]


def test_report_card_says_plainly_when_the_adapter_does_not_beat_prompting():
    """Guards against a report card that shows the ROUGE-L row but leaves the reader to
    notice that prompting alone scored higher: the summary says so and what to change."""
    import io
    from pathlib import Path

    from rich.console import Console

    from personatune.evaluate import card

    rouge = {"rouge_l": {"base": 0.241, "tuned": 0.207, "higher_is_better": True, "unit": "",
                         "group": card.FIDELITY, "label": "ROUGE-L F1", "inputs": ["heldout"]}}  # fmt: skip
    report = {
        "persona": "tiny",
        "metrics": rouge,
        "targets": {"beats_prompting_rouge_l": False},
        "classifier": {"cv_folds": 5, "cv_error": 0.1, "n_persona": 5, "n_plain": 5},
        "probe_drop_points": 0.0,
        "drift_ratio": 1.0,
        "timings_s": {"total": 1.0},
    }
    buf = io.StringIO()
    card.print_summary(report, Path("out"), Console(file=buf, width=200))
    out = " ".join(buf.getvalue().split())
    assert "FAIL beats_prompting_rouge_l" in out
    assert "does not beat prompting: ROUGE-L 0.207 against 0.241" in out and "lora.r" in out
    report["targets"]["beats_prompting_rouge_l"] = True
    buf = io.StringIO()
    card.print_summary(report, Path("out"), Console(file=buf, width=200))
    assert "does not beat prompting" not in buf.getvalue()


@pytest.mark.parametrize("stop", [True, False])
def test_stop_at_target_ends_training_at_the_first_checkpoint_that_reaches_it(
    persona_yaml, monkeypatch, stop
):
    """Guards against guard.stop_at_target training on past a checkpoint that already
    reaches the adoption target within the retention tolerances (the demo's wasted last
    20 steps), against stopping at one below the target, and against stopping without
    the setting. Adoption on the subsets is scripted: base 30%, then 50% at step 2 and
    95% from step 4 on; knowledge and drift equal the base model's."""
    adoption = iter([0.3, 0.5] + [0.95] * 10)

    def measure(self, model, fingerprint=None, progress=None):
        a = next(adoption)
        return {
            "adoption_rate": a,
            "persona_score": a,
            "probe_accuracy": 50.0,
            "probe_plain_accuracy": 50.0,
            "drift_ppl": 10.0,
            "drift_ratio": 1.0,
        }

    monkeypatch.setattr(guard_mod.Guard, "measure", measure)
    script_probe(monkeypatch, lambda spec: True)
    guard = f"guard:\n  stop_at_target: {str(stop).lower()}\n"
    spec = persona_yaml(SEARCH_YAML.replace("guard:\n", guard))
    r = runner.invoke(app, ["train", str(spec), "train.max_steps=8"])
    assert r.exit_code == 0, r.output
    out = spec.parent / "out"
    log = [json.loads(x) for x in (out / "train_log.jsonl").read_text().splitlines()]
    steps = sorted({x["step"] for x in log if "guard" in x})
    assert steps == ([0, 2, 4] if stop else [0, 2, 4, 6, 8])
    assert json.loads((out / "gate.json").read_text())["chosen"] == (4 if stop else 8)
