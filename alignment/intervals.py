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
