"""A declared data source: a file (or hub dataset) and how to narrow it. Evaluation tasks, their demonstration
pools and self-specialization seeds all read through it, so one YAML shape selects records everywhere.

Narrowing happens in a fixed order: read (a skipped record is an error: evaluation data and seeds are never
silently thinned), keep listed ids, take one part of a seeded split, then the first N in file order.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from specialize.data.readers import FieldMap, read_records
from specialize.data.splits import SeededSplit
from specialize.records import DataError, Example


class KeepIds(BaseModel):
    """Keep only examples whose `field` (the id, or a metadata field) is listed in `file`."""

    model_config = ConfigDict(extra="forbid")
    file: str
    field: str = "id"


class DataSource(BaseModel):
    model_config = ConfigDict(extra="forbid")
    path: str
    format: str | None = None
    mapping: dict[str, Any] | None = None
    instruction: str | None = Field(None, description="one instruction for every example (files without one)")
    split: str = Field("train", description="the dataset's own split (hub datasets)")
    keep_ids: KeepIds | None = None
    seeded_split: SeededSplit | None = Field(None, description="one part of a seeded split (files without one)")
    first: int | None = Field(None, ge=1, description="then keep the first N records in file order")

    def read(self) -> list[Example]:
        mapping = FieldMap(**self.mapping) if self.mapping else None
        # a source-level instruction is given to every row while reading: the mapping needs no instruction column
        result = read_records(self.path, self.format, mapping=mapping, split=self.split, instruction=self.instruction)
        if result.skipped:
            raise DataError(self.path, None, None, result.skip_summary())
        records = result.records
        if self.keep_ids:
            keep = _id_set(Path(self.keep_ids.file))
            f = self.keep_ids.field
            records = [r for r in records if str(r.id if f == "id" else r.metadata.get(f)) in keep]
            if not records:
                raise DataError(self.path, None, f, f"no example has a {f} listed in {self.keep_ids.file}")
        if self.seeded_split:
            records = self.seeded_split.select(records)
        if self.first is not None:
            records = records[: self.first]
        if not records:
            raise DataError(self.path, None, None, "no record is left after the selection")
        return records


def _id_set(path: Path) -> set[str]:
    text = path.read_text()
    if path.suffix == ".json":
        data = json.loads(text)
        return {str(k) for k in (data.keys() if isinstance(data, dict) else data)}
    return {line.strip() for line in text.splitlines() if line.strip()}
