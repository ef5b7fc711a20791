"""Train each seed recipe's model shape for a few optimizer steps on one CUDA GPU, through
personatune's own training path, and record tokens/s and peak memory.

For each recipe in ``recipes/``: build the base model's architecture from its published
dimensions with random weights (speed and memory do not depend on the values; no Hub
access is needed), save it, load it with :func:`personatune.models.load_model` in the
recipe's quantization (NF4 for all five), wrap it with :func:`personatune.train.trainer.
lora_model` and train with :func:`personatune.train.trainer.build_trainer`, so the
recipe's LoRA settings, optimizer (paged AdamW where it says so), gradient checkpointing,
packing, batch size and gradient accumulation all apply. Every example is a full
``train.max_seq_length`` row of random tokens, the recipe's worst case for memory.

Measured:
- tokens/s: trained tokens per optimizer step (batch x accumulation x max length, no
  padding) over the mean wall time of the steps after the first (warm-up);
- peak GiB: ``torch.cuda.max_memory_allocated`` and ``max_memory_reserved`` from after
  the model is loaded to the end of training (weights included);
- paged optimizer state: AdamW 32-bit keeps two fp32 states per trainable parameter; the
  paged variant puts them in CUDA managed memory, which torch's counters do not see, so it
  is counted apart (8 bytes x trainable parameters);
- GPU need: peak reserved + the CUDA context + paged state, compared with the memory the
  seed authors had (SEED_SYSTEMS.md and the issue: 40 GB A100 for Sherlock, 24 GB consumer
  GPU for Falcon and Llama-2, 16 GB Colab GPU for Phi-2; the pirate seed's GPU is not
  published);
- MFU: tokens/s x (4 x matmul parameters + 12 x layers x max length x hidden) FLOP per
  token over the measured bf16 matmul peak (the formula of ../shared/docs/GPU.md;
  recomputation under gradient checkpointing is not counted).

Usage (CUDA machine, bitsandbytes installed; results in benchmarks/results/recipes.md)::

    python benchmarks/recipes_gpu.py --steps 4 --json results.json [recipe names...]
    python benchmarks/recipes_gpu.py phi-2-alpaca --override train.batch_size=16 ...
    python benchmarks/recipes_gpu.py --plot benchmarks/results/recipes_gpu.json
"""

from __future__ import annotations

import argparse
import gc
import json
import shutil
import tempfile
import time
from pathlib import Path

import common  # sys.path and offline Hugging Face settings, before personatune
import torch

REPO = common.REPO

# Published dimensions of each recipe's base model (model cards / config.json).
SHAPES = {
    "qwen2.5-0.5b-pirate": (
        "qwen2",
        {
            "hidden_size": 896,
            "intermediate_size": 4864,
            "num_hidden_layers": 24,
            "num_attention_heads": 14,
            "num_key_value_heads": 2,
            "vocab_size": 151936,
            "tie_word_embeddings": True,
            "max_position_embeddings": 32768,
            "rope_theta": 1e6,
            "rms_norm_eps": 1e-6,
        },
    ),
    "qwen2.5-7b-sherlock": (
        "qwen2",
        {
            "hidden_size": 3584,
            "intermediate_size": 18944,
            "num_hidden_layers": 28,
            "num_attention_heads": 28,
            "num_key_value_heads": 4,
            "vocab_size": 152064,
            "tie_word_embeddings": False,
            "max_position_embeddings": 32768,
            "rope_theta": 1e6,
            "rms_norm_eps": 1e-6,
        },
    ),
    "falcon-7b-persona-chat": (
        "falcon",
        {
            "hidden_size": 4544,
            "num_hidden_layers": 32,
            "num_attention_heads": 71,
            "vocab_size": 65024,
            "multi_query": True,
            "parallel_attn": True,
            "new_decoder_architecture": False,
            "bias": False,
            "alibi": False,
            "layer_norm_epsilon": 1e-5,
            "max_position_embeddings": 2048,
            "bos_token_id": 11,
            "eos_token_id": 11,
        },
    ),
    "phi-2-alpaca": (
        "phi",
        {
            "hidden_size": 2560,
            "intermediate_size": 10240,
            "num_hidden_layers": 32,
            "num_attention_heads": 32,
            "num_key_value_heads": 32,
            "vocab_size": 51200,
            "partial_rotary_factor": 0.4,
            "max_position_embeddings": 2048,
            "layer_norm_eps": 1e-5,
            "hidden_act": "gelu_new",
            "resid_pdrop": 0.1,
            "embd_pdrop": 0.0,
            "attention_dropout": 0.0,
            "tie_word_embeddings": False,
            "bos_token_id": 50256,
            "eos_token_id": 50256,
        },
    ),
    "llama-2-7b-chat-persona-chat": (
        "llama",
        {
            "hidden_size": 4096,
            "intermediate_size": 11008,
            "num_hidden_layers": 32,
            "num_attention_heads": 32,
            "num_key_value_heads": 32,
            "vocab_size": 32000,
            "max_position_embeddings": 4096,
            "rms_norm_eps": 1e-5,
            "tie_word_embeddings": False,
            "bos_token_id": 1,
            "eos_token_id": 2,
        },
    ),
}

# GPU memory the seed authors had, GB (10^9 bytes), and what it was.
SEED_GPU = {
    "qwen2.5-0.5b-pirate": (None, "not published"),
    "qwen2.5-7b-sherlock": (40, "A100 40 GB"),
    "falcon-7b-persona-chat": (24, "24 GB consumer GPU"),
    "phi-2-alpaca": (16, "Colab 16 GB"),
    "llama-2-7b-chat-persona-chat": (24, "24 GB consumer GPU"),
}
GIB = 2**30
DEVICE = "cuda"


def count_linear(model) -> tuple[int, int]:
    """(4-bit linear layers, all linear layers) of a loaded base model, output head left out."""
    try:
        from bitsandbytes.nn import Linear4bit
    except ImportError:
        Linear4bit = ()
    blocks = [m for n, m in model.named_modules() if "lm_head" not in n]
    four = sum(isinstance(m, Linear4bit) for m in blocks) if Linear4bit else 0
    return four, sum(isinstance(m, torch.nn.Linear) for m in blocks)


def save_random(name: str, path: Path) -> tuple[object, int]:
    """Save a randomly initialised bf16 model of ``name``'s shape to ``path``; return its
    config and the number of matmul parameters (every Linear, output head included)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    arch, dims = SHAPES[name]
    config = AutoConfig.for_model(arch, **dims)
    torch.manual_seed(0)
    with torch.device(DEVICE):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    n_matmul = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))
    model.save_pretrained(path)
    del model
    gc.collect()
    torch.cuda.empty_cache()
    return config, n_matmul


def run_recipe(
    name: str, steps: int, scratch: Path, peak_flops: float, context: int, overrides=()
) -> dict:
    """Train recipe ``name`` (a file stem in ``recipes/``) for ``steps`` optimizer steps on
    a random model of its shape saved under ``scratch``, and return the measurements.

    Args:
        peak_flops: measured bf16 matmul FLOP/s, for the MFU.
        context: bytes the CUDA context takes on the device (added to the GPU need).
        overrides: spec ``key=value`` overrides applied after the recipe's own values.
    """
    from personatune.config import load_spec
    from personatune.data.dataset import PreparedData
    from personatune.models import load_model, resolve_ref
    from personatune.train.trainer import build_trainer, lora_model

    model_dir = scratch / name
    config, n_matmul = save_random(name, model_dir)
    spec = load_spec(
        REPO / "recipes" / f"{name}.yaml",
        [
            f"model.name={model_dir}",
            f"train.max_steps={steps}",
            "train.checkpoint_interval=100000",
            f"output_dir={scratch / ('out-' + name)}",
            *overrides,
        ],
    )
    t = spec.train
    torch.cuda.reset_peak_memory_stats()
    base = load_model(resolve_ref(str(model_dir)), spec.model.quantization, torch.device(DEVICE))
    nf4_layers, linear_layers = count_linear(base)  # before LoRA adds its own linear layers
    model = lora_model(spec, base)
    weights_gib = torch.cuda.memory_allocated() / GIB
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    seq, per_step = t.max_seq_length, t.batch_size * t.gradient_accumulation
    g = torch.Generator().manual_seed(0)
    rows = []
    for _ in range(per_step * steps):
        ids = torch.randint(2, config.vocab_size, (seq,), generator=g).tolist()
        rows.append({"input_ids": ids, "labels": ids})
    work = scratch / f"work-{name}"
    work.mkdir(parents=True, exist_ok=True)
    timer = common.step_timer(memory=True)
    trainer = build_trainer(
        spec, model, common.pad_tokenizer(eos=True), PreparedData(rows, [], []), work, [timer]
    )
    trainer.train()
    step_s = sum(timer.times[1:]) / max(1, len(timer.times) - 1)
    tokens_per_s = per_step * seq / step_s
    flops_per_token = common.flops_per_token(config, seq, n_matmul)
    paged = 8 * trainable if t.optimizer.startswith("paged_") else 0
    need = torch.cuda.max_memory_reserved() + context + paged
    budget, gpu = SEED_GPU[name]
    result = {
        "recipe": name,
        "arch": SHAPES[name][0],
        "quantization": spec.model.quantization,
        "lora_r": spec.lora.r,
        "targets": spec.lora.target_modules,
        "optimizer": t.optimizer,
        "gradient_checkpointing": t.gradient_checkpointing,
        "packing": t.packing,
        "batch": t.batch_size,
        "grad_accum": t.gradient_accumulation,
        "seq": seq,
        "steps_timed": len(timer.times) - 1,
        "s_per_step": round(step_s, 3),
        "tokens_per_s": round(tokens_per_s),
        "mfu": round(tokens_per_s * flops_per_token / peak_flops, 3),
        "nf4_linear_layers": f"{nf4_layers}/{linear_layers}",
        "trainable_params": trainable,
        "weights_gib": round(weights_gib, 2),
        "peak_allocated_gib": round(torch.cuda.max_memory_allocated() / GIB, 2),
        "peak_reserved_gib": round(torch.cuda.max_memory_reserved() / GIB, 2),
        "paged_optimizer_gib": round(paged / GIB, 2),
        "device_used_at_step_end_gib": round(timer.used / GIB, 2),
        "need_gb": round(need / 1e9, 1),
        "seed_gpu": gpu,
        "seed_gpu_gb": budget,
        "fits_seed_gpu": None if budget is None else need <= budget * 1e9,
        "loss": trainer.state.log_history[-2].get("loss")
        if len(trainer.state.log_history) > 1
        else None,
    }
    del trainer, model
    gc.collect()
    torch.cuda.empty_cache()
    shutil.rmtree(model_dir, ignore_errors=True)
    return result


def plot(results_json: Path) -> Path:
    """Bar charts of GPU need against the seed's GPU and of tokens/s, from a results file
    holding ``{"runs": [{"machine", "results"}, ...]}`` (benchmarks/results/recipes_gpu.json).
    The first run is the recipes as shipped; a run with ``plain_falcon_linear`` adds Falcon
    with its layers quantized. Writes a PNG beside the JSON and returns its path."""
    runs = json.loads(results_json.read_text())["runs"]
    rows = {r["recipe"]: r for r in runs[0]["results"] if "need_gb" in r}
    fixed = [
        r
        for run in runs
        if run.get("machine", {}).get("plain_falcon_linear")
        for r in run["results"]
        if r.get("arch") == "falcon"
    ]
    order = [n for n in SHAPES if n in rows]
    order.sort(key=lambda n: (SHAPES[n][1]["hidden_size"], n))
    x = range(len(order))
    fig, (a, b) = common.figure(1, 2, figsize=(12, 4.5))
    need = [rows[n]["need_gb"] for n in order]
    budget = [rows[n]["seed_gpu_gb"] for n in order]
    colors = ["#c44e52" if bb and v > bb else "#4c72b0" for v, bb in zip(need, budget)]
    a.bar(x, need, color=colors, label="need as shipped (red: over the seed GPU)")
    for f in fixed:
        a.bar(
            [order.index(f["recipe"])],
            [f["need_gb"]],
            width=0.35,
            color="#55a868",
            label="Falcon with FalconLinear quantized",
        )
    for i, bb in enumerate(budget):
        if bb:
            a.hlines(bb, i - 0.45, i + 0.45, colors="k", linestyles="--")
            a.text(i, bb + 0.6, f"seed GPU {bb} GB", ha="center", fontsize=8)
    a.set_xticks(list(x), order, fontsize=7, rotation=12)
    a.set_ylim(0, 1.3 * max(need + [bb or 0 for bb in budget]))
    a.set_ylabel("GB (peak reserved + CUDA context + paged optimizer)")
    a.set_title("Memory per recipe (NF4 QLoRA, full-length rows)")
    a.legend(fontsize=8, loc="upper left")
    tok = [rows[n]["tokens_per_s"] for n in order]
    b.bar(x, tok, color="#4c72b0")
    for i, n in enumerate(order):
        r = rows[n]
        b.text(
            i, tok[i] * 1.01, f"{r['batch']}x{r['grad_accum']}x{r['seq']}", ha="center", fontsize=8
        )
    b.set_xticks(list(x), order, fontsize=7, rotation=12)
    b.set_ylabel("trained tokens / s")
    b.set_title(
        f"Speed at each recipe's batch x accumulation x length ({runs[0]['machine']['gpu']})"
    )
    return common.save_plot(fig, results_json.with_suffix(".png"), dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("recipes", nargs="*", default=list(SHAPES))
    parser.add_argument(
        "--steps", type=int, default=4, help="optimizer steps; the first is warm-up"
    )
    parser.add_argument("--json", type=Path, help="write the results here as JSON")
    parser.add_argument(
        "--budget-s", type=float, default=1e9, help="skip recipes after this many seconds"
    )
    parser.add_argument(
        "--override", action="append", default=[], help="spec key=value, repeatable"
    )
    parser.add_argument("--plot", type=Path, help="only plot this results file (see plot())")
    args = parser.parse_args()
    if args.plot:
        print(plot(args.plot))
        return

    start = time.time()
    # Falcon's layers are quantized since load_model builds them as nn.Linear under nf4
    # (personatune.patches.falcon_linear_as_nn_linear); older runs recorded the flag.
    info = {**common.machine_info(("transformers", "peft", "accelerate", "bitsandbytes"))}
    info["plain_falcon_linear"] = True
    torch.cuda.init()
    torch.zeros(1, device="cuda")
    free, total = torch.cuda.mem_get_info()
    context = total - free - torch.cuda.memory_reserved()
    info["cuda_context_gib"] = round(context / GIB, 2)
    info["bf16_matmul_tflops"] = round((peak := common.matmul_peak("cuda")) / 1e12, 1)
    torch.cuda.empty_cache()
    print(json.dumps(info), flush=True)

    shm = Path("/dev/shm")
    base = (
        shm if shm.is_dir() and shutil.disk_usage(shm).free > 40e9 else Path(tempfile.gettempdir())
    )
    scratch = Path(tempfile.mkdtemp(prefix="recipes-gpu-", dir=base))
    results = []
    try:
        for name in args.recipes:
            if time.time() - start > args.budget_s:
                results.append({"recipe": name, "skipped": "time budget"})
                print(json.dumps(results[-1]), flush=True)
                continue
            try:
                results.append(run_recipe(name, args.steps, scratch, peak, context, args.override))
            except Exception as e:  # noqa: BLE001 - one failing recipe must not lose the others
                results.append({"recipe": name, "error": f"{type(e).__name__}: {e}"[:500]})
                gc.collect()
                torch.cuda.empty_cache()
            print(json.dumps(results[-1]), flush=True)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    if args.json:
        common.write_json(args.json, {"machine": info, "results": results})
    print(
        "| recipe | batch x accum x seq | tokens/s | peak alloc GiB | peak reserved GiB "
        "| paged opt GiB | need GB | seed GPU | fits |"
    )
    for r in results:
        if "tokens_per_s" in r:
            print(
                f"| {r['recipe']} | {r['batch']} x {r['grad_accum']} x {r['seq']} | "
                f"{r['tokens_per_s']} | {r['peak_allocated_gib']} | {r['peak_reserved_gib']} | "
                f"{r['paged_optimizer_gib']} | {r['need_gb']} | {r['seed_gpu']} | "
                f"{r['fits_seed_gpu']} |"
            )


if __name__ == "__main__":
    main()
