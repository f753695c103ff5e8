"""The Lagrange multiplier of primal-dual baselines, as a small component of its own.

Convention (ours, everywhere): the constraint is slack_t = Ê[g] - E_ref[g] - b >= 0, and the dual update
lowers λ when the constraint holds and raises it when it is violated.

    projected SGD:   λ ← clip(λ - lr · mean(window of slacks), 0, max)
    log-λ SGD:       log λ ← log λ - lr · λ · mean(window of slacks),  λ ← clip(exp(log λ), 0, max)

The log-λ form is Safe-RLHF's (its loss is -λ·(d - J_c) with λ = exp(log λ); the gradient with respect to
log λ carries the factor λ). Updates begin after ``delay`` observations, and each update uses the mean slack of
the last ``window`` observations (Safe-RLHF's episode-cost window), so noisy single-batch estimates do not
whip λ around.
"""

from __future__ import annotations

import math
from collections import deque

import numpy as np

from alignment.config import MultiplierConfig


class LagrangeMultiplier:
    """λ >= 0 for m constraints, updated from observed constraint slacks."""

    def __init__(self, cfg: MultiplierConfig, m: int = 1, *, init: np.ndarray | None = None):
        """``init`` overrides ``cfg.init`` (e.g. a warm start at the dual's λ*), clipped into [0, max]."""
        self.cfg = cfg
        start = np.full(m, float(cfg.init)) if init is None else np.asarray(init, dtype=float).reshape(m)
        floor = math.exp(-30) if cfg.log_space else 0.0  # log-space updates cannot leave λ = 0
        self.value = np.clip(start, floor, cfg.max)
        self._recent: deque[np.ndarray] = deque(maxlen=cfg.window)
        self.observations = 0

    def update(self, slack: float | np.ndarray) -> np.ndarray:
        """Record one slack observation ([m] or a float) and, past the delay, take one dual step."""
        slack = np.broadcast_to(np.asarray(slack, dtype=float), self.value.shape)
        if not np.all(np.isfinite(slack)):
            raise ValueError(f"multiplier.update: slack must be finite, got {slack}")
        self._recent.append(slack.copy())
        self.observations += 1
        if self.observations <= self.cfg.delay:
            return self.value
        mean_slack = np.mean(self._recent, axis=0)
        if self.cfg.log_space:
            log_lam = np.log(self.value) - self.cfg.lr * self.value * mean_slack
            self.value = np.clip(np.exp(log_lam), math.exp(-30), self.cfg.max)
        else:
            self.value = np.clip(self.value - self.cfg.lr * mean_slack, 0.0, self.cfg.max)
        return self.value
