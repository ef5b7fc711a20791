"""The engine's decoding attention must compute what transformers' sdpa computes."""

from __future__ import annotations

import pytest
import torch
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from personatune.engine.attention import decode_attention


class _Module(torch.nn.Module):
    def __init__(self, groups: int):
        super().__init__()
        self.num_key_value_groups = groups
        self.is_causal = True


@pytest.mark.parametrize("padded", [True, False])
@pytest.mark.parametrize("heads,kv_heads", [(9, 3), (4, 4)])
def test_decode_attention_matches_sdpa(padded, heads, kv_heads):
    """Guards against a wrong head grouping (query head i must read key/value head
    i // group), a mask applied to the wrong columns, or a wrong scale or output layout."""
    torch.manual_seed(0)
    b, seq, dim = 5, 23, 16
    q = torch.randn(b, heads, 1, dim)
    k, v = torch.randn(b, kv_heads, seq, dim), torch.randn(b, kv_heads, seq, dim)
    mask = None
    if padded:
        mask = torch.ones(b, 1, 1, seq, dtype=torch.bool)
        for row in range(b):
            mask[row, ..., : 3 * row] = False  # left padding of different widths
    module = _Module(heads // kv_heads)
    want, _ = sdpa_attention_forward(module, q, k, v, mask, scaling=0.3)
    got, _ = decode_attention(module, q, k, v, mask, scaling=0.3)
    assert got.shape == want.shape == (b, 1, heads, dim)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
