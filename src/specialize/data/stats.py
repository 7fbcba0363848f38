"""What `specialize data inspect` reports about a dataset: counts, fields, token-length percentiles."""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from typing import Any

import numpy as np

from specialize.prompts import PromptTemplate, encode_prompt, encode_response, render_prompt
from specialize.records import Example, LoadResult

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


def print_stats(
    path: str, stats: dict[str, Any], result: LoadResult, template: PromptTemplate, title: str, show: int
) -> None:
    """`specialize data inspect`'s console view: counts, token percentiles, a few rendered prompts, skips."""
    from rich.console import Console
    from rich.panel import Panel
    from rich.table import Table

    console = Console()
    console.print(f"[bold]{path}[/bold]: {stats['records']} records, {stats['tasks']} tasks")
    for key in ("with_input", "with_options", "with_history", "multi_reference"):
        console.print(f"  {key.replace('_', ' ')}: {stats[key]}")
    console.print(f"  sources: {stats['sources']}")
    if stats["metadata_fields"]:
        console.print(f"  metadata fields: {stats['metadata_fields']}")
    table = Table(title=f"tokens ({title})")
    table.add_column("part")
    cols = list(stats["tokens"]["prompt"])
    for c in cols:
        table.add_column(c, justify="right")
    for part, pct in stats["tokens"].items():
        table.add_row(part, *(str(pct[c]) for c in cols))
    console.print(table)
    for ex in result.records[:show]:
        console.print(Panel(render_prompt(ex, template) + ex.output, title=ex.id, expand=False), markup=False)
    if result.skipped:
        console.print(f"[yellow]{result.skip_summary()}[/yellow]")
