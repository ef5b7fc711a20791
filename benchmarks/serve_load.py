"""Load test for ``personatune serve`` on loopback: N concurrent clients, each sending
streamed chat requests one after another (closed loop) to a mix of two personas and the
base model; requests/s, generated tokens/s, latency and time to first token (TTFT)
percentiles and errors per level, each level's tokens/s as a multiple of the 1-client
level of the same run. Results: ``benchmarks/results/serve_load_{cpu,cuda}.{json,md,png}``.

    # CPU, the embedded model with two briefly trained personas
    python benchmarks/serve_load.py /tmp/engine/pirate /tmp/engine/parrot --clients 1,8,32
    # CUDA: the Qwen2.5-0.5B shape with random weights and two random r=16 adapters
    python benchmarks/serve_load.py --synthetic qwen2.5-0.5b --tokenizer .whl/tok \\
        --quantization none,nf4 --max-batch 32 --max-queue 64 --max-tokens 128

Without ``--url`` it starts ``personatune serve`` on a free 127.0.0.1 port with the given
persona directories (``--max-batch``, ``--max-queue``) and stops it (SIGTERM) afterwards.
Only loopback addresses are accepted. Every loop is bounded: ``--rounds`` requests per
client (at least ``--min-requests`` per level), and ``--time-limit`` seconds per level
after which no new request is sent. Exits 1 if any request failed.
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from urllib.parse import urlparse

import common  # first: sys.path and offline Hugging Face settings
import httpx
import numpy as np
from hf_peft_baseline import ARCH

PROMPTS = common.REPO / "src/personatune/evaluate/data/general_prompts.jsonl"

#: Model shapes for ``--synthetic`` (Qwen2.5 configs, hf_peft_baseline.py's; the vocabulary
#: is the tokenizer's).
SHAPES = {
    "qwen2.5-0.5b": {**ARCH["qwen2.5-0.5b"], **common.QWEN_CONFIG},
    "tiny": dict(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,
    ),  # fmt: skip
}

#: The one-request-at-a-time server before continuous batching (issue 10): one H200,
#: Qwen2.5-0.5B shape, NF4 base, the pirate adapter, 128 new tokens.
OLD_CUDA = [
    {"clients": 1, "tokens_per_s": 13.7, "note": ""},
    {"clients": 8, "tokens_per_s": 16.3, "note": ""},
    {"clients": 32, "tokens_per_s": 15.0, "note": "p95 TTFT 130 s; 15 of 32 got HTTP 429"},
]


def loopback_only(url: str) -> str:
    """Return ``url`` if its host is a loopback address, else exit: load goes nowhere else."""
    host = urlparse(url).hostname or ""
    try:
        ok = host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        ok = False
    if not ok:
        sys.exit(f"error: --url {url}: only loopback addresses (127.0.0.0/8, ::1) are allowed")
    return url.rstrip("/")


def synthetic_personas(
    work: Path, shape: str, tokenizer: Path, quantization: str, init_range: float | None = None
) -> list[Path]:
    """A base model of ``shape`` with random bf16 weights and two persona directories
    with random r=16 all-linear LoRA adapters (B not zero, so that each changes the
    answers), under ``work``. Speed does not depend on the weight values.
    ``init_range``: the weights' normal std (transformers' ``initializer_range``, default
    0.02, which gives nearly flat logits); a larger one gives peaked logits, fewer ties."""
    import torch
    import yaml
    from peft import LoraConfig, get_peft_model
    from transformers import AutoTokenizer, Qwen2Config, Qwen2ForCausalLM

    tok = AutoTokenizer.from_pretrained(tokenizer)
    tag = f"-init{init_range}" if init_range else ""
    base = work / f"base-{shape}{tag}"
    if not (base / "config.json").exists():
        cfg = Qwen2Config(
            **dict(SHAPES[shape], vocab_size=len(tok)), bos_token_id=tok.bos_token_id,
            eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
            **({"initializer_range": init_range} if init_range else {}),
        )  # fmt: skip
        torch.manual_seed(0)
        model = Qwen2ForCausalLM(cfg).to(torch.bfloat16)
        model.save_pretrained(base)
        tok.save_pretrained(base)
    dirs = []
    for name, seed in (("pirate", 1), ("parrot", 2)):
        out = work / f"{name}-{shape}-{quantization}{tag}"
        dirs.append(out)
        if (out / "config.yaml").exists():
            continue
        torch.manual_seed(seed)
        model = Qwen2ForCausalLM.from_pretrained(base, dtype=torch.bfloat16)
        peft = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, target_modules="all-linear"))
        for n, p in peft.named_parameters():
            if "lora_B" in n:
                torch.nn.init.normal_(p, std=0.02)
        peft.save_pretrained(out)
        (out / "pairs.csv").write_text("prompt,response\nHi,Ahoy\n")
        spec = {
            "name": name,
            "description": f"Synthetic persona {name} (random adapter) for load tests.",
            "system_prompt": f"You are {name}.",
            "model": {"name": str(base.resolve()), "quantization": quantization},
            "data": [{"path": "pairs.csv"}],
        }
        (out / "config.yaml").write_text(yaml.safe_dump(spec))
    return dirs


def start_server(dirs: list[Path], max_batch: int, max_queue: int) -> tuple[subprocess.Popen, str]:
    """Start ``personatune serve`` on a free loopback port; return the process and URL."""
    cmd = [sys.executable, "-m", "personatune.cli", "serve", *map(str, dirs), "--host",
           "127.0.0.1", "--port", "0", "--max-batch", str(max_batch), "--max-queue",
           str(max_queue), "--log-level", "warning"]  # fmt: skip
    path = os.pathsep.join([str(common.REPO / "src"), os.environ.get("PYTHONPATH", "")])
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "PERSONATUNE_API_KEY": "", "PYTHONPATH": path}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, env=env)
    line = proc.stdout.readline()
    if " on http" not in line:
        proc.kill()
        sys.exit(f"error: the server did not start: {line.strip()}")
    url = line.split(" on ")[1].split()[0]
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            if httpx.get(url + "/health", timeout=5).status_code == 200:
                return proc, url
        except httpx.TransportError:
            time.sleep(0.1)
    proc.kill()
    sys.exit("error: the server did not answer /health within 120 s")


def one_request(client: httpx.Client, url: str, body: dict) -> dict:
    """Send one streamed request; return latency (s), TTFT (s), completion tokens, error."""
    start = time.perf_counter()
    first, tokens, done = None, 0, False
    try:
        with client.stream("POST", url + "/v1/chat/completions", json=body) as r:
            if r.status_code != 200:
                r.read()
                return {"error": f"HTTP {r.status_code}: {r.text[:200]}",
                        "latency_s": time.perf_counter() - start}  # fmt: skip
            for line in r.iter_lines():
                if not line.startswith("data: "):
                    continue
                if line == "data: [DONE]":
                    done = True
                    break
                chunk = json.loads(line[6:])
                if "error" in chunk:
                    return {"error": chunk["error"]["message"],
                            "latency_s": time.perf_counter() - start}  # fmt: skip
                if chunk.get("usage"):
                    tokens = chunk["usage"]["completion_tokens"]
                delta = chunk["choices"][0]["delta"] if chunk["choices"] else {}
                if first is None and delta.get("content"):
                    first = time.perf_counter() - start
    except httpx.HTTPError as e:
        return {"error": f"{type(e).__name__}: {e}", "latency_s": time.perf_counter() - start}
    latency = time.perf_counter() - start
    if not done:
        return {"error": "stream ended without [DONE]", "latency_s": latency}
    return {"error": None, "latency_s": latency,
            "ttft_s": first if first is not None else latency, "completion_tokens": tokens}  # fmt: skip


def run_level(url: str, models: list[str], prompts: list[str], clients: int, requests: int,
              args) -> dict:  # fmt: skip
    """``clients`` threads share a counter of ``requests`` requests; each sends the next
    when its previous one has finished (closed loop). Request ``i`` goes to
    ``models[i % len(models)]``."""
    lock = threading.Lock()
    next_i = [0]
    results: list[dict] = []
    deadline = time.monotonic() + args.time_limit

    def client_loop() -> None:
        with httpx.Client(timeout=600) as client:
            while time.monotonic() < deadline:
                with lock:
                    i = next_i[0]
                    if i >= requests:
                        return
                    next_i[0] += 1
                body = {
                    "model": models[i % len(models)],
                    "stream": True,
                    "max_tokens": args.max_tokens,
                    "temperature": args.temperature,
                    "seed": i,
                    "stream_options": {"include_usage": True},
                    "messages": [{"role": "user", "content": prompts[i % len(prompts)]}],
                }
                r = one_request(client, url, body)
                with lock:
                    results.append(r)

    start = time.perf_counter()
    threads = [threading.Thread(target=client_loop) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    ok = [r for r in results if r["error"] is None]
    lat = np.array([r["latency_s"] for r in ok] or [np.nan])
    ttft = np.array([r["ttft_s"] for r in ok] or [np.nan])
    tokens = sum(r["completion_tokens"] for r in ok)

    def pct(a, q):  # numpy's default (linear, Hyndman & Fan type 7) percentiles
        return round(float(np.percentile(a, q)), 3)

    return {
        "clients": clients,
        "requests_sent": len(results),
        "requests_ok": len(ok),
        "errors": len(results) - len(ok),
        "error_messages": sorted({r["error"] for r in results if r["error"]})[:5],
        "wall_s": round(wall, 2),
        "requests_per_s": round(len(ok) / wall, 3),
        "tokens_per_s": round(tokens / wall, 1),
        "completion_tokens": tokens,
        "latency_p50_s": pct(lat, 50),
        "latency_p95_s": pct(lat, 95),
        "ttft_p50_s": pct(ttft, 50),
        "ttft_p95_s": pct(ttft, 95),
    }


def measure(dirs: list[Path] | None, url: str | None, levels: list[int], args) -> dict:
    """Start a server (unless ``url``), warm it up, run every level, stop it."""
    proc = None
    if url is None:
        proc, url = start_server(dirs, args.max_batch, args.max_queue)
    try:
        health = httpx.get(url + "/health", timeout=10).json()
        personas = [m for m in health["models"] if m != "base"]
        models = personas[:2] + ["base"]
        prompts = [json.loads(x)["prompt"] for x in PROMPTS.read_text().splitlines() if x]
        with httpx.Client(timeout=600) as c:  # warm-up: one-off costs out of the first level
            for m in models:
                one_request(c, url, {"model": m, "max_tokens": 4, "stream": True,
                                     "messages": [{"role": "user", "content": "Hi"}]})  # fmt: skip
        load = os.getloadavg()[0]
        out = []
        for c in levels:
            out.append(run_level(url, models, prompts, c, max(args.min_requests,
                                                               c * args.rounds), args))  # fmt: skip
            print(json.dumps(out[-1]), flush=True)
    finally:
        if proc:
            proc.send_signal(signal.SIGTERM)
            proc.wait(120)
    base = out[0]["tokens_per_s"] or float("nan")
    for lv in out:
        lv["tokens_per_s_vs_first_level"] = round(lv["tokens_per_s"] / base, 2)
    return {"base_model": health["base_model"], "models": models, "levels": out,
            "load_average_before": round(load, 2),
            "load_average_after": round(os.getloadavg()[0], 2)}  # fmt: skip


def write_results(out: Path, report: dict) -> None:
    """JSON, a Markdown table and a plot (each written to a temp file and renamed)."""
    common.write_json(out.with_suffix(".json"), report)
    s = report["setup"]
    head = ["run", "clients", "requests ok / sent", "errors", "req/s", "tokens/s",
            "x 1 client", "latency p50 / p95 (s)", "TTFT p50 / p95 (s)"]  # fmt: skip
    rows = [
        [
            r["label"],
            lv["clients"],
            f"{lv['requests_ok']} / {lv['requests_sent']}",
            lv["errors"],
            lv["requests_per_s"],
            lv["tokens_per_s"],
            lv["tokens_per_s_vs_first_level"],
            f"{lv['latency_p50_s']} / {lv['latency_p95_s']}",
            f"{lv['ttft_p50_s']} / {lv['ttft_p95_s']}",
        ]  # fmt: skip
        for r in report["runs"]
        for lv in r["levels"]
    ]
    loads = ", ".join(
        f"{r['label']}: {r['load_average_before']} before, {r['load_average_after']} after"
        for r in report["runs"]
    )
    md = (
        "# personatune serve under load (continuous batching)\n\n"
        f"Each client sends streamed requests one after another, cycling over "
        f"{', '.join(report['runs'][0]['models'])}; {s['max_tokens']} max tokens per answer, "
        f"temperature {s['temperature']}, prompts from general_prompts.jsonl, loopback. "
        f"Server: `--max-batch {s['max_batch']} --max-queue {s['max_queue']}`.\n\n"
        f"Machine: {common.describe(s['machine'])}. 1-minute load average ({loads}).\n\n"
        f"Command: `{s['command']}`\n\n" + common.markdown_table(head, rows) + "\n"
    )
    if s["device"] == "cuda":
        md += (
            "\nBefore continuous batching (issue 10, one request at a time, one H200, "
            "Qwen2.5-0.5B shape, NF4, one adapter, 128 tokens):\n\n"
            + common.markdown_table(
                ["clients", "tokens/s", "note"],
                [[o["clients"], o["tokens_per_s"], o["note"]] for o in OLD_CUDA],
            )  # fmt: skip
            + "\n"
        )
    common.write_markdown(out.with_suffix(".md"), md)
    fig, axes = common.figure(1, 2, figsize=(10, 3.8))
    for r in report["runs"]:
        x = [lv["clients"] for lv in r["levels"]]
        axes[0].plot(x, [lv["tokens_per_s"] for lv in r["levels"]], "o-", label=r["label"])
        axes[1].plot(x, [lv["ttft_p95_s"] for lv in r["levels"]], "o--", label=f"{r['label']} p95")
        axes[1].plot(x, [lv["ttft_p50_s"] for lv in r["levels"]], "o-", label=f"{r['label']} p50")
    axes[0].set(xlabel="concurrent clients", ylabel="generated tokens / s", title="throughput",
                xscale="log", xticks=x, xticklabels=[str(c) for c in x])  # fmt: skip
    axes[1].set(xlabel="concurrent clients", ylabel="seconds", title="time to first token",
                xscale="log", xticks=x, xticklabels=[str(c) for c in x])  # fmt: skip
    axes[0].legend(fontsize=8)
    axes[1].legend(fontsize=7)
    common.save_plot(fig, out.with_suffix(".png"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("persona_dirs", nargs="*", type=Path, help="two persona directories")
    ap.add_argument("--url", help="an already running server (loopback only)")
    ap.add_argument("--synthetic", choices=sorted(SHAPES), help="random base + adapters")
    ap.add_argument("--tokenizer", type=Path, help="tokenizer folder for --synthetic")
    ap.add_argument("--quantization", default="none", help="none and/or nf4, comma-separated")
    ap.add_argument("--work", type=Path, default=Path("/tmp/serve_load"), help="--synthetic dir")
    ap.add_argument("--clients", default="1,8,32", help="comma-separated concurrency levels")
    ap.add_argument("--rounds", type=int, default=3, help="requests per client per level")
    ap.add_argument("--min-requests", type=int, default=8, help="fewest requests per level")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--temperature", type=float, default=0.7)
    ap.add_argument("--max-batch", type=int, default=8)
    ap.add_argument("--max-queue", type=int, default=64)
    ap.add_argument("--time-limit", type=float, default=900, help="seconds per level")
    ap.add_argument("--out", type=Path, help="result stem; default results/serve_load_DEVICE")
    args = ap.parse_args()
    import torch

    levels = [int(c) for c in args.clients.split(",")]
    device = "cuda" if torch.cuda.is_available() else "cpu"
    runs = []
    if args.url:
        runs.append({"label": "url", **measure(None, loopback_only(args.url), levels, args)})
    elif args.synthetic:
        for q in args.quantization.split(","):
            dirs = synthetic_personas(args.work, args.synthetic, args.tokenizer, q)
            label = f"{args.synthetic} {'bf16' if q == 'none' else q}"
            runs.append({"label": label, **measure(dirs, None, levels, args)})
    elif len(args.persona_dirs) >= 1:
        runs.append({"label": "persona dirs", **measure(args.persona_dirs, None, levels, args)})
    else:
        ap.error("give persona directories, --synthetic SHAPE or --url")
    report = {
        "setup": {
            "device": device,
            "machine": common.machine_info(),
            "max_tokens": args.max_tokens,
            "temperature": args.temperature,
            "max_batch": args.max_batch,
            "max_queue": args.max_queue,
            "command": "python benchmarks/serve_load.py " + " ".join(sys.argv[1:]),
            "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        },
        "runs": runs,
    }
    out = args.out or common.RESULTS / f"serve_load_{device}"
    write_results(out, report)
    print(f"results in {out.with_suffix('.json')}")
    if any(lv["errors"] for r in runs for lv in r["levels"]):
        sys.exit(1)


if __name__ == "__main__":
    main()
