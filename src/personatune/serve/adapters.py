"""Many personas on one base model: a peft multi-adapter registry, and the one generation
worker that runs requests one at a time so that adapters never mix."""

from __future__ import annotations

import contextlib
import copy
import logging
import queue
import threading
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from personatune.config import PersonaSpec, load_spec
from personatune.data.chat import ensure_chat_template
from personatune.errors import PersonatuneError
from personatune.models import load_model, load_tokenizer, resolve_ref

log = logging.getLogger("personatune.serve")

#: Model id under which the base model itself (no adapter) is served.
BASE_ID = "base"

#: Context length used when the model config names none (tokens).
DEFAULT_CONTEXT = 2048


@dataclass
class ServedPersona:
    """One servable model: a persona's adapter, or the base model (``adapter`` None).

    Attributes:
        name: the model id clients send (``pirate``; :data:`BASE_ID` for the base model).
        description: one or two sentences for people (the web chat shows it).
        system_prompt: prepended to conversations per the server's policy; "" for none.
        tokenizer: the tokenizer with this persona's chat template.
        adapter: the peft adapter name, or None for the base model.
        path: the persona directory, or None for the base model.
        test_prompts: the spec's test prompts (``chat --quick-test``).
        created: Unix time the persona directory was written (seconds).
    """

    name: str
    description: str
    system_prompt: str
    tokenizer: object
    adapter: str | None = None
    path: Path | None = None
    test_prompts: list[str] = field(default_factory=list)
    created: int = 0


@dataclass
class Registry:
    """The base model with every persona's adapter loaded onto it.

    Attributes:
        model: a peft ``PeftModel`` holding one adapter per persona (adapter name = persona
            name). Switch with ``model.set_adapter(name)``; the base model is
            ``with model.disable_adapter():``.
        base_model: the base model reference shared by all personas (``embedded``).
        personas: model id -> :class:`ServedPersona`, the base model first.
        context_length: the most tokens prompt plus answer may hold.
    """

    model: object
    base_model: str
    personas: dict[str, ServedPersona]
    context_length: int

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device


def _read_spec(path: Path) -> PersonaSpec:
    if not (path / "adapter_config.json").exists() or not (path / "config.yaml").exists():
        raise PersonatuneError(
            f"{path}: not a persona directory (no adapter_config.json or "
            "config.yaml); train one with personatune train"
        )
    return load_spec(path / "config.yaml")


def load_registry(dirs: list[str | Path], device: torch.device | None = None) -> Registry:
    """Load one base model and put every persona's LoRA adapter onto it (peft
    multi-adapter: ``PeftModel.from_pretrained`` for the first, ``load_adapter`` for the
    rest). The base model is served too, as :data:`BASE_ID`.

    Args:
        dirs: persona directories written by ``personatune train``.
        device: where the model goes; default :func:`personatune.models.pick_device`.

    Raises:
        PersonatuneError: no directory, a folder that is not a persona, two personas with
            one name (or one named ``base``), or personas trained on different base models
            or quantisations (one process serves one base model).
    """
    from peft import PeftModel

    if not dirs:
        raise PersonatuneError("give at least one persona directory")
    paths = [Path(d) for d in dirs]
    specs = [_read_spec(p) for p in paths]
    seen: dict[str, Path] = {}
    for p, s in zip(paths, specs):
        if s.name == BASE_ID:
            raise PersonatuneError(
                f"{p}: the name '{BASE_ID}' is kept for the base model; "
                "rename the persona (name: in its YAML) and retrain"
            )
        if s.name in seen:
            raise PersonatuneError(
                f"{p} and {seen[s.name]} are both named '{s.name}'; "
                "serve personas with different names"
            )
        seen[s.name] = p

    refs = [resolve_ref(s.model.name, s.model.revision, s.base_dir) for s in specs]
    first = (refs[0].kind, refs[0].fingerprint(), specs[0].model.quantization)
    for p, s, r in zip(paths[1:], specs[1:], refs[1:]):
        if (r.kind, r.fingerprint(), s.model.quantization) != first:
            raise PersonatuneError(
                f"{p}: trained on base model '{r.name}' ({s.model.quantization}) but "
                f"{paths[0]} on '{refs[0].name}' ({specs[0].model.quantization}); all personas "
                "of one server must share the same base model: start one server per base model"
            )

    tokenizer = load_tokenizer(refs[0])
    ensure_chat_template(tokenizer)
    base = load_model(refs[0], specs[0].model.quantization, device)
    model = None
    personas = {
        BASE_ID: ServedPersona(
            BASE_ID, f"The base model ({refs[0].name}) without any persona adapter.", "", tokenizer
        )
    }
    for p, s in zip(paths, specs):
        if model is None:
            model = PeftModel.from_pretrained(base, p, adapter_name=s.name)
        else:
            model.load_adapter(p, adapter_name=s.name)
        tok = tokenizer
        if s.model.chat_template:  # a persona-specific template needs its own tokenizer object
            tok = copy.copy(tokenizer)
            ensure_chat_template(tok, s.model.chat_template)
        stamp = p / "persona.json"
        personas[s.name] = ServedPersona(
            s.name,
            s.description,
            s.system_prompt,
            tok,
            adapter=s.name,
            path=p,
            test_prompts=list(s.test_prompts),
            created=int((stamp if stamp.exists() else p).stat().st_mtime),
        )
    model.eval()
    ctx = getattr(base.config, "max_position_embeddings", None) or DEFAULT_CONTEXT
    return Registry(model, refs[0].name, personas, int(ctx))


@contextlib.contextmanager
def use_adapter(model, adapter: str | None):
    """Make ``adapter`` the active one for the block; None runs the base model
    (``disable_adapter``). Not thread-safe: only one caller may generate at a time."""
    if adapter is None:
        with model.disable_adapter():
            yield
    else:
        model.set_adapter(adapter, inference_mode=True)
        yield


# ---------------------------------------------------------------- generation events


@dataclass
class Delta:
    """New answer text (a suffix of what was sent before)."""

    text: str


@dataclass
class Done:
    """The answer is complete.

    Attributes:
        finish_reason: ``stop`` (end-of-turn token or stop sequence), ``length``
            (``max_new_tokens`` reached) or ``cancelled`` (the client went away).
        prompt_tokens: tokens in the rendered prompt.
        completion_tokens: tokens generated, the end-of-turn token included.
    """

    finish_reason: str
    prompt_tokens: int
    completion_tokens: int


@dataclass
class Failed:
    """Generation raised; ``message`` says what went wrong."""

    message: str


Event = Delta | Done | Failed


@dataclass
class Job:
    """One generation request for the worker.

    Attributes:
        adapter: persona adapter name, or None for the base model.
        tokenizer: tokenizer used to decode the answer.
        input_ids: the rendered prompt's token ids.
        max_new_tokens: most tokens to generate.
        temperature: 0 is greedy; otherwise sampling temperature.
        top_p: nucleus sampling mass in (0, 1]; 1 turns it off.
        seed: seeds Python, NumPy and torch (``transformers.set_seed``) before generating.
        stop: strings that end the answer; the answer is cut before the first one.
        emit: called from the worker thread with each :data:`Event`; must be thread-safe.
        cancel: set it to stop generating at the next token (client disconnect).
    """

    adapter: str | None
    tokenizer: object
    input_ids: list[int]
    max_new_tokens: int
    temperature: float
    top_p: float
    seed: int
    emit: Callable[[Event], None]
    stop: list[str] = field(default_factory=list)
    cancel: threading.Event = field(default_factory=threading.Event)


def visible_text(text: str, stops: list[str], final: bool) -> tuple[str, bool]:
    """The part of the answer ``text`` that can be shown now, and whether a stop sequence
    was hit.

    The answer is stripped of surrounding whitespace and cut before the first stop
    sequence. While generation goes on (``final`` False), a tail that could still grow
    into a stop sequence, and trailing whitespace, are held back, so each call returns an
    extension of what the previous call returned.
    """
    t = text.lstrip()
    hits = [i for i in (t.find(s) for s in stops) if i >= 0]
    if hits:
        return t[: min(hits)].rstrip(), True
    if not final:
        hold = max((k for s in stops for k in range(1, len(s)) if t.endswith(s[:k])), default=0)
        t = t[: len(t) - hold]
    return t.rstrip(), False


class _Streamer:
    """A ``generate`` streamer that decodes the whole answer after each token (so the
    text equals a one-shot ``decode``) and emits the newly visible part."""

    def __init__(self, job: Job):
        self.job = job
        self.ids: list[int] = []
        self.sent = ""
        self.prompt_seen = False
        self.stop_hit = False

    def put(self, value: torch.Tensor) -> None:
        if not self.prompt_seen:  # generate() first passes the prompt
            self.prompt_seen = True
            return
        self.ids += value.reshape(-1).tolist()
        self._push(final=False)

    def end(self) -> None:
        self._push(final=True)

    def _push(self, final: bool) -> None:
        if self.stop_hit:
            return
        text = self.job.tokenizer.decode(self.ids, skip_special_tokens=True)
        if not final:
            text = text.rstrip("\ufffd")  # an unfinished multi-byte character
        shown, self.stop_hit = visible_text(text, self.job.stop, final)
        if len(shown) > len(self.sent) and shown.startswith(self.sent):
            self.job.emit(Delta(shown[len(self.sent) :]))
            self.sent = shown


class _StopWhen:
    """A ``StoppingCriteria`` that ends generation when ``flag()`` turns true."""

    def __init__(self, flag: Callable[[], bool]):
        self.flag = flag

    def __call__(self, input_ids: torch.Tensor, scores, **kwargs) -> torch.Tensor:
        return torch.full(
            (input_ids.shape[0],), self.flag(), dtype=torch.bool, device=input_ids.device
        )


def run_job(model, job: Job) -> Done:
    """Generate the answer for ``job`` on ``model`` (a peft model with the job's adapter
    loaded), emitting :class:`Delta` events as text appears. Same decoding settings as
    :func:`personatune.generate.generate` for one conversation, so the answer equals
    what that function gives for the same seed. Returns the :class:`Done` event (also
    emitted)."""
    from transformers import StoppingCriteriaList, set_seed

    device = next(model.parameters()).device
    ids = torch.tensor([job.input_ids], device=device)
    streamer = _Streamer(job)
    sample = job.temperature > 0
    set_seed(job.seed)
    with use_adapter(model, job.adapter), torch.inference_mode():
        out = model.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=job.max_new_tokens,
            do_sample=sample,
            temperature=job.temperature if sample else None,
            top_p=job.top_p if sample and job.top_p < 1 else None,
            top_k=None,
            pad_token_id=job.tokenizer.pad_token_id,
            streamer=streamer,
            stopping_criteria=StoppingCriteriaList(
                [_StopWhen(lambda: streamer.stop_hit or job.cancel.is_set())]
            ),
        )
    new = out[0, ids.shape[1] :].tolist()
    eos = model.generation_config.eos_token_id
    eos = set(eos if isinstance(eos, list) else [eos]) | {job.tokenizer.eos_token_id}
    if job.cancel.is_set():
        reason = "cancelled"
    elif streamer.stop_hit or (new and new[-1] in eos):
        reason = "stop"
    else:
        reason = "length" if len(new) >= job.max_new_tokens else "stop"
    done = Done(reason, ids.shape[1], len(new))
    job.emit(done)
    return done


class QueueFull(Exception):
    """The worker's queue holds ``max_queue`` requests already."""


class Worker:
    """One thread that runs generation jobs in arrival order, one at a time.

    Serialising generation is what keeps concurrent requests for different personas
    apart: the active adapter is set per job, and no other job runs until it is done.

    Args:
        model: the registry's peft model.
        max_queue: most jobs waiting (not counting the one generating); more raise
            :class:`QueueFull` (HTTP 429).
    """

    def __init__(self, model, max_queue: int = 16):
        self.model = model
        self.max_queue = max_queue
        self.queue: queue.Queue[Job | None] = queue.Queue(max_queue)
        self.finished: Counter[str] = Counter()
        """Finished jobs by finish reason (``stop``, ``length``, ``cancelled``, ``error``)."""
        self._gate = threading.Lock()
        self._thread = threading.Thread(target=self._loop, name="personatune-generate", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def submit(self, job: Job) -> None:
        """Queue ``job``. Raises :class:`QueueFull` when ``max_queue`` jobs wait."""
        try:
            self.queue.put_nowait(job)
        except queue.Full:
            raise QueueFull from None

    @property
    def waiting(self) -> int:
        """Jobs queued and not yet started."""
        return self.queue.qsize()

    @contextlib.contextmanager
    def paused(self):
        """Hold generation for the block: the running job finishes first, new jobs queue
        up (and overflow into :class:`QueueFull`) until the block ends."""
        with self._gate:
            yield

    def stop(self, timeout: float | None = None) -> None:
        """Finish every queued job, then end the thread."""
        self.queue.put(None)
        self._thread.join(timeout)

    def _loop(self) -> None:
        while (job := self.queue.get()) is not None:
            with self._gate:
                try:
                    if job.cancel.is_set():  # the client left while the job waited
                        done = Done("cancelled", len(job.input_ids), 0)
                        job.emit(done)
                    else:
                        done = run_job(self.model, job)
                    self.finished[done.finish_reason] += 1
                except Exception as e:  # one failing request must not kill the server
                    log.exception("generation failed")
                    self.finished["error"] += 1
                    with contextlib.suppress(Exception):
                        job.emit(Failed(f"generation failed: {type(e).__name__}: {e}"))
