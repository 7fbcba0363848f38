"""The typed results evaluation writes and every later stage reads: one `Prediction` per line of
predictions.jsonl, and the `Summary` of summary.json (scores with CIs, k-shot spreads, robustness, splits,
paired comparisons)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, model_serializer, model_validator


class Prediction(BaseModel):
    """One evaluated example: which model, task, shot count and instruction variant; what it answered; its
    scores. Option-ranking tasks add the per-byte-normalized choice and every option's log-probability;
    generation tasks the finish reason."""

    model_config = ConfigDict(extra="forbid")

    model: str
    task: str
    k: int
    variant: str
    id: str
    prompt_hash: str = ""
    prediction: str = ""
    prediction_norm: str | None = None
    option_logprobs: dict[str, float] | None = None
    finish_reason: str | None = None
    references: list[str] = []
    scores: dict[str, float]
    demo_ids: list[str] = []
    fallback_demo_ids: list[str] | None = None

    @property
    def unit(self) -> tuple[str, str, int, str]:
        """(model, task, k, variant): what one pass of the harness computes."""
        return self.model, self.task, self.k, self.variant

    def line(self) -> str:
        return self.model_dump_json(exclude_none=True)


def read_predictions(path: str | Path) -> list[Prediction]:
    return [Prediction.model_validate_json(line) for line in Path(path).read_text().splitlines() if line.strip()]


class Estimate(BaseModel):
    """A score over examples: its mean and 95% bootstrap CI."""

    model_config = ConfigDict(extra="forbid")
    mean: float
    ci95: tuple[float, float]


_ENTRY_FIELDS = ("model", "task", "k", "variant", "n", "split", "primary", "majority_baseline", "above_majority")


class ScoreEntry(BaseModel):
    """Every metric of one (model, task, k, instruction variant). In summary.json each metric stands at the top
    level of the entry (`{"accuracy": {"mean", "ci95"}, ...}`), as files written before this type have it."""

    model_config = ConfigDict(extra="forbid")
    model: str
    task: str
    k: int
    variant: str
    n: int
    split: str
    metrics: dict[str, Estimate]
    primary: str | None = None  # the metric the task is compared on (files written before it: None)
    majority_baseline: float | None = None
    above_majority: bool | None = None

    @model_validator(mode="before")
    @classmethod
    def _gather(cls, data: Any) -> Any:
        if isinstance(data, dict) and "metrics" not in data:
            metrics = {k: v for k, v in data.items() if k not in _ENTRY_FIELDS}
            data = {**{k: v for k, v in data.items() if k in _ENTRY_FIELDS}, "metrics": metrics}
        return data

    @model_serializer(mode="wrap")
    def _flatten(self, handler: Any) -> dict[str, Any]:
        out = handler(self)
        metrics = out.pop("metrics")
        return {**{k: v for k, v in out.items() if v is not None}, **metrics}


class KShot(BaseModel):
    """Self-Specialization Table 4: the primary metric over shot counts, worst / average / best."""

    model: str
    task: str
    metric: str
    by_k: dict[int, float]
    worst: float
    average: float
    best: float


class Robustness(BaseModel):
    """Shi et al. Figure 4: the primary metric over a task's instructions (original and paraphrases)."""

    model: str
    task: str
    k: int
    metric: str
    n_instructions: int
    mean: float
    best: float
    worst: float
    spread: float
    stdev: float


class SplitMean(BaseModel):
    """Mean primary metric over the held-out (or training) tasks."""

    model: str
    k: int
    split: str
    tasks: int
    mean: float


class Comparison(BaseModel):
    """An adapter against the base on the same examples: paired bootstrap."""

    model: str
    vs: str
    task: str
    k: int
    variant: str
    metric: str
    difference: float
    ci95: tuple[float, float]
    p_value: float


class Summary(BaseModel):
    """summary.json: what an evaluation found, every number with its uncertainty."""

    scores: list[ScoreEntry]
    kshot: list[KShot] = []
    paraphrase: list[Robustness] = []
    splits: list[SplitMean] = []
    comparisons: list[Comparison] = []
    instructions: dict[str, list[str]] = {}
    generated_paraphrases: dict[str, list[str]] = {}
    paraphrases_rejected: dict[str, dict[str, int]] = {}
    templates: dict[str, str] = {}
    seconds: float | None = None  # the cost of the evaluation, kept with its cached results

    @classmethod
    def read(cls, path: str | Path) -> Summary:
        return cls.model_validate_json(Path(path).read_text())

    def json_text(self) -> str:
        return json.dumps(self.model_dump(mode="json"), indent=1)
