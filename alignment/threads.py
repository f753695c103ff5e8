"""How many CPU threads torch's kernels use in a run (``threads`` in the config).

torch takes every core by default. That is right for one job alone on a machine and wrong for the jobs of a
parallel launcher or the ranks of a CPU launch, which then each spin up all cores' worth of threads and wait in
each other's barriers (measured on 2 cores: a tabular run took 71.9 s with torch's default while another job
shared the cores, 12.9 s with one thread). So a run sets the count deliberately:

- ``threads: <n>`` in the config: exactly n;
- ``threads: null`` (the default) with ``OMP_NUM_THREADS`` set: what the user set, untouched;
- otherwise the cores this process may use (its CPU affinity, which Slurm and taskset restrict) divided among
  the processes running at once on them: the jobs a parallel Hydra launcher runs together, times the ranks of
  a distributed launch on this node. This rule was the fastest for every world measured here (2 cores): alone,
  the tabular run took 5.0 s with 2 threads and 6.5 s with 1, and the toy π_ref build 0.18 s per step with 2
  and 0.31 s with 1; with two jobs at once, one thread each avoids the barrier spinning above. (The toy π_ref
  build keeps its own count, ``model.sft_threads``, part of the built model's identity.)

CPU kernels may sum in a different order with a different number of threads, so bit-identical reruns on
another machine need the same count: ``run_info.json`` and ``summary.json`` record it.
"""

from __future__ import annotations

import os

import torch

__all__ = ["available_cores", "default_threads", "set_threads"]


def available_cores() -> int:
    """Cores this process may run on (its affinity mask, else the machine's count)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not on Linux
        return os.cpu_count() or 1


def default_threads(processes_at_once: int = 1, cores: int | None = None) -> int:
    """The thread count a run takes when the config leaves it open: its share of the cores."""
    cores = available_cores() if cores is None else cores
    return max(cores // max(processes_at_once, 1), 1)


def set_threads(requested: int | None, processes_at_once: int = 1) -> int:
    """Set torch's intra-op thread count for this process and return it (see the module docstring)."""
    if requested is not None:
        if requested < 1:
            raise ValueError(f"threads: a positive number of CPU threads, or null for the default; got {requested}")
        count = requested
    elif os.environ.get("OMP_NUM_THREADS"):
        count = torch.get_num_threads()  # the user's explicit choice, which torch read at start-up
    else:
        count = default_threads(processes_at_once * _local_ranks())
    torch.set_num_threads(count)
    return count


def _local_ranks() -> int:
    """Processes of a distributed launch on this node (torchrun and accelerate export it; 1 otherwise)."""
    return max(int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1), 1)
