"""The retention gate on scripted metric histories, preservation data, and the gate's
hook in training (a failing gate publishes nothing; --no-gate publishes)."""

import json

import pytest

from personatune.evaluate.answers import Answer
from personatune.evaluate.probe import general_split
from personatune.train.guard import (
    guard_history,
    preservation_prompts,
    preservation_rows,
    select_checkpoint,
)

BASE = {"probe_accuracy": 50.0}
HISTORY = [  # persona score rises with training, retention falls
    {"step": 40, "persona_score": 0.50, "probe_accuracy": 50.0, "drift_ratio": 1.10},
    {"step": 80, "persona_score": 0.80, "probe_accuracy": 47.0, "drift_ratio": 1.20},
    {"step": 120, "persona_score": 0.90, "probe_accuracy": 49.0, "drift_ratio": 1.70},
    {"step": 160, "persona_score": 0.70, "probe_accuracy": 48.0, "drift_ratio": 1.50},
]


def test_gate_picks_highest_persona_score_within_tolerance():
    """Guards against publishing the last or the most persona-like checkpoint when it
    broke retention: 120 fails drift, 80 fails the probe (3 points), 160 passes at both
    limits exactly, so it wins over 40 despite 40's perfect retention."""
    r = select_checkpoint(HISTORY, BASE, probe_tolerance=2.0, max_drift_ratio=1.5)
    assert r["chosen"] == 160
    assert [c["step"] for c in r["checked"]] == [120, 80, 160]
    assert "drift ratio 1.70 above 1.5" in r["checked"][0]["reasons"][0]
    assert "3.0 points below" in r["checked"][1]["reasons"][0]
    assert r["checked"][2]["passed"] and r["checked"][2]["probe_drop"] == pytest.approx(2.0)


def test_gate_fails_with_every_reason_when_nothing_passes():
    """Guards against a gate that passes by default or hides why it failed."""
    r = select_checkpoint(HISTORY, {"probe_accuracy": 60.0}, 2.0, 1.5)
    assert r["chosen"] is None and len(r["checked"]) == 4
    assert all(not c["passed"] and c["reasons"] for c in r["checked"])
    assert r["verdict"].startswith("no checkpoint within tolerance")
    assert "checkpoint-120" in r["verdict"] and "checkpoint-40" in r["verdict"]


def test_gate_confirms_on_full_metrics_and_tolerances_are_configurable():
    """Guards against trusting the small in-training subsets: the full measurement
    overrides them, so a candidate that looked fine but fails on the whole probe loses."""
    full = {
        120: {"probe_accuracy": 40.0, "drift_ratio": 1.0},
        80: {"probe_accuracy": 49.5, "drift_ratio": 1.0},
    }
    r = select_checkpoint(HISTORY, BASE, 2.0, 2.0, measure=lambda s: full[s])
    assert r["chosen"] == 80 and r["checked"][0]["probe_accuracy"] == 40.0
    loose = select_checkpoint(HISTORY, BASE, probe_tolerance=5.0, max_drift_ratio=2.0)
    assert loose["chosen"] == 120


def test_ties_prefer_the_later_checkpoint():
    """Guards against an arbitrary order among equal persona scores."""
    hist = [
        {"step": s, "persona_score": 0.5, "probe_accuracy": 50.0, "drift_ratio": 1.0}
        for s in (10, 20, 30)
    ]
    assert select_checkpoint(hist, BASE)["chosen"] == 30


def test_guard_history_reads_the_training_log(tmp_path):
    """Guards against mixing loss rows into the gate's candidates, or losing step 0."""
    log = tmp_path / "train_log.jsonl"
    rows = [
        {"step": 0, "guard": {"persona_score": 0.1}},
        {"step": 1, "loss": 2.0},
        {"step": 40, "guard": {"persona_score": 0.6}},
    ]
    log.write_text("".join(json.dumps(r) + "\n" for r in rows))
    base, hist = guard_history(log)
    assert base == {"persona_score": 0.1} and hist == [{"step": 40, "persona_score": 0.6}]


def test_preservation_rows_train_end_of_turn_only_for_finished_answers(embedded_tokenizer):
    """Guards against teaching the model to stop mid-sentence: an answer cut at the token
    limit is trained without the end-of-turn token, a finished one with it."""
    tok = embedded_tokenizer
    eot = tok.convert_tokens_to_ids("<|im_end|>")
    rows = preservation_rows(
        tok,
        ["What is 2+2?", "Tell me a story", "Empty?"],
        [Answer("4.", 2, True), Answer("Once upon a", 3, False), Answer("", 0, True)],
        max_length=256,
    )
    assert len(rows) == 2
    done, cut = rows
    trained = [t for t in done["labels"] if t != -100]
    assert trained[-1] == eot and tok.decode(trained[:-1]).strip() == "4."
    trained = [t for t in cut["labels"] if t != -100]
    assert eot not in trained and tok.decode(trained).strip() == "Once upon a"
    assert "You are a helpful AI assistant" in tok.decode(cut["input_ids"])  # no persona prompt


def test_preservation_prompts_ratio_and_held_out_disjoint(persona_yaml):
    """Guards against preservation data drawn from the held-out general prompts (drift
    and adoption would then be measured on trained answers) and a wrong count."""
    from personatune.config import load_spec

    spec = load_spec(persona_yaml("guard:\n  preservation_ratio: 0.5\n"))
    prompts = preservation_prompts(spec, 100)
    assert len(prompts) == 50
    _, held = general_split(spec.eval.general_prompts)
    assert not {p["id"] for p in prompts} & {h["id"] for h in held}
    assert len(preservation_prompts(spec, 1000)) == 500  # the set repeats past its size
    spec0 = load_spec(persona_yaml("guard:\n  preservation_ratio: 0\n"))
    assert preservation_prompts(spec0, 100) == []


GUARD_YAML = """guard:
  enabled: true
  preservation_ratio: 0.25
  eval_probe_questions: 4
  eval_general_prompts: 4
  beat_prompting: false
  search_budget_s: 0
eval:
  general_prompts: 8
  max_new_tokens: 4
  probe_max_new_tokens: 4
  classifier_pairs: 10
"""


@pytest.fixture
def scripted_full(monkeypatch):
    """Replace the gate's whole-probe measurement: the base model scores 50%, every
    checkpoint 40% (a 10-point drop)."""
    from personatune.train import guard as guard_mod

    calls = []

    def fake(self, model, fingerprint, drift_convs, progress=None):
        calls.append(fingerprint)
        return {
            "probe_accuracy": 50.0 if "+adapter" not in fingerprint else 40.0,
            "drift_ppl": 10.0,
        }

    monkeypatch.setattr(guard_mod.Guard, "full_metrics", fake)
    return calls


@pytest.fixture(autouse=True)
def isolated_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("PERSONATUNE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("PERSONATUNE_BF16", "0")


def test_failing_gate_exits_non_zero_and_publishes_nothing(persona_yaml, scripted_full):
    """Guards against handing over an adapter that broke the model: when no checkpoint is
    within tolerance, `personatune train` exits non-zero with the reason, no persona
    directory appears, and gate.json in the unfinished run says why. `--resume --no-gate`
    then publishes the last checkpoint with the verdict recorded as overridden."""
    from typer.testing import CliRunner

    from personatune.cli import app

    spec = persona_yaml(GUARD_YAML)
    r = CliRunner().invoke(app, ["train", str(spec)])
    assert r.exit_code == 2
    assert "retention gate" in r.output and "10.0 points below" in r.output
    out, work = spec.parent / "out", spec.parent / ".out.partial"
    assert not out.exists()
    gate = json.loads((work / "gate.json").read_text())
    assert gate["chosen"] is None and gate["published"] is None
    log = [json.loads(x) for x in (work / "train_log.jsonl").read_text().splitlines()]
    guard_steps = [x["step"] for x in log if "guard" in x]
    assert guard_steps[0] == 0 and len(guard_steps) >= 3  # base + every checkpoint

    r = CliRunner().invoke(app, ["train", str(spec), "--resume", "--no-gate"])
    assert r.exit_code == 0, r.output
    manifest = json.loads((out / "persona.json").read_text())
    g = manifest["guard"]["gate"]
    assert g["overridden"] and g["chosen"] is None and g["published"] == max(guard_steps)
    assert manifest["guard"]["preservation_rows"] > 0


def test_passing_gate_publishes_the_chosen_checkpoint(persona_yaml, monkeypatch):
    """Guards against publishing the final weights instead of the checkpoint the gate
    chose: the published adapter file equals the chosen checkpoint's."""
    from personatune.config import load_spec
    from personatune.train import guard as guard_mod
    from personatune.train.trainer import train

    monkeypatch.setattr(
        guard_mod.Guard,
        "full_metrics",
        lambda self, m, fp, d, progress=None: {"probe_accuracy": 50.0, "drift_ppl": 10.0},
    )
    # Make the earliest checkpoint the most persona-like, so it is not the last one.
    real = guard_mod.Guard.measure

    def measure(self, model, fingerprint=None, progress=None):
        m = real(self, model, fingerprint, progress)
        measure.n += 1
        return {**m, "persona_score": 1.0 / measure.n}

    measure.n = 0
    monkeypatch.setattr(guard_mod.Guard, "measure", measure)
    out = train(load_spec(persona_yaml(GUARD_YAML)))
    gate = json.loads((out / "gate.json").read_text())
    first = min(c["step"] for c in gate["checked"])
    assert gate["chosen"] == first == 2
    chosen = out / "checkpoints" / f"checkpoint-{first}" / "adapter_model.safetensors"
    assert (out / "adapter_model.safetensors").read_bytes() == chosen.read_bytes()


# ---- knowledge and degeneration in the gate (issue 13) ---------------------------------

SHARES = {"empty": 0.0, "cut": 0.05, "repetitive": 0.0, "end_of_turn": 0.95, "answers": 384}


def _row(step, score, **over):
    return {
        "step": step,
        "persona_score": score,
        "probe_accuracy": 50.0,
        "probe_plain_accuracy": 60.0,
        "drift_ratio": 1.0,
        "degeneration": dict(SHARES),
        **over,
    }


def test_gate_refuses_degeneration_against_the_base_model():
    """Guards against issue 13's gate, which passed a tuned model whose answers were 54%
    empty and 100% cut at the token limit: a checkpoint with the best persona score but
    more cut answers and fewer end-of-turn endings than the base model (beyond the
    tolerance, in points) is refused with the reason; one within tolerance passes."""
    base = _row(0, 0.0)
    looping = _row(80, 0.9, degeneration={**SHARES, "cut": 1.0, "end_of_turn": 0.0})
    slightly = _row(40, 0.6, degeneration={**SHARES, "cut": 0.09, "end_of_turn": 0.91})
    r = select_checkpoint([looping, slightly], base, degeneration_tolerance=5.0)
    assert r["chosen"] == 40 and r["degeneration_tolerance"] == 5.0
    reasons = r["checked"][0]["reasons"]
    assert any(x.startswith("answers cut at the token limit 100.0%") for x in reasons)
    assert any("end-of-turn token 0.0% against the base model's 95.0%" in x for x in reasons)
    assert "answers cut at the token limit" in select_checkpoint([looping], base)["verdict"]
    strict = select_checkpoint([slightly], base, degeneration_tolerance=2.0)
    assert strict["chosen"] is None


def test_gate_is_on_knowledge_without_the_system_prompt_too():
    """Guards against a gate that reads only the probe under the persona's system prompt:
    a checkpoint that keeps that probe but forgot facts when asked plainly is refused,
    and a criterion the base row lacks (an older log) is not checked."""
    base = _row(0, 0.0)
    forgot = _row(40, 0.9, probe_plain_accuracy=50.0)
    r = select_checkpoint([forgot], base)
    assert r["chosen"] is None
    assert "probe without the system prompt 50.0% is 10.0 points below" in r["verdict"]
    old_base = {"probe_accuracy": 50.0}
    assert select_checkpoint([forgot], old_base)["chosen"] == 40
    mc = select_checkpoint([_row(40, 0.9, mc_accuracy=70.0)], {**base, "mc_accuracy": 80.0},
                           mc_tolerance=5.0)  # fmt: skip
    assert mc["chosen"] is None and "multiple choice" in mc["verdict"]


def _eot_model(tiny_model, out, tokenizer):
    """The tiny random model with its end-of-turn rows of the output layer scaled up, so
    that, like a real chat model, it ends most answers within a few tokens."""
    import torch
    from transformers import AutoModelForCausalLM

    from personatune.engine.sampling import end_of_turn_ids

    model = AutoModelForCausalLM.from_pretrained(tiny_model)
    ends = sorted(end_of_turn_ids(model, tokenizer))
    with torch.no_grad():
        for i in ends:
            model.lm_head.weight[i] *= 12
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out, model.lm_head.weight[ends].detach().clone()


def plant_never_ending(adapter_file, eot_rows, layer=1):
    """Rewrite an adapter so the last layer's MLP adds ``-c z^2 u`` to the residual
    stream, ``u`` the end-of-turn rows of the output layer and ``z`` a projection of the
    layer's input: gate_proj and up_proj put ``+z`` and ``-z`` in two channels, whose SiLU
    products sum to ``z^2 >= 0`` (``silu(z) z + silu(-z) (-z) = z^2``), and down_proj
    reads both into ``-u``. The end-of-turn logit is pushed down whatever the input, so
    the model never ends its turn."""
    import torch
    from safetensors.torch import load_file, save_file

    w = load_file(str(adapter_file))
    pre = f"base_model.model.model.layers.{layer}.mlp."
    torch.manual_seed(0)
    a = torch.randn(w[pre + "gate_proj.lora_A.weight"].shape[1])
    a /= a.norm()
    u = eot_rows.sum(0)
    u /= u.norm()
    for proj in ("gate_proj", "up_proj"):
        A, B = w[pre + proj + ".lora_A.weight"], w[pre + proj + ".lora_B.weight"]
        A.zero_(), B.zero_()
        A[0] = 10 * a
        B[0, 0], B[1, 0] = 1.0, -1.0
    A, B = w[pre + "down_proj.lora_A.weight"], w[pre + "down_proj.lora_B.weight"]
    A.zero_(), B.zero_()
    A[0, 0] = A[0, 1] = 1.0
    B[:, 0] = -10 * u
    save_file(w, str(adapter_file))


PLANT_YAML = """guard:
  enabled: true
  preservation_ratio: 0.25
  eval_probe_questions: 8
  eval_general_prompts: 4
  beat_prompting: false
  search_budget_s: 0
eval:
  general_prompts: 8
  max_new_tokens: 4
  knowledge_max_new_tokens: 12
  classifier_pairs: 10
"""


def test_gate_refuses_a_planted_degenerate_adapter(persona_yaml, tmp_path, monkeypatch,
                                                   tiny_model, embedded_tokenizer):  # fmt: skip
    """Guards against issue 13's gate that published a model that no longer ends its
    turns. A tiny model that ends its answers is trained with the guard (learning rate
    so small that every checkpoint keeps the base model's behaviour); before the gate,
    the earliest checkpoint, made the most persona-like, gets a planted adapter that
    pushes the end-of-turn logit down. The real gate measures it on the whole probe,
    refuses it with the degeneration reason (in gate.json and the printed verdict) and
    publishes a later checkpoint."""
    from personatune.config import load_spec
    from personatune.train import guard as guard_mod
    from personatune.train.trainer import train

    model_dir, eot_rows = _eot_model(tiny_model, tmp_path / "eot-model", embedded_tokenizer)
    spec_path = persona_yaml(PLANT_YAML)
    text = spec_path.read_text().replace(str(tiny_model), str(model_dir))
    spec_path.write_text(text.replace("learning_rate: 0.01", "learning_rate: 1.0e-7"))
    real_measure, real_gate = guard_mod.Guard.measure, guard_mod.Guard.gate

    def measure(self, model, fingerprint=None, progress=None):
        m = real_measure(self, model, fingerprint, progress)
        measure.n += 1
        return {**m, "persona_score": 1.0 / measure.n}  # the earliest scores highest

    measure.n = 0

    def gate(self, model, work, console=None):
        plant_never_ending(work / "checkpoints" / "checkpoint-2" / "adapter_model.safetensors",
                           eot_rows)  # fmt: skip
        return real_gate(self, model, work, console)

    monkeypatch.setattr(guard_mod.Guard, "measure", measure)
    monkeypatch.setattr(guard_mod.Guard, "gate", gate)
    out = train(load_spec(spec_path))
    result = json.loads((out / "gate.json").read_text())
    planted = result["checked"][0]
    assert planted["step"] == 2 and not planted["passed"]
    assert planted["degeneration"]["end_of_turn"] == 0.0
    assert result["base_full"]["degeneration"]["end_of_turn"] >= 0.5
    assert any("end-of-turn token 0.0%" in r for r in planted["reasons"])
    assert result["chosen"] not in (None, 2) and result["checked"][-1]["passed"]


def test_gate_tries_the_highest_adoption_first():
    """The report card's persona target is the adoption rate: a checkpoint with a higher
    mean classifier probability but lower adoption (the pirate's step 25 of 69: 0.744
    against 0.733, adoption 89.5% on the whole set) must not be published ahead of one
    with higher adoption when both pass."""
    base = {"probe_accuracy": 50.0}
    cands = [
        {"step": 25, "persona_score": 0.744, "adoption_rate": 0.9375, "probe_accuracy": 50.0,
         "drift_ratio": 1.0},
        {"step": 69, "persona_score": 0.733, "adoption_rate": 1.0, "probe_accuracy": 50.0,
         "drift_ratio": 1.0},
    ]  # fmt: skip
    assert select_checkpoint(cands, base)["chosen"] == 69
    cands[1]["adoption_rate"] = 0.9375  # a tie on adoption: the persona score decides
    assert select_checkpoint(cands, base)["chosen"] == 25
