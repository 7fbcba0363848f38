"""Log-likelihood of a response given its prompt, with the same prompt/response tokenization as training."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from specialize.data import Example
from specialize.models import Precision, inference_mode
from specialize.prompts import PromptTemplate, encode_prompt, encode_response, render_prompt


@dataclass(frozen=True)
class LogLik:
    total: float  # sum of log p over the response tokens
    tokens: int

    @property
    def mean(self) -> float:
        return self.total / max(1, self.tokens)


def response_logliks(
    model: Any,
    tokenizer: Any,
    examples: Sequence[Example],
    template: PromptTemplate,
    responses: Sequence[str] | None = None,
    *,
    batch_size: int = 16,
    precision: Precision | None = None,
) -> list[LogLik]:
    """log p(response | prompt) per example; `responses` defaults to each example's output (no EOS)."""
    device = next(model.parameters()).device
    precision = precision or Precision.of(model)
    responses = responses if responses is not None else [e.output for e in examples]
    pairs = []
    for ex, resp in zip(examples, responses, strict=True):
        prompt = encode_prompt(render_prompt(ex, template), template, tokenizer)
        target = encode_response(resp, tokenizer)
        if not target:
            raise ValueError(f"example {ex.id}: empty response has no likelihood to score")
        pairs.append((prompt, target))
    order = sorted(range(len(pairs)), key=lambda i: len(pairs[i][0]) + len(pairs[i][1]))
    out: list[LogLik | None] = [None] * len(pairs)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        width = max(len(pairs[i][0]) + len(pairs[i][1]) for i in idx)
        ids = torch.full((len(idx), width), pad, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for row, i in enumerate(idx):
            seq = pairs[i][0] + pairs[i][1]
            ids[row, : len(seq)] = torch.tensor(seq)
            mask[row, : len(seq)] = 1
        with inference_mode(model, precision, str(device)):
            logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits.float()
        logp = F.log_softmax(logits, dim=-1)
        for row, i in enumerate(idx):
            p, t = pairs[i]
            positions = torch.arange(len(p) - 1, len(p) + len(t) - 1)
            lp = logp[row, positions, torch.tensor(t)].sum().item()
            out[i] = LogLik(lp, len(t))
    return [o for o in out if o is not None]
