"""Offline generation on the token loop: complete many prompts (or eq. 2 / eq. 3 items) and return when all
are done. Requests are admitted shortest first and, as rows finish, the next ones join the running batch."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from specialize.generation.loop import Output, Request, TokenLoop
from specialize.generation.params import SamplingParams
from specialize.models import Precision
from specialize.prompts import PromptTemplate, encode_prompt


def run_requests(
    model: Any, tokenizer: Any, requests: Sequence[Request], *, batch_size: int = 16,
    precision: Precision | None = None, compile_decode: bool = False,
) -> list[Output]:  # fmt: skip
    """Decode every request to the end on one loop of at most `batch_size` rows; outputs in input order.
    `compile_decode`: a lone row's decode steps run compiled (`compiled.py`)."""
    width = max((len(c) for r in requests for c in r.contexts), default=1)
    rows = max(batch_size, *(r.n_rows for r in requests)) if requests else batch_size
    # offline, no one waits on a running row: admit a whole batch of prompts at once (its prefill forwards are
    # still cut to `loop.FORWARD_TOKENS` tokens each)
    loop = TokenLoop(model, tokenizer, precision, max_rows=rows, prefill_tokens=max(512, rows * width),
                     compile_decode=compile_decode)  # fmt: skip
    loop.submit(*sorted(requests, key=lambda r: max(len(c) for c in r.contexts)))
    loop.run()
    return [r.result for r in requests if r.result is not None]


def generate(
    model: Any,
    tokenizer: Any,
    prompts: Sequence[str],
    template: PromptTemplate,
    params: SamplingParams | None = None,
    *,
    batch_size: int = 16,
    precision: Precision | None = None,
    adapter: str | None = None,
    compile_decode: bool = False,
) -> list[Output]:
    """Complete rendered prompts, in input order (each prompt is a request with these parameters and seed)."""
    requests = prompt_requests(tokenizer, prompts, template, params, adapter=adapter)
    return run_requests(model, tokenizer, requests, batch_size=batch_size, precision=precision,
                        compile_decode=compile_decode)  # fmt: skip


def prompt_requests(
    tokenizer: Any, prompts: Sequence[str], template: PromptTemplate, params: SamplingParams | None = None,
    *, adapter: str | None = None,
) -> list[Request]:  # fmt: skip
    """One request per rendered prompt, for any engine (`engines.TextEngine.run`)."""
    params = params or SamplingParams()
    return [Request([encode_prompt(p, template, tokenizer)], params, adapter=adapter) for p in prompts]


def mixture_requests(
    contexts: Sequence[Sequence[list[int]]],
    weights: Sequence[Sequence[float]],
    params: SamplingParams | Sequence[SamplingParams],
    *,
    contrastive: float | None = None,
) -> list[Request]:
    """One request per item: its contexts mixed with its weights (eq. 2), optionally contrasted with the base
    (eq. 3); `params` may give each item its own."""
    per_item = [params] * len(contexts) if isinstance(params, SamplingParams) else list(params)
    if len(per_item) != len(contexts) or len(weights) != len(contexts):
        raise ValueError("one weight list (and parameter set, when a list is given) per item")
    return [Request([list(c) for c in ctx], p, weights=list(w), contrastive=contrastive)
            for ctx, w, p in zip(contexts, weights, per_item, strict=True)]  # fmt: skip


def generate_mixture(
    model: Any,
    tokenizer: Any,
    contexts: Sequence[Sequence[list[int]]],
    weights: Sequence[Sequence[float]],
    params: SamplingParams | Sequence[SamplingParams],
    *,
    contrastive: float | None = None,
    precision: Precision | None = None,
    batch_size: int = 16,
) -> list[Output]:
    """One continuation per item from the weighted mixture of its contexts' next-token distributions (eq. 2);
    with `contrastive` (alpha), scored against the base model, the same weights with the adapter switched off
    (eq. 3). `params` may give each item its own (its seed, say). `batch_size` counts items, as `generate`
    counts prompts: up to that many decode at once, each with its k rows (2k with `contrastive`)."""
    requests = mixture_requests(contexts, weights, params, contrastive=contrastive)
    rows = batch_size * max((r.n_rows for r in requests), default=1)
    return run_requests(model, tokenizer, requests, batch_size=rows, precision=precision)
