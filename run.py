"""Entry point: compose the config with Hydra, convert it once to typed dataclasses, run, report.

    python run.py                                  # the default experiment
    python run.py experiment=tabular safety.margin=0.3
    python run.py -m safety.margin=0.1,0.3,0.5     # a sweep, one output folder per job
    python run.py sweeps=margins                   # a named sweep from sweeps/ (resumable)
    accelerate launch --multi_gpu --num_processes 8 run.py experiment=paper   # training on 8 processes
    python run.py -m ... hydra/launcher=slurm hydra.launcher.tasks_per_node=8   # 8 ranks per Slurm job
"""

from __future__ import annotations

import logging
import sys

import hydra
from omegaconf import DictConfig, OmegaConf

from alignment import distributed
from alignment.config import Config
from alignment.experiment import format_report, run_experiment
from alignment.hydra_app import hydra_run_context, register_configs
from alignment.jobs import run_sweep_job
from alignment.sweep import sweep_group

log = logging.getLogger("run")
register_configs()


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(dcfg: DictConfig) -> None:
    context = hydra_run_context()
    dcfg.run_dir = context["output_dir"]
    if distributed.adopt_job_tasks() and distributed.current().rank > 0:
        # The tasks of a multi-task Slurm job share Hydra's job folder; it is rank 0's alone.
        dcfg.run_dir = distributed.scratch_run_dir(distributed.current().rank)
    resolved = OmegaConf.to_container(dcfg, resolve=True)
    cfg: Config = OmegaConf.to_object(dcfg)
    if context["multirun"]:
        summary = run_sweep_job(cfg, resolved, group=sweep_group(context["sweep_dir"]),
                                processes_at_once=context["jobs_at_once"])
    else:
        summary = run_experiment(cfg, resolved_config=resolved)
    if summary is not None and distributed.current().is_main:
        log.info("outputs: %s\n%s", cfg.run_dir, format_report(summary))


if __name__ == "__main__":
    # Under a distributed launcher: strip torch.distributed.launch's --local_rank, and keep ranks > 0 out of
    # the outputs folder (alignment/distributed.py explains both).
    sys.argv = distributed.launcher_argv(sys.argv)
    main()
