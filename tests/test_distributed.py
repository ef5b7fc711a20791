"""Data-parallel training on CPU: two processes (gloo backend), the ``personatune train``
command or ``personatune.train.trainer.train``, under torchrun (DDP) and ``accelerate
launch`` (FSDP), against one process with the same effective batch. About a minute in all."""

import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from personatune.config import load_spec
from personatune.io import read_jsonl as read_log
from personatune.train.trainer import train

# Runs train() in every process that torchrun starts; CRASH_AT_STEP stops the run at that
# checkpoint (a simulated failure), RESUME=1 continues it.
DRIVER = """
import os, sys
from transformers import TrainerCallback
from personatune.config import load_spec
from personatune.train.trainer import train

crash = int(os.environ.get("CRASH_AT_STEP", "0"))

class Crash(TrainerCallback):
    def on_save(self, args, state, control, **kw):
        if state.global_step == crash:
            raise SystemExit(3)

train(load_spec(sys.argv[1], sys.argv[2:]), resume=os.environ.get("RESUME") == "1",
      callbacks=[Crash()] if crash else [])
"""
COMMON = ["guard.enabled=false", "lora.dropout=0", "train.gradient_accumulation=1"]


@pytest.fixture(autouse=True)
def fp32(monkeypatch):
    # fp32 and no dropout: the runs compare closely on any CPU.
    monkeypatch.setenv("PERSONATUNE_BF16", "0")


def torchrun(tmp_path, spec, overrides, launcher=None, cli=False, **env):
    """Runs the driver, or with ``cli`` the ``personatune train`` command as a module, in
    two processes."""
    driver = tmp_path / "driver.py"
    driver.write_text(DRIVER)
    launcher = launcher or [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
    ]
    script = ["-m", "personatune", "train"] if cli else [str(driver)]
    cmd = [*launcher, *script, str(spec), *overrides]
    full_env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "CUDA_VISIBLE_DEVICES": "",
        "HF_HUB_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
        **env,
    }
    return subprocess.run(
        cmd, env=full_env, capture_output=True, text=True, timeout=600, check=False
    )


def losses(out):
    return [r["loss"] for r in read_log(out / "train_log.jsonl") if "loss" in r]


def assert_same_adapter(a, b):
    wa, wb = (load_file(str(p / "adapter_model.safetensors")) for p in (a, b))
    assert wa.keys() == wb.keys()
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=1e-3, atol=1e-5, msg=k)


def test_two_processes_match_one_process(persona_yaml):
    """Guards against data-parallel training that differs from one process with the same
    effective batch (wrong sharding, loss scaling or token averaging), that writes from
    every process, or that reports the per-process batch as the effective batch. The two
    processes run the unchanged ``personatune train`` command (``torchrun -m personatune``)."""
    spec = persona_yaml("  max_steps: 3\n")
    one = train(load_spec(spec, [*COMMON, "train.batch_size=4", "output_dir=one"]))
    proc = torchrun(spec.parent, spec, [*COMMON, "train.batch_size=2", "output_dir=two"], cli=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    two = spec.parent / "two"

    assert_same_adapter(one, two)
    assert losses(two) == pytest.approx(losses(one), rel=1e-4)
    # one writer: each step logged once, one persona directory, no leftovers
    assert [r["step"] for r in read_log(two / "train_log.jsonl") if "loss" in r] == [1, 2, 3]
    assert not (spec.parent / ".two.partial").exists()
    training = json.loads((two / "persona.json").read_text())["training"]
    assert training["processes"] == 2 and training["effective_batch"] == 4


def test_two_process_run_resumes_from_checkpoint(persona_yaml):
    """Guards against checkpoints or resume that break under several processes (a rank
    missing its RNG state, the log written twice, a different result after resuming)."""
    spec = persona_yaml("  max_steps: 4\n")
    args = [*COMMON, "train.batch_size=2", "output_dir=two"]
    crashed = torchrun(spec.parent, spec, args, CRASH_AT_STEP="2")
    assert crashed.returncode != 0
    work = spec.parent / ".two.partial"
    assert (work / "checkpoints" / "checkpoint-2").is_dir() and not (spec.parent / "two").exists()

    resumed = torchrun(spec.parent, spec, args, RESUME="1")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    two = spec.parent / "two"
    one = train(load_spec(spec, [*COMMON, "train.batch_size=4", "output_dir=one"]))
    assert_same_adapter(one, two)
    assert losses(two) == pytest.approx(losses(one), rel=1e-4)
    assert (
        json.loads((two / "persona.json").read_text())["training"]["resumed_from"] == "checkpoint-2"
    )


def test_fsdp_under_accelerate_launch_matches_one_process(persona_yaml):
    """Guards against training that only works under DDP: FSDP (v2, decoder layers
    sharded) through ``accelerate launch -m personatune train`` must train the same
    adapter, and the main process must gather and write it."""
    spec = persona_yaml("  max_steps: 3\n")
    launcher = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--num_processes",
        "2",
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        "--use_fsdp",
        "--fsdp_version",
        "2",
        "--fsdp_auto_wrap_policy",
        "TRANSFORMER_BASED_WRAP",
        "--fsdp_transformer_layer_cls_to_wrap",
        "LlamaDecoderLayer",
        "--fsdp_state_dict_type",
        "FULL_STATE_DICT",
    ]
    proc = torchrun(
        spec.parent,
        spec,
        [*COMMON, "train.batch_size=2", "output_dir=fsdp"],
        launcher=launcher,
        cli=True,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    one = train(load_spec(spec, [*COMMON, "train.batch_size=4", "output_dir=one"]))
    fsdp = spec.parent / "fsdp"
    assert_same_adapter(one, fsdp)
    assert losses(fsdp) == pytest.approx(losses(one), rel=1e-4)
