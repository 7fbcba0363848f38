"""The typed rows evaluation writes and every later stage reads: one `Prediction` per line of predictions.jsonl."""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel, ConfigDict


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
