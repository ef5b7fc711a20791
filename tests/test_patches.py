"""One test per patch in ``personatune.patches``: each fails when upstream fixes what the
patch works around (the patch should then go) or breaks what it relies on."""

import inspect

import pytest
import torch
from transformers import AutoModelForCausalLM, FalconConfig, LlamaConfig

from personatune import patches
from personatune.train.trainer import PackedCollator

TINY = dict(
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=100,
)


def test_falcon_linear_swap_is_still_needed_and_same_maths():
    """Guards the FalconLinear swap: transformers' bitsandbytes integration still converts
    only modules whose type *is* nn.Linear, Falcon still subclasses it, and a Falcon built
    under the swap has plain nn.Linear layers computing the same logits."""
    from transformers.integrations import bitsandbytes
    from transformers.models.falcon import modeling_falcon

    assert "type(module) is nn.Linear" in inspect.getsource(bitsandbytes.replace_with_bnb_linear)
    assert modeling_falcon.FalconLinear is not torch.nn.Linear
    assert issubclass(modeling_falcon.FalconLinear, torch.nn.Linear)
    config = FalconConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=4, vocab_size=100
    )
    torch.manual_seed(0)
    stock = AutoModelForCausalLM.from_config(config).eval()
    with patches.falcon_linear_as_nn_linear(True):
        swapped = AutoModelForCausalLM.from_config(config).eval()
    assert modeling_falcon.FalconLinear is not torch.nn.Linear  # restored
    dense = swapped.transformer.h[0].self_attention.dense
    assert type(dense) is torch.nn.Linear
    assert type(stock.transformer.h[0].self_attention.dense) is modeling_falcon.FalconLinear
    swapped.load_state_dict(stock.state_dict())
    ids = torch.tensor([[1, 5, 7, 9]])
    torch.testing.assert_close(swapped(ids).logits, stock(ids).logits)


def test_gguf_quantizer_marker_still_blocks_saving(tmp_path):
    """Guards the hf_quantizer reset: transformers still refuses to save a model carrying
    the GGUF quantizer (which de-quantised it already), and the reset lets it save."""
    from transformers.quantizers.quantizer_gguf import GgufHfQuantizer
    from transformers.utils.quantization_config import GgufConfig

    model = AutoModelForCausalLM.from_config(LlamaConfig(**TINY))
    model.hf_quantizer = GgufHfQuantizer(GgufConfig(gguf_file="m.gguf"))
    model.config.quantization_config = GgufConfig(gguf_file="m.gguf")
    with pytest.raises(ValueError, match="not serializable"):
        model.save_pretrained(tmp_path / "refused")
    patches.drop_gguf_quantizer(model)
    model.save_pretrained(tmp_path / "saved")
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "saved")
    torch.testing.assert_close(again.lm_head.weight, model.lm_head.weight)


def test_varlen_attention_gets_the_boundaries_of_each_forward(monkeypatch):
    """Guards the varlen attention: transformers still hands the packed row's
    cu_seq_lens_q to a registered attention function (else examples would attend to each
    other), and the module-global boundary cache follows each new forward's tensor."""
    model = AutoModelForCausalLM.from_config(LlamaConfig(**TINY)).eval()
    assert patches.use_varlen_attention(model)
    seen = []
    original = patches._segments
    monkeypatch.setattr(patches, "_segments", lambda cu: seen.append(cu) or original(cu))
    for lengths in ((3, 5), (4, 2, 6)):
        rows = [{"input_ids": list(range(1, n + 1))} for n in lengths]
        batch = {k: v for k, v in PackedCollator()(rows).items() if k != "labels"}
        with torch.no_grad():
            packed = model(**batch).logits[0]
            first = model(input_ids=torch.tensor([rows[0]["input_ids"]])).logits[0]
        torch.testing.assert_close(packed[: lengths[0]], first, atol=1e-5, rtol=1e-5)
        assert patches._BOUNDS[1] == [0, *torch.tensor(lengths).cumsum(0).tolist()]
    assert len(seen) == 2 * TINY["num_hidden_layers"]  # once per layer per packed forward


def test_lora_input_cast_still_upcasts_under_autocast():
    """Guards the peft override: under autocast, peft's LoRA Linear still copies its input
    to the adapter's fp32 dtype (the copy the patch saves) through the private
    _cast_input_dtype, and the patched layer passes the bf16 input through with the same
    result within bf16 precision."""
    from peft import LoraConfig, get_peft_model

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = torch.nn.Linear(16, 16)

        def forward(self, x):
            return self.proj(x)

    def lora_input_dtype(model, x):
        got = []
        layer = model.base_model.model.proj
        hook = layer.lora_A["default"].register_forward_pre_hook(lambda m, a: got.append(a[0]))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = model(x)
        hook.remove()
        return got[0].dtype, y

    torch.manual_seed(0)
    model = get_peft_model(Net(), LoraConfig(r=4, target_modules=["proj"], lora_dropout=0.0))
    torch.nn.init.normal_(model.base_model.model.proj.lora_B["default"].weight)
    x = torch.randn(2, 16, dtype=torch.bfloat16)
    stock_dtype, stock = lora_input_dtype(model, x)
    assert stock_dtype == torch.float32  # peft still upcasts: the patch still saves a copy
    patches.autocast_lora_inputs(model)
    patched_dtype, out = lora_input_dtype(model, x)
    assert patched_dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), stock.float(), atol=0.05, rtol=0.05)


def test_lm_eval_private_yaml_loader_still_works():
    """Guards the lm-eval loader: its private _yaml_loader still merges a task's include
    file and returns the config dict, and lm-eval still offers no public equivalent."""
    import lm_eval.tasks
    from lm_eval.tasks import TaskManager

    entry = TaskManager().task_index["arc_easy"]
    cfg = patches.load_task_yaml(entry.yaml_path)
    assert cfg["task"] == "arc_easy" and cfg["output_type"] == "multiple_choice"
    assert "doc_to_text" in cfg  # from the included arc yaml
    assert not hasattr(lm_eval.tasks, "load_yaml") and not hasattr(lm_eval, "load_yaml")


def test_matmul_still_copies_a_frozen_weight_for_a_sliced_input():
    """Upstream check for ``contiguous_head_input``: PyTorch's matmul of a strided
    ``(rows, 1, hidden)`` slice by a frozen weight runs as ``bmm`` (after copying the
    weight per row), and as one ``mm`` once the input is contiguous. When this fails,
    PyTorch folds the batch itself and the patch can go."""
    from torch.profiler import ProfilerActivity, profile

    hidden = torch.randn(4, 7, 16)[:, -1:, :]  # as lm_head(hidden[:, -1:, :]) gets it
    weight = torch.randn(32, 16)  # requires_grad False, as in an inference copy

    def ops(x):
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            torch.nn.functional.linear(x, weight)
        return {e.key for e in prof.key_averages()}

    assert "aten::bmm" in ops(hidden)
    assert "aten::bmm" not in ops(hidden.contiguous())


def test_contiguous_head_input_keeps_the_logits(tiny_model):
    """Guards against the hook changing what the head computes, or being added twice."""
    from transformers import AutoModelForCausalLM

    from personatune.patches import contiguous_head_input

    model = AutoModelForCausalLM.from_pretrained(tiny_model).eval().requires_grad_(False)
    ids = torch.randint(0, 100, (3, 9))
    with torch.inference_mode():
        want = model(input_ids=ids, logits_to_keep=1).logits
        contiguous_head_input(model)
        contiguous_head_input(model)
        got = model(input_ids=ids, logits_to_keep=1).logits
    assert len(model.get_output_embeddings()._forward_pre_hooks) == 1
    torch.testing.assert_close(got, want)
