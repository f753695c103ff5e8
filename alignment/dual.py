"""Stage 1 of MoCAN / PeCAN: the dual pre-optimisation, as pure functions of arrays.

Problem (paper, eq. 2), for prompts x, K listed responses y_1..y_K per prompt, reference weights
q_k = π_ref(y_k | x) over the listed responses (uniform when the responses are iid samples of π_ref):

    max_π  E_x [ E_π r - β KL(π || π_ref) ]   s.t.   E_x E_π g_j - E_x E_ref g_j >= b_j,  j = 1..m

For λ >= 0 the Lagrangian maximiser is the tilted policy π_λ(y_k|x) ∝ q_k exp((r_k + λᵀg_k)/β), and the dual
(paper, eq. 5) is

    D(λ)   = β E_x log Σ_k q_k exp((r_k + λᵀg_k)/β)  -  λᵀ(E_x E_ref g + b)
    ∇D(λ)  = E_x E_{π_λ} g - E_x E_ref g - b                       (minus the constraint slack of π_λ)
    ∇²D(λ) = (1/β) E_x Cov_{π_λ}(g)                                (m x m, positive semi-definite)

λ* = argmin_{λ >= 0} D(λ) is found by projected Newton (Bertsekas 1982) with an Armijo search along the
projection arc. m is 1-3, so each iteration is one vectorised pass over the N x K x m scores plus an m x m
solve, and convergence is quadratic: a handful of iterations to machine precision.

Nothing here does I/O, reads a config or prints; infeasibility is reported in the result, never as a huge λ.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from alignment.intervals import percentile_bounds

__all__ = [
    "DualSolution",
    "DualTerms",
    "BootstrapResult",
    "Interval",
    "dual_path",
    "dual_terms",
    "reachable_margin",
    "reference_means",
    "solve_dual",
    "solve_front",
    "bootstrap",
    "tilted_weights",
]

_ARMIJO = 1e-4  # sufficient-decrease constant of the line search
_MAX_HALVINGS = 200


@dataclass(frozen=True)
class DualSolution:
    """λ* and what it predicts about π_{λ*}, all measured on the listed responses.

    lam: [m] multipliers (exact zeros for inactive constraints). value: D(lam). grad: [m] ∇D(lam), i.e. the
    predicted safety gain minus the margin. predicted_safety_gain: [m] E_x E_{π_λ} g - E_x E_ref g.
    predicted_reward_gain: E_x E_{π_λ} r - E_x E_ref r. predicted_kl: E_x KL(π_λ || π_ref).
    reachable_margin: [m] the largest margin each constraint could reach alone (E_x max_k g - E_x E_ref g).
    """

    lam: np.ndarray
    value: float
    grad: np.ndarray
    iterations: int
    converged: bool
    feasible: bool
    predicted_safety_gain: np.ndarray
    predicted_reward_gain: float
    predicted_kl: float
    message: str
    margin: np.ndarray = field(default_factory=lambda: np.zeros(0))
    reachable_margin: np.ndarray = field(default_factory=lambda: np.zeros(0))
    history: tuple[np.ndarray, ...] = ()  # λ_t of every iterate, for convergence plots


@dataclass(frozen=True)
class DualTerms:
    """D, ∇D, ∇²D and the predictions at one λ (see the module docstring for the formulas)."""

    value: float
    grad: np.ndarray  # [m]
    hessian: np.ndarray  # [m, m]
    safety_gain: np.ndarray  # [m]
    reward_gain: float
    kl: float


@dataclass(frozen=True)
class _Problem:
    """Validated float64 arrays, laid out for the solver's hot loop.

    log_q: [N, K] log reference weights (-inf = outside the support). base: [N, K] log q + r/β.
    safety_t: [m, N, K] contiguous copy of g (one BLAS call per λ, one vector op per constraint).
    """

    reward: np.ndarray  # [N, K]
    safety: np.ndarray  # [N, K, m]
    log_q: np.ndarray  # [N, K]
    margin: np.ndarray  # [m]
    beta: float
    ref_safety: np.ndarray  # [m]  E_x E_ref g
    ref_reward: float  # E_x E_ref r
    base: np.ndarray  # [N, K]
    safety_t: np.ndarray  # [m, N, K]

    @property
    def m(self) -> int:
        return self.safety.shape[2]

    def with_margin(self, margin: np.ndarray) -> _Problem:
        return replace(self, margin=margin)


def reference_means(scores: np.ndarray, ref_logprob: np.ndarray | None) -> np.ndarray:
    """E_ref of per-response scores for each prompt: [N, K, ...] -> [N, ...]; the sample mean over K iid
    samples (``ref_logprob`` None), or the weights softmax_k(ref_logprob) of an exact list. The one E_ref of
    the package: the dual's E_ref g and the algorithms' per-prompt baselines both come from here."""
    if ref_logprob is None:
        return scores.mean(axis=1)
    w = np.exp(ref_logprob - ref_logprob.max(axis=1, keepdims=True))
    w /= w.sum(axis=1, keepdims=True)
    return np.einsum("nk,nk...->n...", w, scores)


def _problem(reward: np.ndarray, safety: np.ndarray, log_q: np.ndarray, margin: np.ndarray,
             beta: float) -> _Problem:
    """The solver's layout. E_x E_ref g is ``reference_means`` averaged over prompts, written as one contraction
    with q = exp(log_q) (the order of summation every λ* so far was computed with)."""
    n = reward.shape[0]
    q = np.exp(log_q)
    ref_safety = np.einsum("nk,nkm->m", q, safety) / n
    ref_reward = float(np.einsum("nk,nk->", q, reward) / n)
    base = log_q + reward / beta
    safety_t = np.ascontiguousarray(np.moveaxis(safety, 2, 0))
    return _Problem(reward, safety, log_q, margin, beta, ref_safety, ref_reward, base, safety_t)


# ----------------------------------------------------------------------------------------------------------
# Input handling


def _as_array(x: Any, name: str) -> np.ndarray:
    if hasattr(x, "detach"):  # torch.Tensor without importing torch
        x = x.detach().cpu().double().numpy()
    try:
        arr = np.asarray(x, dtype=np.float64)
    except (TypeError, ValueError) as err:
        raise ValueError(f"{name}: expected a numeric array or tensor, got {type(x).__name__}") from err
    return arr


def _check_finite(arr: np.ndarray, name: str) -> None:
    if not np.all(np.isfinite(arr)):
        bad = int(np.size(arr) - np.isfinite(arr).sum())
        raise ValueError(f"{name}: {bad} NaN or inf values; score every response with a finite number")


def _prepare(reward: Any, safety: Any, margin: Any, beta: float, ref_logprob: Any) -> _Problem:
    r = _as_array(reward, "reward")
    if r.ndim != 2:
        raise ValueError(f"reward: expected shape [N, K], got {r.shape}")
    n, k = r.shape
    if n < 1:
        raise ValueError("reward: needs at least one prompt (N >= 1)")
    if k < 2:
        raise ValueError(f"reward: needs K >= 2 responses per prompt to reweight, got K = {k}")
    _check_finite(r, "reward")

    g = _as_array(safety, "safety")
    if g.ndim == 2:
        g = g[:, :, None]
    if g.ndim != 3 or g.shape[:2] != (n, k):
        raise ValueError(f"safety: expected shape [N, K] or [N, K, m] with N, K = {n}, {k}; got {g.shape}")
    if g.shape[2] < 1:
        raise ValueError("safety: needs at least one constraint (m >= 1)")
    _check_finite(g, "safety")
    m = g.shape[2]

    b = _as_array(margin, "margin")
    if b.ndim == 0:
        b = np.full(m, float(b))
    if b.ndim != 1 or b.shape[0] != m:
        raise ValueError(f"margin: expected a float or {m} values (one per constraint), got shape {b.shape}")
    _check_finite(b, "margin")

    try:
        beta = float(beta)
    except (TypeError, ValueError) as err:
        raise ValueError(f"beta: expected a positive float, got {beta!r}") from err
    if not np.isfinite(beta) or beta <= 0:
        raise ValueError(f"beta: must be a finite number > 0 (the KL coefficient), got {beta}")

    if ref_logprob is None:
        log_q = np.full((n, k), -np.log(k))
    else:
        lp = _as_array(ref_logprob, "ref_logprob")
        if lp.shape != (n, k):
            raise ValueError(f"ref_logprob: expected shape [N, K] = {(n, k)}, got {lp.shape}")
        if np.isnan(lp).any() or np.isposinf(lp).any():
            raise ValueError("ref_logprob: NaN or +inf values; use -inf only for responses outside the support")
        if np.isneginf(lp).all(axis=1).any():
            raise ValueError("ref_logprob: some prompt has every response at -inf (empty reference support)")
        log_q = lp - _logsumexp(lp)[:, None]

    return _problem(r, g, log_q, b, beta)


def _logsumexp(s: np.ndarray) -> np.ndarray:
    """Row-wise log Σ exp over the last axis, stable, with -inf entries allowed. [N, K] -> [N]."""
    top = s.max(axis=-1)
    with np.errstate(invalid="ignore"):
        return top + np.log(np.exp(s - top[..., None]).sum(axis=-1))


# ----------------------------------------------------------------------------------------------------------
# The dual at one point


class _Point:
    """D at one λ, with what is needed to finish ∇D, ∇²D and the predictions there without recomputing.

    One pass computes s = log q + (r + λᵀg)/β, its row maxima and e = exp(s - max), i.e. π_λ up to the
    per-prompt normaliser z; the line search needs only ``value``, accepted points also ``finish()``.
    """

    def __init__(self, p: _Problem, lam: np.ndarray):
        self.p, self.lam = p, lam
        with np.errstate(over="ignore", invalid="ignore"):  # overflow only on rejected line-search trials
            s = p.base + np.tensordot(lam / p.beta, p.safety_t, axes=1)
            top = s.max(axis=1)
            s -= top[:, None]
            self.e = np.exp(s, out=s)  # [N, K], exactly 0 off the support
            self.z = self.e.sum(axis=1)  # [N]
            self.lse = top + np.log(self.z)
            self.value = float(p.beta * self.lse.mean() - lam @ (p.ref_safety + p.margin))
        self.grad: np.ndarray | None = None
        self.hessian: np.ndarray | None = None

    def finish(self, *, hessian: bool = True) -> None:
        """∇D = E_x E_{π_λ} g - E_ref g - b and ∇²D = E_x Cov_{π_λ}(g) / β, from m + m(m+1)/2 passes.

        Idempotent: the weights and the gradient are computed once, the Hessian once when first asked for.
        """
        p, n = self.p, self.p.reward.shape[0]
        if self.grad is None:
            self.e /= self.z[:, None]  # in place: e becomes π_λ
            self.weighted = [self.e * g for g in p.safety_t]  # π_λ g_j, [m] x [N, K]
            self.mean_g = np.stack([wg.sum(axis=1) for wg in self.weighted], axis=1)  # E_{π_λ}[g | x]
            self.safety_gain = self.mean_g.mean(axis=0) - p.ref_safety
            self.grad = self.safety_gain - p.margin
        if hessian and self.hessian is None:
            second = np.empty((p.m, p.m))
            for i in range(p.m):
                for j in range(i, p.m):
                    second[i, j] = second[j, i] = np.dot(self.weighted[i].ravel(), p.safety_t[j].ravel())
            self.hessian = (second - self.mean_g.T @ self.mean_g) / (n * p.beta)

    @property
    def weights(self) -> np.ndarray:
        """π_λ over the listed responses, [N, K]."""
        self.finish(hessian=False)
        return self.e

    def terms(self) -> DualTerms:
        """Everything, including the predicted reward gain and KL(π_λ || π_ref) (computed once, at the end).

        log π_λ - log q = (r + λᵀg)/β - lse on the support, so KL = E_x[(E_{π_λ} r + λᵀE_{π_λ} g)/β - lse]
        needs no pass beyond E_{π_λ} r.
        """
        self.finish()
        p = self.p
        mean_r = np.einsum("nk,nk->n", self.e, p.reward)  # E_{π_λ}[r | x], [N]
        reward_gain = float(mean_r.mean()) - p.ref_reward
        kl = float(np.mean((mean_r + self.mean_g @ self.lam) / p.beta - self.lse))
        return DualTerms(self.value, self.grad, self.hessian, self.safety_gain, reward_gain, max(kl, 0.0))


def _terms(p: _Problem, lam: np.ndarray) -> DualTerms:
    return _Point(p, lam).terms()


def dual_terms(
    reward: Any, safety: Any, margin: Any, beta: float, lam: Any, *, ref_logprob: Any = None
) -> DualTerms:
    """D(λ), ∇D(λ), ∇²D(λ) and the predicted gains of π_λ at a given λ (for plots and checks)."""
    return dual_path(reward, safety, margin, beta, [lam], ref_logprob=ref_logprob)[0]


def dual_path(
    reward: Any, safety: Any, margin: Any, beta: float, lams: Any, *, ref_logprob: Any = None
) -> list[DualTerms]:
    """:func:`dual_terms` at each of G points ``lams`` ([G, m]), validating and laying out the scores once
    (dual curves for plots evaluate D on a grid)."""
    p = _prepare(reward, safety, margin, beta, ref_logprob)
    grid = _as_array(lams, "lam")
    grid = grid.reshape(len(grid), -1) if grid.ndim else grid.reshape(1, 1)
    if grid.shape[1] != p.m:
        raise ValueError(f"lam: expected {p.m} values per point, got {grid.shape[1]}")
    return [_terms(p, lam) for lam in grid]


def tilted_weights(reward: Any, safety: Any, beta: float, lam: Any, *, ref_logprob: Any = None) -> np.ndarray:
    """π_λ(y_k | x) over the listed responses, [N, K]: softmax_k(log q_k + (r_k + λᵀg_k)/β)."""
    p = _prepare(reward, safety, 0.0, beta, ref_logprob)
    return _Point(p, _as_array(lam, "lam").reshape(p.m)).weights


def reachable_margin(p: _Problem) -> np.ndarray:
    """[m] the largest margin each constraint can reach alone: E_x max_{k in support} g_k - E_x E_ref g."""
    if np.isfinite(p.log_q).all():
        best = p.safety.max(axis=1)  # [N, m]
    else:
        best = np.where(np.isfinite(p.log_q)[:, :, None], p.safety, -np.inf).max(axis=1)
    return best.mean(axis=0) - p.ref_safety


# ----------------------------------------------------------------------------------------------------------
# Projected Newton


def _newton_direction(lam: np.ndarray, grad: np.ndarray, hessian: np.ndarray) -> np.ndarray:
    """Bertsekas' projected-Newton direction.

    Coordinates at the bound whose gradient pushes them below zero are held (direction -grad, which the
    projection zeroes); Newton on the free block, with a relative ridge so that a flat direction
    (Cov_{π_λ} g singular) still gives a finite descent step.
    """
    free = ~((lam <= 0) & (grad > 0))
    d = -grad.copy()
    if free.any():
        h = hessian[np.ix_(free, free)]
        d_free = -grad[free]
        if np.trace(h) > 0:
            with np.errstate(all="ignore"):
                try:
                    d_free = -np.linalg.solve(h + 1e-12 * np.trace(h) * np.eye(len(h)), grad[free])
                except np.linalg.LinAlgError:
                    d_free = -grad[free]
        if not np.all(np.isfinite(d_free)) or d_free @ grad[free] >= 0:
            d_free = -grad[free]  # not a descent direction: fall back to steepest descent
        d[free] = d_free
    return d


def newton_correction(lam: Any, slack: Any, hessian: Any) -> np.ndarray:
    """One projected Newton step from λ on a measured slack: λ' = Π_{λ >= 0}(λ + d), with d the projected-Newton
    direction for gradient ``slack`` [m] and curvature ``hessian`` [m, m] (Bertsekas; _newton_direction).

    ∇D(λ) is the slack E_{π_λ} g - E_ref g - b of π_λ and ∇²D(λ) = E_x Cov_{π_λ}(g|x)/β its derivative in λ. If a
    trained policy's slack s moves with λ as π_λ's does, the λ whose trained policy has zero slack is λ - H⁻¹s:
    a constraint that the policy trained at λ* misses by -s gets λ raised by H⁻¹(-s). Shapes: [m], [m], [m, m].
    """
    lam = np.asarray(lam, dtype=np.float64).reshape(-1)
    slack = np.asarray(slack, dtype=np.float64).reshape(lam.shape)
    hessian = np.asarray(hessian, dtype=np.float64).reshape(len(lam), len(lam))
    _check_finite(slack, "slack")
    return np.maximum(lam + _newton_direction(lam, slack, hessian), 0.0)


def _projected_gradient_norm(lam: np.ndarray, grad: np.ndarray) -> float:
    """‖λ - Π_{λ >= 0}(λ - ∇D)‖∞: zero exactly at a KKT point of min_{λ >= 0} D."""
    return float(np.abs(lam - np.maximum(lam - grad, 0.0)).max())


def _solve(p: _Problem, lam0: Any, tol: float, max_iter: int) -> DualSolution:
    reach = reachable_margin(p)
    # Scale of the scores: the stopping rule and the divergence test are relative to it.
    scale = max(float(np.abs(p.safety).max()), float(np.abs(p.margin).max()), 1.0)
    bad = np.flatnonzero(p.margin >= reach - 1e-12 * scale)
    if bad.size:
        parts = ", ".join(f"constraint {j}: margin {p.margin[j]:.6g} >= reachable {reach[j]:.6g}" for j in bad)
        return _infeasible(p, reach, 0, f"infeasible margin ({parts}); the largest reachable margins on "
                           f"these responses are {np.array2string(reach, precision=6)}. Lower the margin "
                           "or sample more responses per prompt.")

    lam = np.zeros(p.m) if lam0 is None else np.maximum(_as_array(lam0, "lam0").reshape(p.m), 0.0)
    history = [lam.copy()]
    point = _Point(p, lam)
    point.finish(hessian=False)
    lam_ceiling = 1e12 * max(p.beta, 1.0) / scale  # λ beyond this means D has no finite minimiser
    # λ's natural unit: reward spread per unit of safety spread (λ trades one for the other).
    # A strided subsample is plenty for a safeguard's scale and keeps setup off the hot path.
    lam_unit = max(float(p.reward.ravel()[::97].std()), 1e-12) / max(float(p.safety.ravel()[::97].std()), 1e-12)
    converged = _projected_gradient_norm(lam, point.grad) <= tol * scale
    iterations = 0
    while not converged and iterations < max_iter:
        iterations += 1
        point.finish(hessian=True)
        d = _newton_direction(lam, point.grad, point.hessian)
        # Safeguard: when π_λ is nearly deterministic the Hessian vanishes and a Newton step can leap by
        # 1e200; cap each move at 10x the current λ (or λ's natural unit), so λ can still grow geometrically.
        step = min(1.0, 10.0 * max(float(np.abs(lam).max()), lam_unit) / max(float(np.abs(d).max()), 1e-300))
        for _ in range(_MAX_HALVINGS):
            cand = np.maximum(lam + step * d, 0.0)
            trial = _Point(p, cand)
            if not np.isfinite(trial.value):
                step *= 1e-3  # overshot into overflow: shrink fast
            elif trial.value <= point.value + _ARMIJO * float(point.grad @ (cand - lam)):
                break
            else:
                step *= 0.5
        else:
            break  # no decrease representable in float64: λ is optimal to machine precision
        lam, point = cand, trial
        point.finish(hessian=False)
        history.append(lam.copy())
        converged = _projected_gradient_norm(lam, point.grad) <= tol * scale
        if np.max(lam) > lam_ceiling:
            return _infeasible(p, reach, iterations, "the margins are jointly unreachable: λ diverged along "
                               f"{np.array2string(lam / np.linalg.norm(lam), precision=4)}; each constraint "
                               f"alone can reach at most {np.array2string(reach, precision=6)}. Lower the "
                               "margins or sample more responses per prompt.")
    if not converged:
        # Machine-precision floor: accept a projected gradient within 1000 tol (reported in the message).
        converged = _projected_gradient_norm(lam, point.grad) <= 1e3 * tol * scale
    t = point.terms()
    msg = "converged" if converged else f"not converged after {iterations} iterations"
    msg += f" (projected gradient {_projected_gradient_norm(lam, t.grad):.2e}); active constraints: " \
           f"{np.flatnonzero(lam > 0).tolist()}"
    return DualSolution(
        lam=lam, value=t.value, grad=t.grad, iterations=iterations, converged=bool(converged), feasible=True,
        predicted_safety_gain=t.safety_gain, predicted_reward_gain=t.reward_gain, predicted_kl=t.kl,
        message=msg, margin=p.margin, reachable_margin=reach, history=tuple(history),
    )


def _infeasible(p: _Problem, reach: np.ndarray, iterations: int, message: str) -> DualSolution:
    nan = np.full(p.m, np.nan)
    return DualSolution(
        lam=np.full(p.m, np.inf), value=-np.inf, grad=nan, iterations=iterations, converged=False,
        feasible=False, predicted_safety_gain=nan, predicted_reward_gain=float("nan"),
        predicted_kl=float("nan"), message=message, margin=p.margin, reachable_margin=reach,
    )


def solve_dual(
    reward: Any,
    safety: Any,
    margin: Any,
    beta: float,
    *,
    ref_logprob: Any = None,
    lam0: Any = None,
    tol: float = 1e-9,
    max_iter: int = 100,
) -> DualSolution:
    """λ* = argmin_{λ >= 0} D(λ) for the empirical dual, by projected Newton.

    Args:
        reward: [N, K] reward r of K responses for each of N prompts.
        safety: [N, K] or [N, K, m] safety utilities g (higher = safer; negate a cost explicitly).
        margin: float or [m]; the constraint is E_π g_j - E_ref g_j >= margin_j.
        beta: KL coefficient β > 0 (the same β as stage 2).
        ref_logprob: optional [N, K]; π_ref over the listed responses is softmax(ref_logprob) per prompt
            (exact worlds listing every candidate; -inf marks a response outside the support). Default:
            uniform, i.e. the K responses are iid samples of π_ref.
        lam0: optional warm start [m].
        tol: stop when ‖λ - Π₊(λ - ∇D)‖∞ <= tol · max(1, max|g|).
        max_iter: Newton iterations.

    Returns:
        DualSolution; infeasible margins give ``feasible=False`` and the largest reachable margin in
        ``message`` and ``reachable_margin``.

    Raises:
        ValueError naming the argument for NaN/inf scores, shape mismatches, beta <= 0, K < 2 or a margin of
        the wrong length.
    """
    if not tol > 0:
        raise ValueError(f"tol: must be > 0, got {tol}")
    if int(max_iter) < 1:
        raise ValueError(f"max_iter: must be >= 1, got {max_iter}")
    p = _prepare(reward, safety, margin, beta, ref_logprob)
    return _solve(p, lam0, tol, int(max_iter))


def projected_gradient_descent(reward: Any, safety: Any, margin: Any, beta: float, *, ref_logprob: Any = None,
                               step: float = 3.0, tol: float = 1e-9, max_iter: int = 20000
                               ) -> tuple[np.ndarray, list[np.ndarray]]:
    """The paper's notebooks' solver, as a peer for benchmarks and convergence plots (not used by the harness).

    λ_0 = 1, λ ← max(0, λ - step ∇D(λ)); whenever D increases, restart from λ = 1 with the step halved.
    Stops when the projected gradient is below ``tol``. Returns λ and every accepted iterate.
    """
    p = _prepare(reward, safety, margin, beta, ref_logprob)

    def point(lam: np.ndarray) -> _Point:
        pt = _Point(p, lam)
        pt.finish(hessian=False)
        return pt

    lam = np.ones(p.m)
    current = point(lam)
    history = [lam.copy()]
    for _ in range(max_iter):
        new = np.maximum(lam - step * current.grad, 0.0)
        trial = point(new)
        if trial.value > current.value + 1e-15 * abs(current.value):
            step /= 2  # diverging: restart from λ = 1 with half the step
            lam = np.ones(p.m)
            current = point(lam)
            history.append(lam.copy())
            continue
        lam, current = new, trial
        history.append(lam.copy())
        if _projected_gradient_norm(lam, current.grad) <= tol:
            break
    return lam, history


def solve_front(
    reward: Any,
    safety: Any,
    margins: Sequence[Any] | np.ndarray,
    beta: float,
    *,
    ref_logprob: Any = None,
    tol: float = 1e-9,
    max_iter: int = 100,
) -> list[DualSolution]:
    """Solutions for G margins ([G] or [G, m]) in one call, warm-starting each from its nearest solved
    neighbour in order of increasing margin. Returned in the order given."""
    base = _prepare(reward, safety, 0.0, beta, ref_logprob)
    grid = _as_array(margins, "margins")
    if grid.ndim == 1:
        grid = np.repeat(grid[:, None], base.m, axis=1) if base.m > 1 else grid[:, None]
    if grid.ndim != 2 or grid.shape[1] != base.m:
        raise ValueError(f"margins: expected [G] or [G, {base.m}], got {grid.shape}")
    _check_finite(grid, "margins")
    order = np.lexsort(grid.T[::-1])
    out: list[DualSolution | None] = [None] * len(grid)
    lam0 = None
    for i in order:
        sol = _solve(base.with_margin(grid[i]), lam0, tol, max_iter)
        out[i] = sol
        if sol.feasible:
            lam0 = sol.lam
    return out  # type: ignore[return-value]


# ----------------------------------------------------------------------------------------------------------
# Bootstrap over prompts


@dataclass(frozen=True)
class Interval:
    estimate: np.ndarray | float
    low: np.ndarray | float
    high: np.ndarray | float


@dataclass(frozen=True)
class BootstrapResult:
    """Percentile intervals over prompt resamples. ``infeasible_fraction``: resamples whose margin was out of
    reach (excluded from the intervals; a large value says the margin is at the edge of what is reachable)."""

    lam: Interval
    predicted_safety_gain: Interval  # of π_{λ*(resample)}: degenerate (= margin) for active constraints
    predicted_reward_gain: Interval
    predicted_kl: Interval
    safety_gain_at_lam: Interval  # of π_λ̂ with λ̂ fixed at the full-sample solution: what evaluation tests
    reward_gain_at_lam: Interval
    level: float
    n_resamples: int
    infeasible_fraction: float
    samples: dict[str, np.ndarray]


def bootstrap(
    reward: Any,
    safety: Any,
    margin: Any,
    beta: float,
    *,
    ref_logprob: Any = None,
    n_resamples: int = 200,
    level: float = 0.95,
    seed: int = 0,
    tol: float = 1e-9,
) -> BootstrapResult:
    """Confidence intervals for λ* and the predicted gains by resampling prompts with replacement.

    Each resample re-solves the dual warm-started from the full-sample λ* (intervals for λ* and the
    predictions of π_{λ*}), and also evaluates π_λ̂ at the full-sample λ̂ (``*_at_lam``: the sampling
    uncertainty of the gains that training at λ̂ should achieve). Percentile intervals at ``level``.
    """
    if not 0 < level < 1:
        raise ValueError(f"level: must be in (0, 1), got {level}")
    if int(n_resamples) < 2:
        raise ValueError(f"n_resamples: must be >= 2, got {n_resamples}")
    p = _prepare(reward, safety, margin, beta, ref_logprob)
    full = _solve(p, None, tol, 100)
    rng = np.random.default_rng(seed)
    n = p.reward.shape[0]
    draws: dict[str, list] = {"lam": [], "safety_gain": [], "reward_gain": [], "kl": [],
                              "safety_gain_at_lam": [], "reward_gain_at_lam": []}
    infeasible = 0
    for _ in range(int(n_resamples)):
        idx = rng.integers(0, n, size=n)
        sub = _problem(p.reward[idx], p.safety[idx], p.log_q[idx], p.margin, p.beta)
        if full.feasible:
            fixed = _Point(sub, full.lam).terms()
            draws["safety_gain_at_lam"].append(fixed.safety_gain)
            draws["reward_gain_at_lam"].append(fixed.reward_gain)
        sol = _solve(sub, full.lam if full.feasible else None, tol, 100)
        if not sol.feasible:
            infeasible += 1
            continue
        draws["lam"].append(sol.lam)
        draws["safety_gain"].append(sol.predicted_safety_gain)
        draws["reward_gain"].append(sol.predicted_reward_gain)
        draws["kl"].append(sol.predicted_kl)
    samples = {key: np.asarray(v, dtype=float) for key, v in draws.items()}

    def interval(key: str, estimate: Any) -> Interval:
        s = samples[key]
        if len(s) == 0:
            nan = np.full(np.shape(estimate), np.nan) if np.ndim(estimate) else float("nan")
            return Interval(estimate, nan, nan)
        return Interval(estimate, *percentile_bounds(s, level))

    return BootstrapResult(
        lam=interval("lam", full.lam),
        predicted_safety_gain=interval("safety_gain", full.predicted_safety_gain),
        predicted_reward_gain=interval("reward_gain", full.predicted_reward_gain),
        predicted_kl=interval("kl", full.predicted_kl),
        safety_gain_at_lam=interval("safety_gain_at_lam", full.predicted_safety_gain),
        reward_gain_at_lam=interval("reward_gain_at_lam", full.predicted_reward_gain),
        level=level,
        n_resamples=int(n_resamples),
        infeasible_fraction=infeasible / int(n_resamples),
        samples=samples,
    )
