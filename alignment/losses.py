"""Stage-2 losses as pure functions of log-probability ratios.

Glossary: β ``beta``; log-ratio ρ(y) = log π_θ(y|x) - log π_ref(y|x); r_λ = r + λᵀg the composite reward.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def preference_labels(reward_1: torch.Tensor, reward_0: torch.Tensor, *, mode: str,
                      generator: torch.Generator | None = None) -> torch.Tensor:
    """Bradley-Terry probability that y1 beats y0 under a reward: p = σ(r(y1) - r(y0)), shape [B].

    mode "soft" returns p itself; "sampled" returns hard labels ~ Bernoulli(p) (the paper's MoCAN, whose
    expected loss is the soft loss, with more variance).
    """
    p = torch.sigmoid(reward_1 - reward_0)
    if mode == "soft":
        return p
    if mode == "sampled":
        return torch.bernoulli(p, generator=generator)
    raise ValueError(f"labels mode: 'soft' or 'sampled', got {mode!r}")


def pseudo_preference_loss(logratio_1: torch.Tensor, logratio_0: torch.Tensor, label: torch.Tensor,
                           beta: float) -> torch.Tensor:
    """DPO loss with (soft) labels, per pair, shape [B].

        h = β (ρ(y1) - ρ(y0)),   loss = -[p log σ(h) + (1 - p) log σ(-h)]

    For every prompt the expected loss is minimised when β ρ(y) = r_λ(y) + c(x), i.e. at π ∝ π_ref exp(r_λ/β):
    with p = σ(r_λ(y1) - r_λ(y0)) the optimum of stage 2 is the dual's π_λ (paper, Sec. 4). With p ∈ {0, 1}
    this is standard DPO (Rafailov et al. 2023, eq. 7).
    """
    h = beta * (logratio_1 - logratio_0)
    return -(label * F.logsigmoid(h) + (1 - label) * F.logsigmoid(-h))


def preference_metrics(logratio_1: torch.Tensor, logratio_0: torch.Tensor, label: torch.Tensor,
                       beta: float) -> dict[str, float]:
    """Implicit-reward margin β(ρ1 - ρ0) and label accuracy (the side the policy prefers agrees with p)."""
    h = beta * (logratio_1 - logratio_0)
    decided = label != 0.5
    agree = ((h > 0) == (label > 0.5)) & decided
    return {
        "reward_margin": float(h.mean()),
        "label_accuracy": float(agree.sum() / decided.sum().clamp(min=1)),
    }
