"""The Hydra application: every config composes, typos fail, the CLI runs single jobs and sweeps, and the
W&B run it logs can be read back from its offline files."""

from __future__ import annotations

import importlib
import json
import os
import pkgutil
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.errors import ConfigCompositionException
from omegaconf import OmegaConf

import alignment
from alignment.config import Config
from alignment.hydra_app import register_configs
from tests.wandb_offline import find_offline_runs, read_offline_run

ROOT = Path(__file__).resolve().parent.parent
CONF = ROOT / "conf"
register_configs()


def group_options() -> list[tuple[str, str]]:
    # conf/accelerate holds accelerate's launch configs (accelerate launch --config_file ...), not Hydra's.
    return sorted((p.parent.name, p.stem) for p in CONF.glob("*/*.yaml") if p.parent.name != "accelerate")


def compose_config(overrides: list[str]):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose(config_name="config", overrides=overrides)


def home_experiment(group: str, option: str) -> str:
    """The experiment whose world has this dataset, model or scorer option (a tabular model fits the tabular
    world only, alpaca-7b the paper's, ...); the toy world for the other groups."""
    for path in sorted((CONF / "experiment").glob("*.yaml")):
        if f"override /{group}: {option}" in path.read_text():
            return path.stem
    return "toy"


@pytest.mark.fast
@pytest.mark.parametrize(("group", "option"), group_options())
def test_every_config_option_composes_and_converts(group, option):
    # In a world the option belongs to: the groups must fit together (tests/test_faults_config.py tries every
    # combination of dataset, model and scorer).
    cfg = compose_config([f"{group}={option}"] + ([] if group == "experiment" else
                                                  [f"experiment={home_experiment(group, option)}"]))
    obj = OmegaConf.to_object(cfg)
    assert isinstance(obj, Config)


@pytest.mark.fast
def test_every_module_imports():
    for info in pkgutil.walk_packages(alignment.__path__, "alignment."):
        importlib.import_module(info.name)


@pytest.mark.fast
@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("safety.margni=0.3", "margni"),  # typo in a key
        ("trainer.lr=fast", "lr"),  # wrong type
        ("algorithm.pairs_per_prompt=1.5", "pairs_per_prompt"),
        ("dataset=nonexistent", "nonexistent"),
    ],
)
def test_bad_overrides_fail_naming_the_key(override, message):
    with pytest.raises(ConfigCompositionException, match=message):
        compose_config([override])


@pytest.mark.fast
@pytest.mark.parametrize(
    "overrides,message",
    [
        (["algorithm.beta=-1"], "algorithm.beta"),
        (["safety.margin=[0.1,0.2]"], "safety.margin"),
        (["algorithm.objective=listwize"], "algorithm.objective"),
        (["algorithm.objective=listwise", "algorithm.pair_source=dataset"], "pair_source=samples"),
        (["algorithm.mass_anchor=-1"], "algorithm.mass_anchor"),
        (["algorithm.objective=pairwise", "algorithm.mass_anchor=1"], "objective=listwise"),
        (["threads=0"], "threads"),
        (["eval.insample_samples=-1"], "eval.insample_samples"),
        (["eval.level=95"], "eval.level"),
    ],
)
def test_invalid_values_fail_at_conversion_naming_the_field(overrides, message):
    with pytest.raises(Exception, match=message):
        OmegaConf.to_object(compose_config(overrides))


def _run_cli(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "WANDB_MODE": "offline", "WANDB_SILENT": "true", "HYDRA_FULL_ERROR": "1"}
    return subprocess.run([sys.executable, str(ROOT / "run.py"), *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=300)


SMALL = ["experiment=tabular", "dataset.n_prompts=30", "sampling.num_samples=16", "algorithm.pairs_per_prompt=16", "trainer.epochs=5",
         "algorithm.dual.bootstrap=20", "eval.bootstrap=50"]


@pytest.mark.fast
def test_cli_single_run_logs_wandb_offline(tmp_path):
    out = _run_cli([*SMALL, "hydra.run.dir=run", "tracker.tags=[smoke]"], tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["status"] == "completed"
    assert "lambda*" in out.stdout + out.stderr and "held-out" in out.stdout + out.stderr
    # W&B's end-of-run dump is replaced by one line saying where the run is and how to upload it.
    assert "Run summary" not in out.stdout + out.stderr and "wandb sync" in out.stdout + out.stderr
    assert (tmp_path / "run" / ".hydra" / "config.yaml").exists()  # the resolved config is kept
    runs = find_offline_runs(tmp_path / "run")
    assert len(runs) == 1
    run = read_offline_run(runs[0])
    assert run.complete and run.job_type == "mocan" and run.tags == ["smoke"]
    assert run.config["safety"]["margin"] == 0.5 and run.config["algorithm"]["beta"] == 0.5
    assert run.summary["eval/reward_gain"] == pytest.approx(summary["eval/reward_gain"])
    assert run.summary["dual/lambda"] == pytest.approx(summary["dual/lambda"])
    logged_losses = [row["train/loss"] for row in run.history if "train/loss" in row]
    local = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert logged_losses == pytest.approx([r["train/loss"] for r in local if "train/loss" in r])
    # The dual curve's table and figure under their own keys: the summary keeps both (W&B keeps one per key).
    assert run.summary["dual/curve"]["_type"] == "table-file"
    assert run.summary["dual/curve_plot"]["_type"] == "image-file"
    # Per-constraint vectors also reach the history as scalars that W&B's panels can chart.
    (name,) = summary["constraints"]
    final = [row for row in run.history if f"eval/safety_gain/{name}" in row]
    assert final and final[-1][f"eval/safety_gain/{name}"] == pytest.approx(summary["eval/safety_gain"][0])
    assert run.summary[f"dual/lambda/{name}"] == pytest.approx(summary["dual/lambda"][0])
    assert run.summary[f"margin/{name}"] == 0.5 and run.exit_code == 0


# A multirun over margins (one folder and one W&B run per job, in one group) is checked on the sweep that
# tests/test_sweeps.py runs once for all its tests.


@pytest.mark.fast
def test_cli_rejects_typo_with_hydra_message(tmp_path):
    out = _run_cli(["safety.margni=0.3"], tmp_path)
    assert out.returncode != 0
    assert "margni" in out.stderr


def test_cli_multirun_runs_every_algorithm_with_the_same_keys(tmp_path):
    from alignment.algorithms import ALGORITHMS

    names = ",".join(ALGORITHMS)
    out = _run_cli(["-m", *SMALL, f"algorithm={names}", "algorithm.lam=0.9", "safety.margin=0.2", "algorithm.safe_rlhf.steps=5",
                    "algorithm.primal_dual.iterations=2", "hydra.sweep.dir=sweep"], tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    summaries = [json.loads((tmp_path / "sweep" / str(i) / "summary.json").read_text())
                 for i in range(len(ALGORITHMS))]
    assert [s["algorithm"] for s in summaries] == list(ALGORITHMS)
    assert all(s["status"] == "completed" for s in summaries)
    assert all(s["compute/training_runs"] is not None and "eval/safety_gain" in s for s in summaries)
    runs = [read_offline_run(p) for p in find_offline_runs(tmp_path / "sweep")]
    jobs = sorted(r.job_type for r in runs if r.job_type != "sweep-report")
    assert jobs == sorted(s["algorithm/label"] for s in summaries)


def test_sampling_backend_is_checked_before_any_work(tmp_path):
    with pytest.raises(Exception, match="sampling.backend"):
        OmegaConf.to_object(compose_config(["sampling.backend=vlm"]))
    import importlib.util

    if importlib.util.find_spec("vllm") is not None:
        pytest.skip("vLLM is installed here")
    done = _run_cli(["experiment=toy", "sampling.backend=vllm", "tracker=none", f"cache_dir={tmp_path / 'c'}",
                     f"hydra.run.dir={tmp_path / 'run'}"], tmp_path)
    assert done.returncode != 0
    assert "vLLM is not installed" in done.stderr and "pip install" in done.stderr
    # Nothing was computed or cached (the writability check of cache_dir may have made the empty folder).
    assert not any((tmp_path / "c").rglob("*"))
