"""llama.cpp on the exported GGUF against transformers, batch 1, greedy, on the CPU.

The persona is exported with ``personatune export --gguf`` (f16, q8_0, q4_k_m); each
GGUF runs in llama.cpp through llama-cpp-python, and the same persona runs in
transformers as ``personatune chat`` runs it today (base + peft adapter, float32) and
merged. Every arm decodes exactly ``--max-new-tokens`` tokens (end-of-turn ignored) from
the same prompts, arms interleaved in one process and their order rotated each round, so
load from other jobs falls on all of them alike; the 1-minute load average is recorded
around every run.

Measured: time to first token (prompt in, first token out, seconds) and decode tokens/s
(tokens after the first, over the time after the first). Also the agreement of each
GGUF with the transformers persona: the greedy tokens they share before the first
difference, and the largest logit difference of the GGUF loaded back by transformers.

    python benchmarks/gguf_speed.py --persona runs/pirate --repeats 3
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import common  # before personatune: sys.path and offline Hugging Face settings
import torch

PROMPTS = [
    "What is the capital of France?",
    "Tell me about your ship.",
    "How many legs does a spider have?",
    "Give me one tip for learning to swim.",
]


class _Timer:
    """A transformers streamer that stamps each generated token (its first ``put`` is the
    prompt)."""

    def __init__(self):
        self.stamps: list[float] = []
        self.prompt_seen = False

    def put(self, value):
        if self.prompt_seen:
            self.stamps.append(time.perf_counter())
        self.prompt_seen = True

    def end(self):
        pass


def transformers_run(model, ids: list[int], n: int) -> tuple[float, float, list[int]]:
    timer = _Timer()
    ids = torch.tensor([ids])
    t0 = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                             streamer=timer, pad_token_id=0)  # fmt: skip
    s = timer.stamps
    return s[0] - t0, (len(s) - 1) / (s[-1] - s[0]), out[0, ids.shape[1] :].tolist()


def llama_cpp_run(llm, ids: list[int], n: int) -> tuple[float, float, list[int]]:
    llm.reset()  # no prefix reuse from the previous run: the prompt is evaluated every time
    stamps, tokens = [], []
    t0 = time.perf_counter()
    for tok in llm.generate(ids, temp=0.0, top_k=1, reset=True):  # never stops by itself
        stamps.append(time.perf_counter())
        tokens.append(tok)
        if len(tokens) == n:
            break
    return stamps[0] - t0, (n - 1) / (stamps[-1] - stamps[0]), tokens


def shared_prefix(a: list[int], b: list[int]) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--persona", type=Path, required=True)
    ap.add_argument("--quants", default="f16,q8_0,q4_k_m")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--prompts", type=int, default=len(PROMPTS), help="use the first N prompts")
    ap.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "gguf-speed",
                    help="exported GGUFs go here; an existing export is reused")  # fmt: skip
    ap.add_argument("--out", type=Path, default=common.RESULTS / "gguf_speed")
    args = ap.parse_args()

    import llama_cpp
    from transformers import AutoModelForCausalLM

    from personatune.data.chat import with_system_prompt
    from personatune.engine import encode, load_persona
    from personatune.export.gguf_file import export_gguf
    from personatune.export.merged import merge_persona

    torch.set_num_threads(args.threads)
    info = common.machine_info(("transformers", "peft", "llama_cpp_python", "gguf"))
    persona = load_persona(args.persona)
    tmp = args.work
    quants = args.quants.split(",")
    files, export_s = {}, {}
    for q in quants:
        t = time.perf_counter()
        if not (tmp / q / "Modelfile").exists():
            export_gguf(args.persona, tmp / q, quant=q, overwrite=True)
            export_s[q] = round(time.perf_counter() - t, 1)
        (files[q],) = (tmp / q).glob("*.gguf")
    prompts = [encode(persona.tokenizer, with_system_prompt([{"role": "user", "content": p}],
                                                            persona.spec.system_prompt))
               for p in PROMPTS[: args.prompts]]  # fmt: skip

    # Loaded back by transformers: the largest logit difference with base + adapter.
    logit_diff = {}
    batch = torch.tensor([prompts[0]])
    with torch.inference_mode():
        want = persona.model(batch).logits
        for q in quants:
            m = AutoModelForCausalLM.from_pretrained(tmp / q, gguf_file=files[q].name).eval()
            logit_diff[q] = float((m(batch).logits - want).abs().max())
            del m
        with persona.model.disable_adapter():
            adapter_effect = float((persona.model(batch).logits - want).abs().max())

    arms = {
        "transformers, base + adapter (fp32)": ("hf", persona.model),
        "transformers, merged (fp32)": ("hf", merge_persona(args.persona).model),
    }
    for q in quants:
        llm = llama_cpp.Llama(str(files[q]), n_ctx=512, n_threads=args.threads,
                              n_threads_batch=args.threads, verbose=False)  # fmt: skip
        arms[f"llama.cpp, {q}"] = ("llama", llm)

    runs = {name: [] for name in arms}
    names = list(arms)
    for r in range(args.repeats):
        for i, ids in enumerate(prompts):
            k = (r * len(prompts) + i) % len(names)
            for name in names[k:] + names[:k]:
                kind, obj = arms[name]
                load0 = os.getloadavg()[0]
                run = transformers_run if kind == "hf" else llama_cpp_run
                ttft, tps, toks = run(obj, ids, args.max_new_tokens)
                runs[name].append({"prompt": i, "round": r, "ttft_s": ttft, "tokens_per_s": tps,
                                   "tokens": toks, "load_average": [load0, os.getloadavg()[0]]})  # fmt: skip
                print(f"{name:36s} prompt {i} round {r}: TTFT {ttft * 1000:.0f} ms, "
                      f"{tps:.1f} tokens/s, load {load0:.1f}", flush=True)  # fmt: skip
    sizes = {q: files[q].stat().st_size for q in quants}
    report(args, info, runs, quants, sizes, export_s, logit_diff, adapter_effect)


def report(args, info, runs, quants, sizes, export_s, logit_diff, adapter_effect) -> None:
    base_name = next(iter(runs))
    base = runs[base_name]
    loads = [x for rs in runs.values() for r in rs for x in r["load_average"]]
    rows, arms = [], {}
    for name, rs in runs.items():
        ttft = statistics.median(r["ttft_s"] for r in rs)
        tps = statistics.median(r["tokens_per_s"] for r in rs)
        # Same prompt, same round: the runs sat next to each other in time.
        ratio = statistics.median(r["tokens_per_s"] / b["tokens_per_s"] for r, b in zip(rs, base))
        ttft_ratio = statistics.median(b["ttft_s"] / r["ttft_s"] for r, b in zip(rs, base))
        agree = [
            shared_prefix(r["tokens"], b["tokens"]) for r, b in zip(rs, base) if r["round"] == 0
        ]
        q = name.split(", ")[-1] if name.startswith("llama.cpp") else None
        arms[name] = {
            "ttft_s_median": round(ttft, 4),
            "tokens_per_s_median": round(tps, 2),
            "decode_speedup_vs_transformers_adapter": round(ratio, 2),
            "ttft_speedup_vs_transformers_adapter": round(ttft_ratio, 2),
            "greedy_tokens_shared_with_transformers_adapter": agree,
            "file_bytes": sizes.get(q),
            "export_s": export_s.get(q),
            "gguf_in_transformers_max_logit_diff": logit_diff.get(q),
            "runs": [{k: v for k, v in r.items() if k != "tokens"} for r in rs],
        }
        rows.append([name, f"{ttft * 1000:.0f}", f"{tps:.1f}", f"{ratio:.2f}x", f"{ttft_ratio:.2f}x",
                     f"{statistics.mean(agree):.0f} / {args.max_new_tokens}",
                     f"{sizes[q] / 1e6:.0f}" if q else "", f"{logit_diff[q]:.4f}" if q else ""])  # fmt: skip
    data = {
        "machine": info,
        "command": f"python benchmarks/gguf_speed.py --persona {args.persona} --repeats "
        f"{args.repeats} --prompts {args.prompts} --max-new-tokens {args.max_new_tokens} "
        f"--threads {args.threads} --out {args.out}",
        "prompts": PROMPTS[: args.prompts],
        "max_new_tokens": args.max_new_tokens,
        "threads": args.threads,
        "load_average": {"min": min(loads), "median": statistics.median(loads), "max": max(loads)},
        "adapter_effect_max_logit": adapter_effect,
        "arms": arms,
    }
    common.write_json(args.out.with_suffix(".json"), data)
    la = data["load_average"]
    head = ["arm", "TTFT ms", "decode tokens/s", "decode speed-up", "TTFT speed-up",
            "greedy tokens shared", "file MB", "max logit diff (GGUF in transformers)"]  # fmt: skip
    md = (
        f"# llama.cpp on the exported GGUF vs transformers (CPU, batch 1, greedy)\n\n"
        f"Command: `{data['command']}`. Machine: {common.describe(info)}; llama-cpp-python "
        f'{info.get("llama_cpp_python")} built here from the sdist (`CMAKE_ARGS="-DGGML_NATIVE=ON -DLLAVA_BUILD=OFF"`). '
        f"{args.threads} threads per arm; {args.prompts} prompts x {args.repeats} rounds, "
        f"{args.max_new_tokens} new tokens each (end-of-turn ignored), arms interleaved in one "
        f"process with their order rotated. The machine is shared: 1-minute load average "
        f"{la['min']:.1f} to {la['max']:.1f} (median {la['median']:.1f}) on {info.get('cores')} cores, "
        f"so absolute numbers are low; the speed-ups are medians of runs made back to back "
        f"(same prompt, same round) against transformers base + adapter.\n\n"
        + common.markdown_table(head, rows)
        + "\n\nGreedy tokens shared: tokens before the first difference from transformers base + "
        "adapter, mean over the prompts (round 0). Max logit diff: the GGUF loaded back with "
        f"transformers `gguf_file=` against base + adapter, one prompt; the adapter itself moves "
        f"logits by up to {adapter_effect:.1f}.\n"
    )
    common.write_markdown(args.out.with_suffix(".md"), md)
    print(md)


if __name__ == "__main__":
    main()
