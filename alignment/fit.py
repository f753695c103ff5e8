"""How closely stage 2 fitted its target, measured on the dual's own samples (pure NumPy, no I/O).

Stage 2 at λ aims at π_λ ∝ π_ref exp(r_λ/β), r_λ = r + λᵀg. On the K samples y_1..y_K of π_ref for a prompt x,
π_λ reweights the samples by q_k ∝ b_k exp(t_k), t = r_λ/β, where b_k is 1 for iid samples (they are already
drawn from π_ref) and π_ref(y_k) for an exact candidate list. A trained policy π_θ reweights them by
p_k ∝ b_k exp(ρ_k), ρ = log π_θ - log π_ref. Stage 2 fits its target on these samples exactly when ρ = t + c(x),
i.e. p = q:

- ``target_kl``: the mean over prompts of KL(q ‖ p), 0 at an exact fit;
- ``slope``: the pooled within-prompt least-squares slope of ρ on t, 1 at an exact fit; below 1 the policy
  moved less than the target, above 1 further;
- ``corr``: the pooled within-prompt correlation of ρ and t: whether the policy moved in the target's direction
  at all (1 at an exact fit, whatever the slope);
- ``component_slopes`` (when the target's parts are given, t = Σ_c t_c: r/β and λ_j g_j/β): the coefficients
  of the within-prompt multiple regression of ρ on the parts, 1 each at an exact fit. The reward part usually
  dominates t, so a good overall slope can hide a safety part the policy barely learned: this shows it.
- ``log_mass``: the mean over prompts of log Σ_k w_k exp(ρ_k), w = softmax(log b), the importance-sampling
  estimate of log π_θ(S)/π_ref(S) for the region S the samples stand for: 0 for π_ref and, up to the K-sample
  estimate, for π_λ (whose normaliser the dual estimates on the same samples); below 0 the policy moved
  probability onto responses stage 2 never saw, which costs KL the target does not spend. The objectives fit
  ρ up to a constant per prompt, so only this number shows that shift (exactly 0 on an exact list).

A gap between the dual's predicted gains and the achieved ones then splits into estimation (the dual on K
samples), fit (these numbers) and generalisation (held-out prompts).
"""

from __future__ import annotations

from typing import Any

import numpy as np
from scipy.special import log_softmax, logsumexp

__all__ = ["fit_diagnostics"]


def fit_diagnostics(target: np.ndarray, logratio: np.ndarray, base_logweight: np.ndarray | None = None,
                    components: np.ndarray | None = None) -> dict[str, Any]:
    """``target`` t = r_λ/β and ``logratio`` ρ, both [N, K] on the dual's samples; ``base_logweight`` log b
    [N, K] (None: iid samples, b = 1); ``components`` [N, K, C] parts of t that sum to it (optional). Returns
    ``target_kl``, ``slope``, ``corr``, ``log_mass`` and, with components, ``component_slopes`` [C] (module docstring).
    """
    t = np.asarray(target, dtype=np.float64)
    rho = np.asarray(logratio, dtype=np.float64)
    if t.shape != rho.shape or t.ndim != 2:
        raise ValueError(f"fit_diagnostics: target and logratio must both be [N, K], got {t.shape} and {rho.shape}")
    base = np.zeros_like(t) if base_logweight is None else np.asarray(base_logweight, dtype=np.float64)
    log_q = log_softmax(base + t, axis=1)
    log_p = log_softmax(base + rho, axis=1)
    # Each prompt's KL is >= 0; at an exact fit rounding can leave -1e-17, which is 0.
    target_kl = max(float(np.mean(np.sum(np.exp(log_q) * (log_q - log_p), axis=1))), 0.0)
    # Within-prompt deviations, weighted like the samples (b), so constants per prompt drop out.
    log_w = log_softmax(base, axis=1)
    w = np.exp(log_w)
    tc = t - np.sum(w * t, axis=1, keepdims=True)
    rc = rho - np.sum(w * rho, axis=1, keepdims=True)
    stt, srr, str_ = float(np.sum(w * tc * tc)), float(np.sum(w * rc * rc)), float(np.sum(w * tc * rc))
    slope = str_ / stt if stt > 0 else float("nan")
    corr = float(str_ / np.sqrt(stt * srr)) if stt > 0 and srr > 0 else float("nan")
    log_mass = float(np.mean(logsumexp(log_w + rho, axis=1)))
    out: dict[str, Any] = {"target_kl": target_kl, "slope": slope, "corr": corr, "log_mass": log_mass}
    if components is not None:
        parts = np.asarray(components, dtype=np.float64)
        if parts.shape[:2] != t.shape:
            raise ValueError(f"fit_diagnostics: components must be [N, K, C] with [N, K] = {t.shape}, "
                             f"got {parts.shape}")
        pc = parts - np.einsum("nk,nkc->nc", w, parts)[:, None, :]
        gram = np.einsum("nk,nkc,nkd->cd", w, pc, pc)  # [C, C]
        cross = np.einsum("nk,nkc,nk->c", w, pc, rc)  # [C]
        try:
            out["component_slopes"] = np.linalg.solve(gram, cross).tolist()
        except np.linalg.LinAlgError:  # a part constant within every prompt (e.g. λ_j = 0) has no slope
            out["component_slopes"] = [float("nan")] * parts.shape[2]
    return out
