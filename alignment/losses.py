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


def listwise_loss(logratio: torch.Tensor, target: torch.Tensor, base_logweight: torch.Tensor | None = None,
                  anchor: float = 0.0) -> torch.Tensor:
    """Cross-entropy from the target's weights to the policy's over each prompt's K responses, shape [B].

        q = softmax(b + t),   p = softmax(b + ρ),   loss = -Σ_k q_k log p_k

    with t = r_λ/β [B, K] and b = log π_ref of the responses for an exact candidate list (None: iid samples of
    π_ref, which carry π_ref already, b = 0). Its minimiser over ρ is ρ = t + c(x), i.e. π_θ ∝ π_ref exp(r_λ/β)
    on the responses' support: the dual's π_λ, reached with every response used once per pass. The loss minus
    the entropy of q is KL(q ‖ p) (``listwise_metrics``).

    The cross-entropy sees ρ only up to a constant per prompt, so it is indifferent to the policy moving
    probability between the sampled responses and ones it never saw. ``anchor`` = η > 0 adds η m²,
    m = log Σ_k softmax(b)_k e^{ρ_k} (the importance-sampling estimate of log π_θ(S)/π_ref(S) for the region S
    the samples stand for; alignment.fit's ``log_mass``), which fixes that constant at m = 0 without changing
    the minimiser's relative weights. On an exact list m = log Σ_y π_θ(y) = 0 whatever π_θ: no effect there.
    """
    base = torch.zeros_like(target) if base_logweight is None else base_logweight
    log_q = torch.log_softmax(base + target, dim=-1)
    base = base.to(logratio.dtype)
    loss = -(log_q.exp() * torch.log_softmax(base + logratio, dim=-1)).sum(dim=-1)
    if anchor:
        loss = loss + anchor * log_mass(logratio, base).square()
    return loss


def log_mass(logratio: torch.Tensor, base_logweight: torch.Tensor | None = None) -> torch.Tensor:
    """m = log Σ_k softmax(b)_k e^{ρ_k}, shape [B]: the policy's probability on each prompt's K responses
    relative to π_ref's (alignment.fit's ``log_mass``; 0 for π_ref, and on an exact list for any π_θ)."""
    base = torch.zeros_like(logratio) if base_logweight is None else base_logweight.to(logratio.dtype)
    return torch.logsumexp(torch.log_softmax(base, dim=-1) + logratio, dim=-1)


def target_entropy(target: torch.Tensor, base_logweight: torch.Tensor | None = None) -> torch.Tensor:
    """H(q) of the listwise target q = softmax(b + t), shape [B]: the listwise loss's minimum."""
    base = torch.zeros_like(target) if base_logweight is None else base_logweight
    log_q = torch.log_softmax(base + target, dim=-1)
    return -(log_q.exp() * log_q).sum(dim=-1)


def listwise_metrics(logratio: torch.Tensor, target: torch.Tensor, base_logweight: torch.Tensor | None = None,
                     cross_entropy: torch.Tensor | None = None) -> dict[str, float]:
    """Means over the batch of KL(q ‖ p) = cross-entropy - H(q) between the target's and the policy's weights (0
    at the target) and of the log-mass, which the cross-entropy does not see (``log_mass``).
    ``cross_entropy``: the batch's listwise losses without the anchor, when already computed."""
    rho = logratio.detach()
    if cross_entropy is None:
        cross_entropy = listwise_loss(rho, target, base_logweight)
    return {"kl_to_target": float((cross_entropy.detach() - target_entropy(target, base_logweight)).mean()),
            "log_mass": float(log_mass(rho, base_logweight).mean())}


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
