from __future__ import annotations

import numpy as np

from specialize.eval.stats import bootstrap_ci, paired_bootstrap


def test_bootstrap_ci_covers_the_true_mean_about_95_percent():
    rng = np.random.default_rng(1)
    hits = 0
    trials = 200
    for t in range(trials):
        sample = (rng.random(100) < 0.7).astype(float) * 100
        est = bootstrap_ci(sample, resamples=500, seed=t)
        assert est.low <= est.mean <= est.high
        hits += est.low <= 70.0 <= est.high
    assert 0.88 <= hits / trials <= 0.99


def test_paired_bootstrap():
    same = paired_bootstrap([1.0, 0.0, 1.0], [1.0, 0.0, 1.0])
    assert same.difference.mean == 0 and same.p_value == 1.0
    rng = np.random.default_rng(0)
    b = rng.random(200)
    better = paired_bootstrap(b + 0.2, b)
    assert better.difference.mean > 0.19 and better.difference.low > 0 and better.p_value < 0.01
    noisy = paired_bootstrap(rng.random(200), rng.random(200))
    assert noisy.difference.low < 0 < noisy.difference.high and noisy.p_value > 0.05
