"""GPU training speed: personatune's training path against the plain transformers + peft
baseline, on the Qwen2.5-0.5B and Qwen2.5-7B shapes with random weights (speed and memory
do not depend on the values), LoRA bf16 and QLoRA NF4 at sequence length 1024.

The baseline is ``benchmarks/hf_peft_baseline.py`` (a copy of the shared
``../shared/bench/hf_peft_baseline.py``): a plain loop over peft LoRA r=16 / alpha=32 on
all linear layers, gradient checkpointing, bf16 autocast, sdpa, fused AdamW, random
tokens, no padding. It runs first, in the same call, and saves the random 7B weights that
the NF4 set-ups load too.

Each personatune set-up then runs in its own process (Liger patches modules process-wide)
through personatune's own code: :func:`personatune.models.load_model`,
:func:`personatune.train.trainer.lora_model` and
:func:`personatune.train.trainer.build_trainer` (a transformers ``Trainer`` with the
spec's settings), on the same random full-length rows, so every token is trained and
there is no padding, as in the baseline. LoRA r=16, alpha=32, dropout 0.05, all linear
layers, fused AdamW, lr 2e-4, like the baseline.

Measured like the baseline: 3 warm-up steps, then the mean wall time of 8 steps (CUDA
synchronised at each step's start and end); tokens/s = batch x 1024 / step time;
peak memory = ``torch.cuda.max_memory_allocated`` from before the model is loaded to the
end (weights included); MFU with the formula of ../shared/docs/GPU.md (4 x matmul
parameters + 12 x layers x 1024 x hidden per token, recomputation not counted) over the
bf16 matmul peak measured in the same call.

Each row also records what Liger patched (``liger_modules``, ``liger_forward``,
``liger_rope``) and how many decoder layers were checkpointed. ``keep_layers`` set-ups turn
checkpointing off for the last N layers, ``every_n_layers`` ones use transformers' option.

The ``7b-unsloth*`` set-ups train Unsloth (FastLanguageModel) on the same weights with the
baseline's LoRA settings and loop, all in one process (:func:`run_unsloth`); Unsloth pins
another transformers, so ``GPU_SPEED_UNSLOTH_PATH`` may give that process its own
PYTHONPATH. ``--deadline S`` starts no set-up after S seconds and gives each only the time
left (Unsloth's at most ``UNSLOTH_TIMEOUT``).

``--profile baseline,7b-lean`` also runs PROF_STEPS steps of those set-ups under
``torch.profiler`` after their timed steps and records host time in operators, device kernel
time and kernel launches per step (:func:`profile_summary`; the baseline's in its own process,
:func:`profile_baseline`).

Data-parallel scaling: the same set-up under ``accelerate launch --multi_gpu
--num_processes N benchmarks/gpu_train_speed.py --one NAME`` (one process per GPU, NCCL)
reports the tokens/s of all GPUs together, ``processes`` and the per-GPU MFU.

Usage (on a CUDA machine with bitsandbytes and liger-kernel importable)::

    python benchmarks/gpu_train_speed.py --out results_dir          # everything
    python benchmarks/gpu_train_speed.py --out d --only 0.5b-default,7b-lean --no-baseline
    python benchmarks/gpu_train_speed.py --report d/gpu_train_speed.json  # table only
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import common  # sys.path and offline Hugging Face settings, before personatune

BENCH = common.BENCH
SEQ, WARM, STEPS = 1024, 3, 8
BASELINE_PLAN = ["qwen2.5-0.5b:0:0:8:1024", "qwen2.5-7b:1:0:2:1024"]
UNSLOTH_TIMEOUT = 240  # seconds for all Unsloth set-ups of a run together


@dataclass(frozen=True)
class Setup:
    """One set-up of the benchmark.

    Attributes:
        shape: model shape, a key of hf_peft_baseline.py's ``ARCH``.
        quant: ``none`` (bf16 LoRA) or ``nf4`` (QLoRA).
        batch: micro-batch size (rows of ``SEQ`` tokens).
        settings: ``TrainSettings`` fields that differ from the defaults.
        extra: ``lora_cast`` (peft's fp32 input copy kept), ``peft_prep`` (peft's kbit
            preparation), ``keep_layers`` / ``every_n_layers`` (checkpointing variants),
            ``unsloth`` and ``skip`` (Unsloth set-ups), ``offload`` (every saved activation
            in pinned host memory, ``torch.autograd.graph.save_on_cpu``), ``lora_dropout``.
        what: what the set-up changes, for the table.
    """

    shape: str
    quant: str
    batch: int
    settings: dict
    extra: dict = field(default_factory=dict)
    what: str = ""


LEAN = {"packing": True, "liger": True, "gradient_checkpointing": True}
DEFAULT = {"packing": True, "liger": True, "gradient_checkpointing": False}
NOPACK = dict(LEAN, packing=False)
LEVERS_OFF = {"packing": False, "fused_loss": False, "liger": False, "gradient_checkpointing": True}
LIGER = {"packing": False, "liger": True, "gradient_checkpointing": True}


def small(batch: int, settings: dict, what: str, **extra) -> Setup:
    """A Qwen2.5-0.5B bf16 LoRA set-up."""
    return Setup("qwen2.5-0.5b", "none", batch, settings, extra, what)


def big(batch: int, settings: dict, what: str, **extra) -> Setup:
    """A Qwen2.5-7B NF4 QLoRA set-up."""
    return Setup("qwen2.5-7b", "nf4", batch, settings, extra, what)


def unsloth(batch: int, what: str, **extra) -> Setup:
    """An Unsloth set-up on the 7B NF4 weights (``skip``: layers not checkpointed)."""
    return big(batch, {}, what, unsloth=True, **extra)


SETUPS = {
    "0.5b-plain": small(
        8,
        LEVERS_OFF,
        "personatune path, levers off, checkpointing (the baseline's settings)",
        lora_cast=True,
    ),
    "0.5b-liger": small(8, LIGER, "+ Liger kernels and fused linear cross-entropy", lora_cast=True),
    "0.5b-nocast": small(8, LIGER, "+ LoRA inputs left to autocast (no fp32 copy)"),
    "0.5b-packed": small(8, LEAN, "+ packing, FlashAttention varlen"),
    "0.5b-default": small(8, DEFAULT, "+ no checkpointing (personatune defaults)"),
    "0.5b-nopack": small(
        8, dict(DEFAULT, packing=False), "personatune defaults, padding collator instead of packing"
    ),
    "0.5b-default-b16": small(16, DEFAULT, "personatune defaults, batch 16"),
    "0.5b-default-b32": small(32, DEFAULT, "personatune defaults, batch 32"),
    "7b-peftprep": big(
        2,
        LEVERS_OFF,
        "personatune path with peft's kbit prep (fp32 upcast), levers off",
        peft_prep=True,
    ),
    "7b-lean": big(2, LEAN, "no fp32 upcast, Liger, packing + varlen, checkpointing"),
    "7b-lean-b4": big(4, LEAN, "as 7b-lean, batch 4"),
    "7b-lean-b8": big(8, LEAN, "as 7b-lean, batch 8"),
    "7b-lean-b12": big(12, LEAN, "as 7b-lean, batch 12"),
    "7b-lean-b16": big(16, LEAN, "as 7b-lean, batch 16"),
    "7b-nopack-b8": big(8, NOPACK, "as 7b-lean-b8 with the padding collator"),
    "7b-every2": big(2, LEAN, "as 7b-lean, checkpointing every 2nd layer", every_n_layers=2),
    "7b-nogc": big(2, DEFAULT, "personatune defaults, no checkpointing"),
    "7b-nopack-b16": big(16, NOPACK, "as 7b-lean-b16 with the padding collator"),
    "0.5b-compile": small(
        8, dict(DEFAULT, packing=False, torch_compile=True), "0.5b-nopack + torch.compile"
    ),
    "0.5b-compile-b16": small(
        16,
        dict(DEFAULT, packing=False, torch_compile=True),
        "0.5b-nopack + torch.compile, batch 16",
    ),
    "0.5b-nopack-b16": small(
        16, dict(DEFAULT, packing=False), "personatune defaults, padding collator, batch 16"
    ),
    "7b-compile-b8": big(8, dict(NOPACK, torch_compile=True), "7b-nopack-b8 + torch.compile"),
    "7b-nopack": big(2, NOPACK, "as 7b-lean with the padding collator"),
    "7b-every3": big(2, LEAN, "as 7b-lean, checkpointing every 3rd layer", every_n_layers=3),
    "7b-keep2": big(2, LEAN, "as 7b-lean, last 2 of 28 layers not checkpointed", keep_layers=2),
    "7b-keep3": big(2, LEAN, "as 7b-lean, last 3 of 28 layers not checkpointed", keep_layers=3),
    "7b-keep6-b4": big(
        4, LEAN, "as 7b-lean-b4, last 6 of 28 layers not checkpointed", keep_layers=6
    ),
    "7b-keep2-b8": big(
        8, NOPACK, "as 7b-nopack-b8, last 2 of 28 layers not checkpointed", keep_layers=2
    ),
    "7b-nopack-b20": big(20, NOPACK, "as 7b-nopack-b16, batch 20"),
    # Unsloth (FastLanguageModel, its own fused QLoRA kernels and "unsloth" checkpointing that
    # offloads layer inputs to host memory) on the same random NF4 weights with the baseline's
    # LoRA r=16 / alpha=32 / dropout 0.05 on the 7 linear layers, fused AdamW, lr 2e-4 and the
    # baseline's plain loop. All unsloth set-ups of a run share one process (one import, one
    # model load): see run_unsloth.
    "7b-unsloth": unsloth(2, "Unsloth FastLanguageModel, its checkpointing, baseline's loop"),
    "7b-unsloth-b8": unsloth(8, "as 7b-unsloth, batch 8"),
    "7b-unsloth-b16": unsloth(16, "as 7b-unsloth, batch 16"),
    "7b-unsloth-skip7": unsloth(
        2,
        "as 7b-unsloth, 7 of 28 layers not checkpointed (Unsloth's checkpoint_skip_layers)",
        skip=7,
    ),
    "7b-unsloth-skip14": unsloth(2, "as 7b-unsloth, 14 of 28 layers not checkpointed", skip=14),
    "7b-unsloth-nogc": unsloth(2, "as 7b-unsloth, no layer checkpointed", skip="max"),
    "7b-unsloth-skip8-b4": unsloth(
        4, "as 7b-unsloth, batch 4, 8 of 28 layers not checkpointed", skip=8
    ),
    "7b-unsloth-skip4-b8": unsloth(
        8, "as 7b-unsloth, batch 8, 4 of 28 layers not checkpointed", skip=4
    ),
    "7b-unsloth-nogc-b4": unsloth(4, "as 7b-unsloth, batch 4, no layer checkpointed", skip="max"),
    "7b-nopack-every2": big(
        2, NOPACK, "as 7b-nopack, checkpointing every 2nd layer", every_n_layers=2
    ),
    "7b-nopack-keep6-b4": big(4, NOPACK, "as 7b-keep6-b4 with the padding collator", keep_layers=6),
    # Lean-mode attempts of this call (issue 14): activations offloaded instead of
    # recomputed, and fewer kernels per LoRA layer.
    "7b-nopack-offload": big(
        2,
        dict(NOPACK, gradient_checkpointing=False),
        "as 7b-nopack, no checkpointing: every saved activation offloaded to pinned "
        "host memory (torch.autograd.graph.save_on_cpu)",
        offload=True,
    ),
    "7b-nopack-fusedlora": big(
        2,
        dict(NOPACK, fused_lora=True),
        "as 7b-nopack, LoRA branch as one addmm into the base output (no clone, "
        "scale or add kernels)",
    ),
    "7b-nopack-nodrop": big(
        2,
        NOPACK,
        "as 7b-nopack, LoRA dropout 0 (peft skips the dropout kernels)",
        lora_dropout=0.0,
    ),
}


# The shape for checking this script on a CPU (GPU_SPEED_SMOKE=1); not a benchmark shape.
SMOKE = {**common.TINY, "vocab_size": 1000, "tie_word_embeddings": True}


def device():
    import torch

    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def model_dir(shape: str) -> Path:
    """The random-weight model folder for ``shape``, saved like hf_peft_baseline.py does
    (same config, ``torch.manual_seed(0)``, same path), built if missing."""
    import torch
    from hf_peft_baseline import ARCH
    from transformers import AutoModelForCausalLM, Qwen2Config

    path = Path(f"/tmp/rand-{shape}")
    if not (path / "config.json").exists():
        arch = SMOKE if os.environ.get("GPU_SPEED_SMOKE") else ARCH[shape]
        cfg = Qwen2Config(**arch, **common.QWEN_CONFIG, torch_dtype="bfloat16")
        torch.manual_seed(0)
        with torch.device(device()):
            m = AutoModelForCausalLM.from_config(cfg, torch_dtype=torch.bfloat16)
        m.save_pretrained(path)
        del m
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    return path


def profile_summary(prof, steps: int) -> dict:
    """Per training step, from a ``torch.profiler`` run over ``steps`` steps: host time
    inside PyTorch operators and CUDA runtime calls (sum of self CPU time), device time
    (sum of self CUDA time of kernels and copies) and kernel launches, in milliseconds
    and counts."""
    from torch.autograd import DeviceType

    host = device = launches = 0.0
    for e in prof.key_averages():
        # A CPU operator's self device time repeats its kernels' own: count kernels only.
        if getattr(e, "device_type", None) == DeviceType.CUDA:
            device += e.self_device_time_total
        else:
            host += e.self_cpu_time_total
        if "LaunchKernel" in e.key:
            launches += e.count
    return {
        "profiled_steps": steps,
        "host_op_ms_per_step": round(host / 1e3 / steps, 1),
        "device_ms_per_step": round(device / 1e3 / steps, 1),
        "kernel_launches_per_step": int(launches / steps),
    }


PROF_STEPS = 3


def profiler():
    """A ``torch.profiler.profile`` of host operators and CUDA kernels."""
    import torch

    acts = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
    return torch.profiler.profile(activities=acts)


def run_one(name: str, peak_flops: float | None, profile: bool = False) -> dict:
    """Train set-up ``name`` for WARM + STEPS steps in this process; return its row.
    With ``profile``, PROF_STEPS more steps run under ``torch.profiler`` after the timed
    ones (:func:`profile_summary`; their wall time is ``profiled_wall_ms_per_step``)."""
    import torch
    from transformers import TrainerCallback, set_seed

    from personatune.config import (
        DataSource,
        LoraSettings,
        ModelSettings,
        PersonaSpec,
        TrainSettings,
    )
    from personatune.data.dataset import PreparedData
    from personatune.models import load_model, resolve_ref
    from personatune.train.trainer import build_trainer, lora_model

    setup = SETUPS[name]
    shape, quant, batch = setup.shape, setup.quant, setup.batch
    fields, extra = setup.settings, setup.extra
    path = model_dir(shape)
    spec = PersonaSpec(
        name="bench",
        data=[DataSource(path="random")],
        model=ModelSettings(name=str(path), quantization=quant),
        lora=LoraSettings(r=16, alpha=32, dropout=extra.get("lora_dropout", 0.05)),
        train=TrainSettings(
            learning_rate=2e-4,
            batch_size=batch,
            gradient_accumulation=1,
            max_steps=WARM + STEPS + (PROF_STEPS if profile else 0),
            max_seq_length=SEQ,
            warmup_steps=1,
            optimizer="adamw_torch_fused",
            checkpoint_interval=10**6,
            **fields,
        ),
    )
    from accelerate import PartialState

    state = PartialState()  # one process, or one per GPU under accelerate launch / torchrun
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    base = load_model(resolve_ref(str(path)), quant, state.device)
    if extra.get("peft_prep"):
        from peft import prepare_model_for_kbit_training

        base = prepare_model_for_kbit_training(base, use_gradient_checkpointing=True)
    set_seed(0)
    model = lora_model(spec, base, autocast_lora_inputs=not extra.get("lora_cast"))
    g = torch.Generator().manual_seed(0)
    rows = []
    for _ in range(batch * (WARM + STEPS)):
        ids = torch.randint(0, base.config.vocab_size, (SEQ,), generator=g).tolist()
        rows.append({"input_ids": ids, "labels": ids})

    class KeepLayers(TrainerCallback):
        """Turns checkpointing off for the last ``keep_layers`` decoder layers once the
        Trainer has switched it on (in ``train()``, before ``on_train_begin``)."""

        def on_train_begin(self, args, state, control, model=None, **kw):
            from transformers.modeling_layers import GradientCheckpointingLayer

            layers = [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]
            for layer in layers[len(layers) - extra["keep_layers"] :]:
                layer.gradient_checkpointing = False

    class Profile(TrainerCallback):
        """torch.profiler over the PROF_STEPS steps after the timed ones."""

        def on_step_begin(self, args, state, control, **kw):
            if state.global_step == WARM + STEPS:
                self.prof = profiler()
                self.prof.__enter__()

        def on_step_end(self, args, state, control, **kw):
            if state.global_step == WARM + STEPS + PROF_STEPS:
                common.sync()
                self.prof.__exit__(None, None, None)

    timer = common.step_timer()
    callbacks = [timer, KeepLayers()] if extra.get("keep_layers") else [timer]
    prof = Profile() if profile else None
    if prof:
        callbacks.append(prof)
    work = Path(tempfile.mkdtemp(prefix=f"gpu-speed-{name}-"))
    trainer = build_trainer(
        spec, model, common.pad_tokenizer(), PreparedData(rows, [], []), work, callbacks
    )
    if "every_n_layers" in extra:
        trainer.args.activation_checkpointing_kwargs = {
            "use_reentrant": False,
            "every_n_layers": extra["every_n_layers"],
        }
    if extra.get("offload"):
        step = trainer.training_step

        def offloaded(*a, **kw):
            with torch.autograd.graph.save_on_cpu(pin_memory=True):
                return step(*a, **kw)

        trainer.training_step = offloaded
    result = trainer.train()
    step_s = sum(timer.times[WARM : WARM + STEPS]) / STEPS
    prof_row = {}
    if prof:
        prof_row = profile_summary(prof.prof, PROF_STEPS)
        prof_row["profiled_wall_ms_per_step"] = round(
            1e3 * sum(timer.times[WARM + STEPS :]) / PROF_STEPS, 1
        )
        prof_row["timed_wall_ms_per_step"] = round(1e3 * step_s, 1)
    from transformers.modeling_layers import GradientCheckpointingLayer

    layers = [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]
    tok_s = state.num_processes * batch * SEQ / step_s
    return {
        "setup": name,
        "model": shape,
        "quant": quant,
        "batch": batch,
        "seq": SEQ,
        "processes": state.num_processes,
        "backend": state.backend,
        **fields,
        **extra,
        "liger_applied": bool(trainer.args.use_liger_kernel),
        **liger_patches(model),
        "checkpointed_layers": f"{sum(bool(x.gradient_checkpointing) for x in layers)}/{len(layers)}",
        "attention": base.config._attn_implementation,
        "s_per_step": round(step_s, 4),
        "tokens_per_s": int(tok_s),
        "peak_mem_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2) if cuda else None,
        "mfu": round(
            tok_s * common.flops_per_token(base.config, SEQ) / peak_flops / state.num_processes, 3
        )
        if peak_flops
        else None,
        "loss": round(result.training_loss, 3),
        **({"profile": prof_row} if prof_row else {}),
    }


def profile_baseline(peak_flops: float | None) -> dict:
    """The baseline's 7B QLoRA step under ``torch.profiler``: hf_peft_baseline.py's own
    ``build`` and set-up (peft's kbit preparation with checkpointing, LoRA on all linear
    layers, fused AdamW) and loop (bf16 autocast, backward, step), WARM steps, then
    PROF_STEPS profiled. hf_peft_baseline.py stays a plain copy, so its loop is repeated
    here."""
    import torch
    from hf_peft_baseline import build
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    bs = 2
    m, cfg = build("qwen2.5-7b", True, False)
    m = prepare_model_for_kbit_training(m, use_gradient_checkpointing=True)
    m = get_peft_model(
        m,
        LoraConfig(
            r=16,
            lora_alpha=32,
            lora_dropout=0.05,
            target_modules="all-linear",
            task_type="CAUSAL_LM",
        ),
    )
    opt = torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=2e-4, fused=True)
    ids = torch.randint(0, cfg.vocab_size, (bs, SEQ), device="cuda")
    m.train()

    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = m(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    for _ in range(WARM):
        step()
    common.sync()
    t = time.perf_counter()
    with profiler() as prof:
        for _ in range(PROF_STEPS):
            step()
        common.sync()
    wall = (time.perf_counter() - t) / PROF_STEPS
    row = profile_summary(prof, PROF_STEPS)
    row["profiled_wall_ms_per_step"] = round(1e3 * wall, 1)
    return {
        "setup": "baseline-profile",
        "model": "qwen2.5-7b",
        "quant": "nf4",
        "batch": bs,
        "profile": row,
    }


def liger_patches(model) -> dict:
    """What Liger really patched on the model: its RMSNorm / SwiGLU modules (renamed
    ``Liger*`` in place), the causal-LM forward (fused linear cross-entropy) and the
    module-level rotary embedding of the model's transformers module."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    names = [m._get_name() for m in base.modules()]
    fwd = getattr(base.forward, "__func__", base.forward)
    modeling = sys.modules.get(type(base).__module__)
    rope = getattr(modeling, "apply_rotary_pos_emb", None)
    return {
        "liger_modules": {n: names.count(n) for n in sorted(set(names)) if n.startswith("Liger")},
        "liger_forward": getattr(fwd, "__module__", ""),
        "liger_rope": getattr(rope, "__module__", None),
    }


def check_varlen() -> dict:
    """Packed logits with the varlen attention against each example run alone (sdpa), on
    the 0.5B shape in bf16: max |difference| relative to max |logit|."""
    import torch

    from personatune.models import load_model, resolve_ref
    from personatune.patches import _torch_varlen, use_varlen_attention
    from personatune.train.trainer import PackedCollator

    model = load_model(resolve_ref(str(model_dir("qwen2.5-0.5b"))), "none", device()).eval()
    g = torch.Generator().manual_seed(1)
    rows = [
        {"input_ids": torch.randint(0, model.config.vocab_size, (n,), generator=g).tolist()}
        for n in (100, 300, 37)
    ]
    batch = {
        k: (v.to(device()) if hasattr(v, "to") else v)
        for k, v in PackedCollator()(rows).items()
        if k != "labels"
    }
    with torch.no_grad():
        alone = torch.cat(
            [model(input_ids=torch.tensor([r["input_ids"]], device=device())).logits for r in rows],
            dim=1,
        ).float()
        use_varlen_attention(model)
        packed = model(**batch).logits.float()
    diff = (packed - alone).abs().max().item()
    return {
        "torch_varlen_kernel": _torch_varlen() is not None,
        "max_abs_diff": diff,
        "rel_to_max_logit": diff / alone.abs().max().item(),
    }


def run_unsloth(names: list[str], peak_flops: float | None) -> None:
    """Train the Unsloth set-ups ``names`` (same model shape) in this process, one after the
    other on one model load, and print one row per set-up.

    Unsloth must be imported before transformers and peft, and its package pins another
    transformers than personatune's (``GPU_SPEED_UNSLOTH_PATH`` in :func:`run_all` gives this
    process its own PYTHONPATH). The random NF4 weights are the baseline's folder, beside a
    one-token tokenizer (Unsloth loads one with the model). The loop is the baseline's: bf16
    autocast, ``model(input_ids, labels).loss``, backward, fused AdamW, no gradient clipping;
    fresh random full-length rows each step. Peak memory of the first set-up counts from
    before the model loads, of each later one from the start of its own steps (weights,
    adapter and optimizer state included)."""
    from importlib.metadata import version

    import torch
    import unsloth  # noqa: F401 - first, so that it patches transformers and peft
    from unsloth import FastLanguageModel

    shape = SETUPS[names[0]].shape
    path = model_dir(shape)
    tok_path = Path(f"/tmp/rand-{shape}-unsloth")
    if not tok_path.exists():
        tok_path.mkdir()
        for f in path.iterdir():
            (tok_path / f.name).symlink_to(f)
        common.pad_tokenizer().save_pretrained(tok_path)
    torch.cuda.reset_peak_memory_stats()
    model, _ = FastLanguageModel.from_pretrained(
        model_name=str(tok_path),
        max_seq_length=SEQ,
        dtype=torch.bfloat16,
        load_in_4bit=True,
        fix_tokenizer=False,
    )
    model = FastLanguageModel.get_peft_model(
        model,
        r=16,
        lora_alpha=32,
        lora_dropout=0.05,
        target_modules=[
            "q_proj",
            "k_proj",
            "v_proj",
            "o_proj",
            "gate_proj",
            "up_proj",
            "down_proj",
        ],
        bias="none",
        use_gradient_checkpointing="unsloth",
        random_state=0,
    )
    FastLanguageModel.for_training(model)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=2e-4, fused=True)
    cfg = model.config
    vers = {d: version(d) for d in ("unsloth", "unsloth_zoo", "transformers", "peft", "trl")}
    from unsloth.models._utils import find_decoder_layers, skip_checkpointing

    g = torch.Generator().manual_seed(0)
    for i, name in enumerate(names):
        batch, skip = SETUPS[name].batch, SETUPS[name].extra.get("skip")
        layers = find_decoder_layers(model)
        for layer in layers:  # undo an earlier set-up's skips
            layer.__dict__.pop("_unsloth_skip_checkpoint", None)
        if skip:
            skip_checkpointing(model, skip)
        if i:
            gc.collect()
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        times, losses = [], []
        try:
            for _ in range(WARM + STEPS):
                ids = torch.randint(0, cfg.vocab_size, (batch, SEQ), generator=g).cuda()
                common.sync()
                t0 = time.perf_counter()
                with torch.autocast("cuda", dtype=torch.bfloat16):
                    loss = model(input_ids=ids, labels=ids).loss
                loss.backward()
                opt.step()
                opt.zero_grad(set_to_none=True)
                common.sync()
                times.append(time.perf_counter() - t0)
                losses.append(loss.item())
        except Exception as e:  # noqa: BLE001 - one row with the error; the next set-up runs
            print(json.dumps({"setup": name, "error": f"{type(e).__name__}: {e}"[:1000]}))
            opt.zero_grad(set_to_none=True)
            continue
        step_s = sum(times[WARM:]) / STEPS
        tok_s = batch * SEQ / step_s
        row = {
            "setup": name,
            "model": shape,
            "quant": "nf4",
            "batch": batch,
            "seq": SEQ,
            "processes": 1,
            "unsloth": vers,
            "peak_from": "model load" if i == 0 else "own steps",
            "checkpointed_layers": f"{sum(bool(x.gradient_checkpointing) for x in layers)}/{len(layers)}",
            "s_per_step": round(step_s, 4),
            "tokens_per_s": int(tok_s),
            "peak_mem_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2),
            "mfu": round(tok_s * common.flops_per_token(cfg, SEQ) / peak_flops, 3)
            if peak_flops
            else None,
            "loss": round(sum(losses) / len(losses), 3),
        }
        print(json.dumps(row), flush=True)


def _text(x) -> str:
    return x.decode(errors="replace") if isinstance(x, bytes) else (x or "")


def _run(cmd: list[str], env: dict, timeout: float | None = None) -> tuple[str, str, bool]:
    """Run ``cmd``: its stdout, its stderr and whether it was stopped after ``timeout``
    seconds (the output up to then)."""
    try:
        proc = subprocess.run(
            cmd, capture_output=True, text=True, env=env, check=False, timeout=timeout
        )
    except subprocess.TimeoutExpired as e:
        return _text(e.stdout), _text(e.stderr), True
    return proc.stdout, proc.stderr, False


def run_all(
    out: Path,
    names: list[str],
    baseline: bool,
    deadline: float | None = None,
    profile: tuple[str, ...] = (),
) -> dict:
    """Baseline first (only the model shapes that ``names`` use), then each set-up in its
    own process (the Unsloth ones together in one). With ``deadline`` (seconds from the
    start), a set-up gets only the time left and none starts with under 20 s left.
    ``profile``: set-ups (and ``baseline``, in its own process after the baseline) that
    also run PROF_STEPS profiled steps (rows' ``profile``; ``rows["baseline_profile"]``)."""
    import torch

    t_start = time.time()
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    peak = common.matmul_peak("cuda")
    info = common.machine_info(
        ("transformers", "peft", "bitsandbytes", "liger-kernel", "accelerate")
    )
    info["bf16_matmul_tflops"] = round(peak / 1e12, 1)
    rows = {"machine": info, "baseline": [], "setups": []}
    try:
        rows["varlen_check"] = check_varlen()
    except Exception as e:  # noqa: BLE001 - recorded; the timings still run
        rows["varlen_check"] = {"error": f"{type(e).__name__}: {e}"[:500]}
    print(json.dumps({"varlen_check": rows["varlen_check"]}), flush=True)
    gc.collect()
    torch.cuda.empty_cache()
    logs = []
    if baseline:
        shapes = {SETUPS[n].shape for n in names}
        plan = [p for p in BASELINE_PLAN if p.split(":")[0] in shapes] or BASELINE_PLAN
        t = time.time()
        stdout, stderr, _ = _run([sys.executable, str(BENCH / "hf_peft_baseline.py"), *plan], env)
        rows["baseline_wall_s"] = round(time.time() - t, 1)
        print(stdout[-3000:], stderr[-2000:], flush=True)
        for line in stdout.splitlines():
            if line.startswith("{") and '"model"' in line:
                rows["baseline"].append(json.loads(line))
        if "baseline" in profile:
            cmd = [sys.executable, __file__, "--profile-baseline", "--peak", str(peak)]
            stdout, stderr, late = _run(cmd, env, 180)
            got = [x for x in stdout.splitlines() if x.startswith('{"setup"')]
            rows["baseline_profile"] = (
                {"error": "timeout after 180 s"}
                if late
                else (json.loads(got[-1]) if got else {"error": stderr[-1500:]})
            )
            print(json.dumps(rows["baseline_profile"]), flush=True)
    unsloth = [n for n in names if SETUPS[n].extra.get("unsloth")]
    groups = [[n] for n in names if n not in unsloth]
    if unsloth:
        groups.insert(names.index(unsloth[0]), unsloth)  # where the first one was asked for
    for group in groups:
        t = time.time()
        left = deadline - (t - t_start) if deadline else None
        if left is not None and left < 20:
            for n in group:
                rows["setups"].append({"setup": n, "error": "skipped: deadline"})
            continue
        is_us = bool(SETUPS[group[0]].extra.get("unsloth"))
        genv = dict(env)
        if is_us and os.environ.get("GPU_SPEED_UNSLOTH_PATH"):
            genv["PYTHONPATH"] = os.environ["GPU_SPEED_UNSLOTH_PATH"]
        if is_us:  # import, compilation and model load: capped so that the rest still runs
            left = min(left, UNSLOTH_TIMEOUT) if left is not None else UNSLOTH_TIMEOUT
        cmd = [sys.executable, __file__, "--unsloth" if is_us else "--one", ",".join(group)]
        if not is_us and group[0] in profile:
            cmd.append("--profile")
        stdout, stderr, late = _run([*cmd, "--peak", str(peak)], genv, left)
        if late:
            stderr += f"\ntimeout after {left:.0f} s"
        logs.append(f"===== {','.join(group)}\n{stderr[-6000:]}\n")
        got = {}
        for x in stdout.splitlines():
            if x.startswith('{"setup"'):
                r = json.loads(x)
                got[r["setup"]] = r
        for n in group:
            row = got.get(n) or {"setup": n, "error": (stderr or stdout)[-1500:]}
            row["wall_s"] = round(time.time() - t, 1)
            print(json.dumps(row), flush=True)
            rows["setups"].append(row)
        common.write_json(out / "gpu_train_speed.json", rows)
        common.write_markdown(out / "setup_logs.txt", "".join(logs))
    rows["total_wall_s"] = round(time.time() - t_start, 1)
    common.write_json(out / "gpu_train_speed.json", rows)
    return rows


def report(rows: dict) -> str:
    """A markdown table: baseline rows, then each set-up with its ratio to the baseline of
    the same model and quantization measured in the same call."""
    base = {(b["model"], b["quant"]): b for b in rows["baseline"] if "tokens_per_s" in b}
    machine = rows["machine"]
    rest = [f"{k} {v}" for k, v in machine.items() if k not in ("gpu", "bf16_matmul_tflops")]
    head = ["set-up", "model", "weights", "batch x seq", "tokens/s", "x baseline", "peak GiB"]
    head += ["MFU", "what changes"]
    out = [
        f"varlen check: {rows.get('varlen_check')}",
        "",
        f"GPU: {machine.get('gpu')}, bf16 matmul peak {machine.get('bf16_matmul_tflops')} "
        f"TFLOP/s; " + ", ".join(rest),
        "",
        common.markdown_table(head, []),  # the header; rows follow
    ]
    # the baseline rows (no "setup" key), then the set-ups
    for r in [b for b in rows["baseline"] if "tokens_per_s" in b] + rows["setups"]:
        if "error" in r:
            error = r["error"].strip().splitlines()[-1][:120]
            out.append(f"| {r['setup']} | | | | error | | | | {error} |")
            continue
        quant = "bf16" if r["quant"] == "none" else r["quant"]
        if "setup" in r:
            b = base.get((r["model"], quant))
            ratio = f"{r['tokens_per_s'] / b['tokens_per_s']:.2f}" if b else "-"
            name, what = r["setup"], SETUPS[r["setup"]].what
        else:  # a baseline row
            name, ratio, what = "baseline", "1.00", "hf_peft_baseline.py"
        cells = [name, r["model"], quant, f"{r['batch']}x{r['seq']}", r["tokens_per_s"], ratio]
        cells += [r["peak_mem_gib"], r["mfu"], what]
        out.append("| " + " | ".join(str(c) for c in cells) + " |")
    return "\n".join(out)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, help="folder for gpu_train_speed.json/.md")
    ap.add_argument("--only", help=f"comma-separated set-ups, from: {', '.join(SETUPS)}")
    ap.add_argument("--no-baseline", action="store_true", help="skip hf_peft_baseline.py")
    ap.add_argument("--deadline", type=float, help="seconds: start no set-up after this")
    ap.add_argument("--one", help=argparse.SUPPRESS)
    ap.add_argument("--unsloth", help=argparse.SUPPRESS)
    ap.add_argument("--peak", type=float, help=argparse.SUPPRESS)
    ap.add_argument("--report", type=Path, help="print the table of a results JSON")
    ap.add_argument(
        "--profile",
        nargs="?",
        const="",
        default=None,
        help="comma-separated set-ups (and 'baseline') to profile after their timed steps",
    )
    ap.add_argument("--profile-baseline", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.profile_baseline:
        print(json.dumps(profile_baseline(args.peak)), flush=True)
        return 0
    if args.report:
        print(report(json.loads(args.report.read_text())))
        return 0
    if args.unsloth:
        run_unsloth(args.unsloth.split(","), args.peak)
        return 0
    if args.one:
        from accelerate import PartialState

        row = run_one(args.one, args.peak, profile=args.profile == "")
        if PartialState().is_main_process:
            print(json.dumps(row), flush=True)
        return 0
    if not args.out:
        ap.error("--out is required")
    names = args.only.split(",") if args.only else list(SETUPS)
    bad = [n for n in names if n not in SETUPS]
    if bad:
        ap.error(f"unknown set-up(s) {bad}")
    args.out.mkdir(parents=True, exist_ok=True)
    profile = tuple(p for p in (args.profile or "").split(",") if p)
    rows = run_all(args.out, names, not args.no_baseline, args.deadline, profile)
    md = report(rows)
    common.write_markdown(args.out / "gpu_train_speed.md", md)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
