"""`specialize data fetch NAME`: download a public dataset from the Hugging Face hub into this project's JSONL
records, so presets can read it like the files in ../shared/data.

The same code reads a copy saved with `datasets.save_to_disk` (`--from DIR`): that is how it is tested here,
and how to use it on a machine without network.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from specialize.data.readers import read_records
from specialize.data.writers import write_jsonl
from specialize.records import LoadResult


@dataclass(frozen=True)
class HubDataset:
    hub_id: str
    mapping: dict[str, Any] = field(default_factory=dict)  # FieldMap: record field -> dataset column
    split: str = "train"
    license: str = ""


HUB: dict[str, HubDataset] = {
    "alpaca-gpt4": HubDataset("vicgalle/alpaca-gpt4", {"id": None}, license="CC BY-NC 4.0"),
    "alpaca": HubDataset("tatsu-lab/alpaca", {"id": None}, license="CC BY-NC 4.0"),
    "dolly": HubDataset(
        "databricks/databricks-dolly-15k",
        {"id": None, "input": "context", "output": "response", "task": "category"},
        license="CC BY-SA 3.0",
    ),
    "superni": HubDataset(
        "Muennighoff/natural-instructions",
        {"id": "id", "instruction": "definition", "input": "inputs", "output": "targets", "task": "task_name"},
        license="Apache-2.0",
    ),
}


def fetch(
    name: str, out_dir: str | Path, *, local: str | Path | None = None, limit: int | None = None
) -> tuple[Path, LoadResult]:
    """Write `<out_dir>/<name>.jsonl` (atomically) from the hub, or from a `save_to_disk` copy. Rows that cannot
    become records (e.g. an empty response) are skipped and returned in `LoadResult.skipped`, never dropped
    silently."""
    if name not in HUB:
        raise KeyError(f"unknown dataset {name!r}; known: {', '.join(sorted(HUB))}")
    spec = HUB[name]
    src, fmt = (str(local), "hf-disk") if local else (spec.hub_id, "hf-hub")
    result = read_records(src, fmt, mapping=spec.mapping, source=name, split=spec.split, limit=limit,
                          skip_invalid=True)  # fmt: skip
    out = Path(out_dir) / f"{name}.jsonl"
    write_jsonl(result.records, out)
    return out, result
