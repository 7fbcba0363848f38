"""Sampling parameters: one type for every consumer of the token loop (and, later, every engine)."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, field_validator


class SamplingParams(BaseModel):
    """temperature 0 means greedy decoding. `seed` seeds this request's own generator: the same parameters and
    seed give the same text wherever the request runs. Empty stop strings are refused (they would match
    everywhere)."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    max_new_tokens: int = Field(256, ge=1)
    temperature: float = Field(0.0, ge=0.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    stop: tuple[str, ...] = ()
    seed: int | None = None
    ignore_eos: bool = Field(False, description="decode max_new_tokens whatever the model says (benchmarks)")

    @field_validator("stop")
    @classmethod
    def _no_empty_stop(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        if any(not s for s in v):
            raise ValueError("stop strings must be non-empty")
        return v
