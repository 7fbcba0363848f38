"""The one record type every stage reads and writes: an instruction example."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator


class DataError(ValueError):
    """Bad input data, located by file, line and field."""

    def __init__(self, path: str | Path, line: int | None, field: str | None, message: str):
        self.path = str(path)
        self.line = line
        self.field = field
        self.message = message
        where = self.path if line is None else f"{self.path}:{line}"
        what = f" field '{field}':" if field else ""
        super().__init__(f"{where}:{what} {message}")


class Turn(BaseModel):
    """One earlier exchange of a multi-turn example (LIMA's `history`)."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    user: str
    assistant: str


class Example(BaseModel):
    """An instruction example.

    `output` is the training target and first reference; `references` holds every acceptable
    output (SuperNI instances have several) and always starts with `output`.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    id: str = Field(min_length=1)
    instruction: str = Field(min_length=1)
    input: str = ""
    output: str
    references: tuple[str, ...] = ()
    options: tuple[str, ...] | None = None
    history: tuple[Turn, ...] = ()
    task: str = ""
    source: str = ""
    metadata: dict[str, Any] = Field(default_factory=dict)

    @field_validator("instruction")
    @classmethod
    def _instruction_not_blank(cls, v: str) -> str:
        if not v.strip():
            raise ValueError("instruction is blank")
        return v

    @model_validator(mode="after")
    def _references_start_with_output(self) -> Example:
        if not self.references:
            object.__setattr__(self, "references", (self.output,))
        elif self.references[0] != self.output:
            raise ValueError("references[0] must equal output")
        if self.options is not None and len(set(self.options)) != len(self.options):
            raise ValueError("options contain duplicates")
        return self


@dataclass(frozen=True)
class Skipped:
    """A record left out under `skip_invalid`, kept for the report."""

    path: str
    line: int | None
    field: str | None
    message: str

    def __str__(self) -> str:
        return str(DataError(self.path, self.line, self.field, self.message))


@dataclass
class LoadResult:
    """Records read from one source, and every record that was skipped with why."""

    records: list[Example] = field(default_factory=list)
    skipped: list[Skipped] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.records)

    def __iter__(self):
        return iter(self.records)

    def skip_summary(self, limit: int = 5) -> str:
        if not self.skipped:
            return "0 records skipped"
        head = "\n".join(f"  {s}" for s in self.skipped[:limit])
        more = f"\n  ... and {len(self.skipped) - limit} more" if len(self.skipped) > limit else ""
        return f"{len(self.skipped)} records skipped:\n{head}{more}"
