"""The dual solver against brute force, finite differences, KKT and an independent convex solver (cvxpy)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from alignment import dual
from alignment.dual import bootstrap, dual_terms, newton_correction, solve_dual, solve_front, tilted_weights

pytestmark = pytest.mark.fast  # the developers' tier (make test-fast)

cp = pytest.importorskip("cvxpy")


def make_instance(seed: int, n: int = 25, k: int = 6, m: int = 1, *, non_uniform: bool = False):
    """Random instance with a genuine conflict: safety is anti-correlated with reward."""
    rng = np.random.default_rng(seed)
    reward = rng.normal(size=(n, k))
    safety = rng.normal(size=(n, k, m)) - 0.6 * reward[:, :, None]
    ref_logprob = rng.normal(scale=1.5, size=(n, k)) if non_uniform else None
    return reward, safety, ref_logprob


def ref_weights(ref_logprob, n, k):
    if ref_logprob is None:
        return np.full((n, k), 1.0 / k)
    e = np.exp(ref_logprob - ref_logprob.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def cvxpy_primal(reward, safety, margin, beta, ref_logprob):
    """The constrained problem solved directly over π (exponential cone, Clarabel): independent of D."""
    n, k, m = safety.shape
    q = ref_weights(ref_logprob, n, k)
    pi = cp.Variable((n, k), nonneg=True)
    kl = -cp.sum(cp.entr(pi)) - cp.sum(cp.multiply(pi, np.log(q)))
    objective = cp.sum(cp.multiply(pi, reward)) / n - beta * kl / n
    gains = [
        cp.sum(cp.multiply(pi, safety[:, :, j])) / n - float((q * safety[:, :, j]).sum() / n) >= margin[j]
        for j in range(m)
    ]
    problem = cp.Problem(cp.Maximize(objective), [cp.sum(pi, axis=1) == 1, *gains])
    problem.solve(solver="CLARABEL", tol_gap_abs=1e-9, tol_gap_rel=1e-9, tol_feas=1e-9)
    assert problem.status == "optimal"
    return np.array([float(c.dual_value) for c in gains]), problem.value, pi.value


@pytest.mark.parametrize("m", [1, 2, 3])
@pytest.mark.parametrize("non_uniform", [False, True])
@pytest.mark.parametrize("seed", [0, 1])
def test_matches_independent_convex_solver(m, non_uniform, seed):
    reward, safety, ref_logprob = make_instance(seed, m=m, non_uniform=non_uniform)
    reach = (safety.max(axis=1).mean(axis=0) - (ref_weights(ref_logprob, 25, 6)[:, :, None] * safety).sum(1).mean(0))
    margin = 0.35 * reach  # comfortably feasible, usually active
    margin[-1] = -0.5 if m > 1 else margin[-1]  # with m > 1 make one constraint slack: its λ must be exactly 0
    beta = 0.7
    sol = solve_dual(reward, safety, margin, beta, ref_logprob=ref_logprob)
    lam_cvx, primal_value, pi = cvxpy_primal(reward, safety, margin, beta, ref_logprob)
    assert sol.converged and sol.feasible
    np.testing.assert_allclose(sol.lam, lam_cvx, rtol=1e-6, atol=1e-7)
    # Strong duality: D(λ*) equals the primal optimum.
    assert sol.value == pytest.approx(primal_value, rel=1e-7, abs=1e-9)
    # π_{λ*} is the primal solution.
    np.testing.assert_allclose(tilted_weights(reward, safety, beta, sol.lam, ref_logprob=ref_logprob), pi,
                               atol=2e-5)  # interior-point accuracy of the primal iterate
    if m > 1:
        assert sol.lam[-1] == 0.0  # inactive constraint: exactly zero, not 1e-12


@pytest.mark.parametrize("m", [1, 2, 3])
def test_kkt_at_solution(m):
    reward, safety, ref_logprob = make_instance(3, n=40, k=8, m=m, non_uniform=True)
    margin = np.linspace(0.2, -0.2, m)
    sol = solve_dual(reward, safety, margin, 0.5, ref_logprob=ref_logprob)
    assert sol.converged
    active = sol.lam > 0
    assert active.any()
    # Active constraints hold with equality; inactive ones have λ = 0 exactly and hold (slack >= 0).
    np.testing.assert_array_less(np.abs(sol.grad[active]), 1e-8)
    assert np.all(sol.lam[~active] == 0.0)
    assert np.all(sol.grad[~active] >= -1e-8)
    np.testing.assert_allclose(sol.predicted_safety_gain, sol.grad + margin, atol=1e-12)


def test_lambda_zero_exactly_when_reference_already_satisfies_margin():
    reward, safety, _ = make_instance(4, m=2)
    # π_0 ∝ π_ref exp(r/β) is the unconstrained optimum; margins below its safety gain are slack.
    reward_only = dual_terms(reward, safety, 0.0, 1.0, [0.0, 0.0]).safety_gain
    sol = solve_dual(reward, safety, reward_only - [0.1, 0.3], 1.0)
    assert sol.converged and sol.feasible
    assert np.all(sol.lam == 0.0)
    np.testing.assert_allclose(sol.predicted_safety_gain, reward_only, atol=1e-15)


def test_brute_force_grid_m1():
    """For m = 1 a dense grid over λ must not find a lower D than the solver."""
    reward, safety, _ = make_instance(5, m=1)
    sol = solve_dual(reward, safety, 0.4, 0.3)
    grid = np.linspace(0, 3 * sol.lam[0] + 1, 4001)
    values = [dual_terms(reward, safety, 0.4, 0.3, [lam]).value for lam in grid]
    assert min(values) >= sol.value - 1e-12
    assert grid[int(np.argmin(values))] == pytest.approx(sol.lam[0], abs=grid[1] - grid[0])


def test_hand_worked_example():
    """One prompt, two responses, uniform reference, β = 1, r = (0, 0), g = (0, 1), margin b.

    π_λ = (1, e^λ)/(1 + e^λ); E_π g = σ(λ); E_ref g = 1/2. The constraint σ(λ) - 1/2 = b gives
    λ* = logit(1/2 + b). For b = 0.25: λ* = log 3, D(λ*) = log((1 + 3)/2) - log 3 · 0.75.
    """
    sol = solve_dual([[0.0, 0.0]], [[0.0, 1.0]], 0.25, 1.0)
    assert sol.lam[0] == pytest.approx(np.log(3.0), rel=1e-12)
    assert sol.value == pytest.approx(np.log(2.0) - 0.75 * np.log(3.0), rel=1e-12)
    assert sol.predicted_safety_gain[0] == pytest.approx(0.25, abs=1e-12)
    assert sol.predicted_kl == pytest.approx(0.75 * np.log(1.5) + 0.25 * np.log(0.5), rel=1e-10)


@pytest.mark.parametrize("m", [1, 2, 3])
def test_gradient_and_hessian_match_finite_differences(m):
    reward, safety, ref_logprob = make_instance(6, m=m, non_uniform=True)
    margin = np.full(m, 0.1)
    beta = 0.4
    lam = np.linspace(0.3, 1.1, m)
    h = 1e-5

    def terms(x):
        return dual_terms(reward, safety, margin, beta, x, ref_logprob=ref_logprob)

    t = terms(lam)
    eye = np.eye(m)
    fd_grad = np.array([(terms(lam + h * e).value - terms(lam - h * e).value) / (2 * h) for e in eye])
    fd_hess = np.stack([(terms(lam + h * e).grad - terms(lam - h * e).grad) / (2 * h) for e in eye])
    np.testing.assert_allclose(t.grad, fd_grad, rtol=1e-6, atol=1e-8)
    np.testing.assert_allclose(t.hessian, fd_hess, rtol=1e-5, atol=1e-8)
    np.testing.assert_allclose(t.hessian, t.hessian.T, atol=1e-14)
    assert np.all(np.linalg.eigvalsh(t.hessian) >= -1e-12)


def test_value_brute_force_against_direct_formula():
    """D(λ) against a literal transcription of β E_x log E_ref exp((r + λg)/β) - λ(E_ref g + b)."""
    reward, safety, ref_logprob = make_instance(7, n=5, k=4, m=2, non_uniform=True)
    q = ref_weights(ref_logprob, 5, 4)
    lam, margin, beta = np.array([0.7, 0.2]), np.array([0.1, -0.2]), 0.9
    direct = 0.0
    for x in range(5):
        inner = sum(q[x, y] * np.exp((reward[x, y] + lam @ safety[x, y]) / beta) for y in range(4))
        direct += beta * np.log(inner) / 5
    ref_g = sum(q[x, y] * safety[x, y] for x in range(5) for y in range(4)) / 5
    direct -= lam @ (ref_g + margin)
    assert dual_terms(reward, safety, margin, beta, lam, ref_logprob=ref_logprob).value == pytest.approx(direct)


def test_infeasible_margin_reports_reachable():
    reward, safety, _ = make_instance(8, m=1)
    reach = safety[:, :, 0].max(axis=1).mean() - safety[:, :, 0].mean()
    sol = solve_dual(reward, safety, reach + 0.01, 0.5)
    assert not sol.feasible and not sol.converged
    assert np.all(np.isinf(sol.lam))
    assert f"{reach:.6g}" in sol.message and "reachable" in sol.message
    assert sol.reachable_margin[0] == pytest.approx(reach)
    # Just inside the boundary it is feasible, with a large but finite λ.
    inside = solve_dual(reward, safety, reach - 1e-3, 0.5)
    assert inside.feasible and inside.converged and np.isfinite(inside.lam).all()


def test_jointly_infeasible_margins_detected():
    """Each constraint reachable alone, but not together: g2 = -g1 makes gains sum to zero."""
    rng = np.random.default_rng(9)
    g1 = rng.normal(size=(20, 5))
    safety = np.stack([g1, -g1], axis=-1)
    sol = solve_dual(rng.normal(size=(20, 5)), safety, [0.2, 0.2], 0.5)
    assert not sol.feasible
    assert "jointly" in sol.message


def test_support_restricted_by_ref_logprob():
    """-inf reference log-probabilities remove responses: they get zero weight and do not count as reachable."""
    reward = np.array([[0.0, 0.0, 0.0]])
    safety = np.array([[0.0, 1.0, 10.0]])
    ref_logprob = np.array([[0.0, 0.0, -np.inf]])
    sol = solve_dual(reward, safety, 0.25, 1.0, ref_logprob=ref_logprob)
    assert sol.lam[0] == pytest.approx(np.log(3.0))
    assert solve_dual(reward, safety, 0.6, 1.0, ref_logprob=ref_logprob).feasible is False


def test_torch_and_numpy_inputs_agree():
    reward, safety, ref_logprob = make_instance(10, m=2, non_uniform=True)
    a = solve_dual(reward, safety, [0.2, 0.1], 0.5, ref_logprob=ref_logprob)
    b = solve_dual(torch.tensor(reward, dtype=torch.float32).double(), torch.tensor(safety),
                   torch.tensor([0.2, 0.1]), 0.5, ref_logprob=torch.tensor(ref_logprob))
    np.testing.assert_allclose(a.lam, b.lam, rtol=1e-6)


def test_warm_start_and_front():
    reward, safety, _ = make_instance(11, m=1, n=60, k=10)
    margins = [0.5, 0.1, 0.3, -2.0]
    front = solve_front(reward, safety, margins, 0.5)
    for margin, sol in zip(margins, front):
        cold = solve_dual(reward, safety, margin, 0.5)
        np.testing.assert_allclose(sol.lam, cold.lam, rtol=1e-8, atol=1e-12)
    lams = [s.lam[0] for s in front]
    assert lams[3] == 0.0 and lams[1] < lams[2] < lams[0]  # λ* grows with the margin
    warm = solve_dual(reward, safety, 0.5, 0.5, lam0=front[0].lam)
    assert warm.iterations <= 1


def test_bootstrap_intervals_cover_and_are_reproducible():
    reward, safety, _ = make_instance(12, m=1, n=200, k=16)
    a = bootstrap(reward, safety, 0.3, 0.5, n_resamples=60, seed=1)
    b = bootstrap(reward, safety, 0.3, 0.5, n_resamples=60, seed=1)
    np.testing.assert_array_equal(a.samples["lam"], b.samples["lam"])
    assert a.lam.low[0] < a.lam.estimate[0] < a.lam.high[0]
    assert a.predicted_reward_gain.low < a.predicted_reward_gain.high
    assert a.infeasible_fraction == 0.0 and a.samples["lam"].shape == (60, 1)


def bootstrap_per_resample(reward, safety, margin, beta, *, ref_logprob=None, n_resamples, seed, level=0.95):
    """The reference bootstrap, through the public API only: every resample's scores copied and solved on their own
    (from the full-sample λ̂, as ``bootstrap`` does), with the same draws."""
    full = solve_dual(reward, safety, margin, beta, ref_logprob=ref_logprob)
    rng = np.random.default_rng(seed)
    n = reward.shape[0]
    draws = {key: [] for key in ("lam", "safety_gain", "reward_gain", "kl", "safety_gain_at_lam", "reward_gain_at_lam")}
    infeasible = 0
    for _ in range(n_resamples):
        idx = rng.integers(0, n, size=n)
        args = (reward[idx], safety[idx], margin, beta)
        lp = None if ref_logprob is None else ref_logprob[idx]
        if full.feasible:
            fixed = dual_terms(*args, full.lam, ref_logprob=lp)
            draws["safety_gain_at_lam"].append(fixed.safety_gain)
            draws["reward_gain_at_lam"].append(fixed.reward_gain)
        sol = solve_dual(*args, ref_logprob=lp, lam0=full.lam if full.feasible else None)
        if not sol.feasible:
            infeasible += 1
            continue
        draws["lam"].append(sol.lam)
        draws["safety_gain"].append(sol.predicted_safety_gain)
        draws["reward_gain"].append(sol.predicted_reward_gain)
        draws["kl"].append(sol.predicted_kl)
    alpha = (1 - level) / 2
    intervals = {key: np.quantile(np.asarray(v, float), [alpha, 1 - alpha], axis=0) if v else None
                 for key, v in draws.items()}
    return intervals, infeasible / n_resamples, {key: np.asarray(v, float) for key, v in draws.items()}


FIELDS = {"lam": "lam", "safety_gain": "predicted_safety_gain", "reward_gain": "predicted_reward_gain",
          "kl": "predicted_kl", "safety_gain_at_lam": "safety_gain_at_lam", "reward_gain_at_lam": "reward_gain_at_lam"}


@pytest.mark.parametrize(
    ("m", "non_uniform", "margin_at", "infeasible"),
    [
        (1, False, 0.5, "none"),
        (2, True, 0.5, "none"),
        (1, False, 0.97, "some"),  # margin near the reachable one: some resamples cannot reach it
        (1, True, 1.02, "full"),  # the full sample cannot: every resample solved from λ = 0, most infeasible
    ],
)
def test_bootstrap_equals_solving_each_resample(m, non_uniform, margin_at, infeasible):
    """The reweighted bootstrap (no copies; the Chebyshev interpolant for one constraint when the resamples' λ* are
    close enough, else projected Newton from per-prompt terms at λ̂, as for m = 2, margins near the reachable one
    and an infeasible full sample) gives the intervals of solving every resample on its own, for the same seed, to
    the solver's tolerance, infeasible resamples included."""
    reward, safety, ref_logprob = make_instance(14, n=50, k=6, m=m, non_uniform=non_uniform)
    q = ref_weights(ref_logprob, 50, 6)[:, :, None]
    reach = safety.max(axis=1).mean(axis=0) - (q * safety).sum(axis=1).mean(axis=0)
    margin = margin_at * reach
    if m > 1:
        margin[-1] = -0.2  # slack: λ = 0 exactly in most resamples
    fast = bootstrap(reward, safety, margin, 0.5, ref_logprob=ref_logprob, n_resamples=40, seed=3)
    ref, ref_infeasible, ref_samples = bootstrap_per_resample(reward, safety, margin, 0.5, ref_logprob=ref_logprob,
                                                              n_resamples=40, seed=3)
    assert fast.infeasible_fraction == ref_infeasible
    if infeasible == "none":
        assert fast.infeasible_fraction == 0.0
    elif infeasible == "some":
        assert 0.0 < fast.infeasible_fraction < 1.0
    else:
        assert not np.isfinite(fast.lam.estimate).any() and fast.samples["safety_gain_at_lam"].size == 0
        assert 0.0 < fast.infeasible_fraction < 1.0
    for key, field in FIELDS.items():
        np.testing.assert_allclose(fast.samples[key], ref_samples[key], rtol=0, atol=1e-8, err_msg=key)
        got = getattr(fast, field)
        if ref[key] is None:
            assert np.all(np.isnan(got.low)) and np.all(np.isnan(got.high))
        else:
            np.testing.assert_allclose([got.low, got.high], ref[key], rtol=0, atol=1e-8, err_msg=key)


@pytest.mark.parametrize("where", ["interior", "near_zero"])
def test_bootstrap_on_the_interpolant_equals_solving_each_resample(where, monkeypatch):
    """One constraint, resamples' λ* close together: every resample solved on the Chebyshev interpolant (no pass of
    its own, no Newton fallback), with the intervals of solving each on its own; near_zero: the margin just above
    what π_0 already gains, so some resamples have λ* = 0 exactly."""
    reward, safety, ref_logprob = make_instance(18, n=300, k=8, m=1, non_uniform=True)
    beta = 0.5
    if where == "interior":
        q = ref_weights(ref_logprob, 300, 8)[:, :, None]
        margin = 0.5 * (safety.max(axis=1).mean(axis=0) - (q * safety).sum(axis=1).mean(axis=0))
    else:
        margin = dual_terms(reward, safety, 0.0, beta, [0.0], ref_logprob=ref_logprob).safety_gain + 0.01
    newton = []
    solve = dual._solve
    monkeypatch.setattr(dual, "_solve", lambda *a, **kw: newton.append(kw.get("weights")) or solve(*a, **kw))
    fast = bootstrap(reward, safety, margin, beta, ref_logprob=ref_logprob, n_resamples=40, seed=3)
    assert newton == [None]  # the full-sample solve only
    monkeypatch.undo()
    ref, ref_infeasible, ref_samples = bootstrap_per_resample(reward, safety, margin, beta, ref_logprob=ref_logprob,
                                                              n_resamples=40, seed=3)
    assert fast.infeasible_fraction == ref_infeasible == 0.0
    if where == "near_zero":
        assert 0 < np.sum(fast.samples["lam"] == 0.0) < 40
    for key, field in FIELDS.items():
        np.testing.assert_allclose(fast.samples[key], ref_samples[key], rtol=0, atol=1e-8, err_msg=key)
        got = getattr(fast, field)
        np.testing.assert_allclose([got.low, got.high], ref[key], rtol=0, atol=1e-8, err_msg=key)


def test_reweighted_point_equals_a_weighted_pass():
    """A resample's D, ∇D, ∇²D and predictions at λ from per-prompt terms (no pass) equal a pass with its weights,
    and equal the same quantities on the copied resample."""
    reward, safety, ref_logprob = make_instance(15, n=40, k=7, m=2, non_uniform=True)
    margin, beta, lam = np.array([0.1, -0.1]), 0.6, np.array([0.4, 0.2])
    p = dual._prepare(reward, safety, margin, beta, ref_logprob)
    idx = np.random.default_rng(0).integers(0, 40, size=40)
    weights = dual._Resampler(p).weights(idx)
    at = dual._Point(p, lam, reward=True, per_prompt=True).reweighted(weights)
    swept = dual._Point(p, lam, weights, hessian=True, reward=True)
    copied = dual_terms(reward[idx], safety[idx], margin, beta, lam, ref_logprob=ref_logprob[idx])
    for point in (at, swept):
        assert point.value == pytest.approx(copied.value, abs=1e-13)
        np.testing.assert_allclose(point.grad, copied.grad, atol=1e-13)
        np.testing.assert_allclose(point.hessian, copied.hessian, atol=1e-13)
        assert point.reward_gain == pytest.approx(copied.reward_gain, abs=1e-13)
        assert point.kl == pytest.approx(copied.kl, abs=1e-13)


def test_warm_start_from_a_subsample_of_prompts():
    """From 1,024 prompts on, λ* of every 16th prompt warm-starts the full solve: same λ* as a cold start."""
    reward, safety, _ = make_instance(16, n=5000, k=6, m=2)
    sol = solve_dual(reward, safety, [0.3, 0.1], 0.5)
    cold = solve_dual(reward, safety, [0.3, 0.1], 0.5, lam0=[0.0, 0.0])  # lam0 given: no warm start
    assert "warm start" in sol.message and "warm start" not in cold.message
    assert sol.converged and cold.converged
    np.testing.assert_allclose(sol.lam, cold.lam, rtol=0, atol=1e-9)
    assert sol.iterations <= 3 < cold.iterations
    np.testing.assert_array_equal(sol.history[-1], sol.lam)


def test_warm_started_solve_matches_the_root_of_an_independent_gradient():
    """The large-N path (subsample warm start, Newton steps judged by the projected gradient near the optimum)
    against ∇D written out directly (logsumexp over the raw scores, not the solver's layout or pass) and solved
    by scipy's root finder: both constraints active, so λ* is the root of ∇D."""
    import scipy.optimize

    n, k = 3000, 16
    reward, safety, ref_logprob = make_instance(22, n=n, k=k, m=2, non_uniform=True)
    margin, beta = np.array([0.4, 0.2]), 0.2
    q = ref_weights(ref_logprob, n, k)
    ref_g = (q[:, :, None] * safety).sum(axis=1).mean(axis=0)

    def grad(lam):
        s = np.log(q) + (reward + safety @ lam) / beta
        e = np.exp(s - s.max(axis=1, keepdims=True))
        return np.einsum("nk,nkj->j", e / e.sum(axis=1, keepdims=True), safety) / n - ref_g - margin

    root = scipy.optimize.root(grad, np.full(2, 0.4), tol=1e-14).x
    assert np.all(root > 0.1) and np.abs(grad(root)).max() < 1e-14
    sol = solve_dual(reward, safety, margin, beta, ref_logprob=ref_logprob, tol=1e-11)
    assert "warm start" in sol.message and sol.converged
    np.testing.assert_allclose(sol.lam, root, rtol=0, atol=1e-12)


def test_tight_tolerance_does_not_stall_the_line_search():
    """Below D's rounding the Armijo test sees only noise; the Newton step is then judged by the projected
    gradient. (Judged by D, this instance halved its steps to nothing: 120 passes, and it ended at a projected
    gradient of 3e-10, accepted only by the 1000 tol floor.)"""
    rng = np.random.default_rng(21)
    reward = rng.normal(size=(60, 8))
    safety = rng.normal(size=(60, 8, 1)) - 0.6 * reward[:, :, None]
    sol = solve_dual(reward, safety, 0.3, 0.5, tol=1e-12)
    assert sol.converged and sol.iterations <= 6
    scale = max(np.abs(safety).max(), 1.0)
    assert np.abs(sol.lam - np.maximum(sol.lam - sol.grad, 0.0)).max() <= 1e-12 * scale
    np.testing.assert_allclose(sol.lam, solve_dual(reward, safety, 0.3, 0.5).lam, atol=1e-9)


def test_negative_lambda_and_far_out_lambda_against_direct_formula():
    """Plots evaluate D at λ < 0 and at large λ, where the layout's per-prompt shift is not tight: the pass then
    shifts by the exact row maxima."""
    reward, safety, ref_logprob = make_instance(17, n=6, k=5, m=2, non_uniform=True)
    q = ref_weights(ref_logprob, 6, 5)
    margin, beta = np.array([0.1, -0.2]), 0.05
    for lam in (np.array([-12.0, 0.3]), np.array([60.0, 0.0])):  # exp(s) would overflow / underflow
        s = np.log(q) + (reward + safety @ lam) / beta
        top = s.max(axis=1, keepdims=True)
        lse = (top[:, 0] + np.log(np.exp(s - top).sum(axis=1)))
        direct = beta * lse.mean() - lam @ ((q[:, :, None] * safety).sum(axis=1).mean(axis=0) + margin)
        assert dual_terms(reward, safety, margin, beta, lam, ref_logprob=ref_logprob).value == pytest.approx(
            direct, rel=1e-12)


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"reward": np.array([[0.0, np.nan]])}, "reward"),
        ({"safety": np.array([[0.0, np.inf]])}, "safety"),
        ({"safety": np.zeros((1, 3))}, "safety"),
        ({"reward": np.zeros((1, 1)), "safety": np.zeros((1, 1))}, "K >= 2"),
        ({"beta": 0.0}, "beta"),
        ({"beta": -1.0}, "beta"),
        ({"margin": [0.1, 0.2]}, "margin"),
        ({"margin": float("nan")}, "margin"),
        ({"ref_logprob": np.zeros((2, 2))}, "ref_logprob"),
        ({"ref_logprob": np.array([[np.nan, 0.0]])}, "ref_logprob"),
    ],
)
def test_bad_input_names_the_argument(kwargs, name):
    args = {"reward": np.zeros((1, 2)), "safety": np.array([[0.0, 1.0]]), "margin": 0.1, "beta": 1.0}
    args.update(kwargs)
    ref_logprob = args.pop("ref_logprob", None)
    with pytest.raises(ValueError, match=name):
        solve_dual(args["reward"], args["safety"], args["margin"], args["beta"], ref_logprob=ref_logprob)


def test_extreme_scales_are_stable():
    """Large scores over a small β overflow a naive exp; the log-sum-exp must not."""
    reward, safety, _ = make_instance(13, m=1)
    sol = solve_dual(reward * 1e3, safety * 1e3, 200.0, 0.01)
    assert sol.feasible and sol.converged and np.isfinite(sol.value)
    assert abs(sol.grad[0]) < 1e-6


def test_newton_correction_hand_worked():
    """λ' = Π_{λ>=0}(λ - H⁻¹ s): a missed constraint (s < 0) raises λ by |s|/H, an over-met one lowers it, down
    to the bound; a constraint at λ = 0 that holds stays there while the other moves by its own Newton step."""
    # rtol 1e-11: the Newton solve adds a relative ridge of 1e-12·tr(H) (dual._newton_direction).
    np.testing.assert_allclose(newton_correction([1.0], [-0.1], [[0.5]]), [1.2], rtol=1e-11)
    np.testing.assert_allclose(newton_correction([1.0], [0.1], [[0.5]]), [0.8], rtol=1e-11)
    assert newton_correction([0.05], [0.1], [[0.5]]).tolist() == [0.0]
    h = np.array([[2.0, 1.0], [1.0, 2.0]])
    np.testing.assert_allclose(newton_correction([1.0, 1.0], [-0.3, 0.0], h),
                               [1.0, 1.0] - np.linalg.solve(h, [-0.3, 0.0]), rtol=1e-11)
    np.testing.assert_allclose(newton_correction([1.0, 0.0], [-0.3, 0.2], h), [1.15, 0.0], rtol=1e-11)
    with pytest.raises(ValueError, match="slack"):
        newton_correction([1.0], [float("nan")], [[0.5]])
