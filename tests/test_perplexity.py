"""Conditional perplexity (response tokens given the prompt) and ``personatune eval-heldout``."""

from __future__ import annotations

import json
import math
from types import SimpleNamespace

import pytest
import torch
from typer.testing import CliRunner

from personatune.cli import app
from personatune.evaluate.perplexity import conditional_perplexity, pooled

runner = CliRunner()


class Oracle(torch.nn.Module):
    """A fake causal LM that peeks at the next input token and gives it probability 1/2
    when its id is even and 1/4 when odd, spreading the rest evenly over the vocabulary."""

    def __init__(self, vocab: int):
        super().__init__()
        self.vocab = vocab
        self.dummy = torch.nn.Parameter(torch.zeros(1))

    def forward(self, input_ids, attention_mask=None):
        b, t = input_ids.shape
        nxt = torch.cat([input_ids[:, 1:], input_ids[:, -1:]], dim=1)
        p = torch.where(nxt % 2 == 0, 0.5, 0.25)
        rest = ((1 - p) / (self.vocab - 1)).unsqueeze(-1).expand(b, t, self.vocab).clone()
        rest.scatter_(2, nxt.unsqueeze(-1), p.unsqueeze(-1))
        return SimpleNamespace(logits=rest.log())


def conv(prompt: str, reply: str) -> list[dict]:
    return [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": prompt},
        {"role": "assistant", "content": reply},
    ]


def test_conditional_perplexity_matches_a_hand_computed_value(embedded_tokenizer):
    """Guards against scoring prompt or padding tokens, an off-by-one shift between logits
    and targets, and averaging per example instead of per token: the oracle gives each
    response token probability 1/2 (even id) or 1/4 (odd id), so the perplexity is
    exp((n_even * ln 2 + n_odd * ln 4) / n) over the response tokens plus <|im_end|>."""
    tok = embedded_tokenizer
    convs = [
        conv("What is the hour?", "Elementary, my dear fellow."),
        conv(
            "A much longer question, with many more words in it, to force padding?",
            "The game is afoot!",
        ),
    ]
    end = tok.convert_tokens_to_ids("<|im_end|>")
    scored = [tok(c[-1]["content"], add_special_tokens=False)["input_ids"] + [end] for c in convs]
    nll = [sum(math.log(2) if t % 2 == 0 else math.log(4) for t in ids) for ids in scored]
    n = sum(len(ids) for ids in scored)
    assert 0 < sum(t % 2 for ids in scored for t in ids) < n  # both cases occur
    result = conditional_perplexity(Oracle(len(tok)), tok, convs, batch_size=2, bf16=False)
    assert result.tokens == n and result.examples == 2 and result.skipped_overlong == 0
    assert result.perplexity == pytest.approx(math.exp(sum(nll) / n), rel=1e-4)
    assert [p[1] for p in result.per_example] == [len(ids) for ids in scored]
    one = conditional_perplexity(Oracle(len(tok)), tok, convs[:1], batch_size=1, bf16=False)
    assert one.perplexity == pytest.approx(math.exp(nll[0] / len(scored[0])), rel=1e-4)


def test_conditional_perplexity_agrees_with_the_model_loss_and_skips_overlong(
    tiny_model, embedded_tokenizer
):
    """Guards against disagreeing with transformers' own causal-LM loss on the same
    labels, batching changing the result, and over-long conversations being cut (their
    response scored without its prompt) instead of skipped and counted."""
    from transformers import AutoModelForCausalLM

    from personatune.data.chat import render_chat

    model = AutoModelForCausalLM.from_pretrained(tiny_model)
    tok = embedded_tokenizer
    convs = [conv(f"Question {i}?", "Answer " * (i + 1)) for i in range(5)]
    one_by_one = conditional_perplexity(model, tok, convs, batch_size=1, bf16=False)
    batched = conditional_perplexity(model, tok, convs, batch_size=4, bf16=False)
    assert batched.perplexity == pytest.approx(one_by_one.perplexity, rel=1e-4)
    r = render_chat(tok, convs[2])
    with torch.no_grad():
        loss = model(input_ids=torch.tensor([r.input_ids]), labels=torch.tensor([r.labels])).loss
    nll, n = one_by_one.per_example[2]
    assert nll / n == pytest.approx(float(loss), rel=1e-4)
    limit = len(render_chat(tok, convs[3]).input_ids)
    cut = conditional_perplexity(model, tok, convs, max_length=limit, bf16=False)
    assert cut.skipped_overlong == 1 and cut.per_example[4] is None and cut.examples == 4
    assert pooled(cut.per_example[:4]) == pytest.approx((cut.perplexity, cut.tokens))


def test_eval_heldout_command_writes_report_and_plot(persona_yaml, tmp_path, monkeypatch):
    """Guards against the held-out comparison not reaching the CLI, the base model being
    scored with the adapter on (identical numbers), missing per-book groups, and a report
    overwritten without --overwrite."""
    monkeypatch.setenv("PERSONATUNE_BF16", "0")
    spec = persona_yaml("  max_steps: 3\n")
    assert runner.invoke(app, ["train", str(spec)]).exit_code == 0
    held = tmp_path / "held.jsonl"
    held.write_text(
        "".join(
            json.dumps(
                {
                    "prompt": f"Question {i}, please",
                    "response": f"Arr, answer {i} matey!",
                    "book": "A" if i % 2 else "B",
                }
            )
            + "\n"
            for i in range(30, 36)
        )
    )
    persona = tmp_path / "out"
    r = runner.invoke(app, ["eval-heldout", str(persona), "--data", str(held)])
    assert r.exit_code == 0, r.output
    report = json.loads((persona / "heldout_perplexity.json").read_text())
    assert (persona / "heldout_perplexity.png").stat().st_size > 0
    assert report["examples"] == 6 and set(report["groups"]) == {"A", "B"}
    assert report["base"]["perplexity"] != report["tuned"]["perplexity"]
    assert report["tuned"]["perplexity"] < report["base"]["perplexity"]  # lr 0.01 on this
    assert sum(g["tokens"] for g in report["groups"].values()) == report["tokens"]
    r = runner.invoke(app, ["eval-heldout", str(persona), "--data", str(held)])
    assert r.exit_code == 2 and "pass --overwrite" in r.stderr
    r = runner.invoke(app, ["eval-heldout", str(persona), "--overwrite"])
    assert r.exit_code == 2 and "no data source has eval_path" in r.stderr
