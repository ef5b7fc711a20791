"""Load test for ``personatune serve`` on loopback: N concurrent clients send a fixed number
of streamed chat requests; throughput, latency, time to first token and errors are written
to ``benchmarks/results/serve_load.{json,md,png}``.

    python benchmarks/serve_load.py runs/pirate --persona pirate --clients 1,4 --requests 24

Without ``--url`` it starts ``personatune serve`` on a free 127.0.0.1 port with the given
persona directories and stops it (SIGTERM) afterwards. Only loopback addresses are accepted.
Every loop is bounded: ``--requests`` per level, and ``--time-limit`` seconds per level
after which no new request is sent. Exits 1 if any request failed.
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import os
import platform
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from urllib.parse import urlparse

import httpx
import numpy as np
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

REPO = Path(__file__).resolve().parents[1]
PROMPTS = REPO / "src/personatune/evaluate/data/general_prompts.jsonl"
console = Console(stderr=True)


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


def start_server(dirs: list[str], max_queue: int) -> tuple[subprocess.Popen, str]:
    """Start ``personatune serve`` on a free loopback port; return the process and URL."""
    cmd = [
        sys.executable,
        "-m",
        "personatune.cli",
        "serve",
        *dirs,
        "--host",
        "127.0.0.1",
        "--port",
        "0",
        "--max-queue",
        str(max_queue),
        "--log-level",
        "warning",
    ]
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1", "PERSONATUNE_API_KEY": ""}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, env=env)
    line = proc.stdout.readline()
    if " on http" not in line:
        proc.kill()
        sys.exit(f"error: the server did not start: {line.strip()}")
    url = line.split(" on ")[1].split()[0]
    for _ in range(600):
        try:
            if httpx.get(url + "/health", timeout=5).status_code == 200:
                return proc, url
        except httpx.TransportError:
            time.sleep(0.1)
    proc.kill()
    sys.exit("error: the server did not answer /health within 60 s")


def one_request(client: httpx.Client, url: str, body: dict) -> dict:
    """Send one streamed request; return latency (s), TTFT (s), completion tokens, error."""
    start = time.perf_counter()
    first = None
    tokens = 0
    try:
        with client.stream("POST", url + "/v1/chat/completions", json=body) as r:
            if r.status_code != 200:
                r.read()
                return {
                    "error": f"HTTP {r.status_code}: {r.text[:200]}",
                    "latency_s": time.perf_counter() - start,
                }
            done = False
            for line in r.iter_lines():
                if not line.startswith("data: "):
                    continue
                data = line[6:]
                if data == "[DONE]":
                    done = True
                    break
                chunk = json.loads(data)
                if "error" in chunk:
                    return {
                        "error": chunk["error"]["message"],
                        "latency_s": time.perf_counter() - start,
                    }
                if chunk.get("usage"):
                    tokens = chunk["usage"]["completion_tokens"]
                if (
                    first is None
                    and chunk["choices"]
                    and chunk["choices"][0]["delta"].get("content")
                ):
                    first = time.perf_counter() - start
            if not done:
                return {
                    "error": "stream ended without [DONE]",
                    "latency_s": time.perf_counter() - start,
                }
    except httpx.HTTPError as e:
        return {"error": f"{type(e).__name__}: {e}", "latency_s": time.perf_counter() - start}
    latency = time.perf_counter() - start
    return {
        "error": None,
        "latency_s": latency,
        "ttft_s": first if first is not None else latency,
        "completion_tokens": tokens,
    }


def run_level(
    url: str,
    model: str,
    prompts: list[str],
    clients: int,
    requests: int,
    max_tokens: int,
    time_limit: float,
    api_key: str | None,
) -> dict:
    """``clients`` threads share a counter of ``requests`` requests; each sends the next
    request when its previous one has finished (closed-loop load)."""
    lock = threading.Lock()
    next_i = [0]
    results: list[dict] = []
    deadline = time.monotonic() + time_limit
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}

    with Progress(
        TextColumn(f"{clients} client(s)"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeRemainingColumn(),
        console=console,
    ) as progress:
        task = progress.add_task("load", total=requests)

        def client_loop() -> None:
            with httpx.Client(timeout=600, headers=headers) as client:
                while time.monotonic() < deadline:
                    with lock:
                        i = next_i[0]
                        if i >= requests:
                            return
                        next_i[0] += 1
                    body = {
                        "model": model,
                        "stream": True,
                        "max_tokens": max_tokens,
                        "temperature": 0.7,
                        "seed": i,
                        "stream_options": {"include_usage": True},
                        "messages": [{"role": "user", "content": prompts[i % len(prompts)]}],
                    }
                    r = one_request(client, url, body)
                    with lock:
                        results.append(r)
                    progress.advance(task)

        start = time.perf_counter()
        threads = [threading.Thread(target=client_loop) for _ in range(clients)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        wall = time.perf_counter() - start

    ok = [r for r in results if r["error"] is None]
    lat = np.array([r["latency_s"] for r in ok]) if ok else np.array([np.nan])
    ttft = np.array([r["ttft_s"] for r in ok]) if ok else np.array([np.nan])
    tokens = sum(r["completion_tokens"] for r in ok)
    return {
        "clients": clients,
        "requests_sent": len(results),
        "requests_ok": len(ok),
        "errors": len(results) - len(ok),
        "error_messages": sorted({r["error"] for r in results if r["error"]})[:5],
        "wall_s": round(wall, 2),
        "throughput_req_per_s": round(len(ok) / wall, 3),
        "throughput_tokens_per_s": round(tokens / wall, 1),
        "completion_tokens": tokens,
        # numpy's default (linear interpolation, Hyndman & Fan type 7) percentiles
        "latency_p50_s": round(float(np.percentile(lat, 50)), 3),
        "latency_p95_s": round(float(np.percentile(lat, 95)), 3),
        "ttft_p50_s": round(float(np.percentile(ttft, 50)), 3),
        "ttft_p95_s": round(float(np.percentile(ttft, 95)), 3),
    }


def write_results(out: Path, report: dict) -> None:
    """JSON, a Markdown table and a plot, each written to a temp file and renamed."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(report, indent=2) + "\n")
    tmp.replace(out.with_suffix(".json"))

    rows = [
        (
            "| clients | requests ok / sent | errors | req/s | tokens/s | latency p50 / p95 (s) "
            "| TTFT p50 / p95 (s) |"
        ),
        "|---|---|---|---|---|---|---|",
    ]
    for lv in report["levels"]:
        rows.append(
            f"| {lv['clients']} | {lv['requests_ok']} / {lv['requests_sent']} | "
            f"{lv['errors']} | {lv['throughput_req_per_s']} | "
            f"{lv['throughput_tokens_per_s']} | {lv['latency_p50_s']} / "
            f"{lv['latency_p95_s']} | {lv['ttft_p50_s']} / {lv['ttft_p95_s']} |"
        )
    s = report["setup"]
    md = (
        f"# personatune serve under load\n\n"
        f"Model `{s['model']}` (base `{s['base_model']}`), {s['max_tokens']} max tokens per "
        f"answer, temperature 0.7, prompts from general_prompts.jsonl, streamed, loopback.\n"
        f"Machine: {s['machine']}; 1-minute load average {s['load_average_before']} before, "
        f"{s['load_average_after']} after (other processes share the cores).\n\nCommand: `{s['command']}`\n\n"
        + "\n".join(rows)
        + "\n\n"
        "Generation is serialised through one worker (adapters never mix): added clients "
        "wait in its queue, so throughput is bounded by single-stream generation speed and "
        "time to first token includes the wait. On a shared machine the load average above "
        "moves these numbers more than the number of clients does.\n"
    )
    tmp = out.with_suffix(".md.tmp")
    tmp.write_text(md)
    tmp.replace(out.with_suffix(".md"))

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    levels = report["levels"]
    x = [lv["clients"] for lv in levels]
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.5))
    for key, label in (("latency", "latency"), ("ttft", "time to first token")):
        axes[0].plot(x, [lv[f"{key}_p50_s"] for lv in levels], "o-", label=f"{label} p50")
        axes[0].plot(x, [lv[f"{key}_p95_s"] for lv in levels], "o--", label=f"{label} p95")
    axes[0].set(xlabel="concurrent clients", ylabel="seconds", title="per request", xticks=x)
    axes[0].legend(fontsize=8)
    axes[1].bar([str(c) for c in x], [lv["throughput_tokens_per_s"] for lv in levels])
    axes[1].set(xlabel="concurrent clients", ylabel="completion tokens / s", title="throughput")
    fig.tight_layout()
    tmp = out.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=120)
    tmp.replace(out.with_suffix(".png"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("persona_dirs", nargs="*", help="persona directories to serve")
    ap.add_argument("--url", help="an already running server (loopback only)")
    ap.add_argument("--persona", help="model id to load (default: the first persona)")
    ap.add_argument("--clients", default="1,4", help="comma-separated concurrency levels")
    ap.add_argument("--requests", type=int, default=24, help="requests per level")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--time-limit", type=float, default=900, help="seconds per level")
    ap.add_argument("--api-key", default=os.environ.get("PERSONATUNE_API_KEY"))
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks/results/serve_load")
    args = ap.parse_args()
    levels = [int(c) for c in args.clients.split(",")]
    if not args.url and not args.persona_dirs:
        ap.error("give persona directories to serve, or --url of a running server")
    load_before = os.getloadavg()[0]
    proc = None
    if args.url:
        url = loopback_only(args.url)
    else:
        with console.status("starting personatune serve"):
            proc, url = start_server(args.persona_dirs, max_queue=max(levels) + 4)
    try:
        health = httpx.get(url + "/health", timeout=10).json()
        personas = [m for m in health["models"] if m != "base"]
        model = args.persona or (personas[0] if personas else "base")
        prompts = [json.loads(x)["prompt"] for x in PROMPTS.read_text().splitlines() if x]
        # one warm-up request so that the first measured request pays no one-off costs
        auth = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
        with httpx.Client(timeout=600, headers=auth) as c:
            one_request(
                c,
                url,
                {
                    "model": model,
                    "max_tokens": 4,
                    "stream": True,
                    "messages": [{"role": "user", "content": "Hi"}],
                },
            )
        results = [
            run_level(
                url,
                model,
                prompts,
                c,
                args.requests,
                args.max_tokens,
                args.time_limit,
                args.api_key,
            )
            for c in levels
        ]
    finally:
        if proc:
            proc.send_signal(signal.SIGTERM)
            proc.wait(120)
    import torch

    report = {
        "setup": {
            "model": model,
            "base_model": health["base_model"],
            "max_tokens": args.max_tokens,
            "requests_per_level": args.requests,
            "machine": f"{platform.processor() or platform.machine()}, "
            f"{os.cpu_count()} CPU cores, torch {torch.__version__}, "
            f"{'CUDA' if torch.cuda.is_available() else 'CPU'}",
            "command": "python benchmarks/serve_load.py " + " ".join(sys.argv[1:]),
            # other work on the machine slows generation: the 1-minute load average
            "load_average_before": round(load_before, 2),
            "load_average_after": round(os.getloadavg()[0], 2),
            "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        },
        "levels": results,
    }
    write_results(args.out, report)
    for lv in results:
        console.print(lv)
    console.print(f"results in {args.out.with_suffix('.json')}")
    if any(lv["errors"] for lv in results):
        sys.exit(1)


if __name__ == "__main__":
    main()
