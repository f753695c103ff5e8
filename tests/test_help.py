"""`python run.py --help`: the app's own page (conf/hydra/help/app.yaml), checked against conf/ so that it cannot
go stale: every group and option a user may pick is listed, with the right defaults and worlds, and nothing
else (no ConfigStore schemas such as base_hf, no conf/accelerate as a group, no config dump)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from omegaconf import OmegaConf

ROOT = Path(__file__).resolve().parent.parent
CONF = ROOT / "conf"
# conf/accelerate holds accelerate's launch configs (accelerate launch --config_file ...), not a Hydra group.
NOT_GROUPS = {"accelerate", "hydra"}
HYDRA_GROUPS = ["hydra/launcher"]  # this repo's options of Hydra's own groups
WORLD_GROUPS = ["dataset", "model", "scorer", "trainer"]  # the columns of the worlds table


def options(group: str) -> set[str]:
    return {p.stem for p in (CONF / group).glob("*.yaml")}


def user_groups() -> list[str]:
    return sorted(p.name for p in CONF.iterdir() if p.is_dir() and p.name not in NOT_GROUPS) + HYDRA_GROUPS


def _defaults(path: Path) -> dict[str, str]:
    """group -> option of a config's defaults list, overrides included ('override /dataset: toy')."""
    out = {}
    for entry in OmegaConf.to_container(OmegaConf.load(path)).get("defaults", []):
        if isinstance(entry, dict):
            for key, value in entry.items():
                out[key.removeprefix("override ").strip("/")] = value
    return out


def world_choices(experiment: str) -> dict[str, str]:
    """The options an experiment picks: the primary config's defaults with the experiment's overrides."""
    return {**_defaults(CONF / "config.yaml"), "experiment": experiment,
            **_defaults(CONF / "experiment" / f"{experiment}.yaml")}


def section(text: str, title: str) -> list[str]:
    """The indented lines under the '== <title>...' heading."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(f"== {title}"))
    body = []
    for line in lines[start + 1:]:
        if not line.startswith("  "):
            break
        body.append(line.strip())
    return body


@pytest.fixture(scope="module")
def help_text(tmp_path_factory) -> str:
    env = {**os.environ, "WANDB_MODE": "offline", "WANDB_SILENT": "true", "HYDRA_FULL_ERROR": "1"}
    proc = subprocess.run([sys.executable, str(ROOT / "run.py"), "--help"], cwd=tmp_path_factory.mktemp("help"),
                          env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def test_help_says_what_the_harness_does_and_how_to_run_it(help_text):
    first = help_text.splitlines()[0]
    assert first.startswith("run.py: safety-constrained alignment of language models"), first
    assert "Usage: python run.py [group=option ...] [key=value ...]" in help_text
    commands = [line.split("  ")[0] for line in section(help_text, "Commands")]
    assert commands == ["python run.py", "python run.py experiment=toy",
                        "python run.py experiment=tabular safety.margin=0.3", "python run.py sweeps=margins",
                        "python -m alignment.report <sweep dir>", "python -m alignment.figures <sweep dir>",
                        "make test"]
    assert (ROOT / "alignment" / "report.py").is_file() and (ROOT / "alignment" / "figures.py").is_file()
    assert re.search(r"^test:", (ROOT / "Makefile").read_text(), re.M)
    assert "python run.py --hydra-help" in help_text


def test_help_lists_every_group_and_option_a_user_may_pick(help_text):
    listed = {}
    for line in section(help_text, "Groups"):
        group, rest = line.split(maxsplit=1)
        listed[group] = [o.strip() for o in rest.split("  ")[0].split(",")]
    assert sorted(listed) == sorted(user_groups())
    default = world_choices(_defaults(CONF / "config.yaml")["experiment"])  # the default experiment's picks
    for group in user_groups():
        assert set(listed[group]) == options(group), group
        assert len(listed[group]) == len(set(listed[group])), group
        if group in default and default[group] is not None:
            assert listed[group][0] == default[group], f"{group}: the first option is not the default"
    assert "sweeps" in default and default["sweeps"] is None and "none by default" in help_text


def test_help_worlds_table_matches_the_experiments(help_text):
    rows = {row.split()[0]: row.split()[1:1 + len(WORLD_GROUPS)] for row in section(help_text, "Worlds")}
    assert set(rows) == options("experiment")
    for experiment, picked in rows.items():
        choices = world_choices(experiment)
        assert picked == [choices[g] for g in WORLD_GROUPS], experiment


def test_help_shows_no_schemas_no_config_dump_and_accelerate_as_launch_configs(help_text):
    assert "base_" not in help_text  # the ConfigStore's schemas (base_algorithm, base_hf, ...) are not choices
    assert len(help_text.splitlines()) < 80
    assert "== Config ==" not in help_text and "name_or_path" not in help_text and "cache_dir" not in help_text
    assert "accelerate:" not in help_text and "accelerate=" not in help_text
    assert "accelerate launch --config_file conf/accelerate/<name>.yaml run.py" in help_text
    names = next(line for line in help_text.splitlines() if line.strip().startswith("<name>:"))
    assert set(re.findall(r"\w+", names.split(":", 1)[1])) == options("accelerate")
    assert all(len(line) <= 110 for line in help_text.splitlines())
