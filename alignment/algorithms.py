"""How each algorithm chooses λ. Everything else (sampling, scoring, stage 2, evaluation) is shared.

Names map to algorithms through one explicit dict, so the name in a config, a sweep folder and a figure legend
is greppable to its definition here.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from alignment.config import AlgorithmConfig
from alignment.dual import BootstrapResult, DualSolution, bootstrap, solve_dual


class InfeasibleMarginError(ValueError):
    """The configured margin is beyond what any reweighting of π_ref's samples can reach."""


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
        raise InfeasibleMarginError(f"safety.margin={margin.tolist()}: {sol.message}")
    intervals = None
    if cfg.dual.bootstrap > 1:
        intervals = bootstrap(reward, safety, margin, cfg.beta, ref_logprob=ref_logprob,
                              n_resamples=cfg.dual.bootstrap, level=cfg.dual.level, seed=seed, tol=cfg.dual.tol)
    return LambdaChoice(sol.lam, sol, intervals)


ChooseLambda = Callable[..., LambdaChoice]

ALGORITHMS: dict[str, ChooseLambda] = {
    "mocan": one_shot_dual,
}


def get_algorithm(name: str) -> ChooseLambda:
    try:
        return ALGORITHMS[name]
    except KeyError:
        raise ValueError(f"algorithm.name: unknown {name!r}; choose one of {sorted(ALGORITHMS)}") from None
