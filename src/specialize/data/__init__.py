"""The instruction format: one record type, readers for every source, atomic writers."""

from specialize.data.readers import (
    FORMATS,
    FieldMap,
    SuperNITask,
    closed_label_set,
    detect_format,
    official_test_tasks,
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
    "closed_label_set",
    "detect_format",
    "official_test_tasks",
    "read_records",
    "read_superni_task",
    "source_exists",
    "superni_task_files",
    "write_jsonl",
    "write_parquet",
    "write_records",
]
