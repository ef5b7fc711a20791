"""The training progress display when the console is not a terminal (CI, a pipe)."""

import io

from rich.console import Console
from transformers import TrainerControl, TrainerState, TrainingArguments

from personatune.train.callbacks import RichProgressCallback


def test_plain_progress_lines_show_each_steps_own_loss(tmp_path):
    """Guards against a loss that lags one step behind (nan at step 1, the step before's
    loss at the last step): the Trainer logs a step's loss after its on_step_end."""
    out = io.StringIO()
    bar = RichProgressCallback(Console(file=out, force_terminal=False, width=200))
    args = TrainingArguments(output_dir=str(tmp_path), report_to=[], use_cpu=True)
    state, control = TrainerState(max_steps=10), TrainerControl()
    bar.on_train_begin(args, state, control)
    for step in range(1, 11):
        state.global_step = step
        bar.on_step_end(args, state, control)
        bar.on_log(args, state, control, logs={"loss": step / 10, "learning_rate": 1e-4})
    bar.on_log(args, state, control, logs={"eval_loss": 9.0})  # not a training loss
    bar.on_train_end(args, state, control)
    lines = [line for line in out.getvalue().splitlines() if line.startswith("step ")]
    assert [line.split(" ETA")[0] for line in lines] == [
        f"step {s}/10 loss {s / 10:.3f}" for s in range(1, 11)
    ]
