"""CPU threads for training: PyTorch's default (one per physical core) or, on a busy shared
machine, one thread, chosen by a short probe before the first step."""

from __future__ import annotations

import statistics
import time

import torch
from rich.console import Console
from transformers import TrainerCallback


def probe_threads(hidden: int, dtype: torch.dtype, repeats: int = 5) -> tuple[int, dict]:
    """The faster of one thread and PyTorch's default thread count for a matmul shaped like
    a decoder MLP layer: ``(256, hidden) @ (hidden, 4 * hidden)`` in ``dtype``.

    When other processes keep the cores busy, every OpenMP parallel region waits for its
    slowest thread, and a thread that loses its core stalls the others: on the 2-core
    machine of benchmarks/train_speed.py, one thread then trained several times faster
    than two. On an idle machine all threads win. Timings alternate between the two
    settings, and all threads are kept unless one thread is at least 10% faster (median of
    ``repeats``).

    Returns:
        (threads, {threads: median seconds per matmul}).
    """
    default = torch.get_num_threads()
    if default <= 1:
        return default, {}
    a = torch.randn(256, hidden, dtype=dtype)
    b = torch.randn(hidden, 4 * hidden, dtype=dtype)
    times: dict[int, list[float]] = {1: [], default: []}
    try:
        for _ in range(repeats + 1):  # the first round warms up
            for n, ts in times.items():
                torch.set_num_threads(n)
                t = time.perf_counter()
                a @ b
                ts.append(time.perf_counter() - t)
    finally:
        torch.set_num_threads(default)
    medians = {n: statistics.median(ts[1:]) for n, ts in times.items()}
    return (1 if medians[1] < 0.9 * medians[default] else default), medians


class ThreadProbe(TrainerCallback):
    """Before the first optimizer step (``train.threads: 0`` on CPU), set PyTorch's thread
    count with :func:`probe_threads` and print the choice. Runs at the first step rather
    than at set-up, so that loading work of this or other processes is over."""

    def __init__(self, hidden: int, dtype: torch.dtype):
        self.hidden, self.dtype = hidden, dtype
        self.threads: int | None = None

    def on_step_begin(self, args, state, control, **kwargs):
        if self.threads is not None:
            return
        self.threads, medians = probe_threads(self.hidden, self.dtype)
        torch.set_num_threads(self.threads)
        if state.is_world_process_zero and medians:
            shown = ", ".join(f"{n}: {1e3 * s:.1f} ms" for n, s in medians.items())
            Console(stderr=True).print(
                f"CPU threads: {self.threads} (probe, threads: ms per matmul: {shown}; "
                "set train.threads to fix it)"
            )
