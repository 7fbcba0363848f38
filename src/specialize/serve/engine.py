"""One base model, many LoRA specialists, one batched decoding loop.

Requests queue up; a scheduler thread takes up to `max_batch_size` of them at a time (a "wave") and decodes
them together on one KV cache. Each row names its adapter and PEFT applies every row's own LoRA in the same
forward pass (`adapter_names`), so a wave may mix specialists freely. Rows finish on their own (EOS, stop
string, max_tokens or cancellation); text is pushed to each request's queue as it is decoded.

Policies, for comparison in `benchmarks/serve_mixed.py`:
- `mixed`: any requests share a wave (the default);
- `per_adapter`: a wave holds one adapter's requests (what a server that switches adapters must do).
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import threading
import time
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch

from specialize.config import BASE, TemplateName
from specialize.generation.decoding import Contexts, choose
from specialize.generation.hf import SamplingParams
from specialize.hashing import file_sha256
from specialize.models import (
    ADAPTER_WEIGHTS,
    ModelLoadError,
    Precision,
    attach_adapters,
    check_adapter,
    inference_mode,
    resolve_template,
)

_PEFT_BASE = "__base__"  # PEFT's name for "no adapter" in a mixed batch
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,63}")
CombinationType = Literal["cat", "linear", "svd"]


class EngineError(ValueError):
    """A request or admin call the engine refuses; `status` is the HTTP status it maps to."""

    def __init__(self, message: str, status: int = 400, code: str = "invalid_request"):
        super().__init__(message)
        self.status = status
        self.code = code


@dataclass
class Event:
    text: str = ""  # new text since the previous event
    finish_reason: str | None = None  # set on the last event: "stop", "length" or "cancelled"
    completion_tokens: int = 0


@dataclass
class Request:
    prompt_ids: list[int]
    adapter: str  # BASE or a registered adapter name
    params: SamplingParams
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    cancelled: threading.Event = field(default_factory=threading.Event)

    def push(self, event: Event) -> None:
        self.loop.call_soon_threadsafe(self.events.put_nowait, event)


@dataclass
class _Row:
    """Decoding state of one request inside a wave."""

    req: Request
    tokens: list[int] = field(default_factory=list)
    emitted: int = 0  # characters of decoded text already pushed
    done: bool = False
    generator: torch.Generator | None = None


def _held_back(text: str, stop: tuple[str, ...]) -> int:
    """Characters at the end of `text` that must wait: a partial UTF-8 character, or a prefix of a stop string."""
    hold = 1 if text.endswith("\ufffd") else 0
    for s in stop:
        for n in range(min(len(s) - 1, len(text)), 0, -1):
            if text.endswith(s[:n]):
                hold = max(hold, n)
                break
    return hold


class Engine:
    """Owns the model; thread-safe. `submit` from any thread or event loop; admin calls serialize with waves."""

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        *,
        base_name: str = BASE,
        max_batch_size: int = 16,
        batch_wait_ms: float = 5.0,
        max_pending: int = 256,
        policy: Literal["mixed", "per_adapter"] = "mixed",
        precision: Precision | None = None,
        base_template: TemplateName = "alpaca",
        template_override: TemplateName | None = None,
    ):
        self.model = model  # becomes a PeftModel when the first adapter is registered
        self.tokenizer = tokenizer
        self.base_name = base_name
        self.max_batch_size = max_batch_size
        self.batch_wait_s = batch_wait_ms / 1000
        self.max_pending = max_pending
        self.policy = policy
        self.device = next(model.parameters()).device
        self.precision = precision or Precision.of(model)
        self.adapters: dict[str, dict[str, Any]] = {}  # name -> {"path", "sha256"|"mix", "template"}
        # each model's prompt template: an adapter's is read from its directory unless the server overrides it
        self.template_override = template_override
        self.base_template: TemplateName = base_template
        self.eos = tokenizer.eos_token_id
        self.pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else self.eos
        self._pending: deque[Request] = deque()
        self._wake = threading.Condition()
        self._model_lock = threading.Lock()
        self._stopping = False
        self._thread: threading.Thread | None = None
        self.stats = {"waves": 0, "rows": 0, "mixed_waves": 0}

    # ------------------------------------------------------------------------------------- lifecycle

    def start(self) -> Engine:
        self._stopping = False
        self._thread = threading.Thread(target=self._loop, name="specialize-engine", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        with self._wake:
            self._stopping = True
            self._wake.notify_all()
        if self._thread is not None:
            self._thread.join(timeout=30)

    # ------------------------------------------------------------------------------------- adapters

    def model_names(self) -> list[str]:
        return [self.base_name, *self.adapters]

    def template_of(self, name: str) -> TemplateName:
        return self.base_template if name == self.base_name else self.adapters[name]["template"]

    def _check_new_name(self, name: str) -> None:
        # PEFT stores adapters as submodules: the name must be a plain identifier-like key that does not
        # shadow a torch.nn.Module attribute ("half", "eval", ...)
        if not _NAME.fullmatch(name) or name in (self.base_name, _PEFT_BASE) or hasattr(torch.nn.Module, name):
            raise EngineError(f"invalid adapter name {name!r}: use letters, digits, '-' and '_', not a reserved word")
        if name in self.adapters:
            raise EngineError(f"adapter {name!r} is already loaded", status=409, code="conflict")

    def add_adapter(self, name: str, path: str | Path) -> None:
        """Load a LoRA adapter directory (safetensors only) next to the others, without touching the base."""
        path = Path(path)
        self._check_new_name(name)
        try:
            check_adapter(name, path)
            template = resolve_template(self.template_override, path, f"adapter {name!r} ({path})")
        except ModelLoadError as err:
            raise EngineError(str(err)) from err
        with self._model_lock:
            self.model = attach_adapters(self.model, {name: path})
            self.adapters[name] = {"path": str(path), "sha256": file_sha256(path / ADAPTER_WEIGHTS),
                                   "template": template}  # fmt: skip

    def remove_adapter(self, name: str) -> None:
        if name not in self.adapters:
            raise EngineError(f"no adapter named {name!r}", status=404, code="model_not_found")
        with self._model_lock:
            self.model.delete_adapter(name)
            del self.adapters[name]

    def mix_adapters(
        self, name: str, sources: list[str], weights: list[float], combination_type: CombinationType = "cat"
    ) -> None:
        """A new adapter whose weight update is the weighted combination of others' (PEFT add_weighted_adapter)."""
        self._check_new_name(name)
        missing = [s for s in sources if s not in self.adapters]
        if missing:
            raise EngineError(f"unknown adapters {missing}", status=404, code="model_not_found")
        if len(sources) != len(weights) or not sources:
            raise EngineError("give one weight per source adapter")
        if len({self.adapters[s]["template"] for s in sources}) > 1:
            raise EngineError(f"cannot mix {sources}: they were trained with different prompt templates")
        with self._model_lock:
            try:
                self.model.add_weighted_adapter(sources, weights, name, combination_type=combination_type)
            except ValueError as err:  # e.g. "linear" over adapters of different ranks
                raise EngineError(f"cannot mix {sources}: {err}") from err
            self.adapters[name] = {"mix": {"sources": sources, "weights": weights, "combination": combination_type},
                                   "template": self.adapters[sources[0]]["template"]}  # fmt: skip

    # ------------------------------------------------------------------------------------- requests

    def submit(self, req: Request) -> Request:
        if req.adapter != self.base_name and req.adapter not in self.adapters:
            raise EngineError(f"the model {req.adapter!r} does not exist", status=404, code="model_not_found")
        with self._wake:
            if len(self._pending) >= self.max_pending:
                raise EngineError("server busy: too many queued requests", status=503, code="overloaded")
            self._pending.append(req)
            self._wake.notify()
        return req

    def _take_wave(self) -> list[Request]:
        with self._wake:
            while not self._pending and not self._stopping:
                self._wake.wait()
            if self._stopping:
                return []
            # a short wait lets concurrent arrivals share the wave
            deadline = time.monotonic() + self.batch_wait_s
            while len(self._pending) < self.max_batch_size and (left := deadline - time.monotonic()) > 0:
                self._wake.wait(left)
            wave: list[Request] = []
            keep: deque[Request] = deque()
            while self._pending and len(wave) < self.max_batch_size:
                r = self._pending.popleft()
                if self.policy == "per_adapter" and wave and r.adapter != wave[0].adapter:
                    keep.append(r)
                else:
                    wave.append(r)
            self._pending.extendleft(reversed(keep))
            return wave

    def _loop(self) -> None:
        while True:
            wave = self._take_wave()
            if not wave:
                return
            try:
                with self._model_lock:
                    self._run_wave(wave)
            except Exception as err:  # the server keeps serving; these requests fail
                for r in wave:
                    r.push(Event(finish_reason=f"error: {type(err).__name__}: {err}"))

    @contextlib.contextmanager
    def _adapter_kwargs(self, names: list[str]) -> Iterator[dict[str, Any]]:
        if not self.adapters:  # a bare base model knows nothing of adapters
            yield {}
        elif all(n == self.base_name for n in names):
            with self.model.disable_adapter():
                yield {}
        else:
            yield {"adapter_names": [_PEFT_BASE if n == self.base_name else n for n in names]}

    def _run_wave(self, wave: list[Request]) -> None:
        rows = [_Row(r) for r in wave]
        for row in rows:
            if row.req.params.seed is not None:
                row.generator = torch.Generator().manual_seed(row.req.params.seed)
        self.stats["waves"] += 1
        self.stats["rows"] += len(rows)
        self.stats["mixed_waves"] += len({r.adapter for r in wave}) > 1
        steps = max(r.params.max_new_tokens for r in wave)
        with (
            self._adapter_kwargs([r.adapter for r in wave]) as kwargs,
            inference_mode(self.model, self.precision, str(self.device)),
        ):
            ctx = Contexts(self.model, [r.prompt_ids for r in wave], self.pad, self.device, **kwargs)
            for _ in range(steps):
                nxt = ctx.logp.argmax(dim=-1)  # greedy rows in one op; sampled rows below, each with its own RNG
                for i, row in enumerate(rows):
                    if row.done:
                        nxt[i] = self.pad
                        continue
                    if row.req.params.temperature > 0:
                        nxt[i] = choose(ctx.logp[i : i + 1], row.req.params, row.generator)[0]
                    self._advance(row, int(nxt[i]))
                if all(row.done for row in rows):
                    break
                ctx.step(nxt)

    def _advance(self, row: _Row, token: int) -> None:
        """Take one decoded token: push the text that is now final, finish the row if it is over."""
        params = row.req.params
        if row.req.cancelled.is_set():
            row.done = True
            row.req.push(Event(finish_reason="cancelled", completion_tokens=len(row.tokens)))
            return
        finish = None
        if token == self.eos:
            finish = "stop"
        else:
            row.tokens.append(token)
        text = self.tokenizer.decode(row.tokens, skip_special_tokens=True)
        cut = min((i for i in (text.find(s) for s in params.stop) if i >= 0), default=-1)
        if cut >= 0:
            text, finish = text[:cut], "stop"
        if finish is None and len(row.tokens) >= params.max_new_tokens:
            finish = "length"
        end = len(text) if finish else len(text) - _held_back(text, params.stop)
        delta = text[row.emitted : end] if end > row.emitted else ""
        row.emitted = max(row.emitted, end)
        if finish:
            row.done = True
            row.req.push(Event(delta, finish, len(row.tokens)))
        elif delta:
            row.req.push(Event(delta))
