"""Rank answer options by log-likelihood, computing each prompt once (prefix reuse through the KV cache).

Prompt and option are tokenized separately (the training rule), so a token that would merge across the
join in a joint tokenization cannot make the option's tokens misalign with the prompt's: the cause of a
known lm-evaluation-harness failure. Per batch of examples (grouped by prompt length):

  1. one forward over the left-padded prompts, keeping the KV cache and the last position's distribution
     (a prefix the whole batch shares, such as a task definition, is computed once and broadcast);
  2. one forward over every option of every example, each row reading its own example's cached prefix.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from specialize.generation.loop import left_pad
from specialize.models import Precision, cache_of, inference_mode, kv
from specialize.prompts import encode_response

# Rows (example x option) per forward pass: bounds memory when a task has hundreds of options, since the pass
# holds rows x option length x vocabulary logits.
ROWS_PER_PASS = 64
# A batch-wide common prefix shorter than this is not worth the extra forward pass.
MIN_SHARED_PREFIX = 16


@dataclass(frozen=True)
class OptionScore:
    option: str
    logprob: float  # sum over the option's tokens
    tokens: int

    @property
    def per_char(self) -> float:
        """Log-likelihood per byte of the option (lm-evaluation-harness's acc_norm normalization)."""
        return self.logprob / max(1, len(self.option.encode("utf-8")))


def score_options(
    model: Any,
    tokenizer: Any,
    prompts: Sequence[list[int]],
    options: Sequence[Sequence[str]],
    *,
    batch_size: int = 8,
    precision: Precision | None = None,
) -> list[list[OptionScore]]:
    """Scores of every option of every prompt (prompts already encoded with `encode_prompt`)."""
    if len(prompts) != len(options):
        raise ValueError("one list of options per prompt")
    device = next(model.parameters()).device
    precision = precision or Precision.of(model)
    option_ids = [[encode_response(o, tokenizer) for o in opts] for opts in options]
    for opts, ids in zip(options, option_ids, strict=True):
        for o, t in zip(opts, ids, strict=True):
            if not t:
                raise ValueError(f"option {o!r} encodes to no tokens")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    out: list[list[OptionScore] | None] = [None] * len(prompts)
    with inference_mode(model, precision, str(device)):
        for start in range(0, len(order), batch_size):
            idx = order[start : start + batch_size]
            results = _score_batch(model, [prompts[i] for i in idx], [option_ids[i] for i in idx], pad, device)
            for i, logps in zip(idx, results, strict=True):
                out[i] = [OptionScore(o, lp, len(t)) for o, lp, t in zip(options[i], logps, option_ids[i], strict=True)]
    return [o for o in out if o is not None]


def shared_prefix_length(prompts: Sequence[Sequence[int]]) -> int:
    """Tokens every prompt starts with (a task's definition and template head), leaving each prompt at least
    one token of its own, whose logits start the options."""
    n = min(len(p) for p in prompts) - 1
    first = prompts[0]
    for p in prompts[1:]:
        i = 0
        while i < n and p[i] == first[i]:
            i += 1
        n = i
    return max(n, 0)


def _prefill(model, prompts, pad, device):
    """Last-position logits, KV cache and attention mask of a batch of prompts. A prefix shared by the whole
    batch (SuperNI prompts of one task share the definition) is computed once and broadcast; the rest is
    left-padded after it, so the mask may have a gap: positions count real tokens only."""
    shared = shared_prefix_length(prompts) if len(prompts) > 1 else 0
    cache = None
    if shared >= MIN_SHARED_PREFIX:
        head = torch.tensor([list(prompts[0][:shared])], device=device)
        cache = cache_of(model(input_ids=head, use_cache=True))
        cache.batch_repeat_interleave(len(prompts))
    else:
        shared = 0
    ids, tail_mask = left_pad([p[shared:] for p in prompts], pad)
    mask = torch.cat([torch.ones(len(prompts), shared, dtype=tail_mask.dtype), tail_mask], dim=1)
    positions = (mask.cumsum(-1) - 1)[:, shared:].clamp(min=0)
    out = model(input_ids=ids.to(device), attention_mask=mask.to(device), position_ids=positions.to(device),
                use_cache=True, **kv(cache))  # fmt: skip
    return out.logits[:, -1], cache_of(out), mask


def _score_batch(model, prompts, option_ids, pad, device) -> list[list[float]]:
    last_logits, prefix_cache, mask = _prefill(model, prompts, pad, device)
    first_logp = F.log_softmax(last_logits.float(), dim=-1)  # predicts each option's first token

    rows = [(b, t) for b, opts in enumerate(option_ids) for t in opts]
    scores: list[list[float]] = [[] for _ in option_ids]
    for lo in range(0, len(rows), ROWS_PER_PASS):
        chunk = rows[lo : lo + ROWS_PER_PASS]
        # reorder_cache works in place: every chunk but a lone one needs its own copy of the prefix cache
        cache = prefix_cache if len(rows) <= ROWS_PER_PASS else copy.deepcopy(prefix_cache)
        for (b, _), lp in zip(chunk, _score_rows(model, cache, mask, first_logp, chunk, pad, device), strict=True):
            scores[b].append(lp)
    return scores


def _score_rows(model, cache, mask, first_logp, rows, pad, device) -> list[float]:
    """Log-likelihood of each (example, option tokens) row, continuing its example's cached prompt."""
    owner = torch.tensor([b for b, _ in rows])
    length = max(len(t) for _, t in rows)
    opt = torch.full((len(rows), length), pad, dtype=torch.long)
    opt_mask = torch.zeros_like(opt)
    for r, (_, t) in enumerate(rows):
        opt[r, : len(t)] = torch.tensor(t)
        opt_mask[r, : len(t)] = 1
    cache.reorder_cache(owner.to(device))  # row r reads the prefix of its own example
    prompt_len = mask.sum(-1)[owner]
    opt_positions = prompt_len[:, None] + torch.arange(length)[None, :]
    second = model(
        input_ids=opt.to(device),
        attention_mask=torch.cat([mask[owner], opt_mask], dim=1).to(device),
        position_ids=opt_positions.to(device),
        use_cache=True,
        **kv(cache),
    )
    later_logp = F.log_softmax(second.logits[:, :-1].float(), dim=-1)  # position j predicts token j + 1
    scores = []
    for r, (b, t) in enumerate(rows):
        lp = first_logp[b, t[0]].item()
        if len(t) > 1:
            lp += later_logp[r, torch.arange(len(t) - 1), torch.tensor(t[1:])].sum().item()
        scores.append(lp)
    return scores
