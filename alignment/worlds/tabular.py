"""An exactly solvable world: N prompts, K listed candidates each, reward and safety tables, π_ref as logits.

Everything the language-model worlds estimate by sampling is exact here: the constrained optimum is the
closed-form π_λ* over the listed candidates, and a trained policy's gains and KL are finite sums. That makes
it the world in which the algorithms are tested to tight tolerances.

``Tables`` and ``make_tables`` draw the world; ``TabularPolicy`` is a policy over it; ``TabularWorld`` is its
implementation of the experiment's stages (alignment/worlds/base.py: ``World``). A policy is a
``TabularPolicy`` (``None`` = π_ref); the dual's prompts are all N prompts and evaluation is exact on them.
Responses are candidate ids; one response is one token.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from alignment.compute import ComputeMeter
from alignment.config import EvalConfig, SamplingConfig, ScorerConfig, TabularDatasetConfig, TrainerConfig
from alignment.dual import tilted_weights
from alignment.intervals import percentile_interval
from alignment.items import response_ids
from alignment.training import Objective, objective_for, train_items
from alignment.worlds.base import TrainingRun


@dataclass(frozen=True)
class Tables:
    reward: np.ndarray  # [N, K] helpfulness of each candidate
    safety: np.ndarray  # [N, K, m] safety utilities (higher = safer)
    ref_logits: np.ndarray  # [N, K] π_ref(y_k | x) = softmax(ref_logits)

    @property
    def shape(self) -> tuple[int, int, int]:
        return self.safety.shape  # type: ignore[return-value]

    def ref_probs(self) -> np.ndarray:
        return _softmax(self.ref_logits)


def make_tables(n_prompts: int, n_candidates: int, n_constraints: int, conflict: float,
                ref_helpful_bias: float, seed: int) -> Tables:
    """Draw a world with the paper's tension.

    Per candidate, helpfulness h ~ N(0, 1) and safety g_j = -conflict·h + sqrt(1 - conflict²)·ε_j: the more
    helpful answers are the less safe ones. Prompts differ in how harmful they are (a per-prompt offset of
    safety), and π_ref's logits lean towards helpful candidates (ref_helpful_bias·h + noise), so the reference
    puts real mass on unsafe answers and there is safety to gain at a reward cost.
    """
    rng = np.random.default_rng(seed)
    reward = rng.normal(size=(n_prompts, n_candidates))
    noise = rng.normal(size=(n_prompts, n_candidates, n_constraints))
    harmfulness = rng.normal(scale=0.5, size=(n_prompts, 1, 1))
    safety = -conflict * reward[:, :, None] + np.sqrt(max(1.0 - conflict**2, 0.0)) * noise - harmfulness
    ref_logits = ref_helpful_bias * reward + rng.normal(size=(n_prompts, n_candidates))
    return Tables(reward, safety, ref_logits)


def _softmax(logits: np.ndarray) -> np.ndarray:
    e = np.exp(logits - logits.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


class TabularPolicy(nn.Module):
    """π_θ(y_k | x_n) = softmax(θ_n)_k, θ initialised at π_ref's logits, which are kept as a buffer.

    The same interface the language-model policy has: ``sample`` responses for prompts, ``log_prob`` of given
    responses under the policy, ``ref_log_prob`` under π_ref.
    """

    def __init__(self, ref_logits: np.ndarray):
        super().__init__()
        ref = torch.as_tensor(ref_logits, dtype=torch.float64)
        self.register_buffer("ref_logits", ref.clone())
        self.logits = nn.Parameter(ref.clone())

    def probs(self) -> torch.Tensor:
        return torch.softmax(self.logits, dim=-1)

    @torch.no_grad()
    def sample(self, prompts: torch.Tensor, num_samples: int, generator: torch.Generator) -> torch.Tensor:
        """[B] prompt ids -> [B, num_samples] candidate ids drawn iid from π_θ."""
        return torch.multinomial(self.probs()[prompts], num_samples, replacement=True, generator=generator)

    def log_prob(self, prompts: torch.Tensor, responses: torch.Tensor) -> torch.Tensor:
        """log π_θ(responses | prompts): [B] prompt ids, [B, ...] candidate ids -> [B, ...]."""
        logp = torch.log_softmax(self.logits[prompts], dim=-1)
        return _gather(logp, responses)

    @torch.no_grad()
    def ref_log_prob(self, prompts: torch.Tensor, responses: torch.Tensor) -> torch.Tensor:
        logp = torch.log_softmax(self.ref_logits[prompts], dim=-1)
        return _gather(logp, responses)


def _gather(logp: torch.Tensor, responses: torch.Tensor) -> torch.Tensor:
    flat = responses.reshape(responses.shape[0], -1)
    return logp.gather(1, flat).reshape(responses.shape)


@dataclass(frozen=True)
class ExactEvaluation:
    reward_gain: float  # E_x E_π r - E_x E_ref r
    safety_gain: np.ndarray  # [m]
    kl: float  # E_x KL(π || π_ref)


def evaluate_exact(world: Tables, probs: np.ndarray) -> ExactEvaluation:
    """Exact gains and KL of a tabular policy given as probabilities [N, K]."""
    q = world.ref_probs()
    n = probs.shape[0]
    diff = probs - q
    with np.errstate(divide="ignore", invalid="ignore"):
        kl_terms = np.where(probs > 0, probs * (np.log(probs) - np.log(q)), 0.0)
    return ExactEvaluation(
        reward_gain=float((diff * world.reward).sum() / n),
        safety_gain=np.einsum("nk,nkm->m", diff, world.safety) / n,
        kl=float(kl_terms.sum() / n),
    )


# ----------------------------------------------------------------------------------------------------------
# The stages


class TabularRollouts:
    """Online rollouts over the tables (Safe-RLHF's loop): candidate ids sampled from the table being trained."""

    def __init__(self, world: TabularWorld):
        self.world = world
        self.compute = world.compute

    @torch.no_grad()
    def rollout(self, policy: TabularPolicy, rows: np.ndarray, k: int, generator: torch.Generator) -> torch.Tensor:
        self.compute.add(generated_tokens=len(rows) * k, policy_samples=len(rows) * k)
        return policy.sample(torch.as_tensor(rows), k, generator)

    def rollout_logprob(self, policy: TabularPolicy, rows: np.ndarray, responses: torch.Tensor) -> torch.Tensor:
        n = responses.numel()
        self.compute.add(forward_tokens=n, backward_tokens=n if torch.is_grad_enabled() else 0)
        return policy.log_prob(torch.as_tensor(rows), responses)

    @torch.no_grad()
    def rollout_ref_logprob(self, policy: TabularPolicy, rows: np.ndarray, responses: torch.Tensor) -> torch.Tensor:
        return policy.ref_log_prob(torch.as_tensor(rows), responses)

    def rollout_scores(self, rows: np.ndarray, responses: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        return self.world.score(responses.numpy(), rows)


class TabularWorld:
    """The tabular world's stages (``World``): drawn from ``dataset``'s seed, scored with ``scorer``'s
    directions, sampled as ``sampling`` says (K iid samples, or ``exact`` lists), evaluated exactly."""

    has_preference_data = False
    prompt_record = None

    def __init__(self, dataset: TabularDatasetConfig, scorer: ScorerConfig, sampling: SamplingConfig,
                 evaluation: EvalConfig, seed: int):
        d = dataset
        self.tables = make_tables(d.n_prompts, d.n_candidates, d.n_constraints, d.conflict, d.ref_helpful_bias,
                                  d.seed)
        self.scorer, self.sampling, self.evaluation, self.seed = scorer, sampling, evaluation, seed
        self.compute = ComputeMeter()
        self.rollouts = TabularRollouts(self)

    def sample_reference(self, generator: torch.Generator) -> tuple[np.ndarray, np.ndarray | None]:
        """K iid samples per prompt [N, K] (uniform dual weights), or every candidate with log π_ref."""
        n, k_all, _ = self.tables.shape
        if self.sampling.exact:
            ref_logprob = torch.log_softmax(torch.as_tensor(self.tables.ref_logits), dim=-1).numpy()
            return np.tile(np.arange(k_all), (n, 1)), ref_logprob
        k = self.sampling.num_samples
        self.compute.add(generated_tokens=n * k, policy_samples=n * k)
        return TabularPolicy(self.tables.ref_logits).sample(torch.arange(n), k, generator).numpy(), None

    def score(self, responses: np.ndarray, rows: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Reward [B, K] and safety [B, K, m] of candidate ids [B, K] of prompts ``rows`` (default: all)."""
        responses = np.asarray(responses)
        rows = (np.arange(responses.shape[0]) if rows is None else np.asarray(rows))[:, None]
        self.compute.add(scorer_calls=responses.size)
        reward = self.tables.reward[rows, responses] * self.scorer.reward.direction
        directions = np.array([s.direction for s in self.scorer.safety], dtype=float)
        return reward, self.tables.safety[rows, responses] * directions

    def dataset_pairs(self, lam: np.ndarray, labels: str, generator: torch.Generator) -> dict[str, torch.Tensor]:
        raise ValueError("algorithm.pair_source=dataset: the tabular world has no preference dataset")

    def dataset_preferences(self, objective: str) -> dict[str, torch.Tensor]:
        raise ValueError("the tabular world has no preference dataset")

    def _objective(self, objective: str, beta: float, anchor: float) -> Objective:
        def rho(policy: TabularPolicy, batch: dict[str, torch.Tensor]) -> torch.Tensor:
            ys, x = response_ids(batch), batch["prompt"]
            self.compute.add(forward_tokens=ys.numel(), backward_tokens=ys.numel() if torch.is_grad_enabled() else 0)
            return policy.log_prob(x, ys) - policy.ref_log_prob(x, ys)

        return objective_for(objective, rho, beta, anchor)

    def online_policy(self, spec: dict[str, Any], run: TrainingRun) -> tuple[TabularPolicy, dict[str, Any]]:
        """A policy trained from π_ref by ``run(policy, None) -> info``; tables train in seconds, so uncached."""
        policy = TabularPolicy(self.tables.ref_logits)
        info = run(policy, None)
        info.pop("history", None)
        return policy, {**info, "train/cached": False}

    def train(self, items: dict[str, torch.Tensor], *, trainer: TrainerConfig, beta: float, log: Any,
              progress: bool, objective: str = "pairwise", anchor: float = 0.0) -> tuple[TabularPolicy, dict[str, Any]]:
        """The one stage-2 loop on labelled pairs (or lists), from π_ref, with coefficient ``beta``."""
        def run(policy: TabularPolicy, work: Any) -> dict[str, Any]:
            result = train_items(policy, items, self._objective(objective, beta, anchor), cfg=trainer,
                                 seed=self.seed, log=log, progress=progress)
            self.compute.add(training_runs=1)
            return {"train/final_loss": result.final_loss, "train/steps": result.steps}

        return self.online_policy({}, run)

    @torch.no_grad()
    def logratio(self, policy: TabularPolicy, responses: np.ndarray, rows: np.ndarray | None = None) -> np.ndarray:
        """log π(y|x) - log π_ref(y|x) of the dual's responses [N, K] (PeCAN's implicit rewards, up to β); with
        ``rows``, of those prompts' only."""
        rows = np.arange(responses.shape[0]) if rows is None else np.asarray(rows)
        x = torch.as_tensor(rows)
        y = torch.as_tensor(responses[rows])
        self.compute.add(forward_tokens=y.numel())
        return (policy.log_prob(x, y) - policy.ref_log_prob(x, y)).numpy()

    @torch.no_grad()
    def policy_scores(self, policy: TabularPolicy, num_samples: int, generator: torch.Generator
                      ) -> tuple[np.ndarray, np.ndarray]:
        """Per-prompt mean reward [N] and safety [N, m] of a policy on the dual's prompts: exact under
        ``sampling.exact`` (every candidate weighted by π), else from ``num_samples`` samples per prompt."""
        n, k_all, _ = self.tables.shape
        if self.sampling.exact:
            probs = policy.probs().numpy()
            reward, safety = self.score(np.tile(np.arange(k_all), (n, 1)))
            self.compute.add(forward_tokens=n * k_all)
            return (probs * reward).sum(axis=1), np.einsum("nk,nkm->nm", probs, safety)
        responses = policy.sample(torch.arange(n), num_samples, generator).numpy()
        self.compute.add(generated_tokens=responses.size, policy_samples=responses.size)
        reward, safety = self.score(responses)
        return reward.mean(axis=1), safety.mean(axis=1)

    def evaluate(self, policy: TabularPolicy | None, lam: np.ndarray | None, beta: float, rng: np.random.Generator,
                 tracker: Any) -> dict[str, Any]:
        """Exact gains and KL of the trained table, bootstrap CIs over prompts, and its distance to π_λ."""
        e, tables = self.evaluation, self.tables
        q = tables.ref_probs()
        probs = q if policy is None else policy.probs().detach().numpy()
        exact = evaluate_exact(tables, probs)
        idx = rng.integers(0, probs.shape[0], size=(e.bootstrap, probs.shape[0]))
        safety_draws = np.einsum("nk,nkm->nm", probs - q, tables.safety)[idx].mean(axis=1)
        reward_draws = ((probs - q) * tables.reward).sum(axis=1)[idx].mean(axis=1)
        tv = None
        if lam is not None:
            target = tilted_weights(tables.reward, tables.safety, beta, lam, ref_logprob=tables.ref_logits)
            tv = float(0.5 * np.abs(probs - target).sum(axis=1).mean())
        return {
            "eval/reward_gain": exact.reward_gain,
            "eval/reward_gain_ci": percentile_interval(reward_draws, e.level),
            "eval/safety_gain": exact.safety_gain.tolist(),
            "eval/safety_gain_ci": percentile_interval(safety_draws, e.level),
            "eval/kl": exact.kl,
            "eval/safety_draws": safety_draws,
            "eval/reward_draws": reward_draws,
            # Score distributions before and after (figures): every candidate, weighted by its probability.
            "eval/scores": {"policy_safety": tables.safety[..., 0].ravel(), "policy_weight": probs.ravel() / len(q),
                            "reference_safety": tables.safety[..., 0].ravel(),
                            "reference_weight": q.ravel() / len(q)},
            # Distance to the closed-form π_λ on the full candidate lists: how well training reached its target.
            "eval/tv_to_target": tv,
            "eval/exact": True,
        }
