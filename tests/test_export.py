"""personatune export: a merged model that plain transformers loads and that answers like
base + adapter; --push-to-hub failing clearly without the Hub."""

from __future__ import annotations

import socket

import pytest
import torch
from test_serve import USER, train_tiny_personas
from transformers import AutoModelForCausalLM, AutoTokenizer
from typer.testing import CliRunner

from personatune.cli import app
from personatune.data.chat import with_system_prompt
from personatune.engine import generate_answers, load_persona

runner = CliRunner()


@pytest.fixture(scope="module")
def persona(tmp_path_factory, tiny_model):
    return train_tiny_personas(tmp_path_factory.mktemp("export"), tiny_model, count=1)[0]


def test_merged_export_equals_base_plus_adapter(persona, tmp_path):
    """Guards against a merged model that needs peft, lacks the tokenizer or chat template,
    or answers differently from the base model with the adapter."""
    out = tmp_path / "merged"
    result = runner.invoke(app, ["export", str(persona), "--merged", str(out)])
    assert result.exit_code == 0, result.output
    names = {p.name for p in out.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "README.md"} <= names
    assert "adapter_config.json" not in names
    assert not list(tmp_path.glob(".merged.partial"))

    model = AutoModelForCausalLM.from_pretrained(out).eval()
    tok = AutoTokenizer.from_pretrained(out)
    assert "peft" not in type(model).__module__
    p = load_persona(persona)
    assert tok.chat_template == p.tokenizer.chat_template
    conv = with_system_prompt(USER, p.spec.system_prompt)
    text = tok.apply_chat_template(conv, tokenize=False, add_generation_prompt=True)
    batch = tok(text, add_special_tokens=False, return_tensors="pt")
    with torch.inference_mode():
        ids = model.generate(
            **batch, max_new_tokens=16, do_sample=False, pad_token_id=tok.pad_token_id
        )
        merged_logits = model(**batch).logits
        adapter_logits = p.model(**batch).logits
        with p.model.disable_adapter():
            base_logits = p.model(**batch).logits
    answer = tok.decode(ids[0, batch["input_ids"].shape[1] :], skip_special_tokens=True).strip()
    assert answer == generate_answers(p.model, p.tokenizer, [conv], 16)[0].text
    assert torch.allclose(merged_logits, adapter_logits, atol=1e-4)
    assert not torch.allclose(merged_logits, base_logits, atol=1e-3)  # the adapter is in


def test_export_refuses_to_overwrite(persona, tmp_path):
    """Guards against an export silently replacing an existing folder."""
    out = tmp_path / "taken"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    result = runner.invoke(app, ["export", str(persona), "--merged", str(out)])
    assert result.exit_code == 2 and "--overwrite" in result.stderr
    assert (out / "keep.txt").read_text() == "mine"
    result = runner.invoke(app, ["export", str(persona)])
    assert result.exit_code == 2 and "--merged" in result.stderr


def _one_line_error(result) -> str:
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: --push-to-hub user/persona")
    return lines[0]


def test_push_to_hub_offline_fails_clearly_before_any_work(persona, tmp_path, monkeypatch):
    """Guards against a push that crashes with a traceback offline, or writes the merged
    model before finding out it cannot upload."""
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    out = tmp_path / "merged"
    result = runner.invoke(
        app, ["export", str(persona), "--merged", str(out), "--push-to-hub", "user/persona"]
    )
    assert "HF_HUB_OFFLINE" in _one_line_error(result)
    assert not out.exists()


def test_push_to_hub_without_login_or_network_fails_clearly(persona, monkeypatch, tmp_path):
    """Guards against raw huggingface_hub or network exceptions reaching the user."""
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", False)
    monkeypatch.setattr("huggingface_hub.constants.HF_TOKEN_PATH", str(tmp_path / "no-token"))
    monkeypatch.delenv("HF_TOKEN", raising=False)
    result = runner.invoke(app, ["export", str(persona), "--push-to-hub", "user/persona"])
    assert "not logged in" in _one_line_error(result)

    # A Hub endpoint on a closed loopback port stands in for "no network".
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setattr("huggingface_hub.constants.ENDPOINT", f"http://127.0.0.1:{port}")
    monkeypatch.setenv("HF_TOKEN", "hf_not_a_real_token")
    result = runner.invoke(app, ["export", str(persona), "--push-to-hub", "user/persona"])
    assert "cannot reach the Hugging Face Hub" in _one_line_error(result)
    result = runner.invoke(app, ["export", str(persona), "--push-to-hub", "not a repo"])
    assert result.exit_code == 2 and "user/name" in result.stderr


def test_merged_export_keeps_the_base_dtype(tmp_path, embedded_tokenizer):
    """Guards against --merged writing float32 whatever the base is (1.6 GB for a 0.4B
    bf16 model), and against --dtype being ignored."""
    from conftest import build_tiny
    from safetensors import safe_open

    base = build_tiny("llama", tmp_path / "bf16", embedded_tokenizer)
    AutoModelForCausalLM.from_pretrained(base).to(torch.bfloat16).save_pretrained(base)
    persona = train_tiny_personas(tmp_path / "p", base, count=1)[0]

    def saved_dtypes(out):
        with safe_open(out / "model.safetensors", "pt") as f:
            return {f.get_tensor(k).dtype for k in f.keys()}

    assert (
        runner.invoke(app, ["export", str(persona), "--merged", str(tmp_path / "a")]).exit_code == 0
    )
    assert saved_dtypes(tmp_path / "a") == {torch.bfloat16}
    result = runner.invoke(
        app, ["export", str(persona), "--merged", str(tmp_path / "b"), "--dtype", "float32"]
    )
    assert result.exit_code == 0, result.output
    assert saved_dtypes(tmp_path / "b") == {torch.float32}
    result = runner.invoke(
        app, ["export", str(persona), "--merged", str(tmp_path / "c"), "--dtype", "fp8"]
    )
    assert result.exit_code == 2 and "--dtype fp8: choose one of" in result.stderr
