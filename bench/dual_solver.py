"""Benchmark: our projected Newton against the peers a researcher would otherwise use, and the bootstrap
against solving every resample on its own, in one run.

Solver peers, all on the same instance and the same closed-form dual:
  (a) scipy L-BFGS-B with the analytic gradient and bounds λ >= 0, evaluating D and ∇D with our fused pass
      (``_Point``: the same evaluation Newton uses, without the Hessian): the algorithms alone compared;
  (a') the same L-BFGS-B on D as one writes it without this package (scipy's logsumexp over the raw scores,
      softmax weights for the gradient): what a researcher would otherwise run;
  (b) the paper's code's method: projected gradient descent from λ = 1 with a fixed step (2 to 4),
      restarting from λ = 1 with the step halved whenever D increases;
  (c) cvxpy (Clarabel) on the primal over π, the independent reference for λ*, when the instance fits.

Bootstrap (200 resamples of prompts, the dual's confidence intervals): ``bootstrap`` (each resample is the data
reweighted by its multiplicities, no copies; with one constraint all resamples solved together on Chebyshev
interpolants from 16 passes, else projected Newton from per-prompt terms at λ̂) against
``bootstrap_per_resample`` below, the method before issue 17 (every resample's scores copied, laid out and solved
from λ̂ on its own; run here on today's evaluation), at 1,000 x 128 and 10,000 x 128 (m = 1, margin 0.3,
β = 0.1: the instance of bench/scaling.py), with the largest difference between their intervals and samples.

    python bench/dual_solver.py                      # N = 20,000, K = 64, m = 2 (the issue's setting) + bootstrap
    python bench/dual_solver.py --n 2000 --cvxpy     # smaller instance, cvxpy reference included
    python bench/dual_solver.py --no-bootstrap       # the solver table only

Times are medians over --repeat interleaved repetitions (every method once per round, so a change in the
machine's load hits all of them alike); "vs ours" is the median of the per-round ratios. "passes": passes over
the N x K x m scores per solve (one per D evaluation; a pass over a subsample of prompts counts as its fraction
of N), the work the methods differ in. Peak MB: the largest traced allocation (tracemalloc, NumPy included)
during one extra, untimed call. The load average is printed: on a shared machine compare ratios, not seconds.

BLAS runs on one thread unless OPENBLAS_NUM_THREADS (or OMP_/MKL_NUM_THREADS) is set: on a loaded machine
OpenBLAS's worker threads spin between calls and take the CPU from the Python thread, which slows a method in
proportion to how many BLAS calls it makes rather than to its work (on 2 busy cores at load 4, L-BFGS-B ran
1.8x slower with two threads and ours no slower, which moved the ratio from 0.63 to 0.31-0.44 with the load).
"""

from __future__ import annotations

import argparse
import os
import resource
import sys
import time
import tracemalloc
from pathlib import Path

for _var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):  # before NumPy loads BLAS
    os.environ.setdefault(_var, "1")

import numpy as np  # noqa: E402
from scipy.optimize import minimize  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from alignment.dual import (  # noqa: E402
    _add_draw,
    _bootstrap_result,
    _Point,
    _prepare,
    _solve,
    bootstrap,
    projected_gradient_descent,
    solve_dual,
)


def make_instance(n: int, k: int, m: int, seed: int = 0):
    """Scores shaped like the paper's: a reward and m safety scores negatively correlated with it."""
    rng = np.random.default_rng(seed)
    reward = rng.normal(size=(n, k)) + rng.normal(size=(n, 1))
    harm = rng.normal(size=(n, 1, 1)) * 0.8
    safety = -0.5 * reward[:, :, None] + rng.normal(size=(n, k, m)) + harm
    return reward, safety


def make_bootstrap_instance(n: int, k: int, seed: int = 0):
    """bench/scaling.py's instance for the dual's cost: one constraint, safety = -0.5 reward + noise."""
    rng = np.random.default_rng(seed)
    reward = rng.normal(size=(n, k))
    safety = (-0.5 * reward + rng.normal(size=(n, k)))[:, :, None]
    return reward, safety


def run_newton(reward, safety, margin, beta):
    sol = solve_dual(reward, safety, margin, beta)
    return sol.lam, sol.iterations


def run_lbfgsb(reward, safety, margin, beta):
    p = _prepare(reward, safety, margin, beta, None)
    calls = {"n": 0}

    def fun(lam):
        calls["n"] += 1
        point = _Point(p, lam)  # D and ∇D from one fused pass, as Newton evaluates them
        return point.value, point.grad

    res = minimize(fun, np.zeros(p.m), jac=True, method="L-BFGS-B", bounds=[(0, None)] * p.m,
                   options={"ftol": 1e-15, "gtol": 1e-9, "maxiter": 1000})
    return res.x, calls["n"]


def run_lbfgsb_plain(reward, safety, margin, beta):
    """L-BFGS-B on D written the way a researcher writes it without this package: scipy's logsumexp over the
    raw [N, K] scores, the gradient from the softmax weights (no layout, no blocking, no fused pass)."""
    from scipy.special import logsumexp

    n, k, m = safety.shape
    ref = safety.mean(axis=(0, 1))
    calls = {"n": 0}

    def fun(lam):
        calls["n"] += 1
        s = (reward + safety @ lam) / beta
        lse = logsumexp(s, axis=1)
        w = np.exp(s - lse[:, None])
        value = beta * float(np.mean(lse - np.log(k))) - lam @ (ref + margin)
        return value, np.einsum("nk,nkm->m", w, safety) / n - ref - margin

    res = minimize(fun, np.zeros(m), jac=True, method="L-BFGS-B", bounds=[(0, None)] * m,
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


def bootstrap_per_resample(reward, safety, margin, beta, *, ref_logprob=None, n_resamples=200, level=0.95,
                           seed=0, tol=1e-9):
    """The bootstrap before issue 17 point 4, kept as the reference: the same draws, but every resample's scores
    are copied (reward[idx], ...), validated and laid out again, evaluated at the full-sample λ̂ and solved from
    λ̂ on their own."""
    p = _prepare(reward, safety, margin, beta, ref_logprob)
    full = _solve(p, None, tol, 100)
    rng = np.random.default_rng(seed)
    n = p.n
    draws = {"lam": [], "safety_gain": [], "reward_gain": [], "kl": [], "safety_gain_at_lam": [],
             "reward_gain_at_lam": []}
    infeasible = 0
    for _ in range(int(n_resamples)):
        idx = rng.integers(0, n, size=n)
        sub = _prepare(reward[idx], safety[idx], margin, beta, None if ref_logprob is None else ref_logprob[idx])
        if full.feasible:
            fixed = _Point(sub, full.lam, reward=True)
            draws["safety_gain_at_lam"].append(fixed.safety_gain)
            draws["reward_gain_at_lam"].append(fixed.reward_gain)
        infeasible += not _add_draw(draws, _solve(sub, full.lam if full.feasible else None, tol, 100))
    return _bootstrap_result(full, draws, level, int(n_resamples), infeasible)


INTERVALS = ("lam", "predicted_safety_gain", "predicted_reward_gain", "predicted_kl", "safety_gain_at_lam",
             "reward_gain_at_lam")


def interval_difference(a, b) -> float:
    """The largest |difference| between two BootstrapResults' interval ends."""
    return max(float(np.max(np.abs(np.subtract(getattr(getattr(a, f), end), getattr(getattr(b, f), end)))))
               for f in INTERVALS for end in ("low", "high"))


def passes(fn, *args) -> float:
    """Passes over the scores of one call of fn (every D evaluation is one ``_Point`` sweep; a sweep over a
    subsample of prompts counts as its fraction of the prompts)."""
    n = len(args[0])
    count = [0.0]
    sweep = _Point._sweep

    def counted(self, **kwargs):
        count[0] += self.p.n / n
        return sweep(self, **kwargs)

    _Point._sweep = counted
    try:
        fn(*args)
    finally:
        _Point._sweep = sweep
    return count[0]


def peak_mb(fn, *args, **kwargs) -> float:
    """Peak traced allocation (MB) of one call, NumPy's arrays included."""
    tracemalloc.start()
    try:
        fn(*args, **kwargs)
        return tracemalloc.get_traced_memory()[1] / 2**20
    finally:
        tracemalloc.stop()


def interleaved(fns: dict, repeat: int) -> tuple[dict, dict]:
    """Run every fn once per round, ``repeat`` rounds; return the last outputs and each fn's list of seconds."""
    outs, secs = {}, {name: [] for name in fns}
    for _ in range(repeat):
        for name, fn in fns.items():
            start = time.perf_counter()
            outs[name] = fn()
            secs[name].append(time.perf_counter() - start)
    return outs, secs


def load() -> str:
    one, five, _ = os.getloadavg()
    return (f"load average {one:.2f} (1 min), {five:.2f} (5 min) on {os.cpu_count()} CPUs, "
            f"OPENBLAS_NUM_THREADS={os.environ['OPENBLAS_NUM_THREADS']}")


def solver_table(args) -> None:
    reward, safety = make_instance(args.n, args.k, args.m)
    margin = np.resize(np.asarray(args.margin, float), args.m)
    a = (reward, safety, margin, args.beta)
    methods = {"projected Newton (ours)": run_newton, "scipy L-BFGS-B": run_lbfgsb,
               "scipy L-BFGS-B, plain NumPy D": run_lbfgsb_plain, "paper PGD (step 3, restarts)": run_paper_pgd}
    outs, secs = interleaved({name: (lambda fn=fn: fn(*a)) for name, fn in methods.items()}, args.repeat)
    rows = [(name, *outs[name], secs[name]) for name in methods]
    if args.cvxpy:
        start = time.perf_counter()
        lam_ref, iters = run_cvxpy(*a)
        cvx_secs = [time.perf_counter() - start]
        rows.append(("cvxpy primal (Clarabel)", lam_ref, iters, cvx_secs))
        ref_name = "cvxpy"
    else:
        lam_ref = solve_dual(*a, tol=1e-12).lam
        ref_name = "Newton at tol 1e-12"
    ours = np.asarray(secs["projected Newton (ours)"])
    print(f"N={args.n} K={args.k} m={args.m} beta={args.beta} margin={margin.tolist()}  "
          f"lambda*={np.array2string(lam_ref, precision=8)} (reference: {ref_name})")
    print(f"{'method':32s} {'iters':>7s} {'passes':>7s} {'seconds':>9s} {'vs ours':>8s} {'peak MB':>8s} "
          f"{'|lam - lam_ref|':>16s}")
    for name, lam, iters, s in rows:
        s = np.asarray(s)
        ratio = np.median(s / ours) if len(s) == len(ours) else np.median(s) / np.median(ours)
        mem = peak_mb(methods[name], *a) if name in methods else float("nan")
        n_passes = passes(methods[name], *a) if name in methods else float("nan")
        if name == "scipy L-BFGS-B, plain NumPy D":
            n_passes = float(iters)  # its own evaluations, one pass each
        print(f"{name:32s} {iters:7d} {n_passes:7.2f} {np.median(s):9.4f} {ratio:7.2f}x {mem:8.1f} "
              f"{np.abs(lam - lam_ref).max():16.2e}")
    scipy = np.asarray(secs["scipy L-BFGS-B"])
    print(f"ours / scipy L-BFGS-B: {np.median(ours / scipy):.3f}x time (median of {args.repeat} interleaved "
          f"rounds; per round {np.array2string(ours / scipy, precision=2)}), "
          f"|lam_ours - lam_scipy| = {np.abs(outs['projected Newton (ours)'][0] - outs['scipy L-BFGS-B'][0]).max():.2e}")
    plain = np.asarray(secs["scipy L-BFGS-B, plain NumPy D"])
    print(f"ours / scipy L-BFGS-B on a plain NumPy D: {np.median(ours / plain):.3f}x time, |lam_ours - lam_plain| = "
          f"{np.abs(outs['projected Newton (ours)'][0] - outs['scipy L-BFGS-B, plain NumPy D'][0]).max():.2e}")


def bootstrap_table(args) -> None:
    print(f"\nbootstrap, {args.resamples} resamples, m=1, margin 0.3, beta 0.1 (bench/scaling.py's instance)")
    print(f"{'N x K':>12s} {'method':28s} {'seconds':>9s} {'peak MB':>8s} {'speed-up':>9s} "
          f"{'max |interval diff|':>20s} {'max |sample diff|':>18s} {'infeasible':>10s}")
    for size in args.bootstrap_sizes:
        n, k = (int(v) for v in size.lower().split("x"))
        reward, safety = make_bootstrap_instance(n, k)
        a = (reward, safety, np.array([0.3]), 0.1)
        kw = {"n_resamples": args.resamples, "seed": 0}
        fns = {"per resample (before)": lambda a=a, kw=kw: bootstrap_per_resample(*a, **kw),
               "reweighted (bootstrap)": lambda a=a, kw=kw: bootstrap(*a, **kw)}
        outs, secs = interleaved(fns, args.boot_repeat)
        before, after = outs["per resample (before)"], outs["reweighted (bootstrap)"]
        ratio = np.median(np.asarray(secs["per resample (before)"]) / np.asarray(secs["reweighted (bootstrap)"]))
        diff = interval_difference(before, after)
        sample_diff = max(float(np.max(np.abs(before.samples[key] - after.samples[key])))
                          for key in before.samples if before.samples[key].size)
        mem = {"per resample (before)": peak_mb(bootstrap_per_resample, *a, **kw),
               "reweighted (bootstrap)": peak_mb(bootstrap, *a, **kw)}
        for name, res in outs.items():
            speed = f"{ratio:8.1f}x" if name.startswith("reweighted") else f"{'1.0x':>9s}"
            print(f"{n:>6,d} x {k:<3d} {name:28s} {np.median(secs[name]):9.3f} {mem[name]:8.1f} {speed} "
                  f"{diff:20.2e} {sample_diff:18.2e} {res.infeasible_fraction:10.3f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=20_000)
    ap.add_argument("--k", type=int, default=64)
    ap.add_argument("--m", type=int, default=2)
    ap.add_argument("--beta", type=float, default=0.1)
    ap.add_argument("--margin", type=float, nargs="+", default=[0.5, 0.3])
    ap.add_argument("--repeat", type=int, default=7, help="interleaved rounds of the solver table")
    ap.add_argument("--cvxpy", action="store_true", help="solve the primal with cvxpy as the reference")
    ap.add_argument("--no-bootstrap", dest="bootstrap", action="store_false", help="skip the bootstrap table")
    ap.add_argument("--bootstrap-sizes", nargs="+", default=["1000x128", "10000x128"], metavar="NxK")
    ap.add_argument("--resamples", type=int, default=200)
    ap.add_argument("--boot-repeat", type=int, default=3, help="interleaved rounds of the bootstrap table")
    args = ap.parse_args()

    print(f"start: {load()}")
    solver_table(args)
    if args.bootstrap:
        bootstrap_table(args)
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"end: {load()}; process peak RSS {rss:.0f} MB")


if __name__ == "__main__":
    main()
