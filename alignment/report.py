"""Aggregate a sweep: every job's summary into ``results.csv``, helpfulness-safety Pareto fronts per algorithm
with bootstrap intervals over seeds and prompts, charts, and a sweep-level W&B run in the jobs' group.

    python -m alignment.report outputs/multirun/2026-11-28/18-00-00      # on demand
    (runs by itself after every multirun: the SweepReport callback in conf/config.yaml)

Reads local outputs only (``summary.json`` and ``arrays.npz`` per job); writes into ``<sweep>/report/``.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import io
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from alignment.store import atomic_write_json, atomic_write_text

log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------------------------------------
# Loading


def sweep_group(sweep_dir: str | Path) -> str:
    """The W&B group of a multirun's jobs and of its report run, from the sweep folder's identity (its resolved
    path), so that the jobs and a later ``python -m alignment.report <folder>`` agree however the folder is
    written: ``sweep-<its last two path parts>-<8 hex digits of the resolved path>``, e.g.
    ``sweep-2026-11-30-10-00-00-1a2b3c4d`` for the default ``outputs/multirun/<date>/<time>``."""
    path = Path(sweep_dir).resolve()
    return f"sweep-{'-'.join(path.parts[-2:])}-{hashlib.sha256(str(path).encode()).hexdigest()[:8]}"


@dataclass
class Job:
    run_dir: Path
    summary: dict[str, Any]

    @property
    def label(self) -> str:
        return self.summary.get("algorithm/label") or self.summary["algorithm"]

    @property
    def margin(self) -> tuple[float, ...]:
        return tuple(self.summary["margin"])

    def arrays(self) -> dict[str, np.ndarray]:
        path = self.run_dir / "arrays.npz"
        if not path.exists():
            return {}
        with np.load(path) as data:
            return {k: data[k] for k in data.files}


@dataclass
class Sweep:
    root: Path
    jobs: list[Job]  # completed
    failed: list[str] = field(default_factory=list)  # "<dir>: <status or error>"

    def by_label(self) -> dict[str, list[Job]]:
        out: dict[str, list[Job]] = {}
        for job in self.jobs:
            out.setdefault(job.label, []).append(job)
        return out


def load_sweep(root: str | Path) -> Sweep:
    """Every job under ``root``: Hydra job folders (with ``.hydra/``) and any folder with a ``summary.json``.
    A job without a completed summary is a failure (it crashed, was killed, or its margin was infeasible)."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"sweep folder {str(root)!r} does not exist")
    folders = {p.parent for p in root.rglob(".hydra") if p.is_dir()} | {p.parent for p in root.rglob("summary.json")}
    folders = {f for f in folders if f != root and "report" not in f.relative_to(root).parts}
    jobs, failed = [], []
    for folder in sorted(folders, key=_job_order):
        try:
            summary = json.loads((folder / "summary.json").read_text())
        except (OSError, ValueError):
            failed.append(f"{folder}: no summary (the job crashed or never started)")
            continue
        if summary.get("status") == "completed":
            jobs.append(Job(folder, summary))
        else:
            failed.append(f"{folder}: {summary.get('status')}: {summary.get('error', '')}")
    return Sweep(root, jobs, failed)


def _job_order(path: Path) -> tuple:
    return tuple(int(p) if p.isdigit() else p for p in path.parts)


# ----------------------------------------------------------------------------------------------------------
# Tables


def _scalar_columns(summary: dict[str, Any]) -> dict[str, Any]:
    """A flat row: scalars as they are, vectors as <key>_<j>, intervals as <key>_low_<j> / <key>_high_<j>."""
    row: dict[str, Any] = {}
    for key, value in summary.items():
        if key in ("packages", "cache/events") or key.endswith("/history"):
            continue
        if key.endswith("_ci") and isinstance(value, list) and len(value) == 2:
            for bound, values in zip(("low", "high"), value):
                for j, v in enumerate(np.atleast_1d(values)):
                    row[f"{key[:-3]}_{bound}_{j}"] = float(v)
        elif isinstance(value, list) and all(isinstance(v, (int, float)) for v in value):
            for j, v in enumerate(value):
                row[f"{key}_{j}"] = v
        elif value is None or isinstance(value, (str, int, float, bool)):
            row[key] = value
    return row


def results_table(sweep: Sweep) -> tuple[list[str], list[list[Any]]]:
    rows = [{"run_dir": str(job.run_dir), **_scalar_columns(job.summary)} for job in sweep.jobs]
    first = ["run_dir", "algorithm/label", "algorithm", "seed", "margin_0", "dual/lambda_0",
             "predicted/safety_gain_0", "eval/safety_gain_0", "eval/safety_gain_low_0", "eval/safety_gain_high_0",
             "eval/reward_gain", "eval/reward_gain_low_0", "eval/reward_gain_high_0", "eval/constraint_met"]
    seen = [c for c in first if any(c in r for r in rows)]
    rest = sorted({c for r in rows for c in r} - set(seen))
    columns = seen + rest
    return columns, [[r.get(c) for c in columns] for r in rows]


def write_csv(path: Path, columns: list[str], rows: list[list[Any]]) -> None:
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(columns)
    writer.writerows(rows)
    atomic_write_text(path, buffer.getvalue())


# ----------------------------------------------------------------------------------------------------------
# Points with intervals over seeds and prompts, and Pareto fronts


@dataclass
class Point:
    """One configuration of one algorithm (all its seeds): mean gains and intervals over seeds and prompts."""

    label: str
    margin: tuple[float, ...]
    lam: list[float] | None
    seeds: int
    reward_gain: float
    safety_gain: float  # first constraint
    reward_ci: tuple[float, float]
    safety_ci: tuple[float, float]
    predicted_safety_gain: float | None
    predicted_safety_ci: tuple[float, float] | None
    constraint_met: bool
    compute_tokens: float  # forward + backward, mean over seeds
    violation: float  # max(0, margin - achieved safety gain)
    on_front: bool = False
    # Fresh samples on the dual's prompts (insample/*, first constraint): mean over seeds; interval with one seed.
    insample_safety_gain: float | None = None
    insample_safety_ci: tuple[float, float] | None = None

    def to_dict(self) -> dict[str, Any]:
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in self.__dict__.items()}


def hierarchical_interval(draws: list[np.ndarray], level: float, *, n_boot: int = 2000, seed: int = 0
                          ) -> tuple[float, float]:
    """Percentile interval of the mean over seeds, resampling seeds and then each seed's prompt-bootstrap
    draws (a two-level bootstrap). With one seed it would only approximate that seed's prompt interval (a
    resample of its draws), so ``sweep_points`` takes a single run's interval from its summary instead."""
    rng = np.random.default_rng(seed)
    s = len(draws)
    picks = rng.integers(0, s, size=(n_boot, s))
    values = np.array([[d[rng.integers(0, len(d))] for d in (draws[i] for i in row)] for row in picks]).mean(axis=1)
    alpha = (1 - level) / 2
    low, high = np.quantile(values, [alpha, 1 - alpha])
    return float(low), float(high)


def pareto_mask(points: np.ndarray) -> np.ndarray:
    """Non-dominated rows of [P, 2] (both coordinates maximised): no other point is >= in both and > in one."""
    keep = np.ones(len(points), dtype=bool)
    for i, p in enumerate(points):
        others = np.delete(points, i, axis=0)
        keep[i] = not np.any(np.all(others >= p, axis=1) & np.any(others > p, axis=1))
    return keep


def sweep_points(sweep: Sweep, level: float = 0.95) -> list[Point]:
    """One point per (algorithm label, margin, λ for fixed-λ grids), over seeds; fronts marked per algorithm."""
    groups: dict[tuple, list[Job]] = {}
    for job in sweep.jobs:
        lam_key = tuple(job.summary["dual/lambda"] or []) if job.summary["algorithm"] == "fixed_lambda" else ()
        groups.setdefault((job.label, job.margin, lam_key), []).append(job)
    points = []
    for (label, margin, _), jobs in groups.items():
        arrays = [job.arrays() for job in jobs]
        s = [job.summary for job in jobs]
        reward = float(np.mean([x["eval/reward_gain"] for x in s]))
        safety = float(np.mean([x["eval/safety_gain"][0] for x in s]))
        if len(jobs) > 1 and all("eval_reward_draws" in a for a in arrays):
            reward_ci = hierarchical_interval([a["eval_reward_draws"] for a in arrays], level)
            safety_ci = hierarchical_interval([a["eval_safety_draws"][:, 0] for a in arrays], level)
        else:  # one seed: the run's own prompt interval, exactly as its summary has it
            reward_ci = tuple(s[0]["eval/reward_gain_ci"])
            safety_ci = (s[0]["eval/safety_gain_ci"][0][0], s[0]["eval/safety_gain_ci"][1][0])
        predicted = [x["predicted/safety_gain"][0] for x in s if x.get("predicted/safety_gain") is not None]
        pred_ci = s[0].get("predicted/safety_gain_ci")
        insample = [x["insample/safety_gain"][0] for x in s if x.get("insample/safety_gain") is not None]
        insample_ci = s[0].get("insample/safety_gain_ci")
        points.append(Point(
            label=label, margin=margin, lam=s[0]["dual/lambda"], seeds=len(jobs), reward_gain=reward,
            safety_gain=safety, reward_ci=reward_ci, safety_ci=safety_ci,
            predicted_safety_gain=float(np.mean(predicted)) if predicted else None,
            predicted_safety_ci=(pred_ci[0][0], pred_ci[1][0]) if pred_ci and len(jobs) == 1 else None,
            constraint_met=all(x["eval/constraint_met"] for x in s),
            compute_tokens=float(np.mean([x["compute/forward_tokens"] + x["compute/backward_tokens"] for x in s])),
            violation=max(0.0, margin[0] - safety),
            insample_safety_gain=float(np.mean(insample)) if len(insample) == len(s) else None,
            insample_safety_ci=(insample_ci[0][0], insample_ci[1][0]) if insample_ci and len(jobs) == 1 else None,
        ))
    for label in {p.label for p in points}:
        members = [p for p in points if p.label == label]
        mask = pareto_mask(np.array([[p.reward_gain, p.safety_gain] for p in members]))
        for p, on in zip(members, mask):
            p.on_front = bool(on)
    return sorted(points, key=lambda p: (p.label, p.margin))


# ----------------------------------------------------------------------------------------------------------
# The report


@dataclass
class SweepReportResult:
    results_csv: Path
    jobs: int
    reused: int
    failed: list[str]
    points: list[Point]


def report_sweep(root: str | Path, *, tracker_kind: str = "none", project: str = "constrained-alignment",
                 entity: str | None = None, group: str | None = None, mode: str | None = None,
                 figures: bool = True) -> SweepReportResult:
    """Write ``report/results.csv``, ``report/points.json`` and the sweep charts; log them to a sweep-level
    tracker run (W&B job_type ``sweep-report`` in the jobs' group) when ``tracker_kind`` is ``wandb``."""
    from alignment.console import quiet_libraries
    from alignment.tracking import make_tracker

    quiet_libraries()  # the figures' PDF fonts would log hundreds of fontTools lines at Hydra's INFO level
    sweep = load_sweep(root)
    out = sweep.root / "report"
    out.mkdir(parents=True, exist_ok=True)
    columns, rows = results_table(sweep)
    write_csv(out / "results.csv", columns, rows)
    points = sweep_points(sweep) if sweep.jobs else []
    atomic_write_json(out / "points.json", [p.to_dict() for p in points])
    atomic_write_json(out / "failed.json", sweep.failed)
    group = group or sweep_group(sweep.root)
    # One report run per sweep folder: a fixed id, resumed by every later report of the same sweep, so that a
    # relaunch or a rerun of the report updates the group's report run instead of adding another.
    tracker = make_tracker(tracker_kind, out, project=project, entity=entity, group=group, job_type="sweep-report",
                           tags=["sweep-report"], name=f"{group}-report",
                           run_id="report-" + hashlib.sha256(group.encode()).hexdigest()[:16],
                           config={"sweep_dir": str(sweep.root), "jobs": len(sweep.jobs)}, mode=mode)
    try:
        tracker.log_table("sweep/results", columns, rows)
        tracker.log_table("sweep/pareto", list(points[0].to_dict()) if points else [],
                          [list(p.to_dict().values()) for p in points])
        if figures and sweep.jobs:
            import matplotlib.pyplot as plt

            from alignment.figures import sweep_charts

            for name, (fig, _) in sweep_charts(sweep, points).items():
                tracker.log_figure(f"sweep/{name}_plot", fig)
                plt.close(fig)
    finally:
        tracker.finish({"sweep/jobs": len(sweep.jobs), "sweep/failed": len(sweep.failed),
                        "sweep/results_csv": str(out / "results.csv")})
    reused = sum(1 for job in sweep.jobs if job.summary.get("resumed_from"))
    return SweepReportResult(out / "results.csv", len(sweep.jobs), reused, sweep.failed, points)


def main() -> None:
    parser = argparse.ArgumentParser(description="Aggregate a sweep folder into results.csv, Pareto fronts and charts.")
    parser.add_argument("sweep_dir", type=Path)
    parser.add_argument("--wandb", action="store_true", help="also log a sweep-level W&B run")
    parser.add_argument("--group", default=None, help="W&B group (default: the sweep's group, as its jobs had)")
    args = parser.parse_args()
    result = report_sweep(args.sweep_dir, tracker_kind="wandb" if args.wandb else "none", group=args.group)
    for p in result.points:
        print(f"{p.label:18} margin {list(p.margin)}  reward {p.reward_gain:+.3f} {p.reward_ci}  "
              f"safety {p.safety_gain:+.3f} {p.safety_ci}  {'front' if p.on_front else ''}")
    print(f"{result.jobs} jobs ({result.reused} reused), {len(result.failed)} failed -> {result.results_csv}")
    for failure in result.failed:
        print("failed:", failure)
    raise SystemExit(1 if result.failed else 0)


if __name__ == "__main__":
    main()
