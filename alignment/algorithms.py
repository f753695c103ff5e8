"""The algorithms users compare: how each chooses λ and the policy. Sampling and scoring π_ref, evaluation and
the summary are shared (alignment/experiment.py); so are the one training loop and the world's stages.

    mocan         λ* from the dual on scored π_ref samples, then one stage-2 run on r + λ*ᵀg
    mocan_newton  MoCAN, then one Newton correction of λ from the trained policy's measured slack and a
                  second stage-2 run (two shots: for when stage 2 cannot reach π_λ* within its budget)
    pecan         the same on implicit rewards β log π/π_ref of DPO-pre-aligned policies (no scorers)
    primal_dual   dual ascent, retraining stage 2 at every λ_t (cold start, or warm from λ*)
    safe_rlhf     online Lagrangian policy gradient (alignment/online.py)
    dpo           DPO on helpfulness-only or safety-only preferences (DPO_H, DPO_S)
    fixed_lambda  stage 2 at a given λ, no dual (λ grids)
    reference     π_ref itself: the origin of every gain

Names map to functions through one explicit dict, so the name in a config, a sweep folder and a figure legend
is greppable to its definition here. Every function takes an ``AlignmentContext`` and returns an ``Outcome``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from functools import cached_property
from typing import Any

import numpy as np
import torch

from alignment import distributed
from alignment.compute import StageTimer
from alignment.config import AlgorithmConfig, Config
from alignment.dual import (
    BootstrapResult,
    DualSolution,
    bootstrap,
    dual_terms,
    newton_correction,
    reference_means,
    solve_dual,
)
from alignment.items import make_lists, make_pairs
from alignment.multiplier import LagrangeMultiplier
from alignment.online import safe_rlhf_train
from alignment.worlds.base import World


class InfeasibleMarginError(ValueError):
    """The configured margin is beyond what any reweighting of π_ref's samples can reach. ``solution``: the
    dual's infeasible solution, whose ``reachable_margin`` the run's summary records beside the message."""

    def __init__(self, message: str, solution: DualSolution | None = None):
        super().__init__(message)
        self.solution = solution


@dataclass(frozen=True)
class LambdaChoice:
    lam: np.ndarray  # [m]
    solution: DualSolution | None  # the dual stage's output, when the algorithm solves it
    intervals: BootstrapResult | None


def one_shot_dual(reward: np.ndarray, safety: np.ndarray, margin: np.ndarray, cfg: AlgorithmConfig, *,
                  ref_logprob: np.ndarray | None, seed: int) -> LambdaChoice:
    """MoCAN / PeCAN stage 1: λ* from the empirical dual on π_ref's scored samples, with bootstrap CIs."""
    sol = solve_dual(reward, safety, margin, cfg.beta, ref_logprob=ref_logprob, tol=cfg.dual.tol,
                     max_iter=cfg.dual.max_iter)
    if not sol.feasible:
        raise InfeasibleMarginError(f"safety.margin={margin.tolist()}: {sol.message}", sol)
    intervals = None
    if cfg.dual.bootstrap > 1:
        intervals = bootstrap(reward, safety, margin, cfg.beta, ref_logprob=ref_logprob,
                              n_resamples=cfg.dual.bootstrap, level=cfg.dual.level, seed=seed, tol=cfg.dual.tol)
    return LambdaChoice(sol.lam, sol, intervals)


@dataclass
class AlignmentContext:
    """What every algorithm receives: the config, the world's stages, π_ref's scored samples (the dual's data)
    and the run's tracker, pair generator and stage timer."""

    cfg: Config
    world: World  # alignment/worlds/: the tabular or a language-model world
    responses: np.ndarray  # [N, K] response ids of π_ref samples
    ref_logprob: np.ndarray | None  # [N, K] for exact candidate lists, else None (iid samples)
    reward: np.ndarray  # [N, K]
    safety: np.ndarray  # [N, K, m]
    tracker: Any
    generator: torch.Generator  # pairs, labels and policy samples
    progress: bool = True
    timer: StageTimer = field(default_factory=StageTimer)  # time/<stage>, shared with the experiment

    @property
    def margins(self) -> np.ndarray:
        return np.asarray(self.cfg.safety.margins)

    @cached_property
    def ref_means(self) -> tuple[np.ndarray, np.ndarray]:
        """E_ref of reward [N] and safety [N, m] per dual prompt, from π_ref's samples (the dual's data)."""
        return reference_means(self.reward, self.ref_logprob), reference_means(self.safety, self.ref_logprob)

    def dual(self, reward: np.ndarray, safety: np.ndarray) -> LambdaChoice:
        with self.timer("dual"):
            return one_shot_dual(reward, safety, self.margins, self.cfg.algorithm, ref_logprob=self.ref_logprob,
                                 seed=self.cfg.seed)

    def stage2(self, reward: np.ndarray, safety: np.ndarray, lam: np.ndarray, *, phase: str = "train"
               ) -> tuple[Any, dict[str, Any]]:
        """One stage-2 run from π_ref towards π_λ ∝ π_ref exp((r + λᵀg)/β), β = algorithm.beta, with the configured
        objective: pairs labelled by σ(Δ(r + λᵀg)) (pairwise, all_pairs) or lists of each prompt's samples
        with targets (r + λᵀg)/β (listwise)."""
        cfg = self.cfg.algorithm
        with self.timer("train"):
            if cfg.pair_source == "dataset":
                items = self.world.dataset_pairs(lam, cfg.labels, self.generator)
            elif cfg.objective == "listwise":
                items = make_lists(self.responses, (reward + safety @ lam) / cfg.beta, self.ref_logprob)
            else:
                items = make_pairs(self.responses, reward + safety @ lam, self.ref_logprob,
                                   pairs_per_prompt=cfg.pairs_per_prompt, labels=cfg.labels,
                                   generator=self.generator, all_pairs=cfg.objective == "all_pairs")
            policy, info = self.world.train(items, trainer=self.cfg.trainer, beta=cfg.beta,
                                            log=self.tracker.phase(phase),
                                            progress=self.progress, objective=cfg.objective,
                                            anchor=cfg.mass_anchor)
        # train/pairs: the items trained on (pairs, or one list per prompt for the listwise objective)
        return policy, {**info, "train/pairs": int(items["prompt"].shape[0])}

    def probe(self, policy: Any, num_samples: int) -> tuple[float, np.ndarray]:
        """A trained policy's mean reward and constraint slack Ê_π g - E_ref g - b [m] on the dual's prompts,
        from ``num_samples`` fresh samples per prompt: ∇D's estimate at the λ it was trained at."""
        with self.timer("probe"):
            reward, safety = self.world.policy_scores(policy, num_samples, self.generator)
        return float(reward.mean()), safety.mean(axis=0) - self.ref_means[1].mean(axis=0) - self.margins

    def preference_pairs(self, objective: str, j: int = 0) -> dict[str, torch.Tensor]:
        """Preference data for DPO: the dataset's own (PKU-SafeRLHF better/safer ids) when the world has one;
        otherwise pairs of π_ref samples labelled by Bradley-Terry on the gold reward (``helpful``) or safety
        score j (``safe``), one Bernoulli draw per pair with ``labels: sampled``, the probability itself with
        ``labels: soft`` (the many-annotator limit)."""
        if self.world.has_preference_data:
            if j:
                raise ValueError("the preference dataset has one safety preference; use one constraint")
            return self.world.dataset_preferences(objective)
        scores = self.reward if objective == "helpful" else self.safety[..., j]
        return make_pairs(self.responses, scores, self.ref_logprob, pairs_per_prompt=self.cfg.algorithm.pairs_per_prompt,
                          labels=self.cfg.algorithm.labels, generator=self.generator)

    def dpo(self, objective: str, beta: float, j: int = 0, *, phase: str) -> tuple[Any, dict[str, Any]]:
        with self.timer("train"):
            pairs = self.preference_pairs(objective, j)
            policy, info = self.world.train(pairs, trainer=self.cfg.trainer, beta=beta, log=self.tracker.phase(phase),
                                            progress=self.progress)
        return policy, {**info, "train/pairs": int(pairs["label"].shape[0])}


@dataclass
class Outcome:
    """What an algorithm hands to evaluation: the policy (``None`` = π_ref), the λ it ended with (``None`` when
    λ means nothing to it), the dual's solution if it solved one, and its own summary entries."""

    policy: Any
    lam: np.ndarray | None
    choice: LambdaChoice | None = None
    info: dict[str, Any] = field(default_factory=dict)
    dual_scores: tuple[np.ndarray, np.ndarray] | None = None  # the (r, g) its dual was solved on


# ----------------------------------------------------------------------------------------------------------
# The algorithms


def mocan(ctx: AlignmentContext) -> Outcome:
    """Model-based constrained alignment: λ* = argmin D on scored π_ref samples, then one stage-2 run."""
    choice = ctx.dual(ctx.reward, ctx.safety)
    policy, info = ctx.stage2(ctx.reward, ctx.safety, choice.lam)
    return Outcome(policy, choice.lam, choice, info, (ctx.reward, ctx.safety))


def mocan_newton(ctx: AlignmentContext) -> Outcome:
    """MoCAN plus one correction: where stage 2 falls short of π_λ* (a policy that moves only part of the way
    to its target), measure the shortfall and retrain once at the λ that compensates it.

    π_0 = stage 2 at λ* (MoCAN's policy, the same cached adapter); s = Ê_{π_0} g - E_ref g - b, the slack of π_0
    on the dual's prompts from fresh samples; λ_1 = Π_{λ >= 0}(λ* - H⁻¹ s) with H = ∇²D(λ*) = E Cov_{π_λ*}(g)/β
    (dual.newton_correction); the policy is stage 2 at λ_1. Cost: two stage-2 runs and one sampling pass,
    against primal-dual's T; the predictions it reports are π_λ1's, so one-shot MoCAN stays the honest test
    of the dual's forecast.
    """
    cfg = ctx.cfg.algorithm
    choice = ctx.dual(ctx.reward, ctx.safety)
    first, first_info = ctx.stage2(ctx.reward, ctx.safety, choice.lam, phase="train")
    _, slack = ctx.probe(first, cfg.newton.num_samples)
    hessian = dual_terms(ctx.reward, ctx.safety, ctx.margins, cfg.beta, choice.lam,
                         ref_logprob=ctx.ref_logprob).hessian
    lam = newton_correction(choice.lam, slack, hessian)
    ctx.tracker.log({"mocan_newton/slack0": float(slack[0]), "mocan_newton/lambda1": float(lam[0])},
                    step=ctx.tracker.last_step + 1)
    policy, info = ctx.stage2(ctx.reward, ctx.safety, lam, phase="newton")
    info.update({"mocan_newton/lambda0": choice.lam.tolist(), "mocan_newton/slack0": slack.tolist(),
                 "mocan_newton/hessian": hessian.tolist(), "mocan_newton/lambda1": lam.tolist(),
                 "mocan_newton/first_adapter": first_info.get("train/adapter"),
                 "train/steps": (first_info.get("train/steps") or 0) + (info.get("train/steps") or 0)})
    return Outcome(policy, lam, choice, info, (ctx.reward, ctx.safety))


def pecan(ctx: AlignmentContext) -> Outcome:
    """Preference-based constrained alignment: no reward or cost model.

    Pre-alignment: DPO with β_h on helpfulness preferences gives π_h, DPO with β_s on safety preferences gives
    π_s (one per constraint). On π_ref's samples, r̂ = β_h log π_h/π_ref and ĝ = β_s log π_s/π_ref recover
    r and g up to per-prompt constants, which cancel in the dual and in pair labels. Then MoCAN on (r̂, ĝ):
    the dual with the margin relative to π_ref, and stage 2 on σ(Δ(r̂ + λᵀĝ)). The β factors are kept; the
    paper's public PeCAN code drops them, which rescales λ* by β_s/β_h and the margin's units by β_s.
    """
    cfg = ctx.cfg.algorithm
    if cfg.pair_source == "dataset":
        raise ValueError("algorithm=pecan labels pairs by implicit rewards of π_ref samples; "
                         "set algorithm.pair_source=samples")
    beta_h = cfg.beta_helpful or cfg.beta
    beta_s = cfg.beta_safe or cfg.beta
    pi_h, info_h = ctx.dpo("helpful", beta_h, phase="pecan_helpful")
    reward_hat = beta_h * ctx.world.logratio(pi_h, ctx.responses)
    safety_hat = np.empty_like(ctx.safety)
    info: dict[str, Any] = {"pecan/helpful_adapter": info_h.get("train/adapter"), "pecan/beta_helpful": beta_h,
                            "pecan/beta_safe": beta_s}
    for j in range(ctx.safety.shape[-1]):
        pi_s, _ = ctx.dpo("safe", beta_s, j, phase=f"pecan_safe{j}")
        safety_hat[..., j] = beta_s * ctx.world.logratio(pi_s, ctx.responses)
    choice = ctx.dual(reward_hat, safety_hat)
    policy, train_info = ctx.stage2(reward_hat, safety_hat, choice.lam)
    sol = choice.solution
    info.update({
        # How well the implicit rewards track the scorers (within-prompt correlation; 1 is perfect recovery).
        "pecan/reward_correlation": _within_prompt_corr(reward_hat, ctx.reward),
        "pecan/safety_correlation": [_within_prompt_corr(safety_hat[..., j], ctx.safety[..., j])
                                     for j in range(ctx.safety.shape[-1])],
        "pecan/implicit_predicted_safety_gain": sol.predicted_safety_gain.tolist(),
        "pecan/implicit_predicted_reward_gain": sol.predicted_reward_gain,
    })
    return Outcome(policy, choice.lam, choice, {**train_info, **info}, (reward_hat, safety_hat))


def fixed_lambda(ctx: AlignmentContext) -> Outcome:
    """Stage 2 at a given λ (``algorithm.lam``), no dual: the building block of λ grids."""
    lam = _given_lambda(ctx.cfg.algorithm.lam, ctx.safety.shape[-1])
    policy, info = ctx.stage2(ctx.reward, ctx.safety, lam)
    return Outcome(policy, lam, None, info)


def dpo(ctx: AlignmentContext) -> Outcome:
    """DPO on one objective's preferences with β = algorithm.beta: DPO_H (``preference=helpful``) or DPO_S
    (``preference=safe``, the first safety score). With the same β, DPO_H is PeCAN's π_h (the same cached
    adapter)."""
    preference = ctx.cfg.algorithm.preference
    policy, info = ctx.dpo(preference, ctx.cfg.algorithm.beta, phase="train")
    return Outcome(policy, None, None, {**info, "dpo/preference": preference})


def reference(ctx: AlignmentContext) -> Outcome:
    """π_ref, evaluated like every aligned policy (gains are zero up to evaluation noise, which is the check)."""
    return Outcome(None, None)


def primal_dual(ctx: AlignmentContext) -> Outcome:
    """Iterative dual ascent with retraining (projected gradient descent on D, gradients from trained policies).

    For t = 1..T: π_t = stage 2 at λ_t; slack_t = Ê_{π_t} g - E_ref g - b on the dual's prompts;
    λ_{t+1} = max(0, λ_t - η slack_t). ∇D(λ) is exactly E_{π_λ} g - E_ref g - b, so each step is a dual
    gradient step whose gradient costs a training run and a sampling pass: what one-shot dualization saves.
    Cold start: λ_0 = multiplier.init. Warm start: λ_0 = λ* of the dual (multi-shot refinement of MoCAN).
    """
    cfg, pd = ctx.cfg, ctx.cfg.algorithm.primal_dual
    tol = cfg.eval.tolerance if pd.tolerance is None else pd.tolerance
    m = ctx.safety.shape[-1]
    choice = ctx.dual(ctx.reward, ctx.safety) if pd.warm_start else None
    multiplier = LagrangeMultiplier(pd.multiplier, m, init=None if choice is None else choice.lam)
    history: list[dict[str, Any]] = []
    converged = False
    for t in range(pd.iterations):
        lam = multiplier.value.copy()
        policy, info = ctx.stage2(ctx.reward, ctx.safety, lam, phase=f"primal_dual{t}")
        reward_t, slack = ctx.probe(policy, pd.num_samples)
        history.append({"iteration": t, "lambda": lam.tolist(), "slack": slack.tolist(), "reward": reward_t})
        ctx.tracker.log({"primal_dual/lambda": float(lam[0]), "primal_dual/slack": float(slack[0]),
                         "primal_dual/iteration": t}, step=ctx.tracker.last_step + 1)
        # KKT within tolerance: active constraints hold with equality, inactive ones have λ = 0.
        if np.all((np.abs(slack) <= tol) | ((lam == 0) & (slack >= -tol))):
            converged = True
            break
        multiplier.update(slack)
    info.update({"primal_dual/iterations": len(history), "primal_dual/converged": converged,
                 "primal_dual/history": history, "primal_dual/tolerance": tol,
                 "primal_dual/lambda0": history[0]["lambda"]})
    return Outcome(policy, np.asarray(history[-1]["lambda"]), choice, info)


def safe_rlhf(ctx: AlignmentContext) -> Outcome:
    """Safe-RLHF-style online primal-dual (PPO-Lag with leave-one-out baselines; alignment/online.py)."""
    cfg = ctx.cfg
    sr = cfg.algorithm.safe_rlhf
    ref_safety = ctx.ref_means[1]  # [N, m]
    # The rollouts come from one generator per rank (safe_rlhf_train): the trained policy depends on the
    # number of processes, unlike stage 2's, so it is part of the key.
    rollouts = {"version": 2, "processes": distributed.current().world_size}
    spec = {"safe_rlhf": asdict(sr), "rollouts": rollouts, "beta": cfg.algorithm.beta, "margins": ctx.margins.tolist(),
            "ref_safety": np.round(ref_safety, 12).tolist(), "tolerance": cfg.eval.tolerance}

    def run(policy: Any, work: Any) -> dict[str, Any]:
        result = safe_rlhf_train(ctx.world.rollouts, policy, cfg=sr, beta=cfg.algorithm.beta, margins=ctx.margins,
                                 ref_safety=ref_safety, seed=cfg.seed, tolerance=cfg.eval.tolerance,
                                 log=ctx.tracker.phase("safe_rlhf"), progress=ctx.progress)
        ctx.world.compute.add(training_runs=1)
        return {"safe_rlhf/lambda": result.lam.tolist(), "safe_rlhf/history": result.history,
                "safe_rlhf/first_feasible_step": result.first_feasible_step, "train/steps": sr.steps}

    with ctx.timer("train"):
        policy, info = ctx.world.online_policy(spec, run)
    return Outcome(policy, np.asarray(info["safe_rlhf/lambda"]), None, info)


def _given_lambda(value: Any, m: int) -> np.ndarray:
    if value is None:
        raise ValueError("algorithm.lam: fixed_lambda needs λ, e.g. algorithm.lam=0.5 (or a list, one per "
                         "constraint)")
    values = np.atleast_1d(np.asarray(value, dtype=float))
    if values.size == 1:
        values = np.full(m, values[0])
    if values.shape != (m,) or not np.all(np.isfinite(values)) or np.any(values < 0):
        raise ValueError(f"algorithm.lam: {m} finite values >= 0 required, got {value!r}")
    return values


def _within_prompt_corr(a: np.ndarray, b: np.ndarray) -> float:
    a = a - a.mean(axis=1, keepdims=True)
    b = b - b.mean(axis=1, keepdims=True)
    denom = np.sqrt((a * a).sum() * (b * b).sum())
    return float((a * b).sum() / denom) if denom > 0 else float("nan")


Algorithm = Callable[[AlignmentContext], Outcome]

ALGORITHMS: dict[str, Algorithm] = {
    "mocan": mocan,
    "mocan_newton": mocan_newton,
    "pecan": pecan,
    "primal_dual": primal_dual,
    "safe_rlhf": safe_rlhf,
    "dpo": dpo,
    "fixed_lambda": fixed_lambda,
    "reference": reference,
}


def get_algorithm(name: str) -> Algorithm:
    try:
        return ALGORITHMS[name]
    except KeyError:
        raise ValueError(f"algorithm.name: unknown {name!r}; choose one of {sorted(ALGORITHMS)}") from None
