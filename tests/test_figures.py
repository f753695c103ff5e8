"""The paper's figures read as a paper's reader needs: no empty frames, no point hidden under another, plain
numbers in titles, no pale colours, and the plotted values equal to the summaries'. On small synthetic sweeps
(summaries and arrays written the way jobs write them), so the whole module runs in a few seconds; the figures
of a real tabular sweep are checked in test_sweeps.py."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import pytest
from matplotlib.colors import to_rgb
from matplotlib.text import Text

from alignment import figures
from alignment.dual import solve_dual
from alignment.sweep import Job, Point, Sweep

BETA = 0.5


def _world(seed: int = 0, n: int = 24, k: int = 8) -> dict[str, np.ndarray]:
    """π_ref's samples and scores for the dual, and held-out scores before and after, as a job's arrays.npz."""
    rng = np.random.default_rng(seed)
    reward = rng.normal(size=(n, k))
    safety = (-0.5 * reward + rng.normal(size=(n, k)))[..., None]
    return {"reward": reward, "safety": safety, "eval_reference_safety": rng.normal(size=200),
            "eval_policy_safety": rng.normal(0.3, 1.0, size=200)}


def _summary(label: str, margin: float, arrays: dict[str, np.ndarray], *, seed: int = 0, lam: float | None = None,
             tokens: float = 1e5, gain: float | None = None) -> dict:
    """A completed job's summary with the keys the report and the figures read. One-shot labels get the dual's
    λ* on ``arrays`` and a prediction; others the ``lam`` given (None: no multiplier, like π_ref or DPO)."""
    algorithm = {"primal_dual_cold": "primal_dual", "dpo_helpful": "dpo"}.get(label, label)
    one_shot = label in ("mocan", "pecan")
    if one_shot:
        lam = float(solve_dual(arrays["reward"], arrays["safety"], margin, BETA).lam[0])
    achieved = margin - 0.01 if gain is None else gain
    if label == "reference":
        achieved = 0.0
    return {
        "status": "completed", "algorithm": algorithm, "algorithm/label": label, "seed": seed, "margin": [margin],
        "beta": BETA, "constraints": ["harmlessness"], "eval/tolerance": 0.02,
        "dual/lambda": None if lam is None else [lam],
        "dual/lambda_ci": [[lam * 0.9], [lam * 1.1]] if one_shot else None,
        "predicted/safety_gain": [margin] if one_shot else None,
        "predicted/safety_gain_ci": [[margin - 0.05], [margin + 0.05]] if one_shot else None,
        "eval/reward_gain": 0.5 - achieved, "eval/reward_gain_ci": [0.4 - achieved, 0.6 - achieved],
        "eval/safety_gain": [achieved], "eval/safety_gain_ci": [[achieved - 0.1], [achieved + 0.1]],
        "eval/constraint_met": achieved >= margin - 0.02,
        "compute/forward_tokens": 0 if label == "reference" else tokens,
        "compute/backward_tokens": 0 if label == "reference" else tokens,
    }


def _write_sweep(root: Path, jobs: list[tuple[str, float]]) -> Path:
    """Job folders as a multirun leaves them: summary.json and arrays.npz in each."""
    arrays = _world()
    for i, (label, margin) in enumerate(jobs):
        folder = root / str(i)
        folder.mkdir(parents=True)
        lam = 0.5 + margin if label.startswith("primal_dual") else None
        (folder / "summary.json").write_text(json.dumps(_summary(label, margin, arrays, lam=lam)))
        np.savez(folder / "arrays.npz", **arrays)
    return root


def _texts(fig) -> list[str]:
    return [t.get_text() for t in fig.findobj(Text) if t.get_text()]


def test_a_sweep_without_mocan_writes_no_empty_figure_and_says_why(tmp_path, monkeypatch, capsys):
    """Primal-dual and π_ref only: no Fig. 2a (nothing predicted a gain), and the command says so. π_ref alone:
    no Fig. 5 (no compute, no constraint), 2b, 3a or 1d either, and a stale file of a skipped figure goes."""
    root = _write_sweep(tmp_path / "pd", [("primal_dual_cold", 0.1), ("primal_dual_cold", 0.3), ("reference", 0.1)])
    monkeypatch.setattr(sys, "argv", ["figures", str(root), "--format", "png"])
    monkeypatch.setitem(plt.rcParams, "savefig.dpi", 40)  # what is checked here is which files, not how sharp
    figures.main()
    printed = capsys.readouterr().out
    out = root / "figures"
    assert not (out / "fig2a_predicted_vs_achieved.png").exists()
    assert "fig2a_predicted_vs_achieved: not drawn: no MoCAN" in printed
    assert "fig3b_win_rates: not drawn" in printed
    assert (out / "fig5_compute.png").exists() and (out / "fig1d_lambda_vs_margin.png").exists()

    only_ref = _write_sweep(tmp_path / "ref", [("reference", 0.1), ("reference", 0.3)])
    (only_ref / "figures").mkdir()
    (only_ref / "figures" / "fig5_compute.png").write_bytes(b"from an earlier sweep")
    data = figures.make_figures(only_ref, formats=("png",))
    skipped = {"fig1d_lambda_vs_margin", "fig2a_predicted_vs_achieved", "fig2b_score_distributions",
               "fig3a_tradeoff", "fig3b_win_rates", "fig5_compute"}
    assert set(data.skipped) == skipped and not skipped & set(data)
    assert "only π_ref" in data.skipped["fig5_compute"]
    assert not any((only_ref / "figures" / f"{key}.png").exists() for key in skipped)
    assert (only_ref / "figures" / "fig1a_reference_scores.png").exists()  # π_ref's own scores still are a figure


def _in_memory_sweep(tmp_path: Path) -> Sweep:
    """MoCAN and PeCAN at three margins (MoCAN with two seeds at 0.3), cold primal-dual, a fixed-λ grid, DPO
    and π_ref; margins as numpy floats, as code that builds summaries in memory may leave them."""
    arrays = _world()
    np.savez(tmp_path / "arrays.npz", **arrays)
    summaries = [_summary(label, np.float64(m), arrays) for label in ("mocan", "pecan") for m in (0.1, 0.3, 0.5)]
    summaries.append(_summary("mocan", np.float64(0.3), _world(seed=1), seed=1))
    summaries += [_summary("primal_dual_cold", np.float64(m), arrays, lam=0.7 + m, tokens=4e5) for m in (0.1, 0.5)]
    summaries += [_summary("fixed_lambda", np.float64(0.3), arrays, lam=lam) for lam in (0.5, 2.0)]
    summaries += [_summary(label, np.float64(0.3), arrays) for label in ("dpo_helpful", "reference")]
    return Sweep(tmp_path, [Job(tmp_path, s) for s in summaries])


@pytest.mark.fast
def test_lambda_against_margin_plots_the_summaries_multipliers(tmp_path):
    sweep = _in_memory_sweep(tmp_path)
    fig, data = figures.lambda_vs_margin(sweep)
    assert set(data) == {"mocan", "pecan", "primal_dual_cold"}  # a fixed λ is an input; π_ref and DPO have none
    for label, d in data.items():
        jobs = [j for j in sweep.jobs if j.label == label]
        for margin, lam, low, high in zip(d["margin"], d["lambda"], d["low"], d["high"]):
            at = [j for j in jobs if j.margin[0] == margin]
            assert lam == pytest.approx(np.mean([j.summary["dual/lambda"][0] for j in at]))
            if len(at) == 1 and label != "primal_dual_cold":
                assert (low, high) == (at[0].summary["dual/lambda_ci"][0][0], at[0].summary["dual/lambda_ci"][1][0])
            else:  # several seeds, or a last iterate: no interval of the dual's λ* drawn around it
                assert np.isnan(low) and np.isnan(high)
    # The lines drawn are those values, each algorithm's beside the others' at the same margins.
    lines = {line.get_label(): line for line in fig.axes[0].lines if not line.get_label().startswith("_")}
    np.testing.assert_allclose(lines["MoCAN"].get_ydata(), data["mocan"]["lambda"])
    assert not np.allclose(lines["MoCAN"].get_xdata(), lines["PeCAN"].get_xdata())
    assert [t.get_text() for t in fig.axes[0].get_xticklabels()] == ["0.1", "0.3", "0.5"]
    plt.close(fig)
    with pytest.raises(figures.NothingToPlot):
        figures.lambda_vs_margin(Sweep(tmp_path, [j for j in sweep.jobs if j.label in ("reference", "fixed_lambda")]))


@pytest.mark.fast
def test_titles_and_labels_print_plain_numbers(tmp_path):
    """Margins that arrive as numpy floats are written as 0.3, never np.float64(0.3)."""
    sweep = _in_memory_sweep(tmp_path)
    job = sweep.jobs[1]  # MoCAN at 0.3
    made = [figures.dual_curves(sweep, job), figures.solver_error(job), figures.score_distributions(job),
            figures.lambda_vs_data(job, repeats=3), figures.lambda_vs_margin(sweep)]
    texts = [t for fig, _ in made for t in _texts(fig)]
    for fig, _ in made:
        plt.close(fig)
    assert not [t for t in texts if "float" in t or "np." in t]
    assert "b = 0.3" in texts and "solver convergence (b = 0.3)" in texts


@pytest.mark.fast
def test_margin_colours_are_never_pale():
    """viridis' top end is a pale yellow that vanishes on white: every margin's colour stays dark enough."""
    colors = figures.margin_colors([0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7])
    luminance = [0.2126 * r + 0.7152 * g + 0.0722 * b for r, g, b in (to_rgb(c) for c in colors.values())]
    assert max(luminance) < 0.7 and len(set(colors.values())) == 7
    assert luminance == sorted(luminance)  # dark to light with the margin


def _point(label: str, margin: float, *, reward: float, safety: float, tokens: float = 1e5) -> Point:
    return Point(label=label, margin=(margin,), lam=[1.0], seeds=1, reward_gain=reward, safety_gain=safety,
                 reward_ci=(reward - 0.1, reward + 0.1), safety_ci=(safety - 0.1, safety + 0.1),
                 predicted_safety_gain=margin, predicted_safety_ci=(margin - 0.02, margin + 0.02),
                 constraint_met=safety >= margin - 0.02, compute_tokens=tokens, violation=max(0.0, margin - safety))


@pytest.mark.fast
def test_compute_figure_draws_the_tolerance_and_keeps_coincident_points_apart():
    # MoCAN meets three margins exactly at one compute: three points at (1e5, 0) before any spreading.
    points = [_point("mocan", m, reward=0.4, safety=m) for m in (0.1, 0.3, 0.5)]
    points += [_point("primal_dual_cold", m, reward=0.4, safety=m - 0.3, tokens=4e5) for m in (0.1, 0.5)]
    points.append(_point("reference", 0.1, reward=0.0, safety=0.0, tokens=0))
    fig, data = figures.compute_vs_violation(points, tolerance=0.02)
    ax = fig.axes[0]
    assert data["tolerance"] == 0.02
    assert any(np.allclose(line.get_ydata(), 0.02) for line in ax.lines)  # the tolerance line
    assert data["mocan b=0.1"] == (1e5, 0.0) and data["primal_dual_cold b=0.5"] == (4e5, pytest.approx(0.3))
    fig.canvas.draw()
    drawn = np.vstack([ax.transData.transform(c.get_offsets()) for c in ax.collections if len(c.get_offsets())])
    assert len(drawn) == 5  # π_ref spends no compute and has no constraint: not a point here
    gaps = np.linalg.norm(drawn[:, None] - drawn[None], axis=-1) + np.eye(len(drawn)) * 1e9
    assert gaps.min() > 4  # pixels: no marker sits on another
    plt.close(fig)


@pytest.mark.fast
def test_tradeoff_keeps_every_algorithm_visible_with_mocan_on_top():
    """MoCAN's and primal-dual's fronts on the same points: distinct markers and line styles, MoCAN drawn last."""
    points = [_point(label, m, reward=0.5 - m, safety=m) for label in ("mocan", "primal_dual_cold") for m in (0.1, 0.3)]
    for p in points:
        p.on_front = True
    fig, data = figures.tradeoff(points)
    ax = fig.axes[0]
    markers = {line.get_marker(): line.get_zorder() for line in ax.lines if line.get_marker() not in ("None", None)}
    assert markers["o"] > markers["^"]  # MoCAN's circles above primal-dual's triangles
    fronts = [line for line in ax.lines if line.get_marker() in ("None", None) and len(line.get_xdata()) == 2]
    assert len({line.get_linestyle() for line in fronts}) == 2
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["MoCAN", "Primal-dual (cold start)"]
    assert data["mocan"] == data["primal_dual_cold"]  # the data keep the (identical) true coordinates
    plt.close(fig)


@pytest.mark.fast
def test_predicted_and_achieved_stand_side_by_side():
    points = [_point("mocan", m, reward=0.4, safety=m - 0.01) for m in (0.1, 0.3, 0.5)]
    fig, data = figures.predicted_vs_achieved(points, tolerance=0.02)
    np.testing.assert_allclose(data["margin"], [0.1, 0.3, 0.5])
    np.testing.assert_allclose(data["predicted"], [0.1, 0.3, 0.5])
    np.testing.assert_allclose(data["achieved"], [0.09, 0.29, 0.49])
    ax = fig.axes[0]
    xs = {c.get_label(): c.lines[0].get_xdata() for c in ax.containers}
    predicted, achieved = xs["predicted (dual)"], xs["held-out (MoCAN)"]
    assert np.all(predicted < achieved) and np.all(achieved - predicted < 0.05)  # beside, not at another margin
    plt.close(fig)
    with pytest.raises(figures.NothingToPlot, match="MoCAN"):
        figures.predicted_vs_achieved([p for p in points if p.label != "mocan"])
