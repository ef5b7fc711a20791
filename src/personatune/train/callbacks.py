"""Trainer callbacks: the per-step JSONL log and a rich progress bar with an ETA."""

from __future__ import annotations

import json
import time
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from transformers import TrainerCallback

from personatune.io import read_jsonl, write_jsonl

LOG_KEYS = ("loss", "learning_rate", "grad_norm", "eval_loss")


class JsonlLogCallback(TrainerCallback):
    """Append one JSON line per logged step to ``path``: step, epoch, loss, learning rate,
    grad norm (L2, before clipping), eval loss when evaluated, and wall time in seconds
    since the run started. Only the main process writes."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.start = time.time()

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not state.is_world_process_zero or not logs:
            return
        row = {k: float(logs[k]) for k in LOG_KEYS if k in logs}
        if not row:
            return
        row = {
            "step": state.global_step,
            "epoch": round(state.epoch or 0, 4),
            **row,
            "time_s": round(time.time() - self.start, 2),
        }
        with self.path.open("a") as f:
            f.write(json.dumps(row) + "\n")


def trim_log(path: Path, last_step: int) -> None:
    """Drop log lines after ``last_step``, so a resumed run does not log steps twice."""
    if path.exists():
        write_jsonl(path, [r for r in read_jsonl(path) if r["step"] <= last_step])


class RichProgressCallback(TrainerCallback):
    """A progress bar over optimizer steps with the latest loss and an ETA. When the
    console is not a terminal (CI, a pipe), a plain line is printed every 10% instead."""

    def __init__(self, console: Console | None = None):
        self.console = console or Console(stderr=True)
        self.progress = None  # the task, start time and first step are set with it

    def on_train_begin(self, args, state, control, **kwargs):
        if not state.is_world_process_zero:
            return
        self.progress = Progress(
            TextColumn("[bold]training"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("loss {task.fields[loss]}"),
            TextColumn("ETA"),
            TimeRemainingColumn(),
            console=self.console,
            transient=False,
        )
        self.task = self.progress.add_task("train", total=state.max_steps, loss="-")
        self.progress.start()
        self.start, self.first_step = time.time(), state.global_step

    def on_step_end(self, args, state, control, **kwargs):
        if self.progress:
            self.progress.update(self.task, completed=state.global_step)

    def on_log(self, args, state, control, logs=None, **kwargs):
        # The step's loss arrives here, after on_step_end, so the plain line prints here.
        if not self.progress or not logs or "loss" not in logs:
            return
        loss = logs["loss"]
        self.progress.update(self.task, loss=f"{loss:.3f}")
        tenth = max(1, state.max_steps // 10)
        if not self.console.is_terminal and state.global_step % tenth == 0:
            done = state.global_step - self.first_step
            eta = (time.time() - self.start) / max(done, 1) * (state.max_steps - state.global_step)
            self.console.print(
                f"step {state.global_step}/{state.max_steps} loss {loss:.3f} ETA {eta:.0f}s",
                soft_wrap=True,
            )

    def on_train_end(self, args, state, control, **kwargs):
        if self.progress:
            self.progress.stop()
            self.progress = None
