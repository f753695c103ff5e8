"""What an experiment needs from a world: the ``World`` protocol every world implements.

A world owns prompts, a reference policy π_ref, scorers and a way to train and evaluate a policy. It hands the
experiment response ids [N, K] of π_ref's samples (into a table of candidates or of generated texts) and their
scores; the algorithms turn those into stage-2 items (alignment/items.py) and ask the world to train on them
with the one training loop; evaluation returns the same ``eval/*`` keys in every world. Settings that belong to
an algorithm (β, the label mode, the trainer) are passed in as values, never read from the config here.

A *policy* is world-specific (a ``TabularPolicy``, a ``TrainedAdapter``); ``None`` stands for π_ref.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

import numpy as np
import torch

from alignment.compute import ComputeMeter
from alignment.config import TrainerConfig

# (policy or model, work dir or None) -> summary entries of a training: what an algorithm's training does, run
# by the world on its own policy object (tabular: a table from π_ref; language: the LoRA model at its initial
# adapter), cached or not as the world decides.
TrainingRun = Callable[[Any, Any], dict[str, Any]]


class Rollouts(Protocol):
    """Fresh samples of a policy being trained online (Safe-RLHF's loop, alignment/online.py), their
    log-probabilities under it and under π_ref, and their scores. ``rows``: prompt indices into the dual's
    prompts; responses are world-specific (ids [B, k] or texts)."""

    compute: ComputeMeter

    def rollout(self, policy: Any, rows: np.ndarray, k: int, generator: torch.Generator) -> Any: ...

    def rollout_logprob(self, policy: Any, rows: np.ndarray, responses: Any) -> torch.Tensor: ...

    def rollout_ref_logprob(self, policy: Any, rows: np.ndarray, responses: Any) -> torch.Tensor: ...

    def rollout_scores(self, rows: np.ndarray, responses: Any) -> tuple[np.ndarray, np.ndarray]: ...


class World(Protocol):
    """The stages of an experiment in one world (tabular: alignment/worlds/tabular.py; language models:
    alignment/worlds/language/)."""

    compute: ComputeMeter  # what the algorithm spent (alignment/compute.py)
    prompt_record: dict[str, Any] | None  # real prompt sets: which went where (written to prompts.json)
    has_preference_data: bool  # the dataset has its own preference pairs (PKU-SafeRLHF)
    rollouts: Rollouts

    def sample_reference(self, generator: torch.Generator) -> tuple[np.ndarray, np.ndarray | None]:
        """π_ref's responses [N, K] on the dual's prompts, and log π_ref [N, K] for exact lists (else None)."""
        ...

    def score(self, responses: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Reward [N, K] and safety [N, K, m] (higher = safer, directions applied) of response ids [N, K]."""
        ...

    def dataset_pairs(self, lam: np.ndarray, labels: str, generator: torch.Generator) -> dict[str, torch.Tensor]:
        """The dataset's own response pairs, labelled by σ(r_λ(y1) - r_λ(y0)) (``labels``: soft or sampled)."""
        ...

    def dataset_preferences(self, objective: str) -> dict[str, torch.Tensor]:
        """The dataset's own preference pairs with hard labels (``helpful`` or ``safe``)."""
        ...

    def train(self, items: dict[str, torch.Tensor], *, trainer: TrainerConfig, beta: float, log: Any,
              progress: bool, objective: str = "pairwise", anchor: float = 0.0) -> tuple[Any, dict[str, Any]]:
        """The one stage-2 loop (alignment/training.py) on pairs or lists, from π_ref; (policy, train/* info)."""
        ...

    def online_policy(self, spec: dict[str, Any], run: TrainingRun) -> tuple[Any, dict[str, Any]]:
        """A policy trained from π_ref by ``run`` (an online algorithm's own loop), keyed by ``spec``."""
        ...

    def logratio(self, policy: Any, responses: np.ndarray, rows: np.ndarray | None = None) -> np.ndarray:
        """log π(y|x) - log π_ref(y|x) of the dual's responses [N, K]; with ``rows``, of those prompts' only,
        [len(rows), K]."""
        ...

    def policy_scores(self, policy: Any, num_samples: int, generator: torch.Generator
                      ) -> tuple[np.ndarray, np.ndarray]:
        """Per-prompt mean reward [N] and safety [N, m] of a policy on the dual's prompts."""
        ...

    def evaluate(self, policy: Any, lam: np.ndarray | None, beta: float, rng: np.random.Generator,
                 tracker: Any) -> dict[str, Any]:
        """Held-out (or exact) gains with bootstrap intervals: the ``eval/*`` keys, plus draws and score arrays
        for the run's arrays.npz; ``lam``, ``beta``: the target π_λ where the world can measure the distance."""
        ...

