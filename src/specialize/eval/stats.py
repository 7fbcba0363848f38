"""Uncertainty: percentile bootstrap CIs for a mean score, and the paired bootstrap for two systems."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Estimate:
    mean: float
    low: float
    high: float
    n: int

    def __str__(self) -> str:
        return f"{self.mean:.2f} [{self.low:.2f}, {self.high:.2f}]"


def bootstrap_ci(scores: Sequence[float], *, level: float = 0.95, resamples: int = 2000, seed: int = 0) -> Estimate:
    x = np.asarray(scores, dtype=float)
    if x.size == 0:
        raise ValueError("no scores to bootstrap")
    rng = np.random.default_rng(seed)
    means = x[rng.integers(0, x.size, size=(resamples, x.size))].mean(axis=1)
    alpha = (1 - level) / 2
    return Estimate(float(x.mean()), float(np.quantile(means, alpha)), float(np.quantile(means, 1 - alpha)), x.size)


@dataclass(frozen=True)
class PairedComparison:
    difference: Estimate  # mean of (a - b) with its CI
    p_value: float  # two-sided: how often the resampled difference falls on the other side of zero, doubled


def paired_bootstrap(
    a: Sequence[float], b: Sequence[float], *, level: float = 0.95, resamples: int = 2000, seed: int = 0
) -> PairedComparison:
    """Compare two systems scored on the same examples (resampling examples, keeping pairs together)."""
    x, y = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if x.shape != y.shape or x.size == 0:
        raise ValueError(f"paired scores need equal, non-empty lengths (got {x.size} and {y.size})")
    d = x - y
    rng = np.random.default_rng(seed)
    means = d[rng.integers(0, d.size, size=(resamples, d.size))].mean(axis=1)
    alpha = (1 - level) / 2
    est = Estimate(float(d.mean()), float(np.quantile(means, alpha)), float(np.quantile(means, 1 - alpha)), d.size)
    if d.mean() == 0 and np.all(d == 0):
        return PairedComparison(est, 1.0)
    other_side = np.mean(means <= 0) if d.mean() > 0 else np.mean(means >= 0)
    return PairedComparison(est, float(min(1.0, 2 * other_side)))
