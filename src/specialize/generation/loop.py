"""The one token loop. Every text the project decodes goes through it: `specialize generate`, evaluation,
paraphrases, synth instructions, eq. 2 mixtures over retrieved documents, eq. 3 contrastive decoding, and
the server.

A `Request` is one continuation. It owns k >= 1 rows (its contexts, whose next-token distributions are mixed
with its weights, eq. 2) and, for contrastive decoding, k more rows of the same contexts read by the base
model (the adapter switched off, eq. 3). All rows of all running requests share one left-padded KV cache and
step together, each row with its own LoRA (all rows' adapters in one batched operation per layer, `lora.py`),
so a batch mixes specialists.

Iteration-level (continuous) batching: each `step()` first prefills waiting requests (at most
`prefill_tokens` prompt tokens; a longer prompt is prefilled in chunks over several steps, so it never stalls
running rows for long), merges them into the running batch, then decodes one token for every running request.
Prompts that join a running batch and fit one step's budget ride in the decode step's own forward (`ragged.py`:
the running rows' tokens and the prompts end to end, each weight read once) instead of a forward of their own.
A finished or cancelled request leaves at once. `max_rows` and `max_tokens` bound what is in flight.
`policy="static"` (waves: admit only into an empty batch) exists as the comparison point of the benchmark.

Sampling is per request, with its own seeded generator: the same parameters and seed give the same text
wherever the request runs. Text is detokenized incrementally and stop strings are checked on the new text
only (linear in length); streamed text holds back a partial UTF-8 character and a possible stop-string prefix.
"""

from __future__ import annotations

import contextlib
import itertools
import math
import threading
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F

from specialize.generation import compiled, ragged
from specialize.generation.kvcache import GrowingLayer, cache_layers, growing, join_rows, keep_rows
from specialize.generation.lora import NO_ADAPTER as PEFT_BASE
from specialize.generation.lora import StackedLoRA, adapters_off, tuner_layers
from specialize.generation.params import SamplingParams
from specialize.models import Precision, attach_adapters, cache_of, inference_mode, kv, pack_linears

# Prompt tokens one prefill forward feeds at most, however large the step's budget: offline generation admits a whole
# batch at once with a budget of all its prompt tokens, and its length buckets would otherwise be prefilled in
# forwards of ~13,000 tokens (eq. 2's 80 contexts), whose element-wise activations (SiLU, gate*up, RMSNorm, RoPE)
# no longer stay in the CPU's caches. Cut to this size, that prefill ran ~1.14x as fast, the whole eq. 2 run
# 1.01x-1.06x, its other half being decode (benchmarks/prefill_chunks.py, docs/benchmarks.md); it also bounds a
# prefill's activation memory.
FORWARD_TOKENS = 4096

FinishReason = Literal["stop", "length", "cancelled"]
Policy = Literal["continuous", "static", "per_adapter"]
LoraPath = Literal["stacked", "peft"]  # batched LoRA over stacked adapter weights, or PEFT's per-adapter loop


class Unsupported(ValueError):
    """A request an engine cannot compute exactly (it would have to approximate it): `engines.py`."""


@dataclass(frozen=True)
class Output:
    """What a request produced: streamed deltas carry the new text, the last one its finish reason (or an error,
    in its own field); `generate` returns one whole Output per prompt."""

    text: str
    token_ids: tuple[int, ...] = ()
    finish_reason: FinishReason | None = None
    error: str | None = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None or self.error is not None


# ---------------------------------------------------------------------------------------------- decoding rules


def marginalize(logprobs: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Eq. 2: log sum_j w_j p_j(.) for logprobs [B, k, V] and weights [B, k] (each row sums to 1)."""
    return torch.logsumexp(logprobs + torch.log(weights).unsqueeze(-1), dim=1)


def contrastive(expert: torch.Tensor, amateur: torch.Tensor, alpha: float = 0.1) -> torch.Tensor:
    """Eq. 3: log p_expert - log p_amateur over the tokens the expert finds plausible
    (p_expert >= alpha * max p_expert); the others get -inf."""
    cutoff = expert.max(dim=-1, keepdim=True).values + math.log(alpha)
    return torch.where(expert >= cutoff, expert - amateur, torch.full_like(expert, float("-inf")))


def retrieval_weights(scores: Sequence[float]) -> list[float]:
    """p_ret(d_j | x) of eq. 2: retrieval scores normalized to sum to one (uniform when all are zero)."""
    total = sum(max(0.0, s) for s in scores)
    if total <= 0:
        return [1.0 / len(scores)] * len(scores)
    return [max(0.0, s) / total for s in scores]


def choose(scores: torch.Tensor, params: SamplingParams, generator: torch.Generator | None) -> int:
    """Greedy (temperature 0) or top-p sampling from scores [V] (log-probabilities or any logits)."""
    if params.temperature == 0:
        return int(scores.argmax())
    # sampled on the CPU whatever the model's device: a request's generator is a CPU generator, so the same seed
    # draws the same tokens on every device
    probs = F.softmax(scores.float().cpu() / params.temperature, dim=-1)
    if params.top_p < 1.0:
        sorted_p, order = probs.sort(descending=True)
        keep = sorted_p.cumsum(-1) - sorted_p < params.top_p  # the smallest set reaching top_p
        probs = torch.zeros_like(probs).scatter(-1, order, torch.where(keep, sorted_p, torch.zeros_like(sorted_p)))
    return int(torch.multinomial(probs / probs.sum(), 1, generator=generator))


# ---------------------------------------------------------------------------------------------- text


def held_back(text: str, stop: Sequence[str]) -> int:
    """Characters at the end of `text` that may start a stop string, so must not be streamed yet."""
    hold = 0
    for s in stop:
        for n in range(min(len(s) - 1, len(text)), 0, -1):
            if text.endswith(s[:n]):
                hold = max(hold, n)
                break
    return hold


class TextStream:
    """Incremental detokenization with stop strings. Each token decodes a window of a few tokens (the last
    complete characters and what follows), so the cost is linear in length; a token that ends inside a UTF-8
    character is held until the character is complete."""

    def __init__(self, tokenizer: Any, stop: Sequence[str]):
        self.tokenizer = tokenizer
        self.stop = tuple(s for s in stop if s)
        self.longest = max((len(s) for s in self.stop), default=0)
        self.ids: list[int] = []
        self.text = ""  # complete characters so far (cut before a stop string once one appears)
        self.stopped = False
        self.emitted = 0  # characters already streamed
        self._prefix = 0  # the window [prefix, read) decodes to the text's last piece; [prefix, end) to it + new
        self._read = 0

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def push(self, token: int) -> None:
        self.ids.append(token)
        before = self._decode(self.ids[self._prefix : self._read])
        after = self._decode(self.ids[self._prefix :])
        if len(after) > len(before) and not after.endswith("\ufffd"):
            self._extend(after[len(before) :])
            self._prefix, self._read = self._read, len(self.ids)

    def flush(self) -> None:
        """At the end: whatever is held back (an incomplete character decodes as U+FFFD, as a full decode does)."""
        before = self._decode(self.ids[self._prefix : self._read])
        after = self._decode(self.ids[self._prefix :])
        if len(after) > len(before):
            self._extend(after[len(before) :])
        self._prefix = self._read = len(self.ids)

    def _extend(self, new: str) -> None:
        if self.stopped:
            return
        start = max(0, len(self.text) - self.longest + 1)  # a stop string may begin in the old text
        self.text += new
        hits = [i for i in (self.text.find(s, start) for s in self.stop) if i >= 0]
        if hits:
            self.text, self.stopped = self.text[: min(hits)], True

    def delta(self, final: bool) -> str:
        end = len(self.text) if final else len(self.text) - held_back(self.text, self.stop)
        out = self.text[self.emitted : end] if end > self.emitted else ""
        self.emitted = max(self.emitted, end)
        return out


# ---------------------------------------------------------------------------------------------- requests


@dataclass(eq=False)
class Request:
    """One continuation. `contexts`: k >= 1 prompts (token ids) mixed with `weights` (eq. 2; default: one
    context). `adapter`: the PEFT adapter of its rows (None: the model as it is). `contrastive`: the alpha of
    eq. 3 against the base model, or None. `on_output` receives streamed deltas and the final output (from the
    loop's thread)."""

    contexts: list[list[int]]
    params: SamplingParams = field(default_factory=SamplingParams)
    weights: list[float] | None = None
    adapter: str | None = None
    contrastive: float | None = None
    on_output: Callable[[Output], None] | None = None
    cancelled: threading.Event = field(default_factory=threading.Event)
    # decoding state, owned by the loop
    tokens: list[int] = field(default_factory=list)
    stream: TextStream | None = None
    generator: torch.Generator | None = None
    result: Output | None = None

    def __post_init__(self) -> None:
        if not self.contexts or any(not c for c in self.contexts):
            raise ValueError("a request needs at least one non-empty context")
        if self.weights is None:
            self.weights = [1.0 / len(self.contexts)] * len(self.contexts)
        if len(self.weights) != len(self.contexts) or not all(math.isfinite(w) and w > 0 for w in self.weights):
            raise ValueError("one positive, finite weight per context")

    @property
    def n_rows(self) -> int:
        return len(self.contexts) * (2 if self.contrastive is not None else 1)

    def row_prompts(self) -> list[tuple[list[int], str | None]]:
        """(prompt, adapter) of each row: the expert rows, then (contrastive) the same contexts on the base."""
        rows = [(c, self.adapter) for c in self.contexts]
        if self.contrastive is not None:
            rows += [(c, PEFT_BASE) for c in self.contexts]
        return rows

    def cancel(self) -> None:
        self.cancelled.set()

    @property
    def cost(self) -> int:
        """Tokens it may hold in the cache: every row's prompt plus the tokens it may generate."""
        return sum(len(c) for c, _ in self.row_prompts()) + self.n_rows * self.params.max_new_tokens


def rows_of(requests: Sequence[Request]) -> list[tuple[list[int], str | None]]:
    """(prompt, adapter) of every row of `requests`, in batch order."""
    return [row for r in requests for row in r.row_prompts()]


def split_waiting(
    waiting: deque[Request], only: Callable[[Request], bool] | None
) -> tuple[deque[Request], list[Request]]:
    """(the queue without the requests `only` selects, those requests); `only=None` selects all."""
    chosen = [r for r in waiting if only is None or only(r)]
    return deque(r for r in waiting if only is not None and not only(r)), chosen


# ---------------------------------------------------------------------------------------------- the batch


def left_pad(rows: Sequence[Sequence[int]], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, r in enumerate(rows):
        ids[i, width - len(r) :] = torch.tensor(r, dtype=torch.long)
        mask[i, width - len(r) :] = 1
    return ids, mask


@dataclass
class _Rows:
    """Rows stepping together: one KV cache, the attention mask over it, each row's next position and its
    current next-token log-probabilities."""

    cache: Any
    mask: torch.Tensor  # [R, T]
    next_pos: torch.Tensor  # [R]
    logp: torch.Tensor  # [R, V]
    adapters: list[str | None]
    _groups: list[ragged.Group] | None = None

    def __len__(self) -> int:
        return len(self.adapters)

    def groups(self) -> list[ragged.Group]:
        """Consecutive rows that attend together over only the columns their longest row fills
        (`ragged.column_groups`). Every row gains one column per step, so the groups hold until rows join or
        leave."""
        if self._groups is None:
            width = self.mask.shape[1]
            first = self.mask.int().argmax(-1)  # each row's first attended column (padding is on the left)
            self._groups = ragged.column_groups((width - first).tolist(), width)
        return self._groups

    def attend_new_token(self) -> None:
        """The mask's column for the token every row is about to feed."""
        self.mask = torch.cat([self.mask, self.mask.new_ones((len(self), 1))], dim=1)

    def merge(self, *others: _Rows, order: Sequence[int] | None = None) -> None:
        """Append the rows of `others`, every group's cache left-padded to the widest (`kvcache.join_rows`: one
        copy of the cache for all of them). `order[j]`: the batch row that the j-th of all rows, ours first, becomes
        (default: rows stay in that order)."""
        if order is not None and list(order) == sorted(order):
            order = None
        if not others and order is None:
            return
        groups = (self, *others)
        width = max(g.mask.shape[1] for g in groups)
        places = None if order is None else torch.tensor(order, dtype=torch.long)
        layer_lists = [cache_layers(g.cache) for g in groups]
        cache_places = None if places is None else places.to(layer_lists[0][0].keys.device)  # once, not per layer
        for layers in zip(*layer_lists, strict=True):
            join_rows(layers, width, cache_places)
        mask = torch.cat([F.pad(g.mask, (width - g.mask.shape[1], 0)) for g in groups])
        next_pos = torch.cat([g.next_pos for g in groups])
        logp = torch.cat([g.logp for g in groups])
        adapters = [a for g in groups for a in g.adapters]
        if places is not None:  # row places[j] is the j-th row: read the j-th row's data at the inverse
            inverse = torch.argsort(places)
            mask, next_pos, logp = mask[inverse], next_pos[inverse], logp[inverse.to(logp.device)]
            adapters = [adapters[i] for i in inverse.tolist()]
        self.mask, self.next_pos, self.logp, self.adapters = mask, next_pos, logp, adapters
        self._groups = None

    def keep(self, index: list[int]) -> None:
        """Only the rows at `index`, in that order; columns every remaining row pads are dropped."""
        idx = torch.tensor(index, dtype=torch.long)
        mask = self.mask[idx]
        live = mask.any(dim=0).nonzero()
        start = int(live[0]) if len(live) else mask.shape[1]
        for layer in cache_layers(self.cache):
            keep_rows(layer, idx.to(layer.keys.device), start)
        self.mask = mask[:, start:]
        self.next_pos = self.next_pos[idx]
        self.logp = self.logp[idx]
        self.adapters = [self.adapters[i] for i in index]
        self._groups = None


def length_buckets(lengths: Sequence[int], slack: float = 0.2) -> list[list[int]]:
    """Row indices grouped by similar length, shortest first, so that each group's padded area exceeds its real
    tokens by at most `slack`. Prompts of mixed lengths (eq. 2's documents: 116 to 518 tokens for one benchmark's
    80 contexts) padded to one width would spend about half of the prefill on padding."""
    buckets: list[list[int]] = []
    current: list[int] = []
    real = 0
    for i in sorted(range(len(lengths)), key=lengths.__getitem__):
        if current and (len(current) + 1) * lengths[i] > (1 + slack) * (real + lengths[i]):
            buckets.append(current)
            current, real = [], 0
        current.append(i)
        real += lengths[i]
    return [*buckets, current] if current else buckets


@dataclass
class _Bucket:
    """Rows of similar length prefilled together: left-padded to one width, fed `cols` columns so far. `index`:
    their positions among the prefill job's rows."""

    index: list[int]
    ids: torch.Tensor
    mask: torch.Tensor
    adapters: list[str | None]
    cols: int = 0
    cache: Any = None
    last: torch.Tensor | None = None  # last-position logits


@dataclass
class _Prefill:
    """Requests being prefilled together, their rows in length buckets prefilled one after another; they join
    the running batch together, in request order, when the last bucket is done."""

    requests: list[Request]
    buckets: list[_Bucket]
    done: list[_Rows] = field(default_factory=list)


# ---------------------------------------------------------------------------------------------- the loop


class TokenLoop:
    """Owns a model for decoding. `submit` from any thread; `step` (or `run`) from one thread."""

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        precision: Precision | None = None,
        *,
        max_rows: int = 64,
        max_tokens: int | None = None,
        prefill_tokens: int = 512,
        policy: Policy = "continuous",
        lora: LoraPath = "stacked",
        fused_prefill: bool = True,
        compile_decode: bool = False,
    ):
        if max_rows < 1 or prefill_tokens < 1:
            raise ValueError("max_rows and prefill_tokens must be >= 1")
        self.model = model
        self.tokenizer = tokenizer
        self.precision = precision or Precision.of(model)
        self.device = next(model.parameters()).device
        # bf16 weights reordered once for the CPU's matrix-vector kernels: ~1.3x a batch-1 decode step on AMX
        self.packed = pack_linears(model, self.precision, self.device)
        self.max_rows = max_rows
        self.max_tokens = max_tokens
        self.prefill_tokens = prefill_tokens
        self.policy = policy
        self.lora = lora
        self.lora_path = lora  # what mixed-adapter steps actually use (with the reason when PEFT's path)
        self.fused_prefill = fused_prefill  # joining prompts in the decode step's forward (`ragged.py`)
        # a lone row's decode steps through `torch.compile` (`compiled.py`: ~1.7x a batch-1 step, after compiling)
        self.compiled = compiled.for_model(model) if compile_decode else None
        self._ragged: tuple[int, list[Any] | None] | None = None  # (id of the model, its configs or None: unsupported)
        self.joining: list[Request] = []  # admitted this step, prefilled in its decode forward
        self._stack: StackedLoRA | None = None
        self._stack_key: tuple[Any, ...] | None = None
        self._tuners: list[Any] = []
        self.eos = tokenizer.eos_token_id
        self.pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (self.eos or 0)
        self.waiting: deque[Request] = deque()
        self.lock = threading.Lock()  # guards `waiting`
        self.prefilling: _Prefill | None = None
        self.running: list[Request] = []
        self.rows: _Rows | None = None
        self.stats = {
            "steps": 0,
            "prefill_tokens": 0,
            "decode_rows": 0,
            "mixed_steps": 0,
            "joined_in_decode": 0,
            "compiled_steps": 0,
        }

    # ---------------------------------------------------------------------------------- admission

    def submit(self, *requests: Request) -> None:
        """Queue requests (all or none: a request that can never fit is refused before any is queued)."""
        for r in requests:
            if r.n_rows > self.max_rows:
                raise ValueError(f"a request of {r.n_rows} rows cannot fit in max_rows={self.max_rows}")
            if self.max_tokens is not None and r.cost > self.max_tokens:
                raise ValueError(f"a request of up to {r.cost} tokens cannot fit in max_tokens={self.max_tokens}")
        for r in requests:
            r.stream = TextStream(self.tokenizer, r.params.stop)
            r.generator = torch.Generator().manual_seed(r.params.seed) if r.params.seed is not None else None
        with self.lock:
            self.waiting.extend(requests)

    @property
    def forward_tokens(self) -> int:
        """Prompt tokens one prefill forward feeds at most: the step's budget, never over `FORWARD_TOKENS`."""
        return min(self.prefill_tokens, FORWARD_TOKENS)

    @property
    def busy(self) -> bool:
        return bool(self.waiting or self.prefilling or self.running)

    def in_flight(self) -> tuple[int, int]:
        """(rows, tokens) of the requests being prefilled or decoded."""
        reqs = self.running + (self.prefilling.requests if self.prefilling else [])
        return sum(r.n_rows for r in reqs), sum(r.cost for r in reqs)

    def _admit(self) -> list[Request]:
        """Waiting requests that fit now, in arrival order (static waves: only into an empty batch)."""
        if self.policy != "continuous" and (self.running or self.prefilling):
            return []
        rows, tokens = self.in_flight()
        taken: list[Request] = []
        width = 0
        with self.lock:
            while self.waiting:
                r = self.waiting[0]
                if r.cancelled.is_set():
                    self.waiting.popleft()
                    self._finish(r, "cancelled")
                    continue
                if self.policy == "per_adapter" and taken and r.adapter != taken[0].adapter:
                    break
                if rows + r.n_rows > self.max_rows:
                    break
                if self.max_tokens is not None and tokens + r.cost > self.max_tokens:
                    break
                new_width = max(width, *(len(c) for c in r.contexts))
                # prefill several requests at once only while their padded prompts fit one step's budget;
                # static waves take the whole wave (their prefill is chunked by columns all the same)
                taken_rows = sum(t.n_rows for t in taken)
                if taken and self.policy == "continuous" and new_width * (taken_rows + r.n_rows) > self.prefill_tokens:
                    break
                taken.append(self.waiting.popleft())
                rows, tokens, width = rows + r.n_rows, tokens + r.cost, new_width
        return taken

    # ---------------------------------------------------------------------------------- the model

    # ---------------------------------------------------------------------------------- adapters (PEFT)

    def attach(self, name: str, path: str | Path) -> None:
        """Load a LoRA adapter next to the others; on failure, whatever PEFT injected is removed again."""
        try:
            self.model = attach_adapters(self.model, {name: path})
        except Exception:
            if name in getattr(self.model, "peft_config", {}):
                self.model.delete_adapter(name)
            raise
        finally:
            self.adapters_changed()

    def detach(self, name: str) -> None:
        self.model.delete_adapter(name)
        self.adapters_changed()

    def mix(self, name: str, sources: list[str], weights: list[float], combination: str) -> None:
        """A new adapter whose update is the weighted combination of others' (PEFT add_weighted_adapter)."""
        try:
            self.model.add_weighted_adapter(sources, weights, name, combination_type=combination)
        except ValueError:  # e.g. "linear" over adapters of different ranks
            if name in self.model.peft_config:
                self.model.delete_adapter(name)
            raise
        finally:
            self.adapters_changed()

    def adapters_changed(self) -> None:
        """Call after loading, mixing or deleting adapters: the stacked weights are rebuilt before the next step."""
        if self._stack is not None:
            self._stack.close()
        self._stack, self._stack_key = None, None

    def _stacked(self) -> StackedLoRA | None:
        """The model's adapters stacked for batched LoRA (built on first use and whenever the adapters change),
        or None where they must run on PEFT's path (`self.lora_path` says why)."""
        key = (id(self.model), tuple(getattr(self.model, "peft_config", {})))
        if key != self._stack_key:
            self.adapters_changed()
            self._tuners = tuner_layers(self.model)
            if self.lora == "stacked":
                self._stack, why = StackedLoRA.build(self.model, self._tuners)
                self.lora_path = "stacked" if self._stack else f"peft ({why})"
            self._stack_key = key
        return self._stack

    @contextlib.contextmanager
    def _adapter_kwargs(self, adapters: list[str | None], tokens: list[int] | None = None) -> Iterator[dict[str, Any]]:
        """Per-row LoRA: nothing for a plain model or when every row uses the model as it is; the adapter
        switched off when every row reads the base; else every row's own adapter, stacked (`lora.py`) or by
        PEFT's per-row `adapter_names`."""
        if not hasattr(self.model, "peft_config") or all(a is None for a in adapters):
            yield {}
            return
        stack = self._stacked()
        if all(a == PEFT_BASE for a in adapters):
            with adapters_off(self._tuners):
                yield {}
            return
        active = self.model.active_adapter
        self.stats["mixed_steps"] += len({a if a is not None else active for a in adapters}) > 1
        if stack is not None:
            with stack.rows(adapters, tokens):
                yield {}
        else:
            assert tokens is None, "a ragged forward needs the stacked LoRA path (`_fuses`)"
            yield {"adapter_names": [a if a is not None else active for a in adapters]}

    def _forward(self, adapters: list[str | None], tokens: list[int] | None = None, **inputs: Any) -> Any:
        with self._adapter_kwargs(adapters, tokens) as kwargs:
            inputs = {k: v.to(self.device) if isinstance(v, torch.Tensor) else v for k, v in inputs.items()}
            return self.model(**inputs, use_cache=True, **kwargs)

    def _prefill_step(self) -> None:
        """Feed the current prefill job at most `prefill_tokens` tokens; when done, its rows join the batch."""
        if self.prefilling is None:
            taken = self._admit()
            if not taken:
                return
            if self._fuses(taken):
                self.joining = taken
                return
            prompts = rows_of(taken)
            buckets = []
            for index in length_buckets([len(p) for p, _ in prompts]):
                ids, mask = left_pad([prompts[i][0] for i in index], self.pad)
                buckets.append(_Bucket(index, ids, mask, [prompts[i][1] for i in index]))
            self.prefilling = _Prefill(taken, buckets)
        job = self.prefilling
        b = job.buckets[len(job.done)]
        n_rows, width = b.ids.shape
        cols = max(1, self.forward_tokens // n_rows)
        lo, hi = b.cols, min(b.cols + cols, width)
        positions = (b.mask.cumsum(-1) - 1).clamp(min=0)
        out = self._forward(b.adapters, input_ids=b.ids[:, lo:hi], attention_mask=b.mask[:, :hi],
                            position_ids=positions[:, lo:hi], **kv(b.cache), logits_to_keep=1)  # fmt: skip
        b.cache, b.cols, b.last = growing(cache_of(out)), hi, out.logits[:, -1]
        self.stats["prefill_tokens"] += int(b.mask[:, lo:hi].sum())
        if b.cols < width:
            return
        job.done.append(_Rows(b.cache, b.mask, b.mask.sum(-1), F.log_softmax(b.last.float(), -1), b.adapters))
        if len(job.done) < len(job.buckets):
            return
        # the running rows, then the buckets' rows put back in request order, all in one copy of the cache
        ours = len(self.rows) if self.rows is not None else 0
        groups = [g for g in (self.rows, *job.done) if g is not None]
        groups[0].merge(*groups[1:], order=[*range(ours), *(ours + i for b in job.buckets for i in b.index)])
        self.rows = groups[0]
        self.running += job.requests
        self.prefilling = None

    def _fuses(self, taken: list[Request]) -> bool:
        """Whether requests joining the running batch are prefilled in its decode forward: their prompts fit one
        step's budget and the forward can be ragged (`_ragged_ok`)."""
        if not (self.fused_prefill and self.policy == "continuous" and self.rows is not None):
            return False
        prompts = rows_of(taken)
        if sum(len(p) for p, _ in prompts) > self.forward_tokens:
            return False
        return self._ragged_ok(self.rows.adapters + [a for _, a in prompts])

    def _ragged_ok(self, adapters: list[str | None]) -> bool:
        """Whether a forward over these rows can be ragged (`ragged.py`): the model's family is one it supports,
        the running rows' cache grows in place, and every row's adapter can be applied per token (the stacked
        LoRA path)."""
        if self._ragged is None or self._ragged[0] != id(self.model):
            supported = ragged.supports(self.model)
            self._ragged = (id(self.model), ragged.model_configs(self.model) if supported else None)
        if self._ragged[1] is None:
            return False
        if self.rows is not None and not all(type(la) is GrowingLayer for la in cache_layers(self.rows.cache)):
            return False
        if not hasattr(self.model, "peft_config") or all(a is None for a in adapters):
            return True
        return all(a == PEFT_BASE for a in adapters) or self._stacked() is not None  # as `_adapter_kwargs` decides

    def _ragged_forward(self, tokens: list[int], joining: list[Request]) -> None:
        """One forward for the running rows' next tokens and the joining requests' prompts; the prompts' rows
        then join the batch."""
        rows = self.rows
        r = len(rows) if rows is not None else 0
        prompts = rows_of(joining)
        lengths = [len(p) for p, _ in prompts]
        if rows is not None:
            rows.attend_new_token()
        ids = torch.tensor(tokens + [t for p, _ in prompts for t in p])[None]
        starts = [rows.next_pos] if rows is not None else []
        positions = torch.cat([*starts, *(torch.arange(n) for n in lengths)])[None]
        last = torch.tensor([*range(r), *(r + e - 1 for e in itertools.accumulate(lengths))])  # logits kept
        adapters = (rows.adapters if rows is not None else []) + [a for _, a in prompts]
        step = ragged.RaggedStep(rows.cache if rows is not None else None, rows.mask if rows is not None else None,
                                 rows.groups() if rows is not None else [], lengths)  # fmt: skip
        assert self._ragged is not None and self._ragged[1] is not None
        with ragged.ragged(step, self._ragged[1]):
            out = self._forward(adapters, [1] * r + lengths, input_ids=ids, position_ids=positions,
                                logits_to_keep=last, **kv(step))  # fmt: skip
        logp = F.log_softmax(out.logits[0].float(), dim=-1)
        if rows is not None:
            rows.next_pos, rows.logp = rows.next_pos + 1, logp[:r]
            self.stats["decode_rows"] += r
        joined = [_Rows(growing(cache), torch.ones((1, len(p)), dtype=torch.long), torch.tensor([len(p)]),
                        logp[r + j : r + j + 1], [adapter])
                  for j, ((p, adapter), cache) in enumerate(zip(prompts, step.joined, strict=True))]  # fmt: skip
        if self.rows is None:
            self.rows, joined = joined[0], joined[1:]
        self.rows.merge(*joined)
        self.running += joining
        self.stats["prefill_tokens"] += sum(lengths)
        self.stats["joined_in_decode"] += len(joining)

    def _scores(self, r: Request, logp: torch.Tensor) -> torch.Tensor:
        """The request's next-token scores [V] from its rows' log-probabilities [n_rows, V]."""
        k = len(r.contexts)
        w = torch.tensor([r.weights], dtype=torch.float32, device=logp.device)
        expert = logp[:k][None] if k > 1 else None
        scores = marginalize(expert, w)[0] if expert is not None else logp[0]
        if r.contrastive is not None:
            amateur = marginalize(logp[k:][None], w)[0] if k > 1 else logp[k]
            scores = contrastive(scores[None], amateur[None], r.contrastive)[0]
        return scores

    def _decode_step(self) -> None:
        """Choose every running request's next token, retire the finished, and run one forward for the rest (and
        for the prompts joining them, `_ragged_forward`)."""
        joining, self.joining = self.joining, []
        tokens: list[int] = []
        if self.running and self.rows is not None:
            tokens = self._choose()
        if joining:
            try:
                self._ragged_forward(tokens, joining)
            except BaseException:  # not admitted after all: they wait again, first (the caller fails or retries)
                with self.lock:
                    self.waiting.extendleft(reversed(joining))
                raise
            return
        if self.rows is None:
            return
        rows = self.rows
        # rows of very different lengths: a ragged step, whose attention reads only the columns each group of rows
        # fills; one group stays on transformers' attention, ~4% faster a step (docs/benchmarks.md)
        if len(rows.groups()) > 1 and self._ragged_ok(rows.adapters):
            self._ragged_forward(tokens, [])
            return
        if self._compiled_step(tokens):
            return
        rows.attend_new_token()
        out = self._forward(rows.adapters, input_ids=torch.tensor(tokens)[:, None], attention_mask=rows.mask,
                            position_ids=rows.next_pos[:, None], **kv(rows.cache))  # fmt: skip
        rows.cache, rows.next_pos = cache_of(out), rows.next_pos + 1
        rows.logp = F.log_softmax(out.logits[:, -1].float(), dim=-1)
        self.stats["decode_rows"] += len(rows)

    def _compiled_step(self, tokens: list[int]) -> bool:
        """The decode step of a lone unpadded row of a plain model through the compiled forward (`compiled.py`);
        False where it does not apply or compiling failed (the caller steps eagerly)."""
        rows = self.rows
        if self.compiled is None or rows is None:
            return False
        layers = cache_layers(rows.cache)
        padded = not bool(rows.mask[:, 0].all())  # padding is on the left: a row that attends column 0 has none
        if not self.compiled.applies(self.model, layers, len(rows), padded, rows.adapters):
            return False
        logits = self.compiled.step(tokens[0], int(rows.next_pos[0]), layers)
        if logits is None:
            return False
        rows.attend_new_token()
        rows.next_pos = rows.next_pos + 1
        rows.logp = F.log_softmax(logits.float(), dim=-1)
        self.stats["decode_rows"] += 1
        self.stats["compiled_steps"] += 1
        return True

    def _choose(self) -> list[int]:
        """Every running request's next token; the finished leave. Returns the tokens of the rows that remain."""
        assert self.rows is not None
        tokens: list[int] = []
        still: list[Request] = []
        # every row's argmax in one op: one device sync per step for plain greedy requests, not one per request
        greedy = self.rows.logp.argmax(-1).tolist()
        for r, span in self._spans():
            if r.cancelled.is_set():
                self._finish(r, "cancelled")
                continue
            if r.params.temperature == 0 and r.n_rows == 1:
                token = greedy[span.start]
            else:
                token = choose(self._scores(r, self.rows.logp[span]), r.params, r.generator)
            if self._advance(r, token):
                continue
            still.append(r)
            tokens += [token] * r.n_rows
        self._keep(still)
        return tokens

    def _spans(self) -> Iterator[tuple[Request, slice]]:
        """Each running request with the slice of batch rows it owns (rows are in request order)."""
        start = 0
        for r in self.running:
            yield r, slice(start, start + r.n_rows)
            start += r.n_rows

    def _keep(self, still: list[Request]) -> None:
        """Only `still` keep running; the other requests' rows leave the batch."""
        alive = {id(r) for r in still}
        index = [i for r, span in self._spans() if id(r) in alive for i in range(span.start, span.stop)]
        self.running = still
        if not index:
            self.rows = None
        elif self.rows is not None and len(index) != len(self.rows):
            self.rows.keep(index)

    def _advance(self, r: Request, token: int) -> bool:
        """Take one token; stream the text that is final; True when the request is over."""
        assert r.stream is not None
        finish: FinishReason | None = None
        if token == self.eos and not r.params.ignore_eos:
            finish = "stop"
        else:
            r.tokens.append(token)
            r.stream.push(token)
            if r.stream.stopped:
                finish = "stop"
            elif len(r.tokens) >= r.params.max_new_tokens:
                finish = "length"
        if finish is not None:
            self._finish(r, finish)
            return True
        if r.on_output is not None and (delta := r.stream.delta(final=False)):
            r.on_output(Output(delta, (token,)))
        return False

    def _finish(self, r: Request, finish: FinishReason | None, error: str | None = None) -> None:
        stream = r.stream or TextStream(self.tokenizer, r.params.stop)
        if finish != "cancelled" and error is None:
            stream.flush()
        r.result = Output(stream.text, tuple(r.tokens), finish, error)
        if r.on_output is not None:
            r.on_output(Output(stream.delta(final=True) if error is None else "", tuple(r.tokens), finish, error))

    # ---------------------------------------------------------------------------------- driving

    def step(self) -> None:
        """One iteration: prefill (bounded), then one decode step for every running request."""
        self.stats["steps"] += 1
        with inference_mode(self.model, self.precision, self.device):
            self._prefill_step()
            self._decode_step()

    def run(self) -> None:
        while self.busy:
            self.step()

    def fail_all(self, error: str, only: Callable[[Request], bool] | None = None) -> None:
        """End requests (all, or those `only` selects) with an error; the others go on."""
        with self.lock:
            self.waiting, failed = split_waiting(self.waiting, only)
        for r in failed:
            self._finish(r, None, error)
        if self.prefilling is not None and (only is None or any(only(r) for r in self.prefilling.requests)):
            redo = []  # a shared prefill cannot lose some of its rows: the others are prefilled again, first
            for r in self.prefilling.requests:
                if only is None or only(r):
                    self._finish(r, None, error)
                else:
                    redo.append(r)
            with self.lock:
                self.waiting.extendleft(reversed(redo))
            self.prefilling = None
        if self.running:
            still = []
            for r in self.running:
                if only is None or only(r):
                    self._finish(r, None, error)
                else:
                    still.append(r)
            self._keep(still)
