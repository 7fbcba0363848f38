"""Batched generation with Hugging Face transformers (CPU or GPU, KV cache, left padding)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field

from specialize.models import Precision, inference_mode
from specialize.prompts import PromptTemplate, encode_prompt


class SamplingParams(BaseModel):
    """temperature 0 means greedy decoding."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    max_new_tokens: int = Field(256, ge=1)
    temperature: float = Field(0.0, ge=0.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    stop: tuple[str, ...] = ()
    seed: int | None = None


@dataclass(frozen=True)
class Completion:
    text: str
    token_ids: tuple[int, ...]
    finish_reason: Literal["stop", "length"]


def left_pad(rows: Sequence[Sequence[int]], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask) with every row's last token in the same column, as decoding needs."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, r in enumerate(rows):
        ids[i, width - len(r) :] = torch.tensor(r)
        mask[i, width - len(r) :] = 1
    return ids, mask


def cut_at_stop(text: str, stop: Sequence[str]) -> tuple[str, bool]:
    hits = [i for i in (text.find(s) for s in stop) if i >= 0]
    return (text[: min(hits)], True) if hits else (text, False)


def generate(
    model: Any,
    tokenizer: Any,
    prompts: Sequence[str],
    template: PromptTemplate,
    params: SamplingParams | None = None,
    *,
    batch_size: int = 16,
    precision: Precision | None = None,
) -> list[Completion]:
    """Complete rendered prompts, in input order. Prompts are batched by length to waste little padding."""
    params = params or SamplingParams()
    device = str(next(model.parameters()).device)
    precision = precision or Precision.of(model)
    if params.seed is not None:
        torch.manual_seed(params.seed)
    encoded = [encode_prompt(p, template, tokenizer) for p in prompts]
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i]))
    eos = tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    results: list[Completion | None] = [None] * len(encoded)
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        ids, mask = left_pad([encoded[i] for i in idx], pad)
        width = ids.shape[1]
        sampling = params.temperature > 0
        with inference_mode(model, precision, device):
            out = model.generate(
                input_ids=ids.to(device),
                attention_mask=mask.to(device),
                max_new_tokens=params.max_new_tokens,
                do_sample=sampling,
                temperature=params.temperature if sampling else None,
                top_p=params.top_p if sampling else None,
                top_k=None,
                pad_token_id=pad,
                eos_token_id=eos,
            )
        for row, i in enumerate(idx):
            new = out[row, width:].tolist()
            ended = eos in new
            if ended:
                new = new[: new.index(eos)]
            text, stopped = cut_at_stop(tokenizer.decode(new, skip_special_tokens=True), params.stop)
            results[i] = Completion(text, tuple(new), "stop" if ended or stopped else "length")
    return [r for r in results if r is not None]
