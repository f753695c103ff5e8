"""MoCAN end to end on the exactly solvable tabular world."""

from __future__ import annotations

import json

import numpy as np
import pytest

from alignment.algorithms import InfeasibleMarginError
from alignment.config import (
    AlgorithmConfig,
    Config,
    DualConfig,
    SafetyConfig,
    SamplingConfig,
    ScorerConfig,
    TabularDatasetConfig,
    TabularModelConfig,
    TrackerConfig,
    TrainerConfig,
)
from alignment.dual import solve_dual
from alignment.experiment import run_experiment
from alignment.worlds.tabular import TabularPolicy, make_tables


def tabular_config(tmp_path, *, margin=0.5, exact=False, seed=0, labels="soft", n_prompts=120,
                   num_samples=128, pairs_per_prompt=128, epochs=100, objective="pairwise",
                   batch_size=2048) -> Config:
    return Config(
        dataset=TabularDatasetConfig(n_prompts=n_prompts),
        model=TabularModelConfig(),
        scorer=ScorerConfig(),
        safety=SafetyConfig(margin=margin),
        algorithm=AlgorithmConfig(beta=0.5, labels=labels, pairs_per_prompt=pairs_per_prompt,
                                  dual=DualConfig(bootstrap=100), objective=objective),
        sampling=SamplingConfig(num_samples=num_samples, exact=exact),
        trainer=TrainerConfig(lr=0.3, epochs=epochs, batch_size=batch_size, scheduler="cosine"),
        tracker=TrackerConfig(kind="none"),
        seed=seed,
        run_dir=str(tmp_path),
    )


def test_exact_mocan_reaches_the_closed_form_optimum(tmp_path):
    """Exact lists: λ* is the population multiplier and stage 2 must land on π_λ* itself."""
    s = run_experiment(tabular_config(tmp_path, exact=True), progress=False)
    world = make_tables(120, 16, 1, 0.6, 1.0, 0)
    truth = solve_dual(world.reward, world.safety, 0.5, 0.5, ref_logprob=world.ref_logits)
    np.testing.assert_allclose(s["dual/lambda"], truth.lam, rtol=1e-9)
    assert s["eval/tv_to_target"] < 2e-3
    assert s["eval/safety_gain"][0] == pytest.approx(0.5, abs=5e-3)  # the active constraint holds
    assert s["eval/reward_gain"] == pytest.approx(s["predicted/reward_gain"], abs=5e-3)
    assert s["eval/kl"] == pytest.approx(s["predicted/kl"], abs=5e-3)
    assert s["eval/constraint_met"]
    # The fit diagnostics see the same: TV < 2e-3 to π_λ* bounds KL(π_λ* ‖ π) to O(TV²) on these 16 candidates
    # (Pinsker's reverse needs min π > 0, which the logits policy has), and the log-ratio tracks r_λ/β.
    assert s["fit/target_kl"] < 1e-3
    assert s["fit/slope"] == pytest.approx(1.0, abs=0.02) and s["fit/corr"] > 0.999
    # An exact list is the whole support: the policy's mass on it is 1 (log 0), whatever the fit, up to float64
    # rounding of a 16-term log-sum-exp.
    assert s["fit/log_mass"] == pytest.approx(0.0, abs=1e-12)
    # In-sample gains are exact expectations on the dual's prompts, which here are the evaluation's prompts:
    # the same sums as eval/* in another order (float64, 120 x 16 terms of O(1): agreement far inside 1e-12).
    assert s["insample/safety_gain"][0] == pytest.approx(s["eval/safety_gain"][0], abs=1e-12)
    assert s["insample/reward_gain"] == pytest.approx(s["eval/reward_gain"], abs=1e-12)
    (lo,), (hi,) = s["insample/safety_gain_ci"]
    assert lo < s["insample/safety_gain"][0] < hi


@pytest.mark.parametrize("objective", ["listwise", "all_pairs"])
def test_every_objective_reaches_the_closed_form_optimum(tmp_path, objective):
    """Exact lists: the listwise cross-entropy and DPO on all pairs both have π_λ* as their optimum."""
    # Listwise: one list of 16 candidates per prompt, 120 lists in batches of 40 for 100 epochs (300 steps).
    batch = 40 if objective == "listwise" else 2048
    s = run_experiment(tabular_config(tmp_path, exact=True, objective=objective, batch_size=batch), progress=False)
    assert s["train/pairs"] == (120 if objective == "listwise" else 120 * 16 * 15 // 2)
    assert s["eval/tv_to_target"] < 1e-3
    # The fit diagnostics agree. The gradient at a candidate is proportional to its target mass, so candidates
    # π_λ* gives almost nothing (down to 1e-6 here) are fitted last: their log-ratios still lag, which the slope
    # (weighted by π_ref) sees and the TV and the KL (weighted by π_λ*) barely do.
    assert s["fit/target_kl"] < 1e-3 and s["fit/slope"] == pytest.approx(1.0, abs=0.05) and s["fit/corr"] > 0.99
    assert s["eval/safety_gain"][0] == pytest.approx(0.5, abs=5e-3)


def test_sampled_mocan_meets_margin_within_intervals(tmp_path):
    """iid samples (the method as used on LMs): achieved gains agree with the dual's predictions within the
    bootstrap intervals; the trained policy is close to π_λ̂ (candidates unsampled by π_ref are the gap)."""
    s = run_experiment(tabular_config(tmp_path), progress=False)
    lo, hi = s["predicted/safety_gain_ci"]
    assert lo[0] <= s["eval/safety_gain"][0] <= hi[0]
    rlo, rhi = s["predicted/reward_gain_ci"]
    assert rlo <= s["eval/reward_gain"] <= rhi
    assert s["eval/safety_gain"][0] >= 0.5 - 0.05  # stated tolerance: sampling error of K = 128 samples
    assert s["eval/tv_to_target"] < 0.03
    assert s["eval/safety_gain"][0] > 0.4 and s["eval/reward_gain"] > 0  # moved the right way
    assert s["status"] == "completed"


@pytest.mark.fast
def test_summary_and_files(tmp_path):
    s = run_experiment(tabular_config(tmp_path, n_prompts=40, num_samples=32), progress=False)
    on_disk = json.loads((tmp_path / "summary.json").read_text())
    required = ["algorithm", "seed", "margin", "dual/lambda", "dual/converged", "dual/feasible",
                "dual/iterations", "predicted/safety_gain", "predicted/reward_gain", "predicted/kl",
                "eval/safety_gain", "eval/reward_gain", "eval/kl", "time/dual", "time/train", "time/sample",
                "time/score", "time/evaluate", "git/commit", "packages"]
    for key in required:
        assert key in on_disk, key
    assert on_disk["dual/lambda"] == s["dual/lambda"]
    assert isinstance(on_disk["margin"], list) and isinstance(on_disk["eval/safety_gain"], list)
    assert on_disk["packages"]["torch"]
    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    losses = [row["train/loss"] for row in lines if "train/loss" in row]
    assert len(losses) >= 5 and losses[-1] < losses[0]  # training curve logged and decreasing
    curve = json.loads((tmp_path / "tables" / "dual_curve.json").read_text())
    values = [row[2] for row in curve["rows"]]
    assert min(values) >= s["dual/value"] - 1e-9  # D is minimised at λ* along the logged curve
    assert (tmp_path / "figures" / "dual_curve_plot.pdf").exists()  # the table and the figure: distinct names
    assert json.loads((tmp_path / "run_info.json").read_text())["seed"] == 0


def test_same_seed_same_numbers_and_seed_changes_samples(tmp_path):
    a = run_experiment(tabular_config(tmp_path / "a", n_prompts=40, num_samples=32), progress=False)
    b = run_experiment(tabular_config(tmp_path / "b", n_prompts=40, num_samples=32), progress=False)
    c = run_experiment(tabular_config(tmp_path / "c", n_prompts=40, num_samples=32, seed=1), progress=False)
    for key in ("dual/lambda", "eval/safety_gain", "eval/reward_gain", "train/final_loss"):
        assert a[key] == b[key]
    assert a["dual/lambda"] != c["dual/lambda"]


def test_sampled_labels_train_towards_the_same_target(tmp_path):
    """Bernoulli labels (the paper's MoCAN) have the soft loss as expectation: with many pairs per prompt the
    label frequencies approach p and training lands near π_λ̂, with more noise than soft labels."""
    s = run_experiment(tabular_config(tmp_path, labels="sampled", n_prompts=60, pairs_per_prompt=1024,
                                      epochs=30), progress=False)
    assert s["eval/tv_to_target"] < 0.15
    assert s["eval/safety_gain"][0] == pytest.approx(0.5, abs=0.15)


@pytest.mark.fast
def test_infeasible_margin_fails_clearly_and_records_status(tmp_path):
    with pytest.raises(InfeasibleMarginError, match="safety.margin.*reachable"):
        run_experiment(tabular_config(tmp_path, margin=50.0, n_prompts=20, num_samples=16), progress=False)
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["status"] == "infeasible" and summary["dual/feasible"] is False


@pytest.mark.fast
def test_policy_interface():
    world = make_tables(5, 4, 1, 0.5, 1.0, 0)
    policy = TabularPolicy(world.ref_logits)
    import torch

    g = torch.Generator().manual_seed(0)
    samples = policy.sample(torch.arange(5), 1000, g)
    assert samples.shape == (5, 1000)
    freq = torch.stack([(samples == k).float().mean(dim=1) for k in range(4)], dim=1)
    np.testing.assert_allclose(freq.numpy(), world.ref_probs(), atol=0.05)
    lp = policy.log_prob(torch.arange(5), samples[:, :3])
    torch.testing.assert_close(lp, policy.ref_log_prob(torch.arange(5), samples[:, :3]))


@pytest.mark.fast
def test_config_validation_names_the_field():
    with pytest.raises(ValueError, match="safety.margin"):
        SafetyConfig(margin=[0.1, 0.2], constraints=["a"])
    with pytest.raises(ValueError, match="safety.margin"):
        SafetyConfig(margin=float("nan"))
    with pytest.raises(ValueError, match="algorithm.beta"):
        AlgorithmConfig(beta=0.0)
    with pytest.raises(ValueError, match="algorithm.labels"):
        AlgorithmConfig(labels="hard")
    with pytest.raises(ValueError, match="sampling.num_samples"):
        SamplingConfig(num_samples=1)
    assert SafetyConfig(margin=0.3, constraints=["a", "b"]).margins == (0.3, 0.3)
