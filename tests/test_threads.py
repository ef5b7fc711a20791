"""The CPU thread probe behind ``train.threads: 0``, on a scripted clock."""

import pytest
import torch

from personatune.train import threads


class ScriptedCPU:
    """Stands in for ``torch``'s thread setting and ``time.perf_counter``: a matmul takes
    ``cost[threads]`` seconds at the thread count set last."""

    def __init__(self, monkeypatch, cost: dict[int, float], default: int = 2):
        self.cost, self.n, self.t, self.ticks = cost, default, 0.0, 0
        monkeypatch.setattr(threads.torch, "get_num_threads", lambda: default)
        monkeypatch.setattr(threads.torch, "set_num_threads", self.set)
        monkeypatch.setattr(threads.time, "perf_counter", self.clock)

    def set(self, n):
        self.n = n

    def clock(self):
        self.ticks += 1
        if self.ticks % 2 == 0:  # every second reading ends a timed matmul
            self.t += self.cost[self.n]
        return self.t


@pytest.mark.parametrize(
    ("cost", "chosen"),
    [
        ({1: 1.0, 2: 3.0}, 1),  # busy machine: one thread wins by far
        ({1: 1.0, 2: 0.55}, 2),  # idle machine: both cores win
        ({1: 0.95, 2: 1.0}, 2),  # one thread less than 10% faster: keep the default
    ],
)
def test_probe_picks_the_faster_setting_and_restores_the_default(monkeypatch, cost, chosen):
    """Guards against a probe that keeps a slow thread count, flips on noise, or leaves
    PyTorch at whatever it measured last."""
    cpu = ScriptedCPU(monkeypatch, cost)
    n, medians = threads.probe_threads(64, torch.float32, repeats=3)
    assert n == chosen
    assert medians == pytest.approx(cost)
    assert cpu.n == 2  # the default is restored; the caller sets the choice


def test_probe_does_nothing_with_one_thread(monkeypatch):
    """With one thread there is nothing to choose (and nothing to time)."""
    cpu = ScriptedCPU(monkeypatch, {1: 1.0}, default=1)
    assert threads.probe_threads(64, torch.float32) == (1, {})
    assert cpu.ticks == 0
