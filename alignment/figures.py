"""The paper's figures from a sweep's local outputs (``summary.json`` and ``arrays.npz`` per job; no W&B needed).

    python -m alignment.figures outputs/multirun/2026-11-28/18-00-00          # writes <sweep>/figures/*.{pdf,png}
    python -m alignment.figures <sweep> --out paper/figs

1a  π_ref's safety scores              1b  D(λ) against λ for each margin      1c  |λ_t - λ*| by iteration
1d  λ against the margin, per algorithm (λ* for the one-shot methods, the last iterate for primal-dual)
2a  predicted vs achieved safety gain  2b  safety scores before / after alignment at one margin
3a  helpfulness vs safety gain (trade-off, Pareto fronts)                   3b  win rates against π_ref
4   λ* against the number of prompts and of responses per prompt
5   compute spent against constraint violation, one-shot vs primal-dual

Every figure function returns ``(figure, data)`` where ``data`` holds exactly the plotted values, so tests can
check them against the summaries; where the sweep holds nothing a figure could show (no MoCAN job for 2a, only
π_ref for 5, an exact world for 3b) it raises ``NothingToPlot`` and ``make_figures`` writes no file for it and
says why, rather than writing an empty frame a reader would take for a result. Colours, markers and legend
names are fixed per algorithm across figures, so an algorithm stays recognisable where points overlap.
"""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from alignment.dual import dual_path, projected_gradient_descent, solve_dual  # noqa: E402
from alignment.sweep import Job, Point, Sweep, load_sweep, sweep_points  # noqa: E402

log = logging.getLogger(__name__)

# The paper's names, and one colour and one marker per algorithm in every figure: colours alone do not keep
# overlapping points apart (MoCAN's and primal-dual's fronts nearly coincide), shapes do.
NAMES = {
    "mocan": "MoCAN", "mocan_newton": "MoCAN + Newton step", "pecan": "PeCAN", "primal_dual_cold": "Primal-dual (cold start)",
    "primal_dual_warm": "Primal-dual (warm start)", "safe_rlhf": "Safe-RLHF (PPO-Lag)", "dpo_helpful": "DPO$_H$",
    "dpo_safe": "DPO$_S$", "fixed_lambda": "Fixed λ", "reference": "SFT (π$_{ref}$)",
}
COLORS = {
    "mocan": "#1f77b4", "mocan_newton": "#17becf", "pecan": "#ff7f0e", "primal_dual_cold": "#2ca02c",
    "primal_dual_warm": "#1b5e20",  # a darker green than cold start's: the pale one vanished on white
    "safe_rlhf": "#d62728", "dpo_helpful": "#9467bd", "dpo_safe": "#8c564b", "fixed_lambda": "#7f7f7f",
    "reference": "#000000",
}
MARKERS = {
    "mocan": "o", "mocan_newton": "D", "pecan": "s", "primal_dual_cold": "^", "primal_dual_warm": "v",
    "safe_rlhf": "P", "dpo_helpful": "X", "dpo_safe": "d", "fixed_lambda": "h", "reference": "*",
}
ONE_SHOT = ("mocan", "pecan")
# Algorithms whose reported λ is the last iterate of a loop rather than the dual's solution λ*.
ITERATIVE = ("primal_dual_cold", "primal_dual_warm", "safe_rlhf")

plt.rcParams.update({"figure.dpi": 120, "savefig.dpi": 200, "font.size": 9, "axes.spines.top": False,
                     "axes.spines.right": False, "pdf.fonttype": 42})


class NothingToPlot(Exception):
    """The sweep holds nothing this figure could show; the message says what is missing."""


class FigureData(dict):
    """``make_figures``' result: figure key -> plotted values, and ``skipped``: figure key -> why no file."""

    def __init__(self) -> None:
        super().__init__()
        self.skipped: dict[str, str] = {}


def name(label: str) -> str:
    return NAMES.get(label, label)


def color(label: str) -> str:
    return COLORS.get(label, "#e377c2")  # not any algorithm's colour, so an unknown label is not mistaken for one


def marker(label: str) -> str:
    return MARKERS.get(label, "p")


def _size(label: str) -> float:
    """Marker size in points: thin and starred shapes drawn larger, so every shape carries about as much ink."""
    return {"*": 8.0, "X": 6.0, "x": 6.0, "d": 6.0, "^": 5.5, "v": 5.5, "P": 5.5}.get(marker(label), 5.0)


def _order(label: str) -> int:
    return list(NAMES).index(label) if label in NAMES else len(NAMES)


def margin_colors(margins: list[float]) -> dict[float, tuple]:
    """One colour per margin, dark to light in order. viridis stops at 0.72: its top end is a pale yellow that
    disappears on white paper (and on a projector)."""
    cmap = plt.get_cmap("viridis")
    ordered = sorted(margins)
    return {m: cmap(0.72 * i / max(len(ordered) - 1, 1)) for i, m in enumerate(ordered)}


def _offsets(margins: np.ndarray, count: int, share: float = 0.025) -> np.ndarray:
    """x offsets for ``count`` series drawn side by side at the same margins, so their intervals do not hide
    each other. The step is a share of the largest margin (about that share of an axis from 0 to it, so a few
    points' width), and never so large that a series strays more than a third of the way to the next margin,
    where it would read as another margin. Only the drawing moves: the data keep the true margins."""
    distinct = np.unique(np.asarray(margins, dtype=float))
    step = share * (float(np.max(np.abs(distinct))) if len(distinct) and np.any(distinct) else 1.0)
    if len(distinct) > 1 and count > 1:
        step = min(step, 0.6 * float(np.min(np.diff(distinct))) / (count - 1))
    return (np.arange(count) - (count - 1) / 2) * step


def _dual_job(sweep: Sweep) -> Job:
    """A job whose arrays feed the dual figures: MoCAN's when there is one (its samples are everyone's)."""
    ranked = sorted(sweep.jobs, key=lambda j: (j.label != "mocan", j.margin))
    for job in ranked:
        if (job.run_dir / "arrays.npz").exists():
            return job
    raise NothingToPlot(f"no job under {sweep.root} has arrays.npz (outputs of an older version?)")


def _beta(job: Job) -> float:
    return float(job.summary["beta"])


def _tolerance(sweep: Sweep) -> float | None:
    """The evaluation's tolerance on the constraint (``eval/tolerance``): the largest the sweep's jobs used, so
    the line drawn never claims a job met its constraint that did not."""
    values = [float(j.summary["eval/tolerance"]) for j in sweep.jobs if j.summary.get("eval/tolerance") is not None]
    return max(values) if values else None


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
    """D(λ) on the dual job's samples for every margin at which the sweep solved a dual (the job's own margin
    where none did). The samples are π_ref's, shared by every algorithm, so the curves need no MoCAN job."""
    a = job.arrays()
    margins = sorted({j.margin for j in sweep.jobs if j.summary.get("dual/lambda")}) or [job.margin]
    beta = _beta(job)
    solutions = {m: solve_dual(a["reward"], a["safety"][..., :1], m[0], beta, ref_logprob=a.get("ref_logprob"))
                 for m in margins}
    stars = {m: float(sol.lam[0]) for m, sol in solutions.items() if sol.feasible}
    if not stars:
        raise NothingToPlot("no margin of the sweep is reachable on the dual job's samples")
    span = max(2.5 * max(stars.values()), 1.0)
    grid = np.linspace(0.0, span, 60)
    fig, ax = plt.subplots(figsize=(3.4, 2.6))
    data = {}
    colors = margin_colors([m[0] for m in stars])
    for m, star in stars.items():
        values = [t.value for t in dual_path(a["reward"], a["safety"][..., :1], m[0], beta, grid[:, None],
                                             ref_logprob=a.get("ref_logprob"))]
        c = colors[m[0]]
        ax.plot(grid, values, color=c, label=f"b = {float(m[0]):g}")
        ax.plot([star], [np.interp(star, grid, values)], "o", color=c, ms=4, mec="white", mew=0.5)
        data[float(m[0])] = {"lambda": grid, "value": np.array(values), "lambda_star": star}
    ax.set_xlabel("λ")
    ax.set_ylabel("D(λ)")
    ax.set_title("dual function D(λ) (• λ*)")
    ax.legend(frameon=False, fontsize=7)
    return fig, data


def solver_error(job: Job) -> tuple[Any, dict]:
    a = job.arrays()
    beta, margin = _beta(job), float(job.margin[0])
    args = (a["reward"], a["safety"][..., :1], margin, beta)
    truth = solve_dual(*args, ref_logprob=a.get("ref_logprob"), tol=1e-13)
    newton = solve_dual(*args, ref_logprob=a.get("ref_logprob"))
    _, pgd = projected_gradient_descent(*args, ref_logprob=a.get("ref_logprob"), tol=1e-10, max_iter=5000)
    errors = {"projected Newton (ours)": np.array([abs(h[0] - truth.lam[0]) for h in newton.history]),
              "projected gradient (paper)": np.array([abs(h[0] - truth.lam[0]) for h in pgd])}
    fig, ax = plt.subplots(figsize=(3.4, 2.6))
    for (label, err), c in zip(errors.items(), ("#1f77b4", "#7f7f7f")):
        # A marker on every one of gradient descent's hundreds of iterations draws a thick smear, not a line.
        ax.semilogy(np.arange(len(err)), np.maximum(err, 1e-16), marker=".", markevery=max(1, len(err) // 25),
                    color=c, label=label)
    ax.set_xlabel("iteration t")
    ax.set_ylabel("|λ$_t$ − λ*|")
    ax.set_title(f"solver convergence (b = {margin:g})")
    ax.legend(frameon=False, fontsize=7)
    return fig, {"lambda_star": truth.lam[0], **errors}


def lambda_vs_margin(sweep: Sweep) -> tuple[Any, dict]:
    """The multiplier each algorithm ended with, against the margin: λ* for the one-shot methods (with the
    dual's bootstrap 95% interval where one seed ran), λ* after a Newton step for ``mocan_newton``, the last
    iterate for primal-dual and Safe-RLHF. Several seeds: their mean, each seed a small dot. Fixed-λ grids are
    left out: their λ is an input, not an answer. The W&B sweep report logs the same chart."""
    groups: dict[str, dict[float, list[Job]]] = {}
    for job in sweep.jobs:
        if job.summary.get("dual/lambda") and job.label not in ("fixed_lambda", "reference"):
            groups.setdefault(job.label, {}).setdefault(float(job.margin[0]), []).append(job)
    if not groups:
        raise NothingToPlot("no job reports a multiplier (dual/lambda): the sweep has only π_ref, DPO or fixed λ")
    labels = sorted(groups, key=_order)
    offsets = _offsets(np.array([m for lab in labels for m in groups[lab]]), len(labels))
    fig, ax = plt.subplots(figsize=(3.6, 2.8))
    data: dict[str, dict[str, np.ndarray]] = {}
    for i, label in enumerate(labels):
        margins = np.array(sorted(groups[label]))
        runs = [[float(j.summary["dual/lambda"][0]) for j in groups[label][m]] for m in margins]
        lam = np.array([np.mean(r) for r in runs])
        low, high = np.full(len(margins), np.nan), np.full(len(margins), np.nan)
        for k, m in enumerate(margins):
            ci = groups[label][m][0].summary.get("dual/lambda_ci")
            # One seed: the dual's bootstrap over prompts, as the summary has it. Only where the λ reported is
            # that dual's λ*: MoCAN + Newton step and warm primal-dual carry their starting λ*'s interval.
            if len(runs[k]) == 1 and ci and label in ONE_SHOT:
                low[k], high[k] = ci[0][0], ci[1][0]
        x = margins + offsets[i]
        ok = np.isfinite(low)
        # Drawn from its ends (not as ± around λ): a percentile interval need not contain the point estimate.
        ax.vlines(x[ok], low[ok], high[ok], color=color(label), lw=0.8, alpha=0.7)
        ax.plot(np.concatenate([x[ok], x[ok]]), np.concatenate([low[ok], high[ok]]), "_", ms=4, color=color(label),
                alpha=0.7)
        suffix = ": last iterate" if label in ITERATIVE else ""
        ax.plot(x, lam, marker=marker(label), ms=_size(label) - 0.5, lw=1, color=color(label), mec="white", mew=0.5,
                label=name(label) + suffix, zorder=3 + len(labels) - i)
        for xk, r in zip(x, runs):
            if len(r) > 1:
                ax.plot([xk] * len(r), r, ".", ms=2, color=color(label), alpha=0.5)
        data[label] = {"margin": margins, "lambda": lam, "low": low, "high": high}
    # Ticks at the sweep's margins: the dodged points must not read as other margins.
    everything = np.unique([m for d in data.values() for m in d["margin"]])
    ax.set_xticks(everything, [f"{m:g}" for m in everything])
    if len(everything) == 1:  # matplotlib would zoom onto the dodge and make it look like several margins
        half = 0.2 * abs(everything[0]) or 0.2
        ax.set_xlim(everything[0] - half, everything[0] + half)
    ax.set_xlabel("safety margin b")
    ax.set_ylabel("λ")
    ax.set_title("multiplier against margin" + (" (95% CI)" if any(
        np.isfinite(d["low"]).any() for d in data.values()) else ""))
    ax.legend(frameon=False, fontsize=7)
    return fig, data


# ----------------------------------------------------------------------------------------------------------
# Figure 2: prediction


def predicted_vs_achieved(points: list[Point], labels: tuple[str, ...] = ("mocan", "mocan_newton"), *,
                          tolerance: float | None = None) -> tuple[Any, dict]:
    """The dual's predicted safety gain per margin against the trained policies' held-out gains, and the first
    label's in-sample gains (fresh samples on the dual's prompts) where the runs measured them: predicted →
    in-sample is estimation and fit, in-sample → held-out generalisation. The series stand side by side at
    each margin (predicted leftmost, on top) so no interval hides another; the grey band under the diagonal is
    the evaluation's tolerance, inside which a constraint counts as met."""

    def series(label: str) -> list[Point]:
        return sorted((p for p in points if p.label == label and p.predicted_safety_gain is not None),
                      key=lambda p: p.margin)

    shown = [lab for lab in labels if series(lab)]
    if not shown:
        raise NothingToPlot(f"no {' or '.join(name(lab) for lab in labels)} job with a predicted safety gain")

    def err(values: list[float], bounds: list[tuple[float, float] | None]) -> np.ndarray:
        return np.array([[v - b[0], b[1] - v] if b else [0.0, 0.0] for v, b in zip(values, bounds)]).reshape(-1, 2).T

    fig, ax = plt.subplots(figsize=(4.0, 3.0))
    pts = series(shown[0])
    x = np.array([float(p.margin[0]) for p in pts])
    pred = np.array([p.predicted_safety_gain for p in pts])
    ach = np.array([p.safety_gain for p in pts])
    insample = bool(pts) and all(p.insample_safety_gain is not None for p in pts)
    count = 1 + insample + len(shown)  # series side by side at each margin
    everything = np.concatenate([np.array([float(p.margin[0]) for p in series(lab)]) for lab in shown])
    offset = _offsets(everything, count)
    data: dict[str, Any] = {"margin": x, "predicted": pred, "achieved": ach}
    if len(everything):
        # One margin: a longer diagonal keeps the legend (upper left) clear of the points at its end.
        lim = np.array([min(everything.min(), 0.0), everything.max() * (1.1 if len(np.unique(everything)) > 1
                                                                         else 1.3)])
        if tolerance:
            ax.fill_between(lim, lim - tolerance, lim, color="#7f7f7f", alpha=0.15, lw=0,
                            label=f"within the tolerance ({tolerance:g}) of b")
            data["tolerance"] = tolerance
        ax.plot(lim, lim, ls=":", color="k", lw=0.8, label="gain = b")
    # Predicted on top: it is a point estimate whose interval is narrower than the achieved ones' and was the
    # one hidden beneath them.
    ax.errorbar(x + offset[0], pred, yerr=err(list(pred), [p.predicted_safety_ci for p in pts]), fmt="s", ms=3.5,
                capsize=2, color="#555555", label="predicted (dual)", zorder=5)
    if insample:
        ins = [p.insample_safety_gain for p in pts]
        ax.errorbar(x + offset[1], ins, yerr=err(ins, [p.insample_safety_ci for p in pts]), fmt=marker(shown[0]),
                    ms=3.5, mfc="white", capsize=2, color=color(shown[0]), label=f"in-sample ({name(shown[0])})",
                    zorder=4)
        data["insample"] = np.array(ins)
    for i, label in enumerate(shown):
        own = series(label)
        gains = [p.safety_gain for p in own]
        ax.errorbar(np.array([float(p.margin[0]) for p in own]) + offset[1 + insample + i], gains,
                    yerr=err(gains, [p.safety_ci for p in own]), fmt=marker(label), ms=3.5, capsize=2,
                    color=color(label), label=f"held-out ({name(label)})", zorder=3)
        if i:
            data[f"achieved_{label}"] = np.array(gains)
    ax.set_xlabel("safety margin b")
    ax.set_ylabel("safety gain over π$_{ref}$")
    ax.set_title("predicted vs achieved (95% CI)")
    ax.legend(frameon=False, fontsize=7)
    return fig, data


def score_distributions(job: Job) -> tuple[Any, dict]:
    """π_ref's and the trained policy's held-out safety scores on shared bins: π_ref filled, the policy as an
    outline on top, so both stay readable where they overlap (two translucent fills blend into a third colour)."""
    if job.label == "reference":
        raise NothingToPlot("only π_ref was run: there is no aligned policy to compare with it")
    a = job.arrays()
    if "eval_policy_safety" not in a:
        raise NothingToPlot(f"{job.run_dir} has no held-out scores (outputs of an older version?)")
    fig, ax = plt.subplots(figsize=(3.4, 2.6))
    data = {}
    series = (("reference", "π$_{ref}$", color("reference")), ("policy", name(job.label), color(job.label)))
    bins = np.histogram_bin_edges(np.concatenate([a[f"eval_{key}_safety"] for key, _, _ in series]), bins=40)
    for key, label, c in series:
        values = a[f"eval_{key}_safety"]
        weights = a.get(f"eval_{key}_weight")
        mean = float(np.average(values, weights=weights))
        label = f"{label} (mean {mean:.2f}, dashed)"
        if key == "reference":
            ax.hist(values, bins=bins, weights=weights, density=True, color=c, alpha=0.3, label=label)
        else:
            ax.hist(values, bins=bins, weights=weights, density=True, histtype="step", lw=1.3, color=c, label=label)
        ax.axvline(mean, ls="--", lw=1, color=c)
        data[key] = mean
    ax.set_xlabel("safety score on held-out prompts")
    ax.set_ylabel("density")
    ax.set_title(f"before / after alignment (b = {float(job.margin[0]):g})")
    ax.set_ylim(0, ax.get_ylim()[1] * 1.3)  # headroom: the legend sits above the bars, not across them
    ax.legend(frameon=False, fontsize=7, loc="upper left")
    return fig, {"mean": data}


# ----------------------------------------------------------------------------------------------------------
# Figure 3: trade-off


def tradeoff(points: list[Point]) -> tuple[Any, dict]:
    """Every algorithm's points with 95% intervals and its Pareto front. Each algorithm has its own marker and
    front line style, MoCAN is drawn last (on top) and intervals are thin and translucent: the fronts of MoCAN
    and primal-dual nearly coincide, and with one marker shape the later one hid the earlier."""
    if all(p.label == "reference" for p in points):
        raise NothingToPlot("only π_ref was run: its point is the origin, there is no trade-off to show")
    fig, ax = plt.subplots(figsize=(4.0, 3.0))
    data: dict[str, list] = {}
    labels = sorted({p.label for p in points}, key=_order)
    styles = ("-", "--", "-.", ":")
    handles = {}
    for rank, label in reversed(list(enumerate(labels))):
        pts = sorted((p for p in points if p.label == label), key=lambda p: p.reward_gain)
        xs = np.array([p.reward_gain for p in pts])
        ys = np.array([p.safety_gain for p in pts])
        xerr = np.array([[p.reward_gain - p.reward_ci[0], p.reward_ci[1] - p.reward_gain] for p in pts]).T
        yerr = np.array([[p.safety_gain - p.safety_ci[0], p.safety_ci[1] - p.safety_gain] for p in pts]).T
        z = 3 + 2 * (len(labels) - rank)
        ax.errorbar(xs, ys, xerr=xerr, yerr=yerr, fmt="none", ecolor=color(label), elinewidth=0.7, capsize=1.5,
                    alpha=0.45, zorder=z)
        (handles[label],) = ax.plot(xs, ys, marker(label), ms=_size(label), color=color(label), mec="white",
                                    mew=0.5, zorder=z + 1)
        if rank == 0 and len({p.margin for p in pts}) > 1:
            # The first algorithm's points named by their margin: which b bought which trade-off.
            for p in pts:
                ax.annotate(f"b={float(p.margin[0]):g}", (p.reward_gain, p.safety_gain), xytext=(4, 3),
                            textcoords="offset points", fontsize=6, color=color(label), zorder=z + 2)
        front = sorted((p for p in pts if p.on_front), key=lambda p: p.reward_gain)
        if len(front) > 1:
            ax.plot([p.reward_gain for p in front], [p.safety_gain for p in front], color=color(label), lw=1,
                    ls=styles[rank % len(styles)], zorder=z)
        data[label] = [(p.reward_gain, p.safety_gain) for p in pts]
    ax.axhline(0, color="k", lw=0.5)
    ax.axvline(0, color="k", lw=0.5)
    ax.set_xlabel("helpfulness gain over π$_{ref}$")
    ax.set_ylabel("safety gain over π$_{ref}$")
    ax.set_title("helpfulness-safety trade-off (95% CI)")
    # Legend in the paper's order although the drawing order is reversed.
    ax.legend([handles[lab] for lab in labels], [name(lab) for lab in labels], frameon=False, fontsize=7, loc="best")
    return fig, data


def win_rates(sweep: Sweep) -> tuple[Any, dict]:
    jobs = [j for j in sweep.jobs if j.summary.get("eval/win_rate_helpfulness") is not None]
    if not jobs:
        raise NothingToPlot("no job has model-based win rates (exact worlds report exact gains instead)")
    fig, ax = plt.subplots(figsize=(4.0, 2.8))
    data = {}
    for job in sorted(jobs, key=lambda j: -_order(j.label)):  # MoCAN last, on top
        s = job.summary
        key = f"{job.label} b={float(job.margin[0]):g} s={s['seed']}"
        h, g = s["eval/win_rate_helpfulness"], s["eval/win_rate_safety"]
        hc, gc = s["eval/win_rate_helpfulness_ci"], s["eval/win_rate_safety_ci"]
        ax.errorbar([h], [g], xerr=[[h - hc[0]], [hc[1] - h]], yerr=[[g - gc[0]], [gc[1] - g]], fmt="none",
                    ecolor=color(job.label), elinewidth=0.7, capsize=1.5, alpha=0.45)
        ax.plot([h], [g], marker(job.label), ms=_size(job.label), color=color(job.label), mec="white", mew=0.5)
        data[key] = (h, g)
    for label in sorted({j.label for j in jobs}, key=_order):
        ax.plot([], [], marker(label), ms=_size(label), color=color(label), label=name(label))
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
    95% range over ``repeats`` subsets, against the full-data λ*. Subsets on which the margin is out of reach
    have no λ*; the share of them is written under the size, since a size with none left would otherwise just
    be a gap in the curve."""
    a = job.arrays()
    reward, safety, ref = a["reward"], a["safety"][..., :1], a.get("ref_logprob")
    beta, margin = _beta(job), float(job.margin[0])
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
            rows.append((size, *(np.quantile(ok, [0.5, 0.025, 0.975]) if len(ok) else [np.nan] * 3),
                         1 - len(ok) / repeats))
        return {"size": np.array([r[0] for r in rows]), "median": np.array([r[1] for r in rows]),
                "low": np.array([r[2] for r in rows]), "high": np.array([r[3] for r in rows]),
                "infeasible": np.array([r[4] for r in rows])}

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
        ticks = [f"{int(s)}" + (f"\n{share:.0%} out\nof reach" if share else "")
                 for s, share in zip(d["size"], d["infeasible"])]
        ax.set_xticks(d["size"], ticks)
        ax.minorticks_off()
        ax.set_xlabel(xlabel)
        ax.set_ylabel("λ*")
        ax.legend(frameon=False, fontsize=7)
    fig.suptitle(f"λ* from subsets of the dual's data (b = {margin:g})", fontsize=9)
    fig.tight_layout()
    return fig, data


# ----------------------------------------------------------------------------------------------------------
# Figure 5: compute


def _tokens(value: float) -> str:
    """10000 -> 10k, 2500000 -> 2.5M."""
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if value >= scale:
            return f"{value / scale:.3g}{unit}"
    return f"{value:.3g}"


def compute_vs_violation(points: list[Point], *, tolerance: float | None = None) -> tuple[Any, dict]:
    """Policy tokens processed against the constraint violation max(0, b − achieved gain), one point per
    algorithm and margin, with the evaluation's tolerance as a line (at or under it the constraint counts as
    met). An algorithm spends the same compute at every margin, and many points sit at zero violation, so points
    that would cover one another are spread sideways along the (log) compute axis by a few percent; ``data``
    keeps their true coordinates."""
    shown = sorted((p for p in points if p.label != "reference"), key=lambda p: (_order(p.label), p.margin))
    if not shown:
        raise NothingToPlot("only π_ref was run: it spends no policy compute and has no constraint to violate")
    xs = np.array([max(p.compute_tokens, 1.0) for p in shown])
    ys = np.array([p.violation for p in shown])
    top = max(float(ys.max()), tolerance or 0.0, 1e-3) * 1.12
    lo, hi = np.log10(xs.min()), np.log10(xs.max())
    decades = max(hi - lo, 1.0)
    # Points within a marker's width of each other (about 3% of the axis each way) are coincident to a reader.
    near_x, near_y = 0.03 * decades, 0.04 * top
    shift = np.zeros(len(shown))
    placed: list[list[int]] = []
    for i in range(len(shown)):
        group = next((g for g in placed if abs(np.log10(xs[g[0]]) - np.log10(xs[i])) < near_x
                      and abs(ys[g[0]] - ys[i]) < near_y), None)
        if group is None:
            placed.append([i])
        else:
            group.append(i)
    for group in placed:
        for rank, i in enumerate(group):
            shift[i] = (rank - (len(group) - 1) / 2) * near_x
    plotted = xs * 10 ** shift
    fig, ax = plt.subplots(figsize=(4.0, 2.8))
    if tolerance is not None:
        ax.axhspan(0, tolerance, color="#7f7f7f", alpha=0.12, lw=0)
        ax.axhline(tolerance, ls="--", color="#555555", lw=0.8, label=f"tolerance ({tolerance:g}): met below")
    data: dict[str, Any] = {}
    for label in sorted({p.label for p in shown}, key=_order, reverse=True):  # MoCAN last, on top
        idx = [i for i, p in enumerate(shown) if p.label == label]
        ax.scatter(plotted[idx], ys[idx], s=1.4 * _size(label) ** 2, marker=marker(label), color=color(label),
                   edgecolors="white", linewidths=0.5, label=name(label), zorder=3)
    for p in shown:
        key = f"{p.label} b={float(p.margin[0]):g}"
        if p.label == "fixed_lambda" and p.lam:  # a fixed-λ grid has several points per margin
            key += f" λ={p.lam[0]:g}"
        data[key] = (p.compute_tokens, p.violation)
    if tolerance is not None:
        data["tolerance"] = tolerance
    ax.set_xscale("log")
    ax.set_xlim(10 ** (lo - 0.15 * decades), 10 ** (hi + 0.15 * decades))
    # Ticks at the computes the points have (those close together merged): decade ticks can all fall outside
    # a sweep whose algorithms differ by a factor of three.
    ticks: list[float] = []
    for value in np.unique(xs):
        if not ticks or np.log10(value) - np.log10(ticks[-1]) > 0.08 * decades:
            ticks.append(float(value))
    ax.set_xticks(ticks, [_tokens(t) for t in ticks])
    ax.minorticks_off()
    ax.set_ylim(-0.05 * top, top)  # room under zero: markers at zero violation are not cut by the axis
    ax.set_xlabel("policy tokens processed (forward + backward)")
    ax.set_ylabel("constraint violation max(0, b − gain)")
    ax.set_title("compute spent vs constraint violation")
    handles, names = ax.get_legend_handles_labels()
    ax.legend(handles[::-1], names[::-1], frameon=False, fontsize=7, loc="best")
    return fig, data


# ----------------------------------------------------------------------------------------------------------
# Entry points


def _drawable(charts: dict[str, Any]) -> dict[str, tuple[Any, dict]]:
    """Build each chart, leaving out (with a log line) those the sweep has nothing for."""
    made = {}
    for key, build in charts.items():
        try:
            made[key] = build()
        except NothingToPlot as why:
            log.info("%s: not drawn: %s", key, why)
    return made


def sweep_charts(sweep: Sweep, points: list[Point]) -> dict[str, tuple[Any, dict]]:
    """The charts the sweep report logs to W&B (those the sweep has something for)."""
    tolerance = _tolerance(sweep)
    return _drawable({
        "pareto": lambda: tradeoff(points),
        "predicted_vs_achieved": lambda: predicted_vs_achieved(points, tolerance=tolerance),
        "lambda_vs_margin": lambda: lambda_vs_margin(sweep),
        "compute_vs_violation": lambda: compute_vs_violation(points, tolerance=tolerance),
    })


def _policy_job(sweep: Sweep) -> Job:
    """The job whose held-out scores Fig. 2b compares with π_ref's: MoCAN's (else the first algorithm's in the
    paper's order) at the middle of its margins."""
    policies = [j for j in sweep.jobs if j.label != "reference"]
    if not policies:
        raise NothingToPlot("only π_ref was run: there is no aligned policy to compare with it")
    first = min((j.label for j in policies), key=lambda lab: (lab != "mocan", _order(lab), lab))
    jobs = sorted((j for j in policies if j.label == first), key=lambda j: j.margin)
    return jobs[len(jobs) // 2]


def make_figures(root: str | Path, out: str | Path | None = None, formats: tuple[str, ...] = ("pdf", "png")
                 ) -> FigureData:
    """Every figure of the sweep under ``root`` in ``formats`` (PDF for the paper, PNG to look at) in ``out``
    (default ``<root>/figures``). A figure the sweep has nothing for gets no file (an older one of that name is
    removed, so the folder never shows a stale figure beside fresh ones); the result's ``skipped`` says why,
    and so does the log."""
    sweep = load_sweep(root)
    if not sweep.jobs:
        raise ValueError(f"no completed jobs under {root}: nothing to plot")
    out = Path(out) if out else sweep.root / "figures"
    out.mkdir(parents=True, exist_ok=True)
    points = sweep_points(sweep)
    tolerance = _tolerance(sweep)

    def dual(draw):
        return lambda: draw(_dual_job(sweep))

    figures = {
        "fig1a_reference_scores": dual(reference_scores),
        "fig1b_dual_curves": dual(lambda job: dual_curves(sweep, job)),
        "fig1c_solver_error": dual(solver_error),
        "fig1d_lambda_vs_margin": lambda: lambda_vs_margin(sweep),
        "fig2a_predicted_vs_achieved": lambda: predicted_vs_achieved(points, tolerance=tolerance),
        "fig2b_score_distributions": lambda: score_distributions(_policy_job(sweep)),
        "fig3a_tradeoff": lambda: tradeoff(points),
        "fig3b_win_rates": lambda: win_rates(sweep),
        "fig4_lambda_vs_data": dual(lambda_vs_data),
        "fig5_compute": lambda: compute_vs_violation(points, tolerance=tolerance),
    }
    data = FigureData()
    for key, build in figures.items():
        try:
            fig, values = build()
        except NothingToPlot as why:
            data.skipped[key] = str(why)
            log.info("%s: not drawn: %s", key, why)
            for ext in ("pdf", "png"):
                (out / f"{key}.{ext}").unlink(missing_ok=True)
            continue
        for ext in formats:
            fig.savefig(out / f"{key}.{ext}", bbox_inches="tight")
        plt.close(fig)
        data[key] = values
    return data


def main() -> None:
    parser = argparse.ArgumentParser(description="Regenerate the paper's figures from a sweep's local outputs.")
    parser.add_argument("sweep_dir", type=Path)
    parser.add_argument("--out", type=Path, default=None, help="output folder (default: <sweep_dir>/figures)")
    parser.add_argument("--format", action="append", choices=("pdf", "png"), default=None,
                        help="file format, repeatable (default: pdf and png)")
    args = parser.parse_args()
    formats = tuple(args.format or ("pdf", "png"))
    start = time.perf_counter()
    made = make_figures(args.sweep_dir, args.out, formats)
    out = args.out or args.sweep_dir / "figures"
    print(f"{len(made)} figures in {time.perf_counter() - start:.1f} s -> {out}")
    for key in made:
        print(f"  {out / key}.{formats[0]}")
    for key, why in made.skipped.items():
        print(f"  {key}: not drawn: {why}")


if __name__ == "__main__":
    main()
