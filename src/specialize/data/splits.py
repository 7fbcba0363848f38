"""Seeded, deterministic, disjoint splits of a dataset that ships without one (FiQA, SemEval-2017, Financial
PhraseBank): Kang et al. sample their finance seeds from the training portions and evaluate on the rest.

Each record goes to a part by a hash of (seed, its id): the assignment does not depend on file order or on the
other records, so adding records never moves existing ones, and the same seed always gives the same split.
"""

from __future__ import annotations

from collections.abc import Sequence

from specialize.hashing import text_sha256
from specialize.records import Example


def seeded_split(records: Sequence[Example], fractions: dict[str, float], seed: int) -> dict[str, list[Example]]:
    """Records by part (e.g. {"train": 0.5, "test": 0.5}), in file order within each part."""
    if not fractions or any(f <= 0 for f in fractions.values()) or abs(sum(fractions.values()) - 1) > 1e-9:
        raise ValueError(f"split fractions must be positive and sum to 1, got {fractions}")
    ids = [r.id for r in records]
    if len(set(ids)) != len(ids):
        raise ValueError("a seeded split needs unique record ids")
    bounds, total = [], 0.0
    for name, f in fractions.items():
        total += f
        bounds.append((total, name))
    parts: dict[str, list[Example]] = {name: [] for name in fractions}
    for r in records:
        u = int(text_sha256(f"{seed}:{r.id}", 15), 16) / 16**15  # uniform in [0, 1), a pure function of the id
        parts[next((name for bound, name in bounds if u < bound), bounds[-1][1])].append(r)
    return parts
