"""Benchmark: our projected Newton against the peers a researcher would otherwise use, in one run.

Peers, all on the same instance and the same closed-form dual:
  (a) scipy L-BFGS-B with the analytic gradient and bounds λ >= 0;
  (b) the paper's code's method: projected gradient descent from λ = 1 with a fixed step (2 to 4),
      restarting from λ = 1 with the step halved whenever D increases;
  (c) cvxpy (Clarabel) on the primal over π, the independent reference for λ*, when the instance fits.

    python bench/dual_solver.py                      # N = 20,000, K = 64, m = 2 (the issue's setting)
    python bench/dual_solver.py --n 2000 --cvxpy     # smaller instance, cvxpy reference included

Prints a table of iterations (function evaluations for L-BFGS-B), seconds and |λ - λ_ref| (λ_ref: cvxpy when run, else our solver at tol 1e-12).
Times are the best of --repeat runs.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
from scipy.optimize import minimize

from alignment.dual import _Point, _prepare, projected_gradient_descent, solve_dual


def make_instance(n: int, k: int, m: int, seed: int = 0):
    """Scores shaped like the paper's: a reward and m safety scores negatively correlated with it."""
    rng = np.random.default_rng(seed)
    reward = rng.normal(size=(n, k)) + rng.normal(size=(n, 1))
    harm = rng.normal(size=(n, 1, 1)) * 0.8
    safety = -0.5 * reward[:, :, None] + rng.normal(size=(n, k, m)) + harm
    return reward, safety


def run_newton(reward, safety, margin, beta):
    sol = solve_dual(reward, safety, margin, beta)
    return sol.lam, sol.iterations


def run_lbfgsb(reward, safety, margin, beta):
    p = _prepare(reward, safety, margin, beta, None)
    calls = {"n": 0}

    def fun(lam):
        calls["n"] += 1
        point = _Point(p, lam)  # the same fused evaluation of D and ∇D that Newton uses
        point.finish(hessian=False)
        return point.value, point.grad

    res = minimize(fun, np.zeros(p.m), jac=True, method="L-BFGS-B", bounds=[(0, None)] * p.m,
                   options={"ftol": 1e-15, "gtol": 1e-9, "maxiter": 1000})
    return res.x, calls["n"]


def run_paper_pgd(reward, safety, margin, beta):
    lam, history = projected_gradient_descent(reward, safety, margin, beta, step=3.0)
    return lam, len(history) - 1


def run_cvxpy(reward, safety, margin, beta):
    import cvxpy as cp

    n, k, m = safety.shape
    pi = cp.Variable((n, k), nonneg=True)
    kl = -cp.sum(cp.entr(pi)) - np.log(1.0 / k) * cp.sum(pi)
    cons = [cp.sum(cp.multiply(pi, safety[:, :, j])) / n - safety[:, :, j].mean() >= margin[j] for j in range(m)]
    problem = cp.Problem(cp.Maximize(cp.sum(cp.multiply(pi, reward)) / n - beta * kl / n),
                         [cp.sum(pi, axis=1) == 1, *cons])
    problem.solve(solver="CLARABEL", tol_gap_abs=1e-9, tol_gap_rel=1e-9, tol_feas=1e-9)
    return np.array([float(c.dual_value) for c in cons]), problem.solver_stats.num_iters


def timed(fn, *args, repeat: int):
    best, out = float("inf"), None
    for _ in range(repeat):
        start = time.perf_counter()
        out = fn(*args)
        best = min(best, time.perf_counter() - start)
    return out, best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=20_000)
    ap.add_argument("--k", type=int, default=64)
    ap.add_argument("--m", type=int, default=2)
    ap.add_argument("--beta", type=float, default=0.1)
    ap.add_argument("--margin", type=float, nargs="+", default=[0.5, 0.3])
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--cvxpy", action="store_true", help="solve the primal with cvxpy as the reference")
    args = ap.parse_args()

    reward, safety = make_instance(args.n, args.k, args.m)
    margin = np.resize(np.asarray(args.margin, float), args.m)
    rows = []
    for name, fn in [("projected Newton (ours)", run_newton), ("scipy L-BFGS-B", run_lbfgsb),
                     ("paper PGD (step 3, restarts)", run_paper_pgd)]:
        (lam, iters), secs = timed(fn, reward, safety, margin, args.beta, repeat=args.repeat)
        rows.append((name, iters, secs, lam))
    if args.cvxpy:
        (lam_ref, iters), secs = timed(run_cvxpy, reward, safety, margin, args.beta, repeat=1)
        rows.append(("cvxpy primal (Clarabel)", iters, secs, lam_ref))
        ref_name = "cvxpy"
    else:
        lam_ref = solve_dual(reward, safety, margin, args.beta, tol=1e-12).lam
        ref_name = "Newton at tol 1e-12"

    ours = rows[0][2]
    print(f"N={args.n} K={args.k} m={args.m} beta={args.beta} margin={margin.tolist()}  "
          f"lambda*={np.array2string(lam_ref, precision=8)} (reference: {ref_name})")
    print(f"{'method':32s} {'iters':>7s} {'seconds':>9s} {'vs ours':>8s} {'|lam - lam_ref|':>16s}")
    for name, iters, secs, lam in rows:
        print(f"{name:32s} {iters:7d} {secs:9.3f} {secs / ours:7.1f}x {np.abs(lam - lam_ref).max():16.2e}")


if __name__ == "__main__":
    main()
