"""Percentile intervals over bootstrap draws: the one place every ``*_ci`` in a summary comes from.

The dual's bootstrap (alignment/dual.py), the held-out and in-sample gains (alignment/worlds/, alignment/
experiment.py) and the sweep's multi-seed points (hierarchical: seeds, then prompts) all report the
equal-tailed percentile interval at ``level`` of their draws.
"""

from __future__ import annotations

import numpy as np


def percentile_bounds(draws: np.ndarray, level: float) -> tuple[np.ndarray, np.ndarray]:
    """(low, high): the (1 - level)/2 and (1 + level)/2 quantiles of ``draws`` over axis 0."""
    alpha = (1 - level) / 2
    lo, hi = np.quantile(draws, [alpha, 1 - alpha], axis=0)
    return lo, hi


def percentile_interval(draws: np.ndarray, level: float) -> list:
    """[low, high] of :func:`percentile_bounds`, as lists (or floats) for JSON."""
    lo, hi = percentile_bounds(draws, level)
    return [np.asarray(lo).tolist(), np.asarray(hi).tolist()]


def hierarchical_interval(draws: list[np.ndarray], level: float, *, n_boot: int = 2000, seed: int = 0
                          ) -> tuple[float, float]:
    """Percentile interval of the mean over seeds, resampling seeds and then each seed's prompt-bootstrap
    draws (a two-level bootstrap). With one seed it would only approximate that seed's prompt interval (a
    resample of its draws), so ``sweep_points`` takes a single run's interval from its summary instead."""
    rng = np.random.default_rng(seed)
    s = len(draws)
    picks = rng.integers(0, s, size=(n_boot, s))
    values = np.array([[d[rng.integers(0, len(d))] for d in (draws[i] for i in row)] for row in picks]).mean(axis=1)
    low, high = percentile_bounds(values, level)
    return float(low), float(high)
