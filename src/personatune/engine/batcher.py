"""Iteration-level (continuous) batching: rows for different personas and the base model
share each forward pass, new rows join between decoding steps and finished rows leave.

Why our own loop: transformers' ``ContinuousBatchingManager`` (``generate_batch``, 5.23)
packs every request into one row (``model_runner.py`` calls ``model(**batch_data)`` with a
``(1, total_tokens)`` batch over a paged cache), so peft's per-row ``adapter_names`` cannot
tell requests apart and it cannot serve several adapters in one batch. Here each row keeps
its own slice of one transformers ``DynamicCache`` (``(batch, heads, seq, head_dim)``,
left-padded); the requests that join between two steps are prefilled together in one
left-padded forward pass and padded in on the left; ``batch_select_indices`` drops
finished rows and all-padding columns on the left are cut. Each row's persona is applied
by a per-row mask in every LoRA layer (:mod:`personatune.engine.lora`, measured there).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from transformers.cache_utils import DynamicCache, DynamicLayer

from personatune.engine.attention import use_decode_attention
from personatune.engine.lora import masked_state
from personatune.engine.sampling import Sampling, choose, end_of_turn_ids, visible_text
from personatune.patches import contiguous_head_input

log = logging.getLogger("personatune.engine")

#: peft's name for "no adapter" in a mixed-adapter batch.
NO_ADAPTER = "__base__"

#: :func:`run_batch` lets waiting requests join once ``max_batch // REFILL`` places are
#: free. Measured on the 2-core CPU (embedded model, 192 probe prompts, 160 new tokens,
#: 64 rows): 21.2 s with 8 against 25.6 to 27.1 s joining at every free place (1) or 16,
#: 23.5 s with 4.
REFILL = 8

#: Most prompt tokens (rows x longest prompt, padding included) prefilled in one forward
#: pass; more joining requests are prefilled in several passes.
PREFILL_TOKENS = 8192


@dataclass
class Delta:
    """New answer text (a suffix of what was sent before)."""

    text: str


@dataclass
class Done:
    """The answer is complete.

    Attributes:
        finish_reason: ``stop`` (end-of-turn token or stop sequence), ``length``
            (``max_tokens`` reached) or ``cancelled`` (the caller cancelled).
        prompt_tokens: tokens in the rendered prompt.
        completion_tokens: tokens generated, the end-of-turn token included.
    """

    finish_reason: str
    prompt_tokens: int
    completion_tokens: int


@dataclass
class Failed:
    """Generation raised for this request; ``message`` says what went wrong."""

    message: str


Event = Delta | Done | Failed


@dataclass
class Answer:
    """One generated answer.

    Attributes:
        text: the decoded answer, special tokens removed, stripped, cut before the first
            stop sequence.
        tokens: generated tokens up to and excluding the end-of-turn token.
        finished: True if the model ended its turn (end-of-turn token or stop sequence);
            False if the answer was cut at ``max_tokens`` or cancelled.
        finish_reason: ``stop``, ``length``, ``cancelled`` or ``error``.
        prompt_tokens: tokens in the rendered prompt.
    """

    text: str
    tokens: int
    finished: bool
    finish_reason: str = "stop"
    prompt_tokens: int = 0


@dataclass
class Request:
    """One conversation to answer.

    Attributes:
        input_ids: the rendered prompt's token ids (see :func:`personatune.engine.encode`).
        tokenizer: decodes the answer; its chat template gives the end-of-turn token.
        adapter: the peft adapter (persona) name, or None for the base model.
        sampling: decoding settings.
        emit: called with each :data:`Event` (text deltas, then :class:`Done` or
            :class:`Failed`); None for the batch API. Must be thread-safe under a
            scheduler.
        cancel: set it to stop at the next token (client disconnect).
    """

    input_ids: list[int]
    tokenizer: object
    adapter: str | None = None
    sampling: Sampling = field(default_factory=Sampling)
    emit: Callable[[Event], None] | None = None
    cancel: threading.Event = field(default_factory=threading.Event)


class _Row:
    """A request being decoded: generated ids, its position and its sampler."""

    def __init__(self, req: Request, end_ids: frozenset[int], device: torch.device):
        self.req = req
        self.end_ids = end_ids
        self.ids: list[int] = []
        self.generated = 0  # end-of-turn token included
        self.pos = len(req.input_ids)  # position of the next input token
        self.sent = ""
        self.stop_hit = False
        s = req.sampling
        self.generator = (
            torch.Generator(device=device).manual_seed(s.seed % 2**63)
            if s.temperature > 0
            else None
        )


class GrowingLayer(DynamicLayer):
    """A KV-cache layer (``(batch, heads, seq, head_dim)``) that writes each step's keys
    and values into spare columns of a larger buffer; ``keys``/``values`` are views of
    its first ``seq`` columns. transformers' ``DynamicLayer`` instead concatenates the
    whole cache with the new column at every step. Measured on the 2-core CPU (embedded
    model, 128 rows, 160 new tokens): that ``torch.cat`` took 11% of decoding time.
    Code that replaces ``keys``/``values`` (dropping rows) gets a new buffer at the next
    update; cutting columns on the left keeps the buffer."""

    def update(self, key_states, value_states, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
            self._buf = None
        n = self.keys.shape[-2] if self.keys.dim() == 4 else 0
        start = self._offset(n)
        if start is None or start + n + key_states.shape[-2] > self._buf[0].shape[-2]:
            end = n + key_states.shape[-2]
            shape = (*key_states.shape[:2], end + max(64, end // 4), key_states.shape[-1])
            self._buf = (key_states.new_empty(shape), value_states.new_empty(shape))
            if n:
                self._buf[0][..., :n, :] = self.keys
                self._buf[1][..., :n, :] = self.values
            start = 0
        end = start + n + key_states.shape[-2]
        keys, values = self._buf
        keys[..., start + n : end, :] = key_states
        values[..., start + n : end, :] = value_states
        self.keys, self.values = keys[..., start:end, :], values[..., start:end, :]
        return self.keys, self.values

    def stack(self, other: DynamicLayer, width: int) -> None:
        """Put ``other``'s rows below this layer's, both left-padded with zeros to
        ``width`` columns, in one new buffer with spare columns (one copy, where
        ``torch.cat`` and the next update would make two)."""
        bufs = []
        for mine, theirs in ((self.keys, other.keys), (self.values, other.values)):
            b0, b1 = mine.shape[0], theirs.shape[0]
            shape = (b0 + b1, mine.shape[1], width + max(64, width // 4), mine.shape[-1])
            buf = mine.new_empty(shape)
            for rows, t in ((slice(0, b0), mine), (slice(b0, b0 + b1), theirs)):
                pad = width - t.shape[-2]
                buf[rows, :, :pad].zero_()  # masked, but must be finite: 0 x NaN is NaN
                buf[rows, :, pad:width] = t
            bufs.append(buf)
        self._buf = tuple(bufs)
        self.keys, self.values = (b[..., :width, :] for b in bufs)

    def _offset(self, n: int) -> int | None:
        """The buffer column where ``keys`` starts, if ``keys`` and ``values`` are still
        views of the buffer (cutting columns on the left keeps them so); else None."""
        if self._buf is None or not n:
            return None
        buf = self._buf[0]
        for t, b in ((self.keys, buf), (self.values, self._buf[1])):
            if (
                t.untyped_storage().data_ptr() != b.untyped_storage().data_ptr()
                or t.stride() != b.stride()
                or t.shape[:2] != b.shape[:2]
            ):
                return None
        start, rest = divmod(self.keys.storage_offset(), buf.stride(-2))
        if (
            rest
            or start >= buf.shape[-2]
            or self.values.storage_offset() != self.keys.storage_offset()
        ):
            return None
        return start


def new_cache() -> DynamicCache:
    """An empty ``DynamicCache`` whose layers are :class:`GrowingLayer`."""
    cache = DynamicCache()
    cache.layer_class_to_replicate = GrowingLayer
    return cache


def _common(a: Sequence[int], b: Sequence[int]) -> int:
    n = min(len(a), len(b))
    return next((i for i in range(n) if a[i] != b[i]), n)


class PrefixCache:
    """The KV cache of finished requests, kept so that a later request whose prompt starts
    with one of them (the next turn of a conversation: the earlier prompt, the answer,
    the new user turn) prefills only the tokens after the common prefix, like vLLM's
    automatic prefix caching but per request rather than per block.

    An entry holds one request's fed tokens and, per layer, keys and values
    ``(kv_heads, tokens, head_dim)``; it is keyed by adapter, since the KV depends on
    it. A request takes (removes) the entry sharing its longest prefix; the oldest
    entries go once more than ``max_tokens`` tokens are held. Measured on the 2-core
    EPYC without AMX (embedded model in bf16, the 10 shipped conversations of 8 turns,
    64 new tokens per turn): 38.3 s against 64.3 s re-prefilling every turn's whole
    history (``benchmarks/engine_probe.py --conversations``).

    Args:
        max_tokens: most tokens held over all entries (default 65,536). A token costs
            layers x 2 x key/value heads x head_dim x bytes: 45 KiB for the embedded model
            in float32 (30 layers, 3 heads of 64), so 2.8 GiB at the bound; 128 KiB for a
            7B model of 32 layers and 8 heads of 128 in bf16, 8 GiB at the bound. Eval's
            10 scripted conversations hold under 10,000 tokens (histories under 1,000).
    """

    def __init__(self, max_tokens: int = 65536):
        self.max_tokens = max_tokens
        self.entries: list[tuple[str | None, list[int], list[tuple]]] = []

    def put(self, adapter: str | None, ids: list[int], kv: list[tuple]) -> None:
        """Keep ``kv`` (per layer ``(keys, values)``, ``(kv_heads, len(ids), head_dim)``)."""
        self.entries.append((adapter, ids, kv))
        held = sum(len(e[1]) for e in self.entries)
        while self.entries and held > self.max_tokens:
            held -= len(self.entries.pop(0)[1])

    def take(self, adapter: str | None, ids: Sequence[int]) -> tuple[int, list[tuple] | None]:
        """Remove and return the entry sharing ``ids``' longest prefix: ``(tokens reused,
        per layer (keys, values))``, at most ``len(ids) - 1`` tokens so that the request
        still prefills one; ``(0, None)`` when none shares a token."""
        best, n = None, 0
        for i, (a, have, _) in enumerate(self.entries):
            if a == adapter:
                k = min(_common(have, ids), len(ids) - 1)
                if k > n:
                    best, n = i, k
        if best is None:
            return 0, None
        return n, self.entries.pop(best)[2]


def _left_pad(x: torch.Tensor, n: int) -> torch.Tensor:
    return F.pad(x, (0, 0, n, 0)) if n else x  # (batch, heads, seq, dim): pad seq on the left


class Batch:
    """The rows decoding together on one model, with their shared KV cache.

    Args:
        model: a transformers causal LM, or a peft ``PeftModel`` holding the adapters the
            requests name. Not thread-safe: one caller drives a batch at a time, and no
            one else may use ``model`` meanwhile (adapter switches are global to it).
        prefixes: where finished rows leave their KV cache and joining requests look for
            a prefix of theirs (:class:`PrefixCache`); None keeps nothing.
    """

    def __init__(self, model, prefixes: PrefixCache | None = None):
        self.model = model
        self.prefixes = prefixes
        self.device = next(model.parameters()).device
        self.peft = hasattr(model, "peft_config") and hasattr(model, "base_model")
        self.rows: list[_Row] = []
        self.cache = None
        self.mask: torch.Tensor | None = None  # (batch, seq) 1 = real token, 0 = left padding
        self._ends: dict[int, frozenset[int]] = {}
        self._state: str | None = None  # what the peft model is set to: adapter, base, mixed
        self._lora = masked_state(model) if self.peft else None
        self._mask_cache: tuple[tuple, dict] = ((), {})
        self._attention = use_decode_attention(model)  # what restore() puts back
        contiguous_head_input(model)
        if self.peft:
            from peft.tuners.tuners_utils import BaseTunerLayer

            layers = (m for m in model.modules() if isinstance(m, BaseTunerLayer))
            self._saved = (model.active_adapter, next(layers).disable_adapters)

    def __len__(self) -> int:
        return len(self.rows)

    def _use(self, adapters: list[str | None]) -> dict:
        """Set the peft model up for ``adapters`` (one per row); return forward kwargs.
        Per-row masks (:mod:`personatune.engine.lora`) where every LoRA layer allows;
        else peft: a batch of one adapter as a plain forward with it active, a mixed one
        through ``adapter_names``."""
        if not self.peft:
            if any(a is not None for a in adapters):
                raise ValueError(f"adapter {adapters} requested but the model has no adapters")
            return {}
        if self._lora is not None:
            key = tuple(adapters)
            if key != self._mask_cache[0]:
                masks = {
                    name: torch.tensor([a == name for a in adapters], device=self.device)
                    .float()
                    .view(-1, 1, 1)
                    for name in dict.fromkeys(a for a in adapters if a is not None)
                }
                self._mask_cache = (key, masks)
            self._lora.masks = self._mask_cache[1]
            return {}
        names = set(adapters)
        want = "mixed" if len(names) > 1 else NO_ADAPTER if None in names else next(iter(names))
        lora = self.model.base_model
        if want != self._state:
            if want == NO_ADAPTER:
                lora.disable_adapter_layers()
            else:
                if self._state in (None, NO_ADAPTER):
                    lora.enable_adapter_layers()
                if want != "mixed":
                    self.model.set_adapter(want, inference_mode=True)
            self._state = want
        if want == "mixed":
            return {"adapter_names": [a or NO_ADAPTER for a in adapters]}
        return {}

    def restore(self) -> None:
        """Put the model's attention implementation and the peft model's active adapter
        and enabled state back as they were."""
        if self._attention is not None:
            self.model.set_attn_implementation(self._attention)
            self._attention = None
        if self.peft and self._state is not None:
            active, disabled = self._saved
            lora = self.model.base_model
            lora.enable_adapter_layers()
            self.model.set_adapter(active, inference_mode=True)
            if disabled:
                lora.disable_adapter_layers()
            self._state = None

    def _forward(self, ids, mask, positions, cache, adapters) -> torch.Tensor:
        try:
            out = self.model(
                input_ids=ids,
                attention_mask=mask,
                position_ids=positions,
                past_key_values=cache,
                use_cache=True,
                logits_to_keep=1,
                **self._use(adapters),
            )
        finally:
            if self._lora is not None:
                self._lora.masks = None  # the model is plain peft again outside the engine
        return out.logits[:, -1, :]

    def _end_ids(self, tokenizer) -> frozenset[int]:
        if id(tokenizer) not in self._ends:
            self._ends[id(tokenizer)] = end_of_turn_ids(self.model, tokenizer)
        return self._ends[id(tokenizer)]

    def add(self, req: Request) -> list[tuple[Request, Answer]]:
        """Prefill ``req`` and let it join the batch (:meth:`add_many` of one)."""
        return self.add_many([req])

    @torch.inference_mode()
    def add_many(
        self, reqs: Sequence[Request], isolate: bool = False
    ) -> list[tuple[Request, Answer]]:
        """Prefill ``reqs`` together, left-padded, in forward passes of at most
        :data:`PREFILL_TOKENS` padded prompt tokens, and let them join the batch; returns
        those already finished (first token ends the turn, or cancelled while waiting).

        Args:
            isolate: when a pass raises, prefill its requests one by one and end only the
                one that raises with :class:`Failed` (a server); False lets it raise.

        Raises:
            whatever a forward pass raises, unless ``isolate``; the requests of earlier
            passes have joined then.
        """
        out, rows = [], []
        for req in reqs:
            row = _Row(req, self._end_ids(req.tokenizer), self.device)
            if req.cancel.is_set():
                out.append(self._finish(row, "cancelled"))
            else:
                rows.append(row)
        prefill = self._prefill_isolated if isolate else self._prefill
        group: list[_Row] = []
        for row in rows:
            width = max([len(r.req.input_ids) for r in group] + [len(row.req.input_ids)])
            if group and (len(group) + 1) * width > PREFILL_TOKENS:
                out += prefill(group)
                group = []
            group.append(row)
        if group:
            out += prefill(group)
        return out

    def _prefill_isolated(self, rows: list[_Row]) -> list[tuple[Request, Answer]]:
        try:  # a pass that raises has not advanced or joined any of its rows
            return self._prefill(rows)
        except Exception as e:
            if len(rows) == 1:
                log.exception("prefill failed")
                return [self.fail(rows[0].req, f"{type(e).__name__}: {e}")]
            log.exception("batched prefill failed; prefilling its requests one by one")
            return [done for r in rows for done in self._prefill_isolated([r])]

    def _prefill(self, rows: list[_Row]) -> list[tuple[Request, Answer]]:
        reused = [
            (0, None)
            if self.prefixes is None
            else self.prefixes.take(r.req.adapter, r.req.input_ids)
            for r in rows
        ]
        past = max(n for n, _ in reused)
        new = [r.req.input_ids[n:] for r, (n, _) in zip(rows, reused)]
        width = max(len(t) for t in new)
        pads = [width - len(t) for t in new]
        ids = torch.tensor([[0] * p + t for p, t in zip(pads, new)])
        # (batch, past + width): the reused prefix left-padded to ``past``, then the new
        # tokens left-padded to ``width``; the padding in the middle is masked out like
        # the left padding, and positions count real tokens only
        mask = torch.tensor(
            [
                [0] * (past - n) + [1] * n + [0] * p + [1] * len(t)
                for (n, _), p, t in zip(reused, pads, new)
            ]
        )
        positions = (mask.cumsum(-1) - 1).clamp(min=0)[:, past:]
        ids, mask, positions = (t.to(self.device) for t in (ids, mask, positions))
        cache = new_cache()
        if past:
            self._fill(cache, reused, past)
        logits = self._forward(ids, mask, positions, cache, [r.req.adapter for r in rows])
        out, done = self._advance_all(rows, logits)
        keep = [i for i in range(len(rows)) if i not in done]
        if keep:
            if len(keep) < len(rows):
                idx = torch.tensor(keep, device=self.device)
                cache.batch_select_indices(idx)
                mask = mask[idx]
            self._join([rows[i] for i in keep], cache, mask)
        return out

    def _fill(self, cache, reused: list[tuple[int, list | None]], past: int) -> None:
        """Put the reused prefixes into the empty ``cache``, each row's left-padded with
        zeros to ``past`` columns."""
        layers = next(kv for _, kv in reused if kv is not None)
        for i, (k0, v0) in enumerate(layers):
            b, (heads, _, dim) = len(reused), k0.shape
            keys = k0.new_zeros(b, heads, past, dim)
            values = v0.new_zeros(b, v0.shape[0], past, v0.shape[-1])
            for row, (n, kv) in enumerate(reused):
                if n:
                    keys[row, :, past - n :] = kv[i][0][:, :n]
                    values[row, :, past - n :] = kv[i][1][:, :n]
            cache.update(keys, values, i)

    def _keep(self, i: int) -> None:
        """Leave row ``i``'s KV cache (the tokens it was fed) in :attr:`prefixes`."""
        row, real = self.rows[i], self.mask[i].bool()
        fed = (row.req.input_ids + row.ids)[: int(real.sum())]
        kv = [(layer.keys[i][:, real], layer.values[i][:, real]) for layer in self.cache.layers]
        self.prefixes.put(row.req.adapter, fed, kv)

    def _join(self, rows: list[_Row], cache, mask: torch.Tensor) -> None:
        first = int(mask.any(0).nonzero()[0])  # columns that are padding in every row
        if first:
            mask = mask[:, first:]
            for layer in cache.layers:
                layer.keys, layer.values = layer.keys[..., first:, :], layer.values[..., first:, :]
        if self.cache is None:
            self.cache, self.mask, self.rows = cache, mask, rows
            return
        have, new = self.mask.shape[1], mask.shape[1]
        width = max(have, new)
        for old, add in zip(self.cache.layers, cache.layers):
            if isinstance(old, GrowingLayer):
                old.stack(add, width)
                continue
            old.keys = torch.cat(
                [_left_pad(old.keys, width - have), _left_pad(add.keys, width - new)]
            )
            old.values = torch.cat(
                [_left_pad(old.values, width - have), _left_pad(add.values, width - new)]
            )
        self.mask = torch.cat([F.pad(self.mask, (width - have, 0)), F.pad(mask, (width - new, 0))])
        self.rows += rows

    def _drop(self, done: set[int]) -> None:
        if self.prefixes is not None:
            for i in sorted(done):
                self._keep(i)
        keep = [i for i in range(len(self.rows)) if i not in done]
        if not keep:
            self.rows, self.cache, self.mask = [], None, None
            return
        self.rows = [self.rows[i] for i in keep]
        idx = torch.tensor(keep, device=self.device)
        self.cache.batch_select_indices(idx)
        self.mask = self.mask[idx]
        first = int(self.mask.any(0).nonzero()[0])  # columns that are padding in every row
        if first:
            self.mask = self.mask[:, first:]
            for layer in self.cache.layers:
                layer.keys, layer.values = layer.keys[..., first:, :], layer.values[..., first:, :]

    @torch.inference_mode()
    def step(self) -> list[tuple[Request, Answer]]:
        """One decoding step for every row: feed each row's last token, choose the next,
        and return (and drop) the rows that finished."""
        if not self.rows:
            return []
        rows = self.rows
        ids = torch.tensor([[r.ids[-1]] for r in rows], device=self.device)
        positions = torch.tensor([[r.pos] for r in rows], device=self.device)
        self.mask = F.pad(self.mask, (0, 1), value=1)
        logits = self._forward(ids, self.mask, positions, self.cache, [r.req.adapter for r in rows])
        for r in rows:
            r.pos += 1
        finished, done = self._advance_all(rows, logits)
        if done:
            self._drop(done)
        return finished

    def fail_all(self, message: str) -> list[tuple[Request, Answer]]:
        """End every row with ``Failed(message)`` (the forward pass itself raised)."""
        out = [self.fail(r.req, message, len(r.ids)) for r in self.rows]
        self.rows, self.cache, self.mask = [], None, None
        return out

    def _advance_all(
        self, rows: list[_Row], logits: torch.Tensor
    ) -> tuple[list[tuple[Request, Answer]], set[int]]:
        """Choose each row's next token from ``logits`` ``(batch, vocab)`` and record it;
        returns the finished rows' answers and their indices."""
        toks = choose(logits, [r.req.sampling for r in rows], [r.generator for r in rows])
        finished, done = [], set()
        for i, (row, tok) in enumerate(zip(rows, toks)):
            try:
                reason = self._advance(row, tok)
            except Exception as e:  # this row's decode or callback: it fails alone
                log.exception("a request failed")
                finished.append(self.fail(row.req, f"{type(e).__name__}: {e}", len(row.ids)))
                done.add(i)
                continue
            if reason is not None:
                finished.append(self._finish(row, reason))
                done.add(i)
        return finished, done

    def _advance(self, row: _Row, tok: int) -> str | None:
        """Record ``tok`` for ``row``; return its finish reason, or None to go on."""
        s = row.req.sampling
        row.generated += 1
        if tok in row.end_ids:
            return "stop"
        row.ids.append(tok)
        if row.req.emit is not None or s.stop:
            self._show(row, final=False)
            if row.stop_hit:
                return "stop"
        if row.generated >= s.max_tokens:
            return "length"
        if row.req.cancel.is_set():
            return "cancelled"
        return None

    def _show(self, row: _Row, final: bool) -> str:
        """The visible answer so far; emits what is new."""
        text = row.req.tokenizer.decode(row.ids, skip_special_tokens=True)
        if not final:
            text = text.rstrip("\ufffd")  # an unfinished multi-byte character
        shown, hit = visible_text(text, row.req.sampling.stop, final or row.stop_hit)
        row.stop_hit = row.stop_hit or hit
        if row.req.emit is not None and len(shown) > len(row.sent) and shown.startswith(row.sent):
            row.req.emit(Delta(shown[len(row.sent) :]))
            row.sent = shown
        return shown

    def _finish(self, row: _Row, reason: str) -> tuple[Request, Answer]:
        try:
            text = self._show(row, final=True)
            req = row.req
            ended = reason == "stop"
            ans = Answer(text, len(row.ids), ended, reason, len(req.input_ids))
            if req.emit is not None:
                req.emit(Done(reason, len(req.input_ids), row.generated))
            return req, ans
        except Exception as e:  # a failing request (its emit, its decode) stays its own
            log.exception("finishing a request failed")
            return self.fail(row.req, f"{type(e).__name__}: {e}", len(row.ids))

    @staticmethod
    def fail(req: Request, message: str, tokens: int = 0) -> tuple[Request, Answer]:
        """End ``req`` with ``Failed(message)``; its answer has finish reason ``error``."""
        if req.emit is not None:
            try:
                req.emit(Failed(f"generation failed: {message}"))
            except Exception:
                log.exception("reporting a failed request failed")
        return req, Answer("", tokens, False, "error", len(req.input_ids))


def run_batch(
    model,
    requests: Sequence[Request],
    max_batch: int = 64,
    progress: Callable[[int], None] | None = None,
    prefixes: PrefixCache | None = None,
) -> list[Answer]:
    """Answer ``requests`` with continuous batching on ``model``, in input order: up to
    ``max_batch`` rows decode together; once ``max_batch // REFILL`` places are free (or
    every remaining request fits), the next requests are prefilled together and join.
    Synchronous; the caller's thread runs the model.

    Args:
        progress: called with 1 after each finished answer.
        prefixes: KV cache of earlier requests to reuse and fill (:class:`PrefixCache`).

    Raises:
        whatever the model's forward pass raises (nothing is swallowed here).
    """
    batch = Batch(model, prefixes)
    where = {id(r): i for i, r in enumerate(requests)}
    out: list[Answer | None] = [None] * len(requests)
    todo = list(requests)
    try:
        while todo or batch.rows:
            free = max_batch - len(batch)
            if free < min(len(todo), max(1, max_batch // REFILL)):
                free = 0  # wait for more places: each join copies the whole KV cache
            finished = batch.add_many(todo[:free]) if free and todo else []
            del todo[:free]
            finished += batch.step()
            for req, ans in finished:
                out[where[id(req)]] = ans
                if progress:
                    progress(1)
    finally:
        batch.restore()
    return out  # type: ignore[return-value]
