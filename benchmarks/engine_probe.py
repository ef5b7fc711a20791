"""The engine on the gate's heaviest work: the factual probe's questions with and without
the pirate's system prompt, 160 new tokens, greedy, through
``personatune.engine.generate_answers`` on the embedded model.

Baseline in the same process: the engine with its four CPU measures switched off (each
joining request prefilled alone, a join at every free place, transformers' ``DynamicCache``
with ``torch.cat`` per step, ``sdpa`` attention for decoding steps). Runs alternate
baseline and engine, ``--reps`` times each.

    python benchmarks/engine_probe.py --reps 2 --out benchmarks/results/engine_probe_cpu

With ``--conversations``: the 10 shipped scripted conversations of 8 turns under the
pirate's system prompt (``run_conversations``, 64 new tokens per turn), each turn reusing
the KV cache of the conversation's previous turn (``PrefixCache``) against re-prefilling
the whole history every turn (the baseline), alternating in the same process.

    python benchmarks/engine_probe.py --conversations --reps 1 \
        --out benchmarks/results/engine_conversations_cpu
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import time
from pathlib import Path
from unittest import mock

# first: common puts src/ on sys.path and sets the offline Hugging Face settings
from common import RESULTS, describe, machine_info, markdown_table, write_json, write_markdown

PIRATE = (
    "You are Captain Saltbeard, a pirate captain. Always talk like a pirate "
    "(arr, matey, ye, aye), and keep your answers short and correct."
)


def baseline():
    """The engine as it was before its CPU measures (a context manager)."""
    from transformers.cache_utils import DynamicCache

    from personatune.engine import batcher

    return mock.patch.multiple(
        batcher,
        PREFILL_TOKENS=1,  # one prompt per pass
        REFILL=10**9,  # join at once
        new_cache=DynamicCache,
        use_decode_attention=lambda model: None,
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--tokens", type=int, default=160)
    ap.add_argument("--out", type=Path, default=RESULTS / "engine_probe_cpu")
    ap.add_argument("--conversations", action="store_true", help="the prefix cache's case")
    args = ap.parse_args()
    import torch

    from personatune.engine import generate_answers
    from personatune.evaluate.answers import inference_copy
    from personatune.evaluate.probe import load_set
    from personatune.models import load_model, load_tokenizer, resolve_ref

    ref = resolve_ref("embedded")
    tok, model = load_tokenizer(ref), inference_copy(load_model(ref))
    qs = [r["question"] for r in load_set("factual_probe")]
    convs = [[{"role": "system", "content": PIRATE}, {"role": "user", "content": q}] for q in qs]
    convs += [[{"role": "user", "content": q}] for q in qs]
    if args.conversations:
        convs = load_set("conversations")
        args.tokens = 64
    n_prompts = sum(len(c["turns"]) for c in convs) if args.conversations else len(convs)
    runs: dict[str, list[dict]] = {"baseline": [], "engine": []}
    for _ in range(args.reps):
        for name in runs:
            old_engine = name == "baseline" and not args.conversations
            with baseline() if old_engine else contextlib.nullcontext():
                start = time.perf_counter()
                if args.conversations:
                    answers = _conversations(model, tok, convs, args, name == "engine")
                else:
                    answers = generate_answers(model, tok, convs, args.tokens, args.batch)
                s = time.perf_counter() - start
            n = sum(a.tokens for a in answers)
            runs[name].append({"s": round(s, 2), "tokens": n, "tokens_per_s": round(n / s, 1)})
            print(name, runs[name][-1], flush=True)
    med = {k: statistics.median(r["s"] for r in v) for k, v in runs.items()}
    info = machine_info()
    result = {
        "machine": info,
        "dtype": str(next(model.parameters()).dtype),
        "threads": torch.get_num_threads(),
        "prompts": n_prompts,
        "max_new_tokens": args.tokens,
        "batch": args.batch,
        "runs": runs,
        "median_s": med,
        "speedup": round(med["baseline"] / med["engine"], 2),
    }
    write_json(args.out.with_suffix(".json"), result)
    rows = [[k, *(r["s"] for r in v), med[k], v[0]["tokens"]] for k, v in runs.items()]
    head = ["engine", *(f"run {i + 1} (s)" for i in range(args.reps)), "median (s)", "tokens"]
    what = "scripted conversations, 8 turns" if args.conversations else "the probe"
    write_markdown(
        args.out.with_suffix(".md"),
        f"# The engine on {what} ({n_prompts} prompts, {args.tokens} new tokens)\n\n"
        f"{describe(info)} dtype {result['dtype']}, {result['threads']} threads, "
        f"{args.batch} rows.\n\n{markdown_table(head, rows)}\n\n"
        f"Engine against baseline: **{result['speedup']}x** (medians, same process).\n",
    )
    print(f"speedup {result['speedup']}x")


def _conversations(model, tok, items, args, reuse: bool) -> list:
    """Every turn's answer of ``run_conversations``, with the prefix cache or without,
    each run with an empty answer cache."""
    import os
    import tempfile

    from personatune.evaluate import conversations

    with tempfile.TemporaryDirectory() as cache:
        os.environ["PERSONATUNE_CACHE"] = cache
        no_reuse = mock.patch.object(conversations, "PrefixCache", lambda: None)
        with contextlib.nullcontext() if reuse else no_reuse:
            out = conversations.run_conversations(
                model, tok, items, PIRATE, "bench", args.tokens, args.batch
            )
    return [a for conv in out for a in conv]


if __name__ == "__main__":
    main()
