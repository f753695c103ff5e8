"""torch's CPU threads per run: the config's count, the user's OMP_NUM_THREADS, or the world's default with
the cores divided among the jobs that run at once."""

from __future__ import annotations

import pytest
import torch
from omegaconf import OmegaConf

from alignment.hydra_app import _jobs_at_once
from alignment.threads import default_threads, set_threads

pytestmark = pytest.mark.fast


@pytest.fixture(autouse=True)
def _restore_threads():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def test_the_default_divides_the_cores_among_the_jobs_at_once():
    assert default_threads(cores=16) == 16
    assert default_threads(processes_at_once=4, cores=16) == 4
    assert default_threads(processes_at_once=3, cores=2) == 1  # never zero


def test_set_threads_takes_the_config_then_the_environment_then_the_default(monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    monkeypatch.setattr("alignment.threads.available_cores", lambda: 64)
    assert set_threads(3) == 3 and torch.get_num_threads() == 3
    assert set_threads(None, processes_at_once=32) == 2 and torch.get_num_threads() == 2
    torch.set_num_threads(1)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    assert set_threads(None) == 1  # the user's explicit choice is kept
    monkeypatch.delenv("OMP_NUM_THREADS")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "16")  # ranks of a CPU launch share the node's cores
    assert set_threads(None) == 4
    with pytest.raises(ValueError, match="threads"):
        set_threads(0)


def test_jobs_at_once_follow_the_launcher(monkeypatch):
    monkeypatch.setattr("os.cpu_count", lambda: 8)
    joblib = "hydra_plugins.hydra_joblib_launcher.joblib_launcher.JoblibLauncher"
    assert _jobs_at_once(OmegaConf.create({"_target_": joblib, "n_jobs": 2})) == 2
    assert _jobs_at_once(OmegaConf.create({"_target_": joblib, "n_jobs": -1})) == 8  # joblib: every core
    assert _jobs_at_once(OmegaConf.create({"_target_": joblib, "n_jobs": -2})) == 7
    basic = "hydra._internal.core_plugins.basic_launcher.BasicLauncher"
    assert _jobs_at_once(OmegaConf.create({"_target_": basic})) == 1
