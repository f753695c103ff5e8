"""What an algorithm spends, counted in units that mean the same on a laptop and a GPU cluster.

Counts are the work the algorithm needs, whether or not an artifact came from the cache (a cached adapter
carries the counts of the training that made it), so the same config gives the same numbers. The same holds
for a training killed and resumed from a checkpoint: the checkpoint carries the counts spent before it, and the
resumed run adds them (``alignment.training.train_items``, ``meter``). Wall time is measured separately, under
``time/*``. Evaluation is shared by every algorithm and is not counted.

Units: a *token* is one position through the policy (prompt and response; the tabular world counts one token
per response); *forward* tokens include reference log-probabilities; *backward* tokens are those of forward
passes that were differentiated; a *scorer call* scores one (prompt, response); a *training run* is one
optimisation of the policy from π_ref.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, fields
from typing import Any


@dataclass
class ComputeMeter:
    generated_tokens: int = 0  # new tokens sampled from π_ref or a policy
    policy_samples: int = 0  # responses sampled
    forward_tokens: int = 0
    backward_tokens: int = 0
    scorer_calls: int = 0
    training_runs: int = 0

    def add(self, **counts: int) -> None:
        for name, value in counts.items():
            setattr(self, name, getattr(self, name) + int(value))

    def snapshot(self) -> dict[str, int]:
        return asdict(self)

    def since(self, snapshot: dict[str, int]) -> dict[str, int]:
        """The counts spent since ``snapshot`` (to store with a cached artifact)."""
        return {f.name: getattr(self, f.name) - snapshot[f.name] for f in fields(self)}

    def summary(self, prefix: str = "compute/") -> dict[str, Any]:
        return {f"{prefix}{k}": v for k, v in asdict(self).items()}


@dataclass
class StageTimer:
    """Wall seconds per stage, as ``time/<stage>``: the one timer of a run (experiment and algorithms share it).

    A stage entered several times adds up (every training of an iterative algorithm is ``train``); a stage
    that raises still counts the time it took."""

    times: dict[str, float] = field(default_factory=dict)

    @contextmanager
    def __call__(self, stage: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            key = f"time/{stage}"
            self.times[key] = self.times.get(key, 0.0) + time.perf_counter() - start
