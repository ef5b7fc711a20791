"""Shared fixtures: tiny random models built from a config, with the embedded tokenizer."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"


def pytest_configure(config):
    # Tiny models are dominated by per-op overhead: one thread is faster than two and
    # leaves a core free. Integration tests on the real model keep torch's default.
    if "not integration" in (config.option.markexpr or "not integration"):
        torch.set_num_threads(1)


@pytest.fixture(scope="session")
def embedded_tokenizer():
    """The embedded model's tokenizer (ChatML template), converted once and cached."""
    from personatune.models import load_tokenizer, resolve_ref

    return load_tokenizer(resolve_ref("embedded"))


def build_tiny(arch: str, out: Path, tokenizer, **over) -> Path:
    """Save a randomly initialised 2-layer model of architecture ``arch`` (hidden 32)
    with ``tokenizer`` to ``out``. The vocabulary is the tokenizer's; with ``tokenizer``
    None it is 256 tokens (``vocab_size=`` to change) and no tokenizer is saved."""
    from transformers import AutoConfig, AutoModelForCausalLM

    ids = {k: getattr(tokenizer, k, None) for k in ("bos_token_id", "eos_token_id", "pad_token_id")}
    kw = dict(
        vocab_size=len(tokenizer) if tokenizer is not None else 256,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=512,
        **ids,
    )
    if arch in ("llama", "qwen2"):
        kw["num_key_value_heads"] = 2
    if arch == "falcon":
        kw = {
            k: v for k, v in kw.items() if k not in ("intermediate_size", "max_position_embeddings")
        }
        kw.update(new_decoder_architecture=False, multi_query=True)
    if arch == "phi":
        kw["partial_rotary_factor"] = 0.5
    kw.update(over)
    config = AutoConfig.for_model(arch, **kw)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    model.save_pretrained(out)
    if tokenizer is not None:
        tokenizer.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory, embedded_tokenizer) -> Path:
    """A tiny random Llama (the embedded model's architecture) with the embedded tokenizer."""
    return build_tiny("llama", tmp_path_factory.mktemp("tiny") / "llama", embedded_tokenizer)


@pytest.fixture
def persona_yaml(tmp_path, tiny_model):
    """Write a persona YAML over a small pairs CSV; returns a function taking extra YAML."""

    def make(extra: str = "", rows: int = 24) -> Path:
        csv = tmp_path / "pairs.csv"
        lines = ["prompt,response"] + [
            f'"Question {i}, please","Arr, answer {i} matey!"' for i in range(rows)
        ]
        csv.write_text("\n".join(lines) + "\n")
        spec = tmp_path / "persona.yaml"
        spec.write_text(
            f"name: tiny\nsystem_prompt: You are a pirate.\nmodel:\n  name: {tiny_model}\n"
            f"data:\n  - path: pairs.csv\noutput_dir: out\n"
            # A random model has no capability to guard; a test that wants the guard
            # passes its own guard: section (the later key wins).
            f"guard:\n  enabled: false\n"
            f"train:\n  epochs: 1\n  batch_size: 2\n  gradient_accumulation: 2\n"
            f"  max_seq_length: 64\n  checkpoint_interval: 2\n  learning_rate: 0.01\n{extra}"
        )
        return spec

    return make
