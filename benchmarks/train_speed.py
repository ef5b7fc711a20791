"""CPU training speed: personatune's training path against the plain transformers + peft
baseline, on the pirate example (examples/pirate/persona.yaml) with the embedded model
(SmolLM2-135M-Instruct), all in one run.

Every set-up trains the same rows (``personatune.data.dataset.prepare_data``), in the same
order (seeded sampler), with the spec's LoRA and optimiser settings, for ``--steps``
optimizer steps. Each set-up runs in its own process (so peak RSS is its own), one after
another. On a machine that other jobs keep busy, ``--interleave`` starts them all and
has them take turns one optimizer step at a time, passing a baton round a ring, so that
every set-up sees the same load (but all models are in memory at once).

Set-ups, a ladder in which each adds one lever to the one before:

- ``baseline``: transformers ``Trainer`` + peft LoRA with default ``TrainingArguments``
  (fp32 on CPU, AdamW), ``DataCollatorForSeq2Seq`` padding to the longest in the batch.
  Only the spec's hyperparameters, ``logging_steps=1`` (for the loss curve) and
  ``save_strategy="no"`` are set.
- ``bf16``: personatune's path (``load_model``, ``lora_model``, ``build_trainer``) with
  packing and the fused loss off: bf16 autocast is the only change.
- ``packing``: + padding-free packing, attention through sdpa with transformers'
  block-diagonal mask.
- ``varlen``: + variable-length attention (:func:`personatune.patches.varlen_attention`).
- ``personatune``: + output layer and cross-entropy at trained positions only
  (``train.fused_loss``): personatune's defaults.
- ``threads-1``: personatune's defaults with ``train.threads=1``.
- ``baseline-t1``, ``bf16-t1``, ... ``personatune-t1``: the same ladder at one thread,
  for a machine that other jobs keep busy (``--setups``).
- ``compile``: personatune's defaults with ``train.torch_compile=true`` (``--compile``).

Reported per set-up: trained tokens/s, counting non-padding tokens only, over the steps
after the first (warm-up); its ratio to the baseline; median step time; peak RSS while
training (sampled each step) and the process's maximum RSS; MFU = tokens/s x FLOP per
token / the bf16 matmul peak measured at the start of the run, with FLOP per token =
4 x matmul parameters + 12 x layers x context x hidden (../shared/docs/GPU.md; context is
the token-weighted mean example length, since packed and padded examples attend only
within themselves); the loss curve and its largest difference from the baseline's.

Usage::

    python benchmarks/train_speed.py --steps 20            # results in benchmarks/results/
    python benchmarks/train_speed.py --steps 8 --setups baseline,compile --compile \
        --name train_speed_cpu_compile
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import queue
import statistics
import sys
import tempfile
import time
from pathlib import Path

import common  # sys.path and offline Hugging Face settings, before personatune

REPO, RESULTS = common.REPO, common.RESULTS
SPEC = REPO / "examples" / "pirate" / "persona.yaml"

NO_FUSE = ["train.fused_loss=false"]
NO_PACK = ["train.packing=false", *NO_FUSE]
#: set-up name -> (description, spec overrides, patches)
SETUPS = {
    "baseline": (
        "transformers Trainer + peft LoRA, defaults (fp32, PyTorch's threads), padding",
        [],
        [],
    ),
    "baseline-t1": ("baseline, 1 CPU thread", [], ["threads1"]),
    "bf16": ("personatune path, bf16 autocast only (no packing, full logits)", NO_PACK, []),
    "packing": ("+ padding-free packing, sdpa block-diagonal mask", NO_FUSE, ["no_varlen"]),
    "varlen": ("+ variable-length attention", NO_FUSE, []),
    "personatune": ("personatune defaults (threads by probe)", [], []),
    "threads-1": ("personatune defaults, train.threads=1", ["train.threads=1"], []),
    "compile": ("personatune defaults, train.torch_compile=true", ["train.torch_compile=true"], []),
}
# The ladder at one thread: each adds one lever to the one before.
for _name, _desc, _over, _patch in (
    ("bf16-t1", "1 thread: personatune path, bf16 autocast only", NO_PACK, []),
    ("packing-t1", "1 thread: + packing, sdpa block-diagonal mask", NO_FUSE, ["no_varlen"]),
    ("varlen-t1", "1 thread: + variable-length attention", NO_FUSE, []),
    ("personatune-t1", "1 thread: + loss at trained positions only", [], []),
):
    SETUPS[_name] = (_desc, [*_over, "train.threads=1"], _patch)
# The ladder at PyTorch's threads; the "-t1" ladder is for a machine that others keep busy.
DEFAULT_SETUPS = ["baseline", "bf16", "packing", "varlen", "personatune", "threads-1"]
# Loss parity: largest per-step |loss - baseline loss| / baseline loss allowed for
# personatune's defaults. bf16 autocast alone moved the curve by up to 2.8% (then under 1%)
# in benchmarks/results/train_speed_cpu_2threads.json; the tolerance leaves room for that.
PARITY_REL_TOL = 0.05


# ---------------------------------------------------------------------------------------
# The baton: processes in a ring, one optimizer step at a time.


def _baton_callback(ring, idx, counts):
    import psutil
    from transformers import TrainerCallback

    proc = psutil.Process()

    class Baton(TrainerCallback):
        def __init__(self):
            self.steps, self.tokens, self.loss, self.rss = [], [], [], []

        def on_train_begin(self, args, state, control, **kw):
            ring["start"].wait(timeout=3600)

        def on_step_begin(self, args, state, control, **kw):
            with ring["cond"]:
                ring["cond"].wait_for(lambda: ring["turn"].value == idx)
            self.t0 = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            self.steps.append(time.perf_counter() - self.t0)
            # Step k trains batches (k-1)*GA .. k*GA-1 (accelerate collates one batch ahead,
            # so the count of collated batches runs one ahead of the step).
            k, ga = len(self.steps), args.gradient_accumulation_steps
            self.tokens.append(sum(counts[(k - 1) * ga : k * ga]))
            self.rss.append(proc.memory_info().rss)
            with ring["done"].get_lock():
                ring["done"].value += 1
            pass_baton(ring, idx)

        def on_log(self, args, state, control, logs=None, **kw):
            if logs and "loss" in logs:
                self.loss.append(float(logs["loss"]))

    return Baton()


def pass_baton(ring, idx, leave=False):
    with ring["cond"]:
        if leave:
            ring["active"][idx] = 0
        n = len(ring["active"])
        if ring["turn"].value == idx:
            for k in range(1, n + 1):
                j = (idx + k) % n
                if ring["active"][j]:
                    ring["turn"].value = j
                    break
        ring["cond"].notify_all()


class CountingCollator:
    """Wraps a collator and records the non-padding tokens of every batch it makes."""

    def __init__(self, inner, counts):
        self.inner, self.counts = inner, counts

    def __call__(self, features):
        batch = self.inner(features)
        self.counts.append(sum(len(f["input_ids"]) for f in features))
        return batch


# ---------------------------------------------------------------------------------------
# One set-up, in its own process.


def _baseline_trainer(spec, tokenizer, data, work, callbacks):
    """The plain stack: transformers Trainer + peft LoRA, default settings."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import (
        AutoModelForCausalLM,
        DataCollatorForSeq2Seq,
        Trainer,
        TrainingArguments,
        set_seed,
    )

    from personatune.models import _gguf_as_safetensors, resolve_ref

    t = spec.train
    model = AutoModelForCausalLM.from_pretrained(_gguf_as_safetensors(resolve_ref("embedded")))
    set_seed(t.seed)  # LoRA initialisation, as personatune's train() does
    model = get_peft_model(
        model,
        LoraConfig(
            r=spec.lora.r,
            lora_alpha=spec.lora.alpha,
            lora_dropout=spec.lora.dropout,
            target_modules=spec.lora.target_modules,
            task_type="CAUSAL_LM",
        ),
    )
    args = TrainingArguments(
        output_dir=str(work),
        learning_rate=t.learning_rate,
        lr_scheduler_type=t.lr_scheduler,
        warmup_steps=t.warmup_ratio,
        max_steps=t.max_steps,
        per_device_train_batch_size=t.batch_size,
        gradient_accumulation_steps=t.gradient_accumulation,
        seed=t.seed,
        use_cpu=not torch.cuda.is_available(),
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        disable_tqdm=True,
        remove_unused_columns=False,
    )
    return Trainer(
        model=model,
        args=args,
        train_dataset=data.train,
        data_collator=DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=-100),
        callbacks=callbacks,
    )


def run_setup(name, idx, ring, out_q, steps):
    """Build one set-up's trainer, train ``steps`` steps in turn with the others, and put
    its measurements on ``out_q``."""
    import resource

    _, overrides, patches = SETUPS[name]
    try:
        import torch
        from transformers import set_seed

        from personatune import models
        from personatune.config import load_spec
        from personatune.data.chat import ensure_chat_template
        from personatune.data.dataset import PreparedData, prepare_data
        from personatune.train.trainer import build_trainer, lora_model

        if "threads1" in patches:
            torch.set_num_threads(1)
        run = [f"train.max_steps={steps}", "train.checkpoint_interval=1000000"]
        spec = load_spec(SPEC, [*run, "guard.enabled=false", *overrides])
        ref = models.resolve_ref(spec.model.name, spec.model.revision, spec.base_dir)
        tokenizer = models.load_tokenizer(ref)
        ensure_chat_template(tokenizer, spec.model.chat_template)
        prepared = prepare_data(spec, tokenizer)
        data = PreparedData(prepared.train, [], [], prepared.stats)  # no evaluation
        counts = []
        baton = _baton_callback(ring, idx, counts)
        work = Path(tempfile.mkdtemp(prefix=f"train-speed-{name}-"))
        if name == "baseline":
            trainer = _baseline_trainer(spec, tokenizer, data, work, [baton])
        else:
            base = models.load_model(ref, "none", torch.device("cpu"))
            set_seed(spec.train.seed)  # LoRA initialisation, as train() does
            model = lora_model(spec, base)
            varlen = "no_varlen" not in patches
            trainer = build_trainer(spec, model, tokenizer, data, work, [baton], varlen=varlen)
        trainer.data_collator = CountingCollator(trainer.data_collator, counts)
        trainer.train()
        out_q.put(
            {
                "setup": name,
                "step_s": baton.steps,
                "tokens": baton.tokens,
                "loss": baton.loss,
                "rss_train_peak_gib": max(baton.rss) / 2**30,
                "rss_process_max_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
                "threads": torch.get_num_threads(),
                "bf16_autocast": bool(trainer.args.bf16),
                "attention": trainer.model.config._attn_implementation,
            }
        )
    except BaseException as e:  # noqa: BLE001 - report anything, never leave the ring waiting
        ring["start"].abort()
        out_q.put({"setup": name, "error": f"{type(e).__name__}: {e}"[:500]})
    finally:
        pass_baton(ring, idx, leave=True)


# ---------------------------------------------------------------------------------------
# The run.


def model_flops_per_token(context: float) -> tuple[float, int]:
    """FLOP per trained token for the embedded model (:func:`common.flops_per_token`)
    and its matmul parameters."""
    from transformers import AutoConfig

    from personatune.models import _gguf_as_safetensors, resolve_ref

    c = AutoConfig.from_pretrained(_gguf_as_safetensors(resolve_ref("embedded")))
    return common.flops_per_token(c, context), common.matmul_params(c)


def summarise(results: dict, flop_per_token: float, peak_gflops: float) -> dict:
    base = results.get("baseline", {})
    for r in results.values():
        if "error" in r:
            continue
        timed_s, timed_tok = r["step_s"][1:], r["tokens"][1:]
        r["tokens_per_s"] = sum(timed_tok) / sum(timed_s)
        r["median_step_s"] = statistics.median(timed_s)
        r["mfu"] = r["tokens_per_s"] * flop_per_token / (peak_gflops * 1e9)
    base_tps = base.get("tokens_per_s")
    for r in results.values():
        if "error" in r or not base_tps:
            continue
        r["ratio_vs_baseline"] = r["tokens_per_s"] / base_tps
        t1 = results.get("baseline-t1", {}).get("tokens_per_s")
        if t1 and r["threads"] == 1:
            r["ratio_vs_baseline_t1"] = r["tokens_per_s"] / t1
        pairs = list(zip(r["loss"], base["loss"]))
        r["loss_max_abs_diff"] = max(abs(a - b) for a, b in pairs)
        r["loss_max_rel_diff"] = max(abs(a - b) / b for a, b in pairs)
    return results


def table(results: dict) -> str:
    """The results as a markdown table; the one-thread ratio column only when measured."""
    t1 = any("ratio_vs_baseline_t1" in r for r in results.values())
    head = ["set-up", "what changes", "threads", "tokens/s", "x baseline"]
    head += ["x baseline-t1"] if t1 else []
    head += ["median step s", "peak RSS GiB", "MFU", "max loss diff vs baseline"]
    rows = []
    for name, r in results.items():
        if "error" in r:
            rows.append(
                [name, SETUPS[name][0], f"error: {r['error'][:80]}"] + [""] * (len(head) - 3)
            )
            continue
        rows.append(
            [
                name,
                SETUPS[name][0],
                r["threads"],
                f"{r['tokens_per_s']:.1f}",
                f"{r.get('ratio_vs_baseline', float('nan')):.2f}",
                *([f"{r.get('ratio_vs_baseline_t1', float('nan')):.2f}"] if t1 else []),
                f"{r['median_step_s']:.2f}",
                f"{r['rss_train_peak_gib']:.2f}",
                f"{r['mfu']:.3f}",
                f"{r.get('loss_max_abs_diff', 0):.3f} ({100 * r.get('loss_max_rel_diff', 0):.1f}%)",
            ]
        )
    return common.markdown_table(head, rows)


def plot(results: dict, path: Path) -> None:
    fig, ax = common.figure(figsize=(7, 4))
    for name, r in results.items():
        if "loss" in r:
            wide = name in ("baseline", "personatune")
            ax.plot(range(1, len(r["loss"]) + 1), r["loss"], label=name, lw=2.5 if wide else 1)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("training loss (nats/token)")
    ax.set_title("pirate example, SmolLM2-135M, same data and seed")
    ax.legend(fontsize=8)
    common.save_plot(fig, path)


def run_group(names: list[str], steps: int, bar, task) -> dict:
    """Run set-ups ``names``, each in its own process, taking turns one step at a time
    (a group of one runs alone). Returns {set-up: result}."""
    ctx = mp.get_context("spawn")
    ring = {
        "cond": ctx.Condition(),
        "turn": ctx.Value("i", 0),
        "done": ctx.Value("i", 0),
        "active": ctx.Array("b", [1] * len(names)),
        "start": ctx.Barrier(len(names)),
    }
    out_q = ctx.Queue()
    procs = [
        ctx.Process(target=run_setup, args=(n, i, ring, out_q, steps)) for i, n in enumerate(names)
    ]
    for p in procs:
        p.start()
    results = {}
    already = bar.tasks[0].completed
    while len(results) < len(names):
        try:
            r = out_q.get(timeout=2)
            results[r["setup"]] = r
        except queue.Empty:
            pass
        bar.update(task, completed=already + ring["done"].value)
        for i, p in enumerate(procs):
            if not p.is_alive() and ring["active"][i]:  # killed (out of memory?)
                pass_baton(ring, i, leave=True)
                ring["start"].abort()
        if not any(p.is_alive() for p in procs) and out_q.empty():
            break
    for p in procs:
        p.join()
    return results


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=20, help="optimizer steps per set-up")
    ap.add_argument(
        "--setups",
        default=",".join(DEFAULT_SETUPS),
        help=f"comma-separated, from: {', '.join(SETUPS)}",
    )
    ap.add_argument("--compile", action="store_true", help="add the torch.compile set-up")
    ap.add_argument(
        "--interleave",
        action="store_true",
        help="run all set-ups at once, taking turns one step at a time (for a busy machine); "
        "by default they run one after another",
    )
    ap.add_argument("--name", default="train_speed_cpu", help="results file stem")
    args = ap.parse_args(argv)
    names = [s for s in args.setups.split(",") if s]
    if args.compile and "compile" not in names:
        names.append("compile")
    unknown = [n for n in names if n not in SETUPS]
    if unknown or args.steps < 2:
        ap.error(f"unknown set-up {unknown}" if unknown else "--steps must be at least 2")

    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeRemainingColumn

    from personatune.config import load_spec
    from personatune.data.chat import ensure_chat_template
    from personatune.data.dataset import prepare_data
    from personatune.models import load_tokenizer, resolve_ref

    info = common.machine_info()
    info["load_average_before"] = os.getloadavg()
    peak = common.matmul_peak("cpu", "bfloat16") / 1e9
    info["bf16_matmul_gflops"] = round(peak, 1)
    info["fp32_matmul_gflops"] = round(common.matmul_peak("cpu", "float32") / 1e9, 1)

    spec = load_spec(SPEC, ["guard.enabled=false"])
    tok = load_tokenizer(resolve_ref("embedded"))
    ensure_chat_template(tok, None)
    lengths = [len(r["input_ids"]) for r in prepare_data(spec, tok).train]
    context = sum(n * n for n in lengths) / sum(lengths)
    flop, n_mm = model_flops_per_token(context)

    groups = [names] if args.interleave else [[n] for n in names]
    results = {}
    with Progress(
        "[bold]steps", BarColumn(), MofNCompleteColumn(), "ETA", TimeRemainingColumn()
    ) as bar:
        task = bar.add_task("steps", total=args.steps * len(names))
        for group in groups:
            results.update(run_group(group, args.steps, bar, task))
    info["load_average_after"] = os.getloadavg()
    ordered = summarise({n: results[n] for n in names if n in results}, flop, peak)

    pt = ordered.get("personatune", {})
    parity = None
    if "loss_max_rel_diff" in pt:
        parity = {
            "tolerance_rel": PARITY_REL_TOL,
            "max_rel_diff": pt["loss_max_rel_diff"],
            "max_abs_diff": pt["loss_max_abs_diff"],
            "passed": pt["loss_max_rel_diff"] <= PARITY_REL_TOL,
        }
    out = {
        "benchmark": "train_speed_cpu",
        "spec": str(SPEC.relative_to(REPO)),
        "model": "embedded (SmolLM2-135M-Instruct)",
        "steps": args.steps,
        "batch_size": spec.train.batch_size,
        "machine": info,
        "flop_per_token": flop,
        "matmul_params": n_mm,
        "mean_context_tokens": context,
        "loss_parity": parity,
        "setups": ordered,
        "command": "python benchmarks/train_speed.py " + " ".join(argv or sys.argv[1:]),
    }
    common.write_json(RESULTS / f"{args.name}.json", out)
    md = (
        f"# {args.name}\n\n{common.describe(info)}; load average {info['load_average_before'][0]:.1f} before, "
        f"{info['load_average_after'][0]:.1f} after; bf16 matmul peak {peak:.0f} GFLOP/s. "
        f"{args.steps} steps of batch {spec.train.batch_size}, first step excluded from "
        f"speed.\n\n{table(ordered)}\n\nLoss parity (personatune vs baseline, same seed): "
        f"{json.dumps(parity)}\n"
    )
    common.write_markdown(RESULTS / f"{args.name}.md", md)
    plot(ordered, RESULTS / f"{args.name}_loss.png")
    print(md)
    failed = [n for n, r in ordered.items() if "error" in r]
    return 1 if failed or (parity and not parity["passed"]) else 0


if __name__ == "__main__":
    sys.exit(main())
