"""One base model, many LoRA specialists, one token loop with continuous batching.

A scheduler thread drives `generation.loop.TokenLoop`: each iteration prefills waiting requests (bounded, long
prompts in chunks) and decodes one token for every running request, so a request joins the running batch at
the next step and leaves the moment it finishes or is cancelled; no request waits for another's wave. Each
row names its adapter and every row's own LoRA is applied in the same forward pass (stacked adapter weights,
`generation/lora.py`), so a batch mixes specialists freely.

Admin calls (register, mix, remove adapters) run between steps, under the model lock. Registering validates
the adapter against the base model before touching it, so a corrupt or rank-mismatched adapter changes
nothing; removing one fails only its own requests.

Policies, for comparison in `benchmarks/serve_mixed.py`: `continuous` (the default), `static` (waves: the batch
admits requests only when empty, as servers without iteration-level scheduling do), `per_adapter` (static
waves of one adapter each, what a server that switches adapters must do).
"""

from __future__ import annotations

import contextlib
import re
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

import torch

from specialize.config import BASE, TemplateName
from specialize.generation.loop import PEFT_BASE, LoraPath, Output, Policy, Request, TokenLoop
from specialize.generation.params import SamplingParams
from specialize.hashing import file_sha256
from specialize.models import (
    ADAPTER_WEIGHTS,
    ModelLoadError,
    Precision,
    check_adapter,
    release_thread_pool,
    resolve_template,
)

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,63}")
CombinationType = Literal["cat", "linear", "svd"]


class EngineError(ValueError):
    """A request or admin call the engine refuses; `status` is the HTTP status it maps to."""

    def __init__(self, message: str, status: int = 400, code: str = "invalid_request"):
        super().__init__(message)
        self.status = status
        self.code = code


def validate_lora(model: Any, path: Path) -> None:
    """Check a LoRA adapter against the base model without changing it: its config reads, it is LoRA, and every
    lora_A/lora_B tensor fits the module it targets with the config's rank. PEFT would otherwise inject the
    layers first and fail while loading the weights, leaving the model half-modified."""
    from peft import PeftConfig
    from safetensors import safe_open

    try:
        cfg = PeftConfig.from_pretrained(str(path))
    except Exception as err:  # a config that does not parse is as bad as a missing one
        raise EngineError(f"{path}: unreadable adapter_config.json ({err})") from None
    if str(getattr(cfg, "peft_type", "")).upper().removeprefix("PEFTTYPE.") != "LORA":
        raise EngineError(f"{path}: not a LoRA adapter ({cfg.peft_type})")
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    modules = dict(base.named_modules())
    try:
        with safe_open(str(path / ADAPTER_WEIGHTS), "pt") as f:
            shapes = {key: tuple(f.get_slice(key).get_shape()) for key in f.keys()}  # noqa: SIM118
    except Exception as err:
        raise EngineError(f"{path / ADAPTER_WEIGHTS}: unreadable safetensors ({err})") from None
    for key, shape in shapes.items():
        for part, dim in (("lora_A", 1), ("lora_B", 0)):
            if f".{part}." not in key:
                continue
            name = key.split(f".{part}.")[0].removeprefix("base_model.model.")
            layer = modules.get(name)
            layer = getattr(layer, "base_layer", layer)  # already wrapped by another adapter
            features = getattr(layer, "in_features" if part == "lora_A" else "out_features", None)
            if features is None:
                raise EngineError(f"{path}: {key} targets {name!r}, which the base model has no linear layer for")
            rank = shape[0] if part == "lora_A" else shape[1]
            expected = cfg.rank_pattern.get(name.split(".")[-1], cfg.r) if cfg.rank_pattern else cfg.r
            if len(shape) != 2 or shape[dim] != features or rank != expected:
                raise EngineError(f"{path}: {key} has shape {list(shape)}; the base model and the config's rank "
                                  f"need {'[r, in]' if part == 'lora_A' else '[out, r]'} = "
                                  f"{[expected, features] if part == 'lora_A' else [features, expected]}")  # fmt: skip


class Engine:
    """Owns the model; thread-safe. `submit` from any thread; admin calls serialize with decoding steps."""

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        *,
        base_name: str = BASE,
        max_batch_size: int = 16,
        max_tokens: int | None = None,
        prefill_tokens: int = 256,
        batch_wait_ms: float = 5.0,
        max_pending: int = 256,
        policy: Policy = "continuous",
        lora: LoraPath = "stacked",
        precision: Precision | None = None,
        base_template: TemplateName = "alpaca",
        template_override: TemplateName | None = None,
        loop: Any = None,
        compile_decode: bool = False,
    ):
        self.tokenizer = tokenizer
        self.base_name = base_name
        self.batch_wait_s = batch_wait_ms / 1000
        self.max_pending = max_pending
        # the token loop (transformers), or anything with its serving surface (vllm_engine.VLLMLoop)
        self.loop = loop or TokenLoop(model, tokenizer, precision, max_rows=max_batch_size, max_tokens=max_tokens,
                                      prefill_tokens=prefill_tokens, policy=policy, lora=lora,
                                      compile_decode=compile_decode)  # fmt: skip
        self.adapters: dict[str, dict[str, Any]] = {}  # name -> {"path", "sha256"|"mix", "template"}
        # each model's prompt template: an adapter's is read from its directory unless the server overrides it
        self.template_override = template_override
        self.base_template: TemplateName = base_template
        self._registering: set[str] = set()
        self._names = threading.Lock()  # guards adapters + _registering (a name is taken once)
        self._wake = threading.Condition()
        self._model_lock = threading.Lock()  # held by each decoding step and by every change of the model
        self._admin_waiting = 0  # admin calls waiting for the model: the loop lets them in before its next step
        self._stopping = False
        self._thread: threading.Thread | None = None

    @property
    def model(self) -> Any:
        """The loop's model (a PeftModel once an adapter is registered on the token loop)."""
        return self.loop.model

    @property
    def stats(self) -> dict[str, int]:
        return self.loop.stats

    # ------------------------------------------------------------------------------------- lifecycle

    def start(self) -> Engine:
        # from here on the engine's thread does the model's work: the caller's idle OpenMP team would halve it
        release_thread_pool()
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="specialize-engine", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        with self._wake:
            self._stopping = True
            self._wake.notify_all()
        if self._thread is not None:
            self._thread.join(timeout=30)

    def _run(self) -> None:
        while True:
            with self._wake:
                idle = not self.loop.busy
                while (not self.loop.busy or self._admin_waiting) and not self._stopping:
                    self._wake.wait()
                if self._stopping:
                    return
                if idle and self.batch_wait_s:  # a short wait lets concurrent arrivals share the first step
                    self._wake.wait(self.batch_wait_s)
            with self._model_lock:
                try:
                    self.loop.step()
                except Exception as err:  # the server keeps serving; the requests in flight fail
                    self.loop.fail_all(f"{type(err).__name__}: {err}")

    # ------------------------------------------------------------------------------------- adapters

    @contextlib.contextmanager
    def _admin(self) -> Iterator[None]:
        """The model, for a change between two decoding steps (the loop thread would otherwise take the lock
        again at once, and an admin call could wait for as long as requests keep coming)."""
        with self._wake:
            self._admin_waiting += 1
        try:
            with self._model_lock:
                yield
        finally:
            release_thread_pool()  # an admin change computed here (loading weights): its team would slow the loop
            with self._wake:
                self._admin_waiting -= 1
                self._wake.notify_all()

    def model_names(self) -> list[str]:
        return [self.base_name, *self.adapters]

    def template_of(self, name: str) -> TemplateName:
        return self.base_template if name == self.base_name else self.adapters[name]["template"]

    def _reserve(self, name: str) -> None:
        """Take a new adapter name, once: a second registration of it, concurrent or later, gets 409."""
        # PEFT stores adapters as submodules: the name must be a plain identifier-like key that does not
        # shadow a torch.nn.Module attribute ("half", "eval", ...)
        if not _NAME.fullmatch(name) or name in (self.base_name, PEFT_BASE) or hasattr(torch.nn.Module, name):
            raise EngineError(f"invalid adapter name {name!r}: use letters, digits, '-' and '_', not a reserved word")
        with self._names:
            if name in self.adapters or name in self._registering:
                raise EngineError(f"adapter {name!r} is already loaded", status=409, code="conflict")
            self._registering.add(name)

    def add_adapter(self, name: str, path: str | Path) -> None:
        """Load a LoRA adapter directory (safetensors only) next to the others, without touching the base. A bad
        adapter is refused before the model changes, and its name stays free."""
        path = Path(path)
        self._reserve(name)
        try:
            try:
                check_adapter(name, path)
                template = resolve_template(self.template_override, path, f"adapter {name!r} ({path})")
            except ModelLoadError as err:
                raise EngineError(str(err)) from err
            with self._admin():
                validate_lora(self.model, path)
                try:
                    self.loop.attach(name, path)
                except Exception as err:  # validation missed something (the loop undid what it loaded)
                    raise EngineError(f"cannot load adapter {name!r} from {path}: {err}") from err
            with self._names:
                self.adapters[name] = {"path": str(path), "sha256": file_sha256(path / ADAPTER_WEIGHTS),
                                       "template": template}  # fmt: skip
        finally:
            with self._names:
                self._registering.discard(name)

    def remove_adapter(self, name: str) -> None:
        """Unload an adapter; only requests for it fail (with a clear error), every other row keeps decoding."""
        with self._names:
            if name not in self.adapters:
                raise EngineError(f"no adapter named {name!r}", status=404, code="model_not_found")
        with self._admin():
            self.loop.fail_all(f"the adapter {name!r} was removed", only=lambda r: r.adapter == name)
            self.loop.detach(name)
            with self._names:
                del self.adapters[name]

    def mix_adapters(
        self, name: str, sources: list[str], weights: list[float], combination_type: CombinationType = "cat"
    ) -> None:
        """A new adapter whose weight update is the weighted combination of others' (PEFT add_weighted_adapter)."""
        missing = [s for s in sources if s not in self.adapters]
        if missing:
            raise EngineError(f"unknown adapters {missing}", status=404, code="model_not_found")
        if len(sources) != len(weights) or not sources:
            raise EngineError("give one weight per source adapter")
        if not all(isinstance(w, int | float) and w == w and abs(w) != float("inf") for w in weights):
            raise EngineError("mix weights must be finite numbers")
        if len({self.adapters[s]["template"] for s in sources}) > 1:
            raise EngineError(f"cannot mix {sources}: they were trained with different prompt templates")
        self._reserve(name)
        try:
            with self._admin():
                try:
                    self.loop.mix(name, sources, weights, combination_type)
                except ValueError as err:  # e.g. "linear" over adapters of different ranks
                    raise EngineError(f"cannot mix {sources}: {err}") from err
            with self._names:
                self.adapters[name] = {"mix": {"sources": sources, "weights": weights, "combination": combination_type},
                                       "template": self.adapters[sources[0]]["template"]}  # fmt: skip
        finally:
            with self._names:
                self._registering.discard(name)

    # ------------------------------------------------------------------------------------- requests

    def request(self, model: str, prompt_ids: list[int], params: SamplingParams, on_output: Any = None) -> Request:
        """A request for `model` (the base or an adapter); not queued until `submit`."""
        if model != self.base_name and model not in self.adapters:
            raise EngineError(f"the model {model!r} does not exist", status=404, code="model_not_found")
        # base rows always name the base explicitly: the model may become a PeftModel while they run
        return Request([prompt_ids], params, adapter=PEFT_BASE if model == self.base_name else model,
                       on_output=on_output)  # fmt: skip

    def submit(self, *requests: Request) -> tuple[Request, ...]:
        """Queue requests, all or none: when the queue cannot take every one, none is queued (503)."""
        with self._wake:
            if len(self.loop.waiting) + len(requests) > self.max_pending:
                raise EngineError("server busy: too many queued requests", status=503, code="overloaded")
            try:
                self.loop.submit(*requests)
            except ValueError as err:
                raise EngineError(str(err)) from err
            self._wake.notify()
        return requests


def collect(requests: list[Request], timeout: float | None = None) -> list[Output]:
    """Wait for requests to finish (for callers without an event loop: tests, benchmarks)."""
    deadline = None if timeout is None else time.monotonic() + timeout
    while any(r.result is None for r in requests):
        if deadline is not None and time.monotonic() > deadline:
            raise TimeoutError("requests did not finish in time")
        time.sleep(0.005)
    return [r.result for r in requests if r.result is not None]
