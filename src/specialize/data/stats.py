"""What `specialize data inspect` reports about a dataset: counts, fields, token-length percentiles."""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from typing import Any

import numpy as np

from specialize.data.records import Example
from specialize.prompts import PromptTemplate, encode_prompt, encode_response, render_prompt

PERCENTILES = (50, 90, 99, 100)


def _percentiles(values: Sequence[int]) -> dict[str, int]:
    if not values:
        return {f"p{p}": 0 for p in PERCENTILES}
    arr = np.asarray(values)
    return {("max" if p == 100 else f"p{p}"): int(np.percentile(arr, p, method="higher")) for p in PERCENTILES}


def dataset_stats(records: Sequence[Example], tokenizer: Any, template: PromptTemplate) -> dict[str, Any]:
    prompt_lens, response_lens = [], []
    for ex in records:
        prompt_lens.append(len(encode_prompt(render_prompt(ex, template), template, tokenizer)))
        response_lens.append(len(encode_response(ex.output, tokenizer)) + 1)  # + EOS
    meta_keys: Counter[str] = Counter(k for ex in records for k in ex.metadata)
    return {
        "records": len(records),
        "with_input": sum(bool(ex.input) for ex in records),
        "with_options": sum(ex.options is not None for ex in records),
        "with_history": sum(bool(ex.history) for ex in records),
        "multi_reference": sum(len(ex.references) > 1 for ex in records),
        "tasks": len({ex.task for ex in records if ex.task}),
        "sources": dict(Counter(ex.source for ex in records).most_common()),
        "metadata_fields": dict(meta_keys.most_common()),
        "tokens": {
            "prompt": _percentiles(prompt_lens),
            "response": _percentiles(response_lens),
            "total": _percentiles([a + b for a, b in zip(prompt_lens, response_lens, strict=True)]),
        },
    }
