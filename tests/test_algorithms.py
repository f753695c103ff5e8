"""The baselines and PeCAN on the exactly solvable tabular world, against the dual solver's λ* and π_λ*."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from test_tabular import tabular_config

from alignment.algorithms import ALGORITHMS
from alignment.config import MultiplierConfig, PrimalDualConfig, SafeRLHFConfig
from alignment.dual import solve_dual, tilted_weights
from alignment.experiment import COMMON_KEYS, run_experiment
from alignment.online import clipped_policy_loss, leave_one_out
from alignment.worlds import build_world
from alignment.worlds.tabular import TabularPolicy, make_tables

BETA, MARGIN, N = 0.5, 0.5, 120


@pytest.fixture(scope="module")
def truth():
    """λ* and π_λ* of the population problem on the exact candidate lists (what MoCAN with exact lists gets)."""
    world = make_tables(N, 16, 1, 0.6, 1.0, 0)
    sol = solve_dual(world.reward, world.safety, MARGIN, BETA, ref_logprob=world.ref_logits)
    return world, sol


def configured(tmp_path, name: str, *, epochs: int = 100, **algorithm):
    cfg = tabular_config(tmp_path, exact=True, epochs=epochs)
    cfg.algorithm = dataclasses.replace(cfg.algorithm, name=name, **algorithm)
    return cfg


def policy_tv(summary) -> float:
    return summary["eval/tv_to_target"]


# ----------------------------------------------------------------------------------------------------------
# primal_dual


def test_primal_dual_cold_start_converges_to_lambda_star(tmp_path, truth):
    """Dual ascent from λ_0 = 0 with retraining stops at the dual solver's λ* (tolerance 1e-3 on the slack,
    |D''| ≈ 1 here, so λ within ~1e-3) and at the same policy π_λ*."""
    _, sol = truth
    pd = PrimalDualConfig(iterations=10, tolerance=1e-3, num_samples=1,
                          multiplier=MultiplierConfig(init=0.0, lr=0.8, max=100.0, log_space=False))
    s = run_experiment(configured(tmp_path, "primal_dual", primal_dual=pd), progress=False)
    history = s["primal_dual/history"]
    assert s["primal_dual/converged"] and 3 <= len(history) <= 10
    assert history[0]["lambda"] == [0.0] and history[0]["slack"][0] < 0  # λ = 0 violates the constraint
    assert np.all(np.diff([h["lambda"][0] for h in history]) > 0)  # monotone ascent towards λ*
    assert s["dual/lambda"][0] == pytest.approx(sol.lam[0], abs=2e-3)
    assert abs(s["eval/safety_gain"][0] - MARGIN) <= 1e-3
    world, _ = truth
    target = tilted_weights(world.reward, world.safety, BETA, sol.lam, ref_logprob=world.ref_logits)
    assert s["eval/tv_to_target"] < 2e-3  # the trained policy is π at its own λ ...
    assert np.abs(target - tilted_weights(world.reward, world.safety, BETA, s["dual/lambda"],
                                          ref_logprob=world.ref_logits)).sum(axis=1).mean() / 2 < 2e-3  # ≈ π_λ*
    assert s["compute/training_runs"] == len(history)


def test_primal_dual_warm_start_needs_one_retraining(tmp_path, truth):
    _, sol = truth
    pd = PrimalDualConfig(warm_start=True, iterations=5, tolerance=1e-3)
    s = run_experiment(configured(tmp_path, "primal_dual", primal_dual=pd), progress=False)
    assert s["algorithm/label"] == "primal_dual_warm"
    assert s["primal_dual/iterations"] == 1 and s["primal_dual/converged"]
    np.testing.assert_allclose(s["primal_dual/lambda0"], sol.lam, rtol=1e-9)
    assert s["dual/value"] == pytest.approx(sol.value)  # the dual stage ran and is reported


# ----------------------------------------------------------------------------------------------------------
# PeCAN


@pytest.mark.fast
def test_pecan_with_exact_implicit_rewards_recovers_mocan(truth):
    """Pre-aligned policies equal to the closed-form single-objective optima π_h ∝ π_ref e^{r/β_h} and
    π_s ∝ π_ref e^{g/β_s}: the implicit rewards β log π/π_ref differ from r and g by per-prompt constants only,
    so the dual gives MoCAN's λ* and π_λ* exactly, for any β_h, β_s (the β factors are kept)."""
    world, sol = truth
    cfg = tabular_config(None, exact=True)
    stages = build_world(cfg)
    responses, ref_logprob = stages.sample_reference(torch.Generator())
    for beta_h, beta_s in [(BETA, BETA), (0.2, 1.5)]:
        pi_h, pi_s = TabularPolicy(world.ref_logits), TabularPolicy(world.ref_logits)
        with torch.no_grad():
            pi_h.logits.add_(torch.as_tensor(world.reward / beta_h))
            pi_s.logits.add_(torch.as_tensor(world.safety[..., 0] / beta_s))
        r_hat = beta_h * stages.logratio(pi_h, responses)
        g_hat = beta_s * stages.logratio(pi_s, responses)[..., None]
        assert not np.allclose(r_hat, world.reward)  # the per-prompt log-normalisers are really there
        pecan = solve_dual(r_hat, g_hat, MARGIN, BETA, ref_logprob=ref_logprob, tol=1e-12)
        np.testing.assert_allclose(pecan.lam, sol.lam, rtol=1e-7)
        np.testing.assert_allclose(tilted_weights(r_hat, g_hat, BETA, pecan.lam, ref_logprob=ref_logprob),
                                   tilted_weights(world.reward, world.safety, BETA, sol.lam,
                                                  ref_logprob=world.ref_logits), atol=1e-9)


def test_pecan_end_to_end_recovers_mocan(tmp_path, truth):
    """The whole pipeline: DPO pre-alignment on (soft) Bradley-Terry preferences of every candidate pair, implicit
    rewards, dual, stage 2. Pre-alignment is trained, so λ matches to training accuracy."""
    _, sol = truth
    s = run_experiment(configured(tmp_path, "pecan", beta_helpful=0.25, beta_safe=1.0), progress=False)
    assert s["dual/lambda"][0] == pytest.approx(sol.lam[0], rel=5e-3)
    assert s["pecan/reward_correlation"] > 0.999 and s["pecan/safety_correlation"][0] > 0.999
    assert s["eval/safety_gain"][0] == pytest.approx(MARGIN, abs=5e-3)
    assert s["compute/training_runs"] == 3  # π_h, π_s and stage 2


# ----------------------------------------------------------------------------------------------------------
# safe_rlhf


@pytest.mark.parametrize("init", [0.1, 3.0])
def test_safe_rlhf_multiplier_moves_towards_lambda_star(tmp_path, truth, init):
    """From below λ* the multiplier rises, from above it falls; after 300 online steps it is within 5% of λ*
    (the remaining gap is the noise of 16 samples per prompt) and the policy meets the margin."""
    _, sol = truth
    sr = SafeRLHFConfig(steps=300, prompts_per_step=N, samples_per_prompt=16, lr=0.1,
                        multiplier=MultiplierConfig(init=init, lr=0.1, max=5.0, window=4, log_space=True))
    s = run_experiment(configured(tmp_path, "safe_rlhf", safe_rlhf=sr), progress=False)
    lam = [h["lambda"][0] for h in s["safe_rlhf/history"]]
    early = np.mean(lam[20:40])
    assert (early > init) if init < sol.lam[0] else (early < init)
    assert s["dual/lambda"][0] == pytest.approx(sol.lam[0], rel=0.05)
    assert s["eval/safety_gain"][0] == pytest.approx(MARGIN, abs=0.05)
    assert s["eval/tv_to_target"] < 0.03
    assert s["safe_rlhf/first_feasible_step"] is not None


@pytest.mark.fast
def test_leave_one_out_and_clipped_loss():
    v = torch.tensor([[1.0, 2.0, 6.0]])
    torch.testing.assert_close(leave_one_out(v), torch.tensor([[1 - 4.0, 2 - 3.5, 6 - 1.5]]))
    old = torch.zeros(1, 3)
    adv = torch.tensor([[1.0, -1.0, 1.0]])
    # Ratios far outside 1 ± ε contribute the clipped value for positive advantages.
    logp = torch.log(torch.tensor([[2.0, 0.5, 1.0]]))
    loss = clipped_policy_loss(logp, old, adv, 0.2)
    assert loss.item() == pytest.approx(-(1.2 * 1 + 0.8 * -1 + 1.0 * 1) / 3)


# ----------------------------------------------------------------------------------------------------------
# Every algorithm: same keys, compute recorded, the expected direction of each baseline


@pytest.fixture(scope="module")
def every_algorithm(tmp_path_factory):
    out = {}
    for name in ALGORITHMS:
        extra = {"lam": 0.5} if name == "fixed_lambda" else {}
        if name == "safe_rlhf":
            extra["safe_rlhf"] = SafeRLHFConfig(steps=20, prompts_per_step=N, samples_per_prompt=4, lr=0.1)
        if name == "primal_dual":
            extra["primal_dual"] = PrimalDualConfig(iterations=2, num_samples=4)
        cfg = configured(tmp_path_factory.mktemp(name), name, epochs=20, **extra)
        out[name] = run_experiment(cfg, progress=False)
    out["dpo_safe"] = run_experiment(configured(tmp_path_factory.mktemp("dpo_safe"), "dpo", epochs=20,
                                                preference="safe"), progress=False)
    return out


def test_every_algorithm_writes_the_same_summary_keys(every_algorithm):
    def common(summary):
        own = tuple(f"{n}/" for n in [*ALGORITHMS, "reference"])
        return {k for k in summary if not k.startswith(own) or k in COMMON_KEYS}

    keys = {name: common(s) for name, s in every_algorithm.items()}
    first = keys["mocan"]
    for name, k in keys.items():
        assert k == first, (name, k ^ first)
        assert every_algorithm[name]["status"] == "completed"
    runs = {name: s["compute/training_runs"] for name, s in every_algorithm.items()}
    assert runs == {"mocan": 1, "mocan_newton": 2, "pecan": 3, "primal_dual": 2, "safe_rlhf": 1, "dpo": 1, "fixed_lambda": 1,
                    "reference": 0, "dpo_safe": 1}
    assert every_algorithm["safe_rlhf"]["compute/generated_tokens"] == 20 * N * 4  # rollouts only (exact dual)
    assert every_algorithm["reference"]["compute/backward_tokens"] == 0


def test_baselines_move_the_way_they_should(every_algorithm):
    s = every_algorithm
    assert s["reference"]["eval/safety_gain"] == [0.0] and s["reference"]["eval/kl"] == 0.0
    assert s["reference"]["dual/lambda"] is None and s["reference"]["predicted/safety_gain"] is None
    assert s["dpo"]["eval/reward_gain"] > 0 > s["dpo"]["eval/safety_gain"][0]  # DPO_H: helpful, less safe
    assert s["dpo_safe"]["eval/safety_gain"][0] > s["mocan"]["eval/safety_gain"][0]  # DPO_S: safety alone
    assert s["dpo_safe"]["algorithm/label"] == "dpo_safe"
    # fixed λ: no dual solve, but the dual's prediction at that λ, which the trained policy reaches.
    fixed = s["fixed_lambda"]
    assert fixed["dual/value"] is None and fixed["dual/lambda"] == [0.5]
    assert fixed["predicted/safety_gain"][0] < MARGIN  # λ = 0.5 < λ*: the margin is not reached
    assert fixed["eval/safety_gain"][0] == pytest.approx(fixed["predicted/safety_gain"][0], abs=0.02)


def test_mocan_newton_corrects_an_undertrained_stage_2(tmp_path):
    """A stage 2 that stops short of π_λ* (lr 0.1 for 10 epochs: fit slope about 0.9) misses the margin; one
    Newton step from its measured slack with the dual's curvature brings the next policy closer to it.
    Exact lists: every slack and gain is an exact expectation, so the only error left is the step's model."""
    def run(name):
        cfg = tabular_config(tmp_path / name, exact=True, epochs=10)
        cfg.trainer = dataclasses.replace(cfg.trainer, lr=0.1)
        cfg.algorithm = dataclasses.replace(cfg.algorithm, name=name)
        return run_experiment(cfg, progress=False)

    one, two = run("mocan"), run("mocan_newton")
    assert one["eval/safety_gain"][0] < MARGIN - 0.02  # the first shot misses the margin
    # The first shot of mocan_newton is MoCAN's policy, and its slack is MoCAN's in-sample gain minus b.
    assert two["mocan_newton/lambda0"] == one["dual/lambda"]
    assert two["mocan_newton/slack0"][0] == pytest.approx(one["insample/safety_gain"][0] - MARGIN, abs=1e-12)
    (h,), = two["mocan_newton/hessian"]
    assert two["dual/lambda"][0] == pytest.approx(one["dual/lambda"][0] - two["mocan_newton/slack0"][0] / h,
                                                  rel=1e-11)  # the Newton solve's relative ridge is 1e-12
    assert abs(two["eval/safety_gain"][0] - MARGIN) < abs(one["eval/safety_gain"][0] - MARGIN) / 2
    assert two["compute/training_runs"] == 2


@pytest.mark.fast
def test_fixed_lambda_without_lambda_names_the_field(tmp_path):
    with pytest.raises(ValueError, match="algorithm.lam"):
        run_experiment(configured(tmp_path, "fixed_lambda"), progress=False)
    with pytest.raises(ValueError, match="algorithm.lam"):
        run_experiment(configured(tmp_path, "fixed_lambda", lam=-1.0), progress=False)


@pytest.mark.fast
def test_unknown_algorithm_fails_before_any_work(tmp_path):
    with pytest.raises(ValueError, match="algorithm.name: unknown 'mocan2'"):
        run_experiment(configured(tmp_path / "x", "mocan2"), progress=False)
    assert not (tmp_path / "x").exists()
