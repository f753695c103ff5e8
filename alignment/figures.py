"""The paper's figures from a sweep's local outputs (``summary.json`` and ``arrays.npz`` per job; no W&B needed).

    python -m alignment.figures outputs/multirun/2026-11-28/18-00-00          # writes <sweep>/figures/*.{pdf,png}
    python -m alignment.figures <sweep> --out paper/figs

1a  π_ref's safety scores              1b  D(λ) against λ for each margin      1c  |λ_t - λ*| by iteration
2a  predicted vs achieved safety gain  2b  safety scores before / after alignment at one margin
3a  helpfulness vs safety gain (trade-off, Pareto fronts)                   3b  win rates against π_ref
4   λ* against the number of prompts and of responses per prompt
5   compute spent against constraint violation, one-shot vs primal-dual

Every figure function returns ``(figure, data)`` where ``data`` holds exactly the plotted values, so tests can
check them against the summaries. Colours and legend names are fixed per algorithm across figures.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from alignment.dual import dual_path, projected_gradient_descent, solve_dual  # noqa: E402
from alignment.report import Job, Point, Sweep, load_sweep, sweep_points  # noqa: E402

# The paper's names, and one colour per algorithm in every figure.
NAMES = {
    "mocan": "MoCAN", "mocan_newton": "MoCAN + Newton step", "pecan": "PeCAN", "primal_dual_cold": "Primal-dual (cold start)",
    "primal_dual_warm": "Primal-dual (warm start)", "safe_rlhf": "Safe-RLHF (PPO-Lag)", "dpo_helpful": "DPO$_H$",
    "dpo_safe": "DPO$_S$", "fixed_lambda": "Fixed λ", "reference": "SFT (π$_{ref}$)",
}
COLORS = {
    "mocan": "#1f77b4", "mocan_newton": "#17becf", "pecan": "#ff7f0e", "primal_dual_cold": "#2ca02c", "primal_dual_warm": "#98df8a",
    "safe_rlhf": "#d62728", "dpo_helpful": "#9467bd", "dpo_safe": "#8c564b", "fixed_lambda": "#7f7f7f",
    "reference": "#000000",
}
ONE_SHOT = ("mocan", "pecan")

plt.rcParams.update({"figure.dpi": 120, "savefig.dpi": 200, "font.size": 9, "axes.spines.top": False,
                     "axes.spines.right": False, "pdf.fonttype": 42})


def name(label: str) -> str:
    return NAMES.get(label, label)


def color(label: str) -> str:
    return COLORS.get(label, "#17becf")


def _dual_job(sweep: Sweep) -> Job:
    """A job whose arrays feed the dual figures: MoCAN's when there is one (its samples are everyone's)."""
    ranked = sorted(sweep.jobs, key=lambda j: (j.label != "mocan", j.margin))
    for job in ranked:
        if (job.run_dir / "arrays.npz").exists():
            return job
    raise FileNotFoundError(f"no job under {sweep.root} has arrays.npz (outputs of an older version?)")


def _beta(job: Job) -> float:
    return float(job.summary["beta"])


# ----------------------------------------------------------------------------------------------------------
# Figure 1: the dual


def reference_scores(job: Job) -> tuple[Any, dict]:
    a = job.arrays()
    safety = a["safety"][..., 0].ravel()
    weights = None
    if "ref_logprob" in a:  # exact candidate lists: each candidate weighted by π_ref
        w = np.exp(a["ref_logprob"] - a["ref_logprob"].max(axis=1, keepdims=True))
        weights = (w / w.sum(axis=1, keepdims=True)).ravel() / w.shape[0]
    fig, ax = plt.subplots(figsize=(3.4, 2.6))
    ax.hist(safety, bins=40, weights=weights, density=True, color=color("reference"), alpha=0.7)
    ax.axvline(np.average(safety, weights=weights), ls="--", color="k", lw=1, label="mean")
    ax.set_xlabel(f"safety score g ({job.summary['constraints'][0]})")
    ax.set_ylabel("density")
    ax.set_title("π$_{ref}$ safety scores")
    ax.legend(frameon=False)
    return fig, {"safety": safety, "weights": weights}


def dual_curves(sweep: Sweep, job: Job) -> tuple[Any, dict]:
    """D(λ) on the dual job's samples for every margin of the sweep's MoCAN jobs (or the job's own margin)."""
    a = job.arrays()
    margins = sorted({j.margin for j in sweep.jobs if j.label == "mocan"}) or [job.margin]
    beta = _beta(job)
    stars = {m: solve_dual(a["reward"], a["safety"][..., :1], m[0], beta, ref_logprob=a.get("ref_logprob")).lam[0]
             for m in margins}
    span = max(2.5 * max(stars.values()), 1.0)
    grid = np.linspace(0.0, span, 60)
    fig, ax = plt.subplots(figsize=(3.4, 2.6))
    data = {}
    cmap = plt.get_cmap("viridis")
    for i, m in enumerate(margins):
        values = [t.value for t in dual_path(a["reward"], a["safety"][..., :1], m[0], beta, grid[:, None],
                                             ref_logprob=a.get("ref_logprob"))]
        c = cmap(i / max(len(margins) - 1, 1))
        ax.plot(grid, values, color=c, label=f"b = {m[0]:g}")
        ax.plot([stars[m]], [np.interp(stars[m], grid, values)], "o", color=c, ms=3)
        data[m[0]] = {"lambda": grid, "value": np.array(values), "lambda_star": stars[m]}
    ax.set_xlabel("λ")
    ax.set_ylabel("D(λ)")
    ax.set_title("dual function (• λ*)")
    ax.legend(frameon=False, fontsize=7)
    return fig, data


def solver_error(job: Job) -> tuple[Any, dict]:
    a = job.arrays()
    beta, margin = _beta(job), job.margin[0]
    args = (a["reward"], a["safety"][..., :1], margin, beta)
    truth = solve_dual(*args, ref_logprob=a.get("ref_logprob"), tol=1e-13)
    newton = solve_dual(*args, ref_logprob=a.get("ref_logprob"))
    _, pgd = projected_gradient_descent(*args, ref_logprob=a.get("ref_logprob"), tol=1e-10, max_iter=5000)
    errors = {"projected Newton (ours)": np.array([abs(h[0] - truth.lam[0]) for h in newton.history]),
              "projected gradient (paper)": np.array([abs(h[0] - truth.lam[0]) for h in pgd])}
    fig, ax = plt.subplots(figsize=(3.4, 2.6))
    for (label, err), c in zip(errors.items(), ("#1f77b4", "#7f7f7f")):
        ax.semilogy(np.arange(len(err)), np.maximum(err, 1e-16), marker=".", color=c, label=label)
    ax.set_xlabel("iteration t")
    ax.set_ylabel("|λ$_t$ − λ*|")
    ax.set_title(f"solver convergence (b = {margin:g})")
    ax.legend(frameon=False, fontsize=7)
    return fig, {"lambda_star": truth.lam[0], **errors}


# ----------------------------------------------------------------------------------------------------------
# Figure 2: prediction


def predicted_vs_achieved(points: list[Point], labels: tuple[str, ...] = ("mocan", "mocan_newton")
                          ) -> tuple[Any, dict]:
    """The dual's predicted safety gain per margin against the trained policies' held-out gains, and the first
    label's in-sample gains (fresh samples on the dual's prompts) where the runs measured them: predicted →
    in-sample is estimation and fit, in-sample → held-out generalisation."""
    shown = [lab for lab in labels if any(p.label == lab for p in points)] or [labels[0]]

    def series(label: str) -> list[Point]:
        return sorted((p for p in points if p.label == label and p.predicted_safety_gain is not None),
                      key=lambda p: p.margin)

    def err(values: list[float], bounds: list[tuple[float, float] | None]) -> np.ndarray:
        return np.array([[v - b[0], b[1] - v] if b else [0.0, 0.0] for v, b in zip(values, bounds)]).reshape(-1, 2).T

    fig, ax = plt.subplots(figsize=(4.0, 3.0))
    pts = series(shown[0])
    x = np.array([p.margin[0] for p in pts])
    pred = np.array([p.predicted_safety_gain for p in pts])
    ach = np.array([p.safety_gain for p in pts])
    ax.errorbar(x - 0.009, pred, yerr=err(list(pred), [p.predicted_safety_ci for p in pts]), fmt="s", ms=3,
                capsize=2, color="#7f7f7f", label="predicted (dual)")
    data: dict[str, Any] = {"margin": x, "predicted": pred, "achieved": ach}
    if pts and all(p.insample_safety_gain is not None for p in pts):
        ins = [p.insample_safety_gain for p in pts]
        ax.errorbar(x - 0.003, ins, yerr=err(ins, [p.insample_safety_ci for p in pts]), fmt="o", ms=3,
                    mfc="white", capsize=2, color=color(shown[0]), label=f"in-sample ({name(shown[0])})")
        data["insample"] = np.array(ins)
    for i, label in enumerate(shown):
        own = series(label)
        gains = [p.safety_gain for p in own]
        ax.errorbar(np.array([p.margin[0] for p in own]) + 0.003 + 0.006 * i, gains,
                    yerr=err(gains, [p.safety_ci for p in own]), fmt="o", ms=3, capsize=2, color=color(label),
                    label=f"held-out ({name(label)})")
        if i:
            data[f"achieved_{label}"] = np.array(gains)
    if len(x):
        lim = [min(x.min(), 0), x.max() * 1.1]
        ax.plot(lim, lim, ls=":", color="k", lw=0.8, label="= margin")
    ax.set_xlabel("safety margin b")
    ax.set_ylabel("safety gain over π$_{ref}$")
    ax.set_title("predicted vs achieved (95% CI)")
    ax.legend(frameon=False, fontsize=7)
    return fig, data


def score_distributions(job: Job) -> tuple[Any, dict]:
    a = job.arrays()
    fig, ax = plt.subplots(figsize=(3.4, 2.6))
    data = {}
    for key, label, c in (("reference", "π$_{ref}$", color("reference")), ("policy", name(job.label), color(job.label))):
        values = a[f"eval_{key}_safety"]
        weights = a.get(f"eval_{key}_weight")
        ax.hist(values, bins=40, weights=weights, density=True, alpha=0.5, color=c, label=label)
        data[key] = float(np.average(values, weights=weights))
    ax.set_xlabel("safety score on held-out prompts")
    ax.set_ylabel("density")
    ax.set_title(f"before / after alignment (b = {job.margin[0]:g})")
    ax.legend(frameon=False)
    return fig, {"mean": data}


# ----------------------------------------------------------------------------------------------------------
# Figure 3: trade-off


def tradeoff(points: list[Point]) -> tuple[Any, dict]:
    fig, ax = plt.subplots(figsize=(4.0, 3.0))
    data: dict[str, list] = {}
    for label in sorted({p.label for p in points}, key=lambda lab: list(NAMES).index(lab) if lab in NAMES else 99):
        pts = sorted((p for p in points if p.label == label), key=lambda p: p.reward_gain)
        xs = np.array([p.reward_gain for p in pts])
        ys = np.array([p.safety_gain for p in pts])
        xerr = np.array([[p.reward_gain - p.reward_ci[0], p.reward_ci[1] - p.reward_gain] for p in pts]).T
        yerr = np.array([[p.safety_gain - p.safety_ci[0], p.safety_ci[1] - p.safety_gain] for p in pts]).T
        ax.errorbar(xs, ys, xerr=xerr, yerr=yerr, fmt="o", ms=4, capsize=2, color=color(label), label=name(label),
                    alpha=0.9)
        front = [p for p in pts if p.on_front]
        if len(front) > 1:
            ax.plot([p.reward_gain for p in front], [p.safety_gain for p in front], color=color(label), lw=1)
        data[label] = [(p.reward_gain, p.safety_gain) for p in pts]
    ax.axhline(0, color="k", lw=0.5)
    ax.axvline(0, color="k", lw=0.5)
    ax.set_xlabel("helpfulness gain over π$_{ref}$")
    ax.set_ylabel("safety gain over π$_{ref}$")
    ax.set_title("helpfulness-safety trade-off (95% CI)")
    ax.legend(frameon=False, fontsize=7, loc="best")
    return fig, data


def win_rates(sweep: Sweep) -> tuple[Any, dict] | None:
    jobs = [j for j in sweep.jobs if j.summary.get("eval/win_rate_helpfulness") is not None]
    if not jobs:
        return None  # exact worlds report exact gains, not model-based win rates
    fig, ax = plt.subplots(figsize=(4.0, 2.8))
    data = {}
    for job in jobs:
        s = job.summary
        key = f"{job.label} b={job.margin[0]:g} s={s['seed']}"
        h, g = s["eval/win_rate_helpfulness"], s["eval/win_rate_safety"]
        hc, gc = s["eval/win_rate_helpfulness_ci"], s["eval/win_rate_safety_ci"]
        ax.errorbar([h], [g], xerr=[[h - hc[0]], [hc[1] - h]], yerr=[[g - gc[0]], [gc[1] - g]], fmt="o", ms=4,
                    capsize=2, color=color(job.label))
        data[key] = (h, g)
    for label in sorted({j.label for j in jobs}):
        ax.plot([], [], "o", color=color(label), label=name(label))
    ax.axhline(0.5, color="k", lw=0.5, ls=":")
    ax.axvline(0.5, color="k", lw=0.5, ls=":")
    ax.set_xlabel("helpfulness win rate vs π$_{ref}$")
    ax.set_ylabel("safety win rate vs π$_{ref}$")
    ax.set_title("model-based win rates (95% CI)")
    ax.legend(frameon=False, fontsize=7)
    return fig, data


# ----------------------------------------------------------------------------------------------------------
# Figure 4: how much data the dual needs


def lambda_vs_data(job: Job, *, repeats: int = 20, seed: int = 0) -> tuple[Any, dict]:
    """λ* re-solved on random subsets of prompts (and of responses per prompt, for iid samples): median and
    95% range over ``repeats`` subsets, against the full-data λ*."""
    a = job.arrays()
    reward, safety, ref = a["reward"], a["safety"][..., :1], a.get("ref_logprob")
    beta, margin = _beta(job), job.margin[0]
    rng = np.random.default_rng(seed)
    n, k = reward.shape
    full = solve_dual(reward, safety, margin, beta, ref_logprob=ref).lam[0]

    def spread(sizes, draw) -> dict:
        rows = []
        for size in sizes:
            lams = []
            for _ in range(repeats):
                r, g, q = draw(size)
                sol = solve_dual(r, g, margin, beta, ref_logprob=q)
                lams.append(sol.lam[0] if sol.feasible else np.nan)
            lams = np.array(lams)
            ok = lams[np.isfinite(lams)]
            rows.append((size, *(np.quantile(ok, [0.5, 0.025, 0.975]) if len(ok) else [np.nan] * 3)))
        return {"size": np.array([r[0] for r in rows]), "median": np.array([r[1] for r in rows]),
                "low": np.array([r[2] for r in rows]), "high": np.array([r[3] for r in rows])}

    prompt_sizes = sorted({max(int(n * f), 4) for f in (0.05, 0.1, 0.2, 0.4, 0.7, 1.0)})

    def prompts(size):
        idx = rng.choice(n, size=size, replace=size == n)  # the full size: a bootstrap resample
        return reward[idx], safety[idx], None if ref is None else ref[idx]

    data = {"full": full, "prompts": spread(prompt_sizes, prompts)}
    panels = [("prompts", "number of prompts N")]
    if ref is None and k >= 4:
        def responses(size):
            idx = np.argsort(rng.random((n, k)), axis=1)[:, :size]
            rows = np.arange(n)[:, None]
            return reward[rows, idx], safety[rows, idx], None

        data["responses"] = spread(sorted({2, 4, 8, 16, 32, 64, 128} & set(range(2, k + 1)) | {k}), responses)
        panels.append(("responses", "responses per prompt K"))
    fig, axes = plt.subplots(1, len(panels), figsize=(3.3 * len(panels), 2.6), squeeze=False)
    for ax, (key, xlabel) in zip(axes[0], panels):
        d = data[key]
        ax.fill_between(d["size"], d["low"], d["high"], color=color("mocan"), alpha=0.25, label="95% range")
        ax.plot(d["size"], d["median"], "o-", ms=3, color=color("mocan"), label="median λ*")
        ax.axhline(full, ls=":", color="k", lw=0.8, label="all data")
        ax.set_xscale("log", base=2)
        ax.set_xticks(d["size"], [str(int(v)) for v in d["size"]])
        ax.minorticks_off()
        ax.set_xlabel(xlabel)
        ax.set_ylabel("λ*")
        ax.legend(frameon=False, fontsize=7)
    fig.suptitle(f"λ* from subsets of the dual's data (b = {margin:g})", fontsize=9)
    fig.tight_layout()
    return fig, data


# ----------------------------------------------------------------------------------------------------------
# Figure 5: compute


def compute_vs_violation(points: list[Point]) -> tuple[Any, dict]:
    fig, ax = plt.subplots(figsize=(4.0, 2.8))
    data = {}
    for p in points:
        if p.label == "reference":
            continue
        marker = "*" if p.label in ONE_SHOT else "o"
        ax.scatter([max(p.compute_tokens, 1)], [p.violation], s=40 if marker == "*" else 20, marker=marker,
                   color=color(p.label))
        data[f"{p.label} b={p.margin[0]:g}"] = (p.compute_tokens, p.violation)
    for label in sorted({p.label for p in points} - {"reference"}):
        ax.scatter([], [], marker="*" if label in ONE_SHOT else "o", color=color(label), label=name(label))
    ax.set_xscale("log")
    ax.set_xlabel("policy tokens processed (forward + backward)")
    ax.set_ylabel("constraint violation max(0, b − gain)")
    ax.set_title("compute spent vs constraint violation")
    ax.legend(frameon=False, fontsize=7)
    return fig, data


def lambda_vs_margin(points: list[Point]) -> tuple[Any, dict]:
    fig, ax = plt.subplots(figsize=(3.4, 2.6))
    data = {}
    for label in sorted({p.label for p in points if p.lam}):
        pts = sorted((p for p in points if p.label == label and p.lam), key=lambda p: p.margin)
        xs, ys = [p.margin[0] for p in pts], [p.lam[0] for p in pts]
        ax.plot(xs, ys, "o-", ms=3, color=color(label), label=name(label))
        data[label] = list(zip(xs, ys))
    ax.set_xlabel("safety margin b")
    ax.set_ylabel("λ")
    ax.set_title("multiplier against margin")
    ax.legend(frameon=False, fontsize=7)
    return fig, data


# ----------------------------------------------------------------------------------------------------------
# Entry points


def sweep_charts(sweep: Sweep, points: list[Point]) -> dict[str, tuple[Any, dict]]:
    """The charts the sweep report logs to W&B."""
    return {"pareto": tradeoff(points), "predicted_vs_achieved": predicted_vs_achieved(points),
            "lambda_vs_margin": lambda_vs_margin(points), "compute_vs_violation": compute_vs_violation(points)}


def make_figures(root: str | Path, out: str | Path | None = None) -> dict[str, dict]:
    """Every figure of the sweep under ``root`` as PDF and PNG in ``out`` (default ``<root>/figures``)."""
    sweep = load_sweep(root)
    if not sweep.jobs:
        raise ValueError(f"no completed jobs under {root}: nothing to plot")
    out = Path(out) if out else sweep.root / "figures"
    out.mkdir(parents=True, exist_ok=True)
    points = sweep_points(sweep)
    job = _dual_job(sweep)
    mocan_jobs = sorted((j for j in sweep.jobs if j.label == job.label), key=lambda j: j.margin)
    middle = mocan_jobs[len(mocan_jobs) // 2]
    figures = {
        "fig1a_reference_scores": lambda: reference_scores(job),
        "fig1b_dual_curves": lambda: dual_curves(sweep, job),
        "fig1c_solver_error": lambda: solver_error(job),
        "fig2a_predicted_vs_achieved": lambda: predicted_vs_achieved(points),
        "fig2b_score_distributions": lambda: score_distributions(middle),
        "fig3a_tradeoff": lambda: tradeoff(points),
        "fig3b_win_rates": lambda: win_rates(sweep),
        "fig4_lambda_vs_data": lambda: lambda_vs_data(job),
        "fig5_compute": lambda: compute_vs_violation(points),
    }
    data = {}
    for key, build in figures.items():
        made = build()
        if made is None:
            continue
        fig, values = made
        for ext in ("pdf", "png"):
            fig.savefig(out / f"{key}.{ext}", bbox_inches="tight")
        plt.close(fig)
        data[key] = values
    return data


def main() -> None:
    parser = argparse.ArgumentParser(description="Regenerate the paper's figures from a sweep's local outputs.")
    parser.add_argument("sweep_dir", type=Path)
    parser.add_argument("--out", type=Path, default=None, help="output folder (default: <sweep_dir>/figures)")
    args = parser.parse_args()
    start = time.perf_counter()
    made = make_figures(args.sweep_dir, args.out)
    out = args.out or args.sweep_dir / "figures"
    print(f"{len(made)} figures in {time.perf_counter() - start:.1f} s -> {out}")
    for key in made:
        print(f"  {out / key}.pdf")


if __name__ == "__main__":
    main()
