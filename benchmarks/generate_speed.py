"""Batch-1 generation speed (serving): decode tokens/s and time to first token (TTFT) of a
persona as base model + LoRA adapter (peft, unmerged) and as the adapter merged into the
base weights, with the base model alone for reference, on the CPU and on a CUDA GPU,
against the memory-bandwidth limit.

At batch 1 every decoded token reads every weight once, so the limit is
``bandwidth / bytes of weights read per token`` (Williams et al., the roofline model;
the input embedding reads one row and is not counted unless it is tied to the output
layer). The bandwidth is measured in the same run: a 1 GiB tensor copy, counting bytes
read plus bytes written.

- CPU: the embedded model (SmolLM2-135M-Instruct) loaded as personatune serves it
  (:func:`personatune.models.load_model`: fp32), with the adapter of ``--persona`` or a
  random r=16 all-linear adapter (same cost as a trained one).
- CUDA: the Qwen2.5-0.5B and Qwen2.5-7B shapes with random bf16 weights (the folders that
  benchmarks/gpu_train_speed.py saves), random r=16 all-linear adapter.

Method: greedy ``model.generate`` of N = ``--tokens`` new tokens (forced by
``min_new_tokens``) from a fixed prompt, with a logits processor stamping the time as
each token's logits are ready. TTFT = start to the first stamp (prefill and the first
token); decode tokens/s = (N - 1) / (last stamp - first stamp). The three variants take
turns, one generation each, for ``--reps`` rounds; medians are reported. (The CUDA rows in
benchmarks/results/gpu_train_speed.md were measured before the turns were added: each
variant's runs back to back.)

Usage::

    python benchmarks/generate_speed.py --device cpu [--persona runs/pirate]
    python benchmarks/generate_speed.py --device cuda --out DIR
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import common  # sys.path and offline Hugging Face settings, before personatune
from common import sync

PROMPT = "How far is the Sun from Earth? Answer in two sentences."


def copy_bandwidth(device, gib: float = 1.0) -> float:
    """Bytes/s of a large tensor copy (read + write), best of 5."""
    import torch

    n = int(gib * 2**30 / 4)
    a = torch.randn(n, device=device)
    b = torch.empty_like(a)
    b.copy_(a)
    best = 0.0
    for _ in range(5):
        sync(device)
        t = time.perf_counter()
        b.copy_(a)
        sync(device)
        best = max(best, 2 * n * 4 / (time.perf_counter() - t))
    return best


def bytes_per_token(model) -> int:
    """Bytes of the weights read to decode one token: every parameter and buffer-free
    weight once (shared tensors once), except an input embedding not tied to the output
    layer, of which one row is read."""
    seen, total = set(), 0
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    emb, out = inner.get_input_embeddings().weight, inner.get_output_embeddings().weight
    for p in model.parameters():
        if p.data_ptr() in seen:
            continue
        seen.add(p.data_ptr())
        if p is emb and emb.data_ptr() != out.data_ptr():
            continue
        total += p.numel() * p.element_size()
    return total


def random_adapter(model, seed: int = 0):
    """Wrap ``model`` with an r=16 all-linear LoRA adapter with non-zero B (peft starts B at
    zero, which an optimiser would have moved)."""
    import torch
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    peft_model = get_peft_model(
        model, LoraConfig(r=16, lora_alpha=32, target_modules="all-linear", task_type="CAUSAL_LM")
    )
    for name, p in peft_model.named_parameters():
        if "lora_B" in name:
            p.data.normal_(0, 0.02)
    return peft_model.eval()


def engine_once(model, ids, n_tokens: int, device, adapter: str | None) -> tuple[float, float]:
    """One greedy answer of ``n_tokens`` through personatune's engine (the continuous
    batching loop serve, chat and eval use) as the only request: (TTFT seconds, decode
    tokens/s), stamped after a device sync as each token is chosen. End-of-turn tokens
    are switched off so that every run decodes ``n_tokens``."""
    from personatune.engine import Batch, Request, Sampling

    class Ids:  # random weights: no text worth decoding
        eos_token_id = None
        all_special_ids = []

        def decode(self, ids, **kwargs) -> str:
            return ""

    batch = Batch(model)
    tok = Ids()
    batch._ends[id(tok)] = frozenset()
    req = Request(ids[0].tolist(), tok, adapter, Sampling(max_tokens=n_tokens))
    sync(device)
    t = time.perf_counter()
    batch.add(req)
    sync(device)
    first = time.perf_counter()
    steps = 0
    while batch.rows:
        batch.step()
        steps += 1
    sync(device)
    last = time.perf_counter()
    batch.restore()
    return first - t, steps / (last - first)


def generate_once(
    model, ids, n_tokens: int, device, adapter: bool = True, static: bool = False
) -> tuple[float, float]:
    """One greedy generation of ``n_tokens``: (TTFT seconds, decode tokens/s). A logits
    processor stamps the time as each token's logits are ready (after a device sync).
    ``adapter=False`` runs a peft model with its adapter disabled. ``static`` uses
    transformers' static KV cache, under which ``generate`` compiles the decoding step
    with ``torch.compile`` (``mode="reduce-overhead"``: CUDA graphs)."""
    import contextlib

    import torch
    from transformers import LogitsProcessor, LogitsProcessorList

    class Stamp(LogitsProcessor):
        def __init__(self):
            self.times = []

        def __call__(self, input_ids, scores):
            sync(device)
            self.times.append(time.perf_counter())
            return scores

    stamp = Stamp()
    off = model.disable_adapter() if not adapter else contextlib.nullcontext()
    sync(device)
    t = time.perf_counter()
    with off, torch.inference_mode():
        model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=n_tokens,
            min_new_tokens=n_tokens,
            do_sample=False,
            pad_token_id=0,
            logits_processor=LogitsProcessorList([stamp]),
            **({"cache_implementation": "static"} if static else {}),
        )
    return stamp.times[0] - t, (n_tokens - 1) / (stamp.times[-1] - stamp.times[0])


def measure(label: str, base, ids, device, bandwidth: float, args) -> list[dict]:
    """Rows for the base alone (adapter disabled), base + adapter, and merged (a merged
    copy). The three take turns, one generation each, ``--reps`` rounds after a warm-up
    round, so they share whatever else the machine is doing; medians are reported."""
    import copy

    from peft import PeftModel

    model = base if isinstance(base, PeftModel) else random_adapter(base)
    full = bytes_per_token(model)
    lora = sum(p.numel() * p.element_size() for n, p in model.named_parameters() if "lora_" in n)
    merged = copy.deepcopy(model).merge_and_unload()
    name = model.active_adapter
    variants = {
        "base": (model, False, full - lora),
        "base+adapter": (model, True, full),
        "merged": (merged, True, bytes_per_token(merged)),
        "engine base+adapter": (model, name, full),
        "engine merged": (merged, None, bytes_per_token(merged)),
    }
    if device.type == "cuda":
        variants["merged, static cache + compile"] = (merged, "static", bytes_per_token(merged))
        variants["base+adapter, static cache + compile"] = (model, "static", full)
    runs = {k: [] for k in variants}
    for rep in range(args.reps + 1):
        for kind, (m, adapter, _) in variants.items():
            n = args.tokens  # the warm-up too: a static cache's length is part of the graph
            if kind.startswith("engine"):
                result = engine_once(m, ids, n, device, adapter)
            elif adapter == "static":
                result = generate_once(m, ids, n, device, True, static=True)
            else:
                result = generate_once(m, ids, n, device, adapter)
            if rep:
                runs[kind].append(result)
    rows = []
    for kind, (_, _, nbytes) in variants.items():
        ttft = statistics.median(r[0] for r in runs[kind])
        tps = statistics.median(r[1] for r in runs[kind])
        limit = bandwidth / nbytes
        rows.append(
            {
                "model": label,
                "variant": kind,
                "device": device.type,
                "prompt_tokens": ids.shape[1],
                "new_tokens": args.tokens,
                "ttft_ms": round(ttft * 1000, 1),
                "decode_tokens_per_s": round(tps, 1),
                "weight_mb_per_token": round(nbytes / 1e6, 1),
                "bandwidth_limit_tokens_per_s": round(limit, 1),
                "fraction_of_limit": round(tps / limit, 3),
            }
        )
        print(json.dumps(rows[-1]), flush=True)
    return rows


def markdown(out: dict) -> str:
    """The results of one run (the JSON written next to it) as a markdown page."""
    m = out["machine"]
    where = m.get("gpu") or f"CPU, {m['threads']} threads"
    load = f", load average {m['load_average'][0]:.1f}" if "load_average" in m else ""
    lines = [
        f"# Generation speed: {where}",
        "",
        (
            f"Command: `{out['command']}`. torch {m['torch']}, Python {m['python']}; measured "
            f"copy bandwidth {m['copy_bandwidth_gb_s']} GB/s (bytes read + written){load}. "
            "Batch 1, greedy; medians; the bandwidth limit is bandwidth / weight bytes read "
            "per token."
        ),
        "",
    ]
    head = ["model", "variant", "TTFT ms", "decode tokens/s", "weights MB/token"]
    head += ["bandwidth limit tokens/s", "share of limit"]
    keys = ["model", "variant", "ttft_ms", "decode_tokens_per_s", "weight_mb_per_token"]
    keys += ["bandwidth_limit_tokens_per_s"]
    rows = [[r[k] for k in keys] + [f"{r['fraction_of_limit']:.0%}"] for r in out["rows"]]
    return "\n".join(lines) + "\n" + common.markdown_table(head, rows) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    ap.add_argument("--persona", help="a persona directory (CPU); default a random adapter")
    ap.add_argument("--tokens", type=int, default=128, help="new tokens per timed run")
    ap.add_argument("--reps", type=int, default=3, help="timed runs per measurement")
    ap.add_argument("--shapes", default="qwen2.5-0.5b,qwen2.5-7b", help="CUDA model shapes")
    ap.add_argument("--base", type=Path, help="CUDA: this model folder instead of --shapes")
    ap.add_argument("--out", type=Path, default=common.RESULTS)
    args = ap.parse_args()
    import torch

    device = torch.device(args.device)
    bandwidth = copy_bandwidth(device)
    info = {
        "device": args.device,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "copy_bandwidth_gb_s": round(bandwidth / 1e9, 1),
        "threads": torch.get_num_threads(),
    }
    rows = []
    if args.device == "cpu":
        from personatune.data.chat import ensure_chat_template, render_prompt
        from personatune.models import load_model, load_tokenizer, resolve_ref

        info["load_average"] = os.getloadavg()
        ref = resolve_ref("embedded")
        tok = load_tokenizer(ref)
        ensure_chat_template(tok, None)
        text = render_prompt(tok, [{"role": "user", "content": PROMPT}])
        ids = tok(text, return_tensors="pt", add_special_tokens=False).input_ids
        base = load_model(ref, "none", device)
        if args.persona:
            from peft import PeftModel

            base = PeftModel.from_pretrained(base, args.persona).eval()
        rows += measure("SmolLM2-135M (embedded), fp32", base, ids, device, bandwidth, args)
    else:
        from transformers import AutoModelForCausalLM

        if not args.base:
            from gpu_train_speed import model_dir

        info["gpu"] = torch.cuda.get_device_name(0)
        folders = {args.base.name: args.base} if args.base else None
        for shape in folders or args.shapes.split(","):
            base = AutoModelForCausalLM.from_pretrained(
                folders[shape] if folders else model_dir(shape),
                dtype=torch.bfloat16,
                device_map={"": 0},
            ).eval()
            ids = torch.randint(0, 1000, (1, 64), generator=torch.Generator().manual_seed(0))
            rows += measure(f"{shape}, bf16", base, ids.to(device), device, bandwidth, args)
            del base
            torch.cuda.empty_cache()
    out = {
        "benchmark": "generate_speed",
        "machine": info,
        "rows": rows,
        "command": "python benchmarks/generate_speed.py " + " ".join(sys.argv[1:]),
    }
    stem = f"generate_speed_{args.device}"
    common.write_json(args.out / f"{stem}.json", out)
    md = markdown(out)
    common.write_markdown(args.out / f"{stem}.md", md)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
