"""The instruction format: one record type, readers for every source, atomic writers."""

from specialize.data.readers import (
    FORMATS,
    FieldMap,
    SuperNITask,
    detect_format,
    read_records,
    read_superni_task,
    source_exists,
)
from specialize.data.records import DataError, Example, LoadResult, Skipped, Turn
from specialize.data.writers import write_jsonl, write_parquet, write_records

__all__ = [
    "FORMATS",
    "DataError",
    "Example",
    "FieldMap",
    "LoadResult",
    "Skipped",
    "SuperNITask",
    "Turn",
    "detect_format",
    "read_records",
    "read_superni_task",
    "source_exists",
    "write_jsonl",
    "write_parquet",
    "write_records",
]
