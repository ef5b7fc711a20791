"""Plumbing shared by the benchmark scripts: where the repository is, the import path,
the machine's description, the matmul peak and FLOPs per token behind every MFU, a step
timer, and writers for the JSON, Markdown and plot results.

Import it first in a script run as ``python benchmarks/NAME.py``: Python puts the
script's folder on ``sys.path``, so ``import common`` works, and importing it puts
``src/`` there too (the device machine runs the tree without installing it)::

    import common  # noqa: F401 - first: sys.path and offline Hugging Face settings
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BENCH = REPO / "benchmarks"
RESULTS = BENCH / "results"

for _p in (str(BENCH), str(REPO / "src")):
    if _p not in sys.path:
        sys.path.insert(0, _p)
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
#: Qwen2.5's config fields beside the shapes of hf_peft_baseline.py's ``ARCH``, as its
#: ``build`` sets them.
QWEN_CONFIG = {"max_position_embeddings": 32768, "rope_theta": 1e6, "rms_norm_eps": 1e-6}
#: A 2-layer stand-in of a decoder's shape for checking a GPU script on a CPU; not a
#: benchmark shape.
TINY = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
}


# ---------------------------------------------------------------------------------------
# The machine.


def cpu_model() -> dict:
    """``{"cpu", "amx", "bf16_matmul_isa"}``: ``lscpu``'s model name, whether the CPU has
    AMX tiles (``amx_bf16``; Intel Sapphire Rapids and later), and which bf16 matmul
    instruction sets it has (``avx512_bf16``, ``amx_bf16``); None and empty without lscpu."""
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout
    except OSError:
        out = ""
    fields = {k.strip(): v.strip() for k, _, v in (ln.partition(":") for ln in out.splitlines())}
    isa = [f for f in ("avx512_bf16", "amx_bf16") if f in fields.get("Flags", "").split()]
    return {"cpu": fields.get("Model name"), "amx": "amx_bf16" in isa, "bf16_matmul_isa": isa}


def machine_info(packages: tuple[str, ...] = ("transformers", "peft")) -> dict:
    """What a result was measured on: platform, Python, torch, CPU (model name, AMX,
    bf16 instruction sets, cores, RAM in GiB), the GPU's name when CUDA is available, the
    1-minute load average (other jobs slow a shared machine), and ``packages``' versions
    (``"missing"`` when not installed)."""
    from importlib.metadata import PackageNotFoundError, version

    import torch

    info = {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        **cpu_model(),
        "cores": os.cpu_count(),
    }
    try:
        kib = Path("/proc/meminfo").read_text().split("\n")[0].split()[1]
        info["ram_gib"] = round(int(kib) / 2**20, 1)
    except (OSError, IndexError, ValueError):
        pass
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    if hasattr(os, "getloadavg"):
        info["load_average"] = round(os.getloadavg()[0], 2)
    for dist in packages:
        try:
            info[dist] = version(dist)
        except PackageNotFoundError:
            info[dist] = "missing"
    return info


def describe(info: dict) -> str:
    """One line naming the machine of :func:`machine_info`, for a Markdown header."""
    cpu = f"{info.get('cpu') or platform.machine()} ({'AMX' if info.get('amx') else 'no AMX'})"
    gpu = f", {info['gpu']}" if info.get("gpu") else ""
    return f"{cpu}, {info.get('cores')} cores{gpu}, torch {info.get('torch')}"


# ---------------------------------------------------------------------------------------
# Compute: peak and work per token.


def sync(device=None) -> None:
    """Wait for queued CUDA work (a no-op on CPU), so that wall-clock timings are real."""
    import torch

    if torch.cuda.is_available() and (device is None or str(device).startswith("cuda")):
        torch.cuda.synchronize()


def matmul_peak(device: str = "cuda", dtype: str = "bfloat16") -> float:
    """Measured dense matmul throughput, in FLOP/s, the denominator of every MFU here.

    CUDA: 8192 x 8192 x 8192, mean of 20 after 3 warm-ups (as ../shared/docs/GPU.md's
    baseline measures it). CPU: 2048 x 2048 x 2048, best of three rounds of 8 (a shared
    machine's other jobs only ever slow a round down).
    """
    import torch

    dt = getattr(torch, dtype)
    if device.startswith("cuda"):
        n = 8192
        a = torch.randn(n, n, device=device, dtype=dt)
        b = torch.randn(n, n, device=device, dtype=dt)
        for _ in range(3):
            a @ b
        torch.cuda.synchronize()
        t = time.perf_counter()
        for _ in range(20):
            a @ b
        torch.cuda.synchronize()
        return 20 * 2 * n**3 / (time.perf_counter() - t)
    n, reps = 2048, 8
    a, b = torch.randn(n, n, dtype=dt), torch.randn(n, n, dtype=dt)
    a @ b
    best = 0.0
    for _ in range(3):
        t = time.perf_counter()
        for _ in range(reps):
            a @ b
        best = max(best, reps * 2 * n**3 / (time.perf_counter() - t))
    return best


def matmul_params(config) -> int:
    """Parameters in matrix multiplies per token of a Llama-like decoder ``config``
    (attention q/k/v/o, the gated MLP, the output layer); embeddings and norms left out."""
    d, L, V = config.hidden_size, config.num_hidden_layers, config.vocab_size
    kv = d // config.num_attention_heads * config.num_key_value_heads
    return L * (2 * d * d + 2 * d * kv + 3 * d * config.intermediate_size) + V * d


def flops_per_token(config, context: float, n_matmul: int | None = None) -> float:
    """FLOP per trained token of LoRA training (../shared/docs/GPU.md): 4 x matmul
    parameters (forward 2N + input-gradient backward 2N; frozen weights get no weight
    gradient) + 12 x layers x ``context`` (tokens attended) x hidden for attention.
    ``n_matmul`` overrides :func:`matmul_params` (e.g. counted from a built model's
    linear layers). Recomputation under gradient checkpointing is not counted."""
    n = matmul_params(config) if n_matmul is None else n_matmul
    return 4 * n + 12 * config.num_hidden_layers * context * config.hidden_size


def pad_tokenizer():
    """A one-token (``<pad>``) tokenizer for random-token rows: the trainer's collators
    only need it to pad."""
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    word_level = models.WordLevel({"<pad>": 0}, unk_token="<pad>")
    return PreTrainedTokenizerFast(tokenizer_object=Tokenizer(word_level), pad_token="<pad>")


def step_timer():
    """A transformers ``TrainerCallback`` recording each optimizer step's wall time in
    seconds (CUDA synchronised at its start and end) in ``.times``."""
    from transformers import TrainerCallback

    class StepTimer(TrainerCallback):
        def __init__(self):
            self.times: list[float] = []

        def on_step_begin(self, args, state, control, **kw):
            sync()
            self.t0 = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            sync()
            self.times.append(time.perf_counter() - self.t0)

    return StepTimer()


# ---------------------------------------------------------------------------------------
# Results.


def _replace(path: Path, write) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{path.suffix}")
    write(tmp)
    tmp.replace(path)
    return path


def write_json(path: Path, data) -> Path:
    """Write ``data`` as indented JSON (temp file, then rename)."""
    return _replace(path, lambda t: t.write_text(json.dumps(data, indent=2) + "\n"))


def write_markdown(path: Path, text: str) -> Path:
    """Write a Markdown result (temp file, then rename), ending in one newline."""
    return _replace(path, lambda t: t.write_text(text.rstrip("\n") + "\n"))


def markdown_table(head: list[str], rows: list[list]) -> str:
    """A Markdown table; cells are written with ``str``."""
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(lines)


def figure(*args, **kwargs):
    """``matplotlib.pyplot.subplots(*args, **kwargs)`` on the file-only Agg backend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt.subplots(*args, **kwargs)


def save_plot(fig, path: Path, dpi: int = 120) -> Path:
    """Save a matplotlib figure as PNG (temp file, then rename) and close it."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    out = _replace(path, lambda t: fig.savefig(t, dpi=dpi, format="png"))
    plt.close(fig)
    return out
