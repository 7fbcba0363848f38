"""Seeded, deterministic, disjoint splits of a dataset that ships without one (FiQA, SemEval-2017, Financial
PhraseBank): Kang et al. sample their finance seeds from the training portions and evaluate on the rest.

Each record goes to a part by a hash of (seed, its text): the assignment does not depend on file order or on
the other records, so adding records never moves existing ones and the same seed always gives the same split.
The text, not the id, decides: a sentence that occurs twice (SemEval-2017 scores one headline per company it
names; Financial PhraseBank repeats a few sentences) lands in one part, so a seed is never also a test item.
"""

from __future__ import annotations

from collections.abc import Sequence

from pydantic import BaseModel, ConfigDict, Field, model_validator

from specialize.hashing import text_sha256
from specialize.records import Example


def split_key(record: Example) -> str:
    """What decides a record's part: the text it asks about (its input; its instruction when it has none)."""
    return record.input or record.instruction


def seeded_split(records: Sequence[Example], fractions: dict[str, float], seed: int) -> dict[str, list[Example]]:
    """Records by part (e.g. {"train": 0.5, "test": 0.5}), in file order within each part."""
    if not fractions or any(f <= 0 for f in fractions.values()) or abs(sum(fractions.values()) - 1) > 1e-9:
        raise ValueError(f"split fractions must be positive and sum to 1, got {fractions}")
    bounds, total = [], 0.0
    for name, f in fractions.items():
        total += f
        bounds.append((total, name))
    parts: dict[str, list[Example]] = {name: [] for name in fractions}
    for r in records:
        u = int(text_sha256(f"{seed}:{split_key(r)}", 15), 16) / 16**15  # uniform in [0, 1), a function of the text
        parts[next((name for bound, name in bounds if u < bound), bounds[-1][1])].append(r)
    return parts


class SeededSplit(BaseModel):
    """One part of a seeded split, as a data source declares it: `{seed: 0, fractions: {train: 0.5, test: 0.5},
    part: test}`. Two sources naming the same seed and fractions see disjoint parts of the same file."""

    model_config = ConfigDict(extra="forbid")
    seed: int = 0
    fractions: dict[str, float] = Field(min_length=2)
    part: str

    @model_validator(mode="after")
    def _check(self) -> SeededSplit:
        if self.part not in self.fractions:
            raise ValueError(f"part {self.part!r} is not one of the fractions' parts {sorted(self.fractions)}")
        if any(f <= 0 for f in self.fractions.values()) or abs(sum(self.fractions.values()) - 1) > 1e-9:
            raise ValueError(f"split fractions must be positive and sum to 1, got {self.fractions}")
        return self

    def select(self, records: Sequence[Example]) -> list[Example]:
        return seeded_split(records, self.fractions, self.seed)[self.part]
