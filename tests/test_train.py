"""Training on a tiny random model: the LoRA invariant, reload, resume, loss regression,
equivalent batch shapes, packing, and refusing to write over results."""

import json

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, TrainerCallback

from personatune.config import load_spec
from personatune.errors import PersonatuneError
from personatune.io import read_jsonl as read_log
from personatune.train.trainer import train


@pytest.fixture(autouse=True)
def fp32(monkeypatch):
    # fp32 keeps stored loss values exact across CPUs with and without AMX.
    monkeypatch.setenv("PERSONATUNE_BF16", "0")


def lora_weights(path):
    return load_file(str(path / "adapter_model.safetensors"))


def test_lora_invariant_base_unchanged_adapter_changed(persona_yaml, tiny_model):
    """Guards against training the base weights or an adapter that never moved."""
    spec = load_spec(persona_yaml())
    out = train(spec)
    from personatune.engine import load_persona

    p = load_persona(out)
    base = AutoModelForCausalLM.from_pretrained(tiny_model)
    tuned_base = p.model.get_base_model().state_dict()
    for name, w in base.state_dict().items():
        key = name.replace(".weight", ".base_layer.weight") if "proj" in name else name
        assert torch.equal(tuned_base[key], w), f"base weight {name} changed"
    # peft initialises lora_B to zero: a changed B means the adapter trained.
    bs = {k: v for k, v in lora_weights(out).items() if "lora_B" in k}
    assert bs and all(v.abs().sum() > 0 for v in bs.values())
    # every linear layer of both blocks was targeted (all-linear default)
    assert len(bs) == 2 * 7


def test_adapter_reloads_in_plain_peft_with_identical_logits(persona_yaml, tiny_model):
    """Guards against an adapter that only works inside personatune."""
    from peft import PeftModel

    from personatune.engine import load_persona

    out = train(load_spec(persona_yaml()))
    ids = torch.tensor([[1, 2, 3, 4, 5, 6]])
    ours = load_persona(out).model(ids).logits
    plain = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model), out).eval()
    assert torch.equal(ours, plain(ids).logits)
    assert json.loads((out / "adapter_config.json").read_text())["r"] == 16


def test_persona_directory_contents(persona_yaml):
    out = train(load_spec(persona_yaml()))
    names = {p.name for p in out.iterdir()}
    assert {
        "adapter_model.safetensors",
        "adapter_config.json",
        "config.yaml",
        "train_log.jsonl",
        "persona.json",
        "checkpoints",
    } <= names
    manifest = json.loads((out / "persona.json").read_text())
    assert manifest["name"] == "tiny" and manifest["base_model"]["fingerprint"].startswith(
        "sha256:"
    )
    assert (
        manifest["data"]["hash"].startswith("sha256:") and manifest["training"]["tokens_per_s"] > 0
    )
    # the GPU peak is recorded on CUDA only (benchmarks/recipes_gpu.py reads it)
    assert manifest["training"]["peak_gpu_gib"] is None
    log = read_log(out / "train_log.jsonl")
    assert [r["step"] for r in log if "loss" in r] == list(range(1, 7))
    assert all({"loss", "learning_rate", "grad_norm"} <= r.keys() for r in log if "loss" in r)
    assert not (out.parent / ".out.partial").exists()
    # the resolved config loads back on its own
    assert load_spec(out / "config.yaml").name == "tiny"


class Crash(TrainerCallback):
    def on_save(self, args, state, control, **kw):
        if state.global_step == 2:
            raise KeyboardInterrupt("simulated crash")


def test_resume_matches_uninterrupted_run(persona_yaml, tmp_path):
    """Guards against resume restarting the scheduler, optimizer, RNG or data order."""
    spec = load_spec(persona_yaml("  max_steps: 4\n"), ["output_dir=straight"])
    straight = train(spec)
    spec2 = load_spec(persona_yaml("  max_steps: 4\n"), ["output_dir=resumed"])
    with pytest.raises(KeyboardInterrupt):
        train(spec2, callbacks=[Crash()])
    assert not spec2.output_path.exists()
    resumed = train(spec2, resume=True)
    a, b = lora_weights(straight), lora_weights(resumed)
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6)
    la = [r["loss"] for r in read_log(straight / "train_log.jsonl") if "loss" in r]
    lb = [r["loss"] for r in read_log(resumed / "train_log.jsonl") if "loss" in r]
    assert len(lb) == 4
    assert la == pytest.approx(lb, rel=1e-5)
    assert (
        json.loads((resumed / "persona.json").read_text())["training"]["resumed_from"]
        == "checkpoint-2"
    )


# Loss per step at seed 42 on the tiny Llama, fp32, padding collator and packing alike.
# Regenerate with: pytest tests/test_train.py -k regression -s (prints the values).
EXPECTED_LOSS = [10.8341, 10.8373, 10.7044, 10.6155]


@pytest.mark.parametrize("packing", [True, False])
def test_loss_regression(persona_yaml, packing):
    """Guards against silent changes to the loss: masking, formatting or optimisation."""
    spec = load_spec(persona_yaml("  max_steps: 4\n"), [f"train.packing={packing}"])
    out = train(spec)
    losses = [r["loss"] for r in read_log(out / "train_log.jsonl") if "loss" in r]
    print(losses)
    assert losses == pytest.approx(EXPECTED_LOSS, abs=2e-3)


def test_batch_8x1_equals_1x8(persona_yaml):
    """Equivalent batch shapes give the same loss (token-weighted gradient accumulation)."""
    runs = []
    for bs, ga in ((8, 1), (1, 8)):
        spec = load_spec(
            persona_yaml("  max_steps: 2\n"),
            [
                f"train.batch_size={bs}",
                f"train.gradient_accumulation={ga}",
                f"output_dir=o{bs}",
                "lora.dropout=0",
                "train.packing=false",
            ],
        )
        out = train(spec)
        runs.append([r["loss"] for r in read_log(out / "train_log.jsonl") if "loss" in r])
    assert runs[0] == pytest.approx(runs[1], rel=1e-4)


def test_existing_output_refused_and_nothing_written(persona_yaml):
    spec = load_spec(persona_yaml("  max_steps: 1\n"))
    out = train(spec)
    before = (out / "adapter_model.safetensors").read_bytes()
    with pytest.raises(PersonatuneError, match="already exists; pass --overwrite"):
        train(spec)
    assert (out / "adapter_model.safetensors").read_bytes() == before
    train(spec, overwrite=True)


def test_bad_data_writes_nothing(persona_yaml, tmp_path):
    """Guards against half-written output after a data error."""
    spec = load_spec(persona_yaml())
    (tmp_path / "pairs.csv").write_text("prompt,response\nx,\n")
    with pytest.raises(PersonatuneError, match=r"pairs.csv:row 1: field 'response' is empty"):
        train(spec)
    assert not spec.output_path.exists()


def test_nf4_without_cuda_is_a_clear_error(persona_yaml):
    if torch.cuda.is_available():
        pytest.skip("CUDA present")
    with pytest.raises(PersonatuneError, match="nf4 needs a CUDA GPU"):
        train(load_spec(persona_yaml(), ["model.quantization=nf4"]))


def test_unknown_target_module(persona_yaml):
    with pytest.raises(PersonatuneError, match="lora.target_modules"):
        train(load_spec(persona_yaml(), ["lora.target_modules=[nope_proj]"]))


def test_packed_examples_do_not_attend_to_each_other(persona_yaml, tiny_model):
    """Guards against packing leaking attention across examples (a KV cache left on in
    training makes transformers skip the block-diagonal mask)."""
    from personatune.data.dataset import prepare_data
    from personatune.models import load_tokenizer, resolve_ref
    from personatune.train.trainer import collator, lora_model

    spec = load_spec(persona_yaml())
    tok = load_tokenizer(resolve_ref(str(tiny_model)))
    rows = prepare_data(spec, tok).train[:3]
    model = lora_model(spec, AutoModelForCausalLM.from_pretrained(tiny_model)).eval()
    packed = collator(spec, tok)(rows)
    with torch.no_grad():
        logits = model(input_ids=packed["input_ids"], position_ids=packed["position_ids"]).logits[0]
        start = 0
        for row in rows:
            n = len(row["input_ids"])
            alone = model(input_ids=torch.tensor([row["input_ids"]])).logits[0]
            torch.testing.assert_close(logits[start : start + n], alone, atol=1e-4, rtol=1e-4)
            start += n


def test_fused_lora_matches_peft(tiny_model):
    """Guards train.fused_lora against changing the maths: logits and LoRA gradients equal
    peft's own forward (fp32, dropout off), and a disabled adapter still gives the base
    model (the fused forward must fall back to peft's there)."""
    from peft import LoraConfig, get_peft_model

    from personatune.patches import fuse_lora

    ids = torch.randint(0, 100, (2, 12), generator=torch.Generator().manual_seed(0))

    def run(fused: bool):
        torch.manual_seed(0)
        base = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
        model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
        for name, p in model.named_parameters():
            if "lora_B" in name:  # B starts at zero: make the update visible
                torch.nn.init.normal_(p, std=0.1, generator=torch.Generator().manual_seed(1))
        assert not fused or fuse_lora(model) > 0
        logits = model(ids).logits
        logits.square().mean().backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
        with model.disable_adapter(), torch.no_grad():
            plain = model(ids).logits
        return logits.detach(), grads, plain

    ref_logits, ref_grads, ref_plain = run(False)
    logits, grads, plain = run(True)
    torch.testing.assert_close(logits, ref_logits, rtol=1e-5, atol=1e-5)
    for name, g in ref_grads.items():
        torch.testing.assert_close(grads[name], g, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(plain, ref_plain)
    assert not torch.allclose(plain, logits)
