"""Training mixes: each source contributes N examples, split equally across its tasks, reproducibly.

Shi et al. build target tasks spanning several datasets by sampling "such that each dataset has an
equal proportion"; a source's tasks (SuperNI task files, or the `task` field) play that role here.
"""

from __future__ import annotations

import random
from collections import defaultdict
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from specialize.data import (
    Example,
    FieldMap,
    LoadResult,
    SuperNITask,
    closed_label_set,
    official_test_tasks,
    read_records,
    read_superni_task,
    source_exists,
    superni_task_files,
)
from specialize.hashing import Digest


class MixError(ValueError):
    """A mix that cannot be built: unknown source, too few examples, bad amount."""


class SourceSpec(BaseModel):
    """One source of a mix: a file (or a directory of SuperNI task files) and how many examples to take."""

    model_config = ConfigDict(extra="forbid")

    path: str
    name: str | None = None
    format: str | None = None
    mapping: dict[str, Any] | None = None
    amount: int | Literal["all"] = "all"
    tasks: list[str] | None = Field(None, description="SuperNI task names (directory sources) to include")
    categories: list[str] | None = Field(None, description="SuperNI categories (directory sources) to include")
    exclude_tasks: list[str] | None = Field(None, description="SuperNI task names to leave out (held-out tasks)")
    classification: int | None = Field(
        None, ge=2, description="only SuperNI classification tasks: every reference in a closed set of at most this "
        "many labels (`data.closed_label_set`, the rule evaluation's `superni.classification` applies too)",
    )  # fmt: skip
    exclude_ids: list[str] | None = Field(None, description="example ids never to train on (e.g. test instances)")
    skip_invalid: bool = False

    @field_validator("amount")
    @classmethod
    def _positive(cls, v: int | str) -> int | str:
        if isinstance(v, int) and v < 1:
            raise ValueError("amount must be >= 1 or 'all'")
        return v

    @property
    def label(self) -> str:
        return self.name or Path(self.path).name


def _tasks(spec: SourceSpec) -> list[SuperNITask]:
    """SuperNI-style directory: its tasks, parsed once, filtered by name, category and classification rule."""
    root = Path(spec.path)
    by_name = superni_task_files(root)
    if not by_name:
        raise MixError(f"source {spec.label!r}: {root} holds no task .json / .json.gz files")
    if spec.tasks:
        missing = [t for t in spec.tasks if t not in by_name]
        if missing:
            raise MixError(f"source {spec.label!r}: unknown tasks {missing[:5]} in {root}")
        by_name = {t: by_name[t] for t in spec.tasks}
    if spec.exclude_tasks:
        unknown = [t for t in spec.exclude_tasks if t not in by_name]
        if unknown:
            raise MixError(f"source {spec.label!r}: unknown tasks to exclude {unknown[:5]} in {root}")
        by_name = {n: f for n, f in by_name.items() if n not in set(spec.exclude_tasks)}
    if (test := official_test_tasks(root)) and (leaked := sorted(set(by_name) & test)):
        # the test split is what held-out evaluation measures: a mix must never contain any of it
        raise MixError(f"source {spec.label!r}: {leaked[:5]} are official SuperNI test tasks; never train on them")
    # each file is parsed once, lazily: the filters and the records read the same parsed task, and a task a
    # filter drops is not held while the rest of the directory is parsed
    tasks: Iterable[SuperNITask] = (read_superni_task(f, skip_invalid=spec.skip_invalid) for f in by_name.values())
    if spec.categories:
        wanted = set(spec.categories)
        tasks = [t for t in tasks if wanted & set(t.categories)]
        if not tasks:
            raise MixError(f"source {spec.label!r}: no task in {root} has categories {sorted(wanted)}")
    if spec.classification is not None:
        tasks = [t for t in tasks if closed_label_set(t, spec.classification)]
        if not tasks:
            raise MixError(f"source {spec.label!r}: no task in {root} has at most {spec.classification} labels")
    return list(tasks)


def load_source(spec: SourceSpec) -> LoadResult:
    """All records of one source (every task file of a directory source)."""
    path = Path(spec.path)
    if not source_exists(path, spec.format):
        raise MixError(f"source {spec.label!r}: {path} does not exist")
    mapping = FieldMap(**spec.mapping) if spec.mapping else None
    if path.is_dir() and not (path / "dataset_info.json").exists() and not (path / "dataset_dict.json").exists():
        result = LoadResult()
        for task in _tasks(spec):
            result.records += task.instances.records
            result.skipped += task.instances.skipped
        return result
    if spec.tasks or spec.categories or spec.exclude_tasks:
        raise MixError(f"source {spec.label!r}: task/category filters need a directory of task files")
    return read_records(path, spec.format, mapping=mapping, source=spec.name, skip_invalid=spec.skip_invalid)


def equal_shares(available: dict[str, int], amount: int) -> dict[str, int]:
    """Split `amount` equally across groups; groups too small give their shortfall to the others."""
    total = sum(available.values())
    if amount > total:
        raise MixError(f"asked for {amount} examples but only {total} are available")
    shares = dict.fromkeys(available, 0)
    open_groups = sorted(available)
    left = amount
    while left:
        per, extra = divmod(left, len(open_groups))
        for i, g in enumerate(open_groups):
            take = min(per + (1 if i < extra else 0), available[g] - shares[g])
            shares[g] += take
            left -= take
        open_groups = [g for g in open_groups if shares[g] < available[g]]
    return shares


def sample_source(records: Sequence[Example], amount: int | Literal["all"], seed: int) -> list[Example]:
    """`amount` examples with each task an equal share (records without a task form one group)."""
    if amount == "all":
        return list(records)
    groups: dict[str, list[Example]] = defaultdict(list)
    for r in records:
        groups[r.task or r.source].append(r)
    shares = equal_shares({g: len(v) for g, v in groups.items()}, amount)
    picked: list[Example] = []
    for g in sorted(groups):
        rng = random.Random(f"{seed}:{g}")  # per-group streams: adding a task does not reshuffle the others
        picked += rng.sample(groups[g], shares[g])
    random.Random(seed).shuffle(picked)
    return picked


def build_mix(sources: Sequence[SourceSpec], seed: int) -> tuple[list[Example], dict[str, Any]]:
    """The examples of a mix, plus a manifest of what was chosen from where (written next to checkpoints)."""
    if not sources:
        raise MixError("a mix needs at least one source")
    labels = [s.label for s in sources]
    if len(set(labels)) != len(labels):
        raise MixError(f"source names must be unique, got {labels}")
    examples: list[Example] = []
    manifest: dict[str, Any] = {"seed": seed, "sources": []}
    for spec in sources:
        loaded = load_source(spec)
        excluded = set(spec.exclude_ids or ())
        records = [r for r in loaded.records if r.id not in excluded]
        if not records:
            raise MixError(f"source {spec.label!r}: no usable records in {spec.path}")
        try:
            chosen = sample_source(records, spec.amount, seed)
        except MixError as e:
            raise MixError(f"source {spec.label!r}: {e}") from None
        examples += chosen
        tasks: dict[str, int] = defaultdict(int)
        for r in chosen:
            tasks[r.task or r.source] += 1
        manifest["sources"].append(
            {
                "name": spec.label,
                "path": spec.path,
                "amount": spec.amount,
                "available": len(records),
                "excluded": len(loaded.records) - len(records),
                "skipped": [str(s) for s in loaded.skipped],
                "selected": len(chosen),
                "per_task": dict(sorted(tasks.items())),
                "ids": [r.id for r in chosen],
            }
        )
    manifest["fingerprint"] = mix_fingerprint(examples)
    return examples, manifest


def mix_fingerprint(examples: Sequence[Example]) -> str:
    """Content hash of a mix: same examples in the same order -> same fingerprint."""
    h = Digest()
    for r in examples:
        h.update(r.model_dump_json())
    return h.hexdigest()
