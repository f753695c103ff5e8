"""Running one experiment across processes (``accelerate launch`` / ``torchrun``): who computes, who writes.

    accelerate launch --config_file conf/accelerate/ddp_8gpu.yaml run.py experiment=paper   # one node, 8 GPUs
    accelerate launch --config_file conf/accelerate/ddp_2cpu.yaml run.py model.device=cpu  # 2 CPU processes

    accelerate launch --config_file conf/accelerate/zero2_8gpu.yaml run.py ...  # DeepSpeed ZeRO-2 (also fsdp_*)

How the training loop works under DDP, FSDP and DeepSpeed ZeRO: ``alignment/engines.py``.

The rules every rank follows:

* **Every rank runs the same code**, so every rank reaches the same cache lookups in the same order.
* **Cached stages (samples, scores, log-probabilities) are computed by rank 0 only**: the other ranks wait at a
  barrier and then read rank 0's published entry from the shared cache (``ArtifactStore`` does this).
* **Training is collective**: all ranks run the one training loop under ``accelerate``; each rank takes its
  share of every *global* batch (``trainer.batch_size`` pairs), gradients are averaged, so the update equals
  a single process's on the same global batch. Only rank 0 publishes the adapter and writes checkpoints.
* **Only rank 0 writes outputs and talks to trackers**; the other ranks run in a scratch directory with
  Hydra's own files and logging switched off (``run.py`` does this before Hydra parses the command line).

The state is read from the launcher's environment (RANK, WORLD_SIZE, LOCAL_RANK); a plain ``python run.py``
is rank 0 of 1 and none of this costs anything.
"""

from __future__ import annotations

import atexit
import datetime
import os
import shutil
import tempfile
from dataclasses import dataclass

import torch

__all__ = ["Distributed", "accelerate_cpu", "adopt_job_tasks", "current", "engine_from_env", "launcher_argv",
           "release", "scratch_run_dir", "setup"]

# Rank 0 may sample and score for a long time while the others wait at a barrier; the default 30 minutes of
# torch.distributed is too short for the paper's 128 samples of 1,000 prompts from a 7B model.
BARRIER_TIMEOUT = datetime.timedelta(hours=12)


@dataclass(frozen=True)
class Distributed:
    """This process's place in the launch: rank r of world_size processes (rank 0 of 1 when not launched)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    def barrier(self) -> None:
        if self.enabled:
            torch.distributed.barrier()

    def sum(self, values: list[float]) -> list[float]:
        """Element-wise sum over ranks (float64), e.g. per-rank loss sums into the global batch's."""
        if not self.enabled:
            return list(values)
        tensor = torch.tensor(values, dtype=torch.float64)
        torch.distributed.all_reduce(tensor)
        return tensor.tolist()

    def sum_counts(self, counts: dict[str, int]) -> dict[str, int]:
        """Integer counts summed over ranks, by name (e.g. the compute each rank counted for its own share)."""
        names = list(counts)
        return {name: round(total) for name, total in zip(names, self.sum([float(counts[n]) for n in names]))}

    def shard(self, n: int) -> slice:
        """This rank's contiguous share of n items (the first n mod world_size ranks take one more)."""
        base, extra = divmod(n, self.world_size)
        start = self.rank * base + min(self.rank, extra)
        return slice(start, start + base + (self.rank < extra))

    def device(self, configured: str) -> str:
        """The device this rank uses: ``cuda`` becomes this rank's own GPU, anything else is kept."""
        if self.enabled and configured.split(":")[0] == "cuda":
            return f"cuda:{self.local_rank}"
        return configured


def _from_env() -> Distributed:
    return Distributed(rank=int(os.environ.get("RANK", 0)), world_size=int(os.environ.get("WORLD_SIZE", 1)),
                       local_rank=int(os.environ.get("LOCAL_RANK", 0)))


_state: Distributed | None = None


def current() -> Distributed:
    """The process's distributed state (from the environment until :func:`setup` has run)."""
    return _state if _state is not None else _from_env()


def engine_from_env(environ: dict[str, str] | None = None) -> str:
    """The engine ``accelerate launch`` was configured with: ``fsdp``, ``deepspeed`` or ``ddp``."""
    environ = os.environ if environ is None else environ
    for name, flag in (("fsdp", "ACCELERATE_USE_FSDP"), ("deepspeed", "ACCELERATE_USE_DEEPSPEED")):
        if environ.get(flag, "false").lower() == "true":
            return name
    return "ddp"


def _sharded_engine_on_cpu(device_type: str) -> bool:
    return device_type == "cpu" and engine_from_env() != "ddp"


def accelerate_cpu(device_type: str) -> bool:
    """The ``cpu`` flag for ``accelerate``'s state: True for CPU processes, except where FSDP or DeepSpeed run
    on CPUs (see :func:`setup`), which accelerate only drives as a non-CPU launch."""
    return device_type == "cpu" and not (current().enabled and _sharded_engine_on_cpu(device_type))


def setup(device: str) -> Distributed:
    """Join the process group the launcher prepared (gloo on CPUs, NCCL on GPUs), once per process.

    Goes through ``accelerate.PartialState`` so that the user's ``accelerate`` config (DDP, FSDP, DeepSpeed)
    applies to the :class:`accelerate.Accelerator` the training loop builds.

    On CPUs, accelerate treats a launch as MPI-style multi-CPU and would ignore an FSDP or DeepSpeed config.
    Both engines run over gloo on CPUs (that is how ``tests/test_distributed.py`` checks them), so such a launch
    joins gloo as a non-CPU launch, and for FSDP is labelled multi-device so that accelerate applies the
    config. GPU launches are untouched.
    """
    global _state
    env = _from_env()
    if env.enabled and not torch.distributed.is_initialized():
        from accelerate import PartialState
        from accelerate.utils import DistributedType

        engine, device_type = engine_from_env(), device.split(":")[0]
        if _sharded_engine_on_cpu(device_type):
            if engine == "deepspeed":
                import deepspeed.ops

                # DeepSpeed's CPU backend would JIT-compile a shared-memory all-reduce kernel on first use
                # (90 s on 2 cores, and a C++ compiler); gloo does the same job for training's reductions.
                # DeepSpeed keeps this table for the process precisely so that such edits persist.
                deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
            state = PartialState(cpu=False, backend="gloo", timeout=BARRIER_TIMEOUT)
            if engine == "fsdp":
                state.distributed_type = DistributedType.MULTI_GPU
        else:
            PartialState(cpu=device_type == "cpu", timeout=BARRIER_TIMEOUT)
    _state = env
    return env


def release() -> bool:
    """End the collective part of a run (training): every rank meets once more, the process group is closed,
    and rank 0 carries on alone (evaluation, outputs, trackers). Returns whether this process carries on."""
    global _state
    dist = current()
    if not dist.enabled:
        return True
    if torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
    _state = Distributed(rank=dist.rank, world_size=1, local_rank=dist.local_rank)
    return dist.is_main


def adopt_job_tasks(environ: dict[str, str] | None = None) -> bool:
    """Under a scheduler job of several tasks (Slurm through hydra-submitit-launcher with
    ``hydra.launcher.tasks_per_node`` > 1, or its local twin), make the tasks the ranks of one launch.

    submitit runs the Hydra job in every task but sets no torch variables; its
    ``TorchDistributedEnvironment`` exports RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT from the
    job's own. A launch that already set RANK (accelerate, torchrun) is left alone. Returns whether this
    process became a rank of a multi-task job (the tasks share one Hydra output folder: see ``run.py``).
    """
    environ = os.environ if environ is None else environ
    if "RANK" in environ:
        return False
    try:
        from submitit import JobEnvironment
        from submitit.helpers import TorchDistributedEnvironment
    except ImportError:
        return False
    try:
        tasks = JobEnvironment().num_tasks
    except RuntimeError:  # not inside a submitit job
        return False
    if tasks <= 1:
        return False
    # CUDA_VISIBLE_DEVICES is left as the scheduler set it; ranks pick cuda:LOCAL_RANK (Distributed.device).
    TorchDistributedEnvironment().export(set_cuda_visible_devices=False)
    return True


def scratch_run_dir(rank: int) -> str:
    """A private run folder for a rank > 0, deleted when the process exits: its outputs are rank 0's."""
    scratch = os.path.join(tempfile.gettempdir(), "alignment-ranks", f"rank{rank}-{os.getpid()}")
    os.makedirs(scratch, exist_ok=True)
    atexit.register(shutil.rmtree, scratch, ignore_errors=True)  # nothing of a rank > 0 outlives it
    return scratch


def launcher_argv(argv: list[str], environ: dict[str, str] | None = None) -> list[str]:
    """The command line Hydra should parse in this process, given the launcher's.

    Two traps of running Hydra under a distributed launcher are handled here:

    * ``python -m torch.distributed.launch`` (the deprecated launcher) appends ``--local_rank=N`` (or
      ``--local-rank N``), which Hydra would reject as an unknown argument: it is removed and exported as
      LOCAL_RANK, as torchrun and accelerate do.
    * Every rank would otherwise resolve ``hydra.run.dir`` (a timestamp: ranks can straddle a second), create
      it and write ``.hydra/`` and a log there. Ranks other than 0 get a scratch run directory, no Hydra
      output files and no file logging; rank 0's folder is the run's only output.
    """
    environ = os.environ if environ is None else environ
    out: list[str] = []
    skip = False
    for i, arg in enumerate(argv):
        if skip:
            skip = False
            continue
        if arg.startswith(("--local_rank=", "--local-rank=")):
            environ.setdefault("LOCAL_RANK", arg.split("=", 1)[1])
            continue
        if arg in ("--local_rank", "--local-rank") and i + 1 < len(argv):
            environ.setdefault("LOCAL_RANK", argv[i + 1])
            skip = True
            continue
        out.append(arg)
    rank = int(environ.get("RANK", 0))
    if rank > 0:
        if any(a in ("-m", "--multirun") for a in out):
            raise SystemExit("run.py: a multirun cannot be launched under accelerate/torchrun; launch each job "
                             "with its own `accelerate launch` (hydra/launcher=slurm does, see docs/scaling-out.md)")
        scratch = scratch_run_dir(rank)
        out += [f"hydra.run.dir={scratch}", "hydra.output_subdir=null", "hydra/job_logging=disabled",
                "hydra/hydra_logging=disabled"]
    return out
