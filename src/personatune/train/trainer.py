"""``personatune train``: build a peft LoRA model and a transformers Trainer, run it, and
write the persona directory."""

from __future__ import annotations

import importlib.util
import inspect
import platform
import time
from dataclasses import dataclass
from pathlib import Path

import peft
import torch
import transformers
from accelerate import PartialState
from peft import LoraConfig, get_peft_model
from rich.console import Console
from transformers import (
    DataCollatorForSeq2Seq,
    DataCollatorWithFlattening,
    Trainer,
    TrainingArguments,
    set_seed,
)
from transformers.trainer_callback import PrinterCallback

from personatune import __version__, patches
from personatune.config import PersonaSpec, dump_spec
from personatune.data.chat import ensure_chat_template
from personatune.data.dataset import PreparedData, data_files, heldout_rows, prepare_data
from personatune.errors import PersonatuneError
from personatune.io import (
    files_hash,
    partial_dir,
    publish,
    read_json,
    write_json,
    write_jsonl,
    write_text,
)
from personatune.models import (
    ModelRef,
    load_model,
    load_tokenizer,
    pick_device,
    resolve_ref,
    use_bf16,
)
from personatune.persona import CHECKPOINTS, HELDOUT, MANIFEST, SPEC, TRAIN_LOG
from personatune.train.callbacks import JsonlLogCallback, RichProgressCallback, trim_log
from personatune.train.guard import GateFailed, Guard, GuardCallback
from personatune.train.output import (
    check_output,
    check_runnable,
    discard_unfinished,
    latest_checkpoint,
    prepare_output,
)
from personatune.train.search import search
from personatune.train.threads import ThreadProbe


def lora_model(spec: PersonaSpec, model, autocast_lora_inputs: bool = True):
    """Wrap ``model`` with a fresh LoRA adapter from ``spec.lora`` (peft).

    ``autocast_lora_inputs`` applies :func:`personatune.patches.autocast_lora_inputs`
    (benchmarks turn it off to measure it).

    Raises:
        PersonatuneError: a target module name matches no layer of the model.
    """
    # No KV cache in training: with a cache, transformers skips the block-diagonal mask
    # that keeps packed examples from attending to each other.
    model.config.use_cache = False
    if spec.model.quantization == "nf4" and spec.train.gradient_checkpointing:
        # Not peft's prepare_model_for_kbit_training: it also upcasts every unquantised
        # weight (embeddings, output layer, norms) to fp32, +2.2 GiB on a 7B model and
        # slower steps (benchmarks/gpu_train_speed.py), while bf16 autocast computes in
        # bf16 anyway. get_peft_model freezes the base weights.
        model.enable_input_require_grads()
    config = LoraConfig(
        r=spec.lora.r,
        lora_alpha=spec.lora.alpha,
        lora_dropout=spec.lora.dropout,
        target_modules=spec.lora.target_modules,
        task_type="CAUSAL_LM",
    )
    try:
        peft_model = get_peft_model(model, config)
    except ValueError as e:
        raise PersonatuneError(f"lora.target_modules: {e}") from None
    if autocast_lora_inputs:
        patches.autocast_lora_inputs(peft_model)
    if spec.train.fused_lora:
        patches.fuse_lora(peft_model)
    return peft_model


class PackedCollator:
    """Padding-free packing: a micro-batch becomes one row ``(1, T)`` with position ids
    restarting at every example and the example boundaries as ``cu_seq_lens_q/k``
    (transformers' ``DataCollatorWithFlattening``), so attention stays within each example.

    With ``loss_positions``, the batch also carries ``logits_to_keep``, the positions
    ``(n,)`` whose next token is trained, and ``shift_labels`` ``(1, n)``, those next
    tokens. transformers (and Liger) then apply the output layer and the cross-entropy at
    those ``n`` positions only: the same loss without logits for prompt tokens.
    """

    def __init__(self, loss_positions: bool = False):
        self.flatten = DataCollatorWithFlattening(
            return_position_ids=True, separator_id=-100, return_flash_attn_kwargs=True
        )
        self.loss_positions = loss_positions

    def __call__(self, features):
        batch = self.flatten(features)
        if self.loss_positions:
            shifted = torch.nn.functional.pad(batch["labels"][:, 1:], (0, 1), value=-100)
            keep = (shifted[0] != -100).nonzero().view(-1)
            batch["logits_to_keep"] = keep
            batch["shift_labels"] = shifted[:, keep]
        return batch


def collator(spec: PersonaSpec, tokenizer, model=None):
    """Padding-free packing (:class:`PackedCollator`) when ``train.packing``, else padding
    to the longest example of the batch. Labels are -100 off the trained tokens.

    Loss positions only (``train.fused_loss``) need ``model``, to check that its forward
    takes ``logits_to_keep``; without it every position gets logits.
    """
    if spec.train.packing:
        return PackedCollator(spec.train.fused_loss and _keeps_logits(model))
    return DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=-100)


def _keeps_logits(model) -> bool:
    if model is None:
        return False
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return "logits_to_keep" in inspect.signature(base.forward).parameters


def training_args(spec: PersonaSpec, work: Path, device: torch.device, has_eval: bool):
    """transformers ``TrainingArguments`` for ``spec``: logging every step, checkpoints
    every ``train.checkpoint_interval`` steps, bf16 autocast where :func:`use_bf16`, Liger
    kernels on CUDA where installed (``train.liger``), ``torch.compile`` if asked."""
    t = spec.train
    liger = (
        t.liger and device.type == "cuda" and importlib.util.find_spec("liger_kernel") is not None
    )
    return TrainingArguments(
        output_dir=str(work / CHECKPOINTS),
        learning_rate=t.learning_rate,
        lr_scheduler_type=t.lr_scheduler,
        warmup_steps=t.warmup_steps if t.warmup_steps else t.warmup_ratio,
        num_train_epochs=t.epochs,
        max_steps=t.max_steps,
        per_device_train_batch_size=t.batch_size,
        per_device_eval_batch_size=t.batch_size,
        gradient_accumulation_steps=t.gradient_accumulation,
        weight_decay=t.weight_decay,
        optim=t.optimizer,
        max_grad_norm=t.max_grad_norm,
        gradient_checkpointing=t.gradient_checkpointing,
        use_liger_kernel=liger,
        # Liger's own cross-entropy stays off: with fused_loss off, transformers' loss runs.
        liger_kernel_config={"fused_linear_cross_entropy": t.fused_loss, "cross_entropy": False}
        if liger
        else None,
        torch_compile=t.torch_compile,
        seed=t.seed,
        data_seed=t.seed,
        bf16=use_bf16(device),
        use_cpu=device.type == "cpu",
        logging_steps=1,
        save_strategy="steps",
        save_steps=t.checkpoint_interval,
        eval_strategy="steps" if has_eval else "no",
        eval_steps=t.checkpoint_interval,
        report_to=[],
        disable_tqdm=True,
        remove_unused_columns=False,
        dataloader_num_workers=0,
    )


def build_trainer(
    spec, model, tokenizer, data: PreparedData, work: Path, callbacks=(), varlen: bool = True
):
    """A transformers ``Trainer`` for a peft model and prepared data.

    Sets up the fast path that :func:`personatune.patches.use_varlen_attention` and
    :class:`PackedCollator` describe when packing (the attention only with ``varlen``;
    benchmarks turn it off to measure it), and the CPU thread count (``train.threads``,
    or :class:`personatune.train.threads.ThreadProbe` when 0).

    Raises:
        PersonatuneError: several GPUs visible to a single process. transformers would
            use ``torch.nn.DataParallel``, which splits a packed row across GPUs and ran
            2.8x slower than one GPU on an H200 pair (benchmarks/results/gpu_train_speed.md);
            ``accelerate launch`` gives one process per GPU (DDP).
    """
    device = next(model.parameters()).device
    probe = []
    if device.type == "cpu" and spec.train.threads:
        torch.set_num_threads(spec.train.threads)
    elif device.type == "cpu":
        dtype = torch.bfloat16 if use_bf16(device) else torch.float32
        probe = [ThreadProbe(model.config.hidden_size, dtype)]
    if spec.train.packing and varlen:
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        patches.use_varlen_attention(base)
    args = training_args(spec, work, device, bool(data.eval))
    if args.n_gpu > 1:  # transformers would wrap the model in torch.nn.DataParallel
        raise PersonatuneError(
            f"{args.n_gpu} GPUs are visible to one process: for data parallelism run "
            f"'accelerate launch --num_processes {args.n_gpu} $(which personatune) train ...', "
            "or set CUDA_VISIBLE_DEVICES=0 to train on one GPU"
        )
    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=data.train,  # a list is a map-style dataset to the DataLoader
        eval_dataset=data.eval or None,
        data_collator=collator(spec, tokenizer, model),
        # the probe last: its first-step timing runs after every other callback's
        callbacks=[JsonlLogCallback(work / TRAIN_LOG), *callbacks, *probe],
    )
    trainer.remove_callback(PrinterCallback)  # our progress bar and JSONL log replace it
    return trainer


def manifest(spec: PersonaSpec, ref: ModelRef, data: PreparedData, stats: dict) -> dict:
    """The ``persona.json`` manifest: who the persona is and how it was made."""
    return {
        "name": spec.name,
        "description": spec.description,
        "system_prompt": spec.system_prompt,
        "base_model": {
            "reference": ref.name,
            "fingerprint": ref.fingerprint(),
            "quantization": spec.model.quantization,
        },
        "data": {
            "hash": files_hash(data_files(spec)),
            "sources": [vars(s) for s in data.stats],
            "train_examples": len(data.train),
            "eval_examples": len(data.eval),
        },
        "versions": {
            "personatune": __version__,
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "peft": peft.__version__,
            "python": platform.python_version(),
        },
        "training": stats,
    }


def train(
    spec: PersonaSpec,
    *,
    overwrite: bool = False,
    resume: bool = False,
    callbacks=(),
    console: Console | None = None,
) -> Path:
    """Fine-tune a LoRA adapter for ``spec`` and write the persona directory.

    The directory holds the adapter in peft format (``adapter_model.safetensors``,
    ``adapter_config.json``), ``config.yaml`` (the resolved spec), ``train_log.jsonl``,
    ``persona.json`` and ``checkpoints/``. It appears only when training finished.

    Args:
        overwrite: replace an existing output directory or unfinished run.
        resume: continue the unfinished run from its latest checkpoint, with the same
            optimizer, scheduler, RNG and data order, so it matches an uninterrupted run.
        callbacks: extra transformers ``TrainerCallback`` objects.

    Returns:
        The persona directory.

    Raises:
        PersonatuneError: see :func:`personatune.train.output.prepare_output`, plus bad
            data, an unreachable model or impossible settings.
    """
    console = console or Console(stderr=True)
    # On CPU, accelerate joins the launcher's process group (gloo) only when asked with
    # cpu=True; without it every rank believed it was the main one and all of them emptied
    # and created the work folder at once (an intermittent FileExistsError under torchrun).
    state = PartialState(cpu=pick_device().type == "cpu")
    output = spec.output_path
    check_output(output, overwrite, resume, spec.input_paths)  # refuse before slow work
    check_runnable(spec, pick_device())
    ref, tokenizer, data = _setup_data(spec)
    work = _setup_work(spec, state, overwrite, resume)
    try:  # a run that fails before its first checkpoint leaves no work folder
        run = _run_training(spec, state, ref, tokenizer, data, work, resume, callbacks, console)
    except BaseException:
        if state.is_main_process:
            discard_unfinished(work)
        raise
    if state.is_main_process:
        stats = _run_stats(spec, state, data, run)
        try:
            _write_persona(spec, ref, data, run, stats, work, console)
        except PersonatuneError as refused:
            _search_or_raise(spec, state, work, refused, console)
        publish(work, output)
        # a --resume with no steps left trains nothing, so it has no speed to report
        speed = f"{stats['tokens_per_s']:.0f} tokens/s, " if stats["tokens_per_s"] else ""
        console.print(
            f"[green]persona written to {output}[/] "
            f"({stats['steps']} steps, {speed}effective batch {stats['effective_batch']})"
        )
    state.wait_for_everyone()
    return output


@dataclass
class _Run:
    """What a finished ``trainer.train()`` leaves for writing the persona directory."""

    model: object
    trainer: Trainer
    result: object
    device: torch.device
    checkpoint: Path | None
    seconds: float
    guard: object | None = None
    guard_cb: object | None = None
    cpu_seconds: float = 0.0


def _setup_data(spec: PersonaSpec):
    """The base model's reference, its tokenizer (chat template ensured) and the prepared
    data; raises before any folder is made when no training example is left."""
    ref = resolve_ref(spec.model.name, spec.model.revision, spec.base_dir)
    tokenizer = load_tokenizer(ref)
    ensure_chat_template(tokenizer, spec.model.chat_template)
    data = prepare_data(spec, tokenizer)
    if not data.train:
        raise PersonatuneError("no training examples left after splitting and filtering")
    return ref, tokenizer, data


def _setup_work(spec: PersonaSpec, state, overwrite: bool, resume: bool) -> Path:
    """The partial work folder (see :mod:`personatune.train.output`), made by the main
    process once the data is known to be good."""
    if state.is_main_process:
        prepare_output(spec.output_path, overwrite, resume, spec.input_paths)
    state.wait_for_everyone()
    return partial_dir(spec.output_path)


def _setup_guard(spec, state, ref, tokenizer, base, data: PreparedData, work, console):
    """Prepare the forgetting guard (preservation data, classifier, base metrics; cached)
    and add its rows to ``data.train``. Returns ``(guard, callback)``; the callback only on
    the main process, both None with ``guard.enabled`` off."""
    if not spec.guard.enabled:
        return None, None
    device = next(base.parameters()).device
    if device.type == "cpu" and spec.train.threads:  # the guard generates before training
        torch.set_num_threads(spec.train.threads)
    with state.main_process_first():
        guard = Guard.prepare(spec, ref, tokenizer, base, len(data.train), data.split, console)
    data.train += guard.rows
    return guard, GuardCallback(guard, work / TRAIN_LOG) if state.is_main_process else None


def _run_training(spec, state, ref, tokenizer, data, work, resume, callbacks, console) -> _Run:
    """Load the base model, prepare the guard, add a fresh LoRA adapter and train (from
    the latest checkpoint with ``resume``)."""
    device = pick_device() if state.num_processes == 1 else state.device
    base = load_model(ref, spec.model.quantization, device)
    guard, guard_cb = _setup_guard(spec, state, ref, tokenizer, base, data, work, console)
    set_seed(spec.train.seed)  # LoRA initialisation is random
    model = lora_model(spec, base)
    progress = [RichProgressCallback(console)] if state.is_main_process else []
    extra = [guard_cb] if guard_cb else []
    trainer = build_trainer(spec, model, tokenizer, data, work, [*progress, *extra, *callbacks])
    checkpoint = latest_checkpoint(work) if resume else None
    if checkpoint and state.is_main_process:
        trim_log(work / TRAIN_LOG, int(checkpoint.name.split("-")[-1]))
    start, start_cpu = time.time(), time.process_time()
    result = trainer.train(resume_from_checkpoint=str(checkpoint) if checkpoint else None)
    seconds = time.time() - start - (guard_cb.seconds if guard_cb else 0)
    # CPU seconds (all threads) do not grow when other jobs share the cores
    cpu_seconds = time.process_time() - start_cpu - (guard_cb.cpu_seconds if guard_cb else 0)
    return _Run(model, trainer, result, device, checkpoint, seconds, guard, guard_cb, cpu_seconds)


def _run_stats(spec: PersonaSpec, state, data: PreparedData, run: _Run) -> dict:
    """The ``training`` section of ``persona.json``: steps, seconds, trained tokens per
    second (guard evaluation time left out), loss, effective batch, device and, on CUDA,
    the peak GPU memory allocated (``peak_gpu_gib``, GiB)."""
    resumed = read_json(run.checkpoint / "trainer_state.json") if run.checkpoint else {}
    epochs_run = run.result.metrics.get("epoch", 0) - resumed.get("epoch", 0.0)
    tokens = data.train_tokens * epochs_run * state.num_processes
    return {
        "steps": run.trainer.state.global_step,
        "train_seconds": round(run.seconds, 1),
        "train_cpu_seconds": round(run.cpu_seconds, 1),
        "tokens_per_s": round(tokens / run.seconds, 1),
        "train_loss": run.result.training_loss,
        "effective_batch": spec.train.batch_size
        * spec.train.gradient_accumulation
        * state.num_processes,
        "processes": state.num_processes,
        "device": str(run.device),
        # torch.cuda.max_memory_allocated since the process started (base weights, adapter,
        # optimizer state and activations; not the CUDA context or the allocator's cache),
        # GiB; None off CUDA. benchmarks/recipes_gpu.py reads it.
        "peak_gpu_gib": round(torch.cuda.max_memory_allocated(run.device) / 2**30, 2)
        if run.device.type == "cuda"
        else None,
        "bf16_autocast": run.trainer.args.bf16,
        "resumed_from": run.checkpoint.name if run.checkpoint else None,
    }


def _write_persona(spec, ref, data, run: _Run, stats: dict, work: Path, console) -> None:
    """Write the persona directory's files into ``work``: the adapter (the gate's choice
    when the guard is on), the spec, ``persona.json`` and the held-out record.

    Raises:
        GateFailed: no checkpoint within the retention tolerance (``guard.gate`` on).
    """
    run.model.peft_config["default"].base_model_name_or_path = spec.model.name
    run.model.save_pretrained(work)
    gate = run.guard.gate(run.model, work, console) if run.guard else None
    write_text(work / SPEC, dump_spec(spec))
    info = manifest(spec, ref, data, stats)
    if run.guard:
        info["guard"] = {
            **run.guard.stats,
            "base_subset": run.guard.base_metrics,
            "eval_seconds": round(run.guard_cb.seconds, 1),
            "eval_cpu_seconds": round(run.guard_cb.cpu_seconds, 1),
            "gate": gate,
        }
    write_json(work / MANIFEST, info)
    write_jsonl(work / HELDOUT, heldout_rows(spec, data.split))
    if gate and gate["published"] is None:
        raise GateFailed(
            f"retention gate: {gate['verdict']}. Nothing was published; the "
            f"run and its gate.json are in {work}. To publish the last "
            "checkpoint anyway: personatune train SPEC --resume --no-gate"
        )


def _search_or_raise(spec, state, work: Path, refused: PersonatuneError, console) -> None:
    """After the gate refused every checkpoint: search for an adapter that passes
    (:mod:`personatune.train.search`) within ``guard.search_budget_s``, making ``work``
    its persona directory; re-raise when the refusal is not the gate's, the budget is 0,
    or several processes train (a round is a single-process run)."""
    if not isinstance(refused, GateFailed) or spec.guard.search_budget_s <= 0:
        raise refused
    if state.num_processes > 1:
        raise GateFailed(
            f"{refused}. The guard's search runs in one process: run "
            "'personatune train SPEC --resume' without accelerate launch to search"
        ) from None
    search(spec, work, refused, console)
