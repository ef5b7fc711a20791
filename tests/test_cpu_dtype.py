"""bf16 autocast on CPU is chosen by measurement, not by a CPU flag (issue 14): a CPU
with AVX-512 BF16 but no AMX may or may not run bf16 faster than fp32."""

import itertools

import pytest
import torch

from personatune import models


def scripted_clock(monkeypatch, fp32: float, bf16: float):
    """perf_counter readings that make each fp32 matmul take ``fp32`` seconds and each
    bf16 one ``bf16`` (the probe alternates fp32, bf16)."""
    costs = itertools.cycle([fp32, bf16])
    state = {"t": 0.0, "ticks": 0}

    def clock():
        state["ticks"] += 1
        if state["ticks"] % 2 == 0:
            state["t"] += next(costs)
        return state["t"]

    monkeypatch.setattr(models.time, "perf_counter", clock)
    return state


@pytest.fixture(autouse=True)
def cpu(monkeypatch, tmp_path):
    monkeypatch.setenv("PERSONATUNE_CACHE", str(tmp_path))
    monkeypatch.delenv("PERSONATUNE_BF16", raising=False)
    monkeypatch.setattr(models, "cpu_supports_bf16", lambda: True)


@pytest.mark.parametrize(
    ("fp32", "bf16", "wins"), [(1.0, 0.4, True), (1.0, 0.9, False), (1.0, 1.5, False)]
)
def test_bf16_is_used_only_when_measured_faster(monkeypatch, fp32, bf16, wins):
    """Guards against bf16 autocast on a CPU where it is slower (or under 20% faster,
    within the noise of a shared machine), as the flag check chose it."""
    scripted_clock(monkeypatch, fp32, bf16)
    assert models.use_bf16(torch.device("cpu")) is wins


def test_the_verdict_is_cached_per_cpu(monkeypatch):
    """Guards against every command paying for the probe again."""
    state = scripted_clock(monkeypatch, 1.0, 0.4)
    assert models.cpu_bf16_wins() is True
    assert state["ticks"] > 0
    again = scripted_clock(monkeypatch, 1.0, 2.0)
    assert models.cpu_bf16_wins() is True and again["ticks"] == 0


def test_no_native_bf16_or_an_override_skips_the_probe(monkeypatch):
    state = scripted_clock(monkeypatch, 1.0, 0.1)
    monkeypatch.setattr(models, "cpu_supports_bf16", lambda: False)
    assert models.use_bf16(torch.device("cpu")) is False
    monkeypatch.setattr(models, "cpu_supports_bf16", lambda: True)
    monkeypatch.setenv("PERSONATUNE_BF16", "0")
    assert models.use_bf16(torch.device("cpu")) is False
    monkeypatch.setenv("PERSONATUNE_BF16", "1")
    assert models.use_bf16(torch.device("cpu")) is True
    assert state["ticks"] == 0
