"""The real embedded model (SmolLM2-135M-Instruct GGUF): load, train a few steps, chat."""

import pytest
from typer.testing import CliRunner

from personatune.cli import app

pytestmark = pytest.mark.integration
REPO_EXAMPLE = "examples/pirate/persona.yaml"


def test_embedded_model_knows_paris():
    """Guards against a broken GGUF conversion: the model must still answer correctly."""
    from personatune.engine import generate_answers
    from personatune.models import load_model, load_tokenizer, resolve_ref

    ref = resolve_ref("embedded")
    tok, model = load_tokenizer(ref), load_model(ref)
    out = generate_answers(
        model,
        tok,
        [[{"role": "user", "content": "What is the capital of France?"}]],
        max_new_tokens=12,
    )
    assert "Paris" in out[0].text


def test_train_a_few_steps_and_chat(tmp_path):
    """Guards against the main job breaking on the real model: train, write, reload, chat."""
    from pathlib import Path

    spec = Path(__file__).resolve().parents[1] / REPO_EXAMPLE
    out = tmp_path / "pirate"
    r = CliRunner().invoke(
        app,
        [
            "train",
            str(spec),
            "train.max_steps=3",
            "train.checkpoint_interval=2",
            "guard.enabled=false",
            f"output_dir={out}",
        ],
    )
    assert r.exit_code == 0, r.output
    assert (out / "adapter_model.safetensors").exists() and (
        out / "checkpoints/checkpoint-2"
    ).exists()
    r = CliRunner().invoke(
        app, ["chat", str(out), "--prompt", "What is the capital of France?", "--max-tokens", "24"]
    )
    assert r.exit_code == 0, r.output
    assert len(r.stdout.strip()) > 0
