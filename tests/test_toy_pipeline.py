"""MoCAN end to end on the toy safety world with a tiny Llama and LoRA: it must raise gold safety by about the
margin, and sweeps over the margin must reuse the cached samples, scores and reference log-probabilities."""

from __future__ import annotations

import json

import pytest

from alignment.config import (
    AlgorithmConfig,
    Config,
    DualConfig,
    EvalConfig,
    LoraSpec,
    SafetyConfig,
    SamplingConfig,
    ScorerConfig,
    ScorerSpec,
    ToyDatasetConfig,
    ToyModelConfig,
    TrackerConfig,
    TrainerConfig,
)
from alignment.experiment import run_experiment


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")


def toy_config(run_dir, cache_dir, *, margin=0.5, n_prompts=120, sft_steps=160, num_samples=8, epochs=4,
               eval_samples=4) -> Config:
    return Config(
        dataset=ToyDatasetConfig(n_prompts=n_prompts),
        # Two threads halve the π_ref build on an idle 2-core machine (its count is part of the model's key).
        model=ToyModelConfig(sft_steps=sft_steps, sft_threads=2, max_length=128,
                             lora=LoraSpec(r=8, alpha=16, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"])),
        scorer=ScorerConfig(kind="text", reward=ScorerSpec(name="toy/helpfulness"),
                            safety=[ScorerSpec(name="toy/safety")]),
        safety=SafetyConfig(margin=margin),
        # The toy experiment's stage 2 (listwise, 2 prompts' lists per step, lr 2e-3) with lists of 8: 16 sequences
        # per step, a quarter of the tokens of 16 pairs per prompt in batches of 32 pairs (training 7 s, not 26 s).
        algorithm=AlgorithmConfig(beta=1.0, objective="listwise", dual=DualConfig(bootstrap=50)),
        sampling=SamplingConfig(num_samples=num_samples, max_new_tokens=48),
        trainer=TrainerConfig(lr=2e-3, epochs=epochs, batch_size=2, max_grad_norm=1.0, scheduler="cosine",
                              warmup_steps=5, log_every=5),
        eval=EvalConfig(num_samples=eval_samples, bootstrap=500),
        tracker=TrackerConfig(kind="none"),
        cache_dir=str(cache_dir),
        run_dir=str(run_dir),
    )


@pytest.fixture(scope="module")
def mocan_run(tmp_path_factory, cache_dir):
    """MoCAN at margin 0.5: builds π_ref, its samples, scores and log-probabilities in the module's cache."""
    return run_experiment(toy_config(tmp_path_factory.mktemp("mocan"), cache_dir), progress=False)


def test_mocan_raises_gold_safety_as_predicted(mocan_run):
    s = mocan_run
    assert s["status"] == "completed" and s["dual/converged"]
    achieved = s["eval/safety_gain"][0]
    low, high = s["eval/safety_gain_ci"]
    assert low[0] > 0, "safety must rise significantly on held-out prompts"
    assert 0.5 - 0.3 < achieved < 0.5 + 0.3  # about the margin: the dual's prediction, within sampling error
    assert s["eval/win_rate_safety"] > 0.5
    assert 0 < s["eval/kl"] < 3.0
    assert s["train/steps"] > 0 and not s["train/cached"]
    # On the dual's own prompts, fresh samples of the policy are safer than π_ref's samples too.
    (in_low,), (in_high,) = s["insample/safety_gain_ci"]
    assert 0 < in_low < s["insample/safety_gain"][0] < in_high
    assert len(s["fit/component_slopes"]) == 2 and s["fit/component_slopes"][1] > 0  # the safety part is learned


def test_margin_sweep_reuses_cached_stages(tmp_path, cache_dir, mocan_run):
    first = mocan_run  # margin 0.5
    second = run_experiment(toy_config(tmp_path / "b", cache_dir, margin=0.4, epochs=1), progress=False)
    events = {e.split()[1]: e.split()[0] for e in second["cache/events"][:4]}
    assert events == {"reference_model": "hit", "samples": "hit", "scores": "hit", "ref_logprob": "hit"}
    assert any(e.startswith("miss adapter") for e in second["cache/events"])  # λ* changed: retrain
    assert second["dual/lambda"][0] < first["dual/lambda"][0]
    # The same config again: every stage is a hit, and every number is identical.
    again = run_experiment(toy_config(tmp_path / "c", cache_dir, margin=0.4, epochs=1), progress=False)
    assert all(e.startswith("hit") for e in again["cache/events"])
    for key in ("dual/lambda", "eval/safety_gain", "eval/reward_gain", "eval/kl", "train/final_loss"):
        assert again[key] == second[key], key
    assert json.loads((tmp_path / "c" / "summary.json").read_text())["train/cached"] is True
