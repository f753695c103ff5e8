"""A quiet log: library noise silenced at its source (alignment/console.py), the run's own lines kept."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.fast
ROOT = Path(__file__).resolve().parents[1]

# Saving a model imports deepspeed through accelerate (its CPU warning) and draws transformers' shard bar.
SAVE = """
import sys
{quiet}
from transformers import LlamaConfig, LlamaForCausalLM
LlamaForCausalLM(LlamaConfig(vocab_size=32, hidden_size=8, intermediate_size=16, num_hidden_layers=1,
                             num_attention_heads=2, num_key_value_heads=2)).save_pretrained(sys.argv[1])
"""


def _save_output(tmp_path: Path, quiet: bool) -> str:
    code = SAVE.format(quiet="from alignment.console import quiet_libraries; quiet_libraries()" if quiet else "")
    env = {k: v for k, v in os.environ.items() if k not in ("DS_ACCELERATOR", "HF_HUB_DISABLE_PROGRESS_BARS")}
    done = subprocess.run([sys.executable, "-c", code, str(tmp_path / f"m{quiet}")], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout + done.stderr


def test_library_noise_is_silenced_at_its_source(tmp_path):
    loud, quiet = _save_output(tmp_path, quiet=False), _save_output(tmp_path, quiet=True)
    assert "Setting accelerator to CPU" in loud and "Writing model shards" in loud  # what a user saw before
    assert "Setting accelerator to CPU" not in quiet and "Writing model shards" not in quiet


def test_the_report_prints_the_fit_under_the_gains():
    from alignment.experiment import COMMON_KEYS, format_report

    summary = {**dict.fromkeys(COMMON_KEYS), "algorithm": "mocan", "margin": [0.5], "beta": 1.0,
               "eval/safety_gain": [0.3], "eval/reward_gain": 0.1, "eval/kl": 0.4, "eval/constraint_met": False,
               "fit/target_kl": 0.0653, "fit/slope": 0.83, "fit/corr": 0.929}
    lines = format_report(summary).splitlines()
    fit = next(i for i, line in enumerate(lines) if line.startswith("fit to π_λ"))
    assert "0.0653" in lines[fit] and "slope 0.830" in lines[fit] and "corr 0.929" in lines[fit]
    assert lines[fit - 1].startswith("KL")
    assert not any(line.startswith("fit to") for line in format_report({**summary, "fit/target_kl": None})
                   .splitlines())


def test_the_report_sets_predicted_in_sample_and_held_out_gains_side_by_side():
    from alignment.experiment import COMMON_KEYS, format_report

    summary = {**dict.fromkeys(COMMON_KEYS), "algorithm": "mocan", "margin": [0.5], "beta": 1.0,
               "predicted/safety_gain": [0.5], "predicted/safety_gain_ci": [[0.41], [0.58]],
               "insample/safety_gain": [0.44], "insample/safety_gain_ci": [[0.40], [0.48]],
               "eval/safety_gain": [0.3], "eval/safety_gain_ci": [[0.2], [0.4]],
               "predicted/reward_gain": 0.1, "insample/reward_gain": 0.05, "eval/reward_gain": 0.02,
               "eval/kl": 0.4, "eval/constraint_met": False}
    lines = format_report(summary).splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("safety gain"))
    assert [line[13:23].strip() for line in lines[start:start + 3]] == ["predicted", "in-sample", "held-out"]
    assert "[0.4400]  95% CI [0.4000, 0.4800]" in lines[start + 1]
    assert lines[start + 3].startswith("reward gain") and "in-sample [0.0500]" in lines[start + 4]
    # Runs without the in-sample measurement (eval.insample_samples=0, π_ref) print the other two.
    without = format_report({**summary, "insample/safety_gain": None, "insample/reward_gain": None}).splitlines()
    assert not any("in-sample" in line for line in without) and without[start + 1][13:23].strip() == "held-out"
