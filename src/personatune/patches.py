"""Every change personatune makes to an upstream library's behaviour, in one place. Each
says what it works around, the measurement or bug behind it, and which test in
``tests/test_patches.py`` fails when upstream fixes or breaks what it relies on.

1. :func:`falcon_linear_as_nn_linear`: transformers quantizes only exact ``nn.Linear``.
2. :func:`drop_gguf_quantizer`: a de-quantised GGUF model refuses ``save_pretrained``.
3. :func:`varlen_attention`: per-example attention in a packed row (``AttentionInterface``).
4. :func:`autocast_lora_inputs`: a private peft method overridden per layer.
5. :func:`fuse_lora`: peft's LoRA forward as one ``addmm`` (tested in tests/test_train.py).
6. :func:`load_task_yaml`: lm-eval's private YAML loader.
7. :func:`contiguous_head_input`: no copy of the head weight per row in PyTorch's matmul.
"""

from __future__ import annotations

import contextlib
import inspect
import itertools
import types

import torch


@contextlib.contextmanager
def falcon_linear_as_nn_linear(active: bool):
    """Build Falcon with plain ``nn.Linear`` layers while loading in 4 bit.

    transformers' bitsandbytes integration replaces only modules whose type *is*
    ``nn.Linear``; Falcon's ``FalconLinear`` subclass (same maths: ``x @ W.T + b``) is
    skipped, so a Falcon "QLoRA" would silently train unquantised weights (33.9 GB
    instead of 10.9 GB measured for the 7B shape on an H200; benchmarks/results/recipes.md).
    """
    if not active:
        yield
        return
    from transformers.models.falcon import modeling_falcon

    original = modeling_falcon.FalconLinear
    modeling_falcon.FalconLinear = torch.nn.Linear
    try:
        yield
    finally:
        modeling_falcon.FalconLinear = original


def drop_gguf_quantizer(model) -> None:
    """Clear the GGUF quantizer marker of a model loaded with ``gguf_file=``, so that
    ``save_pretrained`` works. transformers de-quantises GGUF tensors to fp32 while
    loading, yet keeps a ``GgufHfQuantizer`` whose ``is_serializable()`` is False, and
    ``save_pretrained`` refuses such a model (transformers 5.x); the de-quantised cache
    of :func:`personatune.models._gguf_as_safetensors` (1 s to load, not 16) needs it."""
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config


#: Attention implementation used for padding-free (packed) training; see :func:`varlen_attention`.
VARLEN_ATTENTION = "personatune_varlen"
# (cu_seq_lens tensor, its values as a list): every decoder layer of one forward gets the
# same tensor, so the boundaries cross to the host once per forward, not once per layer.
_BOUNDS: list = [None, None]


def _segments(cu_seq_lens: torch.Tensor) -> list[int]:
    if _BOUNDS[0] is not cu_seq_lens:
        _BOUNDS[:] = [cu_seq_lens, cu_seq_lens.tolist()]
    return _BOUNDS[1]


def _torch_varlen():
    """PyTorch's FlashAttention variable-length kernel (``torch.nn.attention.varlen``,
    CUDA only, torch >= 2.9) and the keyword arguments its version takes, or None."""
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    params = inspect.signature(varlen_attn).parameters
    if "is_causal" in params:
        causal = {"is_causal": True}
    elif "window_size" in params:
        causal = {"window_size": (-1, 0)}
    else:
        return None
    return varlen_attn, causal, "enable_gqa" in params


def varlen_attention(
    module, query, key, value, attention_mask, dropout=0.0, scaling=None, is_causal=None, **kwargs
):
    """Causal attention over a packed row, each example attending only to itself.

    A packed micro-batch is one row of ``T`` tokens holding several examples. transformers
    passes its example boundaries as ``cu_seq_lens_q`` (cumulative lengths, ``(n + 1,)``
    int32, from ``DataCollatorWithFlattening(return_flash_attn_kwargs=True)``) and the
    longest as ``max_length_q``. On CUDA with bf16/fp16 inputs this calls PyTorch's
    FlashAttention variable-length kernel (``torch.nn.attention.varlen.varlen_attn``, the
    counterpart of flash-attn's ``flash_attn_varlen_func``). Elsewhere each example runs
    through ``scaled_dot_product_attention`` with ``is_causal=True`` and no mask, in fp32
    on CPU. Either way the cost is ``sum(len_i ** 2)`` instead of the ``T ** 2`` of the
    block-diagonal mask that plain ``sdpa`` builds, and examples cannot attend to each
    other.

    Args:
        query: ``(1, heads, T, head_dim)``; key, value: ``(1, kv_heads, T, head_dim)``.

    Returns:
        ``(attn_output (1, T, heads, head_dim), None)`` as transformers attention functions
        do. Anything that is not a plain causal packed row (padding masks, caches, sliding
        windows, soft-capping, attention sinks or biases) goes to transformers' sdpa.
    """
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    cu = kwargs.get("cu_seq_lens_q")
    plain = (
        cu is not None
        and query.shape[0] == 1
        and query.shape[2] == key.shape[2]
        and is_causal is not False
        and getattr(module, "is_causal", True)
        and not getattr(module, "sliding_window", None)
        and all(kwargs.get(k) is None for k in ("softcap", "position_bias", "s_aux", "sinks"))
    )
    if not plain:
        kwargs.update(dropout=dropout, scaling=scaling, is_causal=is_causal)
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    p = dropout if module.training else 0.0
    half_cuda = query.is_cuda and query.dtype in (torch.bfloat16, torch.float16)
    flash = _torch_varlen() if half_cuda else None
    if flash and p == 0.0 and query.shape[-1] <= 256:
        varlen_attn, causal, gqa_arg = flash
        q, k, v = (t[0].transpose(0, 1) for t in (query, key, value))  # (T, heads, dim)
        extra = {}
        if q.shape[1] != k.shape[1]:
            if gqa_arg:
                extra["enable_gqa"] = True
            else:
                rep = q.shape[1] // k.shape[1]
                k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
        cu = cu.to(torch.int32)
        n = kwargs.get("max_length_q") or int((cu[1:] - cu[:-1]).max())
        out = varlen_attn(q, k, v, cu, cu, int(n), int(n), scale=scaling, **causal, **extra)
        return out.unsqueeze(0), None
    bounds = _segments(cu)
    dtype = query.dtype
    if query.device.type == "cpu":
        # PyTorch's CPU flash-attention backward is about 2x faster in fp32 than in bf16 for
        # example-sized blocks (measured for benchmarks/train_speed.py), and more exact.
        query, key, value = query.float(), key.float(), value.float()
    gqa = query.shape[1] != key.shape[1]
    out = [
        torch.nn.functional.scaled_dot_product_attention(
            query[:, :, s:e],
            key[:, :, s:e],
            value[:, :, s:e],
            dropout_p=p,
            is_causal=True,
            scale=scaling,
            enable_gqa=gqa,
        )
        for s, e in itertools.pairwise(bounds)
    ]
    return torch.cat(out, dim=2).to(dtype).transpose(1, 2).contiguous(), None


def switch_attention(model, name: str, function, allowed: tuple[str, ...] = ("sdpa",)) -> bool:
    """Register ``function`` with transformers' ``AttentionInterface`` as ``name`` (its
    masks are sdpa's, so padded batches still get them) and switch ``model``'s attention
    implementation to it, when the current one is in ``allowed``. Returns whether it
    switched; other implementations (eager, flash-attention, flex) are left alone."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

    if getattr(getattr(model, "config", None), "_attn_implementation", None) not in allowed:
        return False
    AttentionInterface.register(name, function)
    ALL_MASK_ATTENTION_FUNCTIONS.register(name, sdpa_mask)
    try:
        model.set_attn_implementation(name)
    except (ValueError, ImportError):
        return False
    return model.config._attn_implementation == name


def use_varlen_attention(model) -> bool:
    """Switch ``model`` (a transformers ``PreTrainedModel``) from ``sdpa`` to
    :func:`varlen_attention` for packed training (:func:`switch_attention`)."""
    return switch_attention(model, VARLEN_ATTENTION, varlen_attention)


def autocast_lora_inputs(model) -> None:
    """Under autocast, LoRA layers take their input as it comes (bf16 on CUDA) instead of
    first copying it to the adapter's fp32 dtype: autocast runs the adapter's matmuls in
    bf16 either way, and peft's own 4-bit LoRA layers already skip the copy under autocast.
    Saves an fp32 copy of every adapted layer's input (the ``0.5b-liger`` against
    ``0.5b-nocast`` rows of benchmarks/results/gpu_train_speed.md). Outside autocast (e.g.
    generation) peft's cast is kept. Overrides peft's private ``_cast_input_dtype`` on
    each plain ``lora.Linear`` of ``model``."""
    from peft.tuners.lora.layer import Linear

    def cast(self, x, dtype):
        if x is not None and torch.is_autocast_enabled(x.device.type):
            return x
        return Linear._cast_input_dtype(self, x, dtype)

    for module in model.modules():
        if type(module) is Linear:
            module._cast_input_dtype = types.MethodType(cast, module)


def fuse_lora(model) -> int:
    """Give every peft LoRA layer of ``model`` a forward that adds the LoRA update in the
    epilogue of one matmul: ``addmm(base(x), A(dropout(x)), B^T, alpha=scaling)`` on the
    ``(tokens, features)`` view, where peft clones the base output (a guard for
    bitsandbytes 4-bit outputs that ``addmm`` does not need: it writes a new tensor), then
    runs ``B``, the scale and the add as kernels of their own (``train.fused_lora``;
    measured in benchmarks/results/gpu_train_speed.md, call D). peft's own forward still
    runs where this one does not apply: adapters disabled or merged, mixed-adapter
    batches (``adapter_names``), several active adapters, LoRA variants (DoRA...).
    Returns the number of layers changed."""
    from peft.tuners.lora import LoraLayer

    def forward(self, x, *args, **kwargs):
        names = self.active_adapters
        if (
            self.disable_adapters
            or self.merged
            or "adapter_names" in kwargs
            or len(names) != 1
            or names[0] not in self.lora_A
            or names[0] in self.lora_variant
        ):
            return type(self).forward(self, x, *args, **kwargs)
        name = names[0]
        result = self.base_layer(x, *args, **kwargs)
        if not torch.is_autocast_enabled(x.device.type):  # as peft: input in the adapter's dtype
            x = x.to(self.lora_A[name].weight.dtype)
        h = self.lora_A[name](self.lora_dropout[name](x))
        flat = torch.addmm(
            result.reshape(-1, result.shape[-1]),
            h.reshape(-1, h.shape[-1]).to(result.dtype),
            self.lora_B[name].weight.t().to(result.dtype),
            alpha=self.scaling[name],
        )
        return flat.view(result.shape)

    layers = [m for m in model.modules() if isinstance(m, LoraLayer) and hasattr(m, "base_layer")]
    for module in layers:
        module.forward = types.MethodType(forward, module)
    return len(layers)


def load_task_yaml(path) -> dict:
    """An lm-eval task's YAML config as a dict, ``include:`` files merged and
    ``!function`` tags resolved, without building the task. lm-eval (0.4.x) has no public
    function for this: ``TaskManager.load_task_or_group`` builds the task, which downloads
    its dataset from the Hub, before personatune can point it at a local data file. Uses
    the private ``lm_eval.tasks._yaml_loader.load_yaml`` that the TaskManager itself uses."""
    from lm_eval.tasks._yaml_loader import load_yaml

    return load_yaml(path, resolve_func=True)


_HEAD_HOOK = "_personatune_contiguous_head"


def contiguous_head_input(model) -> None:
    """Make the input of ``model``'s output head (``lm_head``) contiguous before it runs.

    transformers computes the logits of the last position only as
    ``lm_head(hidden[:, -1:, :])``, a strided view when a prompt of several tokens is
    prefilled. For such an input, PyTorch's ``matmul`` (2.13, ``should_fold`` in
    ``LinearAlgebra.cpp``) folds the batch into one ``mm`` only when a tensor requires
    grad; for frozen weights it falls back to ``bmm`` and first copies the weight once per
    row: 8 rows x 49,152 x 576 on the embedded model. Measured on the 2-core EPYC (bf16,
    8 prompts of 58 tokens): 705 ms per prefill with frozen weights (a merged adapter, a
    peft base) against 363 ms with trainable ones; 378 ms of it in that ``bmm``.
    ``tests/test_patches.py`` checks that the fallback still happens. Idempotent.
    """
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is None or getattr(head, _HEAD_HOOK, False):
        return
    head.register_forward_pre_hook(lambda module, args: (args[0].contiguous(), *args[1:]))
    setattr(head, _HEAD_HOOK, True)
