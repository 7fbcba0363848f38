"""A compiled decode step for a lone row: `torch.compile` of the model's forward, opt-in (`compile_decode`).

At batch 1 a decode step of the embedded model is transformers' eager forward: 121 matrix products that read the
weights (~13 ms on a 2-core AMX CPU) and ~1,500 small element-wise ops with their Python (~15 ms), so the loop ran
at ~28% of the weight-read bound, as `model.generate` does (docs/benchmarks.md). Inductor fuses those ops into a
few C++ kernels, and with `freezing` it treats the weights as constants and reorders them once into oneDNN's
blocked layout (`cpp.enable_concat_linear` joins q/k/v and gate/up into one product each, as `PackedLinear`'s
siblings do); `cpp_wrapper` calls the kernels from C++ instead of a Python wrapper. Measured: ~15-17 ms a step
against ~28-34 ms eager, after ~50 s of compiling, once per model and process.

It runs only where one compiled graph serves every step: a single running row (no padding, so no mask) of a plain
model (no LoRA rows), of a family `ragged.supports` (its attention modules update the cache and call the
configured attention function). Shapes are dynamic (`dynamic=True`): the cache's length and its buffers' capacity
change every step and at every reallocation without recompiling. The cache seen by the graph is `RowCache`: the
row's `GrowingLayer` buffers and their filled length; the new token's keys and values are written into the
buffers in place and attention reads the filled part (`ATTENTION`, with no mask: transformers builds none for an
attention function it has no mask function for). Batches of several rows stay eager: each row count would be a
graph of its own, and at 16 rows the products, not the small ops, dominate a step.

If compiling fails (no C++ compiler, an unsupported op), the loop says so once on stderr and decodes eagerly."""

from __future__ import annotations

import sys
import time
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from transformers import AttentionInterface

from specialize.generation import ragged
from specialize.generation.kvcache import GrowingLayer
from specialize.models import cache_field

ATTENTION = "specialize_compiled_row"
# inductor: weights as constants, packed for oneDNN once; q/k/v and gate/up as one product; a C++ wrapper
OPTIONS = {"freezing": True, "cpp.enable_concat_linear": True, "cpp_wrapper": True}


def _attention(module: Any, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, attention_mask: Any,
               scaling: float | None = None, **_: Any) -> tuple[torch.Tensor, None]:  # fmt: skip
    # key/value are exactly the row's filled positions (`RowCache.update`): one query, nothing to mask
    out = F.scaled_dot_product_attention(query, key, value, scale=scaling, enable_gqa=True)
    return out.transpose(1, 2), None


AttentionInterface.register(ATTENTION, _attention)


class RowCache:
    """What the compiled forward sees as its cache: one row's key/value buffers per layer [1, heads, capacity,
    head_dim] and how many positions they hold. `update` writes the new token's at `length`, in place."""

    def __init__(self, keys: Sequence[torch.Tensor], values: Sequence[torch.Tensor], length: int):
        self.keys, self.values, self.length = list(keys), list(values), length

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args: Any, **kwargs: Any):
        n = self.length
        keys, values = self.keys[layer_idx], self.values[layer_idx]
        keys[:, :, n : n + 1].copy_(key_states)
        values[:, :, n : n + 1].copy_(value_states)
        return keys[:, :, : n + 1], values[:, :, : n + 1]


class CompiledDecode:
    """One model's compiled single-row decode step (`for_model`: one per model, shared by every loop over it)."""

    def __init__(self, model: Any):
        self.model = model
        self.configs = ragged.model_configs(model)
        self.cache_field = cache_field()  # read here: the graph would trace its lru_cache wrapper
        self.error: str | None = None  # why compiling failed; the loop then decodes eagerly
        self.compile_seconds: float | None = None  # the first call's wall time, compiling included
        self._fn = torch.compile(self._forward, dynamic=True, fullgraph=True)

    def _forward(self, ids: torch.Tensor, positions: torch.Tensor, cache: RowCache) -> torch.Tensor:
        cache_arg = {self.cache_field: cache}
        return self.model(input_ids=ids, position_ids=positions, use_cache=True, logits_to_keep=1, **cache_arg).logits

    @staticmethod
    def applies(model: Any, layers: Sequence[Any], rows: int, padded: bool, adapters: Sequence[str | None]) -> bool:
        """Whether a decode step of these rows can run compiled: one unpadded row of a plain model whose family
        `ragged.supports`, over a cache that grows in place."""
        return (
            rows == 1
            and not padded
            and not hasattr(model, "peft_config")
            and all(a is None for a in adapters)
            and all(type(la) is GrowingLayer for la in layers)
            and ragged.supports(model)
        )

    def step(self, token: int, position: int, layers: Sequence[GrowingLayer]) -> torch.Tensor | None:
        """The next-token logits [1, V] after `token` at `position`, the layers' caches one position longer; None
        when compiling failed (the caches are unchanged: decode this step eagerly)."""
        if self.error is not None:
            return None
        device = layers[0].keys.device
        ids = torch.tensor([[token]], device=device)
        reserved = [la.reserve(la.keys[:, :, :1], la.values[:, :, :1]) for la in layers]
        cache = RowCache([k for k, _, _ in reserved], [v for _, v, _ in reserved], reserved[0][2])
        before = [c._attn_implementation for c in self.configs]
        start = time.perf_counter()
        try:
            for c in self.configs:
                c._attn_implementation = ATTENTION
            # inductor's settings for this graph only (`torch.compile(options=...)` did not freeze the weights: the
            # products ran as `aten::mm` on the plain ones); the graph compiles on its first call
            with torch._inductor.config.patch(OPTIONS):
                logits = self._fn(ids, torch.tensor([[position]], device=device), cache)
        except Exception as e:  # any compiler failure: say so once, decode eagerly from here on
            self.error = f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"
            print(f"compiled decoding unavailable, decoding eagerly ({self.error})", file=sys.stderr)
            return None
        finally:
            for c, b in zip(self.configs, before, strict=True):
                c._attn_implementation = b
        if self.compile_seconds is None:
            self.compile_seconds = time.perf_counter() - start
        for la in layers:
            la.grew(1)
        return logits[:, -1]


def for_model(model: Any) -> CompiledDecode:
    """The model's compiled step, built on first use and kept on the model: every loop over it shares one graph
    (compiling takes tens of seconds; `generate` builds a loop per call)."""
    compiled = model.__dict__.get("_specialize_compiled_decode")
    if compiled is None:
        compiled = model.__dict__["_specialize_compiled_decode"] = CompiledDecode(model)
    return compiled
