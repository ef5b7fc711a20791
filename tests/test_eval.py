"""``personatune eval`` on a tiny persona: determinism, the report files, the answer
cache, generation flags and lm-eval multiple-choice benchmarks."""

import json

import pytest
from transformers import AutoModelForCausalLM

from personatune.errors import PersonatuneError
from personatune.evaluate import answers as answers_mod
from personatune.evaluate.answers import cached_answer_sets, cached_answers, generate_answers
from personatune.evaluate.lmeval import run_benchmark, task_config
from personatune.evaluate.probe import DATA


def mc_tiny_path():
    from importlib import resources

    return str(resources.files(DATA).joinpath("data", "mc_tiny.jsonl"))


EVAL_YAML = """persona_terms: [arr, matey]
eval:
  general_prompts: 6
  max_new_tokens: 6
  probe_max_new_tokens: 4
  knowledge_max_new_tokens: 8
  classifier_pairs: 10
"""


@pytest.fixture(autouse=True)
def fp32(monkeypatch):
    monkeypatch.setenv("PERSONATUNE_BF16", "0")


@pytest.fixture(scope="module")
def tiny_persona(tmp_path_factory, tiny_model):
    """A persona trained for a few steps on the tiny random model (guard off)."""
    import os

    from personatune.config import load_spec
    from personatune.train.trainer import train

    d = tmp_path_factory.mktemp("persona")
    rows = ["prompt,response"] + [
        f'"Question {i}, please","Arr, answer {i} matey!"' for i in range(30)
    ]
    (d / "pairs.csv").write_text("\n".join(rows) + "\n")
    (d / "persona.yaml").write_text(
        f"name: tiny\nsystem_prompt: You are a pirate.\nmodel:\n  name: {tiny_model}\n"
        "data:\n  - path: pairs.csv\noutput_dir: out\n"
        "guard:\n  enabled: false\n"  # a random model has no capability to guard
        "train:\n  epochs: 1\n  batch_size: 4\n"
        "  gradient_accumulation: 1\n  max_seq_length: 64\n  checkpoint_interval: 4\n"
        "  learning_rate: 0.01\n  eval_split: 0.2\n" + EVAL_YAML
    )
    old = os.environ.get("PERSONATUNE_BF16")
    os.environ["PERSONATUNE_BF16"] = "0"
    try:
        return train(load_spec(d / "persona.yaml"))
    finally:
        if old is None:
            os.environ.pop("PERSONATUNE_BF16")


def test_eval_is_deterministic_and_writes_the_report(tiny_persona, tmp_path, monkeypatch):
    """Guards against sampling, batch-order effects or cache state changing the numbers:
    two runs with empty caches give identical metrics and answers. Also checks the report
    files, and that an existing report is not overwritten without --overwrite."""
    from personatune.evaluate.run import evaluate

    reports = []
    for i in range(2):
        monkeypatch.setenv("PERSONATUNE_CACHE", str(tmp_path / f"cache{i}"))
        reports.append(
            evaluate(
                tiny_persona, out_dir=tmp_path / f"r{i}", benchmarks=[("mc_tiny", mc_tiny_path())]
            )
        )
    a, b = reports
    assert a["metrics"] == b["metrics"] and a["answers"] == b["answers"]
    assert a["classifier"] == b["classifier"]
    for name in ("report.json", "report.html", "report_loss.png", "report_metrics.png",
                 "report_turns.png"):  # fmt: skip
        assert (tmp_path / "r0" / name).stat().st_size > 0
    saved = json.loads((tmp_path / "r0" / "report.json").read_text())
    assert set(saved["metrics"]) >= {
        "conditional_perplexity",
        "rouge_l",
        "bleu",
        "jaccard",
        "embedding_cosine",
        "term_frequency",
        "adoption_rate",
        "probe_accuracy",
        "drift_perplexity",
        "stress_pass_rate",
        "mc_mc_tiny",
        "repetition_rate",
        "distinct_2",
        "empty_rate",
        "limit_rate",
        "end_of_turn_rate",
        "identity_in_persona",
        "identity_claims_base",
        "conversation_adoption_turn_1",
        "conversation_adoption_turn_8",
        "probe_plain_accuracy",
        "probe_direct_accuracy",
    }
    assert len(saved["conversations"]["tuned"]["adoption_by_turn"]) == 8
    assert {"SmolLM", "Hugging Face"} <= set(saved["identity"]["base_names"])
    assert set(saved["targets"]) >= {"degeneration_within_tolerance", "probe_within_tolerance"}
    assert saved["data"]["probe_questions"] == 192 and saved["data"]["general_prompts"] == 6
    assert len(saved["answers"]["probe"]) == 192
    html = (tmp_path / "r0" / "report.html").read_text()
    assert "data:image/png;base64," in html and "Factual probe" in html
    assert "Identity questions" in html and 'href="report_turns.png"' in html
    with pytest.raises(PersonatuneError, match="--overwrite"):
        evaluate(tiny_persona, out_dir=tmp_path / "r0")


def test_eval_cli_prints_the_summary(tiny_persona, tmp_path, monkeypatch):
    """Guards against a CLI that writes the report but prints nothing, or rejects the
    TASK=PATH form."""
    from typer.testing import CliRunner

    from personatune.cli import app

    monkeypatch.setenv("PERSONATUNE_CACHE", str(tmp_path / "cache"))
    r = CliRunner().invoke(app, ["eval", str(tiny_persona), "--out", str(tmp_path / "r")])
    assert r.exit_code == 0, r.output
    assert "factual probe" in r.output and "adoption" in r.output
    r = CliRunner().invoke(app, ["eval", str(tiny_persona), "--benchmark", "nopath"])
    assert r.exit_code == 2 and "TASK=PATH" in r.output


def test_generation_flags_answers_cut_at_the_limit(tiny_model, embedded_tokenizer):
    """Guards against counting an answer that hit max_new_tokens as finished: with the
    end-of-turn id set to the token a uniform model picks, every answer ends at once;
    with another id, every answer runs to the limit."""
    import torch

    model = AutoModelForCausalLM.from_pretrained(tiny_model)
    with torch.no_grad():
        model.lm_head.weight.zero_()  # uniform logits: greedy picks token 0
    convs = [[{"role": "user", "content": "Hi"}], [{"role": "user", "content": "Hello there"}]]
    model.generation_config.eos_token_id = 0
    done = generate_answers(model, embedded_tokenizer, convs, max_new_tokens=5)
    assert all(a.finished and a.tokens == 0 and a.text == "" for a in done)
    model.generation_config.eos_token_id = 7
    cut = generate_answers(model, embedded_tokenizer, convs, max_new_tokens=5)
    assert all(not a.finished and a.tokens == 5 for a in cut)


def test_answer_cache_reuses_answers_per_prompt(
    tiny_model, embedded_tokenizer, tmp_path, monkeypatch
):
    """Guards against regenerating cached answers (the second run of self-distillation
    must be free) and against sharing answers across models or settings."""
    monkeypatch.setenv("PERSONATUNE_CACHE", str(tmp_path))
    model = AutoModelForCausalLM.from_pretrained(tiny_model)
    convs = [[{"role": "user", "content": f"Q{i}"}] for i in range(3)]
    first = cached_answers(model, embedded_tokenizer, convs, "fp:a", 4)
    calls = []
    real = answers_mod.generate_answers

    def counting(model, tok, convs, *a, **k):
        calls.append(len(convs))
        return real(model, tok, convs, *a, **k)

    monkeypatch.setattr(answers_mod, "generate_answers", counting)
    more = convs + [[{"role": "user", "content": "Q9"}]]
    again = cached_answers(model, embedded_tokenizer, more, "fp:a", 4)
    assert again[:3] == first and calls == [1]
    cached_answers(model, embedded_tokenizer, convs, "fp:b", 4)  # another model
    cached_answers(model, embedded_tokenizer, convs, "fp:a", 5)  # another limit
    assert calls == [1, 3, 3]


def test_answer_sets_share_one_run_and_their_caches(
    tiny_model, embedded_tokenizer, tmp_path, monkeypatch
):
    """Guards against sets of several token budgets needing one engine run each, against
    two sets of one budget (one cache file) overwriting each other's answers, and
    against a set getting answers of another budget or order."""
    monkeypatch.setenv("PERSONATUNE_CACHE", str(tmp_path))
    model = AutoModelForCausalLM.from_pretrained(tiny_model)
    a = [[{"role": "user", "content": f"A{i}"}] for i in range(3)]
    b = [[{"role": "user", "content": f"B{i}"}] for i in range(2)]
    c = [[{"role": "system", "content": "Be brief."}, {"role": "user", "content": "C"}]]
    calls = []
    real = answers_mod.generate_answers

    def counting(model, tok, convs, limits, *args, **kw):
        calls.append(list(limits))
        return real(model, tok, convs, limits, *args, **kw)

    monkeypatch.setattr(answers_mod, "generate_answers", counting)
    got = cached_answer_sets(model, embedded_tokenizer, [(a, 3), (b, 6), (c, 3)], "fp:s")
    assert len(calls) == 1 and sorted(calls[0]) == [3, 3, 3, 3, 6, 6]
    assert [len(x) for x in got] == [3, 2, 1]
    assert all(ans.tokens <= 3 for ans in got[0] + got[2])
    monkeypatch.setattr(answers_mod, "generate_answers", real)
    alone = [
        cached_answers(model, embedded_tokenizer, s, "fp:other", n)
        for s, n in ((a, 3), (b, 6), (c, 3))
    ]
    assert got == alone  # the same answers as one set at a time
    calls.clear()
    monkeypatch.setattr(answers_mod, "generate_answers", counting)
    assert cached_answers(model, embedded_tokenizer, a + c, "fp:s", 3) == got[0] + got[2]
    assert calls == []  # both budget-3 sets were saved, in one file


def test_perplexity_is_cached_by_weights_dtype_and_conversations(
    tiny_model, embedded_tokenizer, tmp_path, monkeypatch
):
    """Guards against the gate's drift perplexity being computed again by eval, and
    against a cached value served for other weights, another dtype or other
    conversations (a stale drift ratio)."""
    import torch

    from personatune.evaluate import suite

    monkeypatch.setenv("PERSONATUNE_CACHE", str(tmp_path))
    model = AutoModelForCausalLM.from_pretrained(tiny_model)
    convs = [[{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Arr."}]]
    other = [[{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Aye."}]]
    calls = []
    real = suite.conditional_perplexity
    monkeypatch.setattr(
        suite, "conditional_perplexity", lambda *a, **k: calls.append(1) or real(*a, **k)
    )
    first = suite.perplexity(model, embedded_tokenizer, convs, fingerprint="fp:a")
    assert suite.perplexity(model, embedded_tokenizer, convs, fingerprint="fp:a") == first
    assert len(calls) == 1
    suite.perplexity(model, embedded_tokenizer, convs, fingerprint="fp:b")
    suite.perplexity(model, embedded_tokenizer, other, fingerprint="fp:a")
    suite.perplexity(model.to(torch.bfloat16), embedded_tokenizer, convs, fingerprint="fp:a")
    suite.perplexity(model, embedded_tokenizer, convs)  # no fingerprint: never cached
    assert len(calls) == 5


def test_lm_eval_multiple_choice_on_mc_tiny(tiny_model, embedded_tokenizer):
    """Guards against the benchmark path reaching for the Hub or miscounting: lm-eval
    scores all 20 items of the local file by log-likelihood, and two runs agree."""
    model = AutoModelForCausalLM.from_pretrained(tiny_model)
    r = run_benchmark(model, embedded_tokenizer, "mc_tiny", mc_tiny_path())
    assert r["n"] == 20 and 0 <= r["acc"] <= 1 and 0 <= r["acc_norm"] <= 1
    assert run_benchmark(model, embedded_tokenizer, "mc_tiny", mc_tiny_path()) == r


def test_benchmark_files_are_validated(tmp_path):
    """Guards against a cryptic lm-eval error for a bad row: the message names the line
    and the key."""
    bad = tmp_path / "bad.jsonl"
    bad.write_text(
        '{"question": "q", "choices": ["a", "b"], "label": 0}\n'
        '{"question": "q", "choices": ["a", "b"], "label": 5}\n'
    )
    with pytest.raises(PersonatuneError, match="line 2: 'label'"):
        task_config("mine", bad)
    with pytest.raises(PersonatuneError, match="no such data file"):
        task_config("mine", tmp_path / "missing.jsonl")
    cfg = task_config("mine", mc_tiny_path())
    assert cfg["output_type"] == "multiple_choice" and cfg["dataset_path"] == "json"


def test_registered_lm_eval_task_reads_a_local_file(tmp_path):
    """Guards against a task name being ignored: arc_easy's own config (prompt, target
    and choice fields) is used with its evaluation split read from the local file."""
    rows = [
        {
            "id": "1",
            "question": "Which is a fruit?",
            "choices": {"text": ["apple", "rock"], "label": ["A", "B"]},
            "answerKey": "A",
        }
    ]
    path = tmp_path / "arc.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = task_config("arc_easy", path)
    assert cfg["doc_to_target"] == "{{choices.label.index(answerKey)}}"
    assert cfg["dataset_kwargs"]["data_files"] == {"test": str(path.resolve())}
    with pytest.raises(PersonatuneError, match="not an lm-eval task"):
        task_config("no_such_task_xyz", path)
