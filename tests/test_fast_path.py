"""The fast training path computes the same function as the plain one: packed rows with
variable-length attention, and the loss at trained positions only."""

import pytest
import torch
from transformers import AutoModelForCausalLM, DataCollatorForSeq2Seq

from personatune.config import load_spec
from personatune.data.dataset import prepare_data
from personatune.models import load_tokenizer, resolve_ref
from personatune.patches import VARLEN_ATTENTION, use_varlen_attention
from personatune.train.trainer import PackedCollator, collator, lora_model


@pytest.fixture
def setup(persona_yaml, tiny_model):
    spec = load_spec(persona_yaml(), ["lora.dropout=0"])
    tok = load_tokenizer(resolve_ref(str(tiny_model)))
    rows = prepare_data(spec, tok).train[:4]
    torch.manual_seed(0)
    model = lora_model(spec, AutoModelForCausalLM.from_pretrained(tiny_model))
    # LoRA B starts at zero; give it values so the adapter is part of what is compared.
    for name, p in model.named_parameters():
        if "lora_B" in name:
            p.data.normal_(0, 0.02)
    return spec, tok, rows, model.train()


def test_packed_logits_equal_per_example_logits(setup):
    """Guards against packed examples attending to each other, in train mode, with the
    variable-length attention that packing switches on."""
    _, _, rows, model = setup
    assert use_varlen_attention(model.get_base_model())
    assert model.config._attn_implementation == VARLEN_ATTENTION
    batch = PackedCollator()(rows)
    assert batch["cu_seq_lens_q"].tolist()[-1] == batch["input_ids"].shape[1]
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    logits = model(**inputs).logits[0]
    start = 0
    for row in rows:
        n = len(row["input_ids"])
        alone = model(input_ids=torch.tensor([row["input_ids"]])).logits[0]
        torch.testing.assert_close(logits[start : start + n], alone, atol=1e-5, rtol=1e-5)
        start += n


def test_varlen_attention_matches_sdpa_block_mask(setup):
    """Guards against the variable-length path computing anything other than sdpa with
    transformers' block-diagonal mask (the library reference)."""
    _, _, rows, model = setup
    batch = PackedCollator()(rows)
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    reference = model(**inputs).logits
    use_varlen_attention(model.get_base_model())
    torch.testing.assert_close(model(**inputs).logits, reference, atol=1e-5, rtol=1e-5)


def test_padded_batch_still_masked_under_varlen(setup):
    """Guards against the varlen attention dropping the padding mask of padded batches
    (evaluation, the padding collator)."""
    _, tok, rows, model = setup
    use_varlen_attention(model.get_base_model())
    tok.padding_side = "right"
    batch = DataCollatorForSeq2Seq(tok, padding=True, label_pad_token_id=-100)(rows)
    padded = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    for i, row in enumerate(rows):
        n = len(row["input_ids"])
        alone = model(input_ids=torch.tensor([row["input_ids"]])).logits[0]
        torch.testing.assert_close(padded[i, :n], alone, atol=1e-5, rtol=1e-5)


def test_loss_at_trained_positions_equals_full_loss(setup):
    """Guards against the loss-positions shortcut changing the loss or its gradients
    (wrong shift, off-by-one positions, or a wrong token count)."""
    spec, tok, rows, model = setup
    full = PackedCollator(loss_positions=False)(rows)
    fast = collator(spec, tok, model)(rows)
    assert isinstance(fast, dict) and "logits_to_keep" in fast
    n_trained = sum(sum(1 for x in r["labels"][1:] if x != -100) for r in rows)
    assert fast["logits_to_keep"].numel() == n_trained == fast["shift_labels"].numel()

    losses, grads = [], []
    for batch in (full, fast):
        model.zero_grad()
        out = model(**batch, num_items_in_batch=torch.tensor(n_trained))
        out.loss.backward()
        losses.append(out.loss.detach())
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters() if p.requires_grad]))
        if batch is fast:
            assert out.logits.shape[1] == n_trained  # no logits for untrained positions
    torch.testing.assert_close(losses[1], losses[0], atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(grads[1], grads[0], atol=1e-6, rtol=1e-5)


def test_no_loss_positions_without_model(setup):
    """Guards against emitting logits_to_keep for a model whose forward cannot take it."""
    spec, tok, rows, _ = setup
    assert "logits_to_keep" not in collator(spec, tok)(rows)
    off = load_spec(spec.base_dir / "persona.yaml", ["train.fused_loss=false"])
    assert "logits_to_keep" not in collator(off, tok, setup[3])(rows)
