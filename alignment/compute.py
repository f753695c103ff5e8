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


def _resident_peak_mb() -> float | None:
    """The process's resident-set high-water mark (VmHWM), MB; None where /proc is not available."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def _reset_resident_peak() -> bool:
    """Reset VmHWM to the current resident size (Linux: ``echo 5 > /proc/self/clear_refs``), so the next read is
    the peak since now; False where the kernel does not allow it."""
    try:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _release_free_memory() -> None:
    """Hand the C heap's free pages back to the system (glibc ``malloc_trim``), so that a stage's resident peak
    is its own and not the memory an earlier stage freed but the allocator kept; a no-op elsewhere."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _max_rss_mb() -> float:
    import resource
    import sys

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 1024 / (1024 if sys.platform == "darwin" else 1)  # bytes on macOS, KiB elsewhere


@dataclass
class StageTimer:
    """Wall seconds and peak resident memory per stage: ``time/<stage>`` and ``memory/<stage>`` (MB), the one
    timer of a run (experiment and algorithms share it); ``memory/peak`` is the whole run's.

    A stage entered several times adds up its seconds (every training of an iterative algorithm is ``train``)
    and keeps its largest peak; a stage that raises still counts. The peak of a stage is the process's resident
    high-water mark reset when the stage starts (Linux); where that reset is not available, it is the peak of
    the process so far (an upper bound)."""

    times: dict[str, float] = field(default_factory=dict)
    memory: dict[str, float] = field(default_factory=dict)
    _open: dict[str, float] = field(default_factory=dict)  # running peak of each stage in progress

    def memory_now(self) -> None:
        """Fold the peak since the last stage into ``memory/peak``."""
        self._fold()
        self.memory["memory/peak"] = round(self.memory["memory/peak"], 1)

    def _fold(self) -> float:
        """The high-water mark since the last reset, into every open stage's running peak (and the run's)."""
        now = _resident_peak_mb()
        now = _max_rss_mb() if now is None else now
        for stage in self._open:
            self._open[stage] = max(self._open[stage], now)
        self.memory["memory/peak"] = max(self.memory.get("memory/peak", 0.0), now)
        return now

    @contextmanager
    def __call__(self, stage: str) -> Iterator[None]:
        self._fold()
        _release_free_memory()
        _reset_resident_peak()
        self._open[stage] = 0.0
        start = time.perf_counter()
        try:
            yield
        finally:
            key = f"time/{stage}"
            self.times[key] = self.times.get(key, 0.0) + time.perf_counter() - start
            self._fold()
            peak = self._open.pop(stage)
            self.memory[f"memory/{stage}"] = round(max(self.memory.get(f"memory/{stage}", 0.0), peak), 1)
            self.memory["memory/peak"] = round(self.memory["memory/peak"], 1)
