"""An exactly solvable world: N prompts, K listed candidates each, reward and safety tables, π_ref as logits.

Everything the language-model worlds estimate by sampling is exact here: the constrained optimum is the
closed-form π_λ* over the listed candidates, and a trained policy's gains and KL are finite sums. That makes
it the world in which the algorithms are tested to tight tolerances.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn


@dataclass(frozen=True)
class TabularWorld:
    reward: np.ndarray  # [N, K] helpfulness of each candidate
    safety: np.ndarray  # [N, K, m] safety utilities (higher = safer)
    ref_logits: np.ndarray  # [N, K] π_ref(y_k | x) = softmax(ref_logits)

    @property
    def shape(self) -> tuple[int, int, int]:
        return self.safety.shape  # type: ignore[return-value]

    def ref_probs(self) -> np.ndarray:
        return _softmax(self.ref_logits)


def make_world(n_prompts: int, n_candidates: int, n_constraints: int, conflict: float,
               ref_helpful_bias: float, seed: int) -> TabularWorld:
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
    return TabularWorld(reward, safety, ref_logits)


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


def evaluate_exact(world: TabularWorld, probs: np.ndarray) -> ExactEvaluation:
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
