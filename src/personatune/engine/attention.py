"""Attention for decoding steps on CPU: one new token per row attends to its KV cache with
two batched matmuls and a float32 softmax, grouped by key/value head (no ``repeat_kv``).

Why not PyTorch's ``scaled_dot_product_attention``, which transformers' ``sdpa`` calls:
for one query token its CPU flash kernel is slow. Measured on the 2-core EPYC (bf16,
64 rows, 9 query and 3 key/value heads of 64, 150 cached tokens): 0.95 ms per layer
through transformers' ``pack_gqa`` path, 5.2 ms through ``enable_gqa`` (taken when the
batch has no padding, so no mask), 0.41 ms here. Everything else (prefill, CUDA,
dropout, soft-capping, attention sinks) goes to transformers' ``sdpa`` unchanged.
"""

from __future__ import annotations

import torch

#: Name registered with transformers' ``AttentionInterface``.
DECODE_ATTENTION = "personatune_decode"

_SWITCHABLE = ("sdpa", "personatune_varlen")  # varlen hands padded batches to sdpa too


def decode_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kw):
    """transformers attention function (the ``AttentionInterface`` signature).

    Args:
        query: ``(batch, heads, q_len, head_dim)``.
        key, value: ``(batch, kv_heads, seq, head_dim)``, the KV cache included.
        attention_mask: sdpa's mask, bool ``(batch, 1, q_len, seq)`` (True = attend),
            or None.

    Returns:
        ``(attn_output (batch, q_len, heads, head_dim), None)``.
    """
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    special = any(kw.get(k) is not None for k in ("softcap", "position_bias", "s_aux"))
    mask_ok = attention_mask is None or attention_mask.dtype == torch.bool
    if (
        query.shape[2] != 1
        or query.device.type != "cpu"
        or dropout
        or special
        or not mask_ok
        or getattr(module, "sinks", None) is not None
    ):
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kw
        )
    b, heads, _, dim = query.shape
    kv = key.shape[1]
    q = query.reshape(b, kv, heads // kv, dim)  # query head i reads key/value head i // group
    scores = torch.matmul(q, key.transpose(-1, -2))  # (batch, kv_heads, group, seq)
    scores = scores.float() * (dim**-0.5 if scaling is None else scaling)
    if attention_mask is not None:
        scores = scores.masked_fill(~attention_mask[:, :, -1:, :], float("-inf"))
    out = torch.matmul(torch.softmax(scores, -1).to(value.dtype), value)
    return out.reshape(b, heads, 1, dim).transpose(1, 2).contiguous(), None


def use_decode_attention(model) -> str | None:
    """Switch a CPU ``model`` from ``sdpa`` (or personatune's varlen attention) to
    :func:`decode_attention`; returns the implementation to restore, or None when it
    was left alone (CUDA, eager, flash-attention, flex)."""
    from personatune.patches import switch_attention

    if next(model.parameters()).device.type != "cpu":
        return None
    before = getattr(getattr(model, "config", None), "_attn_implementation", None)
    switched = switch_attention(model, DECODE_ATTENTION, decode_attention, _SWITCHABLE)
    return before if switched else None
