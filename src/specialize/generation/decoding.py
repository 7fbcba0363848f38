"""Decoding rules as functions on next-token log-probabilities, independent of any backend, and a batched
KV-cached loop that applies them.

- Marginalization over retrieved documents (Self-Specialization eq. 2):
      p(y_t | x, y_<t) = sum_j p_ret(d_j | x) * p_lm(y_t | x, d_j, y_<t)
  every document context of an item shares the same generated prefix y_<t.
- Contrastive decoding (eq. 3): score(y) = log p_expert(y) - log p_amateur(y), restricted to tokens the
  expert finds plausible: p_expert(y) >= alpha * max_y' p_expert(y').
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from specialize.generation.hf import SamplingParams, cut_at_stop, left_pad
from specialize.models import Precision, inference_mode


def marginalize(logprobs: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """log sum_j w_j p_j(.) for logprobs [B, k, V] and weights [B, k] (each row sums to 1)."""
    return torch.logsumexp(logprobs + torch.log(weights).unsqueeze(-1), dim=1)


def contrastive(expert: torch.Tensor, amateur: torch.Tensor, alpha: float = 0.1) -> torch.Tensor:
    """Contrastive scores [B, V]; implausible tokens (by the expert) get -inf."""
    cutoff = expert.max(dim=-1, keepdim=True).values + math.log(alpha)
    return torch.where(expert >= cutoff, expert - amateur, torch.full_like(expert, float("-inf")))


def retrieval_weights(scores: Sequence[float]) -> list[float]:
    """p_ret(d_j | x): retrieval scores normalized to sum to one (uniform when all are zero)."""
    total = sum(max(0.0, s) for s in scores)
    if total <= 0:
        return [1.0 / len(scores)] * len(scores)
    return [max(0.0, s) / total for s in scores]


def choose(scores: torch.Tensor, params: SamplingParams, generator: torch.Generator | None) -> torch.Tensor:
    """Greedy (temperature 0) or top-p sampling over scores [B, V] (log-probabilities or any logits)."""
    if params.temperature == 0:
        return scores.argmax(dim=-1)
    probs = F.softmax(scores / params.temperature, dim=-1)
    if params.top_p < 1.0:
        sorted_p, order = probs.sort(dim=-1, descending=True)
        keep = sorted_p.cumsum(dim=-1) - sorted_p < params.top_p  # smallest set reaching top_p
        sorted_p = torch.where(keep, sorted_p, torch.zeros_like(sorted_p))
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_p)
    return torch.multinomial(probs / probs.sum(-1, keepdim=True), 1, generator=generator).squeeze(-1)


@dataclass(frozen=True)
class Decoded:
    text: str  # cut before the first stop string
    token_ids: tuple[int, ...]
    finish_reason: str  # "stop" (EOS or a stop string) or "length"


class Contexts:
    """Left-padded rows stepping together with one KV cache; `logp` holds each row's next-token
    log-probabilities. `forward_kwargs` go to every model call (e.g. PEFT's per-row `adapter_names`)."""

    def __init__(self, model: Any, rows: Sequence[Sequence[int]], pad: int, device: torch.device, **forward_kwargs):
        self.model = model
        self.forward_kwargs = forward_kwargs
        ids, self.mask = left_pad(rows, pad)
        self.next_pos = self.mask.sum(-1)
        self.device = device
        positions = (self.mask.cumsum(-1) - 1).clamp(min=0)
        out = model(input_ids=ids.to(device), attention_mask=self.mask.to(device),
                    position_ids=positions.to(device), use_cache=True, **forward_kwargs)  # fmt: skip
        self.cache = out.past_key_values
        self.logp = F.log_softmax(out.logits[:, -1].float(), dim=-1)

    def step(self, tokens: torch.Tensor) -> None:
        self.mask = torch.cat([self.mask, torch.ones((len(tokens), 1), dtype=torch.long)], dim=1)
        out = self.model(
            input_ids=tokens[:, None].to(self.device), attention_mask=self.mask.to(self.device),
            position_ids=self.next_pos[:, None].to(self.device), past_key_values=self.cache, use_cache=True,
            **self.forward_kwargs,
        )  # fmt: skip
        self.next_pos = self.next_pos + 1
        self.cache = out.past_key_values
        self.logp = F.log_softmax(out.logits[:, -1].float(), dim=-1)


def generate_mixture(
    model: Any,
    tokenizer: Any,
    contexts: Sequence[Sequence[list[int]]],
    weights: Sequence[Sequence[float]],
    params: SamplingParams,
    *,
    amateur: Callable[[], contextlib.AbstractContextManager[Any]] | None = None,
    alpha: float = 0.1,
    precision: Precision | None = None,
) -> list[Decoded]:
    """Decode one continuation per item from the weighted mixture of its k contexts' next-token
    distributions (eq. 2). With `amateur` (a context manager under which `model` acts as the base model,
    e.g. PEFT's `disable_adapter`), scores are contrastive against it (eq. 3). All items must have the same k.
    """
    k = len(contexts[0])
    if any(len(c) != k for c in contexts) or any(len(w) != k for w in weights):
        raise ValueError("every item needs the same number of contexts and weights")
    device = next(model.parameters()).device
    precision = precision or Precision.of(model)
    rows = [ctx for item in contexts for ctx in item]
    w = torch.tensor(weights, dtype=torch.float32)
    eos = tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    gen = torch.Generator().manual_seed(params.seed) if params.seed is not None else None
    out: list[list[int]] = [[] for _ in contexts]
    done = torch.zeros(len(contexts), dtype=torch.bool)
    with inference_mode(model, precision, str(device)):
        expert = Contexts(model, rows, pad, device)
        base = None
        if amateur is not None:
            with amateur():
                base = Contexts(model, rows, pad, device)
        for _ in range(params.max_new_tokens):
            scores = marginalize(expert.logp.view(len(contexts), k, -1), w)
            if base is not None:
                scores = contrastive(scores, marginalize(base.logp.view(len(contexts), k, -1), w), alpha)
            nxt = choose(scores, params, gen)
            nxt = torch.where(done, torch.full_like(nxt, pad), nxt)
            for i in range(len(contexts)):
                if not done[i]:
                    if nxt[i].item() == eos:
                        done[i] = True
                    else:
                        out[i].append(int(nxt[i]))
                        # a stop string ends within the last few tokens when it first appears
                        if params.stop and any(s in tokenizer.decode(out[i][-16:]) for s in params.stop):
                            done[i] = True
            if bool(done.all()):
                break
            per_row = nxt.repeat_interleave(k)
            expert.step(per_row)
            if base is not None:
                with amateur():
                    base.step(per_row)
    results = []
    for t, d in zip(out, done.tolist(), strict=True):
        text, _ = cut_at_stop(tokenizer.decode(t, skip_special_tokens=True), params.stop)
        results.append(Decoded(text, tuple(t), "stop" if d else "length"))
    return results
