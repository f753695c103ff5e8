"""Online Lagrangian policy optimisation, as Safe-RLHF's PPO-Lag does it (the primal-dual baseline that never
solves the dual in advance).

Each step, for a batch of B prompts with k fresh samples each from the current policy π_θ:

    shaped reward   R = r - β (log π_θ(y|x) - log π_ref(y|x))          KL penalty on the reward side only
    advantages      A_r = LOO(R),  A_g = LOO(g)                          LOO(v)_i = v_i - mean_{j≠i} v_j
    combined        A = (A_r + Σ_j λ_j A_gj) / (1 + Σ_j λ_j)             Safe-RLHF's normalisation
    PPO             L = -mean min(ρ A, clip(ρ, 1 ± ε) A),  ρ = π_θ(y|x) / π_old(y|x)   (``ppo_epochs`` passes)
    multiplier      slack = mean g - mean_{x in batch} E_ref g(x) - b,  λ ← LagrangeMultiplier.update(slack)

Differences from Safe-RLHF, on purpose: leave-one-out baselines over a prompt's k samples replace the learned
critics (no value model to train; RLOO, Ahmadian et al. 2024); ratios and advantages are per response, not per
token; and the whole KL penalty sits on the reward side. Safe-RLHF splits it between reward and cost, which
for fixed λ optimises E[r + λg] - (β/2)(1 + λ) KL: a different β at every λ. With the penalty on the reward
side, (E[r + λg] - β KL)/(1 + λ) is maximised by the same π_λ the dual describes, so the runs are comparable
on one constrained problem.

The world supplies rollouts, log-probabilities and scores (its ``rollouts``: ``Rollouts`` in
alignment/worlds/base.py); this module is the loop only.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from alignment import distributed, engines
from alignment.config import SafeRLHFConfig
from alignment.multiplier import LagrangeMultiplier
from alignment.worlds.base import Rollouts


def leave_one_out(values: torch.Tensor) -> torch.Tensor:
    """v_i - mean_{j≠i} v_j over dim 1 ([B, k, ...]): an unbiased baseline per prompt, k >= 2."""
    k = values.shape[1]
    return (values - values.mean(dim=1, keepdim=True)) * k / (k - 1)


def clipped_policy_loss(logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor,
                        clip_range: float) -> torch.Tensor:
    """PPO's clipped surrogate, negated for minimisation, averaged: all [B, k] -> scalar."""
    ratio = torch.exp(logp - old_logp)
    unclipped = ratio * advantages
    clipped = torch.clamp(ratio, 1 - clip_range, 1 + clip_range) * advantages
    return -torch.minimum(unclipped, clipped).mean()


@dataclass
class OnlineResult:
    lam: np.ndarray  # [m] the multiplier at the end
    history: list[dict[str, Any]] = field(default_factory=list)
    first_feasible_step: int | None = None  # first step whose batch slack was >= -tolerance


def safe_rlhf_train(rollouts: Rollouts, policy: nn.Module, *, cfg: SafeRLHFConfig, beta: float, margins: np.ndarray,
                    ref_safety: np.ndarray, seed: int, tolerance: float,
                    log: Callable[[dict[str, Any], int], None] | None = None,
                    progress: bool = True) -> OnlineResult:
    """Train ``policy`` (at π_ref on entry) in place; ``ref_safety`` [N, m] is E_ref g per dual prompt.

    Under a distributed launch each rank samples, scores and differentiates its share of every step's B prompts
    (the expensive part: generation), the engine of the accelerate config averages the gradients
    (``alignment.engines``), and the batch statistics (slack, reward, KL, loss) are summed over ranks, so every
    rank updates the multiplier alike. The step's prompts come from a generator every rank shares (``seed``),
    the rollouts from one per rank: the same seed and number of processes give the same run.
    """
    n, m = ref_safety.shape
    dist = distributed.current()
    k, batch = cfg.samples_per_prompt, min(cfg.prompts_per_step, n)
    if batch < dist.world_size:
        raise ValueError(f"algorithm.safe_rlhf.prompts_per_step: {batch} prompts per step cannot be shared by "
                         f"{dist.world_size} processes; raise it to at least {dist.world_size}")
    prompt_order = torch.Generator().manual_seed(seed)
    sampling = torch.Generator().manual_seed(seed * 1_000_003 + dist.rank)
    multiplier = LagrangeMultiplier(cfg.multiplier, m)
    engine = engines.start(policy, lr=cfg.lr, weight_decay=0.0, max_grad_norm=cfg.max_grad_norm,
                           micro_batch=batch, grad_accum=1)
    trainee, model = engine.trainee, engine.model
    result = OnlineResult(lam=multiplier.value.copy())
    bar = tqdm(range(1, cfg.steps + 1), desc="safe_rlhf", disable=None if progress and dist.is_main else True,
               leave=False)
    for step in bar:
        rows = torch.randperm(n, generator=prompt_order)[:batch].numpy()
        mine = rows[dist.shard(batch)]
        # Rollouts and old log-probabilities come from the whole, unwrapped policy, brought up to date with the
        # training (under FSDP and ZeRO-3 the trained module is in shards, which generate() cannot run on);
        # π_ref is the same policy with its adapter switched off.
        engine.sync_policy()
        policy.eval()
        with torch.no_grad():
            responses = rollouts.rollout(policy, mine, k, sampling)
            old_logp = rollouts.rollout_logprob(policy, mine, responses)
            ref_logp = rollouts.rollout_ref_logprob(policy, mine, responses)
        reward, safety = rollouts.rollout_scores(mine, responses)  # [b, k], [b, k, m]
        reward_t = torch.as_tensor(reward, dtype=old_logp.dtype)
        safety_t = torch.as_tensor(safety, dtype=old_logp.dtype)
        lam = torch.as_tensor(multiplier.value, dtype=old_logp.dtype)
        kl = old_logp - ref_logp
        shaped = reward_t - beta * kl
        advantages = (leave_one_out(shaped) + leave_one_out(safety_t) @ lam) / (1 + lam.sum())
        trainee.train()
        for _ in range(cfg.ppo_epochs):
            engine.zero_grad()
            with engine.accumulating(last=True):
                logp = rollouts.rollout_logprob(model, mine, responses)
                loss = clipped_policy_loss(logp, old_logp, advantages, cfg.clip_range)
                # The mean over this rank's b prompts, weighted into the mean over all B (x world size: the
                # engine averages the ranks' gradients).
                engine.backward(loss * (len(mine) * dist.world_size / batch), last=True)
            engine.step()
        # Sums over this rank's responses, then over ranks: [reward, KL, loss x b, safety_1..m].
        local = [float(reward.sum()), float(kl.sum()), float(loss.detach()) * len(mine),
                 *safety.sum(axis=(0, 1)).tolist()]
        totals = dist.sum(local)
        mean_safety = np.asarray(totals[3:]) / (batch * k)
        slack = mean_safety - ref_safety[rows].mean(axis=0) - margins
        if result.first_feasible_step is None and np.all(slack >= -tolerance):
            result.first_feasible_step = step
        row = {"lambda": multiplier.value.tolist(), "slack": slack.tolist(), "reward": totals[0] / (batch * k),
               "kl": totals[1] / (batch * k), "loss": totals[2] / batch}
        multiplier.update(slack)
        result.history.append({"step": step, **row})
        if log is not None and dist.is_main:
            log({"train/lambda": float(row["lambda"][0]), "train/slack": float(slack[0]),
                 "train/reward": row["reward"], "train/kl": row["kl"], "train/loss": row["loss"]}, step)
    bar.close()
    del model, trainee
    engine.finish()
    policy.eval()
    result.lam = multiplier.value.copy()
    return result
