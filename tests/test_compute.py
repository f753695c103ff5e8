"""The run's stage timer: seconds that add up over a stage's entries, and each stage's own peak resident memory."""

from __future__ import annotations

import os
import time

import numpy as np
import pytest

from alignment.compute import StageTimer

MB = 1024 * 1024
CAN_RESET_PEAK = os.access("/proc/self/clear_refs", os.W_OK)


@pytest.mark.fast
def test_a_stage_entered_twice_adds_up_and_a_failing_stage_still_counts():
    timer = StageTimer()
    for _ in range(2):
        with timer("train"):
            time.sleep(0.02)
    with pytest.raises(RuntimeError), timer("probe"):
        time.sleep(0.02)
        raise RuntimeError("boom")
    assert timer.times["time/train"] >= 0.04  # two entries of at least 0.02 s each, added
    assert timer.times["time/probe"] >= 0.02
    memory = timer.memory()
    assert set(memory) == {"memory/peak", "memory/train", "memory/probe"}
    assert memory["memory/peak"] >= max(memory["memory/train"], memory["memory/probe"]) > 0


@pytest.mark.fast
@pytest.mark.skipif(not CAN_RESET_PEAK, reason="no /proc/self/clear_refs: stage peaks are the process's so far")
def test_each_stage_reports_its_own_peak_memory():
    """A stage that touches 400 MB peaks at least 400 MB above the one before it; the stage after it, which
    allocates nothing, does not inherit that peak (the high-water mark is reset when a stage starts). The
    margins: 400 MB of float64 ones are resident once written; the quiet stage's peak is the process's
    resident size then, within 200 MB of the first stage's (the allocator keeps little once trimmed)."""
    timer = StageTimer()
    with timer("before"):
        pass
    with timer("big"):
        block = np.ones(400 * MB // 8)
        del block
    with timer("after"):
        pass
    memory = timer.memory()
    assert memory["memory/big"] >= memory["memory/before"] + 400 * 0.95
    assert memory["memory/after"] < memory["memory/before"] + 200
    assert memory["memory/peak"] >= memory["memory/big"]
