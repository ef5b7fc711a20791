"""How often a greedy answer is the same alone and inside a mixed-persona batch: the
engine's continuous batching against each request run alone, on the first ``--tokens``
tokens. Exactly equal is expected on the CPU in fp32 (tests/test_engine.py); in bf16 on
a GPU, batched matrix products round differently, so a near tie between two tokens can
flip and the answers part from there. Results: ``benchmarks/results/batch_equality_DEVICE``.

    python benchmarks/batch_equality.py --synthetic qwen2.5-0.5b --tokenizer .whl/tok
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

# first: common puts src/ on sys.path and sets the offline Hugging Face settings
from common import RESULTS, describe, machine_info, markdown_table, write_json, write_markdown
from serve_load import PROMPTS, synthetic_personas


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("persona_dirs", nargs="*", type=Path)
    ap.add_argument("--synthetic", help="a serve_load.py shape: random base + two adapters")
    ap.add_argument("--tokenizer", type=Path)
    ap.add_argument("--quantization", default="none")
    ap.add_argument("--work", type=Path, default=Path("/tmp/serve_load"))
    ap.add_argument("--prompts", type=int, default=48, help="requests, cycling the models")
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--max-batch", type=int, default=32)
    ap.add_argument(
        "--init-range",
        type=float,
        help="--synthetic: weights' init std (default 0.02: nearly flat logits, many ties)",
    )
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    import torch

    from personatune.engine import Sampling, load_registry, persona_request, run_batch

    dirs = args.persona_dirs or synthetic_personas(
        args.work, args.synthetic, args.tokenizer, args.quantization, args.init_range
    )
    reg = load_registry(dirs)
    names = list(reg.personas)
    texts = [json.loads(x)["prompt"] for x in PROMPTS.read_text().splitlines() if x]

    def requests():
        return [
            persona_request(
                reg.personas[names[i % len(names)]],
                [{"role": "user", "content": texts[i % len(texts)]}],
                Sampling(max_tokens=args.tokens),
            )  # fmt: skip
            for i in range(args.prompts)
        ]

    run_batch(reg.model, requests()[:2])  # warm-up
    t = time.perf_counter()
    alone = [run_batch(reg.model, [r])[0] for r in requests()]
    t_alone = time.perf_counter() - t
    t = time.perf_counter()
    batched = run_batch(reg.model, requests(), args.max_batch)
    t_batched = time.perf_counter() - t
    same = [a == b for a, b in zip(alone, batched)]
    by_model = {
        n: sum(s for i, s in enumerate(same) if names[i % len(names)] == n)
        / len(same[names.index(n) :: len(names)])
        for n in names
    }
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = str(next(reg.model.parameters()).dtype).removeprefix("torch.")
    report = {
        "machine": machine_info(),
        "command": "python benchmarks/batch_equality.py " + " ".join(sys.argv[1:]),
        "dtype": dtype,
        "tokens": args.tokens,
        "requests": args.prompts,
        "max_batch": args.max_batch,
        "init_range": args.init_range or 0.02,
        "equal_share": round(sum(same) / len(same), 3),
        "equal_share_by_model": {k: round(v, 3) for k, v in by_model.items()},
        "alone_s": round(t_alone, 2),
        "batched_s": round(t_batched, 2),
    }
    out = args.out or RESULTS / f"batch_equality_{device}"
    write_json(out.with_suffix(".json"), report)
    rows = [[n, f"{v:.0%}"] for n, v in by_model.items()] + [
        ["all", f"{sum(same) / len(same):.0%}"]
    ]
    write_markdown(
        out.with_suffix(".md"),
        f"# Greedy answers alone vs in a mixed batch ({dtype}, {device})\n\n"
        f"Random weights with init std {args.init_range or 0.02}. "
        f"{args.prompts} requests cycling {', '.join(names)}; first {args.tokens} tokens "
        f"equal alone and inside one continuous batch of at most {args.max_batch} rows. "
        f"Alone one after another: {t_alone:.1f} s; batched: {t_batched:.1f} s.\n\n"
        f"Machine: {describe(report['machine'])}. Command: `{report['command']}`\n\n"
        + markdown_table(["model", "equal on the first tokens"], rows),
    )
    print(json.dumps(report))


if __name__ == "__main__":
    main()
