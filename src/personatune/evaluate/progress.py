"""Progress display of the evaluation phases (guard and report card): a rich bar with an
ETA, and per-phase wall-clock and CPU seconds."""

from __future__ import annotations

import time
from contextlib import contextmanager

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn


def progress_bar(console: Console) -> Progress:
    """A rich progress bar with counts and an ETA, shared by evaluation phases."""
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("ETA"),
        TimeRemainingColumn(),
        console=console,
        transient=True,
    )


@contextmanager
def phase(
    bar: Progress, name: str, total: int, timings: dict | None = None, cpu: dict | None = None
):
    """A task on ``bar`` for one phase of work; yields ``advance(n)``. Records the
    phase's wall-clock seconds in ``timings[name]`` and the process's CPU seconds (all
    threads; a measure that does not grow when other jobs share the cores) in
    ``cpu[name]``, and prints one line when it ends if the console is not a terminal
    (logs, CI), where the bar itself is not drawn."""
    task = bar.add_task(name, total=max(total, 1))
    start, start_cpu = time.time(), time.process_time()
    yield lambda n: bar.advance(task, n)
    seconds, cpu_seconds = time.time() - start, time.process_time() - start_cpu
    if timings is not None:
        timings[name] = round(seconds, 1)
    if cpu is not None:
        cpu[name] = round(cpu_seconds, 1)
    bar.remove_task(task)
    if not bar.console.is_terminal:
        bar.console.print(
            f"{name}: {total} done in {seconds:.0f} s ({cpu_seconds:.0f} CPU s)", soft_wrap=True
        )
