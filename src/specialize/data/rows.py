"""Rows: bytes on disk -> located rows -> `Example` records.

Each container (JSONL, JSON, CSV/TSV, Parquet, HF datasets) yields raw rows with their location (line, or row
for Parquet / HF datasets), and one builder turns a row into an `Example` through a `FieldMap`. Errors name
file, line and field; with `skip_invalid=True` bad rows (malformed lines included) are counted and reported in
`LoadResult.skipped`, never dropped silently. The dataset readers (`readers.py`, `benchmarks.py`) are shapes
over these.
"""

from __future__ import annotations

import csv
import gzip
import io
import json
import zlib
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from specialize.hashing import content_id
from specialize.records import DataError, Example, LoadResult, Skipped, Turn

Row = dict[str, Any]
Located = tuple[int | None, Row]  # (line or row number, raw row)
OnError = Callable[[DataError], None]


def _raise(error: DataError) -> None:
    raise error


class FieldMap(BaseModel):
    """Which source column feeds which record field. `None` means the source has no such column.

    Columns not named here go into `metadata` (unless `keep_extra=False`).
    """

    model_config = ConfigDict(extra="forbid")

    # None: the source has no instruction column; the task or source then supplies one for every row
    instruction: str | None = "instruction"
    input: str | None = "input"
    output: str = "output"
    id: str | None = "id"
    references: str | None = "references"
    options: str | None = "options"
    history: str | None = "history"
    task: str | None = "task"
    source: str | None = "source"
    metadata: str | None = "metadata"
    keep_extra: bool = True
    delimiter: str | None = Field(None, min_length=1, max_length=1, description="CSV cell separator "
                                  "(default: tab for .tsv, comma otherwise)")  # fmt: skip

    def columns(self) -> set[str]:
        names = self.model_dump(exclude={"keep_extra", "delimiter"}).values()
        return {n for n in names if n}


DOLLY_MAP = FieldMap(input="context", output="response", task="category")


# ---------------------------------------------------------------------------------------------
# Containers: bytes on disk -> located rows


def read_bytes(path: Path) -> bytes:
    """A file's bytes, gunzipped when it ends in .gz; a damaged archive is a DataError naming the file."""
    raw = path.read_bytes()
    if path.suffix == ".gz":
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError, zlib.error) as e:  # BadGzipFile is an OSError; a cut archive an EOFError
            raise DataError(path, None, None, f"not a readable gzip file ({type(e).__name__}: {e})") from None
    return raw


def _read_text(path: Path, encoding: str = "utf-8") -> str:
    """A text file's contents; a UTF-8 byte-order mark (Excel, PowerShell) is dropped, not read as text."""
    raw = read_bytes(path)
    try:
        return raw.decode("utf-8-sig" if encoding == "utf-8" else encoding)
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise DataError(path, line, None, f"not valid UTF-8 ({e.reason})") from None


def _parse_json(path: Path, text: str) -> tuple[Any, list[int] | None]:
    """Parse a JSON document; for a top-level array also return each item's line number."""
    start = len(text) - len(text.lstrip())
    if not text[start:].startswith("["):
        try:
            return json.loads(text), None
        except json.JSONDecodeError as e:
            raise DataError(path, e.lineno, None, f"malformed JSON: {e.msg}") from None
    decoder = json.JSONDecoder()
    items: list[Any] = []
    lines: list[int] = []
    pos, line = start + 1, 1 + text.count("\n", 0, start + 1)

    def skip_ws(p: int) -> int:
        while p < len(text) and text[p] in " \t\r\n":
            p += 1
        return p

    def advance(to: int) -> None:
        nonlocal pos, line
        line += text.count("\n", pos, to)
        pos = to

    advance(skip_ws(pos))
    if pos < len(text) and text[pos] == "]":
        return items, lines
    while True:
        try:
            item, end = decoder.raw_decode(text, pos)
        except json.JSONDecodeError as e:
            raise DataError(path, e.lineno, None, f"malformed JSON: {e.msg}") from None
        items.append(item)
        lines.append(line)
        advance(skip_ws(end))
        if pos < len(text) and text[pos] == ",":
            advance(skip_ws(pos + 1))
            continue
        if pos < len(text) and text[pos] == "]":
            return items, lines
        raise DataError(path, line, None, "malformed JSON: expected ',' or ']' between array items")


def iter_jsonl(path: Path, on_error: OnError = _raise) -> Iterator[Located]:
    """(line number, object) for each non-blank line of a JSONL file (gzipped or not). A bad line goes to
    `on_error` (default: raise), which may record it and let the reading go on."""
    for lineno, raw in enumerate(io.StringIO(_read_text(path)), start=1):
        if not raw.strip():
            continue
        try:
            row = json.loads(raw)
        except json.JSONDecodeError as e:
            on_error(DataError(path, lineno, None, f"malformed JSON: {e.msg} (column {e.colno})"))
            continue
        if not isinstance(row, dict):
            on_error(DataError(path, lineno, None, f"expected a JSON object, got {type(row).__name__}"))
            continue
        yield lineno, row


def _rows_json_array(path: Path, data: Any, lines: list[int] | None) -> Iterator[Located]:
    if isinstance(data, dict):
        # {"data": [...]} / {"train": [...]}: accept a single list-valued key
        lists = [k for k, v in data.items() if isinstance(v, list)]
        if len(lists) != 1:
            raise DataError(path, None, None, "expected a JSON array of objects (or an object with one list)")
        data, lines = data[lists[0]], None
    if not isinstance(data, list):
        raise DataError(path, None, None, f"expected a JSON array, got {type(data).__name__}")
    for i, row in enumerate(data):
        line = lines[i] if lines else None
        if not isinstance(row, dict):
            raise DataError(path, line, f"[{i}]", f"expected a JSON object, got {type(row).__name__}")
        yield line, row


def default_delimiter(path: Path) -> str:
    return "\t" if path.name.lower().removesuffix(".gz").endswith(".tsv") else ","


def _rows_csv(
    path: Path, encoding: str = "utf-8", delimiter: str | None = None, on_error: OnError = _raise
) -> Iterator[Located]:
    delimiter = delimiter or default_delimiter(path)
    reader = csv.DictReader(io.StringIO(_read_text(path, encoding), newline=""), delimiter=delimiter)
    if not reader.fieldnames:
        raise DataError(path, 1, None, "CSV has no header row")
    for row in reader:
        if None in row:  # more cells than header columns
            on_error(DataError(path, reader.line_num, None, "row has more cells than the header"))
            continue
        yield reader.line_num, row


def _rows_parquet(path: Path) -> Iterator[Located]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except (pa.ArrowException, OSError) as e:
        raise DataError(path, None, None, f"not a readable Parquet file ({e})") from None
    yield from enumerate(table.to_pylist(), start=1)


def _rows_hf(dataset: Any) -> Iterator[Located]:
    for i, row in enumerate(dataset, start=1):
        yield i, dict(row)


# ---------------------------------------------------------------------------------------------
# Row -> Example


def _text(value: Any, path: Path, line: int | None, name: str, *, required: bool) -> str:
    if value is None:
        if required:
            raise DataError(path, line, name, "missing")
        return ""
    if isinstance(value, str):
        return value
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise DataError(path, line, name, f"expected text, got {type(value).__name__}")
    return str(value)  # numeric labels (0/1, star ratings) are legitimate text targets


def _text_list(value: Any, path: Path, line: int | None, name: str) -> list[str]:
    if isinstance(value, str) and value.lstrip().startswith("["):  # CSV cells holding JSON lists
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            raise DataError(path, line, name, "expected a JSON list of strings") from None
    if not isinstance(value, list | tuple):
        raise DataError(path, line, name, f"expected a list of strings, got {type(value).__name__}")
    return [_text(v, path, line, f"{name}[{i}]", required=True) for i, v in enumerate(value)]


def _history(value: Any, path: Path, line: int | None, name: str) -> tuple[Turn, ...]:
    if not value:
        return ()
    if not isinstance(value, list):
        raise DataError(path, line, name, "expected a list of [user, assistant] pairs")
    turns = []
    for i, pair in enumerate(value):
        if isinstance(pair, dict) and {"user", "assistant"} <= pair.keys():
            pair = [pair["user"], pair["assistant"]]
        if not (isinstance(pair, list | tuple) and len(pair) == 2):
            raise DataError(path, line, f"{name}[{i}]", "expected a [user, assistant] pair")
        turns.append(
            Turn(
                user=_text(pair[0], path, line, f"{name}[{i}][0]", required=True),
                assistant=_text(pair[1], path, line, f"{name}[{i}][1]", required=True),
            )
        )
    return tuple(turns)


def _present(row: Row, column: str | None) -> bool:
    """An optional column counts as absent when missing, null, or an empty CSV cell."""
    return bool(column) and row.get(column) not in (None, "")


@dataclass
class _Builder:
    """Turns located rows into Examples; owns id de-duplication and skip accounting."""

    path: Path
    fmap: FieldMap
    source: str
    task: str
    skip_invalid: bool
    instruction: str | None = None  # one instruction for every row (the mapping then needs no column for it)
    limit: int | None = None
    result: LoadResult = field(default_factory=LoadResult)
    seen_ids: dict[str, int] = field(default_factory=dict)

    @property
    def full(self) -> bool:
        return self.limit is not None and len(self.result.records) >= self.limit

    def add_rows(self, rows: Iterable[Located]) -> None:
        for line, row in rows:
            if self.full:
                return
            self.add(line, row)

    def extend(self, other: LoadResult) -> None:
        self.result.records += other.records
        self.result.skipped += other.skipped

    def add(self, line: int | None, row: Row, *, extra_meta: dict[str, Any] | None = None, where: str = "") -> None:
        """Build and keep one record; `where` prefixes the field path of errors (e.g. "Instances[3].")."""
        try:
            ex = self._build(line, row, extra_meta or {})
        except DataError as e:
            self.reject(DataError(e.path, e.line, f"{where}{e.field or ''}" or None, e.message))
            return
        self.result.records.append(ex)

    def reject(self, error: DataError) -> None:
        if not self.skip_invalid:
            raise error
        self.result.skipped.append(Skipped(error.path, error.line, error.field, error.message))

    def _build(self, line: int | None, row: Row, extra_meta: dict[str, Any]) -> Example:
        m, p = self.fmap, self.path
        if self.instruction is None and m.instruction is None:
            raise DataError(p, line, "instruction", "no column is mapped to it and no instruction is given for "
                            "every row (set the task's `instruction:`)")  # fmt: skip
        needed = [m.output] if self.instruction is not None else [m.instruction, m.output]
        for col in needed:
            if col not in row:
                raise DataError(p, line, col, f"missing (row has: {', '.join(sorted(row)) or 'nothing'})")
        if self.instruction is not None:
            instruction = self.instruction
        else:
            instruction = _text(row[m.instruction], p, line, m.instruction, required=True)
        if not instruction.strip():
            raise DataError(p, line, m.instruction, "empty instruction")
        raw_out = row[m.output]
        if isinstance(raw_out, list | tuple):
            refs = _text_list(raw_out, p, line, m.output)
            if not refs:
                raise DataError(p, line, m.output, "empty list of outputs")
            output = refs[0]
        else:
            output = _text(raw_out, p, line, m.output, required=True)
            refs = [output]
        if _present(row, m.references):
            extra = _text_list(row[m.references], p, line, m.references)
            refs = [output] + [r for r in extra if r != output]
        input_ = _text(row.get(m.input), p, line, m.input, required=False) if m.input else ""
        options = None
        if _present(row, m.options):
            options = tuple(_text_list(row[m.options], p, line, m.options))
        history = _history(row[m.history], p, line, m.history) if _present(row, m.history) else ()
        task = _text(row.get(m.task), p, line, m.task, required=False) if m.task else ""
        source = _text(row.get(m.source), p, line, m.source, required=False) if m.source else ""
        metadata: dict[str, Any] = {}
        if _present(row, m.metadata):
            meta = row[m.metadata]
            if isinstance(meta, str):  # Parquet/CSV store metadata as JSON text
                try:
                    meta = json.loads(meta)
                except json.JSONDecodeError:
                    raise DataError(p, line, m.metadata, "expected a JSON object") from None
            if not isinstance(meta, dict):
                raise DataError(p, line, m.metadata, "expected an object")
            metadata.update(meta)
        if m.keep_extra:
            used = m.columns()
            metadata.update({k: v for k, v in row.items() if k not in used})
        metadata.update(extra_meta)
        source = source or self.source
        rid = _text(row.get(m.id), p, line, m.id, required=False) if m.id else ""
        if rid:
            if rid in self.seen_ids:
                raise DataError(p, line, m.id, f"duplicate id {rid!r}")
        else:
            rid = content_id(source, instruction, input_, output)
            n = self.seen_ids.get(rid, 0)
            if n:  # exact duplicate content: keep it, with a deterministic suffix
                self.seen_ids[rid] = n + 1
                rid = f"{rid}-{n}"
        self.seen_ids[rid] = self.seen_ids.get(rid, 0) + 1
        try:
            return Example(
                id=rid,
                instruction=instruction,
                input=input_,
                output=output,
                references=tuple(refs),
                options=options,
                history=history,
                task=task or self.task,
                source=source,
                metadata=metadata,
            )
        except ValidationError as e:
            err = e.errors()[0]
            loc = ".".join(str(x) for x in err["loc"]) or None
            raise DataError(p, line, loc, err["msg"]) from None
