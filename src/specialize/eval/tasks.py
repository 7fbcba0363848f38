"""Evaluation tasks declared in YAML: where the examples come from, which protocol and metrics apply,
k-shot demonstrations, paraphrased instructions. A shipped catalogue covers the papers' benchmarks.

Everything here is checked and loaded before any model work, so a bad task file fails fast.
"""

from __future__ import annotations

import random
import warnings
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from specialize.config import ConfigError, Protocol, fill_placeholders
from specialize.data import Example, closed_label_set, read_superni_task, superni_task_files
from specialize.data.sources import DataSource
from specialize.eval.metrics import METRICS, primary_metric


class SuperNISelect(BaseModel):
    model_config = ConfigDict(extra="forbid")
    path: str
    tasks: list[str] | None = None
    categories: list[str] | None = None
    classification: int | None = Field(
        None,
        ge=2,
        description="keep only classification tasks: every reference in a closed set of at most this "
        "many labels (`data.closed_label_set`)",
    )


class TaskSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(pattern=r"^[A-Za-z0-9_.-]+$")
    data: DataSource | None = None
    superni: SuperNISelect | None = None
    protocol: Protocol = "generation"
    metrics: list[str] | None = None
    primary: str | None = Field(
        None, description="the metric the task is compared on (one of `metrics`); default: by `PRIMARY_ORDER`"
    )
    options_from: Literal["example", "task"] | None = Field(
        None, description="example: each example's options; task: the task's distinct reference outputs"
    )
    limit: int | None = Field(100, ge=1)
    sample: Literal["first", "random"] = "first"
    shots: list[int] | None = None
    demo_pool: DataSource | None = None
    max_new_tokens: int = Field(512, ge=1)
    stop: list[str] = []
    paraphrases: list[str] = Field(default_factory=list, description="alternative instructions")
    generate_paraphrases: int = Field(0, ge=0, description="also have the evaluated model write N paraphrases")

    @model_validator(mode="after")
    def _check(self) -> TaskSpec:
        if (self.data is None) == (self.superni is None):
            raise ValueError("give exactly one of `data` or `superni`")
        unknown = [m for m in self.metrics or [] if m not in METRICS]
        if unknown:
            raise ValueError(f"unknown metrics {unknown}; known: {', '.join(METRICS)}")
        if self.primary is not None and self.primary not in self.metric_names:
            raise ValueError(f"primary metric {self.primary!r} is not one of the task's metrics {self.metric_names}")
        return self

    @property
    def metric_names(self) -> list[str]:
        if self.metrics:
            return self.metrics
        return ["accuracy"] if self.protocol == "options" else ["rouge_l", "exact_match"]

    @property
    def primary_metric(self) -> str:
        if self.primary is not None:  # Kang et al. compare on F1 where ROUGE-L is also reported
            return self.primary
        return primary_metric([*self.metric_names, *(["accuracy_norm"] if self.protocol == "options" else [])])


def catalogue() -> dict[str, Path]:
    root = resources.files("specialize.eval") / "catalogue"
    return {Path(str(p)).stem: Path(str(p)) for p in root.iterdir() if str(p).endswith(".yaml")}


def load_task_spec(
    ref: str | dict[str, Any] | TaskSpec, data_root: str, overrides: dict[str, Any] | None = None
) -> TaskSpec:
    """A catalogue name, a YAML path, or an inline mapping -> validated TaskSpec with `{data_root}` filled in.
    An inline mapping may `include` a catalogue entry (or YAML path) and change some of its fields:
    `{include: pubmedqa, name: pubmedqa_gen, protocol: generation}`."""
    where = "<inline task>"
    if isinstance(ref, TaskSpec):
        raw: Any = ref.model_dump()
    elif isinstance(ref, dict):
        raw = dict(ref)
        if "include" in raw:
            where, base = _task_file(str(raw.pop("include")))
            raw = {**base, **raw}
    else:
        where, raw = _task_file(ref)
    raw = fill_placeholders(raw, data_root=data_root)
    if overrides:
        raw = {**raw, **overrides}
    try:
        return TaskSpec.model_validate(raw)
    except ValidationError as e:
        msgs = "; ".join(f"{'.'.join(str(x) for x in err['loc'])}: {err['msg']}" for err in e.errors())
        raise ConfigError(f"{where}: {msgs}") from None


def _task_file(ref: str) -> tuple[str, dict[str, Any]]:
    """A catalogue entry or YAML path: (where it is, its raw mapping)."""
    cat = catalogue()
    path = cat.get(ref, Path(ref))
    if not path.is_file():
        raise ConfigError(f"task {ref!r}: not in the catalogue ({', '.join(sorted(cat))}) and no such file")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: invalid YAML: {e}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: a task file is a mapping of TaskSpec fields")
    return str(path), raw


# ---------------------------------------------------------------------------------------------- loading


@dataclass
class LoadedTask:
    """One evaluable unit: a SuperNI selection expands into one LoadedTask per task file."""

    name: str
    spec: TaskSpec
    examples: list[Example]
    demos: list[Example]  # pool for k-shot demonstrations
    options: list[str] | None = None  # task-level option set (options_from: task)
    metadata: dict[str, Any] = field(default_factory=dict)
    # drawn from only when `demos` cannot give k: a SuperNI task's instances that are not evaluated (its
    # official positive examples are often just 2 or 3)
    fallback_demos: list[Example] = field(default_factory=list)

    def max_shots(self, example: Example) -> int:
        return len(_demo_pool(self.demos, example)) + len(_demo_pool(self.fallback_demos, example))


def _select(examples: list[Example], spec: TaskSpec, seed: int) -> list[Example]:
    if spec.limit is None or len(examples) <= spec.limit:
        return examples
    if spec.sample == "first":
        return examples[: spec.limit]
    rng = random.Random(f"{seed}:{spec.name}")
    return [examples[i] for i in sorted(rng.sample(range(len(examples)), spec.limit))]


def load_tasks(spec: TaskSpec, seed: int = 0) -> list[LoadedTask]:
    if spec.superni is not None:
        return _load_superni(spec, seed)
    assert spec.data is not None
    examples = spec.data.read()
    pool = spec.demo_pool.read() if spec.demo_pool else examples
    chosen = _select(examples, spec, seed)
    options = None
    if spec.protocol == "options":
        options = _task_options(examples) if spec.options_from == "task" else None
        missing = [e.id for e in chosen if options is None and not e.options]
        if missing:
            raise ConfigError(f"task {spec.name}: examples without options ({missing[:3]}); set options_from: task")
    return [LoadedTask(spec.name, spec, chosen, pool, options)]


def _task_options(examples: list[Example]) -> list[str]:
    """A classification task's answer set: the distinct reference outputs of its examples."""
    return sorted({ref for e in examples for ref in e.references})


def _load_superni(spec: TaskSpec, seed: int) -> list[LoadedTask]:
    sel = spec.superni
    assert sel is not None
    root = Path(sel.path)
    by_name = superni_task_files(root)
    names = sel.tasks or sorted(by_name)
    unknown = [n for n in names if n not in by_name]
    if unknown:
        raise ConfigError(f"task {spec.name}: unknown SuperNI tasks {unknown[:5]} in {root}")
    loaded, left_out = [], []
    for name in names:
        t = read_superni_task(by_name[name])
        if sel.categories and not set(sel.categories) & set(t.categories):
            continue
        if sel.classification is not None and closed_label_set(t, sel.classification) is None:
            continue
        examples = t.instances.records
        per_task = spec.model_copy(update={"name": name})
        options = _task_options(examples) if spec.protocol == "options" else None
        if options is not None and len(options) < 2:  # one distinct output: ranking is trivially right
            if sel.tasks:
                raise ConfigError(f"task {name}: {len(options)} distinct output(s), nothing to rank by options")
            left_out.append(name)
            continue
        chosen = _select(examples, per_task, seed)
        evaluated = {e.id for e in chosen}
        loaded.append(
            LoadedTask(
                name,
                per_task,
                chosen,
                t.positive_examples,
                options,
                {"categories": t.categories, "group": spec.name},
                fallback_demos=[e for e in examples if e.id not in evaluated],
            )
        )
    if not loaded:
        raise ConfigError(f"task {spec.name}: no SuperNI task matches {sel.categories or sel.tasks}")
    if left_out:
        warnings.warn(f"task {spec.name}: left out {len(left_out)} task(s) with one distinct output, nothing to "
                      f"rank: {', '.join(left_out)}", stacklevel=2)  # fmt: skip
        for t in loaded:
            t.metadata["left_out"] = left_out
    return loaded


# ---------------------------------------------------------------------------------------------- prompts


def _demo_pool(demos: list[Example], example: Example) -> list[Example]:
    return [d for d in demos if d.id != example.id and (d.input, d.output) != (example.input, example.output)]


def with_demos(
    example: Example, demos: list[Example], k: int, seed: int, fallback: list[Example] | None = None
) -> Example:
    """The example with k demonstrations prepended to its instruction; never the example itself. `demos` come
    first; only when they cannot give k are the rest drawn from `fallback` (recorded as `fallback_demo_ids`)."""
    if k == 0:
        return example
    pool, extra = _demo_pool(demos, example), _demo_pool(fallback or [], example)
    if len(pool) + len(extra) < k:
        raise ConfigError(f"{example.task or example.source}: only {len(pool) + len(extra)} demonstrations for k={k}")
    rng = random.Random(f"{seed}:{example.id}:{k}")
    shots = rng.sample(pool, min(k, len(pool)))
    borrowed = rng.sample(extra, k - len(shots)) if len(shots) < k else []
    shots += borrowed
    blocks = [
        f"Example {i + 1}:\nInput: {d.input}\nOutput: {d.output}"
        if d.input
        else f"Example {i + 1}:\nOutput: {d.output}"
        for i, d in enumerate(shots)
    ]
    instruction = example.instruction + "\n\n" + "\n\n".join(blocks)
    meta = {**example.metadata, "demo_ids": [d.id for d in shots]}
    if borrowed:
        meta["fallback_demo_ids"] = [d.id for d in borrowed]
    return example.model_copy(update={"instruction": instruction, "metadata": meta})


def with_instruction(example: Example, instruction: str | None) -> Example:
    return example if instruction is None else example.model_copy(update={"instruction": instruction})


def read_split_file(path: str | Path) -> dict[str, str]:
    """Task -> "train" / "heldout". YAML {train: [...], heldout: [...]}, or a text file of held-out task names."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: no such split file")
    if path.suffix in (".yaml", ".yml"):
        data = yaml.safe_load(path.read_text()) or {}
        if not isinstance(data, dict) or set(data) - {"train", "heldout"}:
            raise ConfigError(f"{path}: expected keys train and/or heldout")
        return {t: split for split in ("train", "heldout") for t in data.get(split, [])}
    return {line.strip(): "heldout" for line in path.read_text().splitlines() if line.strip()}
