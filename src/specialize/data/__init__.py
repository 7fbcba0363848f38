"""The instruction format: one record type, readers for every source, atomic writers."""

from specialize.data.readers import (
    FORMATS,
    FieldMap,
    SuperNITask,
    detect_format,
    read_records,
    read_superni_task,
    source_exists,
    superni_task_files,
)
from specialize.data.writers import write_jsonl, write_parquet, write_records
from specialize.records import DataError, Example, LoadResult, Skipped, Turn

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
    "superni_task_files",
    "write_jsonl",
    "write_parquet",
    "write_records",
]
