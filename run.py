"""Entry point: compose the config with Hydra, convert it once to typed dataclasses, run, report.

    python run.py                                  # the default experiment
    python run.py experiment=tabular safety.margin=0.3
    python run.py -m safety.margin=0.1,0.3,0.5     # a sweep, one output folder per job
"""

from __future__ import annotations

import logging

import hydra
from omegaconf import DictConfig, OmegaConf

from alignment.config import Config, hydra_run_context, register_configs
from alignment.experiment import format_report, run_experiment

log = logging.getLogger("run")
register_configs()


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(dcfg: DictConfig) -> None:
    context = hydra_run_context()
    dcfg.run_dir = context["output_dir"]
    resolved = OmegaConf.to_container(dcfg, resolve=True)
    cfg: Config = OmegaConf.to_object(dcfg)
    group = None
    if context["multirun"]:
        group = "sweep-" + context["sweep_dir"].strip("/").replace("/", "-").removeprefix("outputs-multirun-")
    summary = run_experiment(cfg, resolved_config=resolved, group=group)
    log.info("outputs: %s\n%s", cfg.run_dir, format_report(summary))


if __name__ == "__main__":
    main()
