"""Training faults (issue 11): ``personatune train`` killed with SIGKILL at seeded random
points (while starting, mid-step, mid-checkpoint), then continued with ``--resume`` (or
started again when no checkpoint survived). The published adapter must equal an
uninterrupted run's bit for bit (CPU, fp32, one thread), and nothing half-written may
ever be published: the output directory is absent until the run finishes, and complete
whenever it is present (a watcher polls it every 10 ms through every run).
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from personatune.config import load_spec
from personatune.io import partial_dir, read_jsonl
from personatune.persona import ADAPTER_CONFIG, ADAPTER_WEIGHTS, MANIFEST, SPEC, TRAIN_LOG
from personatune.train.output import latest_checkpoint

STEPS = 6
#: What a published persona directory always holds.
COMPLETE = (ADAPTER_CONFIG, ADAPTER_WEIGHTS, SPEC, MANIFEST, TRAIN_LOG)
ENV = {**os.environ, "PERSONATUNE_BF16": "0", "PYTHONUNBUFFERED": "1"}


@pytest.fixture
def spec(tmp_path, tiny_model) -> Path:
    rows = "".join(f'"Question {i}, please","Arr, answer {i} matey!"\n' for i in range(24))
    (tmp_path / "pairs.csv").write_text("prompt,response\n" + rows)
    path = tmp_path / "persona.yaml"
    path.write_text(
        f"name: tiny\nsystem_prompt: You are a pirate.\nmodel:\n  name: {tiny_model}\n"
        "data:\n  - path: pairs.csv\noutput_dir: out\n"
        "guard:\n  enabled: false\n"  # a random model has no capability to guard
        f"train:\n  max_steps: {STEPS}\n  batch_size: 2\n  gradient_accumulation: 2\n"
        "  max_seq_length: 64\n  checkpoint_interval: 1\n  learning_rate: 0.01\n"
        "  threads: 1\n"  # one thread: the same sums in the same order, bit for bit
    )
    return path


def reference_adapter(spec: Path, monkeypatch) -> tuple[dict, list]:
    """The uninterrupted run, in this process, to another output directory."""
    from personatune.train.trainer import train

    monkeypatch.setenv("PERSONATUNE_BF16", "0")
    out = train(load_spec(spec, ["output_dir=straight"]))
    return load_file(str(out / ADAPTER_WEIGHTS)), losses(out)


def losses(out: Path) -> list[float]:
    return [r["loss"] for r in read_jsonl(out / TRAIN_LOG) if "loss" in r]


class Watcher(threading.Thread):
    """Polls the output directory: whenever it exists, every file of COMPLETE must."""

    def __init__(self, out: Path):
        super().__init__(daemon=True)
        self.out, self.seen, self.bad, self.done = out, 0, [], threading.Event()

    def run(self) -> None:
        while not self.done.is_set():
            if self.out.exists():
                self.seen += 1
                missing = [f for f in COMPLETE if not (self.out / f).exists()]
                if missing and self.out.exists():
                    self.bad.append(missing)
            time.sleep(0.01)


def kill_at(proc: subprocess.Popen, work: Path, point: tuple[str, float, float]) -> bool:
    """SIGKILL ``proc`` at ``point``: ``("time", s, 0)`` s seconds after it started, or
    ``("step", n, pause)`` pause seconds after ``checkpoint-n`` appears (a pause of up to
    0.3 s lands the kill during or after the save). False if the run ended first."""
    kind, value, pause = point
    deadline = time.monotonic() + 600
    start = time.monotonic()
    while proc.poll() is None and time.monotonic() < deadline:
        if kind == "time" and time.monotonic() - start >= value:
            break
        if kind == "step" and (work / "checkpoints" / f"checkpoint-{int(value)}").exists():
            time.sleep(pause)
            break
        time.sleep(0.005)
    if proc.poll() is not None:
        return False
    proc.send_signal(signal.SIGKILL)
    proc.wait(60)
    return True


def run_with_kills(spec: Path, points: list[tuple[str, float, float]]) -> dict:
    """Train with a SIGKILL at each point in turn, resuming (or restarting when no
    checkpoint is left) after each, then once more to the end. Returns what happened."""
    out = load_spec(spec).output_path
    work = partial_dir(out)
    watcher = Watcher(out)
    watcher.start()
    log = {"kills": 0, "resumes": 0, "restarts": 0}
    try:
        for point in [*points, None]:
            resume = latest_checkpoint(work) is not None
            log["resumes" if resume else "restarts"] += 1
            assert not out.exists(), "published before the run finished"
            cmd = [sys.executable, "-m", "personatune", "train", str(spec)]
            err = spec.parent / f"train{sum(log.values())}.log"
            with err.open("w") as f:  # a file, not a pipe that could fill and stall it
                proc = subprocess.Popen(
                    [*cmd, *(["--resume"] if resume else [])],
                    stdout=subprocess.DEVNULL,
                    stderr=f,
                    env=ENV,
                )
            if point is not None and kill_at(proc, work, point):
                log["kills"] += 1
                if out.exists():  # the kill landed after the publishing rename, before exit
                    log["killed_after_publish"] = 1
                    break
                continue
            assert proc.wait(600) == 0, err.read_text()[-3000:]
            break
    finally:
        watcher.done.set()
        watcher.join(10)
    assert not watcher.bad, f"a half-written persona was visible: {watcher.bad[:3]}"
    assert watcher.seen > 0 or out.exists()
    assert not work.exists(), "the work folder outlived the finished run"
    assert not list(out.parent.glob(f".{out.name}.old*"))
    return {**log, "out": out}


def assert_same_adapter(out: Path, reference: tuple[dict, list]) -> None:
    weights, ref_losses = reference
    got = load_file(str(out / ADAPTER_WEIGHTS))
    assert got.keys() == weights.keys()
    for k in weights:
        assert torch.equal(got[k], weights[k]), f"{k} differs after resume"
    assert losses(out) == ref_losses  # the log too, step by step, bit for bit


def test_sigkill_after_a_checkpoint_then_resume(spec, monkeypatch):
    """One SIGKILL right after a checkpoint appears: --resume must publish the adapter
    an uninterrupted run publishes, bit for bit (the unit-tier version)."""
    reference = reference_adapter(spec, monkeypatch)
    result = run_with_kills(spec, [("step", 3, 0.1)])
    assert result["kills"] == 1 and result["resumes"] == 1
    assert_same_adapter(result["out"], reference)


@pytest.mark.integration
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_sigkill_at_random_points_then_resume(spec, monkeypatch, seed):
    """Four SIGKILLs at seeded random points of one run (while starting, and after random
    checkpoints, inside or around the save), each followed by --resume or a restart."""
    rng = random.Random(seed)
    steps = sorted(rng.sample(range(1, STEPS), 3))
    points = [("time", rng.uniform(0.5, 8.0), 0)]
    points += [("step", s, rng.uniform(0, 0.3)) for s in steps]
    reference = reference_adapter(spec, monkeypatch)
    result = run_with_kills(spec, points)
    print(f"\nseed {seed}: kill points {points}: {result}")
    assert result["kills"] >= 3, result
    assert_same_adapter(result["out"], reference)
