"""Readers: every supported file format and dataset family -> `Example` records, through one registry.

A reader takes a path and the row builder (`rows.py`) and feeds it rows; `READERS` maps each format name to
its reader, so the format list, detection and dispatch cannot drift apart. Errors name file, line and field;
with `skip_invalid=True` bad rows are counted and reported in `LoadResult.skipped`, never dropped silently.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from specialize.data.benchmarks import BENCHMARK_READERS
from specialize.data.rows import (
    FieldMap,
    Located,
    _Builder,
    _parse_json,
    _read_text,
    _rows_csv,
    _rows_hf,
    _rows_json_array,
    _rows_parquet,
    _text,
    iter_jsonl,
    read_bytes,
)
from specialize.records import DataError, Example, LoadResult

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


def superni_task_files(root: str | Path) -> dict[str, Path]:
    """Task name -> file of a directory of SuperNI task files (`taskNNN_*.json` or `.json.gz`), by name. The one
    selector that training mixes and evaluation share: when a task has both files, the uncompressed `.json`
    is the one read (it is the copy a user edits), by both."""
    root = Path(root)
    files: dict[str, Path] = {}
    for f in sorted(root.glob("*.json.gz")) + sorted(root.glob("*.json")):  # .json last: it wins
        files[_superni_name(f)] = f
    return dict(sorted(files.items()))


def closed_label_set(task: SuperNITask, max_labels: int = 10) -> list[str] | None:
    """The task's labels when it is a classification task, by rule: every reference output of every instance
    belongs to one closed set of 2..max_labels strings (Shi et al.'s Classification level is SuperNI's
    classification subset; the rule makes "classification" a property of the data, not a hand-picked list)."""
    labels = {ref for e in task.instances.records for ref in e.references}
    return sorted(labels) if 2 <= len(labels) <= max_labels else None


def official_test_tasks(task_dir: str | Path) -> set[str] | None:
    """The official SuperNI default-track test tasks, from `splits/default__test_tasks.txt` beside a task
    directory (None when the copy has no split lists)."""
    split = Path(task_dir).parent / "splits" / "default__test_tasks.txt"
    if not split.is_file():
        return None
    return {line.strip() for line in split.read_text().splitlines() if line.strip()}


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


def _self_instruct(path: Path, builder: _Builder) -> None:
    """seed_tasks.jsonl: one task per line with 1+ instances -> one Example per instance."""
    for line, row in iter_jsonl(path, builder.reject):
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


def _box(path: Path, builder: _Builder) -> None:
    """BoX_instructions.json: {task: {"Definition:", "Examples": [...], "Prompt"}} -> one Example per demo."""
    data, _ = _parse_json(path, _read_text(path))
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
# The registry


@dataclass(frozen=True)
class ReadOptions:
    split: str = "train"  # of a saved `datasets.DatasetDict`
    delimiter: str | None = None  # CSV/TSV


Reader = Callable[[Path, _Builder, ReadOptions], None]


def _json_rows(path: Path, builder: _Builder, _: ReadOptions) -> None:
    data, lines = _parse_json(path, _read_text(path))
    builder.add_rows(_rows_json_array(path, data, lines))


def _benchmark(rows: Callable[[Path], Iterator[Located]]) -> Reader:
    return lambda path, builder, _: builder.add_rows(rows(path))


READERS: dict[str, Reader] = {
    # generic containers, with a field mapping
    "jsonl": lambda p, b, _: b.add_rows(iter_jsonl(p, b.reject)),
    "json": _json_rows,
    "csv": lambda p, b, o: b.add_rows(_rows_csv(p, delimiter=o.delimiter, on_error=b.reject)),
    "parquet": lambda p, b, _: b.add_rows(_rows_parquet(p)),
    "hf-disk": lambda p, b, o: b.add_rows(_rows_hf(_load_hf_disk(p, o.split))),
    # dataset families
    "alpaca": _json_rows,
    "lima": _json_rows,  # multi-turn `history` kept as Example.history
    "dolly": _json_rows,
    "self-instruct": lambda p, b, _: _self_instruct(p, b),
    "box": lambda p, b, _: _box(p, b),
    "superni": lambda p, b, _: b.extend(read_superni_task(p, skip_invalid=b.skip_invalid).instances),
    # evaluation benchmarks (data/benchmarks.py)
    **{name: _benchmark(rows) for name, rows in BENCHMARK_READERS.items()},
}
DEFAULT_MAPS = {"dolly": FieldMap(input="context", output="response", task="category")}
HUB = "hf-hub"  # not a file: `path` is the dataset's hub name
FORMATS = (*READERS, HUB)


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
        if path.suffix == ".gz":
            first = next((ln for ln in read_bytes(path).splitlines() if ln.strip()), b"")
        else:
            with path.open("rb") as f:
                first = next((ln for ln in f if ln.strip()), b"")
        try:
            row = json.loads(first.decode("utf-8-sig", errors="replace")) if first else {}
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
    instruction: str | None = None,
    skip_invalid: bool = False,
    limit: int | None = None,
    split: str = "train",
) -> LoadResult:
    """Read any supported source into Examples.

    fmt: one of FORMATS, or None to detect. For `hf-hub`, `path` is the dataset name. `instruction`: one
    instruction for every record (the mapping then needs no instruction column).
    LIMA's multi-turn `history` is kept as `Example.history`: the prompt renderer shows earlier turns
    before the final instruction and only the final response is trained on.
    """
    if fmt is not None and fmt not in FORMATS:
        raise ValueError(f"unknown format {fmt!r}; expected one of {', '.join(FORMATS)}")
    if fmt == HUB:
        return _read_hf_hub(str(path), mapping, source, task, skip_invalid, limit, split)
    path = Path(path)
    if not source_exists(path, fmt):
        raise DataError(path, None, None, "no such file or directory")
    fmt = fmt or detect_format(path)
    fmap = mapping if isinstance(mapping, FieldMap) else FieldMap(**(mapping or {}))
    if mapping is None:
        fmap = DEFAULT_MAPS.get(fmt, fmap)
    if fmt in BENCHMARK_READERS:
        name = source or fmt
    else:
        name = source or _superni_name(path).removesuffix(".jsonl").removesuffix(".csv").removesuffix(".parquet")
    builder = _Builder(path, fmap, source=name, task=task or "", skip_invalid=skip_invalid,
                       instruction=instruction, limit=limit)  # fmt: skip
    READERS[fmt](path, builder, ReadOptions(split=split, delimiter=fmap.delimiter))
    if limit is not None:
        builder.result.records = builder.result.records[:limit]
    return builder.result


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
    builder = _Builder(Path(name), fmap, source=source or name, task=task or "", skip_invalid=skip_invalid,
                       limit=limit)  # fmt: skip
    builder.add_rows(_rows_hf(ds))
    return builder.result
