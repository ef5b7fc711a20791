"""``python -m personatune``: the CLI as a module, so launchers that take a module run it
unchanged (``accelerate launch -m personatune train ...``, ``torchrun -m personatune ...``)."""

from personatune.cli import app

app(prog_name="personatune")
