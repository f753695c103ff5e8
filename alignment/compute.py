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

import functools
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


def _resident_peak_mb() -> float:
    """The process's resident-set high-water mark, MB: VmHWM where /proc has it (Linux), else the peak since the
    process started (``ru_maxrss``: KiB, bytes on macOS)."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    import resource
    import sys

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 1024 / (1024 if sys.platform == "darwin" else 1)


@functools.lru_cache(maxsize=1)
def _malloc_trim() -> Any:
    """glibc's ``malloc_trim``, or None where there is no glibc (loaded once)."""
    try:
        import ctypes

        return ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return None


def _start_resident_peak() -> None:
    """Make the next high-water mark read the peak from now on (Linux): hand the C heap's free pages back to the
    system first (``malloc_trim``), so the mark starts from what is in use and not from memory an earlier stage
    freed but the allocator kept, then reset it (``echo 5 > /proc/self/clear_refs``). Elsewhere a no-op."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)
    try:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as f:
            f.write("5")
    except OSError:
        pass


@dataclass
class StageTimer:
    """Wall seconds and peak resident memory per stage: ``time/<stage>`` and ``memory/<stage>`` (MB), the one
    timer of a run (experiment and algorithms share it); ``memory/peak`` is the whole run's.

    A stage entered several times adds up its seconds (every training of an iterative algorithm is ``train``)
    and keeps its largest peak; a stage that raises still counts. The peak of a stage is the process's resident
    high-water mark reset when the stage starts (Linux); where that reset is not available, it is the peak of
    the process so far (an upper bound)."""

    times: dict[str, float] = field(default_factory=dict)
    peaks: dict[str, float] = field(default_factory=dict)  # MB per stage, and "peak" for the run
    _open: dict[str, float] = field(default_factory=dict)  # running peak of each stage in progress

    def _fold(self) -> None:
        """The high-water mark since the last reset, into every open stage's running peak and the run's."""
        now = _resident_peak_mb()
        for stage in self._open:
            self._open[stage] = max(self._open[stage], now)
        self.peaks["peak"] = max(self.peaks.get("peak", 0.0), now)

    def memory(self) -> dict[str, float]:
        """``memory/<stage>`` and ``memory/peak`` (MB, to 0.1), the run's peak including what ran since the last
        stage."""
        self._fold()
        return {f"memory/{name}": round(mb, 1) for name, mb in self.peaks.items()}

    @contextmanager
    def __call__(self, stage: str) -> Iterator[None]:
        self._fold()  # before the reset: the enclosing stages' and the run's peaks so far
        _start_resident_peak()
        self._open[stage] = 0.0
        start = time.perf_counter()
        try:
            yield
        finally:
            key = f"time/{stage}"
            self.times[key] = self.times.get(key, 0.0) + time.perf_counter() - start
            self._fold()
            self.peaks[stage] = max(self.peaks.get(stage, 0.0), self._open.pop(stage))
