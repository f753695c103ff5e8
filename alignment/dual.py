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
projection arc. m is 1-3, so each iteration is one pass over the N x K x m scores plus an m x m solve, and
convergence is quadratic: a handful of iterations to machine precision. A pass (``_Point``) runs over blocks of
prompts small enough to stay in cache: m multiply-adds form the shifted scores of a block, one exp, BLAS row
sums give the normalisers and E_{π_λ}[g | x], one m x m GEMM per block the second moments, so D, ∇D, ∇²D and the
predictions come from a single read of the scores. From 1,024 prompts on, the solver first solves the dual on
every 16th prompt (cheap, and within the sampling error of λ*), leaving two or three full-data iterations.
Near the optimum, where D's rounding hides the decrease of a Newton step, steps are judged by the projected
gradient instead of the Armijo test.

E_x is a weighted mean over the prompts: weights 1/N for the data, multiplicity/N for a bootstrap resample of
prompts with replacement, so a resample is solved on the original arrays without copying them (``bootstrap``).

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
_BLOCK = 1 << 16  # scores per block of prompts in a pass: 512 KiB of float64, cache-resident
_TINY = 1e-250  # a block's normaliser below this: the shift was loose (λ far out), redo the block exactly
_WARM_PROMPTS = 1024  # from this many prompts on, warm-start from the dual on every _WARM_STRIDE-th prompt
_WARM_STRIDE = 16


def _wsum(omega: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Σ_n ω_n v_n for v: [N] or [N, ...]. A 1-D ``ω @ v`` is BLAS ddot, which OpenBLAS runs on two threads
    from 10,000 entries on, and on a busy machine that handoff costs a scheduler tick (~8 ms) per call; einsum
    stays in NumPy."""
    return np.einsum("n,n...->...", omega, v)


@dataclass(frozen=True)
class DualSolution:
    """λ* and what it predicts about π_{λ*}, all measured on the listed responses.

    lam: [m] multipliers (exact zeros for inactive constraints). value: D(lam). grad: [m] ∇D(lam), i.e. the
    predicted safety gain minus the margin. predicted_safety_gain: [m] E_x E_{π_λ} g - E_x E_ref g.
    predicted_reward_gain: E_x E_{π_λ} r - E_x E_ref r. predicted_kl: E_x KL(π_λ || π_ref).
    reachable_margin: [m] the largest margin each constraint could reach alone (E_x max_k g - E_x E_ref g).
    iterations: Newton iterations on all the prompts; history: λ_t of every iterate, for convergence plots,
    those of the warm start on a subsample of prompts (large N, see the module docstring) first.
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

    x: [m + 1, N, K] contiguous, every plane shifted by its per-prompt maximum ``top`` ([N, m + 1]):
    x[0] = log q + r/β - top[:, 0] (without the constant log q = -log K when ``log_q`` is None: the uniform
    reference, whose -log K is ``offset``) and x[1 + j] = g_j - top[:, 1 + j]. For λ >= 0 the score
    s = x[0] + Σ_j (λ_j/β) x[1 + j] is <= 0, and log Σ_k q_k exp((r_k + λᵀg_k)/β) = offset + top @ (1, λ/β)
    + log Σ_k exp(s_k): m multiply-adds per block of prompts, an exp that cannot overflow, and no row maximum
    per λ. log_q: [N, K] log reference weights (-inf = outside the support) or None (uniform).
    """

    reward: np.ndarray  # [N, K]
    safety: np.ndarray  # [N, K, m]
    log_q: np.ndarray | None  # [N, K]; None: uniform reference
    margin: np.ndarray  # [m]
    beta: float
    ref_safety: np.ndarray  # [m]  E_x E_ref g
    ref_reward: float  # E_x E_ref r
    x: np.ndarray  # [m + 1, N, K]
    top: np.ndarray  # [N, m + 1]
    offset: float  # -log K for the uniform reference, else 0

    @property
    def n(self) -> int:
        return self.reward.shape[0]

    @property
    def m(self) -> int:
        return self.safety.shape[2]

    @property
    def full_support(self) -> bool:
        return self.log_q is None or bool(np.isfinite(self.log_q).all())

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


def _problem(reward: np.ndarray, safety: np.ndarray, log_q: np.ndarray | None, margin: np.ndarray,
             beta: float) -> _Problem:
    """Lay out validated arrays ([N, K], [N, K, m], [N, K] or None, [m], β) as a _Problem, block by block
    (copy, row maxima, shift and reference sums while the block is in cache)."""
    n, k, m = safety.shape
    x = np.empty((m + 1, n, k))
    top = np.empty((m + 1, n))
    ref_sum = np.zeros(m)
    ref_r = 0.0
    rows = max(1, _BLOCK // k)
    for a in range(0, n, rows):
        b = min(a + rows, n)
        xb = x[:, a:b]
        np.divide(reward[a:b], beta, out=xb[0])
        if log_q is not None:
            xb[0] += log_q[a:b]
        np.copyto(xb[1:], np.moveaxis(safety[a:b], 2, 0))
        tb = np.max(xb, axis=2, out=top[:, a:b])
        xb -= tb[:, :, None]
        planes = xb[1:].reshape(m, -1)
        if log_q is None:
            ref_sum += planes.sum(axis=1)
        else:  # Σ_k q_k (g_k - top) per prompt, summed
            q = np.exp(log_q[a:b]).ravel()
            ref_sum += np.einsum("jl,l->j", planes, q)
            ref_r += float(np.einsum("i,i->", reward[a:b].ravel(), q))
    top = np.ascontiguousarray(top.T)
    if log_q is None:
        ref_safety, ref_reward = ref_sum / (n * k) + top[:, 1:].mean(axis=0), float(reward.mean())
    else:  # Σ_k q_k = 1, so the shift adds E_x top
        ref_safety, ref_reward = ref_sum / n + top[:, 1:].mean(axis=0), ref_r / n
    offset = -float(np.log(k)) if log_q is None else 0.0
    return _Problem(reward, safety, log_q, margin, beta, ref_safety, ref_reward, x, top, offset)


def _subsample(p: _Problem, rows: slice) -> _Problem:
    """The same problem on the prompts ``rows``, laid out anew (1/16 of the cost of the full layout)."""
    log_q = None if p.log_q is None else p.log_q[rows]
    return _problem(p.reward[rows], p.safety[rows], log_q, p.margin, p.beta)


@dataclass(frozen=True)
class _Weights:
    """E_x as Σ_n ω_n (·): ω = 1/N (the data) or a resample's multiplicities / N, with E_x E_ref under ω.

    reach, g_abs, lam_unit: the solver's reachable margins, max |g| (its stopping scale) and λ unit for these
    weights (``_solve`` computes them for the data; the bootstrap passes each resample's).
    """

    omega: float | np.ndarray  # scalar 1/N, or [N]
    ref_safety: np.ndarray  # [m]
    ref_reward: float
    reach: np.ndarray | None = None
    g_abs: float | None = None
    lam_unit: float | None = None

    def mean(self, per_prompt: np.ndarray) -> np.ndarray:
        """Σ_n ω_n v_n for v: [N] or [N, ...]."""
        if np.ndim(self.omega):
            return _wsum(self.omega, per_prompt)
        return per_prompt.mean(axis=0)  # ω = 1/N


def _data_weights(p: _Problem) -> _Weights:
    return _Weights(1.0 / p.n, p.ref_safety, p.ref_reward)


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
        log_q = None  # uniform: log q = -log K, carried as the layout's offset
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


def _combine(v: np.ndarray, c: np.ndarray) -> np.ndarray:
    """v @ c for v: [N, j] with few columns, as multiply-adds (a gemv over N rows may be threaded, see _wsum)."""
    out = v[:, 0] * c[0]
    for j in range(1, len(c)):
        out += v[:, j] * c[j]
    return out


def _scores(c: np.ndarray, xb: np.ndarray, out: np.ndarray, tmp: np.ndarray | None) -> None:
    """out = Σ_j c_j xb[j] for one block ([m + 1, r K] planes, c[0] = 1): NumPy multiply-adds, as fast as BLAS
    gemv here and never threaded (see _wsum)."""
    np.multiply(xb[1], c[1], out=out)
    out += xb[0]
    for j in range(2, len(c)):
        np.multiply(xb[j], c[j], out=tmp)
        out += tmp


def _exp_block(c: np.ndarray, xb: np.ndarray, s: np.ndarray, tmp: np.ndarray | None, e: np.ndarray,
               ones: np.ndarray, lse: np.ndarray, *, shift: bool) -> np.ndarray:
    """One block's e = exp(scores) in place (``s`` flat, ``e`` its [r, K] view) and its row sums z. ``shift``:
    subtract each row's maximum first and add it to ``lse`` (in place), for λ < 0 or a loose shift."""
    _scores(c, xb, s, tmp)
    if shift:
        row_max = e.max(axis=1)
        e -= row_max[:, None]
        lse += row_max
    np.exp(s, out=s)
    return e @ ones


class _Point:
    """D at one λ and, from the same pass over the scores, what ∇D, ∇²D and the predictions there need.

    One pass over blocks of ~_BLOCK scores (prompts a..b): s = x[0] + Σ_j (λ_j/β) x[1 + j] (multiply-adds),
    e = exp(s), z = e·1 (BLAS): log-partition lse_x = offset + top_x @ (1, λ/β) + log z_x. Then, as asked:
    π_λ = e/z, the per-prompt means E_{π_λ}[g - top | x] (BLAS row sums of π_λ (g - top)), the weighted second
    moments Σ_x ω_x E_{π_λ}[(g - top)(g - top)ᵀ | x] (one m x m GEMM per block; per prompt when ``per_prompt``),
    and E_{π_λ}[r | x]. Shifting g by its per-prompt maximum changes no covariance and keeps the moments small.

    grad / hessian / reward: what to compute in the pass (the line search's rejected trials need only D; the
    solver asks for the rest where it expects to use it). ``ensure`` recomputes the pass if more is needed later.
    """

    def __init__(self, p: _Problem, lam: np.ndarray, weights: _Weights | None = None, *, grad: bool = True,
                 hessian: bool = False, reward: bool = False, per_prompt: bool = False):
        self.p, self.lam = p, lam
        self.w = weights if weights is not None else _data_weights(p)
        self.has = {"grad": False, "hessian": False, "reward": False, "per_prompt": False}
        self._sweep(grad=grad, hessian=hessian, reward=reward, per_prompt=per_prompt)

    # -- the pass ------------------------------------------------------------------------------------------
    def _sweep(self, *, grad: bool, hessian: bool, reward: bool, per_prompt: bool,
               store: np.ndarray | None = None) -> None:
        p, lam, omega = self.p, self.lam, self.w.omega
        n, k, m = p.n, p.reward.shape[1], p.m
        grad = grad or hessian or per_prompt or reward  # the KL needs E_π g
        c = np.empty(m + 1)
        c[0] = 1.0
        c[1:] = lam / p.beta
        exact = bool(np.any(c[1:] < 0))  # λ < 0 (plots): s <= 0 no longer holds, shift by the row maxima
        rows = max(1, min(n, _BLOCK // k))
        ones = np.ones(k)
        lse = _combine(p.top, c) + p.offset  # the per-prompt shift top @ c; log z added block by block
        mean_s = np.empty((n, m)) if grad else None  # E_π[g - top | x]
        second = np.zeros((m, m)) if hessian else None  # Σ_x ω_x E_π[(g - top)(g - top)ᵀ | x] (ω = 1 if scalar)
        cov_x = np.empty((n, m, m)) if per_prompt else None  # Cov_π(g | x)
        mean_r = np.empty(n) if reward else None
        buf = np.empty(rows * k)
        tmp = np.empty(rows * k) if m > 1 else None
        # Uniform reference: r = β (x[0] + top[:, 0]), so E_π[r | x] comes from the base plane already in cache.
        base_r = reward and p.log_q is None
        lo = 0 if base_r else 1  # first plane multiplied by π_λ
        ybuf = np.empty((m + 1 - lo, rows * k)) if grad else None
        vector_omega = bool(np.ndim(omega))
        with np.errstate(over="ignore", under="ignore", invalid="ignore", divide="ignore"):
            for a in range(0, n, rows):
                b = min(a + rows, n)
                r = b - a
                xb = p.x[:, a:b].reshape(m + 1, r * k)
                s = buf[: r * k]
                e = s.reshape(r, k)
                tb = None if tmp is None else tmp[: r * k]
                z = _exp_block(c, xb, s, tb, e, ones, lse[a:b], shift=exact)
                if not exact and z.min() < _TINY:  # the bound top @ c is far above this block's scores
                    z = _exp_block(c, xb, s, tb, e, ones, lse[a:b], shift=True)
                lse[a:b] += np.log(z)
                if not (grad or store is not None):
                    continue
                if not (hessian or per_prompt or store is not None):
                    # Means only: Σ_k e x / z straight from the unnormalised e (no pass to normalise it).
                    sums = np.einsum("jrk,rk->jr", xb[lo:].reshape(-1, r, k), e) / z
                    if base_r:
                        mean_r[a:b] = sums[0]
                    mean_s[a:b] = sums[1 - lo:].T
                    if reward and not base_r:
                        mean_r[a:b] = np.einsum("rk,rk->r", e, p.reward[a:b]) / z
                    continue
                e *= (1.0 / z)[:, None]  # π_λ
                if store is not None:
                    store[a:b] = e
                if grad:
                    y_all = np.multiply(xb[lo:], s, out=ybuf[:, : r * k])  # π_λ x, [m + 1 - lo, r k]
                    sums = (y_all.reshape(-1, k) @ ones).reshape(-1, r)
                    if base_r:
                        mean_r[a:b] = sums[0]  # E_π[x[0] | x], made E_π[r | x] after the loop
                    y = y_all[1 - lo:]  # π_λ (g - top), [m, r k]
                    mean_s[a:b] = sums[1 - lo:].T
                    if per_prompt:  # once per bootstrap: deviations from the prompt's mean
                        dev = xb[1:].reshape(m, r, k) - sums[1 - lo:, :, None]
                        cov_x[a:b] = np.einsum("rk,irk,jrk->rij", e, dev, dev)
                    if hessian:
                        if vector_omega:
                            y.reshape(m, r, k)[...] *= omega[a:b, None]
                        # m x m GEMM; for m = 1 a dot product, which BLAS would thread (see _wsum)
                        second += y @ xb[1:].T if m > 1 else np.einsum("ik,jk->ij", y, xb[1:])
                if reward and not base_r:
                    mean_r[a:b] = np.einsum("rk,rk->r", e, p.reward[a:b])
        self.lse = lse
        self.value = float(p.beta * self.w.mean(lse) - lam @ (self.w.ref_safety + p.margin))
        if grad:
            self.mean_s = mean_s
            self.mean_g = mean_s + p.top[:, 1:]  # E_{π_λ}[g | x], [N, m]
            self.safety_gain = self.w.mean(self.mean_g) - self.w.ref_safety
            self.grad = self.safety_gain - p.margin
            self.has["grad"] = True
        if hessian:
            if vector_omega:
                outer = np.einsum("n,ni,nj->ij", omega, mean_s, mean_s)
            else:
                second, outer = second * omega, np.einsum("ni,nj->ij", mean_s, mean_s) * omega
            self.hessian = (second - outer) / p.beta
            self.has["hessian"] = True
        if per_prompt:
            self.cov_x = cov_x
            self.has["per_prompt"] = True
        if reward:
            self.mean_r = p.beta * (mean_r + p.top[:, 0]) if base_r else mean_r
            self._finish_reward()

    def _finish_reward(self) -> None:
        """E_x E_{π_λ} r - E_ref r and KL(π_λ || π_ref) = E_x[(E_{π_λ} r + λᵀE_{π_λ} g)/β - lse] (no extra pass:
        log π_λ - log q = (r + λᵀg)/β - lse on the support)."""
        p = self.p
        self.reward_gain = float(self.w.mean(self.mean_r)) - self.w.ref_reward
        self.kl = max(float(self.w.mean((self.mean_r + _combine(self.mean_g, self.lam)) / p.beta - self.lse)), 0.0)
        self.has["reward"] = True

    def ensure(self, *, grad: bool = True, hessian: bool = False, reward: bool = False) -> None:
        """Recompute the pass if it did not compute what is asked (idempotent otherwise)."""
        want = {"grad": grad or hessian, "hessian": hessian, "reward": reward}
        if all(self.has[key] or not need for key, need in want.items()):
            return
        self._sweep(grad=True, hessian=hessian or self.has["hessian"], reward=reward or self.has["reward"],
                    per_prompt=self.has["per_prompt"])

    def reweighted(self, weights: _Weights) -> _Point:
        """The same λ under other prompt weights (a bootstrap resample), from this point's per-prompt terms: no pass.
        Needs a point computed with ``per_prompt=True, reward=True``."""
        if not (self.has["per_prompt"] and self.has["reward"]):
            raise ValueError("reweighted: needs the per-prompt terms (per_prompt=True, reward=True)")
        p = self.p
        out = object.__new__(_Point)
        out.p, out.lam, out.w = p, self.lam, weights
        out.has = {"grad": True, "hessian": True, "reward": False, "per_prompt": False}
        out.lse, out.mean_s, out.mean_g, out.mean_r = self.lse, self.mean_s, self.mean_g, self.mean_r
        out.value = float(p.beta * weights.mean(self.lse) - self.lam @ (weights.ref_safety + p.margin))
        out.safety_gain = weights.mean(self.mean_g) - weights.ref_safety
        out.grad = out.safety_gain - p.margin
        out.hessian = weights.mean(self.cov_x) / p.beta
        out._finish_reward()
        return out

    @property
    def weights(self) -> np.ndarray:
        """π_λ over the listed responses, [N, K]."""
        out = np.empty(self.p.reward.shape)
        # A pass that only stores π_λ: the terms already computed stay as they are (the same λ, the same values).
        self._sweep(grad=False, hessian=False, reward=False, per_prompt=False, store=out)
        return out

    def terms(self) -> DualTerms:
        """Everything, including the predicted reward gain and KL(π_λ || π_ref)."""
        self.ensure(grad=True, hessian=True, reward=True)
        return DualTerms(self.value, self.grad, self.hessian, self.safety_gain, self.reward_gain, self.kl)


def _terms(p: _Problem, lam: np.ndarray) -> DualTerms:
    return _Point(p, lam, hessian=True, reward=True).terms()


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
    return _Point(p, _as_array(lam, "lam").reshape(p.m), grad=False).weights


def reachable_margin(p: _Problem) -> np.ndarray:
    """[m] the largest margin each constraint can reach alone: E_x max_{k in support} g_k - E_x E_ref g."""
    return _best_safety(p).mean(axis=0) - p.ref_safety


def _best_safety(p: _Problem) -> np.ndarray:
    """[N, m] max_{k in support} g_k per prompt."""
    if p.full_support:
        return p.top[:, 1:]  # the layout's per-prompt maxima
    return np.where(np.isfinite(p.log_q)[:, :, None], p.safety, -np.inf).max(axis=1)


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


def _solver_weights(p: _Problem) -> _Weights:
    """The data's weights (1/N) with the solver's reach, |g| scale and λ unit."""
    # λ's natural unit: reward spread per unit of safety spread (λ trades one for the other).
    # A strided subsample is plenty for a safeguard's scale and keeps setup off the hot path.
    lam_unit = max(float(p.reward.ravel()[::97].std()), 1e-12) / max(float(p.safety.ravel()[::97].std()), 1e-12)
    g_abs = max(float(p.top[:, 1:].max()), -float(p.safety.min()))  # max |g|, the row maxima are in the layout
    return _Weights(1.0 / p.n, p.ref_safety, p.ref_reward, reach=reachable_margin(p), g_abs=g_abs,
                    lam_unit=lam_unit)


def _solve(p: _Problem, lam0: Any, tol: float, max_iter: int, weights: _Weights | None = None,
           start: _Point | None = None, predictions: bool = True) -> DualSolution:
    """Projected Newton on D under E_x = ``weights`` (default: the data, with a warm start from a subsample of
    prompts when there are many); ``start``: the point at ``lam0`` if already computed (the bootstrap's).
    predictions=False: λ only (the warm start's), the predicted gains and KL are left NaN."""
    w = weights if weights is not None else _solver_weights(p)
    reach = w.reach
    # Scale of the scores: the stopping rule and the divergence test are relative to it.
    scale = max(w.g_abs, float(np.abs(p.margin).max()), 1.0)
    bad = np.flatnonzero(p.margin >= reach - 1e-12 * scale)
    if bad.size:
        parts = ", ".join(f"constraint {j}: margin {p.margin[j]:.6g} >= reachable {reach[j]:.6g}" for j in bad)
        return _infeasible(p, reach, 0, f"infeasible margin ({parts}); the largest reachable margins on "
                           f"these responses are {np.array2string(reach, precision=6)}. Lower the margin "
                           "or sample more responses per prompt.")

    history: list[np.ndarray] = []
    warm = ""
    if lam0 is None and weights is None and predictions and p.n >= _WARM_PROMPTS:  # (not the warm start's own)
        # λ* of every 16th prompt is within λ*'s sampling error of it, at 1/16 of the cost: the full-data
        # Newton then starts in its quadratic region (two or three iterations instead of five or six).
        sub = _solve(_subsample(p, slice(None, None, _WARM_STRIDE)), None, max(tol, 1e-6), max_iter,
                     predictions=False)
        if sub.feasible:
            lam0 = sub.lam
            history.extend(sub.history[:-1])
            warm = f"; warm start: λ* of every {_WARM_STRIDE}th prompt ({sub.iterations} iterations)"
    lam = np.zeros(p.m) if lam0 is None else np.maximum(_as_array(lam0, "lam0").reshape(p.m), 0.0)
    history.append(lam.copy())
    # Unless warm-started from the subsample (never converged there), λ0 may already be optimal: then the
    # predictions are needed, else ∇²D. The pass computes both.
    point = start if start is not None else _Point(p, lam, w, hessian=True, reward=predictions and not warm)
    lam_ceiling = 1e12 * max(p.beta, 1.0) / scale  # λ beyond this means D has no finite minimiser
    lam_unit = w.lam_unit
    pgn = _projected_gradient_norm(lam, point.grad)
    converged = pgn <= tol * scale
    contraction = None  # pgn_{t+1} / pgn_t² of the last full Newton step: predicts the last iterate
    iterations = 0
    while not converged and iterations < max_iter:
        iterations += 1
        point.ensure(hessian=True)
        d = _newton_direction(lam, point.grad, point.hessian)
        # Safeguard: when π_λ is nearly deterministic the Hessian vanishes and a Newton step can leap by
        # 1e200; cap each move at 10x the current λ (or λ's natural unit), so λ can still grow geometrically.
        step = min(1.0, 10.0 * max(float(np.abs(lam).max()), lam_unit) / max(float(np.abs(d).max()), 1e-300))
        # The measured contraction predicts that this step ends the solve: its pass then computes the predictions
        # instead of ∇²D, and still checks the stop. (A prediction, not a bound: the bound that would let the step
        # be taken without its pass, from |∇³D[d,u,u]| <= (max_x range_k dᵀg / β) ∇²D[u,u], was 1.2e-7 on
        # bench/dual_solver.py's instance, 80x the actual 1.5e-9 and above tol · scale = 7.6e-9.)
        last = contraction is not None and step == 1.0 and contraction * pgn**2 <= tol * scale and predictions
        noise = 1e-14 * (1.0 + abs(point.value))  # D's rounding: a smaller decrease cannot be measured
        accepted, first = False, True
        for _ in range(_MAX_HALVINGS):
            cand = np.maximum(lam + step * d, 0.0)
            if np.array_equal(cand, lam):
                break  # the step no longer moves λ
            # The first trial computes what its iterate will need (∇²D, or the predictions if quadratic
            # convergence says it is the last); a rejected one is retried at a shorter step for D alone.
            trial = _Point(p, cand, w, grad=first, hessian=first and not last, reward=first and last)
            slope = float(point.grad @ (cand - lam))
            if not np.isfinite(trial.value):
                step *= 1e-3  # overshot into overflow: shrink fast
            elif trial.value <= point.value + _ARMIJO * slope:
                accepted = True
            elif first and -slope <= noise:
                # Within D's rounding of the optimum the value test sees only noise (it would halve the step
                # to nothing); the Newton step shows its progress in the projected gradient instead.
                accepted = _projected_gradient_norm(cand, trial.grad) <= pgn
                if not accepted:
                    break
            else:
                step *= 0.5
            first = False
            if accepted:
                break
        if not accepted:
            break  # no decrease representable in float64: λ is optimal to machine precision
        lam, point = cand, trial
        point.ensure(grad=True)
        history.append(lam.copy())
        new_pgn = _projected_gradient_norm(lam, point.grad)
        if step == 1.0 and pgn > 0:
            contraction = new_pgn / pgn**2
        pgn = new_pgn
        converged = pgn <= tol * scale
        if np.max(lam) > lam_ceiling:
            return _infeasible(p, reach, iterations, "the margins are jointly unreachable: λ diverged along "
                               f"{np.array2string(lam / np.linalg.norm(lam), precision=4)}; each constraint "
                               f"alone can reach at most {np.array2string(reach, precision=6)}. Lower the "
                               "margins or sample more responses per prompt.")
    if not converged:
        # Machine-precision floor: accept a projected gradient within 1000 tol (reported in the message).
        converged = pgn <= 1e3 * tol * scale
    point.ensure(grad=True, reward=predictions)
    reward_gain, kl = (point.reward_gain, point.kl) if predictions else (float("nan"), float("nan"))
    msg = "converged" if converged else f"not converged after {iterations} iterations"
    msg += f" (projected gradient {pgn:.2e}); active constraints: {np.flatnonzero(lam > 0).tolist()}{warm}"
    return DualSolution(
        lam=lam, value=point.value, grad=point.grad, iterations=iterations, converged=bool(converged),
        feasible=True, predicted_safety_gain=point.safety_gain, predicted_reward_gain=reward_gain,
        predicted_kl=kl, message=msg, margin=p.margin, reachable_margin=reach, history=tuple(history),
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
        return _Point(p, lam)  # D and ∇D from one pass

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


class _Resampler:
    """Per-prompt quantities that no resample changes, and each resample's weights from its draw.

    A resample of prompts with replacement (indices idx, multiplicities c = bincount(idx)) is the data under
    E_x = Σ_n (c_n/N)(·): its E_ref g, reachable margin, |g| scale are weighted sums or maxima of per-prompt
    terms ([N] work, no copy of the scores), and the dual at any λ is one weighted pass over the original layout.
    """

    def __init__(self, p: _Problem):
        self.p = p
        n, k, m = p.n, p.reward.shape[1], p.m
        if p.log_q is None:
            self.ref_g = p.x[1:].mean(axis=2).T + p.top[:, 1:]  # E_ref[g | x]
            self.ref_r = p.reward.mean(axis=1)  # E_ref[r | x]
        else:
            q = np.exp(p.log_q)
            self.ref_g = np.einsum("nk,jnk->nj", q, p.x[1:]) + p.top[:, 1:]
            self.ref_r = np.einsum("nk,nk->n", q, p.reward)
        self.best = _best_safety(p)  # [N, m]
        low = p.x[1:].min(axis=2).T + p.top[:, 1:]  # [N, m] min_k g
        self.g_abs = np.maximum(p.top[:, 1:].max(axis=1), -low.min(axis=1))  # [N] max_k,j |g|
        # The solver's λ unit reads every 97th entry of the resample's reward and safety arrays (see
        # _solver_weights): the same entries, located in the original arrays through idx.
        self.flat_r = np.arange(0, n * k, 97)
        self.flat_g = np.arange(0, n * k * m, 97)

    def weights(self, idx: np.ndarray) -> _Weights:
        p = self.p
        n, k, m = p.n, p.reward.shape[1], p.m
        counts = np.bincount(idx, minlength=n)
        omega = counts / n
        ref_safety = _wsum(omega, self.ref_g)
        r = p.reward[idx[self.flat_r // k], self.flat_r % k]
        g = p.safety[idx[self.flat_g // (k * m)], (self.flat_g // m) % k, self.flat_g % m]
        lam_unit = max(float(r.std()), 1e-12) / max(float(g.std()), 1e-12)
        return _Weights(omega, ref_safety, float(_wsum(omega, self.ref_r)), reach=_wsum(omega, self.best) - ref_safety,
                        g_abs=float(self.g_abs[counts > 0].max()), lam_unit=lam_unit)


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

    A resample is the data with prompt weights c_n/N (c: its multiplicities), never a copy: D, ∇D and ∇²D of
    every resample at λ̂ are weighted sums of per-prompt terms computed in one pass at λ̂ (so the first Newton
    step of each resample costs no pass), and each further iterate is one weighted pass over the original
    scores. With one constraint, all resamples are solved together on Chebyshev interpolants instead (see
    ``_solve_on_interpolant``: 16 passes in all, not ~2 per resample). Same draws (``seed``), same feasibility
    test and stopping rule as solving each resample on its own, so the intervals agree with that to the solver's
    tolerance.
    """
    if not 0 < level < 1:
        raise ValueError(f"level: must be in (0, 1), got {level}")
    if int(n_resamples) < 2:
        raise ValueError(f"n_resamples: must be >= 2, got {n_resamples}")
    p = _prepare(reward, safety, margin, beta, ref_logprob)
    full = _solve(p, None, tol, 100)
    rng = np.random.default_rng(seed)
    n = p.n
    resampler = _Resampler(p)
    at_lam = _Point(p, full.lam, hessian=False, reward=True, per_prompt=True) if full.feasible else None
    draws: dict[str, list] = {"lam": [], "safety_gain": [], "reward_gain": [], "kl": [],
                              "safety_gain_at_lam": [], "reward_gain_at_lam": []}
    infeasible = 0
    weights, starts = [], []
    for _ in range(int(n_resamples)):
        idx = rng.integers(0, n, size=n)
        w = resampler.weights(idx)
        start = None
        if at_lam is not None:
            start = at_lam.reweighted(w)
            draws["safety_gain_at_lam"].append(start.safety_gain)
            draws["reward_gain_at_lam"].append(start.reward_gain)
        weights.append(w)
        starts.append(start)
    solved: list[DualSolution | None] = [None] * len(weights)
    if at_lam is not None and p.m == 1:
        solved = _solve_on_interpolant(p, full.lam, weights, starts, tol)
    for w, start, sol in zip(weights, starts, solved):
        if sol is None:  # projected Newton from λ̂ on the resample's weights
            sol = _solve(p, full.lam if full.feasible else None, tol, 100, weights=w, start=start)
        infeasible += not _add_draw(draws, sol)
    return _bootstrap_result(full, draws, level, int(n_resamples), infeasible)


def _add_draw(draws: dict[str, list], sol: DualSolution) -> bool:
    """Append a resample's solution to the bootstrap draws; False (nothing added) when it is infeasible."""
    if not sol.feasible:
        return False
    draws["lam"].append(sol.lam)
    draws["safety_gain"].append(sol.predicted_safety_gain)
    draws["reward_gain"].append(sol.predicted_reward_gain)
    draws["kl"].append(sol.predicted_kl)
    return True


_CHEBYSHEV_NODES = (16, 32, 64)  # tried in turn, while cheaper than Newton's ~2 passes per resample


def _solve_on_interpolant(p: _Problem, lam_hat: np.ndarray, weights: list[_Weights], starts: list[_Point],
                          tol: float) -> list[DualSolution | None]:
    """m = 1: every resample's λ* from Chebyshev interpolants of its D, ∇D and predictions in λ; None where the
    resample is left to projected Newton (``_solve``).

    Each prompt's log-partition lse_x(λ), E_{π_λ}[g | x] and E_{π_λ}[r | x] are entire functions of λ, so on an
    interval [lo, hi] holding the resamples' λ* (around λ̂, from their first Newton iterates, which cost no pass)
    they are interpolated to machine precision by their values at L Chebyshev nodes: L passes over the scores,
    shared by all resamples (L = 16, or 32 or 64 for a wider interval, while L < 2 passes per resample). A resample's ∇D(λ) = Σ_x ω_x E_{π_λ}[g | x] - E_ref g - b is then the
    ω-weighted sum of those values, i.e. a Chebyshev series whose coefficients for all resamples are one GEMM
    ([B, N] @ [N, L]); its root on [lo, hi] (safeguarded Newton on the series), and D and the predictions there,
    cost no pass. Checks: the series' last coefficients (their truncation error) and its value at λ̂ against the
    exact per-prompt terms there must be below 1e-3 tol, else more nodes or Newton for all; a root outside
    [lo, hi] (λ* = 0 when lo = 0 and ∇D(0) >= 0 excepted) is left to Newton. The reachable-margin test and the optimality test at λ̂ are those of
    ``_solve`` (resamples failing them are left to it: it reports them at no pass).
    """
    from numpy.polynomial import chebyshev

    out: list[DualSolution | None] = [None] * len(weights)
    margin = float(p.margin[0])
    todo, first = [], []
    for i, (w, st) in enumerate(zip(weights, starts)):
        scale = max(w.g_abs, abs(margin), 1.0)
        if margin >= w.reach[0] - 1e-12 * scale or _projected_gradient_norm(lam_hat, st.grad) <= tol * scale:
            continue  # infeasible, or optimal at λ̂: _solve says so without a pass
        todo.append(i)
        first.append(max(float(lam_hat[0] + _newton_direction(lam_hat, st.grad, st.hessian)[0]), 0.0))
    if not todo:
        return out
    lo, hi = min(min(first), float(lam_hat[0])), max(max(first), float(lam_hat[0]))
    pad = max(0.25 * (hi - lo), 1e-6 * max(1.0, float(lam_hat[0])))
    lo, hi = max(lo - pad, 0.0), hi + pad
    mid, half = (lo + hi) / 2, (hi - lo) / 2
    omega = np.stack([weights[i].omega for i in todo])  # [T, N]
    ref = np.array([weights[i].ref_safety[0] for i in todo])
    ref_r = np.array([weights[i].ref_reward for i in todo])
    scale = np.array([max(weights[i].g_abs, abs(margin), 1.0) for i in todo])
    t_hat = np.full(len(todo), (float(lam_hat[0]) - mid) / half)
    exact = {"g": np.array([starts[i].safety_gain[0] for i in todo]) + ref,
             "r": np.array([starts[i].reward_gain for i in todo]) + ref_r,
             "lse": np.array([(starts[i].value + lam_hat[0] * (weights[i].ref_safety[0] + margin)) / p.beta
                              for i in todo])}
    bound = 1e-3 * tol * scale
    for nodes in _CHEBYSHEV_NODES:
        if nodes > 2 * len(todo):
            return out  # more passes than projected Newton would take
        coef = _chebyshev_coefficients(p, omega, mid, half, nodes)
        accurate = True
        for key in ("g", "r", "lse"):  # truncation (the last coefficients) and the exact terms at λ̂
            weight = p.beta if key == "lse" else 1.0  # D = β Σ ω lse - ...
            tail = np.abs(coef[key][:, -2:]).max(axis=1) * weight
            error = np.abs(chebyshev.chebval(t_hat, coef[key].T, tensor=False) - exact[key]) * weight
            accurate = accurate and not (np.any(tail > bound) or np.any(error > bound))
        if accurate:
            break
    else:
        return out

    def at(key: str, t: np.ndarray) -> np.ndarray:
        return chebyshev.chebval(t, coef[key].T, tensor=False)

    # Root of ∇D on [-1, 1] (∇D is non-decreasing in λ: ∇²D >= 0): Newton on the series inside a bisection bracket.
    coef_f = coef["g"].copy()
    coef_f[:, 0] -= ref + margin
    deriv = chebyshev.chebder(coef_f.T, axis=0)
    ones = np.ones(len(todo))
    f_lo, f_hi = chebyshev.chebval(-ones, coef_f.T, tensor=False), chebyshev.chebval(ones, coef_f.T, tensor=False)
    t = np.clip((np.array(first) - mid) / half, -1.0, 1.0)
    t_lo, t_hi = -ones.copy(), ones.copy()
    with np.errstate(divide="ignore", invalid="ignore"):
        for _ in range(200):
            f = chebyshev.chebval(t, coef_f.T, tensor=False)
            t_lo, t_hi = np.where(f <= 0, t, t_lo), np.where(f > 0, t, t_hi)
            newton = t - f / chebyshev.chebval(t, deriv, tensor=False)
            new = np.where(np.isfinite(newton) & (newton > t_lo) & (newton < t_hi), newton, 0.5 * (t_lo + t_hi))
            done = np.all(np.abs(new - t) <= 4 * np.finfo(float).eps)
            t = new
            if done:
                break
    at_zero = (f_lo > 0) & (lo == 0.0)  # ∇D(0) > 0: the constraint is slack, λ* = 0
    t = np.where(at_zero, -1.0, t)
    lam = np.where(at_zero, 0.0, np.maximum(mid + half * t, 0.0))
    g, lse, r = at("g", t), at("lse", t), at("r", t)
    grad = g - ref - margin
    for j, i in enumerate(todo):
        inside = at_zero[j] or (f_lo[j] <= 0 <= f_hi[j])
        lam_j = np.array([lam[j]])
        pgn = _projected_gradient_norm(lam_j, np.array([grad[j]]))
        if not inside or pgn > tol * scale[j]:
            continue  # projected Newton
        value = float(p.beta * lse[j] - lam[j] * (ref[j] + margin))
        kl = max(float((r[j] + lam[j] * g[j]) / p.beta - lse[j]), 0.0)
        out[i] = DualSolution(
            lam=lam_j, value=value, grad=np.array([grad[j]]), iterations=0, converged=True, feasible=True,
            predicted_safety_gain=np.array([g[j] - ref[j]]), predicted_reward_gain=float(r[j] - ref_r[j]),
            predicted_kl=kl, message=f"converged (projected gradient {pgn:.2e}) on the Chebyshev interpolant",
            margin=p.margin, reachable_margin=weights[i].reach,
        )
    return out


def _chebyshev_coefficients(p: _Problem, omega: np.ndarray, mid: float, half: float,
                             nodes: int) -> dict[str, np.ndarray]:
    """Chebyshev coefficients ([T, nodes]) on [mid - half, mid + half] of Σ_x ω_x lse_x(λ), Σ_x ω_x E_{π_λ}[g | x]
    and Σ_x ω_x E_{π_λ}[r | x] for the T weight rows ``omega`` ([T, N], m = 1): one pass per node."""
    theta = np.pi * (np.arange(nodes) + 0.5) / nodes
    per_prompt = {key: np.empty((p.n, nodes)) for key in ("lse", "g", "r")}
    for j, lam in enumerate(mid + half * np.cos(theta)):
        point = _Point(p, np.array([lam]), reward=True)
        per_prompt["lse"][:, j], per_prompt["g"][:, j], per_prompt["r"][:, j] = (
            point.lse, point.mean_g[:, 0], point.mean_r)
    to_coef = (2.0 / nodes) * np.cos(np.outer(theta, np.arange(nodes)))  # values at the nodes -> coefficients
    to_coef[:, 0] /= 2
    return {key: (omega @ v) @ to_coef for key, v in per_prompt.items()}


def _bootstrap_result(full: DualSolution, draws: dict[str, list], level: float, n_resamples: int,
                      infeasible: int) -> BootstrapResult:
    """Percentile intervals at ``level`` from the resamples' draws (feasible resamples only)."""
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
        n_resamples=n_resamples,
        infeasible_fraction=infeasible / n_resamples,
        samples=samples,
    )
