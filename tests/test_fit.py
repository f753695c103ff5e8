"""Fit diagnostics of stage 2 (alignment/fit.py): hand-worked values and the exact-fit limits."""

from __future__ import annotations

import math

import numpy as np
import pytest

from alignment.fit import fit_diagnostics

pytestmark = pytest.mark.fast


def test_hand_worked_kl_for_iid_samples_and_for_an_exact_list():
    t = np.array([[0.0, math.log(3.0)]])  # target weights 1/4, 3/4
    fit = fit_diagnostics(t, np.zeros_like(t))  # the policy has not moved: 1/2, 1/2
    assert fit["target_kl"] == pytest.approx(0.25 * math.log(0.5) + 0.75 * math.log(1.5), rel=1e-12)
    assert fit["slope"] == 0.0 and math.isnan(fit["corr"])
    # Exact list with π_ref = (0.8, 0.2): target ∝ (0.8, 0.2·3) = (4/7, 3/7), policy = π_ref.
    fit = fit_diagnostics(t, np.zeros_like(t), np.log([[0.8, 0.2]]))
    expected = 4 / 7 * math.log(4 / 7 / 0.8) + 3 / 7 * math.log(3 / 7 / 0.2)
    assert fit["target_kl"] == pytest.approx(expected, rel=1e-12)


def test_exact_fit_half_fit_and_per_prompt_constants():
    rng = np.random.default_rng(0)
    t = rng.normal(size=(50, 16))
    shift = rng.normal(size=(50, 1)) * 10  # ρ is defined up to a constant per prompt
    exact = fit_diagnostics(t, t + shift)
    assert exact["target_kl"] == pytest.approx(0.0, abs=1e-12)
    assert exact["slope"] == pytest.approx(1.0, rel=1e-12) and exact["corr"] == pytest.approx(1.0, rel=1e-12)
    half = fit_diagnostics(t, 0.5 * t + shift)
    assert half["slope"] == pytest.approx(0.5, rel=1e-12) and half["corr"] == pytest.approx(1.0, rel=1e-12)
    assert half["target_kl"] > 0.01
    noisy = fit_diagnostics(t, t + rng.normal(size=t.shape))
    assert 0 < noisy["corr"] < 1 and noisy["slope"] == pytest.approx(1.0, abs=0.1)
    with pytest.raises(ValueError, match=r"\[N, K\]"):
        fit_diagnostics(t, t[:, :3])


def test_component_slopes_separate_a_reward_part_learned_from_a_safety_part_missed():
    """ρ = t_r + 0.3·t_g + c(x): the overall slope looks fine because t_r dominates, the parts' slopes do not."""
    rng = np.random.default_rng(1)
    t_r, t_g = rng.normal(size=(40, 8)) * 3, rng.normal(size=(40, 8)) * 0.5
    rho = t_r + 0.3 * t_g + rng.normal(size=(40, 1))
    fit = fit_diagnostics(t_r + t_g, rho, components=np.stack([t_r, t_g], axis=-1))
    np.testing.assert_allclose(fit["component_slopes"], [1.0, 0.3], rtol=1e-10)  # an exact linear relation
    assert fit["slope"] > 0.9
    with pytest.raises(ValueError, match=r"\[N, K, C\]"):
        fit_diagnostics(t_r, rho, components=t_r[..., None][:, :3])
    # A part constant within every prompt (a constraint with λ = 0) has no slope, and says so.
    flat = fit_diagnostics(t_r, rho, components=np.stack([t_r, np.zeros_like(t_r)], axis=-1))
    assert np.isnan(flat["component_slopes"][1])


def test_log_mass_is_the_shift_the_per_prompt_fit_cannot_see():
    """log Σ_k w_k e^{ρ_k}: 0 for π_ref, log 2 / log 1/2 when every sample's ratio is doubled / halved (hand
    value), exactly 0 on an exact list whatever π_θ is (the list is the whole support, so π_θ's mass on it is 1)."""
    t = np.array([[0.0, 1.0, 2.0], [1.0, -1.0, 0.5]])
    assert fit_diagnostics(t, np.zeros_like(t))["log_mass"] == 0.0
    shifted = np.array([[math.log(2.0)] * 3, [math.log(0.5)] * 3])
    assert fit_diagnostics(t, t * 0 + shifted)["log_mass"] == pytest.approx(0.0, abs=1e-15)  # +log 2, -log 2
    assert fit_diagnostics(t, np.full_like(t, math.log(0.5)))["log_mass"] == pytest.approx(math.log(0.5), rel=1e-12)
    # ρ = t - log Σ_k π_ref(y_k) e^{t_k}: a normalised policy on an exact list, mass 1.
    log_ref = np.log([[0.5, 0.3, 0.2], [0.1, 0.6, 0.3]])
    rho = t - np.log(np.sum(np.exp(log_ref + t), axis=1, keepdims=True))
    assert fit_diagnostics(t, rho, log_ref)["log_mass"] == pytest.approx(0.0, abs=1e-12)
    # iid samples, one ratio of three doubled: log((2 + 1 + 1) / 3).
    one = np.array([[math.log(2.0), 0.0, 0.0]])
    assert fit_diagnostics(t[:1], one)["log_mass"] == pytest.approx(math.log(4 / 3), rel=1e-12)


def test_fit_on_a_subset_of_prompts_is_the_fit_of_those_rows(tmp_path):
    """``eval.fit_prompts``: the rows are a seeded subset; a world's log-ratios of a subset are the full ones'
    rows (tabular world, a moved policy); a run records how many prompts its fit/* are over."""
    import torch

    from alignment.config import EvalConfig, SamplingConfig, ScorerConfig, TabularDatasetConfig
    from alignment.experiment import fit_rows, format_report, run_experiment
    from alignment.worlds.tabular import TabularPolicy, TabularWorld

    rows = fit_rows(120, 30, seed=0)
    assert len(set(rows.tolist())) == 30 and rows.tolist() == sorted(rows.tolist())
    assert (rows == fit_rows(120, 30, seed=0)).all() and not (rows == fit_rows(120, 30, seed=1)).all()
    assert (fit_rows(120, None, 0) == np.arange(120)).all() and (fit_rows(20, 30, 0) == np.arange(20)).all()

    world = TabularWorld(TabularDatasetConfig(n_prompts=120), ScorerConfig(), SamplingConfig(num_samples=8),
                         EvalConfig(), seed=0)
    ids, _ = world.sample_reference(torch.Generator().manual_seed(0))
    policy = TabularPolicy(world.tables.ref_logits)
    with torch.no_grad():
        policy.logits.add_(torch.randn_like(policy.logits, generator=torch.Generator().manual_seed(1)))
    np.testing.assert_array_equal(world.logratio(policy, ids, rows), world.logratio(policy, ids)[rows])

    from tests.test_tabular import tabular_config

    cfg = tabular_config(tmp_path, epochs=5)
    cfg.eval.fit_prompts = 30
    s = run_experiment(cfg, progress=False)
    assert s["fit/prompts"] == 30 and "(30 of 120 prompts)" in format_report(s)
