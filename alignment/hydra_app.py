"""The Hydra application's glue: the schemas' registration with the ConfigStore, the run context of a job, and
the callback that reports a multirun when it ends.

This is the only module of the package that imports Hydra. ``run.py`` calls ``register_configs`` before
composing, converts the composed config once with ``OmegaConf.to_object`` into the typed dataclasses of
alignment/config.py, and passes the rest of the package plain typed objects and the plain dict of
``hydra_run_context``; ``conf/config.yaml`` names ``SweepReport`` under ``hydra.callbacks``.
"""

from __future__ import annotations

import logging
import os
import sys
from typing import Any

from hydra.core.config_store import ConfigStore
from hydra.core.hydra_config import HydraConfig
from hydra.experimental.callback import Callback
from hydra.types import RunMode

from alignment.config import (
    AlgorithmConfig,
    Config,
    HFModelConfig,
    PreferenceDatasetConfig,
    PromptSetsDatasetConfig,
    SafetyConfig,
    ScorerConfig,
    TabularDatasetConfig,
    TabularModelConfig,
    ToyDatasetConfig,
    ToyModelConfig,
    TrackerConfig,
    TrainerConfig,
)
from alignment.report import report_sweep
from alignment.sweep import sweep_group

# ----------------------------------------------------------------------------------------------------------
# Registration


def register_configs() -> None:
    """Register every schema with Hydra's ConfigStore (called once, by run.py, before composition)."""
    cs = ConfigStore.instance()
    cs.store(name="base_config", node=Config)
    cs.store(group="dataset", name="base_tabular", node=TabularDatasetConfig)
    cs.store(group="dataset", name="base_toy", node=ToyDatasetConfig)
    cs.store(group="dataset", name="base_preferences", node=PreferenceDatasetConfig)
    cs.store(group="dataset", name="base_prompts", node=PromptSetsDatasetConfig)
    cs.store(group="model", name="base_tabular", node=TabularModelConfig)
    cs.store(group="model", name="base_toy", node=ToyModelConfig)
    cs.store(group="model", name="base_hf", node=HFModelConfig)
    cs.store(group="scorer", name="base_scorer", node=ScorerConfig)
    cs.store(group="safety", name="base_safety", node=SafetyConfig)
    cs.store(group="algorithm", name="base_algorithm", node=AlgorithmConfig)
    cs.store(group="trainer", name="base_trainer", node=TrainerConfig)
    cs.store(group="tracker", name="base_tracker", node=TrackerConfig)


# ----------------------------------------------------------------------------------------------------------
# The job's context


def hydra_run_context() -> dict[str, Any]:
    """Where Hydra put this job and whether it is part of a multirun (for output paths and W&B groups)."""
    hc = HydraConfig.get()
    multirun = hc.mode == RunMode.MULTIRUN
    return {
        "output_dir": hc.runtime.output_dir,
        "multirun": multirun,
        "jobs_at_once": _jobs_at_once(hc.launcher) if multirun else 1,
        "sweep_dir": hc.sweep.dir if multirun else None,
        "job_num": hc.job.num if multirun else None,
        "overrides": list(hc.overrides.task),
    }


def _jobs_at_once(launcher: Any) -> int:
    """How many jobs of a multirun the launcher runs at once on one machine's cores: joblib's ``n_jobs``
    (-1: every core), 1 for a job of submitit (it has ``cpus_per_task`` cores of its own, which its CPU
    affinity shows) and for the basic launcher (one job after another)."""
    target = str(launcher.get("_target_", ""))
    if "joblib" in target.lower():
        n_jobs = int(launcher.get("n_jobs") or -1)
        cores = os.cpu_count() or 1
        return n_jobs if n_jobs > 0 else max(cores + 1 + n_jobs, 1)  # joblib's rule for negative n_jobs
    return 1


# ----------------------------------------------------------------------------------------------------------
# The sweep callback


class SweepReport(Callback):
    """Hydra callback (``hydra.callbacks`` in conf/config.yaml): when a multirun ends, aggregate its jobs into
    results.csv, Pareto fronts and a sweep-level W&B run (alignment/report.py), list the failed jobs and exit
    non-zero if there are any."""

    def on_multirun_end(self, config: Any, **kwargs: Any) -> None:
        log = logging.getLogger("sweep")
        sweep_dir = str(config.hydra.sweep.dir)
        tracker = config.tracker
        report = report_sweep(sweep_dir, tracker_kind=tracker.kind, project=tracker.project, entity=tracker.entity,
                              group=tracker.group or sweep_group(sweep_dir), mode=tracker.mode)
        log.info("sweep report: %s (%d jobs, %d reused, %d failed)", report.results_csv, report.jobs,
                 report.reused, len(report.failed))
        if report.failed:
            for job in report.failed:
                log.error("failed job: %s", job)
                print(f"failed job: {job}", file=sys.stderr)  # whatever the logging config of the last job
            sys.exit(1)
