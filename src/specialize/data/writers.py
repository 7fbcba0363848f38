"""Writers: Examples -> JSONL / Parquet, atomically. Both round-trip through `read_records`."""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

from specialize.io import atomic_path
from specialize.records import Example


def write_jsonl(records: Iterable[Example], path: str | Path) -> int:
    n = 0
    with atomic_path(path) as tmp, tmp.open("w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r.model_dump(mode="json"), ensure_ascii=False) + "\n")
            n += 1
    return n


def write_parquet(records: Iterable[Example], path: str | Path) -> int:
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = []
    for r in records:
        row = r.model_dump(mode="json")
        # free-form metadata has no fixed Arrow schema: store it as JSON text
        row["metadata"] = json.dumps(row["metadata"], ensure_ascii=False)
        rows.append(row)
    schema = pa.schema(
        [
            ("id", pa.string()),
            ("instruction", pa.string()),
            ("input", pa.string()),
            ("output", pa.string()),
            ("references", pa.list_(pa.string())),
            ("options", pa.list_(pa.string())),
            ("history", pa.list_(pa.struct([("user", pa.string()), ("assistant", pa.string())]))),
            ("task", pa.string()),
            ("source", pa.string()),
            ("metadata", pa.string()),
        ]
    )
    table = pa.Table.from_pylist(rows, schema=schema)
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp)
    return len(rows)


def write_records(records: Iterable[Example], path: str | Path) -> int:
    """Write by extension: .jsonl or .parquet."""
    suffix = Path(path).suffix.lower()
    if suffix == ".jsonl":
        return write_jsonl(records, path)
    if suffix == ".parquet":
        return write_parquet(records, path)
    raise ValueError(f"{path}: cannot write {suffix!r}; use .jsonl or .parquet")
