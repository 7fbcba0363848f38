"""Readers: every supported file format and dataset family -> `Example` records.

Each reader yields raw rows with their location (line, or row for Parquet / HF datasets), and one
builder turns a row into an `Example` through a `FieldMap`. Errors name file, line and field; with
`skip_invalid=True` bad rows are counted and reported in `LoadResult.skipped`, never dropped silently.
"""

from __future__ import annotations

import csv
import gzip
import io
import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, ValidationError

from specialize.data.records import DataError, Example, LoadResult, Skipped, Turn, content_id

Row = dict[str, Any]
Located = tuple[int | None, Row]  # (line or row number, raw row)

FORMATS = (
    "jsonl", "json", "csv", "parquet",  # generic, with a field mapping
    "alpaca", "lima", "dolly", "self-instruct", "box", "superni",  # dataset families
    "hf-disk", "hf-hub",  # Hugging Face `datasets`
    # evaluation benchmarks (data/benchmarks.py)
    "pubmedqa", "pubmedqa-long", "iob-ner", "snli", "commonsenseqa", "aqua", "nq-open", "webquestions", "fpb",
)  # fmt: skip


class FieldMap(BaseModel):
    """Which source column feeds which record field. `None` means the source has no such column.

    Columns not named here go into `metadata` (unless `keep_extra=False`).
    """

    model_config = ConfigDict(extra="forbid")

    instruction: str = "instruction"
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

    def columns(self) -> set[str]:
        names = self.model_dump(exclude={"keep_extra"}).values()
        return {n for n in names if n}


DOLLY_MAP = FieldMap(input="context", output="response", task="category")


# ---------------------------------------------------------------------------------------------
# Containers: bytes on disk -> located rows


def _read_text(path: Path, encoding: str = "utf-8") -> str:
    raw = path.read_bytes()
    if path.suffix == ".gz":
        raw = gzip.decompress(raw)
    try:
        return raw.decode(encoding)
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


def iter_jsonl(path: Path) -> Iterator[Located]:
    """(line number, object) for each non-blank line of a JSONL file (gzipped or not)."""
    for lineno, raw in enumerate(io.StringIO(_read_text(path)), start=1):
        if not raw.strip():
            continue
        try:
            row = json.loads(raw)
        except json.JSONDecodeError as e:
            raise DataError(path, lineno, None, f"malformed JSON: {e.msg} (column {e.colno})") from None
        if not isinstance(row, dict):
            raise DataError(path, lineno, None, f"expected a JSON object, got {type(row).__name__}")
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


def _rows_csv(path: Path, encoding: str = "utf-8") -> Iterator[Located]:
    reader = csv.DictReader(io.StringIO(_read_text(path, encoding), newline=""))
    if not reader.fieldnames:
        raise DataError(path, 1, None, "CSV has no header row")
    for row in reader:
        if None in row:  # more cells than header columns
            raise DataError(path, reader.line_num, None, "row has more cells than the header")
        yield reader.line_num, row


def _rows_parquet(path: Path) -> Iterator[Located]:
    import pyarrow.parquet as pq

    table = pq.read_table(path)
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
    result: LoadResult = field(default_factory=LoadResult)
    seen_ids: dict[str, int] = field(default_factory=dict)

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
        for col in (m.instruction, m.output):
            if col not in row:
                raise DataError(p, line, col, f"missing (row has: {', '.join(sorted(row)) or 'nothing'})")
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


# ---------------------------------------------------------------------------------------------
# Dataset families with their own shapes


@dataclass
class SuperNITask:
    """One Super-NaturalInstructions task file: its instances plus what evaluation needs."""

    name: str
    definition: str
    instances: LoadResult
    positive_examples: list[Example]
    negative_examples: list[Example]
    categories: list[str]
    domains: list[str]
    metadata: dict[str, Any]


def _superni_name(path: Path) -> str:
    name = path.name
    for suffix in (".gz", ".json"):
        name = name.removesuffix(suffix)
    return name


def read_superni_task(path: str | Path, *, skip_invalid: bool = False) -> SuperNITask:
    """Definition -> instruction; Instances -> examples (all reference outputs kept);
    Positive/Negative Examples kept as demonstrations; Categories/Domains into metadata."""
    path = Path(path)
    data, _ = _parse_json(path, _read_text(path))
    return _superni_from_dict(path, data, skip_invalid)


def _superni_from_dict(path: Path, data: Any, skip_invalid: bool) -> SuperNITask:
    for key in ("Definition", "Instances"):
        if not isinstance(data, dict) or key not in data:
            raise DataError(path, None, key, "missing: not a Super-NaturalInstructions task file")
    name = _superni_name(path)
    definition = data["Definition"]
    if isinstance(definition, list):
        if not definition:
            raise DataError(path, None, "Definition", "empty")
        definition = definition[0]  # as the official collator does; every v2 task has exactly one
    definition = _text(definition, path, None, "Definition", required=True)
    meta = {
        "categories": list(data.get("Categories", [])),
        "domains": list(data.get("Domains", [])),
        "reasoning": list(data.get("Reasoning", [])),
        "source_datasets": list(data.get("Source", [])),
        "input_language": list(data.get("Input_language", [])),
        "output_language": list(data.get("Output_language", [])),
        "instance_license": list(data.get("Instance License", [])),
    }
    fmap = FieldMap(instruction="__definition__", task=None, source=None, history=None)
    builder = _Builder(path, fmap, source="superni", task=name, skip_invalid=skip_invalid)
    instances = data["Instances"]
    if not isinstance(instances, list):
        raise DataError(path, None, "Instances", "expected a list")
    for i, inst in enumerate(instances):
        if not isinstance(inst, dict):
            builder.reject(DataError(path, None, f"Instances[{i}]", "expected an object"))
            continue
        builder.add(None, {"__definition__": definition, **inst}, extra_meta=meta, where=f"Instances[{i}].")
    demos: dict[str, list[Example]] = {}
    for key, tag in (("Positive Examples", "pos"), ("Negative Examples", "neg")):
        demos[tag] = []
        for i, ex in enumerate(data.get(key, [])):
            if not isinstance(ex, dict) or "input" not in ex or "output" not in ex:
                raise DataError(path, None, f"{key}[{i}]", "expected an object with input and output")
            demos[tag].append(
                Example(
                    id=f"{name}-{tag}{i}",
                    instruction=definition,
                    input=_text(ex["input"], path, None, f"{key}[{i}].input", required=False),
                    output=_text(ex["output"], path, None, f"{key}[{i}].output", required=True),
                    task=name,
                    source="superni",
                    metadata={"explanation": ex.get("explanation", "")},
                )
            )
    return SuperNITask(
        name=name,
        definition=definition,
        instances=builder.result,
        positive_examples=demos["pos"],
        negative_examples=demos["neg"],
        categories=meta["categories"],
        domains=meta["domains"],
        metadata=meta,
    )


def _self_instruct(path: Path, rows: Iterator[Located], builder: _Builder) -> None:
    """seed_tasks.jsonl: one task per line with 1+ instances -> one Example per instance."""
    for line, row in rows:
        instances = row.get("instances")
        if not isinstance(instances, list) or not instances:
            builder.reject(DataError(path, line, "instances", "missing or empty"))
            continue
        tid = row.get("id") or row.get("name") or ""
        meta = {k: v for k, v in row.items() if k not in {"instruction", "instances", "id"}}
        for j, inst in enumerate(instances):
            if not isinstance(inst, dict):
                builder.reject(DataError(path, line, f"instances[{j}]", "expected an object"))
                continue
            sub = {
                "instruction": row.get("instruction"),
                "input": inst.get("input", ""),
                "output": inst.get("output"),
                "id": f"{tid}" if len(instances) == 1 else f"{tid}-{j}",
                "task": row.get("name", ""),
            }
            builder.add(line, sub, extra_meta=meta)


def _box(path: Path, data: Any, builder: _Builder) -> None:
    """BoX_instructions.json: {task: {"Definition:", "Examples": [...], "Prompt"}} -> one Example per demo."""
    if not isinstance(data, dict):
        raise DataError(path, None, None, "expected an object of tasks")
    for task, spec in data.items():
        if not isinstance(spec, dict):
            raise DataError(path, None, task, "expected an object")
        definition = spec.get("Definition:", spec.get("Definition"))
        examples = spec.get("Examples")
        if not isinstance(examples, list):
            raise DataError(path, None, f"{task}.Examples", "missing or not a list")
        for i, ex in enumerate(examples):
            if not isinstance(ex, dict):
                builder.reject(DataError(path, None, f"{task}.Examples[{i}]", "expected an object"))
                continue
            row = {
                "instruction": definition,
                "input": ex.get("input", ""),
                "output": ex.get("output"),
                "id": f"box-{task}-{i}",
                "task": task,
            }
            meta = {"prompt": spec.get("Prompt", ""), "explanation": ex.get("explanation", "")}
            builder.add(None, row, extra_meta=meta, where=f"{task}.Examples[{i}].")


# ---------------------------------------------------------------------------------------------
# Entry point


def _base_suffix(path: Path) -> str:
    suffixes = [s.lower() for s in path.suffixes]
    if suffixes and suffixes[-1] == ".gz":
        suffixes = suffixes[:-1]
    return suffixes[-1] if suffixes else ""


def _json_family(data: Any) -> str:
    if isinstance(data, dict):
        if "Definition" in data and "Instances" in data:
            return "superni"
        if data and all(isinstance(v, dict) and "Examples" in v for v in data.values()):
            return "box"
        return "json"
    if isinstance(data, list) and data and isinstance(data[0], dict):
        keys = data[0].keys()
        if {"instruction", "context", "response"} <= keys:
            return "dolly"
        if "history" in keys and {"instruction", "output"} <= keys:
            return "lima"
        if {"instruction", "output"} <= keys:
            return "alpaca"
    return "json"


def detect_format(path: str | Path) -> str:
    """Guess the format from the extension and, for JSON, the shape of the content."""
    path = Path(path)
    if path.is_dir():
        if (path / "dataset_info.json").exists() or (path / "dataset_dict.json").exists():
            return "hf-disk"
        raise DataError(path, None, None, "directory is not a saved Hugging Face dataset")
    ext = _base_suffix(path)
    if ext == ".jsonl":
        with gzip.open(path) if path.suffix == ".gz" else path.open("rb") as f:
            first = next((ln for ln in f if ln.strip()), b"").decode("utf-8", errors="replace")
        try:
            row = json.loads(first) if first else {}
        except json.JSONDecodeError:
            return "jsonl"
        return "self-instruct" if isinstance(row, dict) and "instances" in row else "jsonl"
    if ext == ".json":
        data, _ = _parse_json(path, _read_text(path))
        return _json_family(data)
    if ext in (".csv", ".tsv"):
        return "csv"
    if ext in (".parquet", ".pq"):
        return "parquet"
    raise DataError(path, None, None, f"cannot tell the format from extension {ext!r}; pass fmt=")


def source_exists(path: str | Path, fmt: str | None = None) -> bool:
    """Whether `path` can name a source. snli paths name a split (<dir>/dev reads s1.dev, s2.dev, labels.dev), so
    their reader checks its own files."""
    return fmt == "snli" or Path(path).exists()


def read_records(
    path: str | Path,
    fmt: str | None = None,
    *,
    mapping: FieldMap | dict[str, Any] | None = None,
    source: str | None = None,
    task: str | None = None,
    skip_invalid: bool = False,
    limit: int | None = None,
    split: str = "train",
) -> LoadResult:
    """Read any supported source into Examples.

    fmt: one of FORMATS, or None to detect. For `hf-hub`, `path` is the dataset name.
    LIMA's multi-turn `history` is kept as `Example.history`: the prompt renderer shows earlier turns
    before the final instruction and only the final response is trained on.
    """
    if fmt is not None and fmt not in FORMATS:
        raise ValueError(f"unknown format {fmt!r}; expected one of {', '.join(FORMATS)}")
    if fmt == "hf-hub":
        return _read_hf_hub(str(path), mapping, source, task, skip_invalid, limit, split)
    path = Path(path)
    if not source_exists(path, fmt):
        raise DataError(path, None, None, "no such file or directory")
    fmt = fmt or detect_format(path)
    fmap = mapping if isinstance(mapping, FieldMap) else FieldMap(**(mapping or {}))
    if fmt == "dolly" and mapping is None:
        fmap = DOLLY_MAP
    name = source or _superni_name(path).removesuffix(".jsonl").removesuffix(".csv").removesuffix(".parquet")

    if fmt == "superni":
        st = read_superni_task(path, skip_invalid=skip_invalid)
        res = st.instances
        res.records = res.records[:limit] if limit is not None else res.records
        return res

    builder = _Builder(path, fmap, source=name, task=task or "", skip_invalid=skip_invalid)
    from specialize.data.benchmarks import BENCHMARK_FORMATS, read_benchmark

    if fmt in BENCHMARK_FORMATS:
        builder.source = source or fmt
        read_benchmark(path, fmt, builder)
        return _limited(builder.result, limit)
    rows: Iterator[Located]
    if fmt in ("jsonl", "self-instruct"):
        rows = iter_jsonl(path)
        if fmt == "self-instruct":
            _self_instruct(path, rows, builder)
            return _limited(builder.result, limit)
    elif fmt in ("json", "alpaca", "lima", "dolly", "box"):
        data, lines = _parse_json(path, _read_text(path))
        if fmt == "box":
            _box(path, data, builder)
            return _limited(builder.result, limit)
        rows = _rows_json_array(path, data, lines)
    elif fmt == "csv":
        rows = _rows_csv(path)
    elif fmt == "parquet":
        rows = _rows_parquet(path)
    elif fmt == "hf-disk":
        rows = _rows_hf(_load_hf_disk(path, split))
    else:  # pragma: no cover - FORMATS is checked above
        raise AssertionError(fmt)
    for line, row in rows:
        builder.add(line, row)
        if limit is not None and len(builder.result.records) >= limit:
            break
    return builder.result


def _limited(result: LoadResult, limit: int | None) -> LoadResult:
    if limit is not None:
        result.records = result.records[:limit]
    return result


def _load_hf_disk(path: Path, split: str) -> Any:
    import datasets

    ds = datasets.load_from_disk(str(path))
    if isinstance(ds, datasets.DatasetDict):
        if split not in ds:
            raise DataError(path, None, "split", f"no split {split!r}; have {', '.join(ds)}")
        ds = ds[split]
    return ds


def _read_hf_hub(
    name: str,
    mapping: FieldMap | dict[str, Any] | None,
    source: str | None,
    task: str | None,
    skip_invalid: bool,
    limit: int | None,
    split: str,
) -> LoadResult:
    """A dataset from the Hugging Face hub (needs network; offline, a clear error)."""
    import datasets

    try:
        ds = datasets.load_dataset(name, split=split)
    except (ConnectionError, OSError) as e:
        raise DataError(
            name, None, None,
            f"could not load from the Hugging Face hub ({e.__class__.__name__}: {e}); "
            "offline, save the dataset with `datasets` and pass its directory (fmt='hf-disk')",
        ) from None  # fmt: skip
    fmap = mapping if isinstance(mapping, FieldMap) else FieldMap(**(mapping or {}))
    builder = _Builder(Path(name), fmap, source=source or name, task=task or "", skip_invalid=skip_invalid)
    for line, row in _rows_hf(ds):
        builder.add(line, row)
        if limit is not None and len(builder.result.records) >= limit:
            break
    return builder.result
