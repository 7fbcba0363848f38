"""One forward over a ragged batch: the running rows' next tokens and the prompts of requests joining them.

A request that joins a running batch used to be prefilled in a forward of its own, and the running rows then paid
for a decode forward besides (docs/benchmarks.md: a join of ~67 prompt tokens took 270 ms, mostly its prompt's
compute, beside 126 ms decode steps of 8 rows on a 2-core AVX2 CPU). Here the joining prompts ride in the decode
step's forward instead, as vLLM's chunked prefill does: the R running rows' tokens and the J prompts are laid end
to end as one sequence [1, R + sum(n_j)], so every linear layer runs once over all of them (each weight read once;
the join costs about its prompt's forward and the decode step comes free), and only attention is done per group:

- the running rows attend to their own KV cache (left-padded, with its padding mask), to which their new keys
  and values are appended (`GrowingLayer`, in place); consecutive rows of similar length attend together over
  only the columns their longest row fills (`column_groups`), so that one long row does not make every row read
  its width of padding (a decode step with no prompt joining is ragged for that reason alone, when the rows
  split into more than one group);
- each joining prompt attends causally to its own tokens, which become its new cache.

transformers computes everything else (embeddings, RoPE from the given positions, norms, MLP, LoRA through
`lora.StackedLoRA` with one adapter per token): this module only supplies the cache object the attention
modules update (`RaggedStep.update`) and an attention function (`ATTENTION`, registered with transformers'
`AttentionInterface`) that the model's config names for the duration of the forward. With no mask function
registered under that name, transformers builds no mask for it (as for vLLM's and TGI's backends).

It applies to decoder families whose attention modules update the cache with keys [B, heads, N, head_dim] and
then call the configured attention function (`SUPPORTED`), with full attention in every layer.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Sequence
from contextvars import ContextVar
from typing import Any

import torch
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.cache_utils import DynamicCache

from specialize.generation.kvcache import cache_layers

ATTENTION = "specialize_ragged"
# model types checked to compute attention only through the configured attention function and keep one full-
# attention cache layer per decoder layer (sliding windows excluded by `supports`)
SUPPORTED = frozenset({"llama", "mistral", "qwen2", "qwen3"})

_STEP: ContextVar[RaggedStep | None] = ContextVar("specialize_ragged_step", default=None)

# (first row, end row, first column): rows [first, end) attend over columns [first column, width)
Group = tuple[int, int, int]
# What one more attention call costs, in row-columns of keys and values read (~64 ns each, bf16, 3 KV heads of
# 64, on a 2-core AMX CPU; a call's fixed cost, ~25 us with the slicing around it, is ~400 of them)
CALL_COST = 512


def supports(model: Any) -> bool:
    """Whether `model`'s family is one this module computes exactly (`SUPPORTED`, no sliding-window layers)."""
    config = model.config
    if getattr(config, "model_type", None) not in SUPPORTED:
        return False
    return getattr(config, "sliding_window", None) is None or getattr(config, "use_sliding_window", True) is False


class RaggedStep:
    """The KV cache of one ragged forward. `running`: the running rows' cache (None when no row runs), `mask`:
    their attention mask including the new token [R, T + 1]; `groups`: the rows' column groups (`column_groups`;
    empty when no row runs); `lengths`: the joining prompts' token counts, each prompt starting at position 0.
    After the forward, `joined[j]` is prompt j's cache."""

    def __init__(self, running: Any, mask: torch.Tensor | None, groups: Sequence[Group], lengths: Sequence[int]):
        self.running = running
        self.running_layers = cache_layers(running) if running is not None else []  # listed once, read per layer
        self.rows = 0 if mask is None else mask.shape[0]
        self.mask = None if mask is None else mask.bool()[:, None, None, :]
        self.groups = list(groups)
        self.lengths = list(lengths)
        self.joined = [DynamicCache() for _ in self.lengths]

    def update(self, keys: torch.Tensor, values: torch.Tensor, layer_idx: int, *args: Any, **kwargs: Any):
        """Append one layer's new keys/values [1, heads, N, dim] to the running rows' cache and the prompts' own;
        the attention function reads them from those caches."""
        k, v = keys[0], values[0]
        r = self.rows
        if r:
            self.running.update(k[:, :r].transpose(0, 1)[:, :, None], v[:, :r].transpose(0, 1)[:, :, None], layer_idx)
        start = r
        for cache, n in zip(self.joined, self.lengths, strict=True):
            cache.update(k[None, :, start : start + n], v[None, :, start : start + n], layer_idx)
            start += n
        return keys, values

    def attend(self, layer_idx: int, query: torch.Tensor, scale: float | None) -> torch.Tensor:
        """Attention output [1, N, heads, dim] for query [1, heads, N, dim]."""
        q = query[0]
        r = self.rows
        outs = []
        if r:
            layer = self.running_layers[layer_idx]
            keys, values = layer.keys, layer.values
            assert self.mask is not None
            self.mask = self.mask.to(keys.device)  # the loop keeps masks on the CPU; a no-op after the first layer
            running = q[:, :r].transpose(0, 1)[:, :, None]  # [R, heads, 1, dim]
            for a, b, c in self.groups:
                k, v, mask = keys[a:b, :, c:], values[a:b, :, c:], self.mask[a:b, ..., c:]
                out = F.scaled_dot_product_attention(running[a:b], k, v, attn_mask=mask, scale=scale, enable_gqa=True)
                outs.append(out[:, :, 0])  # [rows, heads, dim]
        start = r
        for cache, n in zip(self.joined, self.lengths, strict=True):
            layer = cache_layers(cache)[layer_idx]
            out = F.scaled_dot_product_attention(q[None, :, start : start + n], layer.keys, layer.values,
                                                 is_causal=True, scale=scale, enable_gqa=True)  # fmt: skip
            outs.append(out[0].transpose(0, 1))  # [n, heads, dim]
            start += n
        return torch.cat(outs)[None]


def column_groups(lengths: Sequence[int], width: int, call_cost: int | None = None) -> list[Group]:
    """Consecutive rows grouped for attention, each group over the columns its longest row fills (rows are left-
    padded to `width`): the split that reads the fewest row-columns, counting `call_cost` per group (a dynamic
    program, O(rows^2): ~1 ms at 64 rows, run only when rows join or leave). A long request beside short ones no
    longer makes every row read its width of padding, nor do eq. 2's documents of mixed lengths."""
    call_cost = CALL_COST if call_cost is None else call_cost
    n = len(lengths)
    best = [0] + [math.inf] * n  # best[j]: cost of rows [0, j)
    start = [0] * (n + 1)
    for j in range(1, n + 1):
        longest = 0
        for i in range(j - 1, -1, -1):
            longest = max(longest, lengths[i])
            cost = best[i] + (j - i) * longest + call_cost
            if cost < best[j]:
                best[j], start[j] = cost, i
    groups = []
    while n:
        i = start[n]
        groups.append((i, n, width - max(lengths[i:n])))
        n = i
    return groups[::-1]


def _attention(module: Any, query: torch.Tensor, key: Any, value: Any, attention_mask: Any, scaling=None, **_):
    step = _STEP.get()
    if step is None:
        raise RuntimeError(f"the {ATTENTION!r} attention runs only inside a ragged token-loop step")
    return step.attend(module.layer_idx, query, scaling), None


AttentionInterface.register(ATTENTION, _attention)


def model_configs(model: Any) -> list[Any]:
    """The config objects of `model`'s modules (each attention module reads its own `config`): walk once, reuse."""
    seen: dict[int, Any] = {}
    for m in model.modules():
        config = getattr(m, "config", None)
        if config is not None and hasattr(config, "_attn_implementation"):
            seen.setdefault(id(config), config)
    return list(seen.values())


@contextlib.contextmanager
def ragged(step: RaggedStep, configs: Sequence[Any]) -> Iterator[None]:
    """A model computes attention with `step` for one forward: its `configs` (`model_configs`) name `ATTENTION`
    meanwhile."""
    before = [c._attn_implementation for c in configs]
    token = _STEP.set(step)
    try:
        for c in configs:
            c._attn_implementation = ATTENTION
        yield
    finally:
        for c, b in zip(configs, before, strict=True):
            c._attn_implementation = b
        _STEP.reset(token)
